"""What a training step costs, shown before a run spends it: model FLOPs per step (the formula of
docs/benchmarks.md, also used by ``scripts/bench_*.py``) and the plan line the trainer prints.

FLOPs per step (multiply-add = 2; "model FLOPs": rematerialisation not counted; Q = N*bs anchors x block size,
T = #taps, P_mm = L*(H*(NH+2*KVH)*HD + NH*HD*H + 3*H*I), the target's decoder matmul parameters)::

    prefill = 2*B*S*P_mm + 4*B*S^2*NH_t*HD_t*L_t + 2*B*H*V             (full causal S x S scores counted)
    target  = prefill - 2*B*H*V                                        (online only: no logits in the step)
    draft   = 2*B*S*T*H*H + L_d*(2*B*S*H*2*KVH*HD + 2*B*Q*H*(2*NH*HD + 2*KVH*HD) + 2*B*Q*3*H*I + 4*B*Q*K*NH*HD)
              with K = S + bs keys per query (block-sparse; the reference's dense mask computes K = S + Q)
    lm_head = 2*B*Q*H*V
    F = target + 3*draft + 2*lm_head + teacher                         (backward = 2x forward; lm_head is frozen)
    teacher = lm_head with KD (Q teacher rows), 0 without; the reference's HF forward computes 2*B*S*H*V always

The vocabulary enters through ``lm_head`` and ``teacher`` (``2*B*Q*H*V`` each): with a 152k vocabulary they
dominate small targets.

MFU (``mfu`` in metrics.jsonl) = F / step time / (devices x peak FLOP/s of one device): the peak is the nominal
dense bf16 figure of :data:`NOMINAL_PEAK_TFLOPS` for a bfloat16 run on a listed chip, else a matmul measured on the
run's first device in the run's compute dtype (:func:`measured_matmul_tflops`; CPUs, fp32 runs, unlisted chips).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense (no sparsity) peak TFLOP/s of one device, matched as a substring of ``jax.Device.device_kind`` in this
# order (the first match wins: "TPU v5 lite" before "TPU v5"). Sources: NVIDIA H100 Tensor Core GPU datasheet
# (SXM 989 / PCIe 756 bf16 dense; the 1979 / 1513 figures are with 2:4 sparsity); NVIDIA H200 Tensor Core GPU
# datasheet (989 bf16 dense); Google Cloud TPU system architecture pages cloud.google.com/tpu/docs/v5e (197),
# /v5p (459), /v6e (918) bf16 peak per chip.
NOMINAL_PEAK_TFLOPS = {
    ("H100 PCIe", "bfloat16"): 756.0,
    ("H100", "bfloat16"): 989.0,
    ("H200", "bfloat16"): 989.0,
    ("TPU v5 lite", "bfloat16"): 197.0,
    ("TPU v5e", "bfloat16"): 197.0,
    ("TPU v6 lite", "bfloat16"): 918.0,
    ("TPU v6e", "bfloat16"): 918.0,
    ("TPU v5", "bfloat16"): 459.0,  # v5p reports "TPU v5p" or "TPU v5"
}


def measured_matmul_tflops(dtype: Any, n: int, iters: int = 3, device: jax.Device | None = None) -> float:
    """TFLOP/s of ``iters`` back-to-back ``[n,n] @ [n,n]`` matmuls in ``dtype`` on ``device`` (default: the first
    device), after one warm-up call."""
    a = jax.device_put(jnp.ones((n, n), dtype), device or jax.devices()[0])
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t = time.perf_counter()
    for _ in range(iters):
        f(a).block_until_ready()
    return iters * 2 * n**3 / (time.perf_counter() - t) / 1e12


def peak_tflops(device: jax.Device, dtype: str) -> tuple[float, str]:
    """``(peak TFLOP/s of one device, source)``: the nominal figure of :data:`NOMINAL_PEAK_TFLOPS` for ``dtype``
    on ``device``'s kind, else a measured ``[n,n]`` matmul (n = 2048 on CPU, 8192 on accelerators)."""
    peak = next((v for (k, d), v in NOMINAL_PEAK_TFLOPS.items() if k in device.device_kind and d == dtype), None)
    if peak is not None:
        return peak, "nominal"
    n = 2048 if device.platform == "cpu" else 8192
    return measured_matmul_tflops(getattr(jnp, dtype), n, device=device), "measured matmul"


def prefill_flops(c: Any, b: int, s: int) -> float:
    """Model FLOPs of one target prefill (``prefill`` above) for a ``TargetConfig`` ``c``, batch ``b``, length
    ``s``, including the last position's logits."""
    h, nh, kvh, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    p_mm = c.num_layers * (h * (nh + 2 * kvh) * hd + nh * hd * h + 3 * h * c.intermediate_size)
    attn = 4 * b * s * s * c.num_attention_heads * c.head_dim * c.num_layers
    return 2 * b * s * p_mm + attn + 2 * b * c.hidden_size * c.vocab_size


def train_flops(
    tc: Any,
    dc: Any,
    b: int,
    s: int,
    n: int,
    kd: bool,
    *,
    online: bool = True,
    dense_attention: bool = False,
    full_teacher: bool = False,
) -> float:
    """``F`` above for target config ``tc``, ``DraftConfig`` ``dc``, batch ``b``, sequence ``s``, ``n`` anchors;
    ``online=False`` (offline features): no target forward. ``dense_attention``: draft attention over all
    ``S + N*bs`` keys (the reference's dense mask) instead of ``S + bs``; ``full_teacher``: the target's logits at
    all ``S`` positions (the reference's HF forward) instead of the ``N*bs`` teacher rows of KD."""
    bs, h, q = dc.block_size, dc.hidden_size, n * dc.block_size
    target = prefill_flops(tc, b, s) - 2 * b * tc.hidden_size * tc.vocab_size if online else 0
    nh, kvh, hd, i = dc.num_attention_heads, dc.num_key_value_heads, dc.head_dim, dc.intermediate_size
    keys = s + (q if dense_attention else bs)
    per_layer = (
        2 * b * s * h * 2 * kvh * hd
        + 2 * b * q * h * (2 * nh * hd + 2 * kvh * hd)
        + 2 * b * q * 3 * h * i
        + 4 * b * q * keys * nh * hd
    )
    draft = 2 * b * s * dc.num_features * h * h + dc.num_layers * per_layer
    lm_head = 2 * b * q * h * dc.vocab_size
    teacher = 2 * b * s * h * dc.vocab_size if full_teacher else (lm_head if kd else 0)
    return target + 3 * draft + 2 * lm_head + teacher


def format_seconds(seconds: float) -> str:
    """``93.4`` -> ``"1m33s"``; ``5400`` -> ``"1h30m"``; under a minute with one decimal."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"


def plan_line(*, steps: int, start: int, batch: int, seq_len: int, flops: float) -> str:
    """The plan printed before the first step: tokens and model FLOPs per step and for the remaining steps."""
    left = steps - start
    return (
        f"plan: {left} steps (of {steps}) x {batch * seq_len} tokens/step ({batch} x {seq_len}); "
        f"{flops / 1e12:.4g} TFLOP/step (model FLOPs, docs/benchmarks.md), {left * flops / 1e15:.4g} PFLOP in all"
    )


def eta_line(*, step_s: float, measured: int, first_s: float, steps_left: int) -> str:
    """The estimate printed after the warm-up steps: seconds per step and the time left."""
    return (
        f"plan: first step (compile) {format_seconds(first_s)}; step time {step_s:.3g}s (median of the next "
        f"{measured} steps); ETA {format_seconds(step_s * steps_left)} for the remaining {steps_left} steps "
        "(plus eval and checkpoint time)"
    )
