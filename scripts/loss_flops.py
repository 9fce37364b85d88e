"""FLOPs of the compiled train step by XLA's ``cost_analysis()``, from abstract shapes (no weights, nothing run).

    python scripts/loss_flops.py                                # CPU bench shape and the Qwen3-8B recipe shape
    python scripts/loss_flops.py --shapes qwen3-8b --mode online

For each shape and per-token mode (CE, KD) it compiles ``dflash_jax.train.step.train_step`` (bf16 draft compute,
fp32 master params, AdamW) on ``jax.ShapeDtypeStruct`` inputs and prints the step's FLOPs and, in units of one
vocabulary matmul ``2 * B * N * bs * H * V``, how many the step performs. The vocabulary loss runs as ONE chunk
(``chunk_blocks = num_anchors``): XLA's cost analysis counts a loop body once whatever its trip count, so a chunked
loop would hide all but one chunk (the chunk size does not change the FLOPs). Run it on two checkouts (e.g. with
``PYTHONPATH`` at an older commit) to compare loss implementations: the difference divided by the matmul unit is the
number of vocabulary matmuls saved.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
from flax import nnx

import bench_train_step as bts
from dflash_jax.config import LossSection
from dflash_jax.models import layers
from dflash_jax.models.draft import DFlashDraft
from dflash_jax.models.target import make_target_model
from dflash_jax.train import optim
from dflash_jax.train import step as st


def step_flops(shape: dict, *, kd: bool, mode: str = "offline", dtype: str = "bfloat16") -> float:
    """``cost_analysis()["flops"]`` of the compiled train step at ``shape`` (abstract inputs, one loss chunk)."""
    tc, dc = bts.make_configs(shape)
    compute = jnp.dtype(dtype)
    with layers.unsharded_init():
        draft = nnx.eval_shape(lambda: DFlashDraft(dc, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=compute))
        target = nnx.eval_shape(lambda: make_target_model(tc, dtype=dtype))
    graphdef, params = nnx.split(draft, nnx.Param)
    target_graphdef, target_state = nnx.split(target, nnx.Param)
    tx, sched = optim.make_optimizer(lr=6e-4, steps=1000, schedule="constant", clip_norm=1.0)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = st.TrainState(step=scalar, params=params, opt_state=jax.eval_shape(tx.init, params), skipped_updates=scalar)
    b, s, n = shape["batch"], shape["seq"], shape["anchors"]
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in bts.make_batch(dict(shape, batch=1)).items()}
    batch = {k: jax.ShapeDtypeStruct((b,) + v.shape[1:], v.dtype) for k, v in batch.items()}
    if mode == "offline":
        batch["target_hidden"] = jax.ShapeDtypeStruct((b, s, len(dc.target_layer_ids) * tc.hidden_size), compute)
        if kd:
            batch["teacher_hidden"] = jax.ShapeDtypeStruct((b, s, tc.hidden_size), compute)
    cfg = st.StepConfig(num_anchors=n, mode=mode, loss=LossSection(per_token="kd" if kd else "ce", chunk_blocks=n))
    fn = functools.partial(
        st.train_step,
        draft_graphdef=graphdef,
        target_graphdef=target_graphdef,
        tx=tx,
        schedule=sched,
        cfg=cfg,
        compute_dtype=compute,
    )
    key = jax.eval_shape(lambda: jax.random.key(0))
    return float(jax.jit(fn).lower(state, target_state, batch, key).compile().cost_analysis()["flops"])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="cpu,qwen3-8b", help=f"comma-separated, of {sorted(bts.SHAPES)}")
    p.add_argument(
        "--mode",
        choices=st.MODES,
        default="offline",
        help="offline: target features in the batch (the target forward, identical in both loss "
        "implementations, is left out of the count)",
    )
    args = p.parse_args(argv)
    print(f"jax={jax.__version__} backend={jax.default_backend()} mode={args.mode}")
    for name in args.shapes.split(","):
        shape = bts.SHAPES[name]
        unit = 2 * shape["batch"] * shape["anchors"] * shape["block"] * shape["hidden"] * shape["vocab"]
        for kd in (False, True):
            flops = step_flops(shape, kd=kd, mode=args.mode)
            print(
                f"shape={name} kd={kd} step_tflop={flops / 1e12:.4f} vocab_matmul_tflop={unit / 1e12:.4f} "
                f"step_in_vocab_matmuls={flops / unit:.3f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
