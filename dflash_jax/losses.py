"""Block losses for DFlash drafters: D-PACE and static-decay position weighting (arXiv:2605.18810).

Everything here is a pure function (no hidden state; jit/vmap/grad-safe). The pieces compose as

    token_terms  -> per-token loss ``l`` (hard CE or soft CE vs a teacher), hard CE vs the data token, correctness
    position_weights -> ``W [B,N,bs]``: ``mask * [1, w_1..w_{bs-1}]`` (D-PACE) or ``mask * decay`` (static)
    partial_sums -> per-slot sums ``[bs]`` of ``W*l``, ``W``, correct tokens and mask
    reduce_partials -> the reference's batch-global reduction, plus metrics

:func:`block_loss` chains them over full logits; :func:`block_loss_from_hidden` runs the same chain over chunks of
blocks (logits never materialised at once) and sums the partials before the same reduction.

**Normalisation** (reference ``HFDFlashModel._compute_loss``, nvidia-modelopt 0.47.0): one batch-global weighted
mean, ``loss = sum(W * l) / (sum(W) + 1e-6)`` over every batch row, block and slot, and ``loss = 0`` (zero, finite
gradients) when ``sum(W) + 1e-6 <= 1``. It is neither a per-sample mean nor a mean over token count: with D-PACE the
denominator is the sum of the dynamic weights, which is up to ``bs - 1`` times larger per token than the mask count,
so implementations that divide by the token count (or by the number of blocks) differ by an order of magnitude.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ("dpace", "decay")
_EPS = 1e-6  # the reference's "+ 1e-6" in both the loss normaliser and the accuracy denominator


# ---------------------------------------------------------------------------------------------------------
# Input validation (eager: shapes, dtypes, Python scalars; values only when concrete)
# ---------------------------------------------------------------------------------------------------------


def _chex(name: str, check: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """Run a chex assertion and re-raise its failure as a ``ValueError`` naming ``name``."""
    try:
        check(*args, **kwargs)
    except AssertionError as err:
        raise ValueError(f"{name}: {err}") from None


def _concrete(x: Any) -> np.ndarray | None:
    """``x`` as a numpy array, or ``None`` when it is traced (its values are unknown until run time)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_alpha(alpha: Any) -> None:
    """Raise ``ValueError`` unless ``0 < alpha <= 1`` (checked whenever ``alpha`` is concrete)."""
    a = _concrete(alpha)
    if a is not None:
        if a.ndim != 0 or not (0.0 < float(a) <= 1.0):
            raise ValueError(f"alpha must be a scalar in (0, 1], got {alpha!r}")


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


def _check_block_inputs(logits_or_hidden: jax.Array, name: str, labels: jax.Array, mask: jax.Array) -> None:
    """Shared checks: ``labels`` int ``[B,N,bs]``, ``mask`` float ``[B,N,bs]`` with slot 0 zero, ``bs >= 1``."""
    _chex(name, chex.assert_rank, logits_or_hidden, 4)
    _chex(name, chex.assert_type, logits_or_hidden, float)
    lead = logits_or_hidden.shape[:3]
    if lead[2] < 1:
        raise ValueError(f"{name}: block size (axis 2) must be >= 1, got shape {logits_or_hidden.shape}")
    _chex("labels", chex.assert_type, labels, int)
    _chex("labels", chex.assert_shape, labels, lead)
    _chex("mask", chex.assert_shape, mask, lead)
    _chex("mask", chex.assert_type, mask, float)
    values = _concrete(mask)
    if values is not None and np.any(values[..., 0] != 0):
        raise ValueError("mask: slot 0 (the given anchor token) must be 0 in every block")


def _check_label_range(labels: jax.Array, vocab: int) -> None:
    lab = _concrete(labels)
    if lab is not None:
        if lab.size and (lab.min() < 0 or lab.max() >= vocab):
            raise ValueError(f"labels must lie in [0, {vocab}), got range [{lab.min()}, {lab.max()}]")


# ---------------------------------------------------------------------------------------------------------
# Position weights
# ---------------------------------------------------------------------------------------------------------


def dpace_weights(confidences: jax.Array, alpha: float, valid_mask: jax.Array | None = None) -> jax.Array:
    """D-PACE weights ``w [..., L]`` from confidences ``q [..., L]`` (any leading dims), detached.

    Eq. 7 ``q~_i = alpha + (1 - alpha) q_i`` in float32 (invalid slots: ``q~ = 1``, a multiplicative no-op);
    Eq. 8 ``C_j = (prod_{i<=j} q~_i) * valid_j`` and ``w_j = sum_{l>=j} C_l`` (suffix sum, as total - inclusive
    prefix + C_j like the reference); Eq. 9 stop-gradient.
    ``valid_mask`` (same shape, nonzero = valid) defaults to all valid. Returned in ``confidences.dtype``.
    Raises ``ValueError`` (message names ``alpha``) unless ``0 < alpha <= 1``.
    """
    check_alpha(alpha)
    _chex("confidences", chex.assert_type, confidences, float)
    if confidences.ndim < 1:
        raise ValueError(f"confidences must have at least 1 dimension, got shape {confidences.shape}")
    if valid_mask is not None:
        _chex("valid_mask", chex.assert_shape, valid_mask, confidences.shape)
    return _dpace_weights(confidences, alpha, valid_mask)


@jax.jit
def _dpace_weights(confidences, alpha, valid_mask):
    """Jitted body of :func:`dpace_weights`."""
    smoothed = alpha + (1.0 - alpha) * confidences.astype(jnp.float32)
    if valid_mask is not None:
        keep = valid_mask != 0
        smoothed = jnp.where(keep, smoothed, 1.0)
    cum_conf = jnp.cumprod(smoothed, axis=-1)
    if valid_mask is not None:
        cum_conf = cum_conf * keep.astype(jnp.float32)
    inclusive = jnp.cumsum(cum_conf, axis=-1)
    weights = inclusive[..., -1:] - inclusive + cum_conf  # suffix sum in the reference's evaluation order
    return jax.lax.stop_gradient(weights).astype(confidences.dtype)


def decay_weights(block_size: int, gamma: float) -> jax.Array:
    """Static decay ``exp(-max(k - 1, 0) / gamma)`` for ``k = 0..bs-1`` (float32 ``[bs]``); all ones if gamma <= 0."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    k = jnp.maximum(jnp.arange(block_size, dtype=jnp.float32) - 1.0, 0.0)
    positive = jnp.asarray(gamma, jnp.float32) > 0
    safe_gamma = jnp.where(positive, gamma, 1.0)
    return jnp.where(positive, jnp.exp(-k / safe_gamma), 1.0)


def position_weights(ce: jax.Array, mask: jax.Array, objective: str, alpha: float, gamma: float) -> jax.Array:
    """Loss weights ``W [..., bs]`` (float32) from the hard CE ``ce [..., bs]`` and mask ``[..., bs]``.

    ``"dpace"`` with ``bs > 1``: ``W = mask * [1, w_1..w_{bs-1}]`` with ``w = dpace_weights(exp(-ce[..., 1:]),
    alpha, mask[..., 1:])`` (docs/design.md §4.9); otherwise (``"decay"``, or ``bs == 1``)
    ``W = mask * decay(bs, gamma)`` (gamma is ignored by ``"dpace"``, as in the reference). Detached.
    """
    _check_objective(objective)
    mask = mask.astype(jnp.float32)
    bs = mask.shape[-1]
    if objective == "dpace" and bs > 1:
        conf = jnp.exp(-jax.lax.stop_gradient(ce[..., 1:]).astype(jnp.float32))
        w = dpace_weights(conf, alpha, valid_mask=mask[..., 1:])
        return mask * jnp.concatenate([jnp.ones_like(w[..., :1]), w], axis=-1)
    return mask * decay_weights(bs, gamma)


# ---------------------------------------------------------------------------------------------------------
# Per-token terms, partial sums and the reduction
# ---------------------------------------------------------------------------------------------------------


def token_terms(
    logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token ``(loss_tok, ce, correct)`` over the last (vocab) axis, all computed in float32.

    ``ce = logsumexp(x) - x[y]`` (evaluated on ``x - max(x)`` like torch's log_softmax: no cancellation) is the hard
    CE against ``labels``; ``loss_tok`` is ``ce`` (CE mode) or the soft CE ``-sum_v softmax(teacher)_v *
    log_softmax(x)_v`` (KD mode, teacher detached), sharing the same log-sum-exp.
    ``correct = argmax(x) == y`` (first maximum on ties). ``logits [..., V]``, ``labels [...]`` int.
    """
    x = logits.astype(jnp.float32)
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))  # lse - x_y without cancellation
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    x_label = jnp.take_along_axis(shifted, labels[..., None].astype(jnp.int32), axis=-1, mode="clip")[..., 0]
    ce = lse - x_label
    if teacher_logits is None:
        loss_tok = ce
    else:
        p_teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)
        loss_tok = jnp.sum(p_teacher * (lse[..., None] - shifted), axis=-1)
    correct = jnp.argmax(x, axis=-1) == labels
    return loss_tok, ce, correct


def partial_sums(loss_tok: jax.Array, correct: jax.Array, mask: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Per-slot sums over every axis but the last (``[..., bs]`` -> ``[bs]``, float32).

    Keys: ``weighted_loss`` (sum W*l), ``weight`` (sum W), ``correct`` (correct tokens with mask > 0.5) and
    ``count`` (sum mask). Partials of disjoint sets of blocks add up to the partials of their union.
    """
    axes = tuple(range(mask.ndim - 1))
    mask = mask.astype(jnp.float32)
    return {
        "weighted_loss": jnp.sum(weights * loss_tok, axis=axes),
        "weight": jnp.sum(weights, axis=axes),
        "correct": jnp.sum((correct & (mask > 0.5)).astype(jnp.float32), axis=axes),
        "count": jnp.sum(mask, axis=axes),
    }


def reduce_partials(partials: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reference reduction on per-slot partial sums ``[bs]``; returns ``(loss, metrics)``.

    ``den = sum(W) + 1e-6``; ``loss = sum(W*l) / den`` if ``den > 1`` else exactly 0 (gradient 0, finite).
    ``accuracy = sum(correct) / (sum(mask) + 1e-6)``, 0 on the ``den <= 1`` branch (as the reference).
    Metrics: ``accuracy``, ``position_accuracy [bs]``, ``weight_sum``, ``simulated_tau`` (``1 + sum_{k=1..bs-1}
    prod_{i=1..k} acc_i``), ``num_tokens`` (sum mask), ``position_weight_mean [bs]`` (mean W per slot over valid
    tokens).
    """
    weight_sum = jnp.sum(partials["weight"])
    den = weight_sum + _EPS
    active = den > 1.0
    loss = jnp.where(active, jnp.sum(partials["weighted_loss"]) / jnp.where(active, den, 1.0), 0.0)
    num_tokens = jnp.sum(partials["count"])
    accuracy = jnp.where(active, jnp.sum(partials["correct"]) / (num_tokens + _EPS), 0.0)
    per_slot_count = jnp.maximum(partials["count"], 1.0)
    position_accuracy = jax.lax.stop_gradient(partials["correct"] / per_slot_count)
    simulated_tau = 1.0 + jnp.sum(jnp.cumprod(position_accuracy[1:]))
    metrics = {
        "accuracy": accuracy,
        "position_accuracy": position_accuracy,
        "weight_sum": jax.lax.stop_gradient(weight_sum),
        "simulated_tau": simulated_tau,
        "num_tokens": num_tokens,
        "position_weight_mean": jax.lax.stop_gradient(partials["weight"] / per_slot_count),
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# Public losses
# ---------------------------------------------------------------------------------------------------------


def block_loss(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    objective: str = "dpace",
    alpha: float = 0.5,
    gamma: float = 0.0,
    teacher_logits: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DFlash block loss (reference ``_compute_loss``): ``(loss, metrics)`` from full draft logits.

    Shapes: ``logits [B,N,bs,V]`` (any float dtype; math in float32), ``labels [B,N,bs]`` int (slot ``k`` of block
    ``n`` is the data token at ``anchor_n + k``), ``mask [B,N,bs]`` float (slot 0 must be 0), optional
    ``teacher_logits [B,N,bs,V]`` (KD: soft CE against ``softmax(teacher)``; D-PACE confidences still come from the
    hard CE against ``labels``). ``objective`` ``"dpace"`` (alpha in (0, 1]) or ``"decay"`` (gamma; <= 0 = uniform).

    Normalisation: batch-global ``sum(W*l) / (sum(W) + 1e-6)``, zero loss when ``sum(W) + 1e-6 <= 1`` (see the
    module docstring). Metrics as in :func:`reduce_partials`.
    """
    _check_block_inputs(logits, "logits", labels, mask)
    _check_label_range(labels, logits.shape[-1])
    check_alpha(alpha)
    _check_objective(objective)
    if teacher_logits is not None:
        _chex("teacher_logits", chex.assert_shape, teacher_logits, logits.shape)
    return _block_loss(logits, labels, mask, teacher_logits, alpha, gamma, objective=objective)


@functools.partial(jax.jit, static_argnames=("objective",))
def _block_loss(logits, labels, mask, teacher_logits, alpha, gamma, *, objective):
    """Jitted body of :func:`block_loss` (one compile per shape when called eagerly; inlined under a caller's jit)."""
    return reduce_partials(_block_partials(logits, labels, _zero_slot0(mask), teacher_logits, objective, alpha, gamma))


def block_loss_from_hidden(hidden: jax.Array, lm_head: jax.Array, labels: jax.Array, mask: jax.Array,
                           **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`block_loss` of ``hidden @ lm_head.T`` computed chunk by chunk (same result):
    :func:`reduce_partials` of :func:`block_partials_from_hidden` (same arguments)."""
    return reduce_partials(block_partials_from_hidden(hidden, lm_head, labels, mask, **kwargs))


def numerator_scale(partials: Mapping[str, jax.Array]) -> jax.Array:
    """``d loss / d sum(weighted_loss)`` of :func:`reduce_partials` at ``partials``: a scalar, 0 on the zero-loss
    branch. The weights are detached, so the loss is ``sum(W*l)`` times this factor of the other partials and its
    gradient is this factor times the gradient of the numerator: gradient accumulation sums the numerators'
    gradients over micro-batches and scales once (taken by ``jax.grad`` of the reduction itself, so any reduction
    that divides the numerator by detached partials is served)."""
    partials = jax.lax.stop_gradient(dict(partials))
    wl = partials["weighted_loss"]
    per_slot = jax.grad(lambda x: reduce_partials({**partials, "weighted_loss": x})[0])(wl)
    return per_slot[0]  # the same for every slot: the loss depends on sum(W*l) only


def block_partials_from_hidden(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    objective: str = "dpace",
    alpha: float = 0.5,
    gamma: float = 0.0,
    teacher_hidden: jax.Array | None = None,
    chunk_blocks: int = 64,
    compute_dtype: Any = None,
) -> dict[str, jax.Array]:
    """The :func:`partial_sums` of :func:`block_loss`'s terms for ``hidden @ lm_head.T``, computed
    ``chunk_blocks`` blocks at a time (before :func:`reduce_partials`; sums of these over disjoint rows are the
    partials of the union).

    ``hidden [B,N,bs,H]`` (draft final hidden), ``lm_head [V,H]`` (not stopped here: freezing it is the caller's
    business), ``labels``/``mask [B,N,bs]``, optional ``teacher_hidden [B,N,bs,H]`` (teacher logits
    ``teacher_hidden @ lm_head.T``, detached). The blocks axis is padded to a multiple of ``chunk_blocks`` with
    mask 0 and mapped with ``jax.lax.map`` over a rematerialised (``jax.checkpoint``) chunk, so only one chunk's
    float32 ``[B,chunk,bs,V]`` logits live at a time, in the forward and the backward pass. D-PACE weights are per
    block, hence exact per chunk; the chunks' per-slot partial sums are summed.
    ``compute_dtype`` is the matmul input dtype (default: promoted dtype of ``hidden`` and ``lm_head``); the
    matmul accumulates and returns float32.
    """
    _check_block_inputs(hidden, "hidden", labels, mask)
    _chex("lm_head", chex.assert_rank, lm_head, 2)
    if lm_head.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head must be [V, H={hidden.shape[-1]}], got shape {lm_head.shape}")
    _check_label_range(labels, lm_head.shape[0])
    check_alpha(alpha)
    _check_objective(objective)
    if teacher_hidden is not None:
        _chex("teacher_hidden", chex.assert_shape, teacher_hidden, hidden.shape)
    if not isinstance(chunk_blocks, (int, np.integer)) or chunk_blocks < 1:
        raise ValueError(f"chunk_blocks must be a positive int, got {chunk_blocks!r}")
    return _block_partials_from_hidden(hidden, lm_head, labels, mask, teacher_hidden, alpha, gamma,
                                       objective=objective, chunk_blocks=int(chunk_blocks), compute_dtype=compute_dtype)


@functools.partial(jax.jit, static_argnames=("objective", "chunk_blocks", "compute_dtype"))
def _block_partials_from_hidden(hidden, lm_head, labels, mask, teacher_hidden, alpha, gamma, *, objective,
                                chunk_blocks, compute_dtype):
    """Jitted body of :func:`block_partials_from_hidden`."""
    dtype = compute_dtype or jnp.result_type(hidden.dtype, lm_head.dtype)
    w = lm_head.astype(dtype)

    def project(h: jax.Array) -> jax.Array:
        return jnp.einsum("bnkh,vh->bnkv", h.astype(dtype), w, preferred_element_type=jnp.float32)

    def chunk_partials(xs: tuple[jax.Array, ...]) -> dict[str, jax.Array]:
        h, y, m, *th = xs
        teacher = project(jax.lax.stop_gradient(th[0])) if th else None
        return _block_partials(project(h), y, m, teacher, objective, alpha, gamma)

    n = hidden.shape[1]
    c = max(1, min(chunk_blocks, n))
    pad = -n % c
    operands = (hidden, labels, _zero_slot0(mask)) + (() if teacher_hidden is None else (teacher_hidden,))

    def to_chunks(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(x.shape[0], (n + pad) // c, c, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    per_chunk = jax.lax.map(jax.checkpoint(chunk_partials), tuple(to_chunks(x) for x in operands))
    return jax.tree.map(lambda p: jnp.sum(p, axis=0), per_chunk)


def _zero_slot0(mask: jax.Array) -> jax.Array:
    """``mask * (k > 0)`` in float32: slot 0 never carries weight (traced masks cannot be value-checked)."""
    return mask.astype(jnp.float32) * (jnp.arange(mask.shape[-1]) > 0)


def _block_partials(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    teacher_logits: jax.Array | None,
    objective: str,
    alpha: float,
    gamma: float,
) -> dict[str, jax.Array]:
    """token_terms -> position_weights (fused: D-PACE reuses the same CE) -> partial_sums, for one set of blocks."""
    loss_tok, ce, correct = token_terms(logits, labels, teacher_logits)
    weights = position_weights(ce, mask, objective, alpha, gamma)
    return partial_sums(loss_tok, correct, mask, weights)
