"""Speculative-decoding parity with the reference (nvidia-modelopt 0.47.0), fp32, CPU.

A tiny Qwen3 target converted by the reference is saved with ``save_pretrained`` and loaded by our HF loader; a
drafter trained here (so that drafts are accepted often, but not always) is loaded into the reference strictly.
Our cached loop must then agree with the reference's cache-free definitions (docs/design.md §4.10):

* the z-lab loop built on ``pseudo_speculative_generate``: identical tokens and accepted count per step;
* ``AcceptanceRateValidation.validate_online`` (which also appends its uncounted correction token, so its
  trajectory differs after a rejection): from every state it visits, our first verify step accepts exactly as
  many drafts as it did.
"""

import numpy as np
import pytest
from flax import nnx

import oracle
import train_fixtures as tf
from dflash_jax.eval import speculative
from dflash_jax.export import to_torch_tensors
from dflash_jax.models.target_io import load_target
from test_speculative import train_drafter

pytestmark = pytest.mark.parity

BS, V, H, MAX_NEW = 4, 64, 32, 20


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref = oracle.ref_tiny_dflash_model("qwen3", block_size=BS, vocab=V, hidden=H, rope_theta=1e4)
    path = tmp_path_factory.mktemp("target")
    oracle.ref_save_target(ref, path)
    target = load_target(path)
    cfg = tf.tiny_draft_config(
        num_target_layers=6, target_layer_ids=tuple(ref.target_layer_ids), max_position_embeddings=128
    )
    rng = np.random.default_rng(1)
    prompts = [rng.integers(1, V, n).astype(np.int32) for n in (6, 9, 11)]
    draft = train_drafter(target, cfg, prompts[:2])
    oracle.ref_load_draft(ref, to_torch_tensors(nnx.state(draft, nnx.Param)))
    return ref, target, draft, prompts


def test_accepted_per_step_equals_reference_zlab_loop(setup):
    ref, target, draft, prompts = setup
    all_accepted = []
    for p in prompts:
        ours = speculative.speculative_generate(target.model, draft, p, max_new_tokens=MAX_NEW, bucket=16)
        ref_tokens, ref_accepted = oracle.ref_zlab_generate(ref, p, MAX_NEW)
        assert ours.tokens.tolist() == ref_tokens
        assert ours.accepted.tolist() == ref_accepted
        all_accepted += ref_accepted
    assert 0 < np.mean(all_accepted) < BS - 1  # accepted and rejected drafts both occur


def test_first_step_accepts_equal_validate_online(setup):
    ref, target, draft, prompts = setup
    checked = []
    for p in prompts:
        states, ref_accepted, ar = oracle.ref_validate_online(ref, p, MAX_NEW)
        assert len(ref_accepted) >= 3 and 1.0 <= ar <= BS
        for state, a in zip(states, ref_accepted):
            ours = speculative.speculative_generate(target.model, draft, state, max_new_tokens=2, bucket=32)
            assert ours.accepted.tolist() == [a]
        checked += ref_accepted
    assert 0 < np.mean(checked) < BS - 1
