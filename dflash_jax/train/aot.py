"""Ahead-of-time compilation of the whole train step at a config's real shapes, without weights
(``dflash-jax compile``).

Everything is abstract: the target (``nnx.eval_shape`` of its config: ``target.random``, the ``config.json`` of an
HF directory, or ``--target-config``), the drafter, the optimizer state, the batch and the key become
``jax.ShapeDtypeStruct``s carrying the ``NamedSharding``s of the one rules table on the configured mesh (simulated
CPU devices are fine). Then either

- ``cpu``: ``jit(step).lower(...).compile()`` and the compiled program's per-device ``memory_analysis()``
  (argument / output / temp / generated-code bytes) and ``cost_analysis()`` FLOPs, with the compile time; or
- ``tpu`` / ``cuda``: ``jax.export.export(jit(step), platforms=[...])`` lowers the step for that platform on this
  machine, which proves the program holds no CPU-only operation (no accelerator needed).

CPU temp bytes are not accelerator temp bytes (other fusion and scheduling); argument bytes (parameters, optimizer
state, batch) are exact.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dflash_jax import config as config_lib
from dflash_jax import sharding
from dflash_jax.models import hf_io, layers
from dflash_jax.models.draft import DFlashDraft
from dflash_jax.models.target import TargetConfig, TargetModel, resolve_dtype
from dflash_jax.models.target_io import Target
from dflash_jax.train import optim
from dflash_jax.train import run as run_lib
from dflash_jax.train import step as step_lib

PLATFORMS = ("cpu", "tpu", "cuda")


def target_config(config: config_lib.Config, config_json: str | None = None) -> TargetConfig:
    """The target's dimensions: ``config_json`` (an HF ``config.json`` or its directory) if given, else
    ``target.random`` (``target.path: random``) or ``target.path``'s ``config.json``."""
    path = config_json
    if path is None:
        if config.target.path == run_lib.RANDOM:
            return hf_io.random_target_config(config.target.random)
        path = config.target.path
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise ValueError(
            f"compile: no target config.json at {path!r}; pass --target-config (an HF config.json) "
            "or use target.path: random"
        )
    return hf_io.config_from_hf(hf_io.read_config(os.path.dirname(path) or "."))


def _with_sharding(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_step(config: config_lib.Config, tcfg: TargetConfig, mesh: jax.sharding.Mesh) -> tuple[Any, tuple]:
    """``(jitted_step, abstract_args)`` of ``config`` on ``mesh`` with target dimensions ``tcfg``; nothing is
    allocated. The drafter's mask token is ``draft.mask_token_id`` (or the last vocabulary id: shapes only)."""
    dt = resolve_dtype(config.target.dtype)
    with layers.unsharded_init():
        target = nnx.eval_shape(lambda: TargetModel(tcfg, rngs=nnx.Rngs(0), param_dtype=dt, dtype=dt))
    mask_id = config.draft.mask_token_id
    draft_cfg = run_lib.build_draft_config(
        config.draft, Target(tcfg, target), tcfg.vocab_size - 1 if mask_id is None else mask_id
    )
    tc = config.train
    with layers.unsharded_init():
        draft = nnx.eval_shape(
            lambda: DFlashDraft(
                draft_cfg,
                rngs=nnx.Rngs(0),
                param_dtype=jnp.float32,
                dtype=getattr(jnp, tc.compute_dtype),
                remat=tc.remat,
            )
        )
    tx, schedule = optim.optimizer_from_config(tc)
    _, params = step_lib.split_draft(draft)
    state_sh = step_lib.train_state_shardings(tx, params, mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    state = step_lib.TrainState(
        step=scalar, params=params, opt_state=jax.eval_shape(tx.init, params), skipped_updates=scalar
    )
    target_graphdef, target_state = nnx.split(target, nnx.Param)
    target_sh = sharding.state_shardings(target_state, mesh)
    sharding.check_replication(
        {"target": target_state, "draft": params},
        {"target": target_sh, "draft": state_sh.params},
        mesh,
        config.mesh.replicated_tolerance,
    )
    step_cfg = step_lib.StepConfig.from_config(config)
    jitted = step_lib.jit_train_step(
        draft, target_graphdef, state_sh, target_sh, tx=tx, schedule=schedule, cfg=step_cfg, mesh=mesh
    )
    b, s = config.data.batch_size, config.data.seq_len
    batch = {
        "input_ids": (jnp.int32, (b, s)),
        "loss_mask": (jnp.float32, (b, s)),
        "segment_ids": (jnp.int32, (b, s)),
        "positions": (jnp.int32, (b, s)),
    }
    if tc.mode == "offline":
        batch["target_hidden"] = (jnp.float32, (b, s, draft_cfg.num_features * tcfg.hidden_size))
        if config.loss.kd:
            batch["teacher_hidden"] = (jnp.float32, (b, s, tcfg.hidden_size))
    batch = {
        k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))
        for k, (dtype, shape) in batch.items()
    }
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
    args = (_with_sharding(state, state_sh), _with_sharding(target_state, target_sh), batch, key)
    return jitted, args


def compile_report(
    config: config_lib.Config, *, platform: str = "cpu", config_json: str | None = None
) -> dict[str, Any]:
    """Compile (cpu) or lower for ``platform`` (tpu / cuda) the step of ``config`` on its mesh over
    ``jax.devices()``; returns a JSON-able report (module docstring)."""
    if platform not in PLATFORMS:
        raise ValueError(f"--platform must be one of {PLATFORMS}, got {platform!r}")
    tcfg = target_config(config, config_json)
    config_lib.validate_runtime(config, jax.device_count(), num_target_layers=tcfg.num_layers)
    mesh = sharding.make_mesh(config.mesh.shape)
    jitted, args = abstract_step(config, tcfg, mesh)
    report: dict[str, Any] = {
        "platform": platform,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "target": {
            "num_layers": tcfg.num_layers,
            "hidden_size": tcfg.hidden_size,
            "vocab_size": tcfg.vocab_size,
            "dtype": config.target.dtype,
        },
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "grad_accum": config.train.grad_accum,
        "mode": config.train.mode,
    }
    t0 = time.perf_counter()
    if platform == "cpu":
        with jax.set_mesh(mesh):  # as TrainStep runs it (activation constraints, per-shard kernels)
            lowered = jitted.lower(*args)
        t1 = time.perf_counter()
        compiled = lowered.compile()
        t2 = time.perf_counter()
        mem = compiled.memory_analysis()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        report.update(
            lower_s=round(t1 - t0, 2),
            compile_s=round(t2 - t1, 2),
            per_device_bytes={
                "argument": int(mem.argument_size_in_bytes),
                "output": int(mem.output_size_in_bytes),
                "temp": int(mem.temp_size_in_bytes),
                "generated_code": int(mem.generated_code_size_in_bytes),
                "alias": int(mem.alias_size_in_bytes),
            },
            flops_per_device=float(cost.get("flops", float("nan"))),
        )
    else:
        with jax.set_mesh(mesh):
            exported = jax.export.export(jitted, platforms=[platform])(*args)
        report.update(
            lowered=True,
            export_s=round(time.perf_counter() - t0, 2),
            module_bytes=len(exported.mlir_module_serialized),
            nr_devices=exported.nr_devices,
        )
    return report
