"""Unit tests of dflash_jax.blocks: anchor sampling, targets, teacher/position ids, target layer ids."""

from __future__ import annotations

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dflash_jax import (
    block_loss,
    block_targets,
    build_target_layer_ids,
    draft_position_ids,
    gather_teacher_logits,
    sample_anchors,
    teacher_positions,
)

SETTINGS = settings(max_examples=25, deadline=None)


def check_anchor_invariants(anchors, keep, loss_mask, block_size, num_anchors):
    """Kept count = min(c_b, N); kept anchors are distinct valid positions, sorted, left-packed; padding (0, F)."""
    anchors, keep, loss_mask = np.asarray(anchors), np.asarray(keep), np.asarray(loss_mask)
    s = loss_mask.shape[1]
    valid = loss_mask[:, : max(s - block_size, 0) + 1] > 0.5
    assert anchors.shape == keep.shape == (loss_mask.shape[0], num_anchors)
    assert anchors.dtype == np.int32 and keep.dtype == np.bool_
    for b in range(loss_mask.shape[0]):
        k = int(keep[b].sum())
        assert k == min(int(valid[b].sum()), num_anchors)
        assert keep[b, :k].all() and not keep[b, k:].any()
        kept = anchors[b, :k]
        assert np.all(np.diff(kept) > 0)
        assert all(valid[b, a] for a in kept)
        assert np.all(anchors[b, k:] == 0)


@SETTINGS
@given(
    loss_mask=hnp.arrays(np.float32, st.sampled_from([(1, 3), (2, 9), (3, 16)]), elements=st.sampled_from([0.0, 1.0])),
    block_size=st.sampled_from([1, 4]),
    num_anchors=st.sampled_from([1, 3, 20]),
    seed=st.integers(0, 2**16),
)
def test_sample_anchors_invariants(loss_mask, block_size, num_anchors, seed):
    anchors, keep = sample_anchors(jax.random.key(seed), jnp.asarray(loss_mask), block_size, num_anchors)
    check_anchor_invariants(anchors, keep, loss_mask, block_size, num_anchors)


def test_sample_anchors_uniform_subset():
    """Each of the c valid positions is kept with probability N/c (4000 draws, 5-sigma band)."""
    mask = jnp.zeros((1, 24)).at[0, jnp.array([1, 3, 4, 8, 9, 12, 15, 16])].set(1.0)
    draws = 4000
    sample = jax.jit(jax.vmap(lambda k: sample_anchors(k, mask, 4, 3)))
    anchors, keep = sample(jax.random.split(jax.random.key(0), draws))
    counts = np.zeros(24)
    np.add.at(counts, np.asarray(anchors[keep]), 1)
    valid = [1, 3, 4, 8, 9, 12, 15, 16]  # all <= S - bs = 20
    p = 3 / len(valid)
    sigma = np.sqrt(draws * p * (1 - p))
    assert np.all(np.abs(counts[valid] - draws * p) < 5 * sigma)
    assert counts.sum() == 3 * draws


def test_sample_anchors_excludes_tail_and_jits():
    mask = jnp.ones((2, 10))
    anchors, keep = jax.jit(sample_anchors, static_argnums=(2, 3))(jax.random.key(1), mask, 4, 20)
    check_anchor_invariants(anchors, keep, mask, 4, 20)
    assert np.asarray(anchors).max() <= 6 and int(keep.sum()) == 14  # candidates 0..6 per row


def test_sample_anchors_bad_input():
    with pytest.raises(ValueError, match="num_anchors"):
        sample_anchors(jax.random.key(0), jnp.ones((1, 8)), 4, 0)
    with pytest.raises(ValueError, match="block_size"):
        sample_anchors(jax.random.key(0), jnp.ones((1, 8)), 0, 2)
    with pytest.raises(ValueError, match="loss_mask"):
        sample_anchors(jax.random.key(0), jnp.ones(8), 4, 2)


def test_block_targets_unshifted_and_masked():
    input_ids = jnp.array([[10, 11, 12, 13, 14, 15, 16, 17]], jnp.int32)
    loss_mask = jnp.array([[1, 1, 1, 1, 0, 1, 1, 1]], jnp.float32)
    anchors, keep = jnp.array([[1, 4, 0]], jnp.int32), jnp.array([[True, True, False]])
    labels, mask = block_targets(input_ids, loss_mask, anchors, keep, 4)
    np.testing.assert_array_equal(labels, [[[11, 12, 13, 14], [14, 15, 16, 17], [10, 11, 12, 13]]])
    np.testing.assert_array_equal(mask, [[[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 0, 0]]])
    assert labels.dtype == jnp.int32 and mask.dtype == jnp.float32


def test_block_targets_clamps_past_end():
    """Anchors near the end (possible only with S < bs): slots past S-1 are masked, labels clamped."""
    labels, mask = block_targets(
        jnp.array([[5, 6, 7]], jnp.int32), jnp.ones((1, 3)), jnp.array([[1]], jnp.int32), jnp.array([[True]]), 4
    )
    np.testing.assert_array_equal(labels, [[[6, 7, 7, 7]]])
    np.testing.assert_array_equal(mask, [[[0, 1, 0, 0]]])


def test_block_targets_segments():
    input_ids = jnp.arange(8, dtype=jnp.int32)[None]
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]], jnp.int32)
    anchors, keep = jnp.array([[1, 3, 5]], jnp.int32), jnp.array([[True, True, True]])
    _, mask = block_targets(input_ids, jnp.ones((1, 8)), anchors, keep, 3, segment_ids=segment_ids)
    np.testing.assert_array_equal(mask, [[[0, 1, 0], [0, 1, 1], [0, 1, 0]]])
    _, plain = block_targets(input_ids, jnp.ones((1, 8)), anchors, keep, 3)
    _, ones = block_targets(input_ids, jnp.ones((1, 8)), anchors, keep, 3, segment_ids=jnp.ones((1, 8), jnp.int32))
    np.testing.assert_array_equal(plain, ones)


def test_block_targets_bad_input():
    ids, lm = jnp.zeros((2, 8), jnp.int32), jnp.ones((2, 8))
    anchors, keep = jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), bool)
    with pytest.raises(ValueError, match="loss_mask"):
        block_targets(ids, lm[:, :4], anchors, keep, 4)
    with pytest.raises(ValueError, match="keep"):
        block_targets(ids, lm, anchors, keep[:, :2], 4)
    with pytest.raises(ValueError, match="anchors"):
        block_targets(ids, lm, anchors[:1], keep[:1], 4)
    with pytest.raises(ValueError, match="anchors"):
        block_targets(ids, lm, anchors.astype(jnp.float32), keep, 4)
    with pytest.raises(ValueError, match="input_ids"):
        block_targets(ids.astype(jnp.float32), lm, anchors, keep, 4)
    with pytest.raises(ValueError, match="segment_ids"):
        block_targets(ids, lm, anchors, keep, 4, segment_ids=ids[:, :3])
    with pytest.raises(ValueError, match="block_size"):
        block_targets(ids, lm, anchors, keep, 0)


def test_teacher_positions_and_gather():
    anchors = jnp.array([[0, 3, 6]], jnp.int32)
    pos = teacher_positions(anchors, 3, 8)
    np.testing.assert_array_equal(pos, [[[0, 0, 1], [2, 3, 4], [5, 6, 6]]])
    base = jnp.arange(8 * 2, dtype=jnp.float32).reshape(1, 8, 2)
    teacher = gather_teacher_logits(base, anchors, 3)
    assert teacher.shape == (1, 3, 3, 2)
    np.testing.assert_array_equal(teacher[..., 0], 2 * pos)
    with pytest.raises(ValueError, match="base_logits"):
        gather_teacher_logits(base[0], anchors, 3)


def test_draft_position_ids():
    pos = draft_position_ids(8, jnp.array([[0, 2]], jnp.int32), 4)
    np.testing.assert_array_equal(pos, [[0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 2, 3, 4, 5]])
    assert pos.dtype == jnp.int32
    packed = jnp.array([[0, 1, 2, 0, 1, 2, 3, 4]], jnp.int32)
    pos = draft_position_ids(8, jnp.array([[4, 1, 0]], jnp.int32), 2, positions=packed)
    np.testing.assert_array_equal(pos, [[0, 1, 2, 0, 1, 2, 3, 4, 1, 2, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match="positions"):
        draft_position_ids(8, jnp.array([[4]], jnp.int32), 2, positions=packed[:, :4])


LAYER_IDS = [
    ((36, 5), [1, 9, 17, 25, 33]),
    ((32, 5), [1, 8, 15, 22, 29]),
    ((28, 5), [1, 7, 13, 19, 25]),
    ((40, 5), [1, 10, 19, 28, 37]),
    ((48, 5), [1, 12, 23, 34, 45]),
    ((64, 5), [1, 16, 31, 46, 61]),
    ((61, 5), [1, 15, 30, 44, 58]),
    ((94, 5), [1, 24, 46, 68, 91]),
    ((36, 8), [1, 6, 10, 15, 19, 24, 28, 33]),
    ((32, 1), [16]),
    ((24, 3), [1, 11, 21]),
    ((11, 3), [1, 4, 8]),
    ((9, 3), [1, 4, 6]),
    ((8, 3), [1, 3, 5]),
    ((8, 2), [1, 5]),
    ((6, 2), [1, 3]),
    ((4, 2), [1, 1]),
    ((2, 2), [1, 1]),
    ((1, 1), [0]),
]


@pytest.mark.parametrize("args,expected", LAYER_IDS)
def test_build_target_layer_ids_golden(args, expected):
    assert build_target_layer_ids(*args) == expected


def test_build_target_layer_ids_bad():
    with pytest.raises(ValueError, match="num_target_layers"):
        build_target_layer_ids(2, 3)
    with pytest.raises(ValueError, match="num_draft_layers"):
        build_target_layer_ids(4, 0)


def test_static_n_padding_equals_dynamic_n():
    """Our static N (padding (0, False)) gives the same loss/accuracy as the reference's dynamic N."""
    key = jax.random.key(3)
    s, bs, v = 16, 4, 9
    input_ids = jax.random.randint(key, (2, s), 0, v)
    loss_mask = jnp.ones((2, s)).at[0, :5].set(0.0)
    anchors, keep = sample_anchors(key, loss_mask, bs, 14)
    n_dyn = int(keep.sum(1).max())
    logits = jax.random.normal(jax.random.key(4), (2, 14, bs, v))
    full = block_loss(logits, *block_targets(input_ids, loss_mask, anchors, keep, bs))
    cut = block_loss(logits[:, :n_dyn], *block_targets(input_ids, loss_mask, anchors[:, :n_dyn], keep[:, :n_dyn], bs))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), full, cut)
    assert n_dyn < 14
