"""The composable loss pieces (issue 19) and the fused linear cross-entropy (issue 20): every weighting, per-token
loss and normalisation against a direct float64 numpy / dense jax formulation written here from the sources'
formulas (docs/losses.md), the fused path's values and gradients against the dense path, the accumulation contract,
the user-function API (the README example) and the vocabulary-matmul count of the compiled gradient."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as tf
from dflash_jax import losses
from dflash_jax.losses import LossSpec, block_loss, block_loss_from_hidden, block_partials_from_hidden, reduce_partials

B, N, BS, H, V = 2, 5, 4, 8, 23


def case(seed=0, b=B, n=N):
    """hidden, lm_head, labels, mask (slot 0 zero, ~20 % masked), teacher_hidden."""
    k = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(k[0], (b, n, BS, H))
    lm_head = 0.7 * jax.random.normal(k[1], (V, H))
    labels = jax.random.randint(k[2], (b, n, BS), 0, V)
    mask = (jax.random.uniform(k[3], (b, n, BS)) < 0.8).astype(jnp.float32).at[..., 0].set(0.0)
    return hidden, lm_head, labels, mask, jax.random.normal(k[4], (b, n, BS, H))


# ---------------------------------------------------------------------------------------------------------
# Direct formulations (float64 numpy), transcribed from the sources' formulas
# ---------------------------------------------------------------------------------------------------------


def np_log_softmax(x):
    x = np.asarray(x, np.float64)
    s = x - x.max(-1, keepdims=True)
    return s - np.log(np.exp(s).sum(-1, keepdims=True))


def np_per_token(name, x, y, t):
    logq = np_log_softmax(x)
    if name == "ce":
        return -np.take_along_axis(logq, np.asarray(y)[..., None], -1)[..., 0]
    logp = np_log_softmax(t)
    p, q = np.exp(logp), np.exp(logq)
    m = 0.5 * (p + q)
    return {
        "kd": -(p * logq).sum(-1),
        "kl": (p * (logp - logq)).sum(-1),
        "reverse_kl": (q * (logq - logp)).sum(-1),
        "js": 0.5 * (p * (logp - np.log(m))).sum(-1) + 0.5 * (q * (logq - np.log(m))).sum(-1),
        "tv": 1.0 - np.minimum(p, q).sum(-1),
    }[name]


def np_weights(name, conf, mask, alpha=0.5, gamma=0.0):
    """SpecForge ``_dpace_weight`` / ModelOpt Eq. 7-8 by loops: smooth = alpha + (1-alpha) q (1 where invalid),
    prefix = cumprod, suffix_j = sum_{l>=j} prefix_l mask_l; W = mask * {suffix, prefix, suffix / prefix}."""
    conf, mask = np.asarray(conf, np.float64), np.asarray(mask, np.float64)
    out = np.zeros_like(conf)
    for idx in np.ndindex(conf.shape[:-1]):
        q, m = conf[idx], mask[idx]
        smooth = np.where(m > 0, alpha + (1 - alpha) * q, 1.0)
        prefix = np.array([np.prod(smooth[: j + 1]) for j in range(len(q))])
        suffix = np.array([sum(prefix[i] * m[i] for i in range(j, len(q))) for j in range(len(q))])
        k = np.maximum(np.arange(len(q)) - 1.0, 0.0)
        out[idx] = (
            m
            * {
                "dpace": suffix,
                "dpace_cumulative": prefix,
                "dpace_continuation": suffix / np.maximum(prefix, np.finfo(np.float32).tiny),
                "decay": np.exp(-k / gamma) if gamma > 0 else np.ones(len(q)),
                "uniform": np.ones(len(q)),
            }[name]
        )
    return out


def np_loss(
    logits,
    labels,
    mask,
    teacher,
    *,
    objective="dpace",
    per_token="ce",
    normalization="modelopt",
    confidence="data",
    alpha=0.5,
    gamma=0.0,
):
    """Loss, weights and per-token losses: ModelOpt sum(W l) / (sum W + 1e-6) with loss 0 when that is <= 1;
    SpecForge D-PACE sum(W l) / B; speculators sum(W l) / (sum mask + 1e-5)."""
    lt = np_per_token(per_token, logits, labels, teacher)
    ce = np_per_token("ce", logits, labels, None)
    w = np_weights(objective, np.exp(-(ce if confidence == "data" else lt)), mask, alpha, gamma)
    num = (w * lt).sum()
    if normalization == "modelopt":
        den = w.sum() + 1e-6
        return (num / den if den > 1 else 0.0), w, lt
    return num / (logits.shape[0] if normalization == "batch" else np.sum(mask) + 1e-5), w, lt


# ---------------------------------------------------------------------------------------------------------
# Weightings
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", losses.OBJECTIVES)
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_weightings_match_the_source_formulas(name, alpha):
    rng = np.random.default_rng(1)
    conf = rng.uniform(0, 1, (3, 2, 6)).astype(np.float32)
    mask = (rng.random((3, 2, 6)) < 0.7).astype(np.float32)
    mask[..., 0] = 0
    got = losses.make_weighting(name, alpha, 3.0)(jnp.asarray(conf), jnp.asarray(mask))
    np.testing.assert_allclose(got, np_weights(name, conf, mask, alpha, 3.0), rtol=2e-6, atol=1e-7)


def test_dpace_weighting_is_modelopt_dpace_weights():
    """The D-PACE weighting on all slots with slot 0 masked equals ModelOpt's W = mask * [1, w(q[1:], mask[1:])]
    (to float32 rounding: XLA may associate the length-bs and length-(bs-1) prefix sums differently)."""
    rng = np.random.default_rng(2)
    conf = jnp.asarray(rng.uniform(0, 1, (4, 8)), jnp.float32)
    mask = jnp.asarray(rng.random((4, 8)) < 0.7, jnp.float32).at[:, 0].set(0.0)
    want = mask * jnp.concatenate([jnp.ones((4, 1)), losses.dpace_weights(conf[:, 1:], 0.4, mask[:, 1:])], -1)
    np.testing.assert_allclose(losses.dpace(0.4)(conf, mask), want, rtol=4e-7, atol=0)


def test_alpha_zero_underflow():
    """alpha = 0 (SpecForge's range): raw confidences; an exact 0 confidence zeroes every later cumulative product.
    The continuation value there is SpecForge's suffix / max(prefix, tiny) = 0 / tiny = 0. Never NaN or inf."""
    conf = jnp.array([[0.0, 0.9, 0.0, 0.5, 0.8]])
    mask = jnp.array([[0.0, 1.0, 1.0, 1.0, 1.0]])
    for name in losses.DPACE_OBJECTIVES:
        w = np.asarray(losses.make_weighting(name, 0.0)(conf, mask))
        assert np.all(np.isfinite(w)), name
        np.testing.assert_allclose(w, np_weights(name, conf, mask, 0.0), rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(w[0, 2:], 0.0)  # everything from the zero confidence on
    np.testing.assert_allclose(losses.dpace_continuation(0.0)(conf, mask)[0, 1], 1.0)  # 0.9 / 0.9
    x, lm, y, m, _ = case(3)
    lo, g = jax.value_and_grad(lambda h: block_loss_from_hidden(h, lm * 40.0, y, m, spec=LossSpec(alpha=0.0))[0])(x)
    assert np.isfinite(float(lo)) and np.all(np.isfinite(g))


def test_alpha_range():
    with pytest.raises(ValueError, match="alpha"):
        losses.dpace_weights(jnp.ones(3), 0.0)  # ModelOpt's function keeps ModelOpt's (0, 1]
    for name in losses.DPACE_OBJECTIVES:
        with pytest.raises(ValueError, match="alpha"):
            losses.make_weighting(name, 1.5)
        with pytest.raises(ValueError, match="alpha"):
            losses.make_weighting(name, -0.1)


# ---------------------------------------------------------------------------------------------------------
# Per-token losses, confidence source, normalisations: dense and fused against the direct formulation
# ---------------------------------------------------------------------------------------------------------

VARIANTS = [  # (per_token, objective, normalization, confidence)
    ("ce", "dpace", "modelopt", "data"),
    ("kd", "dpace", "modelopt", "data"),
    ("kl", "dpace_cumulative", "batch", "data"),
    ("reverse_kl", "dpace_continuation", "tokens", "data"),
    ("js", "decay", "tokens", "data"),
    ("tv", "uniform", "batch", "data"),
    ("ce", "dpace", "tokens", "loss"),
    ("kd", "dpace", "batch", "loss"),
]


@pytest.mark.parametrize("per_token,objective,normalization,confidence", VARIANTS)
def test_variant_values_and_gradients(per_token, objective, normalization, confidence):
    """Loss of the dense (``block_loss``) and fused (``block_loss_from_hidden``, 2 blocks per chunk: one padding
    chunk) paths equals the float64 formulation; both gradients w.r.t. the hidden states equal ``jax.grad`` of a
    dense formulation written here with the weights as constants (they are detached)."""
    hidden, lm_head, labels, mask, th = case(4)
    teacher = None if per_token == "ce" else th
    kw = dict(
        objective=objective,
        per_token=per_token,
        normalization=normalization,
        confidence=confidence,
        alpha=0.4,
        gamma=3.0,
    )
    logits = np.asarray(hidden @ lm_head.T, np.float64)
    t_logits = None if teacher is None else np.asarray(teacher @ lm_head.T, np.float64)
    want, w, _ = np_loss(logits, labels, mask, t_logits, **kw)

    def dense(h):  # independent jax formulation, weights fixed
        x = h @ lm_head.T
        logq = jax.nn.log_softmax(x, -1)
        if per_token == "ce":
            lt = -jnp.take_along_axis(logq, labels[..., None], -1)[..., 0]
        else:
            logp = jax.nn.log_softmax(teacher @ lm_head.T, -1)
            p, q = jnp.exp(logp), jnp.exp(logq)
            lt = {
                "kd": -jnp.sum(p * logq, -1),
                "kl": jnp.sum(p * (logp - logq), -1),
                "reverse_kl": jnp.sum(q * (logq - logp), -1),
                "js": 0.5 * jnp.sum(p * (logp - jnp.log((p + q) / 2)) + q * (logq - jnp.log((p + q) / 2)), -1),
                "tv": 1 - jnp.sum(jnp.minimum(p, q), -1),
            }[per_token]
        den = {"modelopt": w.sum() + 1e-6, "batch": B, "tokens": float(np.sum(mask)) + 1e-5}[normalization]
        return jnp.sum(jnp.asarray(w, jnp.float32) * lt) / den

    g_want = jax.grad(dense)(hidden)
    (lo_d, _), g_d = jax.value_and_grad(
        lambda h: block_loss(
            h @ lm_head.T, labels, mask, LossSpec(**kw), teacher_logits=None if teacher is None else teacher @ lm_head.T
        ),
        has_aux=True,
    )(hidden)
    (lo_f, _), g_f = jax.value_and_grad(
        lambda h: block_loss_from_hidden(
            h, lm_head, labels, mask, LossSpec(**kw), teacher_hidden=teacher, chunk_blocks=2
        ),
        has_aux=True,
    )(hidden)
    for lo, g in ((lo_d, g_d), (lo_f, g_f)):
        np.testing.assert_allclose(lo, want, rtol=2e-6)
        scale = float(jnp.max(jnp.abs(g_want)))
        np.testing.assert_allclose(g, g_want, rtol=1e-5, atol=1e-5 * scale)


def test_speculators_tokens_and_specforge_batch_have_no_zero_loss_rule():
    """One trainable token: ModelOpt's loss is 0 (sum W <= 1), SpecForge's / B and speculators' / (1 + 1e-5) not."""
    hidden, lm_head, labels, _, _ = case(5)
    mask = jnp.zeros((B, N, BS)).at[0, 0, 1].set(1.0)
    ce = float(np_per_token("ce", np.asarray(hidden @ lm_head.T), labels, None)[0, 0, 1])
    q = np.exp(-ce)
    for norm, want in (
        ("modelopt", 0.0),
        ("batch", (0.5 + 0.5 * q) * ce / B),
        ("tokens", (0.5 + 0.5 * q) * ce / 1.00001),
    ):
        lo, g = jax.value_and_grad(
            lambda h: block_loss_from_hidden(h, lm_head, labels, mask, spec=LossSpec(normalization=norm))[0]
        )(hidden)
        np.testing.assert_allclose(lo, want, rtol=2e-6, err_msg=norm)
        assert (float(jnp.max(jnp.abs(g))) == 0.0) == (norm == "modelopt"), norm


def test_zero_loss_rule_gives_exactly_zero_fused_gradient():
    hidden, lm_head, labels, mask, th = case(6)
    for teacher in (None, th):
        lo, (gh, gw) = jax.value_and_grad(
            lambda h, w: block_loss_from_hidden(h, w, labels, mask * 0.0, teacher_hidden=teacher)[0], argnums=(0, 1)
        )(hidden, lm_head)
        assert float(lo) == 0.0 and not np.any(np.asarray(gh)) and not np.any(np.asarray(gw))


@pytest.mark.parametrize("chunk", [1, 3, 5])
def test_fused_equals_dense_with_trainable_lm_head(chunk):
    """Gradients w.r.t. ``lm_head`` too (computed in the forward pass only when it is differentiated)."""
    hidden, lm_head, labels, mask, th = case(7)
    kw = dict(spec=LossSpec(per_token="js", objective="dpace", normalization="tokens"))

    def dense(h, w):
        return block_loss(h @ w.T, labels, mask, teacher_logits=th @ w.T, **kw)[0]

    def fused(h, w):
        return block_loss_from_hidden(h, w, labels, mask, teacher_hidden=th, chunk_blocks=chunk, **kw)[0]

    (ld, gd), (lf, gf) = [jax.value_and_grad(f, argnums=(0, 1))(hidden, lm_head) for f in (dense, fused)]
    np.testing.assert_allclose(lf, ld, rtol=1e-6)
    for a, b in zip(gf, gd):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(jnp.max(jnp.abs(b))))


def test_bf16_fused_gradient_within_bf16_tolerance():
    hidden, lm_head, labels, mask, th = case(8)

    def f(dt):
        return jax.grad(
            lambda h: block_loss_from_hidden(
                h, lm_head, labels, mask, teacher_hidden=th, chunk_blocks=2, compute_dtype=dt
            )[0]
        )(hidden)

    g32, g16 = f(jnp.float32), f(jnp.bfloat16)
    assert float(jnp.linalg.norm(g16 - g32) / jnp.linalg.norm(g32)) < 2e-2


# ---------------------------------------------------------------------------------------------------------
# Accumulation contract, user functions, matmul count
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", losses.NORMALIZATIONS)
def test_micro_batch_partials_sum_to_the_batch(normalization):
    """Two micro-batches: summed partials and summed gradients of ``weighted_loss`` divided once by the summed
    partials' denominator equal the whole batch's loss and gradient (the gradient-accumulation contract)."""
    hidden, lm_head, labels, mask, th = case(9)
    kw = dict(spec=LossSpec(normalization=normalization), chunk_blocks=2)

    def parts(h, sl):
        return block_partials_from_hidden(h, lm_head, labels[sl], mask[sl], **kw)

    total, grads = None, []
    for sl in (slice(0, 1), slice(1, 2)):
        p, vjp = jax.vjp(lambda h: parts(h, sl), hidden[sl])
        ct = jax.tree.map(jnp.zeros_like, p) | {"weighted_loss": jnp.ones(())}
        grads.append(vjp(ct)[0])
        total = p if total is None else jax.tree.map(jnp.add, total, p)
    den, active = losses.normalizer(total, normalization)
    loss, _ = reduce_partials(total, normalization)
    (want, _), g_want = jax.value_and_grad(
        lambda h: block_loss_from_hidden(h, lm_head, labels, mask, **kw), has_aux=True
    )(hidden)
    np.testing.assert_allclose(loss, want, rtol=1e-6)
    np.testing.assert_allclose(jnp.concatenate(grads) / den * active, g_want, rtol=1e-5, atol=1e-8)


def floored_dpace(confidence, mask):
    """README example: D-PACE whose weights never fall below 0.25 on trainable tokens."""
    return mask * jnp.maximum(losses.dpace(0.5)(confidence, mask), 0.25)


def test_readme_composition_example_runs():
    """The README's "Composing your own loss" block, executed as written (it asserts its by-hand computation)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md"), encoding="utf-8").read()
    section = readme.split("### Composing your own loss", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    w = np.asarray(scope["w"])
    assert np.any((w == 0.25) & (np.asarray(scope["mask"]) > 0)) and np.any(w > 0.25)  # the floor is active


def test_readme_user_weighting_example():
    hidden, lm_head, labels, mask, _ = case(10)
    loss, _ = block_loss_from_hidden(hidden, lm_head, labels, mask, spec=LossSpec(objective=floored_dpace))
    logits = np.asarray(hidden @ lm_head.T, np.float64)
    ce = np_per_token("ce", logits, labels, None)
    w = np.asarray(mask) * np.maximum(np_weights("dpace", np.exp(-ce), mask), 0.25)
    np.testing.assert_allclose(loss, (w * ce).sum() / (w.sum() + 1e-6), rtol=2e-6)
    assert np.any((w == 0.25) & (np.asarray(mask) > 0))  # the floor is active


def test_user_per_token_loss_and_step_without_editing_it():
    """A plain per-token function (here: CE with label smoothing 0.1) flows through block_loss and the train step."""

    def smoothed_ce(logits, labels, teacher_logits):
        logq = jax.nn.log_softmax(logits, -1)
        return -(0.9 * jnp.take_along_axis(logq, labels[..., None], -1)[..., 0] + 0.1 * jnp.mean(logq, -1))

    hidden, lm_head, labels, mask, _ = case(11)
    loss, _ = block_loss(hidden @ lm_head.T, labels, mask, spec=LossSpec(per_token=smoothed_ce, objective="uniform"))
    logq = np_log_softmax(np.asarray(hidden @ lm_head.T, np.float64))
    lt = -(0.9 * np.take_along_axis(logq, np.asarray(labels)[..., None], -1)[..., 0] + 0.1 * logq.mean(-1))
    np.testing.assert_allclose(loss, (np.asarray(mask) * lt).sum() / (np.sum(mask) + 1e-6), rtol=2e-6)
    ts, state, _ = tf.build((1, 1, 1), per_token=smoothed_ce, objective=floored_dpace, normalization="tokens")
    _, m = ts(state, tf.batch(), jax.random.key(0))
    assert np.isfinite(float(m["loss"])) and float(m["loss"]) > 0 and 1.0 <= float(m["accept_length"]) <= tf.BS


@pytest.mark.parametrize("kd", [False, True])
def test_fused_gradient_does_the_predicted_vocabulary_matmuls(kd):
    """XLA's FLOP count of the compiled gradient w.r.t. the hidden states (frozen lm_head): 2 vocabulary matmuls
    (forward + gradient) in CE mode, 3 with a teacher; the rest of the loss is O(Q V), small against Q H V.
    One chunk: XLA's cost analysis counts a loop body once, whatever its trip count."""
    b, n, bs, h, v = 1, 8, 4, 256, 2048
    hidden, lm_head = jnp.ones((b, n, bs, h)), jnp.ones((v, h))
    labels, mask = jnp.zeros((b, n, bs), jnp.int32), jnp.ones((b, n, bs)).at[..., 0].set(0.0)
    teacher = hidden if kd else None
    grad = jax.jit(
        jax.grad(lambda x, w: block_loss_from_hidden(x, w, labels, mask, teacher_hidden=teacher, chunk_blocks=n)[0])
    )
    flops = grad.lower(hidden, lm_head).compile().cost_analysis()["flops"]
    matmul = 2 * b * n * bs * h * v
    assert (2 + kd) * matmul <= flops < (2.25 + kd) * matmul, flops / matmul


# SpecForge's own D-PACE test inputs (sgl-project/SpecForge a6b6b023, tests/test_utils/test_dflash_losses.py,
# ``_sample_tensors``): B=2 rows, N=2 blocks, bs=5, V=13; logits ``randn`` with torch seed 123 in float64; anchors
# (0, 3) and (1, 4), block (1, 1) dropped; data tokens at anchor + k; loss mask 0 at position 7 (row 0) and 6 (row 1).
_SF_LABELS = np.array([[[1, 4, 2, 8, 3], [8, 3, 7, 5, 6]], [[5, 1, 4, 7, 3], [7, 3, 8, 10, 11]]])
_SF_MASK = np.array([[[0, 1, 1, 1, 1], [0, 1, 1, 1, 0]], [[0, 1, 1, 1, 1], [0, 0, 0, 0, 0]]], np.float32)


@pytest.mark.parametrize(
    "objective, normalization, want",
    [
        ("dpace", "batch", 8.3144),
        ("dpace", "modelopt", 3.2536),
        ("dpace_cumulative", "batch", 4.8276),
        ("dpace_cumulative", "modelopt", 3.2449),
        ("dpace_continuation", "batch", 27.4839),
        ("dpace_continuation", "modelopt", 3.2605),
    ],
)
def test_specforge_dpace_test_inputs(objective, normalization, want):
    """SpecForge's D-PACE family (``_dpace_weight`` in specforge/algorithms/common/dflash_family_model.py, loss
    ``sum W*mask*CE / B``) on SpecForge's test inputs, alpha 0.5. SpecForge's tests compare to their naive formula
    rather than printing values; ``want`` is that formula evaluated in float64 (``batch``) and the same numerator
    over ``sum W*mask + 1e-6`` (``modelopt``), rounded to 4 decimals. Tolerance: half the last digit plus float32."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(123)
    logits = torch.randn(2, 2, 5, 13, dtype=torch.float64).numpy()
    loss, _ = block_loss(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(_SF_LABELS),
        jnp.asarray(_SF_MASK),
        spec=LossSpec(objective=objective, alpha=0.5, normalization=normalization),
    )
    assert float(loss) == pytest.approx(want, abs=5e-5 + 1e-6 * want)
