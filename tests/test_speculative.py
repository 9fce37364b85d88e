"""Speculative decoding: lossless (greedy, token-identical), distribution-exact (sampling), metrics, bad input."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats

from decode_oracle import greedy_reference
from dflash_jax import generate
from dflash_jax.eval import report, speculative
from dflash_jax.models import layers
from dflash_jax.models.draft import DFlashDraft, DraftConfig
from dflash_jax.models.target import TargetConfig
from dflash_jax.models.target_io import random_target

BS = 4
MAX_NEW = 24
# DFlash2 with a selector scoring 3 candidates (of 8 tokens in the sampling test: q is zero off them).
SMALL_DFLASH2 = dict(variant="dflash2", conv_group_size=8, selector_rank=4, selector_top_k=3)


def _target_cfg(**kw):
    base = dict(
        arch="qwen3",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        qk_norm=True,
    )
    return TargetConfig(**{**base, **kw})


def _draft(cfg: DraftConfig, seed: int = 1) -> DFlashDraft:
    with layers.unsharded_init():
        return DFlashDraft(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def target():
    return random_target(_target_cfg(), seed=0)


@pytest.fixture(scope="module")
def draft_cfg():
    return DraftConfig.from_target(
        32,
        64,
        4,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        block_size=BS,
        rope_theta=1e4,
    )


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(1, 64, n).astype(np.int32) for n in (5, 7, 12)]  # buckets 8, 8, 16


def _check_metrics(r, prompts):
    assert r["num_prompts"] == len(prompts)
    assert sum(r["acceptance_histogram"]) == r["num_steps"] > 0
    assert 1.0 <= r["tau"] <= BS
    assert r["tau"] == pytest.approx(sum((k + 1) * c for k, c in enumerate(r["acceptance_histogram"])) / r["num_steps"])
    assert len(r["per_position_acceptance"]) == BS - 1
    assert all(a >= b for a, b in zip(r["per_position_acceptance"], r["per_position_acceptance"][1:]))
    assert r["speedup"] == pytest.approx(r["tokens_per_s_spec"] / r["tokens_per_s_plain"])
    for p in r["per_prompt"]:  # first token from the prefill, then a + 1 per verify step, cut at max_new_tokens
        assert p["new_tokens"] == min(MAX_NEW, 1 + sum(a + 1 for a in p["accepted"]))
        assert p["new_tokens"] - 1 > sum(a + 1 for a in p["accepted"][:-1])  # stopped as soon as it could


def test_greedy_lossless_random_drafter(target, draft_cfg, prompts):
    r = report.evaluate(target, _draft(draft_cfg), draft_cfg, prompts, max_new_tokens=MAX_NEW, check_lossless=True)
    assert r["lossless"] is True and r["mismatches"] == []
    _check_metrics(r, prompts)
    # independent baseline: cache-free greedy decoding (not the KV-cache loop check_lossless compares with)
    for p, res in zip(prompts, r["per_prompt"]):
        assert res["tokens"] == greedy_reference(target.model, p, MAX_NEW)


def _randomised(
    draft: DFlashDraft, scale: float = 1.0, parts=("attention_conv", "mlp_conv", "candidate_selector")
) -> DFlashDraft:
    """DFlash2's convolutions and selector (``parts``) moved off their identity start (a no-op for the other
    variants)."""
    state = nnx.state(draft, nnx.Param)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        if any(p in parts for p in map(str, path)):
            var[...] = var[...] + scale * jax.random.normal(jax.random.key(i), var[...].shape, var[...].dtype)
    nnx.update(draft, state)
    return draft


@pytest.mark.parametrize("variant", [SMALL_DFLASH2, {"variant": "jetspec"}], ids=["dflash2", "jetspec"])
def test_greedy_lossless_dflash2_and_jetspec(target, draft_cfg, prompts, variant):
    """A trained backbone with a (randomised) selector walk, and JetSpec's causal block: token-identical output,
    drafts accepted often enough that the walk decides outcomes."""
    cfg = dataclasses.replace(draft_cfg, **variant)
    draft = train_drafter(target, cfg, prompts[:2], steps=120)
    if cfg.variant == "dflash2":
        _randomised(draft, scale=0.5, parts=("candidate_selector",))
    r = report.evaluate(target, draft, cfg, prompts, max_new_tokens=MAX_NEW, check_lossless=True)
    assert r["lossless"] is True and r["mismatches"] == []
    _check_metrics(r, prompts)
    assert r["tau"] > 1.2
    for p, res in zip(prompts, r["per_prompt"]):
        assert res["tokens"] == greedy_reference(target.model, p, MAX_NEW)


def train_drafter(target, cfg, prompts, steps=200):
    """Teach a fresh drafter the target's greedy continuations of ``prompts`` (CE on slots 1..bs-1, all anchors)."""
    seq_len, bs = 32, cfg.block_size
    seqs = np.stack([np.concatenate([p, generate.greedy_generate(target, p, seq_len - p.size)]) for p in prompts])
    n_anchor = seq_len - bs + 1
    anchors = np.broadcast_to(np.arange(n_anchor, dtype=np.int32), (len(prompts), n_anchor))
    noise = np.full((len(prompts), n_anchor, bs), cfg.mask_token_id, np.int32)
    noise[:, :, 0] = np.take_along_axis(seqs, anchors, 1)
    labels = np.take_along_axis(seqs, (anchors[:, :, None] + np.arange(bs)).reshape(len(prompts), -1), 1)
    weight = jnp.asarray(np.tile(np.arange(bs) > 0, n_anchor), jnp.float32)
    taps = target.taps(seqs, cfg.target_layer_ids)
    emb = target.model.embed(jnp.asarray(noise.reshape(len(prompts), -1)))
    head = target.model.lm_head_weight()
    draft = _draft(cfg, seed=2)
    opt = nnx.Optimizer(draft, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(draft, opt):
        def loss_fn(draft):
            h = draft(emb, taps, jnp.asarray(anchors), jnp.ones(anchors.shape, bool))
            ce = optax.softmax_cross_entropy_with_integer_labels(h @ head.T, jnp.asarray(labels))
            return jnp.mean(ce * weight)

        loss, grads = nnx.value_and_grad(loss_fn)(draft)
        opt.update(draft, grads)
        return loss

    for _ in range(steps):
        step(draft, opt)
    return draft


def test_greedy_lossless_trained_drafter(target, draft_cfg, prompts):
    """A drafter trained on the target's greedy outputs gets accepted often; output stays token-identical."""
    train_prompts = prompts[:2]
    draft = train_drafter(target, draft_cfg, train_prompts)
    r = report.evaluate(target, draft, draft_cfg, prompts, max_new_tokens=MAX_NEW, check_lossless=True)
    assert r["lossless"] is True
    _check_metrics(r, prompts)
    hist = r["acceptance_histogram"]
    assert r["tau"] > 1.5 and hist[-1] > 0 and sum(hist[:-1]) > 0  # both full blocks and rejections occur
    assert r["per_prompt"][0]["tau"] > 2.5  # trained-on prompt
    for p, res in zip(prompts, r["per_prompt"]):
        assert res["tokens"] == greedy_reference(target.model, p, MAX_NEW)


def test_verify_block_greedy():
    v = 5
    target_logits = jax.nn.one_hot(jnp.array([3, 1, 4, 0]), v)  # argmax 3, 1, 4, 0
    for drafts, a, bonus in (([3, 1, 4], 3, 0), ([3, 1, 2], 2, 4), ([2, 1, 4], 0, 3), ([3, 0, 4], 1, 1)):
        got = speculative.verify_block(jnp.zeros((3, v)), jnp.array(drafts), target_logits, jax.random.key(0), 0.0)
        assert (int(got[0]), int(got[1])) == (a, bonus)


def test_verify_block_sampling_first_token_is_p():
    """Whatever q, the first committed token (accepted d_1, or the residual resample) is distributed as p_0."""
    v, n = 6, 20000
    p_logits = jnp.array([[2.0, 0.5, -1.0, 1.0, 0.0, -2.0], [0.0] * 6])
    q_logits = jnp.array([[-1.0, 2.0, 0.5, 0.0, 1.0, -0.5]])

    def one(key):
        kd, kv = jax.random.split(key)
        d = jax.random.categorical(kd, q_logits, axis=-1)
        a, bonus = speculative.verify_block(q_logits, d, p_logits, kv, 1.0)
        return jnp.where(a >= 1, d[0], bonus), a

    first, a = jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(0), n))
    emp = np.bincount(np.asarray(first), minlength=v) / n
    p0, q0 = np.asarray(jax.nn.softmax(p_logits[0])), np.asarray(jax.nn.softmax(q_logits[0]))
    assert 0.5 * np.abs(emp - p0).sum() < 0.02
    assert 0.5 * np.abs(p0 - q0).sum() > 0.3  # a sampler that kept the drafts would fail the check above
    assert np.mean(np.asarray(a)) == pytest.approx(np.minimum(p0, q0).sum(), abs=0.02)  # P(accept) = Σ min(p, q)


def _chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    big = expected >= 5  # pool sparse cells
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    return float(stats.chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


@pytest.mark.parametrize("variant", [{}, SMALL_DFLASH2, {"variant": "jetspec"}], ids=["dflash", "dflash2", "jetspec"])
def test_sampling_matches_target_distribution(variant):
    """T > 0: the first 3 generated tokens (prefill sample, accept/residual, bonus or next block) follow the exact
    target distribution, computed by enumerating all V^2 continuations of a V=8 target; DFlash2's drafts come from
    the selector walk (rejection sampling against its candidate-supported q)."""
    temperature, n = 1.0, 16000
    target = random_target(
        _target_cfg(
            vocab_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        seed=3,
    )
    target.model.lm_head[...] = target.model.lm_head[...] * 20.0  # peaky logits: far from uniform
    cfg = DraftConfig.from_target(
        16,
        8,
        2,
        num_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=32,
        block_size=2,
        rope_theta=1e4,
        **variant,
    )
    prompt = np.array([1, 2, 3, 4, 5], np.int32)
    t_graph, t_state = nnx.split(target.model)
    d_graph, d_state = nnx.split(_randomised(_draft(cfg)))
    fn = jax.jit(
        jax.vmap(
            functools.partial(
                speculative.speculative_decode_fn,
                t_graph=t_graph,
                d_graph=d_graph,
                max_new_tokens=3,
                block_size=2,
                temperature=temperature,
                eos_token_ids=(),
            ),
            in_axes=(None, None, None, None, 0),
        )
    )
    padded = jnp.asarray(np.pad(prompt, (0, 3))[None])
    toks, _, acc, _ = jax.device_get(
        fn(t_state, d_state, padded, jnp.array([5]), jax.random.split(jax.random.key(0), n))
    )
    assert 0.2 < acc[:, 0].mean() < 0.8  # both the accept and the residual paths are exercised

    def exact(temp):
        seqs = np.array([[*prompt, a, b] for a in range(8) for b in range(8)], np.int32)
        p = np.asarray(jax.nn.softmax(target.logits(seqs) / temp, axis=-1), np.float64)
        p1, p2, p3 = p[0, 4], p[::8, 5], p[:, 6].reshape(8, 8, 8)
        return (p1[:, None, None] * p2[:, :, None] * p3).ravel()

    counts = np.bincount(toks[:, 0] * 64 + toks[:, 1] * 8 + toks[:, 2], minlength=512)
    probs = exact(temperature)
    assert 0.5 * np.abs(probs - 1 / 512).sum() > 0.5
    assert _chi2_pvalue(counts, probs) > 1e-3
    assert _chi2_pvalue(counts, exact(1.25 * temperature)) < 1e-6  # the test has power


def test_long_prompt_truncated_from_the_left(target, draft_cfg):
    prompt = np.random.default_rng(5).integers(1, 64, 50).astype(np.int32)
    with pytest.warns(UserWarning, match="prompts\\[0\\]"):
        r = report.evaluate(
            target,
            _draft(draft_cfg),
            draft_cfg,
            [prompt],
            max_new_tokens=MAX_NEW,
            check_lossless=True,
            max_cache_len=16 + MAX_NEW + BS,
        )
    assert r["truncated_prompts"] == 1 and r["per_prompt"][0]["prompt_tokens"] == 16
    assert r["per_prompt"][0]["tokens"] == greedy_reference(target.model, prompt[-16:], MAX_NEW)


def test_incompatible_drafter_rejected_before_compute(target, draft_cfg, prompts):
    draft = _draft(draft_cfg)
    dims = dict(
        num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=64, block_size=BS
    )
    cases = {
        "hidden_size": DraftConfig.from_target(16, 64, 4, **dims),
        "vocab_size": DraftConfig.from_target(32, 32, 4, **dims),
        "target_layer_ids": DraftConfig.from_target(32, 64, 8, target_layer_ids=(1, 6), **dims),
        "num_target_layers": DraftConfig.from_target(32, 64, 6, target_layer_ids=(1, 2), **dims),
    }
    for field, cfg in cases.items():
        with pytest.raises(ValueError, match=field):
            report.evaluate(target, draft, cfg, prompts, max_new_tokens=MAX_NEW)
    for bad, kw in (
        ("max_new_tokens", dict(max_new_tokens=0)),
        ("block_size", dict(block_size=BS + 1)),
        ("temperature", dict(temperature=-1.0)),
        ("max_cache_len", dict(max_cache_len=MAX_NEW)),
    ):
        with pytest.raises(ValueError, match=bad):
            report.evaluate(target, draft, draft_cfg, prompts, **{"max_new_tokens": MAX_NEW, **kw})
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        report.evaluate(target, draft, draft_cfg, [prompts[0], np.array([1, 64])], max_new_tokens=MAX_NEW)


def test_write_report(tmp_path):
    per_prompt = [
        {"accepted": [0, 3, 1], "new_tokens": 8, "seconds_spec": 0.5, "seconds_plain": 1.0},
        {"accepted": [3], "new_tokens": 4, "seconds_spec": 0.5, "seconds_plain": 0.5},
    ]
    r = report.summarize(per_prompt, 4, mismatches=[], check_lossless=True)
    assert r["acceptance_histogram"] == [1, 1, 0, 2]
    assert r["tau"] == pytest.approx(11 / 4)
    assert r["per_position_acceptance"] == pytest.approx([0.75, 0.5, 0.5])
    assert r["speedup"] == pytest.approx((12 / 1.0) / (12 / 1.5))
    assert r["lossless"] is True
    paths = report.write_report(r, tmp_path / "out")
    assert json.loads(open(paths["json"]).read())["tau"] == pytest.approx(11 / 4)
    assert open(paths["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
