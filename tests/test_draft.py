"""DFlash draft model: config validation, parameters, block-sparse attention vs a dense-mask reference, the
inference path (context KV cache + propose) against the training forward, packing, mixed precision."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dflash_jax.models import layers
from dflash_jax.models.attention import block_sparse_attention, masked_attention
from dflash_jax.models.draft import DFlashDraft, DraftCache, DraftConfig, training_masks

BS = 4
BASE = dict(
    hidden_size=32,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    vocab_size=64,
    num_target_layers=6,
    target_layer_ids=(1, 3),
    block_size=BS,
    mask_token_id=0,
    rope_theta=1e4,
)


def _cfg(**kw) -> DraftConfig:
    return DraftConfig(**{**BASE, **kw})


def _model(cfg, seed=0, **kw) -> DFlashDraft:
    with layers.unsharded_init():
        model = DFlashDraft(cfg, rngs=nnx.Rngs(seed), **kw)
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        if "norm" in str(path[-2]):  # non-trivial norm weights, so that parity exercises them
            var[...] = 1.0 + 0.2 * jax.random.normal(jax.random.key(len(path) + var[...].shape[0]), var[...].shape)
    nnx.update(model, state)
    return model


_extend = nnx.jit(lambda m, c, x, p, nv: m.extend_cache(c, x, p, num_valid=nv))
_propose = nnx.jit(lambda m, c, x, start: m.propose(c, x, start))


@nnx.jit
def _forward(model, noise, target_hidden, anchors, keep, positions, segment_ids):
    return model(noise, target_hidden, anchors, keep, positions=positions, segment_ids=segment_ids)


def _inputs(cfg, b, s, n, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return (
        jax.random.normal(k1, (b, n * cfg.block_size, cfg.hidden_size)),
        jax.random.normal(k2, (b, s, cfg.num_features * cfg.hidden_size)),
    )


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("target_layer_ids", (1, 6)),
        ("target_layer_ids", (-1,)),
        ("target_layer_ids", ()),
        ("sliding_window", 3),
        ("mask_token_id", 64),
        ("num_key_value_heads", 3),
        ("head_dim", 7),
        ("num_layers", 0),
        ("hidden_size", 2.5),
        ("rope_theta", 0.0),
        ("rms_norm_eps", -1.0),
    ],
)
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value})


def test_config_from_target_uses_reference_layer_ids():
    cfg = DraftConfig.from_target(
        32,
        64,
        36,
        num_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        block_size=4,
    )
    assert cfg.target_layer_ids == (1, 9, 17, 25, 33) and cfg.num_layers == 5 and cfg.num_features == 5
    assert isinstance(_cfg(target_layer_ids=[1, 1]).target_layer_ids, tuple)  # lists normalised, duplicates legal


# ---------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------


def test_parameters_shapes_count_and_logical_axes():
    cfg = _cfg()
    model = _model(cfg)
    state = nnx.state(model, nnx.Param)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    h, t, i, nh, kvh, hd, ld = 32, 2, 48, 4, 2, 8, 2
    assert len(flat) == 3 + 11 * ld
    assert flat["fc.kernel"][...].shape == (t * h, h)
    assert flat["layers.1.self_attn.k_proj.kernel"][...].shape == (h, kvh * hd)
    assert flat["layers.0.self_attn.q_norm.weight"][...].shape == (hd,)
    assert flat["layers.0.mlp.down_proj.kernel"][...].shape == (i, h)
    n_params = sum(v[...].size for v in flat.values())
    assert n_params == t * h * h + 2 * h + ld * (2 * h * nh * hd + 2 * h * kvh * hd + 2 * hd + 3 * h * i + 2 * h)
    axes = {k: v.get_metadata()["out_sharding"] for k, v in flat.items()}
    assert axes["fc.kernel"] == ("fused", "embed")
    assert axes["layers.0.self_attn.q_proj.kernel"] == ("embed", "q_heads")
    assert axes["layers.0.self_attn.o_proj.kernel"] == ("q_heads", "embed")
    assert axes["layers.0.mlp.gate_proj.kernel"] == ("embed", "mlp")
    assert axes["norm.weight"] == ("norm",)
    assert not any("embed_tokens" in k or "lm_head" in k for k in flat)  # borrowed from the target


# ---------------------------------------------------------------------------------------------------------
# Training attention: block-sparse == dense mask
# ---------------------------------------------------------------------------------------------------------


def dense_mask(anchors, keep, segment_ids, bs, window, causal):
    """Independent numpy statement of the reference's dense training mask (docs/design.md §4.4), packed-segment
    aware."""
    b, n = anchors.shape
    s = segment_ids.shape[1]
    q = n * bs
    m = np.zeros((b, q, s + q), bool)
    for bi in range(b):
        for qi in range(q):
            blk, j = divmod(qi, bs)
            a = anchors[bi, blk]
            if not keep[bi, blk]:
                continue
            for t in range(s):
                ok = t < a and segment_ids[bi, t] == segment_ids[bi, a]
                m[bi, qi, t] = ok and (window is None or t > a + j - window)
            for jj in range(bs):
                m[bi, qi, s + blk * bs + jj] = not causal or jj <= j
    return m


@pytest.mark.parametrize("window,causal", [(None, False), (5, False), (None, True)], ids=["full", "swa", "causal"])
def test_block_sparse_attention_equals_dense_mask(window, causal):
    b, s, n, nh, kvh, hd = 2, 12, 3, 4, 2, 8
    anchors = np.array([[0, 4, 9], [2, 7, 0]])
    keep = np.array([[True, True, True], [True, True, False]])  # anchor 0 kept (no context); one dropped block
    seg = np.array([[1] * 12, [1] * 5 + [2] * 5 + [0] * 2])
    ks = jax.random.split(jax.random.key(1), 5)
    q = jax.random.normal(ks[0], (b, n * BS, nh, hd))
    kb, vb = (jax.random.normal(k, (b, n * BS, kvh, hd)) for k in ks[1:3])
    kc, vc = (jax.random.normal(k, (b, s, kvh, hd)) for k in ks[3:5])
    mask = training_masks(jnp.asarray(anchors), jnp.asarray(keep), jnp.asarray(seg), BS, window, causal, "dense")
    ctx_mask = mask.ctx.visible()
    dense = jnp.asarray(dense_mask(anchors, keep, seg, BS, window, causal))
    np.testing.assert_array_equal(np.asarray(ctx_mask), np.asarray(dense[..., :s]))
    visible = np.asarray(dense.any(-1))
    assert (~visible).sum() == BS  # exactly the dropped block's rows are fully masked

    def sparse(q, kb, vb, kc, vc):
        return block_sparse_attention(q, kb, vb, kc, vc, mask)

    def reference(q, kb, vb, kc, vc):
        return masked_attention(q, jnp.concatenate([kc, kb], 1), jnp.concatenate([vc, vb], 1), dense)

    def weighted_grads(fn, w):
        return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * w), argnums=(0, 1, 2, 3, 4)))(q, kb, vb, kc, vc)

    out, ref = jax.jit(sparse)(q, kb, vb, kc, vc), jax.jit(reference)(q, kb, vb, kc, vc)
    np.testing.assert_allclose(np.asarray(out)[visible], np.asarray(ref)[visible], atol=1e-6)
    assert np.all(np.asarray(out)[~visible] == 0)  # fully masked rows: exactly zero, never NaN

    # Gradients of a loss weighted like the reference's (zero weight on dropped rows) agree; NaN-free everywhere.
    w = jax.random.normal(jax.random.key(2), out.shape) * visible[..., None, None]
    g_sparse, g_ref = weighted_grads(sparse, w), weighted_grads(reference, w)
    for gs, gr in zip(g_sparse, g_ref):
        np.testing.assert_allclose(np.asarray(gs), np.asarray(gr), atol=1e-5)
    # Even with a non-zero cotangent on fully masked rows, they contribute exactly zero gradient.
    g_all = weighted_grads(sparse, 1.0)
    assert all(bool(jnp.isfinite(g).all()) for g in g_all)
    assert np.all(np.asarray(g_all[0])[~visible] == 0)
    assert np.all(np.asarray(g_all[1])[~visible] == 0)


def test_training_forward_blocks_are_independent():
    """Changing a dropped block's inputs or another block's noise never changes a kept block's output."""
    cfg = _cfg(sliding_window=6)
    model = _model(cfg)
    b, s, n = 1, 16, 3
    noise, th = _inputs(cfg, b, s, n)
    anchors = jnp.array([[3, 9, 5]], jnp.int32)
    keep = jnp.array([[True, True, False]])
    pos, seg = jnp.arange(s)[None], jnp.ones((1, s), jnp.int32)
    out = _forward(model, noise, th, anchors, keep, pos, seg)
    noise2 = noise.at[:, 2 * BS :].set(7.0).at[:, :BS].add(1.0)  # perturb the dropped block and block 0
    out2 = _forward(model, noise2, th, anchors.at[0, 2].set(12), keep, pos, seg)
    np.testing.assert_array_equal(np.asarray(out[:, BS : 2 * BS]), np.asarray(out2[:, BS : 2 * BS]))
    assert not np.allclose(out[:, :BS], out2[:, :BS])
    # Context at or after the anchor (and outside the window) is invisible: perturb rows 9.. and 0..3.
    th2 = th.at[:, 9:].set(3.0).at[:, :4].set(-3.0)
    out3 = _forward(model, noise, th2, anchors, keep, pos, seg)
    np.testing.assert_array_equal(np.asarray(out[:, BS : 2 * BS]), np.asarray(out3[:, BS : 2 * BS]))
    assert bool(jnp.isfinite(out).all())


def test_packed_segment_equals_unpacked_row():
    """A block in the 2nd packed conversation (positions restart) equals the same block in an unpacked row."""
    cfg = _cfg()
    model = _model(cfg)
    noise, th = _inputs(cfg, 1, 16, 1, seed=3)
    seg = jnp.array([[1] * 7 + [2] * 9])
    pos = jnp.concatenate([jnp.arange(7), jnp.arange(9)])[None]
    packed = _forward(model, noise, th, jnp.array([[12]]), jnp.array([[True]]), pos, seg)
    th_b = jnp.pad(th[:, 7:], ((0, 0), (0, 7), (0, 0)))  # conversation 2 alone, right-padded to the same S
    alone = _forward(
        model, noise, th_b, jnp.array([[5]]), jnp.array([[True]]), jnp.arange(16)[None], jnp.ones((1, 16), jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(packed), np.asarray(alone), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# Inference: KV cache + propose == training forward of one kept block anchored at L
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 5}, {"causal": True}], ids=["full", "swa", "causal"])
def test_propose_matches_training_forward(kw):
    cfg = _cfg(**kw)
    model = _model(cfg)
    b, s = 2, 16
    lengths = np.array([9, 6])
    noise, th = _inputs(cfg, b, s, 1, seed=4)
    cache = model.init_cache(b, 20)
    assert cache.k.shape == (2, b, 20, 2, 8) and cache.length.dtype == jnp.int32
    pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    # Two chunks: a static 8-row chunk carrying 5 real rows, then the rest (rows past length are ignored).
    cache = _extend(model, cache, th[:, :8], pos[:, :8], jnp.array([5, 5]))
    cache = _extend(model, cache, th[:, 5:13], pos[:, 5:13], jnp.asarray(lengths - 5))
    assert cache.length.tolist() == lengths.tolist()
    proposed = _propose(model, cache, noise, cache.length)
    for i, length in enumerate(lengths):
        ref = _forward(
            model,
            noise[i : i + 1],
            th[i : i + 1],
            jnp.array([[length]]),
            jnp.array([[True]]),
            pos[i : i + 1],
            jnp.ones((1, s), jnp.int32),
        )
        np.testing.assert_allclose(np.asarray(proposed[i]), np.asarray(ref[0]), atol=1e-5)

    # Rollback: crop to 4 and re-propose equals training with anchor 4; the stale rows 4.. are ignored.
    cropped = DFlashDraft.crop_cache(cache, 4)
    assert isinstance(cropped, DraftCache) and cropped.length.tolist() == [4, 4]
    again = _propose(model, cropped, noise, cropped.length)
    ref = _forward(model, noise, th, jnp.array([[4], [4]]), jnp.ones((2, 1), bool), pos, jnp.ones((b, s), jnp.int32))
    np.testing.assert_allclose(np.asarray(again), np.asarray(ref), atol=1e-5)


def test_cache_is_a_pytree_and_jits():
    cfg = _cfg()
    model = _model(cfg)
    cache = model.init_cache(1, 8, dtype=jnp.bfloat16)
    assert cache.k.dtype == jnp.bfloat16
    leaves = jax.tree.leaves(cache)
    assert len(leaves) == 3
    _, th = _inputs(cfg, 1, 4, 1)
    out = _extend(model, cache, th, jnp.arange(4)[None], None)
    assert out.length.tolist() == [4] and out.k.dtype == jnp.bfloat16
    assert float(jnp.abs(out.k[:, :, :4]).sum()) > 0 and float(jnp.abs(out.k[:, :, 4:]).sum()) == 0


# ---------------------------------------------------------------------------------------------------------
# Mixed precision and input checks
# ---------------------------------------------------------------------------------------------------------


def test_bf16_compute_close_to_fp32_and_finite():
    cfg = _cfg()
    m32 = _model(cfg)
    m16 = _model(cfg, dtype=jnp.bfloat16)
    nnx.update(m16, nnx.state(m32, nnx.Param))
    noise, th = _inputs(cfg, 1, 16, 2)
    args = (noise, th, jnp.array([[2, 8]]), jnp.array([[True, False]]), jnp.arange(16)[None], jnp.ones((1, 16), int))
    out32, out16 = _forward(m32, *args), _forward(m16, *args)
    assert out16.dtype == jnp.bfloat16 and nnx.state(m16, nnx.Param)["fc"]["kernel"][...].dtype == jnp.float32
    assert bool(jnp.isfinite(out16.astype(jnp.float32)).all())
    # bf16 keeps 8 significant bits (unit roundoff u = 2^-8). Each layer rounds at most ~20 times on the way to the
    # output (norms, q/k/v/context projections, RoPE, scores, softmax, PV, o_proj, SwiGLU, residuals), plus ~4
    # outside the layers; K independent roundings add in quadrature: error RMS <= sqrt(K) u of the output RMS.
    err = np.linalg.norm(np.asarray(out16, np.float32) - np.asarray(out32)) / np.linalg.norm(np.asarray(out32))
    assert err <= np.sqrt(20 * cfg.num_layers + 4) * 2.0**-8, err


def test_forward_rejects_bad_shapes():
    cfg = _cfg()
    model = _model(cfg)
    noise, th = _inputs(cfg, 1, 8, 1)
    with pytest.raises(ValueError, match="target_hidden"):
        model(noise, th[..., :32], jnp.array([[2]]), jnp.array([[True]]))
    with pytest.raises(ValueError, match="noise_emb"):
        model(noise[:, :3], th, jnp.array([[2]]), jnp.array([[True]]))
    with pytest.raises(ValueError, match="keep"):
        model(noise, th, jnp.array([[2]]), jnp.array([[True, False]]))
    with pytest.raises(ValueError, match="segment_ids"):
        model(noise, th, jnp.array([[2]]), jnp.array([[True]]), segment_ids=jnp.ones((1, 9), jnp.int32))
    cache = model.init_cache(1, 8)
    with pytest.raises(ValueError, match="block_start"):
        model.propose(cache, noise, jnp.array([0, 0]))


def test_config_is_hashable_and_frozen():
    cfg = _cfg()
    assert hash(cfg) == hash(_cfg())
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.block_size = 8  # type: ignore[misc]


def test_remat_gives_same_loss_and_grads():
    """``remat=True`` recomputes layers in the backward pass (the gradient program holds a remat / checkpoint
    primitive that ``remat=False`` lacks); values and gradients are unchanged up to fp32 rounding.

    The recomputed forward may be fused differently, so gradients agree to fp32 rounding relative to each
    tensor's scale (a few hundred ulps of its largest entry), not element-wise near zero."""
    cfg = _cfg()
    noise, target_hidden = _inputs(cfg, 2, 16, 2)
    anchors = jnp.array([[3, 8], [0, 5]], jnp.int32)
    keep = jnp.array([[True, True], [True, False]])
    results, programs = [], []
    for remat in (False, True):
        graphdef, params = nnx.split(_model(cfg, remat=remat))
        loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(noise, target_hidden, anchors, keep) ** 2)  # noqa: E731
        programs.append(str(jax.make_jaxpr(jax.value_and_grad(loss))(params)))
        results.append(jax.jit(jax.value_and_grad(loss))(params))
    remat_eqn = re.compile(r"\b(remat\w*|checkpoint)\[")
    assert not remat_eqn.search(programs[0]) and remat_eqn.search(programs[1])
    (l0, g0), (l1, g1) = results
    tol = 256 * np.finfo(np.float32).eps
    np.testing.assert_allclose(l1, l0, rtol=tol)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= tol * np.abs(a).max(), (np.abs(a - b).max(), np.abs(a).max())
