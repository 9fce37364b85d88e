"""Unit tests of dflash_jax.losses: golden values (docs/design.md §4.9), properties, bad input, chunked loss."""

from __future__ import annotations

import types

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dflash_jax import (
    LossSpec,
    block_loss,
    block_loss_from_hidden,
    block_targets,
    decay_weights,
    dpace_weights,
    gather_teacher_logits,
    losses,
    position_weights,
)
from dflash_jax import config as config_lib

SETTINGS = settings(max_examples=25, deadline=None)


def naive_dpace(conf: np.ndarray, alpha: float, valid: np.ndarray) -> np.ndarray:
    """Double-loop float64 D-PACE (Eq. 7-8) on one row: w_j = sum_{m>=j, valid} prod_{i<=m, valid} q~_i."""
    q = alpha + (1 - alpha) * np.asarray(conf, np.float64)
    w = np.zeros(len(q))
    for j in range(len(q)):
        for m in range(j, len(q)):
            if valid[m]:
                w[j] += np.prod([q[i] for i in range(m + 1) if valid[i]])
    return w


# ---------------------------------------------------------------------------------------------------------
# dpace_weights / decay_weights
# ---------------------------------------------------------------------------------------------------------

DPACE_GOLDEN = [
    ([0.8, 0.5], 0.5, None, [1.575, 0.675]),
    ([0.9, 0.6, 0.3, 0.8], 0.5, None, [2.6486, 1.6986, 0.9386, 0.4446]),
    ([0.9, 0.2, 0.3, 0.8], 0.5, [1, 0, 1, 1], [2.12325, 1.17325, 1.17325, 0.55575]),
    ([0.9, 0.6, 0.3, 0.8], 0.3, None, [2.2347827, 1.3047826, 0.6351826, 0.2936866]),
    ([0.9, 0.6, 0.3, 0.8], 1.0, None, [4.0, 3.0, 2.0, 1.0]),
    ([0.0] * 7, 0.5, None, [0.9921875, 0.4921875, 0.2421875, 0.1171875, 0.0546875, 0.0234375, 0.0078125]),
]


@pytest.mark.parametrize("conf,alpha,mask,expected", DPACE_GOLDEN)
def test_dpace_golden(conf, alpha, mask, expected):
    valid = None if mask is None else jnp.asarray(mask, jnp.float32)
    np.testing.assert_allclose(dpace_weights(jnp.asarray(conf), alpha, valid), expected, rtol=0, atol=1e-6)


def test_dpace_masked_slots_equal_unmasked_subsequence():
    w = dpace_weights(jnp.array([0.9, 0.2, 0.3, 0.8]), 0.5, jnp.array([1.0, 0.0, 1.0, 1.0]))
    sub = dpace_weights(jnp.array([0.9, 0.3, 0.8]), 0.5)
    np.testing.assert_allclose(w[jnp.array([0, 2, 3])], sub, atol=1e-6)


@SETTINGS
@given(
    conf=hnp.arrays(
        np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=6), elements=st.floats(0, 1, width=32)
    ),
    alpha=st.floats(1e-3, 1.0),
    data=st.data(),
)
def test_dpace_matches_double_loop(conf, alpha, data):
    valid = data.draw(hnp.arrays(np.float32, conf.shape, elements=st.sampled_from([0.0, 1.0])))
    got = np.asarray(dpace_weights(jnp.asarray(conf), alpha, jnp.asarray(valid)))
    rows_c, rows_v = conf.reshape(-1, conf.shape[-1]), valid.reshape(-1, conf.shape[-1])
    want = np.stack([naive_dpace(c, alpha, v) for c, v in zip(rows_c, rows_v)]).reshape(conf.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.shape == conf.shape and got.dtype == np.float32


@SETTINGS
@given(conf=hnp.arrays(np.float32, st.integers(1, 12), elements=st.floats(0, 1, width=32)), alpha=st.floats(1e-3, 1.0))
def test_dpace_positive_and_non_increasing_without_mask(conf, alpha):
    w = np.asarray(dpace_weights(jnp.asarray(conf), alpha))
    assert np.all(w > 0)
    assert np.all(np.diff(w) <= 1e-6)


@pytest.mark.parametrize("length", [1, 5, 16])
def test_dpace_alpha_one_is_countdown(length):
    conf = jax.random.uniform(jax.random.key(length), (3, length))
    np.testing.assert_allclose(dpace_weights(conf, 1.0)[1], np.arange(length, 0, -1), atol=1e-6)


def test_dpace_detached_and_dtype():
    conf = jnp.array([[0.9, 0.4, 0.7]], jnp.float32)
    grad = jax.grad(lambda c: jnp.sum(dpace_weights(c, 0.5) * c))(conf)
    # d/dc sum(w * c) with w detached is exactly w: no gradient leaks through the weights.
    np.testing.assert_array_equal(grad, dpace_weights(conf, 0.5))
    np.testing.assert_array_equal(jax.grad(lambda c: jnp.sum(dpace_weights(c, 0.5)))(conf), 0.0)
    assert dpace_weights(conf.astype(jnp.bfloat16), 0.5).dtype == jnp.bfloat16


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_dpace_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        dpace_weights(jnp.ones(3), alpha)
    with pytest.raises(ValueError, match="alpha"):
        jax.jit(lambda c: dpace_weights(c, alpha))(jnp.ones(3))


def test_dpace_mask_shape_mismatch():
    with pytest.raises(ValueError, match="valid_mask"):
        dpace_weights(jnp.ones((2, 3)), 0.5, jnp.ones((3,)))


def test_dpace_vmap_matches_batched():
    conf = jax.random.uniform(jax.random.key(0), (4, 2, 5))
    np.testing.assert_allclose(jax.vmap(lambda c: dpace_weights(c, 0.4))(conf), dpace_weights(conf, 0.4), atol=1e-7)


def test_decay_weights_golden():
    np.testing.assert_allclose(
        decay_weights(8, 4.0), [1, 1, 0.77880, 0.60653, 0.47237, 0.36788, 0.28650, 0.22313], atol=1e-5
    )
    np.testing.assert_allclose(
        decay_weights(16, 7.0),
        [
            1,
            1,
            0.866878,
            0.751477,
            0.651439,
            0.564718,
            0.489542,
            0.424373,
            0.367879,
            0.318907,
            0.276453,
            0.239651,
            0.207748,
            0.180092,
            0.156118,
            0.135335,
        ],
        atol=1e-6,
    )
    np.testing.assert_array_equal(decay_weights(5, 0.0), np.ones(5))
    np.testing.assert_array_equal(decay_weights(5, -2.0), np.ones(5))
    with pytest.raises(ValueError, match="block_size"):
        decay_weights(0, 4.0)


# ---------------------------------------------------------------------------------------------------------
# block_loss: the reference's _compute_loss golden case (docs/design.md §4.9), no torch needed
# ---------------------------------------------------------------------------------------------------------


def golden_case():
    """V=5, S=8, bs=4, anchors [1, 4]: logits, labels, mask and teacher logits as in docs/design.md §4.9."""
    input_ids = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]], jnp.int32)
    loss_mask = jnp.array([[1, 1, 1, 1, 0, 1, 1, 1]], jnp.float32)
    anchors, keep = jnp.array([[1, 4]], jnp.int32), jnp.array([[True, True]])
    n, j, v = np.meshgrid(np.arange(2), np.arange(4), np.arange(5), indexing="ij")
    logits = 2 * np.sin(1 + v + 3 * j + 7 * n)
    logits[0, 1, 2] += 3.0
    logits[1, 2, 1] += 3.0
    p, v2 = np.meshgrid(np.arange(8), np.arange(5), indexing="ij")
    base = np.cos(0.5 * (v2 + 2 * p))[None]
    labels, mask = block_targets(input_ids, loss_mask, anchors, keep, 4)
    teacher = gather_teacher_logits(jnp.asarray(base, jnp.float32), anchors, 4)
    return jnp.asarray(logits[None], jnp.float32), labels, mask, teacher


GOLDEN_LOSS = [  # objective, gamma, alpha, CE loss, KD loss
    ("dpace", 0.0, 0.5, 2.2908063, 2.9197140),
    ("dpace", 0.0, 0.3, 2.1506624, 2.9654799),
    ("decay", 4.0, 0.5, 2.3194444, 2.9404559),
    ("decay", 0.0, 0.5, 2.2800941, 2.9809237),
]


@pytest.mark.parametrize("objective,gamma,alpha,ce_loss,kd_loss", GOLDEN_LOSS)
def test_block_loss_golden(objective, gamma, alpha, ce_loss, kd_loss):
    logits, labels, mask, teacher = golden_case()
    kw = dict(spec=LossSpec(objective=objective, gamma=gamma, alpha=alpha))
    loss, metrics = block_loss(logits, labels, mask, **kw)
    kd, kd_metrics = block_loss(logits, labels, mask, teacher_logits=teacher, **kw)
    np.testing.assert_allclose(loss, ce_loss, rtol=1e-6)
    np.testing.assert_allclose(kd, kd_loss, rtol=1e-6)
    for m in (metrics, kd_metrics):
        np.testing.assert_allclose(m["accuracy"], 0.4, rtol=1e-6)
        assert float(m["num_tokens"]) == 5.0


def test_block_loss_metrics_golden():
    logits, labels, mask, _ = golden_case()
    _, m = block_loss(logits, labels, mask, spec=LossSpec(objective="decay", gamma=0.0))
    # slot 1: 2 tokens, 1 correct; slot 2: 2 tokens, 1 correct; slot 3: 1 token, 0 correct.
    np.testing.assert_allclose(m["position_accuracy"], [0.0, 0.5, 0.5, 0.0])
    np.testing.assert_allclose(m["simulated_tau"], 1 + 0.5 + 0.25 + 0.0)
    np.testing.assert_allclose(m["position_weight_mean"], [0.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(m["weight_sum"], 5.0, rtol=1e-6)
    _, m = block_loss(logits, labels, mask, spec=LossSpec(objective="decay", gamma=4.0))
    np.testing.assert_allclose(m["position_weight_mean"], [0.0, 1.0, np.exp(-0.25), np.exp(-0.5)], rtol=1e-6)
    assert set(m) == {
        "accuracy",
        "position_accuracy",
        "weight_sum",
        "simulated_tau",
        "accept_length",
        "num_tokens",
        "position_weight_mean",
    }
    # block 0: slot 1 correct, slot 2 wrong -> run 1; block 1: slot 1 wrong -> run 0; mean 1 + 0.5
    np.testing.assert_allclose(m["accept_length"], 1.5)


def random_blocks(key, b=2, n=3, bs=4, v=11, mask_p=0.7):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    logits = 2.0 * jax.random.normal(k1, (b, n, bs, v))
    labels = jax.random.randint(k2, (b, n, bs), 0, v)
    mask = (jax.random.uniform(k3, (b, n, bs)) < mask_p).astype(jnp.float32).at[..., 0].set(0.0)
    teacher = 2.0 * jax.random.normal(k4, (b, n, bs, v))
    return logits, labels, mask, teacher


class DpaceWeightsVariantsTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_dpace_weights_variants(self):
        conf = jax.random.uniform(jax.random.key(1), (2, 3, 7))
        valid = (jax.random.uniform(jax.random.key(2), (2, 3, 7)) < 0.6).astype(jnp.float32)
        got = self.variant(lambda c, m: dpace_weights(c, 0.3, m))(conf, valid)
        want = np.stack([naive_dpace(c, 0.3, m) for c, m in zip(np.reshape(conf, (6, 7)), np.reshape(valid, (6, 7)))])
        np.testing.assert_allclose(np.reshape(got, (6, 7)), want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# block_loss properties
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kd", [False, True])
def test_padded_blocks_change_nothing(kd):
    logits, labels, mask, teacher = random_blocks(jax.random.key(5))
    pad = lambda x, v: jnp.concatenate([x, jnp.full((x.shape[0], 2) + x.shape[2:], v, x.dtype)], axis=1)  # noqa: E731
    kw = dict(spec=LossSpec(objective="dpace", alpha=0.4))
    loss, m = block_loss(logits, labels, mask, teacher_logits=teacher if kd else None, **kw)
    loss_p, m_p = block_loss(
        pad(logits, 3.0), pad(labels, 1), pad(mask, 0.0), teacher_logits=pad(teacher, -1.0) if kd else None, **kw
    )
    chex.assert_trees_all_close((loss, m), (loss_p, m_p), rtol=1e-6)


def test_weighted_mean_by_hand():
    logits, labels, mask, _ = random_blocks(jax.random.key(7))
    loss, _ = block_loss(logits, labels, mask, spec=LossSpec(objective="decay", gamma=2.0))
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    w = mask * decay_weights(4, 2.0)
    np.testing.assert_allclose(loss, jnp.sum(w * ce) / (jnp.sum(w) + 1e-6), rtol=1e-6)


def test_dpace_loss_weights_use_data_token_confidence_in_kd():
    """KD mode: D-PACE confidences are exp(-hard CE vs labels), not the teacher's soft CE."""
    logits, labels, mask, teacher = random_blocks(jax.random.key(8))
    _, m_kd = block_loss(logits, labels, mask, teacher_logits=teacher)
    _, m_ce = block_loss(logits, labels, mask)
    np.testing.assert_allclose(m_kd["position_weight_mean"], m_ce["position_weight_mean"], rtol=1e-6)
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(m_ce["weight_sum"], jnp.sum(position_weights(ce, mask, "dpace", 0.5, 0.0)), rtol=1e-6)


@pytest.mark.parametrize("objective", ["dpace", "decay"])
@pytest.mark.parametrize("kd", [False, True])
def test_no_valid_slot_gives_zero_loss_and_finite_grads(objective, kd):
    logits, labels, mask, teacher = random_blocks(jax.random.key(9))
    zero = jnp.zeros_like(mask)
    spec = LossSpec(objective=objective)
    f = lambda x: block_loss(x, labels, zero, spec, teacher_logits=teacher if kd else None)  # noqa: E731
    (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logits)
    assert float(loss) == 0.0 and float(metrics["accuracy"]) == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_single_token_weight_sum_at_most_one_gives_zero():
    logits, labels, _, _ = random_blocks(jax.random.key(10))
    mask = jnp.zeros(labels.shape).at[0, 0, 1].set(1.0)
    assert float(block_loss(logits, labels, mask)[0]) == 0.0  # D-PACE: w = q~ < 1, so den = w + 1e-6 <= 1
    assert (
        float(block_loss(logits, labels, mask, spec=LossSpec(objective="decay"))[0]) > 0.0
    )  # W = 1: den = 1 + 1e-6 > 1


def test_grad_flows_only_through_token_loss():
    """d loss / d logits equals the gradient of sum(W_detached * CE) / den with W held fixed."""
    logits, labels, mask, _ = random_blocks(jax.random.key(11))
    grad = jax.grad(lambda x: block_loss(x, labels, mask)[0])(logits)
    ce_fn = lambda x: jax.nn.logsumexp(x, -1) - jnp.take_along_axis(x, labels[..., None], -1)[..., 0]  # noqa
    w = position_weights(ce_fn(logits), mask, "dpace", 0.5, 0.0)
    want = jax.grad(lambda x: jnp.sum(w * ce_fn(x)) / (jnp.sum(w) + 1e-6))(logits)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_block_size_one():
    logits, labels, _, _ = random_blocks(jax.random.key(12), bs=1)
    loss, m = block_loss(logits, labels, jnp.zeros(labels.shape))
    assert float(loss) == 0.0 and m["position_accuracy"].shape == (1,) and float(m["simulated_tau"]) == 1.0


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_bad_inputs():
    logits, labels, mask, teacher = random_blocks(jax.random.key(13))
    with pytest.raises(ValueError, match="alpha"):
        block_loss(logits, labels, mask, spec=LossSpec(alpha=-0.1))
    with pytest.raises(ValueError, match="alpha"):
        jax.jit(lambda x: block_loss(x, labels, mask, spec=LossSpec(alpha=2.0)))(logits)
    with pytest.raises(ValueError, match="labels"):
        block_loss(logits, labels[:, :2], mask)
    with pytest.raises(ValueError, match="labels"):
        block_loss(logits, labels.astype(jnp.float32), mask)
    with pytest.raises(ValueError, match="labels"):
        block_loss(logits, labels + 100, mask)
    with pytest.raises(ValueError, match="mask"):
        block_loss(logits, labels, mask[..., None])
    with pytest.raises(ValueError, match="mask"):
        block_loss(logits, labels, mask.at[0, 0, 0].set(1.0))
    with pytest.raises(ValueError, match="logits"):
        block_loss(logits[..., :0, :], labels[..., :0], mask[..., :0])
    with pytest.raises(ValueError, match="logits"):
        block_loss(logits[0], labels[0], mask[0])
    with pytest.raises(ValueError, match="teacher_logits"):
        block_loss(logits, labels, mask, teacher_logits=teacher[..., :5])
    with pytest.raises(ValueError, match="objective"):
        block_loss(logits, labels, mask, spec=LossSpec(objective="kl"))
    with pytest.raises(ValueError, match="per_token"):
        block_loss(logits, labels, mask, spec=LossSpec(per_token="kl"))  # needs a teacher
    with pytest.raises(ValueError, match="per_token"):
        block_loss(logits, labels, mask, teacher_logits=teacher, spec=LossSpec(per_token="ce"))
    with pytest.raises(ValueError, match="normalization"):
        block_loss(logits, labels, mask, spec=LossSpec(normalization="mean"))
    with pytest.raises(ValueError, match="confidence"):
        block_loss(logits, labels, mask, spec=LossSpec(confidence="teacher"))


def test_alpha_gamma_changes_do_not_recompile():
    """alpha/gamma are run-time values of the compiled loss: new values reuse the compiled programs (the jit cache
    of the dense and the fused path gains no entry) and still change the loss."""
    logits, labels, mask, _ = random_blocks(jax.random.key(15))
    hidden, lm_head, h_labels, h_mask, _ = hidden_case(jax.random.key(16))
    dense, fused = losses._block_loss, losses._block_partials_from_hidden
    values = []
    for alpha, gamma in ((0.3, 1.0), (0.7, 2.0)):
        for objective in ("dpace", "decay"):
            spec = LossSpec(objective=objective, alpha=alpha, gamma=gamma)
            values.append(float(block_loss(logits, labels, mask, spec)[0]))
            block_loss_from_hidden(hidden, lm_head, h_labels, h_mask, spec, chunk_blocks=2)
        if alpha == 0.3:
            sizes = dense._cache_size(), fused._cache_size()
    assert (dense._cache_size(), fused._cache_size()) == sizes
    assert values[0] != values[2] and values[1] != values[3]


def test_loss_spec_from_config():
    """from_config copies the loss section and takes the logit transform from the draft config."""
    section = config_lib.LossSection(objective="decay", alpha=0.3, gamma=2.0, per_token="kl", temperature=2.0)
    draft = types.SimpleNamespace(output_multiplier=0.5, final_logit_softcapping=30.0)
    assert LossSpec.from_config(section, draft) == LossSpec(
        objective="decay",
        alpha=0.3,
        gamma=2.0,
        per_token="kl",
        normalization="modelopt",
        confidence="data",
        temperature=2.0,
        logit_scale=0.5,
        softcap=30.0,
    )
    with pytest.raises(ValueError, match="softcap"):
        LossSpec.from_config(section, types.SimpleNamespace(output_multiplier=None, final_logit_softcapping=0.0))


def test_traced_slot0_mask_is_ignored():
    """Under jit the slot-0 check cannot run; slot 0 then carries no weight (reference's (k > 0) factor)."""
    logits, labels, mask, _ = random_blocks(jax.random.key(14))
    f = jax.jit(lambda m: block_loss(logits, labels, m))
    chex.assert_trees_all_close(f(mask.at[..., 0].set(1.0)), f(mask))


# ---------------------------------------------------------------------------------------------------------
# Chunked-vocabulary loss
# ---------------------------------------------------------------------------------------------------------


def hidden_case(key, b=2, n=5, bs=4, h=8, v=23):
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    hidden = jax.random.normal(k1, (b, n, bs, h))
    lm_head = 0.7 * jax.random.normal(k2, (v, h))
    labels = jax.random.randint(k3, (b, n, bs), 0, v)
    mask = (jax.random.uniform(k4, (b, n, bs)) < 0.8).astype(jnp.float32).at[..., 0].set(0.0)
    teacher_hidden = jax.random.normal(k5, (b, n, bs, h))
    return hidden, lm_head, labels, mask, teacher_hidden


@pytest.mark.parametrize("objective", ["dpace", "decay"])
@pytest.mark.parametrize("kd", [False, True])
@pytest.mark.parametrize("chunk", [2, 5, 64])
def test_chunked_matches_full(objective, kd, chunk):
    hidden, lm_head, labels, mask, teacher_hidden = hidden_case(jax.random.key(20))
    th = teacher_hidden if kd else None
    kw = dict(spec=LossSpec(objective=objective, alpha=0.4, gamma=3.0))

    def full(hd, w):
        teacher = None if th is None else th @ w.T
        return block_loss(hd @ w.T, labels, mask, teacher_logits=teacher, **kw)

    def chunked(hd, w):
        return block_loss_from_hidden(hd, w, labels, mask, teacher_hidden=th, chunk_blocks=chunk, **kw)

    (loss, m), g = jax.jit(jax.value_and_grad(full, argnums=(0, 1), has_aux=True))(hidden, lm_head)
    (loss_c, m_c), g_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(hidden, lm_head)
    np.testing.assert_allclose(loss_c, loss, rtol=1e-6)
    chex.assert_trees_all_close(m_c, m, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_chunked_bf16_compute_dtype_close():
    hidden, lm_head, labels, mask, _ = hidden_case(jax.random.key(21))
    loss, _ = block_loss_from_hidden(hidden, lm_head, labels, mask, chunk_blocks=2)
    loss16, _ = block_loss_from_hidden(hidden, lm_head, labels, mask, chunk_blocks=2, compute_dtype=jnp.bfloat16)
    np.testing.assert_allclose(loss16, loss, rtol=2e-2)
    assert float(loss16) != float(loss)


def test_chunked_bad_inputs():
    hidden, lm_head, labels, mask, teacher_hidden = hidden_case(jax.random.key(22))
    with pytest.raises(ValueError, match="lm_head"):
        block_loss_from_hidden(hidden, lm_head[:, :3], labels, mask)
    with pytest.raises(ValueError, match="chunk_blocks"):
        block_loss_from_hidden(hidden, lm_head, labels, mask, chunk_blocks=0)
    with pytest.raises(ValueError, match="teacher_hidden"):
        block_loss_from_hidden(hidden, lm_head, labels, mask, teacher_hidden=teacher_hidden[:1])
    with pytest.raises(ValueError, match="labels"):
        block_loss_from_hidden(hidden, lm_head, labels[..., :2], mask)


def test_is_argmax_equals_argmax_with_ties():
    """``is_argmax`` (max + gather, exact argmax only when a row ties) against ``jnp.argmax`` (first maximum)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 33)).astype(np.float32)
    x[0, 0] = 0.0  # all slots tie
    x[0, 1, [3, 9]] = 10.0  # tie: the label at the second maximum is not the argmax
    x[0, 2, [3, 9]] = 10.0  # tie: the label at the first maximum is
    x[0, 3] = -np.inf
    x[0, 3, 7] = 1.0
    labels = rng.integers(0, 33, (6, 5))
    labels[0, :4] = (4, 9, 3, 7)
    labels[1:, 0] = np.argmax(x[1:, 0], -1)  # some hits without ties
    for xs, ys in ((x, labels), (x[1:], labels[1:])):  # with and without a tie in the batch
        got = np.asarray(losses.is_argmax(jnp.asarray(xs), jnp.asarray(ys)))
        np.testing.assert_array_equal(got, np.argmax(xs, -1) == ys)
    assert got.any() and not got.all()


def test_kd_analytic_gradient_is_softmax_minus_teacher():
    """The soft-CE tangent rule: d kd / d logits = softmax(logits) - softmax(teacher) (teacher detached)."""
    rng = np.random.default_rng(1)
    x, t = (jnp.asarray(rng.standard_normal((3, 4, 50)) * 3, jnp.float32) for _ in range(2))
    y = jnp.zeros((3, 4), jnp.int32)
    g_x, g_t = jax.grad(lambda a, b: jnp.sum(losses.kd_loss(a, y, b)), argnums=(0, 1))(x, t)
    want = np.exp(np.asarray(jax.nn.log_softmax(x))) - np.exp(np.asarray(jax.nn.log_softmax(t)))
    np.testing.assert_allclose(np.asarray(g_x), want, atol=1e-6 * np.abs(want).max())
    assert not np.asarray(g_t).any()
