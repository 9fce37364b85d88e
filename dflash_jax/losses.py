"""Block losses for DFlash drafters: D-PACE and its ablations, static decay, uniform (arXiv:2605.18810).

Everything here is a pure function (no hidden state; jit/vmap/grad-safe). A loss is composed of three pluggable
pieces and one reduction (docs/losses.md compares every variant with its source):

    per-token loss   ``l = per_token(logits [..., V], labels [...], teacher_logits [..., V] | None) -> [...]``:
                     ``ce`` (hard CE vs the data token), ``kd`` (soft CE vs the teacher), ``kl``, ``reverse_kl``,
                     ``js``, ``tv`` (vLLM speculators' divergences), or any function of that signature
    weighting        ``W = weighting(confidence [..., bs], mask [..., bs]) -> [..., bs]`` (detached, zero where
                     ``mask`` is): ``dpace``, ``dpace_cumulative``, ``dpace_continuation``, ``decay``, ``uniform``,
                     or any function of that signature; ``confidence = exp(-CE vs the data token)`` (``data``,
                     ModelOpt, SpecForge) or ``exp(-l)`` (``loss``, speculators)
    partials         unnormalised sums: ``weighted_loss`` (``sum W*l``, the only differentiable entry), per-slot
                     ``weight``/``correct``/``count`` ``[bs]``, ``accepted``/``blocks`` (leading runs), ``rows``
    reduce_partials  ``loss = sum(W*l) / den`` with ``den`` from the ``normalization``: ``modelopt`` (``sum W +
                     1e-6``, loss 0 when ``den <= 1``), ``batch`` (SpecForge: rows ``B``), ``tokens`` (speculators:
                     ``sum mask + 1e-5``)

**Gradient accumulation contract.** Partials of disjoint sets of blocks (chunks, micro-batches, hosts) add up to the
partials of their union, and ``den`` is a constant for the gradient (the weights are detached). So a caller that
splits a batch sums the micro-batches' partials and the gradients of their ``weighted_loss`` and divides once:
``den, active = normalizer(total, normalization)``; ``loss = total["weighted_loss"] / den`` and ``grads = sum_i
grad_i / den`` where ``active``, else 0 (the zero-loss rule, ``modelopt`` only). :func:`reduce_partials` does
exactly that for one batch, so every normalisation stays exact under accumulation.

**Fused linear cross-entropy.** :func:`block_loss_from_hidden` never materialises ``[B, N, bs, V]`` logits: a
``jax.custom_vjp`` scans chunks of blocks once, projecting each chunk with ``lm_head`` (teacher logits once per
chunk), and computes in the forward pass both the chunk's partials and the gradient of ``sum W*l`` w.r.t. the
chunk's hidden states (``W * dl/dlogits @ lm_head``) and, only when ``lm_head`` is differentiated, w.r.t.
``lm_head``. The backward pass only scales those by the cotangent (``1/den``, or 0 under the zero-loss rule). Per
step that is 2 vocabulary matmuls in CE mode and 3 with a teacher, against 3 and 5 for a rematerialised chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from typing import Any, Callable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from dflash_jax import config as config_lib

OBJECTIVES = typing.get_args(config_lib.Objective)
DPACE_OBJECTIVES = tuple(o for o in OBJECTIVES if o.startswith("dpace"))
PER_TOKEN_LOSSES = typing.get_args(config_lib.PerToken)
TEACHER_LOSSES = tuple(p for p in PER_TOKEN_LOSSES if p != "ce")  # need the teacher's logits
NORMALIZATIONS = typing.get_args(config_lib.Normalization)
CONFIDENCES = typing.get_args(config_lib.Confidence)
_EPS = 1e-6  # ModelOpt's "+ 1e-6" in both the loss normaliser and the accuracy denominator
_TOKENS_EPS = 1e-5  # speculators' _LOSS_REDUCTION_EPS

Weighting = Callable[[jax.Array, jax.Array], jax.Array]
PerTokenLoss = Callable[[jax.Array, jax.Array, "jax.Array | None"], jax.Array]


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


def check_alpha(alpha: Any, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``0 < alpha <= 1`` (``0 <= alpha`` with ``allow_zero``), when concrete."""
    a = _concrete(alpha)
    if a is not None:
        low_ok = a.ndim == 0 and (float(a) >= 0.0 if allow_zero else float(a) > 0.0)
        if not (low_ok and float(a) <= 1.0):
            raise ValueError(f"alpha must be a scalar in {'[0' if allow_zero else '(0'}, 1], got {alpha!r}")


def check_loss_options(objective: Any, per_token: Any, normalization: str, confidence: str, has_teacher: bool) -> None:
    """Names (or callables) of the loss pieces; ``ValueError`` naming the option. A built-in teacher loss needs a
    teacher, ``ce`` refuses one (it would be computed for nothing)."""
    if not callable(objective) and objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} or a weighting function, got {objective!r}")
    if not callable(per_token) and per_token not in PER_TOKEN_LOSSES:
        raise ValueError(f"per_token must be one of {PER_TOKEN_LOSSES} or a function, got {per_token!r}")
    if isinstance(per_token, str) and (per_token in TEACHER_LOSSES) != has_teacher:
        raise ValueError(
            f"per_token {per_token!r} "
            + ("needs teacher logits (KD)" if not has_teacher else "takes no teacher logits; use 'kd' or another")
        )
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if confidence not in CONFIDENCES:
        raise ValueError(f"confidence must be one of {CONFIDENCES}, got {confidence!r}")


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
# Weightings: (confidence [..., bs], mask [..., bs]) -> W [..., bs], detached, zero where mask is
# ---------------------------------------------------------------------------------------------------------


def _cumulative_confidence(confidences: jax.Array, alpha: Any, valid: jax.Array | None) -> tuple[jax.Array, ...]:
    """Eq. 7-8 pieces in float32: ``P_j = prod_{i<=j, valid} q~_i`` (``q~ = alpha + (1-alpha) q``, 1 where
    invalid) and ``C_j = P_j * valid_j``."""
    smoothed = alpha + (1.0 - alpha) * confidences.astype(jnp.float32)
    if valid is None:
        prefix = jnp.cumprod(smoothed, axis=-1)
        return prefix, prefix
    keep = valid != 0
    prefix = jnp.cumprod(jnp.where(keep, smoothed, 1.0), axis=-1)
    return prefix, prefix * keep.astype(jnp.float32)


def _suffix_sum(c: jax.Array) -> jax.Array:
    """``w_j = sum_{l>=j} c_l`` evaluated as ModelOpt does: total - inclusive prefix sum + ``c_j``."""
    inclusive = jnp.cumsum(c, axis=-1)
    return inclusive[..., -1:] - inclusive + c


def dpace_weights(confidences: jax.Array, alpha: float, valid_mask: jax.Array | None = None) -> jax.Array:
    """D-PACE weights ``w [..., L]`` from confidences ``q [..., L]`` (any leading dims), detached (ModelOpt's
    ``dflash_dpace_weights``).

    Eq. 7 ``q~_i = alpha + (1 - alpha) q_i`` in float32 (invalid slots: ``q~ = 1``, a multiplicative no-op);
    Eq. 8 ``C_j = (prod_{i<=j} q~_i) * valid_j`` and ``w_j = sum_{l>=j} C_l``; Eq. 9 stop-gradient.
    ``valid_mask`` (same shape, nonzero = valid) defaults to all valid. Returned in ``confidences.dtype``.
    Raises ``ValueError`` (message names ``alpha``) unless ``0 < alpha <= 1`` (ModelOpt's range).
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
    weights = _suffix_sum(_cumulative_confidence(confidences, alpha, valid_mask)[1])
    return jax.lax.stop_gradient(weights).astype(confidences.dtype)


def decay_weights(block_size: int, gamma: float) -> jax.Array:
    """Static decay ``exp(-max(k - 1, 0) / gamma)`` for ``k = 0..bs-1`` (float32 ``[bs]``); all ones if gamma <= 0."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    k = jnp.maximum(jnp.arange(block_size, dtype=jnp.float32) - 1.0, 0.0)
    positive = jnp.asarray(gamma, jnp.float32) > 0
    safe_gamma = jnp.where(positive, gamma, 1.0)
    return jnp.where(positive, jnp.exp(-k / safe_gamma), 1.0)


def dpace(alpha: float = 0.5) -> Weighting:
    """D-PACE (Eq. 7-9): ``W_j = mask_j * sum_{l>=j} C_l``, ``C_l = prod_{i<=l, valid} q~_i * valid_l``.
    ``alpha`` in [0, 1]; at 0 the products of raw confidences underflow to exactly 0 (weights 0, never NaN)."""
    check_alpha(alpha, allow_zero=True)

    def weighting(confidence: jax.Array, mask: jax.Array) -> jax.Array:
        return mask * _suffix_sum(_cumulative_confidence(confidence, alpha, mask)[1])

    return weighting


def dpace_cumulative(alpha: float = 0.5) -> Weighting:
    """Ablation "cumulative confidence only" (SpecForge ``dpace-cumulative-confidence-only``): ``W_j = mask_j *
    P_j``, the probability that slots ``1..j`` are all accepted, without the continuation value. ``alpha`` in
    [0, 1] (underflow to 0 at 0)."""
    check_alpha(alpha, allow_zero=True)

    def weighting(confidence: jax.Array, mask: jax.Array) -> jax.Array:
        return mask * _cumulative_confidence(confidence, alpha, mask)[0]

    return weighting


def dpace_continuation(alpha: float = 0.5) -> Weighting:
    """Ablation "continuation value only" (SpecForge ``dpace-continuation-value-only``): ``W_j = mask_j * w_j /
    max(P_j, tiny)`` = ``1 + sum_{l>j, valid} prod_{j<i<=l, valid} q~_i`` (expected accepted run from ``j`` on, given
    ``j`` accepted). ``alpha`` in [0, 1]; where ``P_j`` underflows to 0 (``alpha = 0`` with a zero confidence)
    SpecForge's formula gives 0, not the value above, and so does this one."""
    check_alpha(alpha, allow_zero=True)

    def weighting(confidence: jax.Array, mask: jax.Array) -> jax.Array:
        prefix, cum = _cumulative_confidence(confidence, alpha, mask)
        return mask * _suffix_sum(cum) / jnp.maximum(prefix, jnp.finfo(jnp.float32).tiny)

    return weighting


def decay(gamma: float) -> Weighting:
    """Static decay: ``W = mask * exp(-max(k - 1, 0) / gamma)``; ``gamma <= 0`` is uniform. Ignores confidence."""

    def weighting(confidence: jax.Array, mask: jax.Array) -> jax.Array:
        return mask * decay_weights(mask.shape[-1], gamma)

    return weighting


def uniform() -> Weighting:
    """``W = mask``: every trainable token weighs 1."""
    return lambda confidence, mask: mask


def make_weighting(objective: str | Weighting, alpha: float = 0.5, gamma: float = 0.0) -> Weighting:
    """The weighting function of an objective name (``alpha`` for the D-PACE family, ``gamma`` for ``decay``,
    the other ignored) or ``objective`` itself when it is already a function."""
    if callable(objective):
        return objective
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES} or a weighting function, got {objective!r}")
    if objective in DPACE_OBJECTIVES:
        builders = {"dpace": dpace, "dpace_cumulative": dpace_cumulative, "dpace_continuation": dpace_continuation}
        return builders[objective](alpha)
    return decay(gamma) if objective == "decay" else uniform()


def position_weights(
    ce: jax.Array, mask: jax.Array, objective: str | Weighting, alpha: float, gamma: float
) -> jax.Array:
    """Loss weights ``W [..., bs]`` (float32, detached) from the hard CE ``ce [..., bs]`` and mask ``[..., bs]``
    (slot 0 zero): ``make_weighting(objective, alpha, gamma)(exp(-ce), mask)``. For ``dpace`` this is ModelOpt's
    ``W = mask * [1, w_1..w_{bs-1}]`` with ``w = dpace_weights(exp(-ce[..., 1:]), alpha, mask[..., 1:])``."""
    conf = jnp.exp(-jax.lax.stop_gradient(ce).astype(jnp.float32))
    weights = make_weighting(objective, alpha, gamma)(conf, mask.astype(jnp.float32))
    return jax.lax.stop_gradient(weights.astype(jnp.float32))


# ---------------------------------------------------------------------------------------------------------
# Per-token losses: (logits [..., V] float32, labels [...] int, teacher_logits [..., V] | None) -> [...] float32
# ---------------------------------------------------------------------------------------------------------


def _log_softmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(shifted, lse)`` with ``shifted = x - max(x)`` and ``log_softmax(x) = shifted - lse`` (torch's order)."""
    shifted = x - jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
    return shifted, jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))


def _teacher_log_probs(teacher_logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), axis=-1)


@jax.custom_jvp
def _soft_ce(logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """``-sum_v p_v log softmax(x)_v = lse(x) - sum_v p_v x_v`` for float32 ``logits`` and the detached float32
    ``teacher_logits`` (``p = softmax(teacher)``, so ``sum_v p_v = 1``), with the analytic tangent ``sum_v
    (softmax(x)_v - p_v) dx_v``: its transpose is the fused cross-entropy gradient ``ct * (softmax(x) - p)``.
    Written on the shifted logits and the teacher's unnormalised ``exp(t - max t)``, so that neither ``p`` nor
    the log-softmax is materialised over the vocabulary (each is one fused pass)."""
    return _soft_ce_parts(logits, teacher_logits)[0]


def _soft_ce_parts(logits: jax.Array, teacher_logits: jax.Array) -> tuple[jax.Array, ...]:
    shifted, lse = _log_softmax(logits)
    t_shifted, t_lse = _log_softmax(teacher_logits)
    e_t = jnp.exp(t_shifted)  # p * exp(t_lse)
    value = lse - jnp.sum(e_t * shifted, axis=-1) / jnp.exp(t_lse)
    return value, shifted, lse, t_shifted, t_lse


@_soft_ce.defjvp
def _soft_ce_jvp(primals, tangents):
    value, shifted, lse, t_shifted, t_lse = _soft_ce_parts(*primals)
    q_minus_p = jnp.exp(shifted - lse[..., None]) - jnp.exp(t_shifted - t_lse[..., None])
    return value, jnp.sum(q_minus_p * tangents[0], axis=-1)


def ce_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array | None = None) -> jax.Array:
    """Hard CE against the data token ``lse(x) - x_y`` (on ``x - max(x)``: no cancellation)."""
    shifted, lse = _log_softmax(logits.astype(jnp.float32))
    return lse - jnp.take_along_axis(shifted, labels[..., None].astype(jnp.int32), axis=-1, mode="clip")[..., 0]


def kd_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Soft CE ``-sum_v p_v log q_v`` (ModelOpt ``dflash_self_logit_distillation``; ``p = softmax(teacher)``
    detached, ``q = softmax(logits)``). Differs from KL by the teacher entropy; same gradient ``q - p``."""
    return _soft_ce(logits.astype(jnp.float32), jax.lax.stop_gradient(teacher_logits).astype(jnp.float32))


def kl_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Forward KL ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` (speculators ``kl_div``)."""
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = _teacher_log_probs(teacher_logits)
    return jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)


def reverse_kl_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Reverse KL ``KL(q || p) = sum_v q_v (log q_v - log p_v)`` (speculators ``rkl``)."""
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = _teacher_log_probs(teacher_logits)
    return jnp.sum(jnp.exp(logq) * (logq - logp), axis=-1)


def js_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Jensen-Shannon ``0.5 KL(p || m) + 0.5 KL(q || m)``, ``log m = logaddexp(log p, log q) - log 2``
    (speculators ``jsd``)."""
    logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logp = _teacher_log_probs(teacher_logits)
    logm = jnp.logaddexp(logq, logp) - math.log(2.0)
    return 0.5 * jnp.sum(jnp.exp(logp) * (logp - logm) + jnp.exp(logq) * (logq - logm), axis=-1)


def tv_loss(logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Total variation ``1 - sum_v min(p_v, q_v)`` (speculators ``tv``; 1 - the acceptance probability)."""
    q = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    p = jnp.exp(_teacher_log_probs(teacher_logits))
    return 1.0 - jnp.sum(jnp.minimum(p, q), axis=-1)


PER_TOKEN = {"ce": ce_loss, "kd": kd_loss, "kl": kl_loss, "reverse_kl": reverse_kl_loss, "js": js_loss, "tv": tv_loss}


def token_terms(
    logits: jax.Array, labels: jax.Array, teacher_logits: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token ``(loss_tok, ce, correct)`` over the last (vocab) axis, all computed in float32: ``ce`` is the hard
    CE against ``labels``, ``loss_tok`` is ``ce`` or (with a teacher) :func:`kd_loss`; ``correct = argmax(x) == y``
    (first maximum on ties). ``logits [..., V]``, ``labels [...]`` int."""
    ce = ce_loss(logits, labels)
    loss_tok = ce if teacher_logits is None else kd_loss(logits, labels, teacher_logits)
    return loss_tok, ce, is_argmax(logits, labels)


def is_argmax(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``argmax(logits, -1) == labels`` (first maximum on ties, as ``jnp.argmax`` and ``torch.argmax``) without a
    variadic (value, index) reduce, which XLA's CPU backend does not vectorise (the argmax took a quarter of the
    CE loss there): ``x_y == max(x)``, and only when some row also ties at its maximum the exact ``argmax``."""
    m = jnp.max(logits, axis=-1, keepdims=True)
    hit = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1, mode="clip")[..., 0] == m[..., 0]
    ties = jnp.sum((logits == m).astype(jnp.float32), axis=-1) > 1.0
    return jax.lax.cond(jnp.any(ties & hit), lambda: jnp.argmax(logits, axis=-1) == labels, lambda: hit)


# ---------------------------------------------------------------------------------------------------------
# Partial sums and the reduction
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The static loss pieces: the ``objective`` (a name, built with the run-time ``alpha``/``gamma`` so that changing
    them does not recompile, or a weighting function), the ``per_token`` function and the confidence source."""

    objective: str | Weighting
    per_token: PerTokenLoss
    confidence: str = "data"
    temperature: float = 1.0  # teacher losses: T^2 * l(x / T, teacher / T) (Hinton; JetSpec's KL at T)
    logit_scale: float | None = None  # the draft's output_multiplier (models/draft.py)
    softcap: float | None = None  # the draft's final_logit_softcapping


def partial_sums(loss_tok: jax.Array, correct: jax.Array, mask: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """Unnormalised sums over blocks ``[..., N, bs]`` (float32): ``weighted_loss`` ``sum W*l`` (scalar), per-slot
    ``weight`` / ``correct`` (correct tokens with mask > 0.5) / ``count`` (sum mask) ``[bs]``, and ``accepted`` (sum
    over blocks of the leading run of correct valid slots; invalid slots are transparent, as SpecForge's accept
    length) and ``blocks`` (blocks with a valid slot). Partials of disjoint sets of blocks add up."""
    axes = tuple(range(mask.ndim - 1))
    mask = mask.astype(jnp.float32)
    valid = mask > 0.5
    run = jnp.sum(jnp.cumprod((correct | ~valid).astype(jnp.float32), axis=-1) * valid, axis=-1)
    return {
        "weighted_loss": jnp.sum(weights * loss_tok),
        "weight": jnp.sum(weights, axis=axes),
        "correct": jnp.sum((correct & valid).astype(jnp.float32), axis=axes),
        "count": jnp.sum(mask, axis=axes),
        "accepted": jnp.sum(run),
        "blocks": jnp.sum(jnp.any(valid, axis=-1).astype(jnp.float32)),
    }


def normalizer(partials: Mapping[str, jax.Array], normalization: str = "modelopt") -> tuple[jax.Array, jax.Array]:
    """``(den, active)`` of a normalisation on (summed) partials: ``modelopt`` ``sum W + 1e-6``, active when > 1
    (ModelOpt's zero-loss rule); ``batch`` the rows ``B`` (SpecForge D-PACE); ``tokens`` ``sum mask + 1e-5``
    (speculators). The last two are always active (their sources have no zero-loss rule)."""
    if normalization == "modelopt":
        den = jnp.sum(partials["weight"]) + _EPS
        return den, den > 1.0
    if normalization == "batch":
        return jnp.asarray(partials["rows"], jnp.float32), jnp.asarray(True)
    if normalization == "tokens":
        return jnp.sum(partials["count"]) + _TOKENS_EPS, jnp.asarray(True)
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def reduce_partials(
    partials: Mapping[str, jax.Array], normalization: str = "modelopt"
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``(loss, metrics)`` from (summed) partials: ``loss = weighted_loss / den`` where active, else exactly 0
    (zero, finite gradient); see :func:`normalizer`.

    Metrics: ``accuracy`` (``sum correct / (sum mask + 1e-6)``; 0 when inactive, as ModelOpt), ``position_accuracy
    [bs]``, ``weight_sum``, ``simulated_tau`` (``1 + sum_{k=1..bs-1} prod_{i=1..k} acc_i``), ``accept_length`` (``1 +
    accepted / blocks``: the mean over blocks of 1 + the leading run of correct draft slots), ``num_tokens``,
    ``position_weight_mean [bs]`` (mean W per slot over valid tokens).
    """
    den, active = normalizer(partials, normalization)
    loss = jnp.where(active, jnp.sum(partials["weighted_loss"]) / jnp.where(active, den, 1.0), 0.0)
    num_tokens = jnp.sum(partials["count"])
    accuracy = jnp.where(active, jnp.sum(partials["correct"]) / (num_tokens + _EPS), 0.0)
    per_slot_count = jnp.maximum(partials["count"], 1.0)
    position_accuracy = jax.lax.stop_gradient(partials["correct"] / per_slot_count)
    metrics = {
        "accuracy": accuracy,
        "position_accuracy": position_accuracy,
        "weight_sum": jax.lax.stop_gradient(jnp.sum(partials["weight"])),
        "simulated_tau": 1.0 + jnp.sum(jnp.cumprod(position_accuracy[1:])),
        "accept_length": 1.0 + partials["accepted"] / jnp.maximum(partials["blocks"], 1.0),
        "num_tokens": num_tokens,
        "position_weight_mean": jax.lax.stop_gradient(partials["weight"] / per_slot_count),
    }
    if "selector_correct" in partials:  # DFlash2: the selector's path (what the drafter emits) and its ceiling
        selector_position = jax.lax.stop_gradient(partials["selector_correct"] / per_slot_count)
        scale = jnp.where(active, 1.0 / jnp.where(active, den, 1.0), 0.0)
        metrics.update(
            selector_loss=jax.lax.stop_gradient(partials["selector_weighted_loss"] * scale),
            selector_accuracy=jnp.sum(partials["selector_correct"]) / (num_tokens + _EPS),
            selector_position_accuracy=selector_position,
            selector_simulated_tau=1.0 + jnp.sum(jnp.cumprod(selector_position[1:])),
            selector_accept_length=1.0 + partials["selector_accepted"] / jnp.maximum(partials["blocks"], 1.0),
            candidate_recall=jnp.sum(partials["candidate_hits"]) / (num_tokens + _EPS),
        )
    return loss, metrics


def _logit_partials(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    teacher_logits: jax.Array | None,
    spec: LossSpec,
    alpha: jax.Array,
    gamma: jax.Array,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of one set of blocks from float32 logits: ``(sum W*l, other partials)``; the one code path of
    :func:`block_loss` and of every chunk of :func:`block_loss_from_hidden`. Only ``l`` carries gradient."""
    logits, loss_tok, weights = _weighted_terms(logits, labels, mask, teacher_logits, spec, alpha, gamma)
    correct = is_argmax(logits, labels)
    partials = partial_sums(loss_tok.astype(jnp.float32), correct, mask, weights)
    return partials.pop("weighted_loss"), partials


def logit_transform(z: jax.Array, scale: float | None, softcap: float | None) -> jax.Array:
    """``softcap(scale * z)`` with ``softcap(x) = c * tanh(x / c)`` (a draft's ``output_multiplier`` and
    ``final_logit_softcapping``); a null option is the identity."""
    if scale is not None:
        z = z * scale
    if softcap is not None:
        z = softcap * jnp.tanh(z / softcap)
    return z


def _weighted_terms(logits, labels, mask, teacher_logits, spec: LossSpec, alpha, gamma):
    """``(x, l, W)``: the draft logits ``x = logit_transform(logits)``, the per-token loss ``l`` (at the spec's
    temperature ``T``: ``T^2 * l(x / T, teacher / T)``) and the detached position weights ``W`` from the
    confidences (``exp(-CE(x))`` for ``data``, ``exp(-l)`` for ``loss``)."""
    x = logit_transform(logits, spec.logit_scale, spec.softcap)
    t = spec.temperature
    if t == 1.0:
        loss_tok = spec.per_token(x, labels, teacher_logits)
    else:
        loss_tok = t * t * spec.per_token(x / t, labels, teacher_logits / t)
    chex.assert_shape(loss_tok, labels.shape)
    data_ce = spec.confidence == "data" and (spec.per_token is not ce_loss or t != 1.0)
    ce = ce_loss(x, labels) if data_ce else loss_tok
    conf = jnp.exp(-jax.lax.stop_gradient(ce).astype(jnp.float32))
    weights = jax.lax.stop_gradient(make_weighting(spec.objective, alpha, gamma)(conf, mask).astype(jnp.float32))
    return x, loss_tok, weights


def _zero_slot0(mask: jax.Array) -> jax.Array:
    """``mask * (k > 0)`` in float32: slot 0 never carries weight (traced masks cannot be value-checked)."""
    return mask.astype(jnp.float32) * (jnp.arange(mask.shape[-1]) > 0)


def _spec(objective, alpha, gamma, per_token, normalization, confidence, has_teacher, logits_options=None) -> LossSpec:
    """Validate the options (and ``alpha`` for a named D-PACE objective) and resolve the per-token name.
    ``logits_options``: ``{temperature, logit_scale, softcap}`` (:class:`LossSpec`), checked > 0."""
    per_token = ("kd" if has_teacher else "ce") if per_token is None else per_token
    check_loss_options(objective, per_token, normalization, confidence, has_teacher)
    if isinstance(objective, str) and objective in DPACE_OBJECTIVES:
        check_alpha(alpha, allow_zero=True)
    options = dict(logits_options or {})
    for key, value in options.items():
        if key not in ("temperature", "logit_scale", "softcap"):
            raise ValueError(f"unknown logits option {key!r}")
        if value is not None and not float(value) > 0:
            raise ValueError(f"{key} must be > 0, got {value!r}")
    if options.get("temperature", 1.0) != 1.0 and not has_teacher:
        raise ValueError(f"temperature {options['temperature']} needs a teacher (a teacher per-token loss)")
    per_token_fn = PER_TOKEN[per_token] if isinstance(per_token, str) else per_token
    return LossSpec(objective, per_token_fn, confidence, **options)


# ---------------------------------------------------------------------------------------------------------
# Public losses
# ---------------------------------------------------------------------------------------------------------


def block_loss(
    logits: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    objective: str | Weighting = "dpace",
    alpha: float = 0.5,
    gamma: float = 0.0,
    teacher_logits: jax.Array | None = None,
    per_token: str | PerTokenLoss | None = None,
    normalization: str = "modelopt",
    confidence: str = "data",
    logits_options: Mapping[str, Any] | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DFlash block loss: ``(loss, metrics)`` from full draft logits (defaults: ModelOpt ``_compute_loss``).

    Shapes: ``logits [B,N,bs,V]`` (any float dtype; math in float32), ``labels [B,N,bs]`` int (slot ``k`` of block
    ``n`` is the data token at ``anchor_n + k``), ``mask [B,N,bs]`` float (slot 0 must be 0), optional
    ``teacher_logits [B,N,bs,V]``. ``objective``: a name of :data:`OBJECTIVES` (``alpha`` for the D-PACE family,
    ``gamma`` for ``decay``) or a weighting function ``(confidence, mask) -> W``. ``per_token``: a name of
    :data:`PER_TOKEN_LOSSES` or a function ``(logits, labels, teacher_logits) -> [B,N,bs]``; default ``kd`` with a
    teacher, else ``ce``. ``confidence``: ``data`` (hard CE vs the data token, ModelOpt) or ``loss`` (the per-token
    loss, speculators). ``normalization``: see :func:`normalizer`. ``logits_options``: as in
    :func:`block_partials_from_hidden`. Metrics as in :func:`reduce_partials`.
    """
    _check_block_inputs(logits, "logits", labels, mask)
    _check_label_range(labels, logits.shape[-1])
    if teacher_logits is not None:
        _chex("teacher_logits", chex.assert_shape, teacher_logits, logits.shape)
    has_teacher = teacher_logits is not None
    spec = _spec(objective, alpha, gamma, per_token, normalization, confidence, has_teacher, logits_options)
    return _block_loss(logits, labels, mask, teacher_logits, alpha, gamma, spec=spec, normalization=normalization)


@functools.partial(jax.jit, static_argnames=("spec", "normalization"))
def _block_loss(logits, labels, mask, teacher_logits, alpha, gamma, *, spec, normalization):
    """Jitted body of :func:`block_loss` (one compile per shape when called eagerly; inlined under a caller's jit)."""
    x = logits.astype(jnp.float32)
    teacher = None if teacher_logits is None else teacher_logits.astype(jnp.float32)
    num, partials = _logit_partials(x, labels, _zero_slot0(mask), teacher, spec, alpha, gamma)
    partials = dict(partials, weighted_loss=num, rows=jnp.float32(logits.shape[0]))
    return reduce_partials(partials, normalization)


def block_loss_from_hidden(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    objective: str | Weighting = "dpace",
    alpha: float = 0.5,
    gamma: float = 0.0,
    teacher_hidden: jax.Array | None = None,
    per_token: str | PerTokenLoss | None = None,
    normalization: str = "modelopt",
    confidence: str = "data",
    chunk_blocks: int = 64,
    compute_dtype: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """:func:`block_loss` of ``hidden @ lm_head.T`` by the fused chunked linear cross-entropy (same result):
    ``reduce_partials(block_partials_from_hidden(...), normalization)``.

    ``hidden [B,N,bs,H]`` (draft final hidden), ``lm_head [V,H]`` (differentiable; the step's frozen head is simply
    not differentiated, and then no ``lm_head`` gradient is computed), ``labels``/``mask [B,N,bs]``, optional
    ``teacher_hidden [B,N,bs,H]`` (teacher logits ``teacher_hidden @ lm_head.T``, detached). The other options as
    in :func:`block_loss`; ``chunk_blocks`` and ``compute_dtype`` as in :func:`block_partials_from_hidden`.
    """
    partials = block_partials_from_hidden(
        hidden,
        lm_head,
        labels,
        mask,
        objective=objective,
        alpha=alpha,
        gamma=gamma,
        teacher_hidden=teacher_hidden,
        per_token=per_token,
        normalization=normalization,
        confidence=confidence,
        chunk_blocks=chunk_blocks,
        compute_dtype=compute_dtype,
    )
    return reduce_partials(partials, normalization)


def numerator_scale(partials: Mapping[str, jax.Array], normalization: str = "modelopt") -> jax.Array:
    """``d loss / d sum(weighted_loss)`` of :func:`reduce_partials` at (summed, detached) ``partials``: ``1 / den``
    where active, exactly 0 on the zero-loss branch. The weights are detached, so the loss gradient is this factor
    times the gradient of the numerator: gradient accumulation sums the numerators' gradients over micro-batches and
    scales once (docs/losses.md, accumulation contract)."""
    den, active = normalizer(jax.lax.stop_gradient(dict(partials)), normalization)
    return jnp.where(active, 1.0 / jnp.where(active, den, 1.0), 0.0)


def block_partials_from_hidden(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    objective: str | Weighting = "dpace",
    alpha: float = 0.5,
    gamma: float = 0.0,
    teacher_hidden: jax.Array | None = None,
    per_token: str | PerTokenLoss | None = None,
    normalization: str = "modelopt",
    confidence: str = "data",
    chunk_blocks: int = 64,
    compute_dtype: Any = None,
    logits_options: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """The unnormalised partials of one batch (see the module docstring's accumulation contract), computed
    ``chunk_blocks`` blocks at a time by a ``jax.custom_vjp`` whose forward pass also computes the gradient of
    ``weighted_loss``; only ``weighted_loss`` carries gradient. Adds ``rows = B``.

    The blocks axis is padded to a multiple of ``chunk_blocks`` with mask 0 and scanned, so only one chunk's
    float32 ``[B, chunk, bs, V]`` logits (and their gradient) live at a time. ``compute_dtype`` is the matmul input
    dtype (default: promoted dtype of ``hidden`` and ``lm_head``); matmuls accumulate in float32.
    ``normalization`` is only validated here (the partials do not depend on it). ``logits_options``: the draft
    logit transform and the teacher-loss temperature (``temperature``, ``logit_scale``, ``softcap``; see
    :class:`LossSpec`).
    """
    _check_block_inputs(hidden, "hidden", labels, mask)
    _chex("lm_head", chex.assert_rank, lm_head, 2)
    if lm_head.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head must be [V, H={hidden.shape[-1]}], got shape {lm_head.shape}")
    _check_label_range(labels, lm_head.shape[0])
    if teacher_hidden is not None:
        _chex("teacher_hidden", chex.assert_shape, teacher_hidden, hidden.shape)
    if not isinstance(chunk_blocks, (int, np.integer)) or chunk_blocks < 1:
        raise ValueError(f"chunk_blocks must be a positive int, got {chunk_blocks!r}")
    spec = _spec(
        objective, alpha, gamma, per_token, normalization, confidence, teacher_hidden is not None, logits_options
    )
    dtype = jnp.dtype(compute_dtype or jnp.result_type(hidden.dtype, lm_head.dtype))
    opts = _ChunkOptions(
        spec, max(1, min(int(chunk_blocks), hidden.shape[1])), dtype, jnp.dtype(hidden.dtype), jnp.dtype(lm_head.dtype)
    )
    return _block_partials_from_hidden(hidden, lm_head, teacher_hidden, labels, mask, alpha, gamma, opts=opts)


@functools.partial(jax.jit, static_argnames=("opts",))
def _block_partials_from_hidden(hidden, lm_head, teacher_hidden, labels, mask, alpha, gamma, *, opts):
    """Jitted body of :func:`block_partials_from_hidden`."""
    weight_params = (jnp.asarray(alpha, jnp.float32), jnp.asarray(gamma, jnp.float32))
    partials = _fused_partials(opts, hidden, lm_head, teacher_hidden, labels, _zero_slot0(mask), weight_params)
    return dict(partials, rows=jnp.float32(hidden.shape[0]))


@dataclasses.dataclass(frozen=True)
class _ChunkOptions:
    """Static options of the fused pass: the loss pieces, blocks per chunk, matmul and cotangent dtypes."""

    spec: LossSpec
    chunk: int
    dtype: Any
    hidden_dtype: Any
    head_dtype: Any


def _scan_chunks(
    opts: _ChunkOptions, hidden, lm_head, teacher_hidden, labels, mask, weight_params, *, grad_hidden, grad_head
):
    """One pass over chunks of blocks: ``(partials, d weighted_loss / d hidden | None, d ... / d lm_head | None)``.

    Per chunk: logits ``h @ lm_head.T`` (and the teacher's) once; the partials and, with ``grad_*``, the vjp of
    ``sum W*l`` at cotangent 1 w.r.t. the logits (``W * dl/dx``, float32), then ``g @ lm_head`` -> hidden gradient
    and ``g.T @ h`` -> ``lm_head`` gradient (accumulated in the scan carry).
    """
    b, n, bs, h = hidden.shape
    c, dtype = opts.chunk, opts.dtype
    w = lm_head.astype(dtype)
    pad = -n % c

    def project(x: jax.Array) -> jax.Array:
        return jnp.einsum("bnkh,vh->bnkv", x.astype(dtype), w, preferred_element_type=jnp.float32)

    def to_chunks(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, (n + pad) // c, c, *x.shape[2:]), 1, 0)

    def body(g_head, xs):
        hc, y, m, *th = xs
        teacher = project(jax.lax.stop_gradient(th[0])) if th else None
        logits = project(hc)
        if not (grad_hidden or grad_head):
            num, partials = _logit_partials(logits, y, m, teacher, opts.spec, *weight_params)
            return g_head, (dict(partials, weighted_loss=num), None)
        num, vjp, partials = jax.vjp(
            lambda x: _logit_partials(x, y, m, teacher, opts.spec, *weight_params), logits, has_aux=True
        )
        g_logits = vjp(jnp.ones((), jnp.float32))[0].astype(dtype)
        g_hidden = jnp.einsum("bnkv,vh->bnkh", g_logits, w, preferred_element_type=jnp.float32) if grad_hidden else None
        if grad_head:
            g_head = g_head + jnp.einsum(
                "bnkv,bnkh->vh", g_logits, hc.astype(dtype), preferred_element_type=jnp.float32
            )
        return g_head, (dict(partials, weighted_loss=num), g_hidden)

    xs = (hidden, labels, mask) + (() if teacher_hidden is None else (teacher_hidden,))
    init = jnp.zeros(lm_head.shape, jnp.float32) if grad_head else None
    g_head, (per_chunk, g_hidden) = jax.lax.scan(body, init, tuple(to_chunks(x) for x in xs))
    partials = jax.tree.map(lambda p: jnp.sum(p, axis=0), per_chunk)
    if g_hidden is not None:
        g_hidden = jnp.moveaxis(g_hidden, 0, 1).reshape(b, n + pad, bs, h)[:, :n]
    return partials, g_hidden, g_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_partials(opts, hidden, lm_head, teacher_hidden, labels, mask, weight_params):
    """Primal (nothing differentiated): the partials alone, 1 vocabulary matmul per chunk (2 with a teacher).
    ``weight_params``: the float32 ``(alpha, gamma)`` of a named objective (run-time values: no recompile)."""
    return _scan_chunks(
        opts, hidden, lm_head, teacher_hidden, labels, mask, weight_params, grad_hidden=False, grad_head=False
    )[0]


def _fused_partials_fwd(opts, hidden, lm_head, teacher_hidden, labels, mask, weight_params):
    partials, g_hidden, g_head = _scan_chunks(
        opts,
        hidden.value,
        lm_head.value,
        jax.tree.map(lambda t: t.value, teacher_hidden),
        labels.value,
        mask.value,
        jax.tree.map(lambda t: t.value, weight_params),
        grad_hidden=hidden.perturbed,
        grad_head=lm_head.perturbed,
    )
    return partials, (g_hidden, g_head)


def _fused_partials_bwd(opts, residuals, cotangents):
    """Scale the forward pass's gradients of ``weighted_loss`` by its cotangent (the other partials carry none)."""
    g_hidden, g_head = residuals
    ct = cotangents["weighted_loss"]
    if isinstance(ct, SymbolicZero):
        ct = jnp.zeros((), jnp.float32)
    d_hidden = None if g_hidden is None else (ct * g_hidden).astype(opts.hidden_dtype)
    d_head = None if g_head is None else (ct * g_head).astype(opts.head_dtype)
    return d_hidden, d_head, None, None, None, None


_fused_partials.defvjp(_fused_partials_fwd, _fused_partials_bwd, symbolic_zeros=True)


# ---------------------------------------------------------------------------------------------------------
# DFlash2 path selector loss
# ---------------------------------------------------------------------------------------------------------

SELECTOR_MISSING = ("drop", "insert")
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def selector_targets(
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    *,
    top_k: int,
    teacher_hidden: jax.Array | None = None,
    chunk_blocks: int = 64,
    compute_dtype: Any = None,
    **pieces: Any,
) -> tuple[jax.Array, jax.Array]:
    """The selector's candidates and position weights (detached, forward only): ``(candidates [B,N,bs,k] int32,
    W [B,N,bs] float32)``.

    ``candidates`` are the top-``k`` ids of the draft logits ``logit_transform(hidden @ lm_head.T)`` (descending);
    ``W`` the backbone's position weights of the same blocks (the weighting, confidence source and per-token loss
    of :func:`block_partials_from_hidden`, slot 0 zero), so the selector term weighs a position as the backbone
    term does. ``pieces``: that function's ``objective``, ``alpha``, ``gamma``, ``per_token``, ``confidence`` and
    ``logits_options``. One extra forward vocabulary matmul, ``chunk_blocks`` blocks at a time (``lax.map``)."""
    _check_block_inputs(hidden, "hidden", labels, mask)
    opts = dict(objective="dpace", alpha=0.5, gamma=0.0, per_token=None, confidence="data", logits_options=None)
    unknown = set(pieces) - set(opts)
    if unknown:
        raise TypeError(f"selector_targets got unknown loss pieces {sorted(unknown)}")
    opts.update(pieces)
    alpha, gamma = opts["alpha"], opts["gamma"]
    spec = _spec(
        opts["objective"],
        alpha,
        gamma,
        opts["per_token"],
        "modelopt",
        opts["confidence"],
        teacher_hidden is not None,
        opts["logits_options"],
    )
    dtype = jnp.dtype(compute_dtype or jnp.result_type(hidden.dtype, lm_head.dtype))
    b, n, bs, h = hidden.shape
    c = max(1, min(int(chunk_blocks), n))
    pad = -n % c
    w = jax.lax.stop_gradient(lm_head).astype(dtype)
    weight_params = (jnp.asarray(alpha, jnp.float32), jnp.asarray(gamma, jnp.float32))

    def to_chunks(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, (n + pad) // c, c, *x.shape[2:]), 1, 0)

    def project(x):
        return jnp.einsum("bnkh,vh->bnkv", x.astype(dtype), w, preferred_element_type=jnp.float32)

    def chunk(xs):
        hc, y, m, *th = xs
        teacher = project(th[0]) if th else None
        x, _, weights = _weighted_terms(project(hc), y, m, teacher, spec, *weight_params)
        return jax.lax.top_k(x, top_k)[1].astype(jnp.int32), weights

    xs = (jax.lax.stop_gradient(hidden), labels, _zero_slot0(mask))
    xs = xs + (() if teacher_hidden is None else (jax.lax.stop_gradient(teacher_hidden),))
    cand, weights = jax.lax.map(chunk, tuple(to_chunks(x) for x in xs))
    unchunk = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, n + pad, *x.shape[3:])[:, :n]  # noqa: E731
    return unchunk(cand), unchunk(weights)


def selector_partials(
    score_fn: ScoreFn,
    hidden: jax.Array,
    lm_head: jax.Array,
    labels: jax.Array,
    mask: jax.Array,
    candidates: jax.Array,
    weights: jax.Array,
    *,
    missing: str = "drop",
    logits_options: Mapping[str, Any] | None = None,
) -> dict[str, jax.Array]:
    """Partials of the DFlash2 selector loss: position-weighted cross-entropy of the selector over the candidate
    set, the predecessor teacher-forced (slot ``j`` is scored after the data token of slot ``j - 1``; slot 1 after
    the anchor), as NeMo Automodel ``DFlash2TrainerModule``.

    ``score_fn(hidden [..., H], unary [..., k], candidates [..., k], predecessor [...]) -> S [..., k]`` (the
    draft's ``candidate_selector.scores``), ``hidden [B,N,bs,H]``, ``lm_head [V,H]``, ``labels``/``mask``
    ``[B,N,bs]``, ``candidates [B,N,bs,k]`` and ``W [B,N,bs]`` of :func:`selector_targets`. ``unary`` =
    ``logit_transform(h . lm_head[b])``. ``missing``: a gold token outside the candidates is ``drop``-ped (NeMo;
    no selector signal there) or ``insert``-ed in place of the weakest candidate (speculators).

    Returns ``selector_weighted_loss`` ``sum W * CE`` (differentiable), per-slot ``selector_correct`` (argmax of
    ``S`` is the gold token) and ``candidate_hits`` (gold among the top-k, before any insertion) ``[bs]``, and
    ``selector_accepted`` (sum over blocks of the leading run of selector-correct valid slots). They add up over
    disjoint blocks like :func:`partial_sums`."""
    if missing not in SELECTOR_MISSING:
        raise ValueError(f"missing must be one of {SELECTOR_MISSING}, got {missing!r}")
    _check_block_inputs(hidden, "hidden", labels, mask)
    options = dict(logits_options or {})
    mask = _zero_slot0(mask)
    valid = mask > 0.5
    gold = labels.astype(jnp.int32)
    hits = jnp.any(candidates == gold[..., None], axis=-1)
    if missing == "insert":
        candidates = candidates.at[..., -1].set(jnp.where(hits, candidates[..., -1], gold))
    found = candidates == gold[..., None]
    rows = jnp.take(lm_head, candidates, axis=0)  # [B, N, bs, k, H]
    unary = jnp.einsum("bnsh,bnskh->bnsk", hidden, rows.astype(hidden.dtype), preferred_element_type=jnp.float32)
    unary = logit_transform(unary, options.get("logit_scale"), options.get("softcap"))
    predecessor = jnp.concatenate([gold[..., :1], gold[..., :-1]], axis=-1)
    scores = score_fn(hidden, unary, candidates, predecessor).astype(jnp.float32)
    has_gold = jnp.any(found, axis=-1)
    gold_score = jnp.sum(jnp.where(found, scores, 0.0), axis=-1)
    ce = jax.nn.logsumexp(scores, axis=-1) - gold_score
    correct = has_gold & (jnp.argmax(scores, axis=-1) == jnp.argmax(found, axis=-1))
    axes = tuple(range(mask.ndim - 1))
    run = jnp.sum(jnp.cumprod((correct | ~valid).astype(jnp.float32), axis=-1) * valid, axis=-1)
    return {
        "selector_weighted_loss": jnp.sum(jnp.where(has_gold & valid, jax.lax.stop_gradient(weights) * ce, 0.0)),
        "selector_correct": jnp.sum((correct & valid).astype(jnp.float32), axis=axes),
        "candidate_hits": jnp.sum((hits & valid).astype(jnp.float32), axis=axes),
        "selector_accepted": jnp.sum(run),
    }


def with_selector(partials: Mapping[str, jax.Array], selector: Mapping[str, jax.Array], weight: float) -> dict:
    """The backbone ``partials`` joined with the selector's: ``weighted_loss += weight * selector_weighted_loss``
    (one normaliser for both terms: ``loss = (sum W*l + weight * sum W*CE_sel) / den``, so gradient accumulation
    stays exact)."""
    out = dict(partials, **selector)
    out["weighted_loss"] = partials["weighted_loss"] + weight * selector["selector_weighted_loss"]
    return out
