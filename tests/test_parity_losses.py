"""Parity of losses/blocks against the installed PyTorch reference (nvidia-modelopt 0.47.0), float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import oracle
from dflash_jax import (
    LossSpec,
    block_loss,
    block_targets,
    build_target_layer_ids,
    dpace_weights,
    draft_position_ids,
    gather_teacher_logits,
    sample_anchors,
)

pytestmark = pytest.mark.parity
CASES = 30
DPACE_SHAPES = [(1,), (7,), (3, 15), (2, 3, 4)]  # few shapes (one compile each), random values
BLOCK_SHAPES = [(2, 1, 3, 2, 4), (1, 2, 6, 3, 5), (2, 4, 16, 5, 11), (3, 5, 15, 2, 7)]  # (B, bs, S, N, V)


def test_dpace_weights_parity():
    rng = np.random.default_rng(0)
    for _ in range(CASES):
        shape = DPACE_SHAPES[rng.integers(len(DPACE_SHAPES))]
        conf = rng.uniform(0, 1, shape).astype(np.float32)
        alpha = float(rng.choice([1.0, rng.uniform(0.01, 1.0)]))
        valid = None if rng.random() < 0.3 else (rng.random(shape) < 0.7).astype(np.float32)
        got = dpace_weights(jnp.asarray(conf), alpha, None if valid is None else jnp.asarray(valid))
        # torch's CPU cumprod/cumsum accumulate in float64, XLA's in float32: weights agree to 1e-6 abs where
        # float32 can resolve it (|w| < 8); larger weights (bs > 8, alpha near 1) to a few ulp (rtol 4e-7).
        np.testing.assert_allclose(got, oracle.ref_dpace_weights(conf, alpha, valid), rtol=4e-7, atol=1e-6)


def test_bad_alpha_both_raise():
    with pytest.raises(ValueError, match="alpha"):
        oracle.ref_dpace_weights(np.ones(3, np.float32), 1.5)
    with pytest.raises(ValueError, match="alpha"):
        dpace_weights(jnp.ones(3), 1.5)


def random_case(rng, kd):
    """A random batch with anchors in the reference's format (sorted kept anchors left-packed, padding (0, F))."""
    b, bs, s, n, v = BLOCK_SHAPES[rng.integers(len(BLOCK_SHAPES))]
    input_ids = rng.integers(0, v, (b, s))
    loss_mask = (rng.random((b, s)) < 0.8).astype(np.float32)
    anchors, keep = np.zeros((b, n), np.int64), np.zeros((b, n), bool)
    for row in range(b):
        k = int(rng.integers(0, n + 1))
        chosen = np.sort(rng.choice(s - bs + 1, size=min(k, s - bs + 1), replace=False))
        anchors[row, : len(chosen)], keep[row, : len(chosen)] = chosen, True
    logits = 2.0 * rng.standard_normal((b, n, bs, v)).astype(np.float32)
    labels, _ = block_targets(
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(loss_mask),
        jnp.asarray(anchors, jnp.int32),
        jnp.asarray(keep),
        bs,
    )
    idx = np.asarray(labels)[..., None]
    hit = rng.random((b, n, bs, 1)) < 0.5  # make about half of the slots argmax-correct
    np.put_along_axis(logits, idx, np.take_along_axis(logits, idx, -1) + np.where(hit, 8.0, 0.0), axis=-1)
    base = 2.0 * rng.standard_normal((b, s, v)).astype(np.float32) if kd else None
    objective = str(rng.choice(["dpace", "decay"]))
    kw = dict(
        block_size=bs,
        objective=objective,
        alpha=float(rng.uniform(0.05, 1.0)),
        gamma=float(rng.choice([0.0, rng.uniform(0.5, 8.0)])),
    )
    return input_ids, loss_mask, anchors, keep, logits, base, kw


def ours(input_ids, loss_mask, anchors, keep, logits, base, block_size, objective, alpha, gamma):
    anchors_j = jnp.asarray(anchors, jnp.int32)
    labels, mask = block_targets(
        jnp.asarray(input_ids, jnp.int32), jnp.asarray(loss_mask), anchors_j, jnp.asarray(keep), block_size
    )
    teacher = None if base is None else gather_teacher_logits(jnp.asarray(base), anchors_j, block_size)
    return lambda x: block_loss(
        x, labels, mask, spec=LossSpec(objective=objective, alpha=alpha, gamma=gamma), teacher_logits=teacher
    )


@pytest.mark.parametrize("kd", [False, True])
def test_compute_loss_parity(kd):
    rng = np.random.default_rng(1 + kd)
    nonzero = 0
    for _ in range(CASES):
        input_ids, loss_mask, anchors, keep, logits, base, kw = random_case(rng, kd)
        ref_loss, ref_acc = oracle.ref_compute_loss(logits, input_ids, anchors, keep, loss_mask, base, **kw)
        loss_fn = ours(input_ids, loss_mask, anchors, keep, logits, base, **kw)
        (loss, metrics), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logits))
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6, atol=1e-30)
        assert float(metrics["accuracy"]) == np.float32(ref_acc)
        ref_grad = oracle.ref_compute_loss_grad(logits, input_ids, anchors, keep, loss_mask, base, **kw)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-7)
        nonzero += ref_loss != 0.0
    assert nonzero >= CASES // 3  # the random cases exercise the loss, not only the zero branch


def test_static_n_padding_matches_reference_dynamic_n():
    """Reference on its N blocks == ours on the same kept anchors padded to a larger static N with (0, False)."""
    rng = np.random.default_rng(7)
    for _ in range(10):
        input_ids, loss_mask, anchors, keep, logits, base, kw = random_case(rng, kd=bool(rng.integers(2)))
        extra = int(rng.integers(1, 4))
        b, n, bs, v = logits.shape
        pad_anchors = np.concatenate([anchors, np.zeros((b, extra), anchors.dtype)], 1)
        pad_keep = np.concatenate([keep, np.zeros((b, extra), bool)], 1)
        pad_logits = np.concatenate([logits, rng.standard_normal((b, extra, bs, v)).astype(np.float32)], 1)
        ref_loss, ref_acc = oracle.ref_compute_loss(logits, input_ids, anchors, keep, loss_mask, base, **kw)
        loss, metrics = ours(input_ids, loss_mask, pad_anchors, pad_keep, pad_logits, base, **kw)(pad_logits)
        np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6, atol=1e-30)
        assert float(metrics["accuracy"]) == np.float32(ref_acc)


def test_position_ids_parity():
    rng = np.random.default_rng(3)
    for _ in range(CASES):
        bs, b, n = int(rng.integers(1, 6)), int(rng.integers(1, 4)), int(rng.integers(1, 6))
        s = bs * int(rng.integers(1, 5))
        anchors = rng.integers(0, s - bs + 1, (b, n))
        got = draft_position_ids(s, jnp.asarray(anchors, jnp.int32), bs)
        np.testing.assert_array_equal(got, oracle.ref_position_ids(s, anchors, bs))


def test_attention_mask_oracle_example():
    """The docs/design.md §4.4 mask example, which pins the oracle wrapper that the draft-model tests use."""
    mask = oracle.ref_attention_mask(8, np.array([[0, 2]]), np.array([[True, False]]), 4)
    assert mask.shape == (1, 8, 16) and mask.dtype == bool
    np.testing.assert_array_equal(mask[0, :4], np.tile([0] * 8 + [1] * 4 + [0] * 4, (4, 1)))
    assert not mask[0, 4:].any()
    windowed = oracle.ref_attention_mask(16, np.array([[10]]), np.array([[True]]), 4, window=6)
    np.testing.assert_array_equal(windowed[0, :, :16].sum(1), [5, 4, 3, 2])


def test_build_target_layer_ids_parity():
    for lt in range(1, 70):
        for ld in range(1, min(lt, 9) + 1):
            assert build_target_layer_ids(lt, ld) == oracle.ref_build_target_layer_ids(lt, ld)


def test_sample_anchors_semantics_parity():
    """Distribution-free: for the reference's N, both keep min(c_b, N) sorted, left-packed valid anchors."""
    rng = np.random.default_rng(4)
    regimes = set()  # rows with fewer valid positions than N (all kept) and with more (N kept)
    for case in range(CASES):
        b, bs = int(rng.integers(1, 4)), int(rng.integers(1, 5))
        s = bs * int(rng.integers(2, 6))
        valid_counts = np.zeros(b)
        while valid_counts.max() < 2:  # one valid position or none: the reference keeps no anchor (next test)
            loss_mask = (rng.random((b, s)) < rng.uniform(0.2, 1.0)).astype(np.float32)
            valid = loss_mask[:, : s - bs + 1] > 0.5
            valid_counts = valid.sum(axis=1)
        num_anchors = int(rng.integers(1, 12))
        ref_anchors, ref_keep = oracle.ref_sample_anchors(s, loss_mask, bs, num_anchors, seed=case)
        n_ref = ref_anchors.shape[1]
        assert n_ref == min(num_anchors, valid_counts.max() - 1)
        anchors, keep = sample_anchors(jax.random.key(case), jnp.asarray(loss_mask), bs, n_ref)
        for row in range(b):
            count = min(int(valid_counts[row]), n_ref)
            regimes.add(count == n_ref)
            for a, k in ((ref_anchors[row], ref_keep[row]), (np.asarray(anchors[row]), np.asarray(keep[row]))):
                assert int(k.sum()) == count and k[:count].all()
                assert np.all(np.diff(a[:count]) > 0) and all(valid[row, p] for p in a[:count])
                assert np.all(a[count:] == 0)
    assert regimes == {False, True}


def test_sample_anchors_at_most_one_valid_position():
    """The documented static-N difference: where no row has two valid positions the reference keeps no anchor
    (N = min(num_anchors, max_b c_b - 1) <= 0); ours keeps the single valid position of a row."""
    bs, s, num_anchors = 2, 8, 4
    loss_mask = np.zeros((3, s), np.float32)
    loss_mask[0, 3] = 1.0  # one valid position
    loss_mask[1, s - 1] = 1.0  # a valid token, but past the last anchor position s - bs
    ref_anchors, ref_keep = oracle.ref_sample_anchors(s, loss_mask, bs, num_anchors)
    assert ref_anchors.shape == (3, 1) and not ref_keep.any() and not ref_anchors.any()
    anchors, keep = sample_anchors(jax.random.key(0), jnp.asarray(loss_mask), bs, num_anchors)
    np.testing.assert_array_equal(keep, [[True, False, False, False]] + [[False] * 4] * 2)
    np.testing.assert_array_equal(anchors, [[3, 0, 0, 0]] + [[0] * 4] * 2)
