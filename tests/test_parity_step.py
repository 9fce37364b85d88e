"""Full train-step parity with the installed reference: HFDFlashModel forward/backward + torch AdamW, fp32, CPU.

A tiny Qwen3 target converted by nvidia-modelopt 0.47.0 is saved with ``save_pretrained`` and loaded by our
``load_target``; the draft starts from the reference's weights; anchors are injected (a dropped block and a kept
anchor at 0 included). Two optimizer steps (so the second forward runs on updated weights and Adam's moments
matter) with clipping active and non-zero weight decay: loss, global gradient norm and every updated draft
parameter tensor must agree to 1e-5 relative.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

import oracle
from dflash_jax import sharding
from dflash_jax.config import LossSection
from dflash_jax.export import draft_from_params, from_torch_tensors, to_torch_tensors
from dflash_jax.models.draft import DraftConfig
from dflash_jax.models.target_io import load_target
from dflash_jax.train import optim
from dflash_jax.train import step as st

pytestmark = pytest.mark.parity

BS, S, V, H = 4, 16, 64, 32
ANCHORS = np.array([[5, 6, 9, 0], [0, 3, 7, 10]], np.int32)
KEEP = np.array([[True, True, True, False], [True, True, True, True]])
LR, WD, CLIP = 1e-3, 0.1, 0.02


def test_two_steps_match_reference_adamw(tmp_path):
    torch = pytest.importorskip("torch")
    ref_model = oracle.ref_tiny_dflash_model("qwen3", block_size=BS, vocab=V, hidden=H, rope_theta=1e4)
    oracle.ref_save_target(ref_model, tmp_path / "target")
    target = load_target(tmp_path / "target", dtype="float32")
    layer_ids = tuple(ref_model.target_layer_ids)
    cfg = DraftConfig(
        hidden_size=H,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=V,
        num_target_layers=6,
        target_layer_ids=layer_ids,
        block_size=BS,
        mask_token_id=0,
        rope_theta=1e4,
        max_position_embeddings=128,
    )
    initial = oracle.ref_draft_state(ref_model)
    draft = draft_from_params(cfg, from_torch_tensors(cfg, initial))

    rng = np.random.default_rng(0)
    ids = rng.integers(1, V, (2, S))
    labels = ids.copy()
    labels[0, :5] = -100
    batch = dict(
        input_ids=ids.astype(np.int32),
        loss_mask=(labels != -100).astype(np.float32),
        segment_ids=np.ones((2, S), np.int32),
        positions=np.tile(np.arange(S, dtype=np.int32), (2, 1)),
        anchors=ANCHORS,
        keep=KEEP,
    )

    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    tx, sched = optim.make_optimizer(lr=LR, steps=10, schedule="constant", weight_decay=WD, clip_norm=CLIP)
    _, state, shardings = st.init_train_state(draft, tx, mesh)
    step_cfg = st.StepConfig(num_anchors=ANCHORS.shape[1], loss=LossSection(per_token="kd"))
    train_step = st.TrainStep(
        draft=draft, state_shardings=shardings, target=target.model, tx=tx, schedule=sched, cfg=step_cfg, mesh=mesh
    )

    params = list(ref_model.dflash_module.parameters())
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD)
    for step in range(2):
        ref = oracle.ref_dflash_forward(ref_model, ids, labels, ANCHORS, KEEP, kd=True)
        ref_norm = float(torch.nn.utils.clip_grad_norm_(params, CLIP))
        opt.step()
        state, metrics = train_step(state, batch, jax.random.key(0))
        np.testing.assert_allclose(float(metrics["loss"]), ref["loss"], rtol=1e-5, err_msg=f"step {step}")
        np.testing.assert_allclose(float(metrics["grad_norm"]), ref_norm, rtol=1e-5, err_msg=f"step {step}")
        assert ref_norm > CLIP  # clipping is exercised
        ours = to_torch_tensors(state.params)
        theirs = oracle.ref_draft_state(ref_model)
        assert set(ours) == set(theirs)
        for name, want in theirs.items():
            # 1e-5 relative per tensor (L2); per element 5e-6 absolute = 5e-3 * lr, since Adam moves a parameter
            # whose gradient is ~0 up to rounding by up to lr * g / (|g| + eps), amplifying that rounding (the fused
            # loss scales its gradient by 1/den after the vocabulary matmul, the attention contracts in another
            # order: ~5e-7 relative L2 from autodiff's order; largest element seen 2.2e-6, 1 of 2048).
            err = np.linalg.norm(ours[name] - want)
            assert err <= 1e-5 * np.linalg.norm(want), (name, step, err, np.linalg.norm(want))
            np.testing.assert_allclose(ours[name], want, rtol=0, atol=5e-6, err_msg=f"{name} step {step}")
    moved = np.abs(to_torch_tensors(state.params)["fc.weight"] - initial["fc.weight"])
    assert moved.max() > LR  # two real updates happened (the comparison is not vacuous)
