"""Orbax checkpoints: interval / keep / final save, exact restore (also onto another mesh), leftovers of killed
writers removed, damaged steps detected by their manifest with a fall back, config-fingerprint mismatch rejected."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as tf
from dflash_jax.train import checkpoint as ck
from dflash_jax.train import optim
from dflash_jax.train import step as st

FP = ck.config_fingerprint(draft=tf.DRAFT_CFG, train={"block_size": tf.BS})


def _state(mesh_shape, bump: float = 0.0, step: int = 0):
    """A tiny TrainState on a mesh; params shifted by ``bump`` so different steps hold different values."""
    tx, _ = optim.make_optimizer(lr=1e-3, steps=10)
    _, state, shardings = st.init_train_state(tf.draft_model(), tx, tf.mesh_of(mesh_shape))
    params = jax.tree.map(lambda x: x + bump, state.params)
    return state.replace(params=params, step=jnp.int32(step), skipped_updates=jnp.int32(step // 2)), shardings


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_interval_keep_final_and_exact_restore(tmp_path):
    key = jax.random.key(7)
    with ck.Checkpointer(str(tmp_path), save_every=2, keep=2, fingerprint=FP) as mngr:
        saved = {}
        for step in range(1, 6):
            state, shardings = _state((2, 2, 2), bump=0.1 * step, step=step)
            did = mngr.save(state, data_state={"epoch": 0, "index": step}, rng=key, force=(step == 5))
            assert did == (step % 2 == 0 or step == 5)
            saved[step] = _host(state)
        mngr.wait()
        assert mngr.all_steps() == [4, 5]
        restored, meta = mngr.restore(st.abstract_state(state, shardings))
    assert meta["step"] == 5 and meta["data_state"] == {"epoch": 0, "index": 5}
    assert np.array_equal(jax.random.key_data(meta["rng"]), jax.random.key_data(key))
    for a, b in zip(_host(restored), saved[5]):
        np.testing.assert_array_equal(a, b)
    assert int(restored.skipped_updates) == 2


def test_restore_onto_another_mesh(tmp_path):
    state, _ = _state((2, 2, 2), bump=0.5, step=3)
    with ck.Checkpointer(str(tmp_path), save_every=1, fingerprint=FP) as mngr:
        mngr.save(state)
    for shape in [(1, 4, 2), (1, 1, 1)]:
        target, shardings = _state(shape)
        with ck.Checkpointer(str(tmp_path), save_every=1, fingerprint=FP) as mngr:
            restored, meta = mngr.restore(st.abstract_state(target, shardings))
        for a, b in zip(_host(restored), _host(state)):
            np.testing.assert_array_equal(a, b)
        for leaf, sh in zip(jax.tree.leaves(restored.params), jax.tree.leaves(shardings.params)):
            assert leaf.sharding == sh
        assert meta["step"] == 3 and meta["rng"] is None


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    state, shardings = _state((1, 1, 1), bump=0.25, step=2)
    with ck.Checkpointer(str(tmp_path), save_every=1, fingerprint=FP) as mngr:
        mngr.save(state)
    os.makedirs(tmp_path / "7" / "params")  # a half-copied / half-deleted step: no metadata, items missing
    (tmp_path / "7" / "params" / "partial").write_text("x")
    os.makedirs(tmp_path / "7.incomplete" / "params")  # a quarantine left by an older version
    os.makedirs(tmp_path / "9.orbax-checkpoint-tmp" / "params")  # an unfinished Orbax write
    with ck.Checkpointer(str(tmp_path), save_every=1, fingerprint=FP, read_only=True) as reader:
        assert reader.all_steps() == [2]  # a reader ignores them and touches nothing
    assert sorted(os.listdir(tmp_path)) == ["2", "7", "7.incomplete", "9.orbax-checkpoint-tmp"]
    with ck.Checkpointer(str(tmp_path), save_every=1, fingerprint=FP) as mngr:
        assert sorted(os.listdir(tmp_path)) == ["2"]
        restored, meta = mngr.restore(st.abstract_state(state, shardings))
        assert meta["step"] == 2
        with pytest.raises(FileNotFoundError, match="step 7"):
            mngr.restore(st.abstract_state(state, shardings), step=7)
        assert mngr.save(state.replace(step=jnp.int32(7)))  # the step number can be written again
        mngr.wait()
        assert mngr.all_steps() == [2, 7]


def test_damaged_step_falls_back_to_the_newest_good_one(tmp_path, caplog):
    """A flipped byte in step 4's data: a warning naming step 4 and the file, step 2 restored, step 4 set aside
    under a free name (``4.corrupt`` is taken) and writable again; an explicit ``step=4`` is an error."""
    states = {s: _state((1, 1, 1), bump=0.1 * s, step=s) for s in (2, 4)}
    with ck.Checkpointer(str(tmp_path), save_every=2, keep=3, fingerprint=FP) as mngr:
        for s in (2, 4):
            mngr.save(states[s][0])
    assert os.path.isfile(tmp_path / "4" / ck.MANIFEST_FILE)
    data = max((os.path.join(r, f) for r, _, fs in os.walk(tmp_path / "4" / "params") for f in fs), key=os.path.getsize)
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.makedirs(tmp_path / "4.corrupt")
    abstract = st.abstract_state(*states[4])
    with ck.Checkpointer(str(tmp_path), save_every=2, fingerprint=FP, read_only=True) as reader:
        with pytest.raises(ValueError, match="step 4 .* is damaged: params/.* does not match its SHA-256"):
            reader.restore(abstract, step=4)
    with ck.Checkpointer(str(tmp_path), save_every=2, keep=3, fingerprint=FP) as mngr:
        restored, meta = mngr.restore(abstract)
        assert meta["step"] == 2
        assert "checkpoint step 4" in caplog.text and "does not match its SHA-256" in caplog.text
        for a, b in zip(_host(restored), _host(states[2][0])):
            np.testing.assert_array_equal(a, b)
        assert os.path.isdir(tmp_path / "4.corrupt.1") and mngr.all_steps() == [2]
        assert mngr.save(states[4][0])
        mngr.wait()
        assert mngr.all_steps() == [2, 4]


def test_fingerprint_mismatch_names_the_field(tmp_path):
    state, shardings = _state((1, 1, 1))
    with ck.Checkpointer(str(tmp_path), save_every=1, fingerprint=FP) as mngr:
        mngr.save(state)
    other = ck.config_fingerprint(draft=tf.DRAFT_CFG, train={"block_size": 8})
    with ck.Checkpointer(str(tmp_path), save_every=1, fingerprint=other) as mngr:
        with pytest.raises(ValueError, match="train.block_size: checkpoint=4 config=8"):
            mngr.restore(st.abstract_state(state, shardings))


def test_empty_dir_and_bad_args(tmp_path):
    state, shardings = _state((1, 1, 1))
    with ck.Checkpointer(str(tmp_path), save_every=1) as mngr:
        assert mngr.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            mngr.restore(st.abstract_state(state, shardings))
    with pytest.raises(ValueError, match="checkpoint_every"):
        ck.Checkpointer(str(tmp_path), save_every=0)


def test_fingerprint_and_key_json():
    fp = ck.config_fingerprint(draft=tf.DRAFT_CFG, extra={"ids": (1, 2), "dtype": jnp.float32})
    assert fp["draft.target_layer_ids"] == [1, 2] and fp["draft.block_size"] == tf.BS
    assert fp["extra.ids"] == [1, 2] and isinstance(fp["extra.dtype"], str)
    raw = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(np.asarray(ck.key_from_json(ck.key_to_json(raw))), np.asarray(raw))
