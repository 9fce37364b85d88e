"""Sharded target loading (issue 14 item 3) on the 8 simulated CPU devices: a training run assembled the way the
CLI assembles it (``run.assemble`` + ``run.build_step`` on the mesh built first) holds ONE device copy of the
target, placed straight onto its rules-table shardings and shared by the step and the eval; offline training
allocates only the embedding and ``lm_head``; an HF checkpoint loads holding one host tensor at a time."""

import dataclasses
import math
import os
import weakref

import jax
import numpy as np
from flax import nnx

from dflash_jax import config as config_lib
from dflash_jax import sharding
from dflash_jax.models import hf_io
from dflash_jax.models.target_io import build_target_model, head_tensors, is_unread, load_target, random_target
from dflash_jax.train import run
from test_target import CFG, _save_hf

MESH = "mesh.shape=[2,2,2]"


def _live_bytes() -> int:
    return sum(x.nbytes for x in jax.live_arrays())


def _shards(spec) -> int:
    """Devices a leaf is split over: the product of the mesh axes its PartitionSpec names."""
    axes = [a for entry in spec if entry for a in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod({"data": 2, "fsdp": 2, "tensor": 2}[a] for a in axes)


def _target_leaves(target):
    return dict(nnx.to_flat_state(nnx.state(target.model, nnx.Param)))


def test_online_run_holds_one_sharded_target_shared_by_step_and_eval():
    config = config_lib.load_config("tiny", [MESH, "eval.max_new_tokens=4"])
    mesh = sharding.make_mesh(config.mesh.shape)
    before = _live_bytes()
    target, renderer, draft_cfg = run.assemble(config, mesh, only=run.step_tensors(config))
    leaves = {p: v.get_value() for p, v in _target_leaves(target).items()}
    target_bytes = sum(x.nbytes for x in leaves.values())
    assert _live_bytes() - before == target_bytes  # loading made nothing else (no whole copy on device 0)
    want = sharding.state_shardings(nnx.state(target.model, nnx.Param), mesh)
    sharded = 0
    for path, x in leaves.items():
        assert isinstance(x, jax.Array) and x.sharding == dict(nnx.to_flat_state(want))[path].get_value(), path
        n = _shards(x.sharding.spec)
        sharded += n > 1
        assert len(x.sharding.device_set) == 8
        assert math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize * n == x.nbytes, path
    assert sharded >= len(leaves) // 2  # the rules table splits most of this target (norms stay replicated)

    state, shardings, step = run.build_step(config, target, draft_cfg, mesh)
    step_leaves = dict(nnx.to_flat_state(step.target_state))
    assert step_leaves.keys() == leaves.keys()
    assert all(step_leaves[p].get_value() is leaves[p] for p in leaves)  # the step's arrays ARE the loaded ones
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    assert _live_bytes() - before == target_bytes + state_bytes  # no second target copy

    rng = np.random.default_rng(0)
    b, s = config.data.batch_size, config.data.seq_len
    batch = {
        "input_ids": rng.integers(0, 500, (b, s), dtype=np.int32),
        "loss_mask": np.ones((b, s), np.float32),
        "segment_ids": np.ones((b, s), np.int32),
        "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
    }
    state, metrics = step(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    # The eval decodes with the same Target object, i.e. the same sharded arrays: no new target-sized buffer.
    prompt = renderer.render_prompt((("user", "Hello there"),))
    res = run.run_eval(target, draft_cfg, sharding.to_host(state.params), [prompt], config.eval)
    assert res["num_prompts"] == 1 and res["tau"] >= 1.0
    assert all(v.get_value() is leaves[p] for p, v in _target_leaves(target).items())
    assert _live_bytes() - before < target_bytes + 2 * state_bytes
    for path, x in leaves.items():  # the buffers themselves (Array.addressable_shards keeps views alive)
        assert all(s.data.nbytes * _shards(x.sharding.spec) == x.nbytes for s in x.addressable_shards), path


def test_offline_run_allocates_only_embedding_and_head(tmp_path):
    os.makedirs(tmp_path / "features")
    config = config_lib.load_config(
        "tiny",
        [
            MESH,
            "train.mode=offline",
            f"train.features_dir={tmp_path / 'features'}",
            "target.random.tie_word_embeddings=false",
        ],
    )
    assert run.step_tensors(config) is head_tensors
    mesh = sharding.make_mesh(config.mesh.shape)
    before = _live_bytes()
    target, _, draft_cfg = run.assemble(config, mesh, only=run.step_tensors(config))
    leaves = {p: v.get_value() for p, v in _target_leaves(target).items()}
    loaded = {p for p, x in leaves.items() if not is_unread(x)}
    assert loaded == {("embed_tokens",), ("lm_head",)}
    tc = target.config
    head_bytes = 2 * tc.vocab_size * tc.hidden_size * 4
    assert _live_bytes() - before == head_bytes  # no decoder-layer tensor was allocated

    state, _, step = run.build_step(config, target, draft_cfg, mesh)
    assert set(dict(nnx.to_flat_state(step.target_state))) == loaded
    b, s = config.data.batch_size, config.data.seq_len
    rng = np.random.default_rng(1)
    batch = {
        "input_ids": rng.integers(0, 500, (b, s), dtype=np.int32),
        "loss_mask": np.ones((b, s), np.float32),
        "segment_ids": np.ones((b, s), np.int32),
        "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
        "target_hidden": rng.normal(size=(b, s, draft_cfg.num_features * tc.hidden_size)).astype(np.float32),
        "teacher_hidden": rng.normal(size=(b, s, tc.hidden_size)).astype(np.float32),
    }
    _, metrics = step(state, batch, jax.random.key(0))
    assert np.isfinite(float(metrics["loss"]))
    # With in-training eval on, the eval needs the whole target: offline then loads it (once).
    evaluating = dataclasses.replace(config, train=dataclasses.replace(config.train, eval_every=5))
    assert run.step_tensors(evaluating) is None


def test_random_target_on_mesh_equals_unplaced_init():
    mesh = sharding.make_mesh((1, 4, 2))
    placed = random_target(CFG, seed=3, mesh=mesh)
    plain = random_target(CFG, seed=3)
    for (path, a), (_, b) in zip(_target_leaves(placed).items(), _target_leaves(plain).items()):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    assert placed.model.layers[0].mlp.up_proj.kernel[...].sharding.spec == jax.P("fsdp", "tensor")


def test_hf_load_onto_mesh_holds_one_host_tensor_at_a_time(tmp_path):
    """Loading an HF checkpoint onto a mesh keeps at most one fetched host tensor alive (host memory bounded by the
    largest tensor, not the checkpoint); with ``only`` the decoder layers are never read."""
    src = random_target(CFG, seed=0)
    _save_hf(src.model, CFG, tmp_path / "m", shards=3)
    cfg, reader, _ = hf_io.open_hf(str(tmp_path / "m"))
    alive, names, most = [], [], []

    def fetch(name, shape):
        most.append(sum(r() is not None for r in alive))  # earlier tensors still held when this one is read
        arr = reader(name, shape)
        alive.append(weakref.ref(arr))
        names.append(name)
        return arr

    mesh = sharding.make_mesh((1, 4, 2))
    got = build_target_model(cfg, fetch, mesh=mesh)
    assert len(names) == len(_target_leaves(src)) and max(most) == 0
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(got, nnx.Param)), _target_leaves(src).items()):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    names.clear()
    head = load_target(tmp_path / "m", mesh=mesh, only=head_tensors)
    assert not is_unread(head.model.embed_tokens.get_value()) and not is_unread(head.model.lm_head.get_value())
    assert is_unread(head.model.layers[0].mlp.up_proj.kernel.get_value())
    build_target_model(cfg, fetch, mesh=mesh, only=head_tensors)
    assert sorted(names) == ["lm_head.weight", "model.embed_tokens.weight"]
