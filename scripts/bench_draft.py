"""Benchmark: DFlash draft forward+backward with the D-PACE loss, block-sparse vs dense-mask training attention.

The dense path is the reference's formulation: every query attends over ``[context S ; all N*bs block keys]`` with
a ``[B, N*bs, S+N*bs]`` mask (built here from the same visibility rule). The sparse path is the model's own
:func:`dflash_jax.models.draft.block_sparse_attention` (``[Q, S]`` + block-diagonal ``[N, bs, bs]`` scores).

    python scripts/bench_draft.py                 # CPU-sized shape (default)
    python scripts/bench_draft.py --shape large   # S=3072, N=512, bs=16, H=4096, 5 layers (GPU)

Prints one line per path (compile time, median step time, XLA temp memory of the compiled step) and
``sparse_speedup=<x>`` last.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dflash_jax
from dflash_jax import blocks, losses
from dflash_jax.models import draft as draft_mod
from dflash_jax.models import layers

SHAPES = {
    # CPU-sized, same N*bs/S ratio (2.67) as the large shape; well under 2 minutes on 2 cores.
    "small": dict(batch=1, seq=768, anchors=128, block=16, hidden=256, heads=4, kv_heads=2, head_dim=64,
                  intermediate=768, layers=2, vocab=2048, dtype="float32"),
    # The large shape (Qwen3-8B-like draft), GPU only.
    "large": dict(batch=1, seq=3072, anchors=512, block=16, hidden=4096, heads=32, kv_heads=8, head_dim=128,
                  intermediate=12288, layers=5, vocab=151936, dtype="bfloat16"),
}


def dense_attention(q, k_blk, v_blk, k_ctx, v_ctx, ctx_mask, blk_mask):
    """The reference formulation: one softmax over ``[ctx ; all blocks]`` with the dense ``[B, Q, S+Q]`` mask."""
    b, n, bs, _ = blk_mask.shape
    diag = jnp.eye(n, dtype=bool)[None, :, None, :, None] & blk_mask[:, :, :, None, :]  # [B, N, bs, N, bs]
    mask = jnp.concatenate([ctx_mask, diag.reshape(b, n * bs, n * bs)], axis=-1)
    return layers.masked_attention(q, jnp.concatenate([k_ctx, k_blk], 1), jnp.concatenate([v_ctx, v_blk], 1), mask)


def build(shape: dict, seed: int = 0):
    cfg = dflash_jax.DraftConfig(
        hidden_size=shape["hidden"], num_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], head_dim=shape["head_dim"], intermediate_size=shape["intermediate"],
        vocab_size=shape["vocab"], num_target_layers=max(8, shape["layers"] + 3),
        target_layer_ids=tuple(blocks.build_target_layer_ids(max(8, shape["layers"] + 3), shape["layers"])),
        block_size=shape["block"])
    dtype = jnp.dtype(shape["dtype"])
    with layers.unsharded_init():
        model = dflash_jax.DFlashDraft(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    b, s, n, bs, h = shape["batch"], shape["seq"], shape["anchors"], shape["block"], shape["hidden"]
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, shape["vocab"], (b, s)), jnp.int32)
    anchors = jnp.asarray(np.sort(rng.choice(s - bs, (b, n), replace=False), axis=1), jnp.int32)
    keep = jnp.ones((b, n), bool).at[:, -n // 8:].set(False)  # some padded blocks, as in real batches
    labels, mask = blocks.block_targets(ids, jnp.ones((b, s), jnp.float32), anchors, keep, bs)
    k = jax.random.split(jax.random.key(seed), 3)
    data = dict(
        noise=jax.random.normal(k[0], (b, n * bs, h), dtype),
        target_hidden=jax.random.normal(k[1], (b, s, cfg.num_features * h), dtype),
        lm_head=(0.02 * jax.random.normal(k[2], (shape["vocab"], h))).astype(dtype),
        anchors=anchors, keep=keep, labels=labels, mask=mask)
    return cfg, model, data


def make_step(graphdef, block_size):
    def step(params, data):
        def loss_fn(p):
            hidden = nnx.merge(graphdef, p)(data["noise"], data["target_hidden"], data["anchors"], data["keep"])
            b, q, h = hidden.shape
            loss, _ = losses.block_loss_from_hidden(hidden.reshape(b, q // block_size, block_size, h),
                                                    data["lm_head"], data["labels"], data["mask"], objective="dpace")
            return loss
        return jax.value_and_grad(loss_fn)(params)
    return jax.jit(step)


def run(path: str, cfg, model, data, steps: int) -> dict:
    graphdef, params = nnx.split(model, nnx.Param)
    step = make_step(graphdef, cfg.block_size)
    ctx = mock.patch.object(draft_mod, "block_sparse_attention", dense_attention) if path == "dense" else None
    t0 = time.perf_counter()
    if ctx:
        with ctx:
            compiled = step.lower(params, data).compile()
    else:
        compiled = step.lower(params, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = getattr(mem, "temp_size_in_bytes", float("nan")) if mem is not None else float("nan")
    loss, grads = compiled(params, data)
    jax.block_until_ready(grads)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss, grads = compiled(params, data)
        jax.block_until_ready(grads)
        times.append(time.perf_counter() - t0)
    return dict(path=path, compile_s=compile_s, step_s=statistics.median(times), temp_gib=temp / 2**30,
                loss=float(loss))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--paths", default="dense,sparse", help="comma list of dense,sparse")
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    dev = jax.devices()[0]
    print(f"device={dev.platform}:{getattr(dev, 'device_kind', '?')} n_devices={jax.device_count()} "
          f"cpu={platform.processor() or platform.machine()} jax={jax.__version__}")
    print("shape=" + " ".join(f"{k}={v}" for k, v in shape.items()))
    cfg, model, data = build(shape)
    results = {}
    for path in args.paths.split(","):
        r = run(path, cfg, model, data, args.steps)
        results[path] = r
        print(f"path={path} compile_s={r['compile_s']:.2f} step_s={r['step_s']:.4f} "
              f"xla_temp_gib={r['temp_gib']:.3f} loss={r['loss']:.6f}", flush=True)
    if {"dense", "sparse"} <= results.keys():
        print(f"loss_abs_diff={abs(results['dense']['loss'] - results['sparse']['loss']):.2e}")
        print(f"memory_ratio={results['dense']['temp_gib'] / max(results['sparse']['temp_gib'], 1e-9):.2f}")
        print(f"sparse_speedup={results['dense']['step_s'] / results['sparse']['step_s']:.2f}")


if __name__ == "__main__":
    main()
