"""DFlash2 and JetSpec drafters: config, the in-block convolutions and the selector, the JetSpec mask against
NeMo Automodel's definition, every attention implementation, remat, bf16, sharding, the selector and KL-T^2 losses,
export/import round trips. (Parity with z-lab's own DFlash2 code: tests/test_parity_dflash2.py.)"""

from __future__ import annotations

import dataclasses
import filecmp
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import train_fixtures as tf
from dflash_jax import config as config_lib
from dflash_jax import export, losses, sharding
from dflash_jax.models import attention, layers
from dflash_jax.models.draft import DFlashDraft, DraftConfig, block_conv, training_masks
from dflash_jax.train import step as st
from test_draft import BASE, _extend, _forward, _inputs, _propose

D2 = dict(variant="dflash2", conv_group_size=8, selector_rank=8, selector_top_k=5)


def _cfg(**kw) -> DraftConfig:
    return DraftConfig(**{**BASE, **kw})


def _randomised(model: DFlashDraft, seed: int = 0, scale: float = 0.3) -> DFlashDraft:
    """Every convolution / selector parameter moved off its identity start (else they would test nothing)."""
    state = nnx.state(model, nnx.Param)
    for i, (path, var) in enumerate(nnx.to_flat_state(state)):
        name = ".".join(map(str, path))
        if "conv" in name or "candidate_selector" in name:
            var[...] = var[...] + scale * jax.random.normal(jax.random.key(seed + i), var[...].shape, var[...].dtype)
    nnx.update(model, state)
    return model


def _model(cfg, seed=0, randomise=True, **kw) -> DFlashDraft:
    with layers.unsharded_init():
        model = DFlashDraft(cfg, rngs=nnx.Rngs(seed), **kw)
    return _randomised(model, seed) if randomise and cfg.variant == "dflash2" else model


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


def test_variant_normal_form_and_errors():
    assert _cfg(variant="jetspec").causal is True
    assert _cfg(causal=True).variant == "jetspec"  # one normal form: JetSpec is DFlash with a causal block
    assert _cfg(variant="jetspec") == _cfg(causal=True)
    for kw, key in (
        (dict(D2, conv_group_size=7), "conv_group_size"),
        (dict(D2, selector_top_k=65), "selector_top_k"),
        (dict(D2, causal=True), "causal"),
        (dict(variant="dflash3"), "variant"),
        (dict(output_multiplier=0.0), "output_multiplier"),
    ):
        with pytest.raises(ValueError, match=f"DraftConfig.{key}"):
            _cfg(**kw)
    for sets, key in (
        (["draft.variant=dflash3"], "draft.variant"),
        (["draft.selector_rank=0"], "draft.selector_rank"),
        (["draft.final_logit_softcapping=-1"], "draft.final_logit_softcapping"),
        (["loss.temperature=2.0", "loss.per_token=ce"], "loss.temperature"),
        (["loss.selector_missing=keep"], "loss.selector_missing"),
    ):
        with pytest.raises(ValueError, match=key):
            config_lib.load_config("tiny", sets)


# ---------------------------------------------------------------------------------------------------------
# Convolutions and selector
# ---------------------------------------------------------------------------------------------------------


def test_block_conv_matches_a_loop_and_never_crosses_blocks():
    rng = np.random.default_rng(0)
    b, n, bs, h, k, g = 2, 3, 4, 8, 3, 2
    x = rng.standard_normal((b, n * bs, h)).astype(np.float32)
    taps = rng.standard_normal((b, n * bs, k, g)).astype(np.float32)
    base = rng.standard_normal((k, h)).astype(np.float32)
    want = np.zeros_like(x)
    for t in range(n * bs):
        for o in range(k):
            if t % bs >= o:  # taps reading before the block's first slot read zeros
                coef = base[o] + np.repeat(taps[:, t, o], h // g, axis=-1)
                want[:, t] += coef * x[:, t - o]
    got = np.asarray(block_conv(jnp.asarray(x), jnp.asarray(taps), jnp.asarray(base), bs))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_fresh_dflash2_is_dflash():
    """Identity init: with the backbone's weights, a fresh DFlash2 drafter computes the DFlash hidden states and
    its selector scores are the draft logits."""
    plain, fresh = _model(_cfg()), _model(_cfg(**D2), randomise=False)
    shared = nnx.state(plain, nnx.Param)
    state = nnx.state(fresh, nnx.Param)
    for path, var in nnx.to_flat_state(shared):
        obj = state
        for p in path:
            obj = obj[p]
        obj[...] = var[...]
    nnx.update(fresh, state)
    noise, th = _inputs(plain.cfg, 2, 16, 3, seed=1)
    anchors, keep = jnp.array([[0, 5, 9], [2, 7, 11]]), jnp.ones((2, 3), bool)
    pos, seg = jnp.broadcast_to(jnp.arange(16), (2, 16)), jnp.ones((2, 16), jnp.int32)
    want = _forward(plain, noise, th, anchors, keep, pos, seg)
    got = _forward(fresh, noise, th, anchors, keep, pos, seg)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    unary = jax.random.normal(jax.random.key(0), (5, 4))
    cand = jnp.arange(20).reshape(5, 4)
    scores = fresh.candidate_selector.scores(got[0, :5], unary, cand, jnp.arange(5))
    np.testing.assert_array_equal(np.asarray(scores), np.asarray(unary))


def test_selector_scores_formula():
    model = _model(_cfg(**D2))
    sel = model.candidate_selector
    h = jax.random.normal(jax.random.key(1), (3, 32))
    unary = jax.random.normal(jax.random.key(2), (3, 5))
    cand = jnp.array([[1, 2, 3, 4, 5], [9, 8, 7, 6, 0], [10, 20, 30, 40, 50]])
    pred = jnp.array([3, 63, 0])
    a, bb = np.asarray(sel.predecessor_codebook[...]), np.asarray(sel.successor_codebook[...])
    proj = np.asarray(h) @ np.asarray(sel.hidden_projection.kernel[...])
    want = np.asarray(unary) + np.einsum("tr,tkr->tk", a[np.asarray(pred)] * proj, bb[np.asarray(cand)])
    np.testing.assert_allclose(np.asarray(sel.scores(h, unary, cand, pred)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [D2, {"variant": "jetspec"}], ids=["dflash2", "jetspec"])
def test_training_forward_equals_block_at_a_time_proposal(kw):
    """Blocks laid end to end in training (their convolution taps read zeros across boundaries) give what drafting
    each block alone from the context cache gives."""
    cfg = _cfg(**kw)
    model = _model(cfg)
    s, anchors = 16, np.array([3, 8, 12])
    noise, th = _inputs(cfg, 1, s, 3, seed=2)
    pos = jnp.arange(s)[None]
    out = _forward(model, noise, th, jnp.asarray(anchors[None]), jnp.ones((1, 3), bool), pos, jnp.ones((1, s)))
    for i, a in enumerate(anchors):
        cache = _extend(model, model.init_cache(1, s), th, pos, jnp.array([a]))
        got = _propose(model, cache, noise[:, i * BS_ : (i + 1) * BS_], jnp.array([a]))
        np.testing.assert_allclose(np.asarray(got[0]), np.asarray(out[0, i * BS_ : (i + 1) * BS_]), atol=2e-5)


BS_ = BASE["block_size"]


# ---------------------------------------------------------------------------------------------------------
# JetSpec mask: NeMo Automodel create_dflash_sdpa_mask(causal=True), hand case
# ---------------------------------------------------------------------------------------------------------

# S = 6 context keys, two blocks of 3 anchored at 1 and 4. NeMo's definition: a query of block n sees context
# keys t < anchor_n and the keys of its own block at offsets <= its own ("offset i sees offsets <= i").
NEMO_JETSPEC = np.array(
    [
        [1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0],
        [1, 0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1],
    ],
    bool,
)


@pytest.mark.parametrize("impl", ["dense", "chunked", "pallas"])
def test_jetspec_mask_equals_nemo_hand_case(impl):
    anchors, keep, seg = jnp.array([[1, 4]]), jnp.ones((1, 2), bool), jnp.ones((1, 6), jnp.int32)
    mask = training_masks(anchors, keep, seg, 3, None, _cfg(variant="jetspec").causal, impl)
    ctx, blk = np.asarray(mask.ctx.visible()[0]), np.asarray(mask.block(3)[0])
    ours = np.zeros((6, 12), bool)
    ours[:, :6] = ctx
    for n in range(2):
        ours[n * 3 : n * 3 + 3, 6 + n * 3 : 9 + n * 3] = blk[n]
    np.testing.assert_array_equal(ours, NEMO_JETSPEC)
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (1, 6, 4, 8))
    kb, vb, kc, vc = (jax.random.normal(k, (1, 6, 2, 8)) for k in ks[1:])
    got = attention.block_sparse_attention(q, kb, vb, kc, vc, mask)
    want = attention.masked_attention(
        q, jnp.concatenate([kc, kb], 1), jnp.concatenate([vc, vb], 1), jnp.asarray(NEMO_JETSPEC)[None]
    )
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


# ---------------------------------------------------------------------------------------------------------
# Implementations, remat, bf16, sharding
# ---------------------------------------------------------------------------------------------------------


def test_dflash2_every_attention_impl_and_remat_and_bf16():
    cfg = _cfg(**D2)
    model = _model(cfg)
    noise, th = _inputs(cfg, 2, 16, 3, seed=3)
    anchors, keep = jnp.array([[0, 5, 9], [2, 7, 11]]), jnp.array([[True, True, False], [True, True, True]])

    def loss(m, impl):
        return jnp.sum(m(noise, th, anchors, keep, attention_impl=impl) ** 2)

    ref_val, ref_grad = nnx.value_and_grad(loss)(model, "dense")
    for impl in ("chunked", "pallas"):
        val, grad = nnx.value_and_grad(loss)(model, impl)
        np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    remat = _model(cfg, remat=True)
    val, grad = nnx.value_and_grad(loss)(remat, "dense")
    np.testing.assert_allclose(float(val), float(ref_val), rtol=1e-6)
    conv_grad = grad["layers"][0]["attention_conv"]["kernel_projection"]["kernel"][...]
    assert float(jnp.abs(conv_grad).max()) > 0
    bf16 = _model(cfg, param_dtype=jnp.bfloat16, dtype=jnp.bfloat16)
    dtypes = {v[...].dtype for _, v in nnx.to_flat_state(nnx.state(bf16, nnx.Param))}
    assert dtypes == {jnp.dtype(jnp.bfloat16)}
    assert bool(jnp.isfinite(bf16(noise, th, anchors, keep)).all())


def test_dflash2_params_sharded_by_the_rules_table():
    mesh = tf.mesh_of((2, 2, 2))
    with layers.unsharded_init():
        model = DFlashDraft(_cfg(**{**D2, "selector_rank": 16}), rngs=nnx.Rngs(0))
    _, params = st.split_draft(model)
    placed = sharding.place(params, sharding.state_shardings(params, mesh))
    sel = placed["candidate_selector"]
    assert sel["predecessor_codebook"][...].sharding.spec == P("tensor", None)  # ("vocab", "norm")
    assert sel["hidden_projection"]["kernel"][...].sharding.spec == P("fsdp", None)  # ("embed", "norm")
    conv = placed["layers"][0]["mlp_conv"]
    assert conv["base_kernel"][...].sharding.spec == P(None, None, "fsdp")
    assert conv["kernel_projection"]["kernel"][...].sharding.spec == P("fsdp", None)


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


def _selector_case():
    """One block of 4 slots, V = 6, H = 3: lm_head = the first rows of an identity-like matrix, so the logits of
    hidden e_i are exact and top-2 candidates are known by hand."""
    lm_head = jnp.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.5, 0], [0, 0.5, 0.5], [-1, -1, -1]], jnp.float32)
    hidden = jnp.array([[[[0, 0, 0], [2, 1, 0], [0, 1, 2], [1, 2, 0]]]], jnp.float32)
    # top-2 of the logits per slot: slot 1 -> {0, 3}, slot 2 -> {2, 4}, slot 3 -> {1, 3}
    labels = jnp.array([[[5, 3, 1, 1]]])  # gold: slot 1 in (3), slot 2 missing (1), slot 3 in (1)
    mask = jnp.array([[[0.0, 1.0, 1.0, 1.0]]])
    return hidden, lm_head, labels, mask


@pytest.mark.parametrize("missing", ["drop", "insert"])
def test_selector_loss_hand_case(missing):
    hidden, lm_head, labels, mask = _selector_case()
    cand, weights = losses.selector_targets(hidden, lm_head, labels, mask, top_k=2, objective="uniform")
    assert [sorted(c) for c in np.asarray(cand)[0, 0, 1:].tolist()] == [[0, 3], [2, 4], [1, 3]]
    np.testing.assert_array_equal(np.asarray(weights), np.asarray(mask))  # uniform: W = mask, slot 0 zero

    def score_fn(h, unary, c, pred):  # a selector with no pairwise term: S = U
        return unary

    parts = losses.selector_partials(score_fn, hidden, lm_head, labels, mask, cand, weights, missing=missing)
    logits = np.asarray(hidden[0, 0] @ lm_head.T)

    def ce(slot, ids, gold):
        s = logits[slot, ids]
        return np.log(np.exp(s).sum()) - logits[slot, gold]

    want = ce(1, [0, 3], 3) + ce(3, [1, 3], 1)
    if missing == "insert":  # slot 2's gold replaces the weakest candidate (4)
        want += ce(2, [2, 1], 1)
    np.testing.assert_allclose(float(parts["selector_weighted_loss"]), want, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(parts["candidate_hits"]), [0, 1, 0, 1])  # before any insertion
    np.testing.assert_array_equal(np.asarray(parts["selector_correct"]), [0, 0, 0, 1])  # slot 1 argmax is 0
    # reduce: candidate_recall = 2 hits / 3 tokens, selector accuracy 1 / 3
    backbone = losses.block_partials_from_hidden(hidden, lm_head, labels, mask, objective="uniform", per_token="ce")
    _, metrics = losses.reduce_partials(losses.with_selector(backbone, parts, 0.5))
    assert float(metrics["candidate_recall"]) == pytest.approx(2 / 3, rel=1e-5)
    assert float(metrics["selector_accuracy"]) == pytest.approx(1 / 3, rel=1e-5)
    assert float(metrics["selector_loss"]) == pytest.approx(want / 3, rel=1e-5)


def test_selector_loss_trains_the_codebooks():
    cfg = _cfg(**D2)
    model = _model(cfg, randomise=False)  # successor codebook zero: its gradient must still be non-zero
    hidden = jax.random.normal(jax.random.key(0), (1, 2, BS_, 32))
    lm_head = jax.random.normal(jax.random.key(1), (64, 32))
    logits = hidden @ lm_head.T
    labels = jnp.argsort(-logits, axis=-1)[..., 1]  # the 2nd-best token: in the candidates, not the argmax
    mask = jnp.ones((1, 2, BS_)).at[..., 0].set(0.0)
    cand, w = losses.selector_targets(hidden, lm_head, labels, mask, top_k=5, chunk_blocks=1)

    def loss(sel):
        return losses.selector_partials(sel.scores, hidden, lm_head, labels, mask, cand, w)["selector_weighted_loss"]

    grads = nnx.grad(loss)(model.candidate_selector)
    assert float(jnp.abs(grads["successor_codebook"][...]).max()) > 0


def test_kl_at_temperature_is_t_squared_scaled():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 4, 7)).astype(np.float32) * 3
    teacher = rng.standard_normal((2, 3, 4, 7)).astype(np.float32) * 3
    labels = rng.integers(0, 7, (2, 3, 4))
    mask = np.ones((2, 3, 4), np.float32)
    mask[..., 0] = 0
    t = 2.5

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p = np.exp(log_softmax(teacher / t))
    kl = (p * (np.log(p) - log_softmax(logits / t))).sum(-1) * t * t
    loss, _ = losses.block_loss(
        jnp.asarray(logits),
        jnp.asarray(labels),
        jnp.asarray(mask),
        teacher_logits=jnp.asarray(teacher),
        per_token="kl",
        objective="uniform",
        logits_options={"temperature": t},
    )
    np.testing.assert_allclose(float(loss), (kl * mask).sum() / (mask.sum() + 1e-6), rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        losses.block_loss(
            jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask), logits_options={"temperature": t}
        )


# ---------------------------------------------------------------------------------------------------------
# Export / import
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [dict(D2, output_multiplier=0.5, final_logit_softcapping=30.0), {"variant": "jetspec"}],
    ids=["dflash2", "jetspec"],
)
def test_export_import_round_trip_is_byte_equal(tmp_path, kw):
    cfg = _cfg(**kw)
    params = nnx.state(_model(cfg), nnx.Param)
    first = export.export_draft(cfg, params, tmp_path / "a", dtype="float32")
    cfg2, params2 = export.import_draft(first)
    assert cfg2 == cfg
    second = export.export_draft(cfg2, params2, tmp_path / "b", dtype="float32")
    for f in (export.WEIGHTS_FILE, export.CONFIG_FILE):
        assert filecmp.cmp(first / f, second / f, shallow=False)
    raw = json.loads((first / export.CONFIG_FILE).read_text())
    dc = raw["dflash_config"]
    from safetensors.numpy import load_file

    keys = set(load_file(str(first / export.WEIGHTS_FILE)))
    if cfg.variant == "dflash2":
        assert raw["architectures"] == ["DFlash2DraftModel"] and raw["is_causal"] is False
        assert {k: dc[k] for k in ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")} == {
            "conv_kernel_size": 2,
            "conv_group_size": 8,
            "selector_rank": 8,
            "selector_top_k": 5,
        }
        assert (dc["output_multiplier"], dc["final_logit_softcapping"]) == (0.5, 30.0)
        for i in range(cfg.num_layers):
            for conv in ("attention_conv", "mlp_conv"):
                assert {f"layers.{i}.{conv}.base_kernel", f"layers.{i}.{conv}.kernel_projection.weight"} <= keys
        assert {
            "candidate_selector.predecessor_codebook",
            "candidate_selector.successor_codebook",
            "candidate_selector.hidden_projection.weight",
        } <= keys
    else:
        assert raw["architectures"] == ["DFlashDraftModel"] and dc["causal"] is True and raw["is_causal"] is True
        assert not any("conv" in k or "selector" in k for k in keys)
    assert dataclasses.replace(cfg2) == cfg


# ---------------------------------------------------------------------------------------------------------
# The CLI end to end on the tiny config
# ---------------------------------------------------------------------------------------------------------

VARIANT_SETS = {  # the README's tiny recipes of the two variants
    "dflash2": ["draft.variant=dflash2", "draft.selector_rank=16", "draft.selector_top_k=8"],
    "jetspec": ["draft.variant=jetspec", "loss.per_token=kl", "loss.temperature=2.0"],
}


@pytest.mark.parametrize("variant", sorted(VARIANT_SETS))
def test_tiny_variant_trains_exports_imports_and_evals_lossless(tmp_path, capsys, variant):
    from dflash_jax import cli
    from dflash_jax.train import rundir

    sets = [a for s in VARIANT_SETS[variant] for a in ("--set", s)]
    tiny = ["--config", "tiny", "--set", "mesh.shape=[2,2,2]", "--set", "data.max_conversations=32", *sets]
    run = str(tmp_path / "run")
    steps = ["--set", "train.steps=4", "--set", "train.log_every=2", "--no-progress"]
    assert cli.main(["train", *tiny, "--run-dir", run, *steps]) == 0
    last = rundir.read_metrics(run)[-1]
    assert np.isfinite(last["loss"])
    if variant == "dflash2":
        assert 0.0 <= last["candidate_recall"] <= 1.0 and len(last["selector_position_accuracy"]) == 4
    capsys.readouterr()
    out = str(tmp_path / "exp")
    assert cli.main(["export", "--run-dir", run, "--out", out, "--dtype", "float32"]) == 0
    arch = {"dflash2": ["DFlash2DraftModel"], "jetspec": ["DFlashDraftModel"]}[variant]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["config"]["architectures"] == arch and summary["config"]["is_causal"] is (variant == "jetspec")
    cfg, _ = export.import_draft(out)
    assert cfg.variant == variant
    assert cli.main(["import", out, "--out", str(tmp_path / "copy")]) == 0
    for temperature in ("0", "1.0"):
        capsys.readouterr()
        args = ["eval", "--draft", run, "--max-new-tokens", "6", "--num-prompts", "2", "--temperature", temperature]
        assert cli.main([*args, "--check-lossless"]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert 1.0 <= result["tau"] <= 4
        assert result["lossless"] is (True if temperature == "0" else None)  # T > 0: tests/test_speculative.py
