"""Every attention implementation against ``dense`` (values and gradients), the Pallas kernels interpreted on CPU,
and the whole train step with ``pallas`` lowered for TPU and CUDA (``jax.export``; no accelerator needed)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import train_fixtures as tf
from dflash_jax import blocks, losses
from dflash_jax import config as config_lib
from dflash_jax.models import attention, kernels
from dflash_jax.models.draft import training_masks
from dflash_jax.train.step import noise_ids

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}  # max |x - dense| relative to max |dense|
B, S, NH, KVH, HD = 2, 37, 4, 2, 16  # odd length, GQA (G = 2)
SEG = np.array([[1] * 20 + [2] * 17, [1] * 30 + [0] * 7])  # packed row; row with padding (segment 0)


def _close(got, want, dtype, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= TOL[dtype] * scale, f"{what}: {np.abs(got - want).max()} vs scale {scale}"


def _qkv(lq, lk, dtype, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, lq, NH, HD)).astype(dtype)
    k, v = (jax.random.normal(x, (B, lk, KVH, HD)).astype(dtype) for x in ks[1:3])
    w = jax.random.normal(ks[3], (B, lq, NH, HD))
    return q, k, v, w


def _value_and_grads(fn, w, *args):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * w), argnums=(0, 1, 2)))(*args)


def test_config_switch_matches_module():
    assert attention.IMPLEMENTATIONS == ("auto", "dense", "chunked", "pallas")
    assert config_lib.from_dict({}).train.attention == "auto"
    with pytest.raises(ValueError, match="train.attention"):
        config_lib.from_dict({"train": {"attention": "flash"}})
    assert attention.resolve("auto", "cpu", keys=attention.CHUNK + 1) == "chunked"
    assert attention.resolve("auto", "cpu", keys=attention.CHUNK) == "dense"
    assert attention.resolve("auto", "tpu") == attention.resolve("auto", "cuda", keys=8) == "pallas"
    with pytest.raises(ValueError, match="attention implementation"):
        attention.resolve("flash")


def _self_mask(window=None):
    """The target's dense reference mask, built here: ``t <= i``, same segment, ``t > i - window``."""
    i = np.arange(S)
    m = (i[None, :] <= i[:, None])[None] & (SEG[:, :, None] == SEG[:, None, :])
    if window is not None:
        m = m & (i[None, :] > i[:, None] - window)[None]
    return jnp.asarray(m)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl,tile", [("dense", 10), ("chunked", 10), ("chunked", 1000), ("pallas", 1000)])
@pytest.mark.parametrize("variant", ["causal", "swa_sinks_scale"])
def test_target_attention_matches_dense(impl, tile, variant, dtype, monkeypatch):
    """The target's packed causal attention: segment ids, GQA, odd length, several key chunks (8 keys each); a
    sliding layer with sinks and a non-default scale (gpt-oss / Gemma 3). ``tile`` 10: causal tiles of 10 query
    rows (:data:`attention.CAUSAL_TILE`; the sliding layer's tiles start keys at ``q0 - window + 1``) against the
    reference's whole square mask."""
    monkeypatch.setattr(attention, "CHUNK", 8)
    monkeypatch.setattr(attention, "CAUSAL_TILE", tile)
    q, k, v, w = _qkv(S, S, dtype)
    window, kw = (
        (None, {}) if variant == "causal" else (11, dict(scale=0.3, sinks=jax.random.normal(jax.random.key(5), (NH,))))
    )
    mask = attention.SelfMask(jnp.asarray(SEG), window=window, impl=impl)

    def fn(*a):
        return attention.attend(*a, mask, **kw)

    def ref(*a):
        return attention.masked_attention(*a, _self_mask(window), **kw)

    got, want = _value_and_grads(fn, w, q, k, v), _value_and_grads(ref, w, q, k, v)
    _close(jax.jit(fn)(q, k, v), jax.jit(ref)(q, k, v), dtype, "out")
    for g, r, name in zip(got[1], want[1], "qkv"):
        _close(g, r, dtype, f"d{name}")
    if "sinks" in kw:  # the sink logits are trained (gpt-oss): their gradient too
        gs = jax.grad(lambda sk: jnp.sum(attention.attend(q, k, v, mask, scale=0.3, sinks=sk).astype(jnp.float32) * w))
        gr = jax.grad(
            lambda sk: jnp.sum(
                attention.masked_attention(q, k, v, _self_mask(window), scale=0.3, sinks=sk).astype(jnp.float32) * w
            )
        )
        _close(gs(kw["sinks"]), gr(kw["sinks"]), dtype, "dsinks")


def _range_mask(lq, lk):
    """Per-query windows with empty rows (every 5th query sees nothing), segments, ranges crossing chunks."""
    i = np.arange(lq)
    hi = np.where(i % 5 == 0, 0, np.minimum(i + 3, lk))[None].repeat(B, 0)
    lo = np.where(i % 3 == 0, -1, i - 9)[None].repeat(B, 0)
    q_seg = np.array([[1] * lq, [2] * (lq // 2) + [1] * (lq - lq // 2)])
    k_seg = np.array([[1] * lk, [1] * (lk // 3) + [2] * (lk - lk // 3)])
    return attention.RangeMask(*(jnp.asarray(x, jnp.int32) for x in (q_seg, k_seg, lo, hi))), i % 5 == 0


@pytest.mark.parametrize("chunk", [1, 5, 8, 29, 64])
def test_chunked_range_attention_all_chunk_boundaries(chunk):
    """Output, log-sum-exp and gradients (through both) equal dense for chunks that do and do not divide Lk;
    queries that see no key give exactly zero output and zero gradient."""
    lq, lk = 23, 29
    q, k, v, w = _qkv(lq, lk, jnp.float32, seed=chunk)
    mask, empty = _range_mask(lq, lk)
    w_lse = jax.random.normal(jax.random.key(9), (B, KVH, NH // KVH, lq))

    def run(impl):
        def f(q, k, v):
            out, lse = attention.range_attention(q, k, v, mask, impl, chunk=chunk)
            return jnp.sum(out * w) + jnp.sum(jnp.where(lse > attention.MASK_VALUE / 2, lse, 0.0) * w_lse), (out, lse)

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, (out, lse)), grads = run("chunked")
    (_, (out_d, lse_d)), grads_d = run("dense")
    _close(out, out_d, jnp.float32, "out")
    _close(lse, lse_d, jnp.float32, "lse")
    for g, r, name in zip(grads, grads_d, "qkv"):
        _close(g, r, jnp.float32, f"d{name}")
    assert np.all(np.asarray(out)[:, empty] == 0) and np.all(np.asarray(grads[0])[:, empty] == 0)
    assert np.all(np.asarray(lse)[..., empty] == attention.MASK_VALUE)


@pytest.mark.parametrize("blocks_qk", [(8, 8), (16, 8), (8, 32)])
def test_pallas_range_kernel_interpreted(blocks_qk):
    """The forward kernel (interpret mode) with several query/key tiles, tile skipping and padded queries."""
    lq, lk = 37, 64
    q, k, v, _ = _qkv(lq, lk, jnp.float32, seed=3)
    mask, empty = _range_mask(lq, lk)
    out, lse = jax.jit(lambda *a: kernels.pallas_call(*a, mask, None, *blocks_qk))(q, k, v)
    out_d, lse_d = attention.range_attention(q, k, v, mask, "dense")
    _close(out, out_d, jnp.float32, "out")
    _close(lse, lse_d, jnp.float32, "lse")
    assert np.all(np.asarray(out)[:, empty] == 0)


@pytest.mark.parametrize("kernel", ["splash", "triton"])
def test_target_kernels_interpreted(kernel):
    """Splash (TPU) and the Triton flash kernel (GPU) of the target, interpreted on CPU: values and gradients."""
    fn = {"splash": kernels.splash_causal, "triton": kernels.triton_causal}[kernel]
    q, k, v, w = _qkv(S, S, jnp.float32)
    seg = jnp.asarray(SEG)
    got = _value_and_grads(lambda *a: fn(*a, seg, interpret=True), w, q, k, v)
    want = _value_and_grads(lambda *a: attention.masked_attention(*a, _self_mask()), w, q, k, v)
    _close(got[0], want[0], jnp.float32, "loss")
    for g, r, name in zip(got[1], want[1], "qkv"):
        _close(g, r, jnp.float32, f"d{name}")


BS, N, SC = 4, 4, 19  # block size, blocks, context length (odd)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "window,causal,sinks",
    [(None, False, False), (6, False, True), (None, True, False)],
    ids=["full", "swa_sinks", "causal"],
)
@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_block_sparse_attention_matches_dense(impl, window, causal, sinks, dtype, monkeypatch):
    """The draft's attention: packing, SWA, causal-in-block, a dropped block (exactly zero output and gradient),
    an anchor at its segment's start (no context), GQA, context chunks of 8 keys, attention sinks."""
    monkeypatch.setattr(attention, "CHUNK", 8)
    anchors = jnp.asarray([[0, 4, 9, 15], [2, 7, 12, 0]])
    keep = jnp.asarray([[True, True, True, True], [True, True, True, False]])
    seg = jnp.asarray([[1] * SC, [1] * 5 + [2] * 10 + [0] * 4])
    ks = jax.random.split(jax.random.key(1), 6)
    q = jax.random.normal(ks[0], (B, N * BS, NH, HD)).astype(dtype)
    kb, vb = (jax.random.normal(x, (B, N * BS, KVH, HD)).astype(dtype) for x in ks[1:3])
    kc, vc = (jax.random.normal(x, (B, SC, KVH, HD)).astype(dtype) for x in ks[3:5])
    w = jax.random.normal(ks[5], (B, N * BS, NH, HD))
    sk = jax.random.normal(jax.random.key(7), (NH,)) if sinks else None

    def fn(impl_):
        mask = training_masks(anchors, keep, seg, BS, window, causal, impl_)
        return lambda q, kb, vb, kc, vc: attention.block_sparse_attention(q, kb, vb, kc, vc, mask, sk)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * w), argnums=range(5)))(q, kb, vb, kc, vc)

    out, out_d = jax.jit(fn(impl))(q, kb, vb, kc, vc), jax.jit(fn("dense"))(q, kb, vb, kc, vc)
    _close(out, out_d, dtype, "out")
    g, g_d = grads(fn(impl)), grads(fn("dense"))
    for a, r, name in zip(g, g_d, ("q", "k_blk", "v_blk", "k_ctx", "v_ctx")):
        _close(a, r, dtype, f"d{name}")
    dropped = slice(3 * BS, 4 * BS)  # row 1, block 3
    assert np.all(np.asarray(out)[1, dropped] == 0)
    for a in g[:3]:
        assert np.all(np.asarray(a)[1, dropped] == 0)


@pytest.mark.parametrize("impl", ["chunked", "pallas"])
def test_draft_and_loss_gradients_match_dense(impl, monkeypatch):
    """End to end: target taps, then the draft forward and the D-PACE loss; gradients w.r.t. every draft parameter."""
    monkeypatch.setattr(attention, "CHUNK", 8)
    target, draft = tf.target_model(), tf.draft_model()
    graphdef, params = nnx.split(draft, nnx.Param)
    b, s, n = 2, tf.S, 3
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, tf.V, (b, s)), jnp.int32)
    seg = jnp.asarray([[1] * 9 + [2] * 7, [1] * 12 + [0] * 4])
    pos = jnp.asarray(np.stack([np.r_[np.arange(9), np.arange(7)], np.arange(s)]), jnp.int32)
    anchors, keep = jnp.asarray([[2, 8, 11], [1, 6, 0]]), jnp.asarray([[True, True, True], [True, True, False]])
    labels, lmask = blocks.block_targets(ids, (seg > 0).astype(jnp.float32), anchors, keep, tf.BS, seg)
    noise = target.embed(noise_ids(ids, anchors, keep, tf.BS, 0))

    def loss(impl_):
        taps, _ = target(ids, positions=pos, segment_ids=seg, layer_ids=tf.LAYER_IDS, attention_impl=impl_)

        def f(p):
            hidden = nnx.merge(graphdef, p)(
                noise, taps, anchors, keep, positions=pos, segment_ids=seg, attention_impl=impl_
            )
            return losses.block_loss_from_hidden(
                hidden.reshape(b, n, tf.BS, -1), target.lm_head_weight(), labels, lmask, objective="dpace"
            )[0]

        return taps, jax.value_and_grad(f)(params)

    taps, (value, grads) = jax.jit(lambda: loss(impl))()
    taps_d, (value_d, grads_d) = jax.jit(lambda: loss("dense"))()
    _close(taps, taps_d, jnp.float32, "taps")
    _close(value, value_d, jnp.float32, "loss")
    for (path, a), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads_d)):
        _close(a[...], r[...], jnp.float32, "/".join(map(str, path)))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_train_step_with_pallas_lowers(platform):
    """The whole compiled train step with ``pallas`` on a 2x2x2 mesh exports for TPU (Mosaic + splash) and CUDA
    (Triton), the kernels inside a per-batch-shard ``shard_map`` (SPMD cannot partition a custom call)."""
    ts, state, _ = tf.build((2, 2, 2), attention="pallas")
    batch = ts.place_batch(tf.batch(b=4))
    args = (state, ts.target_state, batch, jax.random.key(0))
    structs = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), args
    )
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with jax.set_mesh(ts.mesh):
        exported = jax.export.export(ts.jitted, platforms=[platform], disabled_checks=checks)(*structs)
    text = exported.mlir_module()
    assert ("tpu_custom_call" in text) if platform == "tpu" else ("__gpu$xla.gpu.triton" in text)
    assert "manual_computation" in text  # shard_map: each device runs the kernels on its own rows
