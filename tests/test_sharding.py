"""Mesh construction, the logical-axis rules table, multi-host detection and the optimizer (schedules, shardings)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import train_fixtures as tf
from dflash_jax.train import optim, sharding
from dflash_jax.train import step as st


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh((2, -1, 2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match=r"mesh.shape \[2, 2, 1\] has 4 devices, but this machine has 8"):
        sharding.make_mesh((2, 2, 1))
    with pytest.raises(ValueError, match="3 entries"):
        sharding.make_mesh((8, 1))
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh((-1, -1, 1))
    assert dict(sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1]).shape) == {"data": 1, "fsdp": 1,
                                                                                    "tensor": 1}


def test_logical_rules_mapping():
    mesh = tf.mesh_of((2, 2, 2))
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (8, 16), mesh) == P("fsdp", "tensor")
    assert sharding.logical_to_mesh_spec(("vocab", "embed"), (64, 32), mesh) == P("tensor", "fsdp")
    assert sharding.logical_to_mesh_spec(("norm",), (8,), mesh) == P(None)
    # not divisible -> replicated; the same mesh axis twice -> second use replicated
    assert sharding.logical_to_mesh_spec(("embed", "mlp"), (3, 16), mesh) == P(None, "tensor")
    assert sharding.logical_to_mesh_spec(("mlp", "q_heads"), (8, 8), mesh) == P("tensor", None)
    assert sharding.logical_to_mesh_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    # size-1 mesh axes are dropped
    assert sharding.logical_to_mesh_spec(("embed",), (8,), tf.mesh_of((8, 1, 1))) == P(None)
    with pytest.raises(ValueError, match="no rule"):
        sharding.logical_to_mesh_spec(("bogus",), (8,), mesh)
    with pytest.raises(ValueError, match="rank"):
        sharding.logical_to_mesh_spec(("embed",), (8, 8), mesh)


def test_state_shardings_place_draft_params():
    mesh = tf.mesh_of((2, 2, 2))
    _, params = st.split_draft(tf.draft_model())
    shardings = sharding.state_shardings(params, mesh)
    placed = sharding.place(params, shardings)
    assert placed["fc"]["kernel"][...].sharding.spec == P("tensor", "fsdp")  # ("fused", "embed")
    assert placed["layers"][0]["mlp"]["down_proj"]["kernel"][...].sharding.spec == P("tensor", "fsdp")
    assert placed["norm"]["weight"][...].sharding.spec == P(None)
    np.testing.assert_array_equal(np.asarray(placed["fc"]["kernel"][...]), np.asarray(params["fc"]["kernel"][...]))


def test_shard_batch_and_divisibility():
    mesh = tf.mesh_of((2, 2, 2))
    b = sharding.shard_batch(tf.batch(b=4), mesh)
    assert b["input_ids"].sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(b["input_ids"]), tf.batch(b=4)["input_ids"])
    with pytest.raises(ValueError, match="divisible by data\\*fsdp"):
        sharding.shard_batch(tf.batch(b=6), mesh)
    assert sharding.process_rows(8) == slice(0, 8)


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"TPU_WORKER_HOSTNAMES": "host0"}, False),
    ({"TPU_WORKER_HOSTNAMES": "host0,host1"}, True),
])
def test_multihost_detection(env, expected):
    assert sharding._env_wants_multihost(env) is expected
    if not expected:
        assert sharding.maybe_initialize_distributed(env) is False


def test_schedules():
    lin = optim.make_schedule(lr=1.0, steps=10, schedule="linear", warmup_steps=2)
    np.testing.assert_allclose([float(lin(i)) for i in (0, 1, 2, 6, 10)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)
    cos = optim.make_schedule(lr=1.0, steps=10, schedule="cosine", warmup_ratio=0.2)
    np.testing.assert_allclose([float(cos(i)) for i in (0, 2, 6, 10)], [0.0, 1.0, 0.5, 0.0], atol=1e-6)
    const = optim.make_schedule(lr=0.5, steps=10, schedule="constant")
    assert float(const(0)) == float(const(9)) == 0.5
    assert optim.warmup_steps_for(100, None, 0.04) == 4
    with pytest.raises(ValueError, match="schedule"):
        optim.make_schedule(lr=1.0, steps=10, schedule="step")
    with pytest.raises(ValueError, match="warmup_ratio"):
        optim.make_schedule(lr=1.0, steps=10, warmup_ratio=1.5)


def test_adamw_matches_closed_form_and_clips():
    """One AdamW step (bias-corrected, decoupled decay) and global-norm clipping, by hand."""
    tx, _ = optim.make_optimizer(lr=0.1, steps=10, schedule="constant", weight_decay=0.5, clip_norm=1.0)
    p = {"w": jnp.array([1.0, -2.0])}
    g = {"w": jnp.array([3.0, 4.0])}  # norm 5 -> clipped to [0.6, 0.8]
    upd, _ = tx.update(g, tx.init(p), p)
    gc = np.array([0.6, 0.8])
    adam = gc / (np.abs(gc) + 1e-8)  # first step: m_hat = g, sqrt(v_hat) = |g|
    expected = np.array([1.0, -2.0]) - 0.1 * (adam + 0.5 * np.array([1.0, -2.0]))
    np.testing.assert_allclose(np.asarray(optax.apply_updates(p, upd)["w"]), expected, rtol=1e-6)


def test_opt_state_shardings_follow_params():
    mesh = tf.mesh_of((2, 2, 2))
    tx, _ = optim.make_optimizer(lr=1e-3, steps=10)
    _, state, shardings = st.init_train_state(tf.draft_model(), tx, mesh)
    adam = state.opt_state[1][0]
    assert isinstance(adam, optax.ScaleByAdamState)
    for leaf_p, leaf_mu in zip(jax.tree.leaves(state.params), jax.tree.leaves(adam.mu)):
        assert leaf_mu.sharding.spec == leaf_p.sharding.spec
    assert adam.count.sharding.spec == P()
