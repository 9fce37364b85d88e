"""The compiled train step: mesh invariance, exact resume, non-finite skip, empty batches, offline == online,
mixed precision and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import train_fixtures as tf
from dflash_jax.train import checkpoint as ck
from dflash_jax.train import optim
from dflash_jax.train import step as st

KEY = jax.random.key(0)


@functools.cache
def _built(mesh_shape, **kw):
    """One compiled TrainStep per configuration (compiles are the cost on 2 CPU cores)."""
    return tf.build(mesh_shape, **kw)[0]


def _fresh_state(ts):
    tx, _ = optim.make_optimizer(lr=1e-3, steps=10, warmup_steps=0)
    return st.init_train_state(tf.draft_model(), tx, ts.mesh)[1]


def _host(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _run(ts, state, n, start=0):
    metrics = []
    for i in range(start, start + n):
        state, m = ts(state, tf.batch(seed=i), KEY)
        metrics.append({k: np.asarray(v) for k, v in m.items()})
    return state, metrics


def test_meshes_agree_with_single_device():
    """Loss, grad norm and params after 3 steps match the 1-device run within 1e-5.

    lr is 1e-4: Adam's first steps move every parameter by ~lr*sign(g), so a gradient entry that is ~0 up to
    reduction-order noise may move by up to 2*lr differently on another mesh; 1e-4 keeps that inside 1e-5."""
    one = _built((1, 1, 1), lr=1e-4)
    ref_state, ref_metrics = _run(one, _fresh_state(one), 3)
    assert all(np.isfinite(m["loss"]) and m["loss"] > 0 for m in ref_metrics)
    assert not np.allclose(_host(ref_state.params)[0], _host(_fresh_state(one).params)[0])
    for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
        ts = _built(shape, lr=1e-4)
        state, metrics = _run(ts, _fresh_state(ts), 3)
        for m, r in zip(metrics, ref_metrics):
            np.testing.assert_allclose(m["loss"], r["loss"], rtol=1e-5, err_msg=str(shape))
            np.testing.assert_allclose(m["grad_norm"], r["grad_norm"], rtol=1e-5, err_msg=str(shape))
        for a, b in zip(_host(state.params), _host(ref_state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=str(shape))
        assert int(state.step) == 3


def test_exact_resume(tmp_path):
    """2n steps straight == n steps + save + restore + n steps, bit for bit (params, opt state, metrics)."""
    ts, n = _built((2, 2, 2)), 2
    full_state, full_metrics = _run(ts, _fresh_state(ts), 2 * n)

    state, first = _run(ts, _fresh_state(ts), n)
    with ck.Checkpointer(str(tmp_path), save_every=100, fingerprint={"x": 1}) as mngr:
        assert mngr.save(state, data_state={"next_batch": n}, rng=KEY, force=True)
    abstract = st.abstract_state(state, ts.state_shardings)
    del state
    with ck.Checkpointer(str(tmp_path), save_every=100, fingerprint={"x": 1}) as mngr:
        restored, meta = mngr.restore(abstract)
    assert meta["data_state"] == {"next_batch": n} and int(restored.step) == n
    resumed_state, second = _run(ts, restored, n, start=meta["data_state"]["next_batch"])

    for a, b in zip(_host(resumed_state), _host(full_state)):
        np.testing.assert_array_equal(a, b)
    for m, r in zip(first + second, full_metrics):
        for k in r:
            np.testing.assert_array_equal(m[k], r[k], err_msg=k)


def test_nonfinite_batch_is_skipped():
    ts = _built((1, 1, 1), mode="offline")
    state = _fresh_state(ts)
    before = _host(state)
    b = tf.batch(b=8)
    good = np.random.default_rng(0).normal(size=(8, tf.S, len(tf.LAYER_IDS) * tf.H)).astype(np.float32)
    b["target_hidden"] = good.copy()
    b["target_hidden"][3, 5, 7] = np.nan
    state, m = ts(state, b, KEY)
    assert bool(m["update_skipped"]) and int(m["skipped_updates"]) == 1
    assert not np.isfinite(m["grad_norm"])
    assert int(state.step) == 1 and int(state.skipped_updates) == 1
    for a, c in zip(_host(state)[1:-1], before[1:-1]):  # params and optimizer state untouched
        np.testing.assert_array_equal(a, c)
    b["target_hidden"] = good
    state, m = ts(state, b, KEY)
    assert not bool(m["update_skipped"]) and np.isfinite(m["loss"]) and int(state.skipped_updates) == 1
    assert all(not np.array_equal(a, c) for a, c in zip(_host(state.params), before[1:]))


def test_batch_without_valid_anchor():
    ts = _built((1, 1, 1))
    state = _fresh_state(ts)
    before = _host(state.params)
    b = tf.batch()
    b["loss_mask"][:] = 0.0
    state, m = ts(state, b, KEY)
    assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0 and float(m["num_tokens"]) == 0.0
    assert all(np.all(np.isfinite(np.asarray(v, np.float64))) for v in m.values())
    assert int(state.step) == 1 and int(state.skipped_updates) == 0
    for a, c in zip(_host(state.params), before):
        np.testing.assert_array_equal(a, c)


def test_offline_features_equal_online_kd():
    """The step fed precomputed taps + teacher hidden equals the online step (KD objective)."""
    target = tf.target_model()
    online = _built((1, 1, 1), per_token="kd")
    offline = _built((1, 1, 1), per_token="kd", mode="offline")
    b = tf.batch(b=8, seed=3)
    taps, final = target(
        jnp.asarray(b["input_ids"]),
        positions=jnp.asarray(b["positions"]),
        segment_ids=jnp.asarray(b["segment_ids"]),
        layer_ids=tf.LAYER_IDS,
    )
    _, m_on = online(_fresh_state(online), b, KEY)
    _, m_off = offline(
        _fresh_state(offline), dict(b, target_hidden=np.asarray(taps), teacher_hidden=np.asarray(final)), KEY
    )
    np.testing.assert_allclose(float(m_off["loss"]), float(m_on["loss"]), rtol=1e-5)
    np.testing.assert_allclose(float(m_off["grad_norm"]), float(m_on["grad_norm"]), rtol=1e-4)


def test_bf16_compute_keeps_fp32_master():
    mesh = tf.mesh_of((1, 1, 1))
    tx, sched = optim.make_optimizer(lr=1e-3, steps=10, warmup_steps=0)
    draft16 = tf.draft_model(dtype=jnp.bfloat16)
    _, state16, sh = st.init_train_state(draft16, tx, mesh)
    ts16 = st.TrainStep(
        draft=draft16,
        state_shardings=sh,
        target=tf.target_model(),
        tx=tx,
        schedule=sched,
        cfg=tf.step_config(),
        mesh=mesh,
    )
    ts32 = _built((1, 1, 1))
    b = tf.batch(b=2)
    state16, m16 = ts16(state16, b, KEY)
    _, m32 = ts32(_fresh_state(ts32), b, KEY)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state16.params))
    np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=2e-2)
    assert float(m16["loss"]) != float(m32["loss"])


def test_bad_input_is_rejected():
    ts = _built((1, 1, 1))
    state = _fresh_state(ts)
    with pytest.raises(ValueError, match="seq_len 14 must be a multiple of block_size 4"):
        ts(state, tf.batch(s=14), KEY)
    b = tf.batch()
    del b["positions"]
    with pytest.raises(ValueError, match="missing \\['positions'\\]"):
        ts(state, b, KEY)
    with pytest.raises(ValueError, match="divisible by data\\*fsdp"):
        _built((2, 2, 2))(state, tf.batch(b=2), KEY)
    off = _built((1, 1, 1), mode="offline")
    b = tf.batch()
    b["target_hidden"] = np.zeros((8, tf.S, 3 * tf.H), np.float32)
    with pytest.raises(ValueError, match="target_hidden"):
        off(state, b, KEY)


def test_step_config_from_yaml_config():
    from dflash_jax import config

    c = config.Config()
    sc = st.StepConfig.from_config(c)
    assert sc.chunk_blocks == sc.num_anchors == c.train.num_anchors  # null = one chunk of all blocks
    assert (sc.loss, sc.mode) == (c.loss, c.train.mode)


def test_bf16_params_train_with_fp32_moments_and_resume(tmp_path):
    """``train.param_dtype: bfloat16``: bf16 parameters, fp32 Adam moments; the loss falls on a repeated batch and a
    checkpoint round trip resumes bit for bit. fp32 stays the default."""
    from dflash_jax import config as config_lib
    from dflash_jax.train import run

    assert config_lib.from_dict({}).train.param_dtype == "float32"
    fp32_draft = run.new_draft(tf.DRAFT_CFG, config_lib.TrainSection())
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.split_draft(fp32_draft)[1]))
    draft = run.new_draft(tf.DRAFT_CFG, config_lib.TrainSection(param_dtype="bfloat16"))
    mesh = tf.mesh_of((1, 1, 1))
    tx, sched = optim.make_optimizer(lr=3e-3, steps=20, warmup_steps=0)
    _, state, sh = st.init_train_state(draft, tx, mesh)
    ts = st.TrainStep(
        draft=draft,
        state_shardings=sh,
        target=tf.target_model(),
        tx=tx,
        schedule=sched,
        cfg=tf.step_config(),
        mesh=mesh,
    )
    b = tf.batch(b=2)
    losses_ = []
    for _ in range(8):
        state, m = ts(state, b, KEY)
        losses_.append(float(m["loss"]))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state.params))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert moments and all(x.dtype == jnp.float32 for x in moments)
    assert int(state.skipped_updates) == 0 and losses_[-1] < losses_[0] - 0.1, losses_

    with ck.Checkpointer(str(tmp_path), save_every=100, fingerprint={"x": 1}) as mngr:
        assert mngr.save(state, data_state={"next_batch": 8}, rng=KEY, force=True)
    abstract = st.abstract_state(state, ts.state_shardings)
    with ck.Checkpointer(str(tmp_path), save_every=100, fingerprint={"x": 1}) as mngr:
        restored, _ = mngr.restore(abstract)
    for a, r in zip(_host(restored), _host(state)):
        assert a.dtype == r.dtype
        np.testing.assert_array_equal(a, r)
    next_a, m_a = ts(restored, b, KEY)
    next_b, m_b = ts(state, b, KEY)
    np.testing.assert_array_equal(float(m_a["loss"]), float(m_b["loss"]))
    for a, r in zip(_host(next_a.params), _host(next_b.params)):
        np.testing.assert_array_equal(a, r)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 1)])
def test_grad_accum_equals_the_full_batch(mesh_shape):
    """``grad_accum=2`` (lax.scan over 2 micro-batches, partials summed, one normalisation) gives the K=1 loss,
    grad norm and params after each of 4 steps within 1e-6; also on a batch whose first micro-batch alone has no loss
    weight (its own zero-loss rule would fire: the global one must not) and on an all-masked batch (global zero
    loss and zero gradient; Adam's momentum still moves the params, equally in both)."""
    # lr 1e-4: Adam's first update is lr * g / (|g| + eps), so on elements with |g| near eps the fp32 summation
    # order of the fused loss's gradient (per micro-batch vs whole batch, sharded) moves an update by up to ~1e-2 lr.
    one = _built((1, 1, 1), per_token="kd", lr=1e-4)
    two = _built(mesh_shape, per_token="kd", grad_accum=2, lr=1e-4)
    half = tf.batch(seed=7)
    half["loss_mask"][0::2] = 0.0  # micro-batch 0 of K=2 = rows 0, 2, 4, 6: no weight at all
    empty = tf.batch(seed=8)
    empty["loss_mask"][:] = 0.0
    batches = [tf.batch(seed=0), half, tf.batch(seed=1), empty]
    s1, s2 = _fresh_state(one), _fresh_state(two)
    for i, b in enumerate(batches):
        s1, m1 = one(s1, b, KEY)
        s2, m2 = two(s2, b, KEY)
        for k in ("loss", "grad_norm", "accuracy", "weight_sum"):
            np.testing.assert_allclose(np.asarray(m2[k]), np.asarray(m1[k]), rtol=1e-6, atol=1e-7, err_msg=f"{i} {k}")
        for a, c in zip(_host(s2.params), _host(s1.params)):
            np.testing.assert_allclose(a, c, rtol=0, atol=1e-6, err_msg=str(i))
    assert float(m1["loss"]) == 0.0 and float(m2["loss"]) == 0.0 and float(m2["grad_norm"]) == 0.0
    assert float(np.asarray(_run(one, _fresh_state(one), 1)[1][0]["loss"])) > 0
