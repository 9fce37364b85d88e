"""Benchmark: DFlash draft forward+backward with the D-PACE loss, per training-attention implementation.

Paths: ``reference`` = the reference's formulation (every query attends over ``[context S ; all N*bs block keys]``
with a ``[B, N*bs, S+N*bs]`` mask built from the same visibility rule); ``dense`` / ``chunked`` / ``pallas`` /
``auto`` = :func:`dflash_jax.models.attention.block_sparse_attention` with that ``train.attention`` value.

    python scripts/bench_draft.py                               # CPU-sized shape, reference,dense,chunked,auto
    python scripts/bench_draft.py --shape large                 # S=3072, N=512, bs=16, H=4096, 5 layers (GPU)
    python scripts/bench_draft.py --memory                      # compile only, Qwen3-8B recipe shape, no weights

Timing mode compiles every path, times them round-robin, and prints one line per path (compile time, median step
time, XLA temp memory of the compiled step) and ``<path>_speedup_vs_dense=<x>``. ``--memory`` compiles (abstract
shapes, nothing allocated) the draft forward + backward and, separately, one attention call's forward + backward
(the attention's share), and prints their ``compiled.memory_analysis()`` temp bytes per implementation with the
ratio to ``dense``.
"""

from __future__ import annotations

import argparse
import platform
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dflash_jax
from bench_loss import median_seconds, speedup_lines
from dflash_jax import blocks, losses
from dflash_jax.models import attention, layers

SHAPES = {
    # CPU-sized, same N*bs/S ratio (2.67) as the large shape; well under 2 minutes on 2 cores.
    "small": dict(
        batch=1,
        seq=768,
        anchors=128,
        block=16,
        hidden=256,
        heads=4,
        kv_heads=2,
        head_dim=64,
        intermediate=768,
        layers=2,
        vocab=2048,
        dtype="float32",
    ),
    # The large shape (Qwen3-8B recipe: Qwen3-8B-like draft, S=3072, 512 anchors x 16), GPU only.
    "large": dict(
        batch=1,
        seq=3072,
        anchors=512,
        block=16,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=12288,
        layers=5,
        vocab=151936,
        dtype="bfloat16",
    ),
}


def reference_attention(q, k_blk, v_blk, k_ctx, v_ctx, mask: attention.BlockMask):
    """The reference formulation: one softmax over ``[ctx ; all blocks]`` with the dense ``[B, Q, S+Q]`` mask."""
    b, n = mask.keep.shape
    bs = q.shape[1] // n
    diag = jnp.eye(n, dtype=bool)[None, :, None, :, None] & mask.block(bs)[:, :, :, None, :]  # [B, N, bs, N, bs]
    full = jnp.concatenate([mask.ctx.visible(), diag.reshape(b, n * bs, n * bs)], axis=-1)
    return attention.masked_attention(q, jnp.concatenate([k_ctx, k_blk], 1), jnp.concatenate([v_ctx, v_blk], 1), full)


def draft_config(shape: dict) -> dflash_jax.DraftConfig:
    return dflash_jax.DraftConfig(
        hidden_size=shape["hidden"],
        num_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        intermediate_size=shape["intermediate"],
        vocab_size=shape["vocab"],
        num_target_layers=max(8, shape["layers"] + 3),
        target_layer_ids=tuple(blocks.build_target_layer_ids(max(8, shape["layers"] + 3), shape["layers"])),
        block_size=shape["block"],
        mask_token_id=0,
        rope_theta=1e6,
    )


def build(shape: dict, seed: int = 0):
    cfg = draft_config(shape)
    dtype = jnp.dtype(shape["dtype"])
    with layers.unsharded_init():
        model = dflash_jax.DFlashDraft(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
    b, s, n, bs, h = shape["batch"], shape["seq"], shape["anchors"], shape["block"], shape["hidden"]
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, shape["vocab"], (b, s)), jnp.int32)
    anchors = jnp.asarray(np.sort(rng.choice(s - bs, (b, n), replace=False), axis=1), jnp.int32)
    keep = jnp.ones((b, n), bool).at[:, -n // 8 :].set(False)  # some padded blocks, as in real batches
    labels, mask = blocks.block_targets(ids, jnp.ones((b, s), jnp.float32), anchors, keep, bs)
    k = jax.random.split(jax.random.key(seed), 3)
    data = dict(
        noise=jax.random.normal(k[0], (b, n * bs, h), dtype),
        target_hidden=jax.random.normal(k[1], (b, s, cfg.num_features * h), dtype),
        lm_head=(0.02 * jax.random.normal(k[2], (shape["vocab"], h))).astype(dtype),
        anchors=anchors,
        keep=keep,
        labels=labels,
        mask=mask,
    )
    return cfg, model, data


def make_step(graphdef, block_size, impl):
    def step(params, data):
        def loss_fn(p):
            hidden = nnx.merge(graphdef, p)(
                data["noise"], data["target_hidden"], data["anchors"], data["keep"], attention_impl=impl
            )
            b, q, h = hidden.shape
            loss, _ = losses.block_loss_from_hidden(
                hidden.reshape(b, q // block_size, block_size, h),
                data["lm_head"],
                data["labels"],
                data["mask"],
                objective="dpace",
            )
            return loss

        return jax.value_and_grad(loss_fn)(params)

    return jax.jit(step)


def compile_step(path: str, cfg, graphdef, params, data):
    """The compiled draft forward+backward for ``path`` (``params``/``data`` may be ``ShapeDtypeStruct``s)."""
    step = make_step(graphdef, cfg.block_size, "dense" if path == "reference" else path)
    if path == "reference":
        with mock.patch.object(attention, "block_sparse_attention", reference_attention):
            return step.lower(params, data).compile()
    return step.lower(params, data).compile()


def temp_bytes(compiled) -> float:
    mem = compiled.memory_analysis()
    return float(getattr(mem, "temp_size_in_bytes", float("nan"))) if mem is not None else float("nan")


def run(paths: list[str], cfg, model, data, steps: int) -> dict[str, dict]:
    """Compile every path, then time them round-robin (``steps`` rounds; the median per path), so that load changes
    on a shared machine hit every path alike."""
    graphdef, params = nnx.split(model, nnx.Param)
    out, calls = {}, {}
    for path in paths:
        t0 = time.perf_counter()
        compiled = compile_step(path, cfg, graphdef, params, data)
        loss, grads = compiled(params, data)
        jax.block_until_ready(grads)
        out[path] = dict(
            path=path, compile_s=time.perf_counter() - t0, loss=float(loss), temp_gib=temp_bytes(compiled) / 2**30
        )
        calls[path] = lambda compiled=compiled: jax.block_until_ready(compiled(params, data))
    for path, step_s in median_seconds(calls, warmup=0, repeats=steps).items():
        out[path]["step_s"] = step_s
    return out


def attention_temp_bytes(shape: dict, impl: str) -> float:
    """Temp bytes of one draft attention call's forward + backward (w.r.t. q, k, v) at ``shape``, abstract."""
    b, s, n, bs = shape["batch"], shape["seq"], shape["anchors"], shape["block"]
    nh, kvh, hd, dt = shape["heads"], shape["kv_heads"], shape["head_dim"], jnp.dtype(shape["dtype"])
    sd = jax.ShapeDtypeStruct
    args = (
        sd((b, n * bs, nh, hd), dt),
        sd((b, n * bs, kvh, hd), dt),
        sd((b, n * bs, kvh, hd), dt),
        sd((b, s, kvh, hd), dt),
        sd((b, s, kvh, hd), dt),
        sd((b, n), jnp.int32),
        sd((b, s), jnp.int32),
    )

    def loss(q, kb, vb, kc, vc, anchors, seg):
        from dflash_jax.models.draft import training_masks

        mask = training_masks(anchors, jnp.ones(anchors.shape, bool), seg, bs, None, False, impl)
        return jnp.sum(attention.block_sparse_attention(q, kb, vb, kc, vc, mask).astype(jnp.float32))

    return temp_bytes(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(*args).compile())


def memory_table(shape: dict, impls: list[str]) -> None:
    """Print the compiled temp bytes (GiB) of the draft step and of one attention call per implementation."""
    cfg = draft_config(shape)
    dtype = jnp.dtype(shape["dtype"])
    with layers.unsharded_init():
        abstract = nnx.eval_shape(lambda: dflash_jax.DFlashDraft(cfg, rngs=nnx.Rngs(0), dtype=dtype))
    graphdef, params = nnx.split(abstract, nnx.Param)
    b, s, n, bs, h = shape["batch"], shape["seq"], shape["anchors"], shape["block"], shape["hidden"]
    sd = jax.ShapeDtypeStruct
    data = dict(
        noise=sd((b, n * bs, h), dtype),
        target_hidden=sd((b, s, cfg.num_features * h), dtype),
        lm_head=sd((shape["vocab"], h), dtype),
        anchors=sd((b, n), jnp.int32),
        keep=sd((b, n), bool),
        labels=sd((b, n, bs), jnp.int32),
        mask=sd((b, n, bs), jnp.float32),
    )
    rows = {}
    for impl in impls:
        t0 = time.perf_counter()
        rows[impl] = (temp_bytes(compile_step(impl, cfg, graphdef, params, data)), attention_temp_bytes(shape, impl))
        print(
            f"impl={impl} draft_step_temp_gib={rows[impl][0] / 2**30:.3f} "
            f"attention_fwd_bwd_temp_gib={rows[impl][1] / 2**30:.3f} compile_s={time.perf_counter() - t0:.1f}",
            flush=True,
        )
    if "dense" in rows:
        for impl, (step_b, attn_b) in rows.items():
            if impl != "dense":
                print(
                    f"{impl}: draft_step_temp_ratio_dense_over={rows['dense'][0] / step_b:.2f} "
                    f"attention_temp_ratio_dense_over={rows['dense'][1] / attn_b:.2f}"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None, help="default: small (timing), large (--memory)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--paths",
        default=None,
        help="comma list of reference,dense,chunked,pallas,auto (default: reference,dense,chunked,auto; "
        "--memory: dense,chunked)",
    )
    ap.add_argument("--memory", action="store_true", help="compile only and print the temp-memory table")
    args = ap.parse_args()
    shape = SHAPES[args.shape or ("large" if args.memory else "small")]
    paths = (args.paths or ("dense,chunked" if args.memory else "reference,dense,chunked,auto")).split(",")
    dev = jax.devices()[0]
    print(
        f"device={dev.platform}:{getattr(dev, 'device_kind', '?')} n_devices={jax.device_count()} "
        f"cpu={platform.processor() or platform.machine()} jax={jax.__version__} "
        f"auto={attention.resolve('auto', keys=shape['seq'])} chunk={attention.CHUNK}"
    )
    print("shape=" + " ".join(f"{k}={v}" for k, v in shape.items()))
    if args.memory:
        memory_table(shape, paths)
        return
    cfg, model, data = build(shape)
    results = run(paths, cfg, model, data, args.steps)
    for path, r in results.items():
        print(
            f"path={path} compile_s={r['compile_s']:.2f} step_s={r['step_s']:.4f} "
            f"(median of {args.steps}, round-robin) xla_temp_gib={r['temp_gib']:.3f} loss={r['loss']:.6f}"
        )
    print("\n".join(speedup_lines({path: r["step_s"] for path, r in results.items()})))


if __name__ == "__main__":
    main()
