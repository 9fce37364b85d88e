"""Prefill throughput of the frozen target: tokens/s and MFU.

    python scripts/bench_target.py                                   # SmolLM2-135M (GGUF, real weights), CPU
    python scripts/bench_target.py --shape qwen3-8b --dtype bfloat16 --batch 1 --seq 4096   # GPU, random weights

One "prefill" = the jitted full forward ``taps, final_hidden = model(ids, layer_ids)`` (5 DFlash tap layers) plus
logits of the last position, as the trainer / speculative decoder use it.

FLOPs are counted explicitly (multiply-add = 2 FLOPs), attention counted as computed (full S x S scores, the
causal mask is applied, not skipped):
    F = 2*B*S*P_mm + 4*B*S*S*NH*HD*L + 2*B*H*V
    P_mm = L*(H*(NH+2*KVH)*HD + NH*HD*H + 3*H*I)   (matmul parameters of the decoder layers)
MFU = F / time / peak, with peak = the device's nominal dense peak for the dtype when known (H100/H200: 989
TFLOP/s bf16), else the measured throughput of a large matmul in that dtype (printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash_jax.blocks import build_target_layer_ids
from dflash_jax.models.target import TargetConfig
from dflash_jax.models.target_io import load_target, random_target, smollm2_gguf_path
from dflash_jax.train.cost import peak_tflops, prefill_flops

QWEN3_8B = TargetConfig(
    arch="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    qk_norm=True,
    max_position_embeddings=40960,
)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=("smollm2", "qwen3-8b"), default="smollm2")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=None, help="default 256 for smollm2, 4096 for qwen3-8b")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)

    dev = jax.devices()[0]
    dtype_name = args.dtype or ("float32" if dev.platform == "cpu" else "bfloat16")
    seq = args.seq or (256 if args.shape == "smollm2" else 4096)
    t0 = time.perf_counter()
    if args.shape == "smollm2":
        target = load_target(smollm2_gguf_path(), dtype=dtype_name)
    else:
        target = random_target(QWEN3_8B, seed=0, dtype=dtype_name)
    cfg, model = target.config, target.model
    jax.block_until_ready(nnx.state(model))
    load_s = time.perf_counter() - t0
    layer_ids = tuple(build_target_layer_ids(cfg.num_layers, 5))

    @nnx.jit
    def prefill(m, ids):
        taps, final = m(ids, layer_ids=layer_ids)
        return taps, m.logits(final[:, -1])

    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, seq)), jnp.int32)
    t0 = time.perf_counter()
    jax.block_until_ready(prefill(model, ids))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(prefill(model, ids))
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    flops = prefill_flops(cfg, args.batch, seq)
    kind = dev.device_kind
    peak, peak_src = peak_tflops(dev, dtype_name)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model)))
    print(
        f"device: {kind} ({dev.platform}), jax {jax.__version__}, python {platform.python_version()}, "
        f"cpu {platform.processor() or platform.machine()} x{os.cpu_count()}"
    )
    print(
        f"model: {args.shape} ({cfg.arch}, L={cfg.num_layers}, H={cfg.hidden_size}, V={cfg.vocab_size}, "
        f"{n_params / 1e6:.1f}M params), dtype {dtype_name}, taps {layer_ids}"
    )
    print(
        f"shape: batch {args.batch} x seq {seq}; load {load_s:.1f}s, compile+first {compile_s:.1f}s, steps {args.steps}"
    )
    print(f"prefill: {step * 1e3:.1f} ms/step (median), {args.batch * seq / step:,.0f} tokens/s")
    print(
        "FLOPs = 2*B*S*P_mm + 4*B*S^2*NH*HD*L + 2*B*H*V = "
        f"{flops / 1e12:.4f} TFLOP/step -> {flops / step / 1e12:.3f} TFLOP/s"
    )
    print(f"MFU: {100 * flops / step / 1e12 / peak:.1f}% of {peak:.2f} TFLOP/s ({peak_src}, {dtype_name})")


if __name__ == "__main__":
    main()
