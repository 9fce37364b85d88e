"""Issue 8: dflash_jax vs the PyTorch reference (nvidia-modelopt 0.47.0) train step on one GPU, side by side.

One process per (system, config); ``scripts/gpu_bench.sh`` runs them one after the other and then ``--report``:

    python scripts/gpu_bench.py --system jax --config qwen3-8b --out runs/gpu_bench/qwen3-8b.jax.json
    python scripts/gpu_bench.py --system reference --config qwen3-8b --out runs/gpu_bench/qwen3-8b.reference.json
    python scripts/gpu_bench.py --report runs/gpu_bench

Both systems run at identical shapes (``bench_train_step.SHAPES``: Qwen3-8B-like / Qwen3-1.7B-like target, seq 3072,
512 anchors, block 16, 5 draft layers with the target's dims, batch 1; ``tiny`` for the CPU dry run) with random
bf16 weights, KD on (the reference default), D-PACE (alpha 0.5), clip 1.0 + AdamW, injected identical anchors:

- ``jax``: :func:`bench_train_step.time_ours`: the compiled train step (bf16 target forward, draft bf16 compute with
  fp32 master weights, chunked-vocabulary loss, AdamW, donated state); device memory ``peak_bytes_in_use``.
- ``reference``: :func:`bench_train_step.time_reference`: ``HFDFlashModel`` (bf16 params, sdpa) forward + backward +
  ``clip_grad_norm_`` + fused torch AdamW (bf16 optimizer state); ``torch.cuda.max_memory_allocated``.

Each is timed after warm-up with device synchronisation (median of ``--steps``). D-PACE overhead vs the static
decay objective: reference = whole steps of both objectives, interleaved; jax = the step's loss program
(``block_loss_from_hidden`` forward + backward at the step's shapes, the only part that differs) of both objectives,
as a percentage of the step time. MFU uses the FLOP formula of ``bench_train_step`` (printed by ``--report``)
against the measured bf16 matmul ceiling (a jitted 8192^3 matmul in the jax process) and the nominal peak.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import platform
import resource
import sys

_SCRIPTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_SCRIPTS, os.path.dirname(_SCRIPTS)]  # the sibling bench scripts and this checkout's dflash_jax

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import bench_train_step as bts  # noqa: E402
from bench_loss import median_seconds  # noqa: E402
from dflash_jax import blocks, losses  # noqa: E402
from dflash_jax.models.attention import IMPLEMENTATIONS  # noqa: E402
from dflash_jax.models.target import make_target_model, resolve_dtype  # noqa: E402
from dflash_jax.train.cost import NOMINAL_PEAK_TFLOPS, measured_matmul_tflops  # noqa: E402

CONFIGS = ("qwen3-1.7b", "qwen3-8b")
DRY_RUN_CONFIGS = ("tiny",)
SYSTEMS = ("jax", "reference")
DTYPE = "bfloat16"
KD = True
# Issue 8 targets (same GPU, same run): draft tokens/s vs the reference, D-PACE overhead, peak memory.
SPEED_TARGET = {"qwen3-1.7b": 2.0, "qwen3-8b": 1.5}
DPACE_OVERHEAD_TARGET_PCT = 0.5
MEMORY_TARGET_RATIO = 0.8


def _check_config(config: str) -> dict:
    if config not in CONFIGS + DRY_RUN_CONFIGS:
        raise ValueError(f"config must be one of {CONFIGS + DRY_RUN_CONFIGS}, got {config!r}")
    return bts.SHAPES[config]


def flops(config: str) -> dict[str, float]:
    """FLOPs per step: ``model`` (block-sparse attention, KD teacher at the Q block rows: the useful work, used for
    both systems' MFU) and ``reference_executed`` (dense-mask attention over S+Q keys, teacher logits at all S)."""
    shape = _check_config(config)
    tc, dc = bts.make_configs(shape)
    args = (tc, dc, shape["batch"], shape["seq"], shape["anchors"], KD)
    return dict(
        model=bts.train_flops(*args), reference_executed=bts.train_flops(*args, dense_attention=True, full_teacher=True)
    )


def loss_overhead_jax(shape: dict, *, steps: int, warmup: int) -> dict[str, float]:
    """Median seconds of the step's loss program (``block_loss_from_hidden`` forward + backward w.r.t. the draft
    hidden, KD teacher, bf16 compute, the shape's ``chunk_blocks``) for ``dpace`` and ``decay`` at ``shape``,
    interleaved round-robin."""
    tc, dc = bts.make_configs(shape)
    b, n, bs, h, v = shape["batch"], shape["anchors"], shape["block"], shape["hidden"], shape["vocab"]
    batch = bts.make_batch(shape)
    labels, mask = blocks.block_targets(
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["loss_mask"]),
        jnp.asarray(batch["anchors"]),
        jnp.asarray(batch["keep"]),
        bs,
        jnp.asarray(batch["segment_ids"]),
    )
    k_h, k_t, k_w = jax.random.split(jax.random.key(0), 3)
    dtype = resolve_dtype(DTYPE)
    hidden = jax.random.normal(k_h, (b, n, bs, h), dtype)
    teacher = jax.random.normal(k_t, (b, n, bs, h), dtype) if KD else None
    lm_head = (jax.random.normal(k_w, (v, h), jnp.float32) * h**-0.5).astype(dtype)

    def fn_of(objective):
        gamma = bts.DECAY_GAMMA if objective == "decay" else 0.0
        grad = jax.jit(
            jax.value_and_grad(
                lambda x: losses.block_loss_from_hidden(
                    x,
                    lm_head,
                    labels,
                    mask,
                    spec=losses.LossSpec(objective=objective, gamma=gamma),
                    teacher_hidden=teacher,
                    chunk_blocks=shape["chunk_blocks"],
                    compute_dtype=dtype,
                ),
                has_aux=True,
            )
        )
        return lambda: jax.block_until_ready(grad(hidden))

    return median_seconds({obj: fn_of(obj) for obj in ("dpace", "decay")}, warmup, steps)


def run_jax(config: str, *, steps: int, warmup: int, remat: bool, attention: str = "auto") -> dict:
    """Time the dflash_jax train step at ``config`` with ``train.attention = attention`` (this process: jax only)."""
    shape = _check_config(config)
    tc, _ = bts.make_configs(shape)
    target = make_target_model(tc, seed=0, dtype=DTYPE)
    ours = bts.time_ours(
        shape, target, dtype=DTYPE, steps=steps, warmup=warmup, kd=KD, remat=remat, attention=attention
    )
    mem_kind, mem_gib = bts.peak_memory()  # before the loss-only programs below allocate anything
    del target
    loss_s = loss_overhead_jax(shape, steps=steps, warmup=warmup)
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    ceiling = measured_matmul_tflops(resolve_dtype(DTYPE), 1024 if on_cpu else 8192, iters=5 if on_cpu else 50)
    import flax
    import optax

    return dict(
        system="jax",
        config=config,
        step_s=ours["step_s"],
        times=ours["times"],
        compile_s=ours["compile_s"],
        loss=ours["loss"],
        remat=remat,
        attention=attention,
        peak_mem_gib=mem_gib,
        peak_mem_kind=mem_kind,
        loss_dpace_s=loss_s["dpace"],
        loss_decay_s=loss_s["decay"],
        dpace_overhead_pct=100 * (loss_s["dpace"] - loss_s["decay"]) / ours["step_s"],
        matmul_ceiling_tflops=ceiling,
        nominal_peak_tflops=next(
            (p for (k, d), p in NOMINAL_PEAK_TFLOPS.items() if k in dev.device_kind and d == DTYPE), None
        ),
        device=f"{dev.platform}:{dev.device_kind}",
        versions=dict(
            jax=jax.__version__, flax=flax.__version__, optax=optax.__version__, python=platform.python_version()
        ),
    )


def run_reference(config: str, *, steps: int, warmup: int) -> dict:
    """Time the reference's train step at ``config`` (this process: torch only)."""
    from importlib.metadata import version

    import torch
    import transformers

    shape = _check_config(config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, _, _ = bts.build_reference(shape, dtype=DTYPE, device=device)
    ref = bts.time_reference(model, shape, steps=steps, warmup=warmup, kd=KD, objectives=("dpace", "decay"))
    if device == "cuda":
        mem_kind, mem_gib = "device", torch.cuda.max_memory_allocated() / 2**30
        name = torch.cuda.get_device_name()
    else:
        mem_kind, mem_gib = "host_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        name = platform.machine()
    step_s = ref["dpace"]["step_s"]
    return dict(
        system="reference",
        config=config,
        step_s=step_s,
        times=ref["dpace"]["times"],
        loss=ref["loss"],
        decay_step_s=ref["decay"]["step_s"],
        peak_mem_gib=mem_gib,
        peak_mem_kind=mem_kind,
        dpace_overhead_pct=100 * (step_s - ref["decay"]["step_s"]) / step_s,
        device=f"{device}:{name}",
        versions=dict(
            torch=torch.__version__,
            transformers=transformers.__version__,
            modelopt=version("nvidia-modelopt"),
            python=platform.python_version(),
        ),
    )


def run(
    system: str,
    config: str,
    out: str | None,
    *,
    steps: int = 10,
    warmup: int = 2,
    remat: bool = False,
    attention: str = "auto",
) -> dict:
    """Run one system at one config, print its line, and write the JSON record to ``out`` (if given)."""
    if system not in SYSTEMS:
        raise ValueError(f"system must be one of {SYSTEMS}, got {system!r}")
    if steps < 1 or warmup < 0:
        raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps} warmup={warmup}")
    rec = (
        run_jax(config, steps=steps, warmup=warmup, remat=remat, attention=attention)
        if system == "jax"
        else run_reference(config, steps=steps, warmup=warmup)
    )
    rec.update(
        steps=steps,
        warmup=warmup,
        shape=bts.SHAPES[config],
        dtype=DTYPE,
        kd=KD,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    print(
        f"{system} {config}: step_ms={1e3 * rec['step_s']:.2f} loss={rec['loss']:.4f} "
        f"peak_{rec['peak_mem_kind']}_gib={rec['peak_mem_gib']:.3f} "
        f"dpace_overhead_pct={rec['dpace_overhead_pct']:.2f}",
        flush=True,
    )
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out + ".tmp", "w") as f:
            json.dump(rec, f, indent=1)
        os.replace(out + ".tmp", out)
    return rec


def _fmt_mfu(f: float, step_s: float, peak: float | None) -> str:
    return "n/a" if not peak else f"{100 * f / step_s / 1e12 / peak:.1f}%"


def report(records: list[dict]) -> list[str]:
    """Lines of the side-by-side report from :func:`run` records (any order; several configs)."""
    lines = ["FLOPs per step (multiply-add = 2, Q = N*bs, T = #taps, K = keys per draft query):"]
    lines += ["  " + ln.strip() for ln in bts.__doc__.split("FLOPs per step")[1].splitlines()[1:7]]
    lines.append(
        "  model FLOPs (block-sparse K = S+bs, KD teacher at the Q rows) give both systems' MFU; "
        "reference_executed adds what the reference computes (K = S+Q, teacher logits at all S)"
    )
    by_config: dict[str, dict[str, dict]] = {}
    for r in records:  # a jax record with a non-default attention is reported beside the default one
        impl = r.get("attention", "auto")
        by_config.setdefault(r["config"], {})[r["system"] if impl == "auto" else f"{r['system']}[{impl}]"] = r
    order = [c for c in CONFIGS + DRY_RUN_CONFIGS if c in by_config]
    for config in order:
        recs, shape = by_config[config], bts.SHAPES[config]
        f = flops(config)
        tokens = shape["batch"] * shape["anchors"] * shape["block"]
        ceiling = recs.get("jax", {}).get("matmul_ceiling_tflops")
        nominal = recs.get("jax", {}).get("nominal_peak_tflops")
        lines.append(f"== {config}: " + " ".join(f"{k}={v}" for k, v in shape.items()) + f" dtype={DTYPE} kd={KD}")
        lines.append(
            f"flops_model={f['model'] / 1e12:.4g}T flops_reference_executed="
            f"{f['reference_executed'] / 1e12:.4g}T matmul_ceiling_tflops="
            + (f"{ceiling:.1f}" if ceiling else "n/a")
            + " nominal_peak_tflops="
            + (f"{nominal:.0f}" if nominal else "n/a")
        )
        for system in SYSTEMS + tuple(sorted(k for k in recs if k not in SYSTEMS)):
            r = recs.get(system)
            if r is None:
                lines.append(f"{system}: MISSING (the process failed or timed out)")
                continue
            v = r["versions"]
            extra = (
                f" executed_mfu_vs_ceiling={_fmt_mfu(f['reference_executed'], r['step_s'], ceiling)}"
                if system == "reference"
                else f" remat={r['remat']} attention={r.get('attention', 'auto')} compile_s={r['compile_s']:.1f}"
            )
            lines.append(
                f"{system}: device={r['device']} step_ms={1e3 * r['step_s']:.2f} (median of {r['steps']}, "
                f"{r['warmup']} warm-up) draft_tokens_per_s={tokens / r['step_s']:.1f} "
                f"model_tflops_per_s={f['model'] / r['step_s'] / 1e12:.2f} "
                f"mfu_vs_ceiling={_fmt_mfu(f['model'], r['step_s'], ceiling)} "
                f"mfu_vs_nominal={_fmt_mfu(f['model'], r['step_s'], nominal)}{extra} "
                f"peak_{r['peak_mem_kind']}_gib={r['peak_mem_gib']:.2f} "
                f"dpace_overhead_pct={r['dpace_overhead_pct']:.2f} loss={r['loss']:.4f} "
                + " ".join(f"{k}={x}" for k, x in v.items())
            )
        if "jax" in recs and "reference" in recs:
            ratio = recs["reference"]["step_s"] / recs["jax"]["step_s"]
            mem = recs["jax"]["peak_mem_gib"] / recs["reference"]["peak_mem_gib"]
            speed_target = SPEED_TARGET.get(config)
            verdict = (
                "n/a (dry run)"
                if speed_target is None
                else (f"target >= {speed_target}x: {'met' if ratio >= speed_target else 'NOT met'}")
            )
            lines.append(
                f"memory_ratio_jax_fp32_master_vs_reference_bf16={mem:.3f} (target <= {MEMORY_TARGET_RATIO} "
                f"at the same bf16 policy; the jax step keeps fp32 master weights + fp32 Adam state)"
            )
            lines.append(
                f"dpace_overhead_target_pct<={DPACE_OVERHEAD_TARGET_PCT}: jax "
                f"{'met' if recs['jax']['dpace_overhead_pct'] <= DPACE_OVERHEAD_TARGET_PCT else 'NOT met'}"
            )
            lines.append(f"speed: {verdict}")
            lines.append(f"ratio_vs_reference={ratio:.3f}")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--system", choices=SYSTEMS)
    p.add_argument("--config", choices=CONFIGS + DRY_RUN_CONFIGS)
    p.add_argument("--out", help="JSON record to write (with --system)")
    p.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the compile step")
    p.add_argument("--remat", action="store_true", help="jax: rematerialise each draft layer (activation memory)")
    p.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS, help="jax: train.attention")
    p.add_argument("--report", metavar="DIR", help="print the side-by-side report of DIR/*.json")
    args = p.parse_args(argv)
    if args.report:
        files = sorted(glob.glob(os.path.join(args.report, "*.json")))
        if not files:
            p.error(f"--report: no *.json records in {args.report!r}")
        records = []
        for path in files:
            with open(path) as fh:
                records.append(json.load(fh))
        print("\n".join(report(records)))
        return
    if not (args.system and args.config):
        p.error("give --system and --config (or --report DIR)")
    run(
        args.system,
        args.config,
        args.out,
        steps=args.steps,
        warmup=args.warmup,
        remat=args.remat,
        attention=args.attention,
    )


if __name__ == "__main__":
    main()
