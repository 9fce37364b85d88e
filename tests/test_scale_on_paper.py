"""scripts/scale_on_paper.py: the per-device state formula vs the compiled sharded train step on 8 CPU devices.

Tolerance: the compiled step's per-device *argument* bytes are the sum of its input buffers (target params, draft
master + Adam state + int32 counters, this device's batch rows, the PRNG key) with no padding on the CPU backend,
so the formula must match them exactly; the *outputs* are the state (donated, so aliased byte for byte) plus the
metrics scalars, a few hundred bytes (bounded here by 1 KiB).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))

import scale_on_paper as sop
from dflash_jax import sharding
from dflash_jax.config import LossSection
from dflash_jax.models import layers
from dflash_jax.models.draft import DFlashDraft, DraftConfig
from dflash_jax.models.target import TargetConfig, make_target_model
from dflash_jax.train import optim
from dflash_jax.train import step as st

# Tiny but not trivial: V = 250 is divisible by 2 but not by 4 or 8 (vocab replicated when tensor >= 4).
TC = TargetConfig(
    arch="qwen3",
    vocab_size=250,
    hidden_size=64,
    intermediate_size=128,
    num_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    qk_norm=True,
)
DC = DraftConfig(
    hidden_size=64,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=96,
    vocab_size=250,
    num_target_layers=4,
    target_layer_ids=(1, 2),
    block_size=4,
    mask_token_id=0,
    rope_theta=1e6,
)
B, S, N = 8, 32, 3


def _compiled(mesh_shape, kd):
    mesh = sharding.make_mesh(mesh_shape)
    with layers.unsharded_init():
        draft = DFlashDraft(DC, rngs=nnx.Rngs(0), param_dtype=jnp.float32, dtype=jnp.bfloat16)
    tx, sched = optim.make_optimizer(lr=1e-3, steps=10)
    _, state, shardings = st.init_train_state(draft, tx, mesh)
    cfg = st.StepConfig(num_anchors=N, loss=LossSection(per_token="kd" if kd else "ce"))
    ts = st.TrainStep(
        draft=draft,
        state_shardings=shardings,
        target=make_target_model(TC, dtype="bfloat16"),
        tx=tx,
        schedule=sched,
        cfg=cfg,
        mesh=mesh,
    )
    rng = np.random.default_rng(0)
    host = dict(
        input_ids=rng.integers(1, TC.vocab_size, (B, S)).astype(np.int32),
        loss_mask=np.ones((B, S), np.float32),
        segment_ids=np.ones((B, S), np.int32),
        positions=np.tile(np.arange(S, dtype=np.int32), (B, 1)),
    )
    compiled = ts.jitted.lower(state, ts.target_state, ts.place_batch(host), jax.random.key(0)).compile()
    batch_bytes = sum(v.nbytes for v in host.values()) // (mesh.shape["data"] * mesh.shape["fsdp"])
    return compiled.memory_analysis(), batch_bytes


@pytest.mark.parametrize(
    "mesh_shape,kd", [((8, 1, 1), False), ((1, 8, 1), True), ((2, 2, 2), False), ((1, 2, 4), True)]
)
def test_formula_matches_compiled_per_device_bytes(mesh_shape, kd):
    ma, batch_bytes = _compiled(mesh_shape, kd)
    want = sop.state_bytes(TC, DC, sop.MeshShape(*mesh_shape), kd=kd)
    key_bytes = 8  # one threefry key: uint32[2]
    assert ma.argument_size_in_bytes - batch_bytes - key_bytes == want["persistent"]
    draft_state = want["draft_master"] + want["adam"] + want["counters"]
    assert ma.alias_size_in_bytes == draft_state  # the donated state is updated in place
    assert 0 < ma.output_size_in_bytes - draft_state <= 1024  # + metrics scalars


def test_sharded_formula_pieces():
    m = sop.MeshShape(1, 2, 4)
    assert sop.sh(250, 4) == 250 and sop.sh(250, 2) == 125 and sop.sh(64, 2) == 32
    # embed_tokens + lm_head: vocab 250 not divisible by tensor 4 -> whole, hidden over fsdp 2.
    full = sop.target_elems(TC, sop.MeshShape(1, 1, 1), (1, 2), kd=True)
    sharded = sop.target_elems(TC, m, (1, 2), kd=True)
    assert full - sharded > 0 and sharded >= 2 * 250 * 32
    # without KD the layer after the last tap (and the final norm) are not read by the step
    layer = sop.layer_elems(64, 4, 2, 16, 128, True, sop.MeshShape(1, 1, 1))
    assert full - sop.target_elems(TC, sop.MeshShape(1, 1, 1), (1, 2), kd=False) == layer + 64


def test_plan_picks_most_data_parallel_mesh_that_fits():
    r = sop.plan(sop.QWEN3_8B, 8, 79.6)
    assert r["fits"] and r["mesh"] == sop.MeshShape(8, 1, 1)
    r70 = sop.plan(sop.LLAMA_70B, 8, 79.6)
    assert r70["fits"] and r70["total"] <= 0.9 * 79.6 and r70["mesh"].data < 8
    assert not sop.plan(sop.LLAMA_70B, 1, 79.6)["fits"]
    assert sorted((m.data, m.fsdp, m.tensor) for m in sop.meshes(4)) == [
        (1, 1, 4),
        (1, 2, 2),
        (1, 4, 1),
        (2, 1, 2),
        (2, 2, 1),
        (4, 1, 1),
    ]


def test_bad_mesh_raises():
    with pytest.raises(ValueError, match="MeshShape.fsdp"):
        sop.MeshShape(1, 0, 1)
