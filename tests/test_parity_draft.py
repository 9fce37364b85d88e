"""Draft-model parity with the installed reference (nvidia-modelopt 0.47.0 ``DFlashModule``), fp32, CPU.

Tiny Qwen3 and Llama targets (one per family, module-scoped), explicit draft dims, injected anchors with a dropped
block and a kept anchor at 0 (docs/design.md §5). The JAX draft is fed the reference's own target hidden states and
weights; logits of kept blocks must agree to 1e-5 abs, the loss to 1e-6 rel and every draft parameter gradient to
1e-4 rel (L2). Dropped blocks are compared only through the loss/gradients: the reference gives their fully-masked
rows uniform attention over all keys, ours an exact zero, and both carry zero weight.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracle
import train_fixtures as tf
from dflash_jax import blocks, losses
from dflash_jax.export import draft_from_params, export_draft, from_torch_tensors, import_draft, to_torch_tensors
from dflash_jax.models import layers
from dflash_jax.models.draft import DFlashDraft, DraftConfig

pytestmark = pytest.mark.parity

BS, S, V, H = 4, 16, 64, 32
SWA = 6
ANCHORS = np.array([[5, 6, 9, 0], [0, 3, 7, 10]])
KEEP = np.array([[True, True, True, False], [True, True, True, True]])


def _config(target_layer_ids, window=None, causal=False) -> DraftConfig:
    return tf.tiny_draft_config(
        num_target_layers=6,
        target_layer_ids=target_layer_ids,
        sliding_window=window,
        causal=causal,
        max_position_embeddings=128,
    )


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def ref_model(request):
    return oracle.ref_tiny_dflash_model(request.param, block_size=BS, vocab=V, hidden=H, rope_theta=1e4)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    ids = rng.integers(1, V, (2, S))
    labels = ids.copy()
    labels[0, :5] = -100
    return ids, labels


def _noise_emb(embed, ids, anchors, keep):
    noise = np.zeros(anchors.shape[:1] + (anchors.shape[1] * BS,), np.int64)  # mask token id 0
    noise[:, ::BS] = np.where(keep, np.take_along_axis(ids, anchors, axis=1), 0)
    return jnp.asarray(embed)[noise]


@functools.partial(jax.jit, static_argnames=("graphdef", "objective", "kd"))
def _loss_and_grads(
    params, graphdef, noise, target_hidden, anchors, keep, lm_head, ids, loss_mask, base_logits, *, objective, kd
):
    labels, mask = blocks.block_targets(ids, loss_mask, anchors, keep, BS)
    teacher = blocks.gather_teacher_logits(base_logits, anchors, BS) if kd else None

    def loss_fn(p):
        hidden = nnx.merge(graphdef, p)(noise, target_hidden, anchors, keep)
        logits = (hidden @ lm_head.T).reshape(*anchors.shape, BS, V)
        loss, _ = losses.block_loss(
            logits,
            labels,
            mask,
            spec=losses.LossSpec(objective=objective, alpha=0.5, gamma=4.0),
            teacher_logits=teacher,
        )
        return loss, hidden @ lm_head.T

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, logits, grads


@nnx.jit
def _draft_logits(model, noise, target_hidden, anchors, keep, lm_head):
    return model(noise, target_hidden, anchors, keep) @ lm_head.T


def _kept_rows(keep):
    return np.repeat(keep, BS, axis=1)


def _assert_kept_logits_match(model, ref, ids):
    """Our draft's logits on the reference's own features equal its captured draft logits on kept blocks."""
    logits = np.asarray(
        _draft_logits(
            model,
            _noise_emb(ref["embed"], ids, ANCHORS, KEEP),
            jnp.asarray(ref["target_hidden"]),
            jnp.asarray(ANCHORS, jnp.int32),
            jnp.asarray(KEEP),
            jnp.asarray(ref["lm_head"]),
        )
    )
    kept = _kept_rows(KEEP)
    np.testing.assert_allclose(logits[kept], ref["draft_logits"][kept], rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, SWA], ids=["full", "swa"])
@pytest.mark.parametrize(
    "objective,kd",
    [("dpace", True), ("dpace", False), ("decay", True), ("decay", False)],
    ids=["dpace-kd", "dpace-ce", "decay-kd", "decay-ce"],
)
def test_logits_loss_grads(ref_model, data, window, objective, kd):
    ids, labels = data
    ref_model.dflash_swa_window_size = window
    try:
        ref = oracle.ref_dflash_forward(
            ref_model, ids, labels, ANCHORS, KEEP, objective=objective, alpha=0.5, gamma=4.0, kd=kd
        )
    finally:
        ref_model.dflash_swa_window_size = None
    cfg = _config(ref["target_layer_ids"], window)
    params = from_torch_tensors(cfg, oracle.ref_draft_state(ref_model))
    graphdef = nnx.graphdef(draft_from_params(cfg, params))
    loss, logits, grads = _loss_and_grads(
        params,
        graphdef,
        _noise_emb(ref["embed"], ids, ANCHORS, KEEP),
        jnp.asarray(ref["target_hidden"]),
        jnp.asarray(ANCHORS, jnp.int32),
        jnp.asarray(KEEP),
        jnp.asarray(ref["lm_head"]),
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(labels != -100, jnp.float32),
        jnp.asarray(ref["base_logits"]),
        objective=objective,
        kd=kd,
    )

    kept = _kept_rows(KEEP)
    np.testing.assert_allclose(np.asarray(logits)[kept], ref["draft_logits"][kept], rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-6)
    ours = to_torch_tensors(grads)
    assert set(ours) == set(ref["grads"])
    for name, g_ref in ref["grads"].items():
        err = np.linalg.norm(ours[name] - g_ref)
        assert err <= 1e-4 * np.linalg.norm(g_ref) + 1e-9, (name, err, np.linalg.norm(g_ref))
    assert np.linalg.norm(ref["grads"]["fc.weight"]) > 0  # the comparison is not vacuous


def test_causal_in_block_logits(ref_model, data):
    ids, labels = data
    ref_model.dflash_draft_attention = "causal"
    try:
        ref = oracle.ref_dflash_forward(ref_model, ids, labels, ANCHORS, KEEP)
    finally:
        ref_model.dflash_draft_attention = "bidirectional"
    cfg = _config(ref["target_layer_ids"], causal=True)
    model = draft_from_params(cfg, from_torch_tensors(cfg, oracle.ref_draft_state(ref_model)))
    _assert_kept_logits_match(model, ref, ids)


def test_reference_loads_our_export(ref_model, data, tmp_path):
    """Our fp32 export loads strictly into the reference (its warm-start loader) and gives our logits there."""
    ids, labels = data
    tl_ids = tuple(ref_model.target_layer_ids)
    cfg = _config(tl_ids)
    with layers.unsharded_init():
        model = DFlashDraft(cfg, rngs=nnx.Rngs(7))
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if "norm" in str(path[-2]):  # non-trivial norm weights
            var[...] = 1.0 + 0.1 * jax.random.normal(jax.random.key(var[...].size), var[...].shape)
    nnx.update(model, state)
    export_draft(cfg, nnx.state(model, nnx.Param), tmp_path / "draft", dtype="float32")
    saved = oracle.ref_draft_state(ref_model)
    try:
        ref_model._load_init_checkpoint(str(tmp_path / "draft"))
        oracle.ref_load_draft(ref_model, oracle.ref_draft_state(ref_model))  # strict=True round trip
        ref = oracle.ref_dflash_forward(ref_model, ids, labels, ANCHORS, KEEP)
    finally:
        oracle.ref_load_draft(ref_model, saved)
    _assert_kept_logits_match(model, ref, ids)


def test_import_of_reference_export(ref_model, data, tmp_path):
    """The reference exporter's checkpoint (SWA on) imports into a config and params reproducing its logits."""
    ids, labels = data
    ref_model.dflash_swa_window_size = SWA
    try:
        oracle.ref_export(ref_model, tmp_path / "ref")
        ref = oracle.ref_dflash_forward(ref_model, ids, labels, ANCHORS, KEEP)
    finally:
        ref_model.dflash_swa_window_size = None
    cfg, params = import_draft(tmp_path / "ref")
    assert cfg == _config(tuple(ref["target_layer_ids"]), SWA)
    model = draft_from_params(cfg, params)
    _assert_kept_logits_match(model, ref, ids)


YARN = {
    "type": "yarn",
    "factor": 48.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 1.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}  # ModelOpt's dflash_export_rope_scaling example (short context)


def test_attention_sink_and_rope_scaling_parity_and_round_trip(data, tmp_path):
    """``dflash_attention_sink`` (with SWA): logits, loss and every gradient (the sinks' included) match the
    reference; its export with ``dflash_export_rope_scaling`` imports with both options, and our export of that
    round-trips exactly."""
    ids, labels = data
    ref_model = oracle.ref_tiny_dflash_model(
        "qwen3", block_size=BS, vocab=V, hidden=H, rope_theta=1e4, swa_window=SWA, attention_sink=True
    )
    ref = oracle.ref_dflash_forward(ref_model, ids, labels, ANCHORS, KEEP)
    cfg = dataclasses.replace(_config(ref["target_layer_ids"], SWA), attention_sink=True)
    params = from_torch_tensors(cfg, oracle.ref_draft_state(ref_model))
    graphdef = nnx.graphdef(draft_from_params(cfg, params))
    loss, logits, grads = _loss_and_grads(
        params,
        graphdef,
        _noise_emb(ref["embed"], ids, ANCHORS, KEEP),
        jnp.asarray(ref["target_hidden"]),
        jnp.asarray(ANCHORS, jnp.int32),
        jnp.asarray(KEEP),
        jnp.asarray(ref["lm_head"]),
        jnp.asarray(ids, jnp.int32),
        jnp.asarray(labels != -100, jnp.float32),
        jnp.asarray(ref["base_logits"]),
        objective="dpace",
        kd=True,
    )
    kept = _kept_rows(KEEP)
    np.testing.assert_allclose(np.asarray(logits)[kept], ref["draft_logits"][kept], rtol=0, atol=1e-5)
    np.testing.assert_allclose(float(loss), ref["loss"], rtol=1e-6)
    ours = to_torch_tensors(grads)
    assert set(ours) == set(ref["grads"]) and "layers.0.self_attn.attention_sink_bias" in ours
    for name, g_ref in ref["grads"].items():
        err = np.linalg.norm(ours[name] - g_ref)
        assert err <= 1e-4 * np.linalg.norm(g_ref) + 1e-9, (name, err, np.linalg.norm(g_ref))
    assert np.linalg.norm(ref["grads"]["layers.1.self_attn.attention_sink_bias"]) > 0

    ref_model.dflash_export_rope_scaling = YARN
    oracle.ref_export(ref_model, tmp_path / "ref")
    got_cfg, got_params = import_draft(tmp_path / "ref")
    assert got_cfg == dataclasses.replace(cfg, rope_scaling=YARN)
    export_draft(got_cfg, got_params, tmp_path / "ours", dtype="float32")
    again_cfg, again_params = import_draft(tmp_path / "ours")
    assert again_cfg == got_cfg
    for a, b in zip(jax.tree.leaves(got_params), jax.tree.leaves(again_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the imported YaRN changes the draft's RoPE (frequencies and attention factor), nothing else
    scaled = np.asarray(
        _draft_logits(
            draft_from_params(got_cfg, got_params),
            _noise_emb(ref["embed"], ids, ANCHORS, KEEP),
            jnp.asarray(ref["target_hidden"]),
            jnp.asarray(ANCHORS, jnp.int32),
            jnp.asarray(KEEP),
            jnp.asarray(ref["lm_head"]),
        )
    )
    assert not np.allclose(scaled[kept], ref["draft_logits"][kept], atol=1e-3)
