"""Optimizer: optax AdamW + global-norm clipping + warmup then cosine / linear / constant learning rate.

Reference recipe (HF Trainer, modelopt DFlash): AdamW betas (0.9, 0.999), eps 1e-8, lr 6e-4, weight decay 0,
``max_grad_norm`` 1.0, linear decay after 100 warmup steps. optax's ``adamw`` is torch's AdamW (decoupled decay
``p -= lr * (adam_update + wd * p)``, bias-corrected moments, eps added outside the square root). Warmup starts at
lr 0 on the first step, as in HF's ``get_linear_schedule_with_warmup``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

SCHEDULES = ("cosine", "linear", "constant")


def warmup_steps_for(steps: int, warmup_steps: int | None = None, warmup_ratio: float | None = None) -> int:
    """``warmup_steps`` if given, else ``ceil(warmup_ratio * steps)``, else 0."""
    if warmup_steps is not None:
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        return int(warmup_steps)
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
        return int(math.ceil(warmup_ratio * steps))
    return 0


def make_schedule(
    *,
    lr: float,
    steps: int,
    schedule: str = "linear",
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
) -> optax.Schedule:
    """Linear warmup 0 -> ``lr`` over the warmup steps, then cosine / linear decay to 0 at ``steps``, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    warm = min(warmup_steps_for(steps, warmup_steps, warmup_ratio), steps)
    decay_steps = max(steps - warm, 1)
    if schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay_steps)
    elif schedule == "linear":
        after = optax.linear_schedule(lr, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(lr)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(
    *,
    lr: float,
    steps: int,
    schedule: str = "linear",
    warmup_steps: int | None = None,
    warmup_ratio: float | None = None,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``clip_by_global_norm(clip_norm)`` (skipped when None/0) then AdamW on the schedule; returns (tx, schedule)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    sched = make_schedule(lr=lr, steps=steps, schedule=schedule, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio)
    parts = []
    if clip_norm:
        if clip_norm < 0:
            raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
        parts.append(optax.clip_by_global_norm(clip_norm))
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts), sched


def optimizer_from_config(train_cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """:func:`make_optimizer` from a config object with the ``train`` section's fields."""
    return make_optimizer(
        lr=train_cfg.lr,
        steps=train_cfg.steps,
        schedule=train_cfg.schedule,
        warmup_steps=getattr(train_cfg, "warmup_steps", None),
        warmup_ratio=getattr(train_cfg, "warmup_ratio", None),
        weight_decay=train_cfg.weight_decay,
        clip_norm=train_cfg.clip_norm,
        b1=train_cfg.b1,
        b2=train_cfg.b2,
        eps=train_cfg.eps,
    )


def opt_state_shardings(tx: optax.GradientTransformation, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
    """Shardings of ``tx.init(params)``: per-parameter moments follow ``param_shardings``; counters replicated."""
    abstract = jax.eval_shape(tx.init, params)
    return optax.tree_map_params(
        tx, lambda _, s: s, abstract, param_shardings, transform_non_params=lambda _: NamedSharding(mesh, P())
    )


def as_float32(tree: Any) -> Any:
    """``tree`` with every leaf cast to float32 (the optimizer's working precision; a no-op on fp32 leaves)."""
    return jax.tree.map(lambda x: x.astype(jnp.float32), tree)


def init_opt_state(tx: optax.GradientTransformation, params: Any, shardings: Any) -> Any:
    """``tx.init(params)`` in float32 (Adam moments stay fp32 whatever the parameters' dtype), compiled with
    explicit output ``shardings`` (from :func:`opt_state_shardings`)."""
    return jax.jit(lambda p: tx.init(as_float32(p)), out_shardings=shardings)(params)
