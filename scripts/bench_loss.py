"""Benchmark: dflash_jax block losses (forward + backward) vs the PyTorch reference ``_compute_loss`` on CPU.

Times, per shape ``B x N x bs x V`` (median over ``--repeats`` after ``--warmup`` calls, all variants of a shape
interleaved round-robin so that load from other processes affects them alike):

- ``jax block_loss``: ``jax.value_and_grad`` of :func:`dflash_jax.block_loss` w.r.t. the logits (jitted), CE mode,
  objectives ``dpace`` and ``decay`` (gamma 4);
- ``torch _compute_loss``: nvidia-modelopt 0.47.0 ``HFDFlashModel._compute_loss`` (unbound) + ``backward()`` on the
  same logits and anchors (skipped if torch/modelopt are absent);
- ``jax from_hidden``: :func:`dflash_jax.block_loss_from_hidden` with ``[V, --hidden]`` lm_head (includes the
  vocabulary projection and its backward, so it is not directly comparable to the two rows above).

Prints a table, then ``dpace_overhead_pct=`` (jax D-PACE vs decay time at the first shape) and, last,
``ratio_vs_reference=`` (torch time / jax time for D-PACE at the first shape).
Usage: ``python scripts/bench_loss.py [--shapes 1x512x16x32768,2x64x8x4096] [--repeats 5] [--big-repeats 2]``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from dflash_jax import LossSpec, block_loss, block_loss_from_hidden, block_targets

BIG_ELEMENTS = 2**26  # shapes with more logits than this use --big-repeats


def median_seconds(fns: dict, warmup: int, repeats: int) -> dict:
    """Median wall time of each zero-argument callable; calls interleave round-robin so load drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def speedup_lines(step_s: dict, baseline: str = "dense") -> list[str]:
    """``<name>_speedup_vs_<baseline>=<x>`` for every other entry of ``step_s`` (none without the baseline)."""
    if baseline not in step_s:
        return []
    return [
        f"{name}_speedup_vs_{baseline}={step_s[baseline] / t:.2f}" for name, t in step_s.items() if name != baseline
    ]


def make_case(b: int, n: int, bs: int, v: int, seed: int = 0):
    """Random logits ``[B,N,bs,V]`` and a batch of ``S = N*bs`` tokens with N sorted distinct anchors per row."""
    rng = np.random.default_rng(seed)
    s = n * bs
    input_ids = rng.integers(0, v, (b, s))
    loss_mask = (rng.random((b, s)) < 0.9).astype(np.float32)
    anchors = np.sort(np.stack([rng.choice(s - bs + 1, n, replace=False) for _ in range(b)]), axis=1)
    keep = np.ones((b, n), bool)
    logits = rng.standard_normal((b, n, bs, v), dtype=np.float32)
    return input_ids, loss_mask, anchors, keep, logits


def jax_step(case, objective: str):
    input_ids, loss_mask, anchors, keep, logits = case
    bs = logits.shape[2]
    labels, mask = block_targets(
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(loss_mask),
        jnp.asarray(anchors, jnp.int32),
        jnp.asarray(keep),
        bs,
    )
    step = jax.jit(
        jax.value_and_grad(
            lambda x: block_loss(x, labels, mask, spec=LossSpec(objective=objective, gamma=4.0)), has_aux=True
        )
    )
    x = jnp.asarray(logits)
    return lambda: jax.block_until_ready(step(x))


def jax_hidden_step(case, objective: str, hidden_size: int, chunk_blocks: int):
    input_ids, loss_mask, anchors, keep, logits = case
    b, n, bs, v = logits.shape
    labels, mask = block_targets(
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(loss_mask),
        jnp.asarray(anchors, jnp.int32),
        jnp.asarray(keep),
        bs,
    )
    key_h, key_w = jax.random.split(jax.random.key(0))
    hidden = jax.random.normal(key_h, (b, n, bs, hidden_size))
    lm_head = jax.random.normal(key_w, (v, hidden_size)) * hidden_size**-0.5
    step = jax.jit(
        jax.value_and_grad(
            lambda h: block_loss_from_hidden(
                h, lm_head, labels, mask, spec=LossSpec(objective=objective, gamma=4.0), chunk_blocks=chunk_blocks
            ),
            has_aux=True,
        )
    )
    return lambda: jax.block_until_ready(step(hidden))


def torch_step(case, objective: str):
    import torch
    from modelopt.torch.speculative.plugins.hf_dflash import HFDFlashModel

    input_ids, loss_mask, anchors, keep, logits = case
    b, n, bs, v = logits.shape
    self = SimpleNamespace(
        dflash_block_size=bs, dflash_loss_objective=objective, dflash_dpace_alpha=0.5, dflash_loss_decay_factor=4.0
    )
    x = torch.from_numpy(logits.reshape(b, n * bs, v)).requires_grad_(True)
    args = (torch.from_numpy(input_ids), torch.from_numpy(anchors), torch.from_numpy(keep), torch.from_numpy(loss_mask))

    def run():
        x.grad = None
        loss, _ = HFDFlashModel._compute_loss(self, x, *args)
        loss.backward()

    return run


def have_reference() -> bool:
    try:
        import modelopt.torch.speculative.plugins.hf_dflash  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="1x512x16x32768,2x64x8x4096", help="comma-separated BxNxBSxV")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--big-repeats", type=int, default=2, help="repeats for shapes with > 2^26 logits")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--hidden", type=int, default=128, help="H of the block_loss_from_hidden rows")
    parser.add_argument("--chunk-blocks", type=int, default=64)
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()

    reference = not args.skip_reference and have_reference()
    if reference:
        import modelopt
        import torch

        ref_versions = (
            f", torch {torch.__version__} ({torch.get_num_threads()} threads), modelopt {modelopt.__version__}"
        )
    else:
        ref_versions = ", reference: not available"
    print(
        f"# {time.strftime('%Y-%m-%d %H:%M')}  {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"jax {jax.__version__} ({jax.devices()[0].platform}){ref_versions}"
    )
    print(f"{'shape BxNxbsxV':>20} {'implementation':>26} {'objective':>9} {'median ms':>10}")
    results: dict[tuple[str, str, str], float] = {}
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    for shape in shapes:
        case = make_case(*shape)
        repeats = args.big_repeats if np.prod(shape) > BIG_ELEMENTS else args.repeats
        name = "x".join(map(str, shape))
        steps = {}
        for objective in ("dpace", "decay"):
            steps[("jax block_loss", objective)] = jax_step(case, objective)
            if reference:
                steps[("torch _compute_loss", objective)] = torch_step(case, objective)
        steps[(f"jax from_hidden H={args.hidden}", "dpace")] = jax_hidden_step(
            case, "dpace", args.hidden, args.chunk_blocks
        )
        for (impl, objective), seconds in median_seconds(steps, args.warmup, repeats).items():
            results[(name, impl, objective)] = seconds
            print(f"{name:>20} {impl:>26} {objective:>9} {seconds * 1e3:10.1f}", flush=True)
        del case, steps

    first = "x".join(map(str, shapes[0]))
    jax_dpace, jax_decay = results[(first, "jax block_loss", "dpace")], results[(first, "jax block_loss", "decay")]
    print(f"dpace_overhead_pct={100.0 * (jax_dpace / jax_decay - 1.0):.2f}")
    if reference:
        print(f"ratio_vs_reference={results[(first, 'torch _compute_loss', 'dpace')] / jax_dpace:.3f}")
    else:
        print("ratio_vs_reference=nan  # torch / nvidia-modelopt not installed")


if __name__ == "__main__":
    main()
