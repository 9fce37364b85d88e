"""Anchor sampling and block bookkeeping for DFlash training (pure, jittable, static shapes).

A training row of length ``S`` gets ``N`` blocks of ``bs`` slots. Block ``n`` starts at anchor ``a_n``: slot 0
holds the given token ``input_ids[a_n]`` and slot ``k`` predicts ``input_ids[a_n + k]`` (unshifted labels); the
KD teacher for slot ``k`` is the target's output at position ``a_n + k - 1``. Everything follows nvidia-modelopt
0.47.0 ``HFDFlashModel`` (``hf_dflash.py``; docs/design.md §4.5, §4.7, §4.8), with two deliberate differences:

1. **Static block count.** The reference uses the data-dependent ``N = min(num_anchors, max_b c_b - 1)`` (``c_b``
   = valid anchor positions of row ``b``; note the ``-1``), i.e. a new shape on almost every step. Here
   ``N = num_anchors`` always; row ``b`` keeps ``min(c_b, num_anchors)`` anchors and the remaining blocks are
   padding ``(anchor 0, keep False)``. Padded blocks have mask 0 everywhere, attend to nothing and are attended by
   nothing, so loss and accuracy equal the reference's on the same kept anchors (tests prove it). The only
   distributional difference: the row with the most valid positions is not forced to leave one out.
2. **Packing** (optional, ``segment_ids``/``positions``). With several conversations packed in one row, a block
   never predicts tokens of another segment, and RoPE positions restart per segment. Without these arguments
   (padding mode) the functions reduce exactly to the reference.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_anchors(anchors: jax.Array, keep: jax.Array | None = None) -> None:
    if anchors.ndim != 2 or not jnp.issubdtype(anchors.dtype, jnp.integer):
        raise ValueError(f"anchors must be an int [B, N] array, got {anchors.dtype} {anchors.shape}")
    if keep is not None and keep.shape != anchors.shape:
        raise ValueError(f"keep must have the shape of anchors {anchors.shape}, got {keep.shape}")


def check_shape(name: str, x: jax.Array, shape: tuple[int | None, ...]) -> None:
    """``x.shape`` matches ``shape`` (``None`` = any size), else ``ValueError`` naming ``name``."""
    try:
        chex.assert_shape(x, shape)
    except AssertionError as err:
        raise ValueError(f"{name}: {err}") from None


def _gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``x [B, S, ...]`` gathered at ``idx [B, N, bs]`` along axis 1 -> ``[B, N, bs, ...]``."""
    b, n, bs = idx.shape
    flat = idx.reshape(b, n * bs, *([1] * (x.ndim - 2)))
    out = jnp.take_along_axis(x, flat, axis=1)
    return out.reshape(b, n, bs, *x.shape[2:])


def block_slot_positions(anchors: jax.Array, block_size: int) -> jax.Array:
    """Sequence position of every slot, ``anchors[..., None] + arange(bs)`` (int32 ``[B, N, bs]``, unclamped)."""
    return anchors.astype(jnp.int32)[..., None] + jnp.arange(block_size, dtype=jnp.int32)


def sample_anchors(
    key: jax.Array, loss_mask: jax.Array, block_size: int, num_anchors: int
) -> tuple[jax.Array, jax.Array]:
    """Random anchors ``(anchors [B, num_anchors] int32, keep [B, num_anchors] bool)`` (docs/design.md §4.5).

    Valid anchor positions: ``loss_mask [B, S] > 0.5`` and ``p <= max(S - bs, 0)``. Each row keeps a uniformly
    random subset of its valid positions of size ``min(count, num_anchors)``, sorted ascending and left-packed;
    the rest is padding ``(0, False)``. See the module docstring for the static-``N`` difference.
    """
    _check_positive("block_size", block_size)
    _check_positive("num_anchors", num_anchors)
    if loss_mask.ndim != 2:
        raise ValueError(f"loss_mask must be [B, S], got shape {loss_mask.shape}")
    return _sample_anchors(key, loss_mask, block_size=int(block_size), num_anchors=int(num_anchors))


@functools.partial(jax.jit, static_argnames=("block_size", "num_anchors"))
def _sample_anchors(key, loss_mask, *, block_size, num_anchors):
    """Jitted body of :func:`sample_anchors`."""
    b, s = loss_mask.shape
    candidates = max(s - block_size, 0) + 1
    valid = loss_mask[:, :candidates] > 0.5
    count = jnp.sum(valid, axis=1, dtype=jnp.int32)
    u = jnp.where(valid, jax.random.uniform(key, (b, candidates)), 2.0)
    take = min(num_anchors, candidates)
    _, chosen = jax.lax.top_k(-u, take)  # valid positions first, in random order
    kept_count = jnp.minimum(count, take)
    keep = jnp.arange(take) < kept_count[:, None]
    anchors = jnp.sort(jnp.where(keep, chosen, s + 1), axis=1)
    anchors = jnp.where(keep, anchors, 0).astype(jnp.int32)
    pad = num_anchors - take
    return jnp.pad(anchors, ((0, 0), (0, pad))), jnp.pad(keep, ((0, 0), (0, pad)))


def block_targets(
    input_ids: jax.Array,
    loss_mask: jax.Array,
    anchors: jax.Array,
    keep: jax.Array,
    block_size: int,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Labels ``[B,N,bs]`` int32 and loss mask ``[B,N,bs]`` float32 of every block slot (docs/design.md §4.8).

    Slot ``k`` predicts ``input_ids[a + k]`` (clamped to ``S-1``); ``mask = keep * (a+k < S) * (k > 0) *
    loss_mask[a+k]``. With ``segment_ids [B,S]`` the slot is also masked unless ``segment_ids[a+k] ==
    segment_ids[a]`` (packed rows: a block never crosses into the next conversation).
    """
    _check_positive("block_size", block_size)
    _check_anchors(anchors, keep)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be an int [B, S] array, got {input_ids.dtype} {input_ids.shape}")
    b, s = input_ids.shape
    check_shape("loss_mask", loss_mask, (b, s))
    check_shape("anchors", anchors, (b, None))
    if segment_ids is not None:
        check_shape("segment_ids", segment_ids, (b, s))
    return _block_targets(input_ids, loss_mask, anchors, keep, segment_ids, block_size=int(block_size))


@functools.partial(jax.jit, static_argnames=("block_size",))
def _block_targets(input_ids, loss_mask, anchors, keep, segment_ids, *, block_size):
    """Jitted body of :func:`block_targets`."""
    s = input_ids.shape[1]
    pos = block_slot_positions(anchors, block_size)
    safe = jnp.minimum(pos, s - 1)
    labels = _gather_rows(input_ids.astype(jnp.int32), safe)
    mask = (
        keep[..., None].astype(jnp.float32)
        * (pos < s)
        * (jnp.arange(block_size) > 0)
        * _gather_rows(loss_mask.astype(jnp.float32), safe)
    )
    if segment_ids is not None:
        seg = _gather_rows(segment_ids, safe)
        mask = mask * (seg == seg[..., :1])
    return labels, mask


def teacher_positions(anchors: jax.Array, block_size: int, seq_len: int) -> jax.Array:
    """Target position whose output is the teacher for each slot: ``max(min(a+k, S-1) - 1, 0)`` (int32 ``[B,N,bs]``)."""
    _check_positive("block_size", block_size)
    _check_positive("seq_len", seq_len)
    _check_anchors(anchors)
    return jnp.maximum(jnp.minimum(block_slot_positions(anchors, block_size), seq_len - 1) - 1, 0)


def gather_teacher_logits(base_logits: jax.Array, anchors: jax.Array, block_size: int) -> jax.Array:
    """Teacher logits per slot, ``base_logits [B,S,V]`` at :func:`teacher_positions` -> ``[B,N,bs,V]``
    (docs/design.md §4.8). Any ``[B,S,X]`` works: the train step gathers the target's final hidden ``[B,S,H]`` the
    same way."""
    if base_logits.ndim != 3:
        raise ValueError(f"base_logits must be [B, S, V], got shape {base_logits.shape}")
    check_shape("anchors", anchors, (base_logits.shape[0], None))
    return _gather_rows(base_logits, teacher_positions(anchors, block_size, base_logits.shape[1]))


def draft_position_ids(
    seq_len: int, anchors: jax.Array, block_size: int, positions: jax.Array | None = None
) -> jax.Array:
    """RoPE positions of context + draft queries, int32 ``[B, S + N*bs]`` (docs/design.md §4.7).

    Context ``0..S-1`` then ``a_n .. a_n+bs-1`` per block (dropped blocks, anchor 0: ``0..bs-1``). With packed
    ``positions [B,S]`` (restarting per segment) the context is ``positions`` and block ``n`` gets
    ``positions[a_n] + (0..bs-1)``.
    """
    _check_positive("seq_len", seq_len)
    _check_positive("block_size", block_size)
    _check_anchors(anchors)
    b, n = anchors.shape
    offsets = jnp.arange(block_size, dtype=jnp.int32)
    if positions is None:
        context = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (b, seq_len))
        starts = anchors.astype(jnp.int32)
    else:
        check_shape("positions", positions, (b, seq_len))
        context = positions.astype(jnp.int32)
        starts = jnp.take_along_axis(context, jnp.clip(anchors, 0, seq_len - 1), axis=1)
    return jnp.concatenate([context, (starts[..., None] + offsets).reshape(b, n * block_size)], axis=1)


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """Target layers feeding the draft (docs/design.md §4.1): ``[Lt // 2]`` for one draft layer, else
    ``round(start + i*span/(Ld-1))`` with ``start = min(1, Lt-1)``, ``end = max(start, Lt-3)`` and Python's
    round-half-to-even. Duplicates are possible for tiny targets."""
    _check_positive("num_draft_layers", num_draft_layers)
    _check_positive("num_target_layers", num_target_layers)
    if num_target_layers < num_draft_layers:
        raise ValueError(f"num_target_layers ({num_target_layers}) must be >= num_draft_layers ({num_draft_layers})")
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start = min(1, num_target_layers - 1)
    span = max(start, num_target_layers - 3) - start
    return [round(start + i * span / (num_draft_layers - 1)) for i in range(num_draft_layers)]
