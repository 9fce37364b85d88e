"""DFlash2 parity with z-lab's own implementation: ``dflash.model.DFlash2DraftModel`` of the ``dflash`` package
(0.1.0 on PyPI, installed with the parity reference by scripts/setup.sh), fp32, CPU, random weights.

The reference writes the checkpoint (its ``config.json`` via ``save_pretrained`` and its ``state_dict``, codebook
keys as its ``from_pretrained`` maps them); we import it with :func:`dflash_jax.export.import_draft`, then compare
one drafted block with context (the reference's decode forward: context ``t < S`` and the whole block visible):
post-norm hidden states and the logits (``output_multiplier`` and ``final_logit_softcapping`` set) within 1e-5 of
their scale, the greedy selector walk token for token, and the sampling walk's proposal distributions ``q`` (the
selector scores through ``softmax(S / T)``) along the reference's own sampled path.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dflash_jax.eval import speculative
from dflash_jax.export import draft_from_params, import_draft

pytestmark = pytest.mark.parity

torch = pytest.importorskip("torch", reason="the parity extra (torch) is not installed")
zlab = pytest.importorskip("dflash.model", reason="z-lab's dflash package (scripts/setup.sh) is not installed")
transformers = pytest.importorskip("transformers", reason="the parity extra (transformers) is not installed")

H, V, BS, S, TOP_K = 32, 64, 4, 9, 6
MULTIPLIER, SOFTCAP = 1.7, 3.0


def _reference_model():
    config = transformers.Qwen3Config(
        hidden_size=H,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=V,
        rms_norm_eps=1e-6,
        rope_theta=1e4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        architectures=["DFlash2DraftModel"],
    )
    config.num_target_layers = 5
    config.block_size = BS
    config.is_causal = False
    config.dflash_config = dict(
        mask_token_id=V - 1,
        target_layer_ids=[1, 3],
        block_size=BS,
        conv_kernel_size=2,
        conv_group_size=8,
        selector_rank=12,
        selector_top_k=TOP_K,
        output_multiplier=MULTIPLIER,
        final_logit_softcapping=SOFTCAP,
    )
    torch.manual_seed(0)
    model = zlab.DFlash2DraftModel(config).float().eval()
    with torch.no_grad():  # every parameter random (the identity start would hide the convs and the selector)
        for name, p in model.named_parameters():
            scale = 1.0 if name.endswith("norm.weight") else 0.3
            p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = _reference_model()
    out = tmp_path_factory.mktemp("zlab_dflash2")
    ref.save_pretrained(out, safe_serialization=True)
    cfg, params = import_draft(out)
    return ref, cfg, draft_from_params(cfg, params), json.loads((out / "config.json").read_text())


def _inputs():
    rng = np.random.default_rng(1)
    target_hidden = rng.standard_normal((1, S, 2 * H)).astype(np.float32)
    noise = rng.standard_normal((1, BS, H)).astype(np.float32)
    head = (0.5 * rng.standard_normal((V, H))).astype(np.float32)
    return target_hidden, noise, head


def _ours(draft, target_hidden, noise):
    cache = draft.extend_cache(draft.init_cache(1, S), jnp.asarray(target_hidden), jnp.arange(S)[None])
    return np.asarray(draft.propose(cache, jnp.asarray(noise), jnp.array([S], jnp.int32)))


def _scale_close(got, want, name, scale=None):
    """Max abs error within 1e-5 of ``scale`` (default: the reference tensor's max abs)."""
    scale = np.max(np.abs(want)) if scale is None else scale
    err = np.max(np.abs(got - want)) / max(scale, 1e-30)
    assert err < 1e-5, f"{name}: max error {err:.2e} of scale"


def test_reference_checkpoint_imports_as_dflash2(setup):
    _, cfg, _, raw = setup
    assert raw["architectures"] == ["DFlash2DraftModel"]
    assert (cfg.variant, cfg.causal, cfg.conv_group_size, cfg.selector_rank, cfg.selector_top_k) == (
        "dflash2",
        False,
        8,
        12,
        TOP_K,
    )
    assert (cfg.output_multiplier, cfg.final_logit_softcapping) == (MULTIPLIER, SOFTCAP)


def test_hidden_and_logits_match_reference(setup):
    ref, _, draft, _ = setup
    target_hidden, noise, head = _inputs()
    with torch.no_grad():
        want = ref(
            position_ids=torch.arange(S + BS)[None],
            noise_embedding=torch.from_numpy(noise),
            target_hidden=torch.from_numpy(target_hidden),
        ).numpy()
        lm_head = torch.nn.Linear(H, V, bias=False)
        lm_head.weight.copy_(torch.from_numpy(head))
        want_logits = ref.compute_logits(torch.from_numpy(want), lm_head).numpy()
    got = _ours(draft, target_hidden, noise)
    _scale_close(got[0], want[0], "hidden")
    raw = np.asarray(jnp.asarray(got) @ jnp.asarray(head).T)
    got_logits = np.asarray(draft.transform_logits(jnp.asarray(raw)))
    # The softcap (slope <= 1) carries the error of the multiplied logits: their scale is the one to hold.
    _scale_close(got_logits, want_logits, "logits", scale=MULTIPLIER * np.max(np.abs(raw)))
    assert np.max(np.abs(want_logits)) > 0.9 * SOFTCAP  # the cap is exercised


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_selector_walk_matches_reference(setup, temperature):
    """Greedy: the same path. Sampling: our proposal ``q`` of each slot, scored after the reference's sampled
    predecessor, equals the reference's ``q`` row over the vocabulary."""
    ref, _, draft, _ = setup
    target_hidden, noise, head = _inputs()
    hidden = _ours(draft, target_hidden, noise)[0, 1:]  # [bs-1, H]: the draft slots
    anchor = 7
    lm_head = torch.nn.Linear(H, V, bias=False)
    with torch.no_grad():
        lm_head.weight.copy_(torch.from_numpy(head))
        torch.manual_seed(3)
        path, cand, q_rows = ref.propose(
            torch.from_numpy(hidden.copy())[None], torch.tensor([anchor]), lm_head, temperature
        )
    logits = draft.transform_logits(jnp.asarray(hidden) @ jnp.asarray(head).T)
    drafts, q = speculative.selector_walk(
        draft.candidate_selector, jnp.asarray(hidden), logits, jnp.int32(anchor), jax.random.key(0), temperature
    )
    path = path[0].numpy()
    if temperature == 0.0:
        np.testing.assert_array_equal(np.asarray(drafts), path)
        assert q is None
        return
    want = np.zeros((BS - 1, V), np.float32)
    np.put_along_axis(want, cand[0].numpy(), q_rows[0].numpy(), axis=-1)
    unary, ids = jax.lax.top_k(logits, TOP_K)
    prev = jnp.asarray(np.concatenate([[anchor], path[:-1]]), jnp.int32)
    scores = draft.candidate_selector.scores(jnp.asarray(hidden), unary, ids, prev)
    got = np.zeros((BS - 1, V), np.float32)
    np.put_along_axis(got, np.asarray(ids), np.asarray(jax.nn.softmax(scores / temperature)), axis=-1)
    _scale_close(got, want, "q")
    assert np.all(np.asarray(q).sum(-1) == pytest.approx(1.0, abs=1e-5))
    assert np.all((np.asarray(q) > 0).sum(-1) <= TOP_K)
