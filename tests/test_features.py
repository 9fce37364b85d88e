"""Offline feature dump (safetensors shards + index): content, atomic resume, validation, deterministic reader."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as tf
from dflash_jax.train import features as ft

ROWS = 10


def _batches():
    """A deterministic stream: 5 batches of 2 rows."""
    for i in range(ROWS // 2):
        yield tf.batch(b=2, seed=100 + i), {"epoch": 0}


def _all_rows():
    return {k: np.concatenate([b[k] for b, _ in _batches()]) for k in ft.BASE_KEYS}


@pytest.fixture(scope="module")
def target():
    return tf.target_model()


def _read_all(d, **kw):
    reader = ft.FeatureReader(str(d), layer_ids=tf.LAYER_IDS, hidden_size=tf.H, batch_size=ROWS, shuffle=False, **kw)
    return reader.next()[0]


def test_dump_contents_match_target(target, tmp_path):
    index = ft.dump_features(
        target,
        _batches(),
        str(tmp_path),
        tf.LAYER_IDS,
        with_teacher_hidden=True,
        shard_size=4,
        dtype="float32",
        forward_batch=3,
    )
    assert index["complete"] and index["num_rows"] == ROWS and [s["rows"] for s in index["shards"]] == [4, 4, 2]
    assert index["layer_ids"] == list(tf.LAYER_IDS) and index["hidden_size"] == tf.H and index["seq_len"] == tf.S
    rows = _all_rows()
    taps, final = target(
        jnp.asarray(rows["input_ids"]),
        positions=jnp.asarray(rows["positions"]),
        segment_ids=jnp.asarray(rows["segment_ids"]),
        layer_ids=tf.LAYER_IDS,
    )
    got = _read_all(tmp_path, with_teacher_hidden=True)
    for k in ft.BASE_KEYS:
        np.testing.assert_array_equal(got[k], rows[k])
    np.testing.assert_allclose(got["target_hidden"], np.asarray(taps), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["teacher_hidden"], np.asarray(final), rtol=1e-5, atol=1e-6)


def test_resume_skips_finished_shards(target, tmp_path):
    """A resumed dump is bit-equal to a one-go dump by construction (rows go through the target in the same padded
    groups of ``forward_batch`` rows), also when the resume point (row 4) falls inside a group of 8."""
    full = tmp_path / "full"
    ft.dump_features(target, _batches(), str(full), tf.LAYER_IDS, shard_size=4)
    part = tmp_path / "part"
    first = ft.dump_features(target, _batches(), str(part), tf.LAYER_IDS, shard_size=4, max_rows=4)
    assert first["num_rows"] == 4 and len(first["shards"]) == 1
    (part / "shard-00001.safetensors.tmp").write_bytes(b"half-written")  # a crash mid-shard
    mtime = os.path.getmtime(part / "shard-00000.safetensors")
    second = ft.dump_features(target, _batches(), str(part), tf.LAYER_IDS, shard_size=4)
    assert second["num_rows"] == ROWS and second["complete"]
    assert os.path.getmtime(part / "shard-00000.safetensors") == mtime  # not rewritten
    a, b = _read_all(full), _read_all(part)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert a["target_hidden"].dtype == np.float32  # stored bf16, read back as float32
    with pytest.raises(ValueError, match="layer_ids is \\[1, 2\\] there"):
        ft.dump_features(target, _batches(), str(part), (0, 1), shard_size=4)


def test_reader_validates_config(target, tmp_path):
    ft.dump_features(target, _batches(), str(tmp_path), tf.LAYER_IDS, shard_size=4)
    kw = dict(hidden_size=tf.H, batch_size=2)
    with pytest.raises(ValueError, match="layer_ids is \\[1, 2\\] but the config expects \\[1, 3\\]"):
        ft.FeatureReader(str(tmp_path), layer_ids=(1, 3), **kw)
    with pytest.raises(ValueError, match="hidden_size is 32 but the config expects 64"):
        ft.FeatureReader(str(tmp_path), layer_ids=tf.LAYER_IDS, hidden_size=64, batch_size=2)
    with pytest.raises(ValueError, match="seq_len is 16 but the config expects 32"):
        ft.FeatureReader(str(tmp_path), layer_ids=tf.LAYER_IDS, seq_len=32, **kw)
    with pytest.raises(ValueError, match="with_teacher_hidden"):
        ft.FeatureReader(str(tmp_path), layer_ids=tf.LAYER_IDS, with_teacher_hidden=True, **kw)
    index = json.loads((tmp_path / "index.json").read_text())
    index["shards"][0]["rows"] = 3  # index and file disagree
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="target_hidden has shape"):
        ft.FeatureReader(str(tmp_path), layer_ids=tf.LAYER_IDS, **kw)
    with pytest.raises(FileNotFoundError):
        ft.FeatureReader(str(tmp_path / "nope"), layer_ids=tf.LAYER_IDS, **kw)


def test_reader_order_is_deterministic_resumable_and_per_process(target, tmp_path):
    ft.dump_features(target, _batches(), str(tmp_path), tf.LAYER_IDS, shard_size=3)
    kw = dict(layer_ids=tf.LAYER_IDS, hidden_size=tf.H, batch_size=4, seed=5)
    r1 = ft.FeatureReader(str(tmp_path), **kw)
    seq = [r1.next()[0]["input_ids"] for _ in range(5)]  # crosses an epoch (10 rows, tail of 2 dropped)
    r2 = ft.FeatureReader(str(tmp_path), **kw)
    r2.next(), r2.next()
    state = json.loads(json.dumps(r2.state()))
    r3 = ft.FeatureReader(str(tmp_path), **kw)
    r3.restore(state)
    for expected in seq[2:]:
        np.testing.assert_array_equal(r3.next()[0]["input_ids"], expected)
    assert seq[2].shape == (4, tf.S) and not np.array_equal(seq[0], seq[2])
    all_rows = _all_rows()["input_ids"]
    epoch0 = np.concatenate(seq[:2])
    assert all(any(np.array_equal(r, a) for a in all_rows) for r in epoch0)
    assert len({r.tobytes() for r in epoch0}) == 8  # no repeats inside an epoch
    halves = [
        ft.FeatureReader(str(tmp_path), process_index=p, process_count=2, **kw).next()[0]["input_ids"] for p in range(2)
    ]
    np.testing.assert_array_equal(np.concatenate(halves), seq[0])
    with pytest.raises(ValueError, match="batch_size"):
        r3.restore(dict(state, batch_size=2))
