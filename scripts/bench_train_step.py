"""Throughput of the full compiled train step (online target forward + draft fwd/bwd + chunked D-PACE loss + AdamW).

    python scripts/bench_train_step.py                         # CPU shape (default), float32
    python scripts/bench_train_step.py --compare-reference     # + the reference (modelopt 0.47.0, torch) same shapes
    python scripts/bench_train_step.py --shape qwen3-8b --dtype bfloat16 --kd   # one performance-issue shape
    python scripts/bench_train_step.py --attention dense,auto  # implementations side by side (round-robin timing)

Prints steps/s, draft tokens/s (B*N*bs per second), MFU and peak memory; with ``--compare-reference`` it then times
the reference's training forward/backward + clip + torch AdamW step (HFDFlashModel, same shapes, same target and
draft weights, same injected anchors; fp32 on CPU) and prints ``ratio_vs_reference=<ref_time/our_time>`` last.
The timed steps (:func:`time_ours`, :func:`time_reference`) are also the ones ``scripts/gpu_bench.py`` runs.

FLOPs per step: :func:`dflash_jax.train.cost.train_flops` (the formula is in that module's docstring and
docs/benchmarks.md).
MFU = F / time / peak (nominal bf16 peak for H100/H200, else a measured matmul; see bench_target.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench_loss import median_seconds, speedup_lines
from bench_target import NOMINAL_PEAK_TFLOPS, measured_matmul_tflops
from dflash_jax import blocks, sharding
from dflash_jax.config import LossSection
from dflash_jax.models import layers
from dflash_jax.models.attention import IMPLEMENTATIONS
from dflash_jax.models.attention import resolve as resolve_attention
from dflash_jax.models.draft import DFlashDraft, DraftConfig
from dflash_jax.models.target import TargetConfig, make_target_model, resolve_dtype
from dflash_jax.train import optim
from dflash_jax.train import step as st
from dflash_jax.train.cost import train_flops

SHAPES = {
    # CPU: a small Qwen3-like target (6 layers) and 2-layer draft; seconds per step on 2 cores.
    "cpu": dict(
        batch=2,
        seq=256,
        block=8,
        anchors=16,
        vocab=4096,
        hidden=256,
        heads=4,
        kv_heads=2,
        head_dim=64,
        intermediate=768,
        target_layers=6,
        draft_layers=2,
        chunk_blocks=4,
    ),
    # The CPU shape with a longer sequence, more blocks and a 32k vocabulary (the loss's share grows with N*bs*V).
    "cpu-large": dict(
        batch=2,
        seq=1024,
        block=8,
        anchors=64,
        vocab=32768,
        hidden=256,
        heads=4,
        kv_heads=2,
        head_dim=64,
        intermediate=768,
        target_layers=6,
        draft_layers=2,
        chunk_blocks=8,
    ),
    # CI-sized smoke shape of scripts/gpu_bench.py --dry-run (same code path as the GPU shapes, milliseconds).
    "tiny": dict(
        batch=1,
        seq=128,
        block=8,
        anchors=8,
        vocab=1024,
        hidden=64,
        heads=4,
        kv_heads=2,
        head_dim=16,
        intermediate=128,
        target_layers=4,
        draft_layers=2,
        chunk_blocks=4,
    ),
    # Performance issue (GPU): Qwen3-8B-like / Qwen3-1.7B-like targets, 5-layer draft with the target's dims.
    "qwen3-8b": dict(
        batch=1,
        seq=3072,
        block=16,
        anchors=512,
        vocab=151936,
        hidden=4096,
        heads=32,
        kv_heads=8,
        head_dim=128,
        intermediate=12288,
        target_layers=36,
        draft_layers=5,
        chunk_blocks=128,
    ),
    "qwen3-1.7b": dict(
        batch=1,
        seq=3072,
        block=16,
        anchors=512,
        vocab=151936,
        hidden=2048,
        heads=16,
        kv_heads=8,
        head_dim=128,
        intermediate=6144,
        target_layers=28,
        draft_layers=5,
        chunk_blocks=128,
    ),
}
DECAY_GAMMA = 7.0  # the decay objective's gamma in overhead comparisons (paper/ModelOpt advice for bs 16)


def make_configs(shape: dict) -> tuple[TargetConfig, DraftConfig]:
    tc = TargetConfig(
        arch="qwen3",
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_layers=shape["target_layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        rope_theta=1e4,
        qk_norm=True,
    )
    ids = tuple(blocks.build_target_layer_ids(shape["target_layers"], shape["draft_layers"]))
    dc = DraftConfig(
        hidden_size=shape["hidden"],
        num_layers=shape["draft_layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        head_dim=shape["head_dim"],
        intermediate_size=shape["intermediate"],
        vocab_size=shape["vocab"],
        num_target_layers=shape["target_layers"],
        target_layer_ids=ids,
        block_size=shape["block"],
        mask_token_id=0,
        rope_theta=1e4,
    )
    return tc, dc


def make_batch(shape: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tokens, full loss mask, and injected anchors (so the reference can get the very same ones)."""
    b, s, n, bs = shape["batch"], shape["seq"], shape["anchors"], shape["block"]
    rng = np.random.default_rng(seed)
    anchors = np.sort(np.stack([rng.choice(s - bs + 1, n, replace=False) for _ in range(b)]), axis=1)
    return dict(
        input_ids=rng.integers(1, shape["vocab"], (b, s)).astype(np.int32),
        loss_mask=np.ones((b, s), np.float32),
        segment_ids=np.ones((b, s), np.int32),
        positions=np.tile(np.arange(s, dtype=np.int32), (b, 1)),
        anchors=anchors.astype(np.int32),
        keep=np.ones((b, n), bool),
    )


def peak_memory() -> tuple[str, float]:
    """``("device", GiB)`` from the first JAX device's allocator stats, else ``("host_rss", GiB)``."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return "device", stats["peak_bytes_in_use"] / 2**30
    return "host_rss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _timed(fn, steps: int, warmup: int, sync) -> list[float]:
    """``warmup`` untimed calls, then ``steps`` wall times of ``fn()`` each ended by ``sync(result)``."""
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return times


def time_ours(shape: dict, target_model, *, steps: int = 10, warmup: int = 1, **kw) -> dict:
    """Compile and time the dflash_jax train step (``jax.block_until_ready`` on the whole output) at ``shape``
    (``kw``: :func:`build_ours`). Returns ``compile_s`` (first call), ``step_s`` (median), ``times``, ``loss``
    (first step) and ``flops``."""
    one, rec = build_ours(shape, target_model, **kw)
    times = _timed(one, steps, warmup, jax.block_until_ready)
    return dict(rec, step_s=statistics.median(times), times=times)


def build_ours(
    shape: dict,
    target_model,
    *,
    dtype: str = "float32",
    mesh: str = "1,1,1",
    kd: bool = False,
    chunk_blocks: int | None = None,
    objective: str = "dpace",
    remat: bool = False,
    draft_params=None,
    attention: str = "auto",
):
    """The compiled dflash_jax train step at ``shape`` as ``(one, record)``: ``one()`` runs a step; ``record`` has
    ``compile_s`` (first call), ``loss`` (first step) and ``flops``. ``dtype``: draft compute dtype (fp32 master
    params); ``draft_params``: an ``nnx.State`` to start from; ``attention``: ``train.attention`` of both models;
    ``chunk_blocks``: blocks per fused loss chunk (default: the shape's ``chunk_blocks``, measured per shape,
    docs/benchmarks.md).
    """
    tc, dc = make_configs(shape)
    mesh_shape = tuple(int(x) for x in mesh.split(","))
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[: int(np.prod(mesh_shape))])
    with layers.unsharded_init():
        draft = DFlashDraft(dc, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=resolve_dtype(dtype), remat=remat)
    if draft_params is not None:
        nnx.update(draft, draft_params)
    tx, sched = optim.make_optimizer(lr=6e-4, steps=1000, schedule="constant", clip_norm=1.0)
    _, state, shardings = st.init_train_state(draft, tx, mesh)
    cfg = st.StepConfig(
        num_anchors=shape["anchors"],
        loss=LossSection(
            objective=objective,
            gamma=DECAY_GAMMA if objective == "decay" else 0.0,
            per_token="kd" if kd else "ce",
            chunk_blocks=shape["chunk_blocks"] if chunk_blocks is None else chunk_blocks,
        ),
        attention=attention,
    )
    step = st.TrainStep(
        draft=draft, state_shardings=shardings, target=target_model, tx=tx, schedule=sched, cfg=cfg, mesh=mesh
    )
    batch = step.place_batch(make_batch(shape))
    key = jax.random.key(0)
    box = {"state": state}

    def one():
        box["state"], m = step(box["state"], batch, key)
        return box["state"], m

    t0 = time.perf_counter()
    _, m = jax.block_until_ready(one())
    compile_s, loss = time.perf_counter() - t0, float(m["loss"])
    return one, dict(
        compile_s=compile_s, loss=loss, flops=train_flops(tc, dc, shape["batch"], shape["seq"], shape["anchors"], kd)
    )


def build_reference(shape: dict, *, dtype: str = "float32", device: str = "cpu", workdir: str | None = None):
    """HFDFlashModel (modelopt 0.47.0) on a random Qwen3 target of ``shape`` built directly on ``device`` in
    ``dtype`` (sdpa attention, draft dims explicit, train mode). With ``workdir`` (float32 only) the target is also
    saved there and loaded as our target, and the reference draft's weights converted to our layout, so both sides
    train the same weights. Returns ``(model, our_target_or_None, our_draft_params_or_None)``."""
    import modelopt.torch.speculative as mtsp
    import torch
    import transformers

    from dflash_jax.export import from_torch_tensors
    from dflash_jax.models.target_io import load_target

    tc, dc = make_configs(shape)
    torch.manual_seed(0)
    hf_cfg = transformers.Qwen3Config(
        hidden_size=tc.hidden_size,
        intermediate_size=tc.intermediate_size,
        num_hidden_layers=tc.num_layers,
        num_attention_heads=tc.num_attention_heads,
        num_key_value_heads=tc.num_key_value_heads,
        head_dim=tc.head_dim,
        vocab_size=tc.vocab_size,
        max_position_embeddings=max(4096, shape["seq"]),
        rope_theta=tc.rope_theta,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            hf_cfg, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
    arch = dict(
        num_hidden_layers=dc.num_layers,
        num_attention_heads=dc.num_attention_heads,
        num_key_value_heads=dc.num_key_value_heads,
        head_dim=dc.head_dim,
        intermediate_size=dc.intermediate_size,
        rope_theta=dc.rope_theta,
    )
    mtsp.convert(
        model,
        [
            (
                "dflash",
                {
                    "dflash_block_size": dc.block_size,
                    "dflash_use_torch_compile": False,
                    "dflash_mask_token_id": 0,
                    "dflash_architecture_config": arch,
                    "dflash_num_anchors": shape["anchors"],
                },
            )
        ],
    )
    model.train()
    if workdir is None:
        return model, None, None
    if dtype != "float32":
        raise ValueError(f"build_reference: shared weights (workdir) need dtype float32, got {dtype!r}")
    model.save_pretrained(workdir)
    ours_target = load_target(workdir, dtype="float32").model
    tensors = {
        k: v.detach().float().cpu().numpy()
        for k, v in model.dflash_module.state_dict().items()
        if "rotary_emb" not in k
    }
    return model, ours_target, from_torch_tensors(dc, tensors)


def time_reference(
    model, shape: dict, *, steps: int = 10, warmup: int = 1, kd: bool = False, objectives: tuple[str, ...] = ("dpace",)
) -> dict:
    """Time the reference's training step: forward (frozen target + draft + loss) + ``backward`` +
    ``clip_grad_norm_(1.0)`` + torch AdamW (fused), the injected anchors of :func:`make_batch`, device-synchronised.

    Steps of the ``objectives`` interleave round-robin (load drift hits all alike). Returns per objective
    ``{objective: {"step_s": median, "times": [...]}}`` plus ``loss`` (first step of the first objective).
    """
    import torch

    device = next(model.parameters()).device
    batch = make_batch(shape)
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    anchors = torch.as_tensor(batch["anchors"], dtype=torch.long, device=device)
    keep = torch.as_tensor(batch["keep"], device=device)
    model._sample_anchor_positions = lambda seq_len, loss_mask, dev: (anchors, keep)
    model.dflash_self_logit_distillation = kd
    params = [p for p in model.dflash_module.parameters()]
    opt = torch.optim.AdamW(params, lr=6e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def one(objective):
        model.dflash_loss_objective = objective
        model.dflash_loss_decay_factor = DECAY_GAMMA if objective == "decay" else 0.0
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.detach()

    loss = float(one(objectives[0]))
    for _ in range(warmup):
        for obj in objectives:
            one(obj)
    sync()
    times: dict = {obj: [] for obj in objectives}
    for _ in range(steps):
        for obj in objectives:
            t0 = time.perf_counter()
            one(obj)
            sync()
            times[obj].append(time.perf_counter() - t0)
    return dict(loss=loss, **{obj: dict(step_s=statistics.median(ts), times=ts) for obj, ts in times.items()})


def nominal_or_measured_peak(dtype: str) -> tuple[float, str]:
    """The device's nominal dense TFLOP/s for ``dtype`` if known, else a measured matmul's."""
    dev = jax.devices()[0]
    peak = next((v for (k, d), v in NOMINAL_PEAK_TFLOPS.items() if k in dev.device_kind and d == dtype), None)
    if peak is not None:
        return peak, "nominal"
    return measured_matmul_tflops(resolve_dtype(dtype), 2048 if dev.platform == "cpu" else 8192), "measured matmul"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--dtype", default="float32", help="draft compute dtype (target params/compute too)")
    p.add_argument("--mesh", default="1,1,1", help="data,fsdp,tensor (product = number of devices)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--chunk-blocks", type=int, default=None, help="blocks per loss chunk (default: the shape's)")
    p.add_argument("--kd", action="store_true", help="KD objective (teacher logits from the target)")
    p.add_argument("--compare-reference", action="store_true")
    p.add_argument(
        "--attention",
        default="auto",
        help="comma list of train.attention values timed one after the other (e.g. dense,auto)",
    )
    args = p.parse_args(argv)
    impls = args.attention.split(",")
    bad = [a for a in impls if a not in IMPLEMENTATIONS]
    if bad:
        p.error(f"--attention: {bad} not in {IMPLEMENTATIONS}")
    if args.compare_reference and args.dtype != "float32":
        p.error("--compare-reference compares float32 on both sides (same weights); see scripts/gpu_bench.py")
    shape = SHAPES[args.shape]
    tc, dc = make_configs(shape)
    dev = jax.devices()[0]
    print(
        f"device={dev.platform}:{dev.device_kind} n_devices={jax.device_count()} cpu={platform.machine()} "
        f"x{os.cpu_count()} jax={jax.__version__} python={platform.python_version()}"
    )
    print(
        "shape=" + " ".join(f"{k}={v}" for k, v in shape.items()) + f" dtype={args.dtype} mesh={args.mesh}"
        f" kd={args.kd} auto_attention={resolve_attention('auto', keys=shape['seq'])}"
    )

    ref_model, draft_params = None, None
    with tempfile.TemporaryDirectory() as workdir:
        if args.compare_reference:
            ref_model, target_model, draft_params = build_reference(shape, workdir=workdir)
        else:
            target_model = make_target_model(tc, seed=0, dtype=args.dtype)
        built = {
            impl: build_ours(
                shape,
                target_model,
                dtype=args.dtype,
                mesh=args.mesh,
                kd=args.kd,
                chunk_blocks=args.chunk_blocks,
                draft_params=draft_params,
                attention=impl,
            )
            for impl in impls
        }
        medians = median_seconds(
            {impl: lambda one=one: jax.block_until_ready(one()) for impl, (one, _) in built.items()},
            warmup=0,
            repeats=args.steps,
        )  # round-robin
        runs = {impl: dict(rec, step_s=medians[impl]) for impl, (_, rec) in built.items()}
    tokens = shape["batch"] * shape["anchors"] * shape["block"]
    for impl, r in runs.items():
        print(
            f"ours[attention={impl}]: compile+first_s={r['compile_s']:.2f} step_s={r['step_s']:.4f} "
            f"steps_per_s={1 / r['step_s']:.3f} draft_tokens_per_s={tokens / r['step_s']:.1f} loss={r['loss']:.6f}"
        )
    print("\n".join(speedup_lines(medians)))
    ours = runs[impls[-1]]
    step_s, flops = ours["step_s"], ours["flops"]
    peak, peak_src = nominal_or_measured_peak(args.dtype)
    mem_kind, mem_gib = peak_memory()
    print(
        f"flops_per_step={flops / 1e12:.4f}T achieved_tflops={flops / step_s / 1e12:.3f} "
        f"mfu={100 * flops / step_s / 1e12 / peak:.1f}% of {peak:.2f} TFLOP/s ({peak_src}) "
        f"peak_{mem_kind}_gib={mem_gib:.3f}"
    )
    if ref_model is not None:
        import torch

        ref = time_reference(ref_model, shape, steps=args.steps, kd=args.kd)
        ref_s = ref["dpace"]["step_s"]
        print(
            f"reference: step_s={ref_s:.4f} steps_per_s={1 / ref_s:.3f} draft_tokens_per_s={tokens / ref_s:.1f} "
            f"loss={ref['loss']:.6f} (torch {torch.__version__}, threads {torch.get_num_threads()})"
        )
        print(f"loss_abs_diff={abs(ref['loss'] - ours['loss']):.2e}")
        print(f"ratio_vs_reference={ref_s / step_s:.3f}")


if __name__ == "__main__":
    main()
