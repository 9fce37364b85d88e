"""Attention implementations shared by the target and the draft, selected by ``train.attention``.

Masks are described, never materialised by the callers: a :class:`RangeMask` says that key ``t`` (an index into
the key sequence) is visible to query ``i`` iff ``q_seg[i] == k_seg[t]`` and ``lo[i] < t < hi[i]``. That covers
the target's packed causal self-attention (:class:`SelfMask`: ``lo = -1`` or ``i - W`` on sliding layers,
``hi = i + 1``, segment ids) and the draft's context part (:class:`BlockMask`: block ``n`` slot ``j`` has
``hi = a_n`` or 0 for a dropped block, ``lo = a_n + j - W`` with a sliding window, ``q_seg = segment(a_n)``;
``docs/design.md`` §4.4). Per-head attention sinks (gpt-oss, DFlash ``attention_sink_bias``) join the
normaliser through the log-sum-exp (:func:`with_sinks`). The dense primitives (``masked_attention``,
``attention_scores``, ``sink_softmax``) are ``layers``' and serve every target family and the decode path.

Implementations (``IMPLEMENTATIONS``):

* ``dense``: fp32 scores ``[B, KVH, G, Lq, Lk]`` and one softmax (the parity baseline; the draft's dense path is
  the ``[Q, S]`` + block-diagonal ``[N, bs, bs]`` formulation of :func:`block_sparse_attention`);
* ``chunked``: pure XLA online softmax over key chunks (``lax.scan``) with a custom VJP that recomputes each
  chunk's probabilities from the saved log-sum-exp (flash attention's backward): ``O(Lq * chunk)`` memory;
* ``pallas``: the forward as a Pallas kernel (``kernels.range_attention_kernel``: Mosaic on TPU, Triton on GPU,
  ``interpret=True`` elsewhere) with the chunked backward; the target's packed causal attention uses splash
  attention on TPU and the Triton flash kernel of ``jax.experimental.pallas.ops.gpu.attention`` on GPU;
* ``auto``: the measured choice per backend and key length (:func:`resolve`).

Off the fused kernels the target's causal self-attention runs in tiles of :data:`CAUSAL_TILE` query rows, each
over the keys it can see (:func:`attend`): about half the scores of the whole ``S x S`` square.

Every implementation returns exactly zero output, and zero gradient, for a query that sees no key.
"""

from __future__ import annotations

import functools
import typing

import jax
import jax.numpy as jnp
from flax import struct
from jax.experimental import pallas as pl

from dflash_jax import config as config_lib
from dflash_jax.models import kernels
from dflash_jax.models.layers import (
    MASK_VALUE,
    attention_scores,
    attention_values,
    group_query_rows,
    grouped_scores,
    masked_attention,
    ungroup_query_rows,
)

__all__ = [
    "IMPLEMENTATIONS",
    "MASK_VALUE",
    "BlockMask",
    "RangeMask",
    "SelfMask",
    "attend",
    "block_sparse_attention",
    "masked_attention",
    "range_attention",
    "resolve",
    "windowed",
    "with_sinks",
]

IMPLEMENTATIONS = typing.get_args(config_lib.AttentionImpl)
CHUNK = 512  # keys per chunk of the chunked implementation (a multiple of the Pallas key block)
CAUSAL_TILE = 256  # query rows per tile of the target's causal self-attention off the fused kernels (attend)


def resolve(impl: str, backend: str | None = None, keys: int | None = None) -> str:
    """``impl`` with ``auto`` replaced by the choice for ``backend`` (default ``jax.default_backend()``) and
    ``keys`` keys per query.

    CPU: ``chunked`` when the keys span more than one chunk (measured faster than ``dense`` on the draft step,
    docs/benchmarks.md), else ``dense`` (one chunk holds the same scores, without the scan and the recompute).
    GPU/TPU: ``pallas``, a default pending a measurement on the accelerator (the fused kernels never build
    ``[Lq, Lk]`` scores).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {impl!r}")
    if impl != "auto":
        return impl
    if (backend or jax.default_backend()) != "cpu":
        return "pallas"
    return "dense" if keys is not None and keys <= CHUNK else "chunked"


@struct.dataclass
class RangeMask:
    """Key ``t`` is visible to query ``i`` iff ``q_seg[b,i] == k_seg[b,t]`` and ``lo[b,i] < t < hi[b,i]``.

    ``q_seg/lo/hi [B, Lq]`` and ``k_seg [B, Lk]`` int32.
    """

    q_seg: jax.Array
    k_seg: jax.Array
    lo: jax.Array
    hi: jax.Array

    def visible(self, t0: int | jax.Array = 0, length: int | None = None) -> jax.Array:
        """Boolean ``[B, Lq, K]`` for keys ``t0 .. t0+K-1`` (``K`` = ``k_seg``'s length, or ``length`` keys)."""
        k_seg = self.k_seg if length is None else jax.lax.dynamic_slice_in_dim(self.k_seg, t0, length, axis=1)
        t = t0 + jnp.arange(k_seg.shape[1], dtype=jnp.int32)[None, None, :]
        return (self.q_seg[:, :, None] == k_seg[:, None, :]) & (t > self.lo[:, :, None]) & (t < self.hi[:, :, None])


@struct.dataclass
class BlockMask:
    """The draft's training (or proposal) visibility: ``ctx`` over the context keys for the ``N*bs`` queries, and
    the block-diagonal part: slot ``j`` of block ``n`` sees slot ``i`` of its own block iff ``keep[b, n]`` (and
    ``i <= j`` when ``causal``). ``keep [B, N]`` bool; ``impl`` the implementation that attends under it."""

    ctx: RangeMask
    keep: jax.Array
    causal: bool = struct.field(pytree_node=False, default=False)
    impl: str = struct.field(pytree_node=False, default="auto")  # see IMPLEMENTATIONS

    def block(self, block_size: int) -> jax.Array:
        """Boolean ``[B, N, bs, bs]`` block-diagonal visibility."""
        b, n = self.keep.shape
        m = jnp.broadcast_to(self.keep[:, :, None, None], (b, n, block_size, block_size))
        return m & jnp.tril(jnp.ones((block_size, block_size), bool)) if self.causal else m


# ---------------------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------------------


def _dense_range(q, k, v, mask: RangeMask, scale: float):
    """``(out [B, Lq, NH, HD], lse [B, KVH, G, Lq] fp32)`` with one softmax over all keys."""
    vis = mask.visible()[:, None, None]
    s = jnp.where(vis, attention_scores(q, k, scale), MASK_VALUE)
    m = jax.lax.stop_gradient(s.max(-1, keepdims=True))
    p = jnp.where(vis, jnp.exp(s - m), 0.0)
    l_sum = p.sum(-1, keepdims=True)
    ok = l_sum > 0
    out = attention_values(p / jnp.where(ok, l_sum, 1.0), v)
    lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l_sum, 1.0)), MASK_VALUE)[..., 0]
    return out, lse


# ---------------------------------------------------------------------------------------------------------
# Chunked (online softmax over key chunks, flash-attention backward)
# ---------------------------------------------------------------------------------------------------------


def _pad_keys(k, v, mask: RangeMask, chunk: int):
    """Pad the key axis to a multiple of ``chunk`` (padded keys are never visible: ``hi <= Lk``)."""
    lk = k.shape[1]
    pad = -lk % chunk
    hi = jnp.minimum(mask.hi, lk)
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
    return k, v, mask.replace(k_seg=jnp.pad(mask.k_seg, ((0, 0), (0, pad))), hi=hi)


def _chunks(x: jax.Array, chunk: int) -> jax.Array:
    """Keys ``[B, Lk, KVH, HD] -> [Lk/chunk, B, KVH, chunk, HD]``: chunks of the heads-first layout of
    :func:`~dflash_jax.models.layers.attention_scores`."""
    b, lk, kvh, hd = x.shape
    return jnp.moveaxis(x.reshape(b, lk // chunk, chunk, kvh, hd), (1, 3), (0, 2))


def _row_visible(mask: RangeMask, t0: jax.Array, chunk: int, g: int) -> jax.Array:
    """Keys ``t0 .. t0+chunk-1`` visible to the ``[B, 1, G*Lq]`` grouped query rows: ``[B, 1, G*Lq, chunk]``."""
    vis = mask.visible(t0, chunk)
    b, lq, _ = vis.shape
    return jnp.broadcast_to(vis[:, None, None], (b, 1, g, lq, chunk)).reshape(b, 1, g * lq, chunk)


def _chunked_fwd_pass(q, k, v, mask: RangeMask, chunk: int, scale: float):
    """Online softmax over key chunks; the matmuls in the heads-first layout (``[B, KVH, G*Lq, HD]`` query rows
    against ``[B, KVH, chunk, HD]`` keys, as :func:`~dflash_jax.models.layers.attention_scores`)."""
    b, lq, nh, hd = q.shape
    kvh = k.shape[2]
    g = nh // kvh
    qh = group_query_rows(q, kvh)

    def body(carry, xs):
        m, l_sum, acc = carry
        k_c, v_c, t0 = xs
        vis = _row_visible(mask, t0, chunk, g)
        s = jnp.where(vis, grouped_scores(qh, k_c) * scale, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(vis, jnp.exp(s - m_new[..., None]), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.einsum("bkqt,bktd->bkqd", p.astype(v.dtype), v_c, preferred_element_type=jnp.float32)
        return (m_new, alpha * l_sum + p.sum(-1), alpha[..., None] * acc + pv), None

    t0s = jnp.arange(0, k.shape[1], chunk, dtype=jnp.int32)
    init = (
        jnp.full((b, kvh, g * lq), MASK_VALUE, jnp.float32),
        jnp.zeros((b, kvh, g * lq), jnp.float32),
        jnp.zeros((b, kvh, g * lq, hd), jnp.float32),
    )
    (m, l_sum, acc), _ = jax.lax.scan(body, init, (_chunks(k, chunk), _chunks(v, chunk), t0s))
    ok = l_sum > 0
    out = acc / jnp.where(ok, l_sum, 1.0)[..., None]
    out = ungroup_query_rows(out, g).astype(v.dtype)
    lse = jnp.where(ok, m + jnp.log(jnp.where(ok, l_sum, 1.0)), MASK_VALUE)
    return out, lse.reshape(b, kvh, g, lq)


def _chunked_bwd_pass(q, k, v, mask: RangeMask, out, lse, d_out, d_lse, chunk: int, scale: float):
    """Flash-attention backward: per chunk ``p = exp(s - lse)``, ``ds = p * (dp - rowsum(dO*O) + dlse)``; the
    matmuls in the heads-first layout of :func:`_chunked_fwd_pass`."""
    b, lq, nh, hd = q.shape
    kvh = k.shape[2]
    g = nh // kvh
    qh, do = group_query_rows(q, kvh), group_query_rows(d_out, kvh)  # [B, KVH, G*Lq, HD]
    delta = jnp.sum(do.astype(jnp.float32) * group_query_rows(out, kvh), -1)
    row = d_lse.astype(jnp.float32).reshape(b, kvh, g * lq) - delta  # [B, KVH, G*Lq]
    lse_rows = lse.reshape(b, kvh, g * lq, 1)

    def body(dq, xs):
        k_c, v_c, t0 = xs
        p = jnp.where(_row_visible(mask, t0, chunk, g), jnp.exp(grouped_scores(qh, k_c) * scale - lse_rows), 0.0)
        dv = jnp.einsum("bkqt,bkqd->bktd", p.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp = grouped_scores(do, v_c)
        ds = (p * (dp + row[..., None]) * scale).astype(q.dtype)
        dq = dq + jnp.einsum("bkqt,bktd->bkqd", ds, k_c, preferred_element_type=jnp.float32)
        dk = jnp.einsum("bkqt,bkqd->bktd", ds, qh, preferred_element_type=jnp.float32)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    t0s = jnp.arange(0, k.shape[1], chunk, dtype=jnp.int32)
    dq, (dk, dv) = jax.lax.scan(
        body, jnp.zeros((b, kvh, g * lq, hd), jnp.float32), (_chunks(k, chunk), _chunks(v, chunk), t0s)
    )
    unchunk = lambda x: jnp.moveaxis(x, (0, 2), (1, 3)).reshape(b, -1, kvh, hd)  # noqa: E731
    return ungroup_query_rows(dq, g).astype(q.dtype), unchunk(dk), unchunk(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, mask: RangeMask, chunk: int, kernel: bool, scale: float):
    return _flash_fwd(q, k, v, mask, chunk, kernel, scale)[0]


def _flash_fwd(q, k, v, mask, chunk, kernel, scale):
    fwd = kernels.pallas_fwd_pass if kernel else functools.partial(_chunked_fwd_pass, chunk=chunk)
    out, lse = fwd(q, k, v, mask, scale=scale)
    return (out, lse), (q, k, v, mask, out, lse)


def _flash_bwd(chunk, kernel, scale, res, cts):
    q, k, v, mask, out, lse = res
    dq, dk, dv = _chunked_bwd_pass(q, k, v, mask, out, lse, *cts, chunk=chunk, scale=scale)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def range_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: RangeMask,
    impl: str = "dense",
    chunk: int | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Softmax attention under a :class:`RangeMask`; ``q [B, Lq, NH, HD]``, ``k/v [B, Lk, KVH, HD]``.

    Returns ``out [B, Lq, NH, HD]`` (v's dtype; exactly 0 where no key is visible) and the log-sum-exp of the
    visible scores ``lse [B, KVH, G, Lq]`` fp32 (:data:`MASK_VALUE` where none is), both differentiable.
    ``chunk``: keys per step of the chunked forward/backward (default :data:`CHUNK`); ``scale``: of the logits
    (default ``HD**-0.5``).
    """
    impl = resolve(impl, keys=k.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if impl == "dense":
        return _dense_range(q, k, v, mask, scale)
    lk = k.shape[1]
    # Equal chunks of at most ``chunk`` keys (least padding), rounded up to the kernel's key tile for pallas.
    tile = kernels.BLOCK_K if impl == "pallas" else 8
    chunk = tile * pl.cdiv(pl.cdiv(lk, pl.cdiv(lk, CHUNK if chunk is None else chunk)), tile)
    k, v, mask = _pad_keys(k, v, mask, chunk)
    return _flash(q, k, v, mask, chunk, impl == "pallas", scale)


# ---------------------------------------------------------------------------------------------------------
# The two attentions of the models
# ---------------------------------------------------------------------------------------------------------


@struct.dataclass
class SelfMask:
    """The target's packed causal self-attention, described: query ``i`` sees key ``t <= i`` of its segment
    (``segment_ids [B, S]``) and, on sliding layers, ``t > i - window``; ``impl`` the implementation."""

    segment_ids: jax.Array
    window: int | None = struct.field(pytree_node=False, default=None)
    impl: str = struct.field(pytree_node=False, default="auto")

    def range_mask(self) -> RangeMask:
        seg = self.segment_ids.astype(jnp.int32)
        idx = jnp.broadcast_to(jnp.arange(seg.shape[1], dtype=jnp.int32), seg.shape)
        lo = jnp.full_like(idx, -1) if self.window is None else idx - self.window
        return RangeMask(q_seg=seg, k_seg=seg, lo=lo, hi=idx + 1)


def windowed(mask: jax.Array | SelfMask, window: int, positions: jax.Array, key_positions: jax.Array):
    """A sliding layer's mask (HF ``sliding_window_overlay``): key ``t`` also needs ``pos(t) > pos(q) - window``
    (``positions [B, Lq]``, ``key_positions [B|1, Lk]``); a :class:`SelfMask` applies it by index (positions count
    up by one within a packed segment)."""
    if isinstance(mask, SelfMask):
        return mask.replace(window=window)
    return mask & (key_positions[:, None, :] > positions[:, :, None] - window)


def with_sinks(out: jax.Array, lse: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """``out [B, Lq, NH, HD]`` (softmax over the visible keys, log-sum-exp ``lse [B, KVH, G, Lq]``) renormalised
    with one extra logit per head ``sinks [NH]`` in the normaliser (``layers.sink_softmax``)."""
    if sinks is None:
        return out
    b, lq, nh, _ = out.shape
    sk = sinks.astype(jnp.float32).reshape(1, lse.shape[1], lse.shape[2], 1)
    w = jnp.moveaxis(jnp.exp(lse - jnp.logaddexp(lse, sk)), 3, 1).reshape(b, lq, nh, 1)
    return (out.astype(jnp.float32) * w).astype(out.dtype)


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | SelfMask,
    *,
    scale: float | None = None,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """The target's attention: a boolean ``mask [B, Lq, Lk]`` runs :func:`masked_attention` (decode, and the
    ``dense`` forward); a :class:`SelfMask` runs its implementation. ``pallas``: splash attention on TPU and
    Triton on CUDA for full layers without sinks, the range kernel otherwise (interpreted off TPU/GPU).
    ``q [B, S, NH, HD]``, ``k/v [B, Lk, KVH, HD]`` -> ``[B, S, NH, HD]``.
    """
    if not isinstance(mask, SelfMask):
        return masked_attention(q, k, v, mask, scale=scale, sinks=sinks)
    impl = resolve(mask.impl, keys=k.shape[1])
    if impl == "pallas" and sinks is None and mask.window is None:
        seg = mask.segment_ids.astype(jnp.int32)
        return jax.lax.platform_dependent(
            q,
            k,
            v,
            seg,
            tpu=functools.partial(kernels.batch_sharded, functools.partial(kernels.splash_causal, scale=scale)),
            cuda=functools.partial(kernels.batch_sharded, functools.partial(kernels.triton_causal, scale=scale)),
            default=lambda *a: range_attention(*a[:3], mask.range_mask(), "pallas", scale=scale)[0],
        )
    rm = mask.range_mask()
    if impl == "pallas" or q.shape[1] <= CAUSAL_TILE:
        return _self_attend(q, k, v, rm, impl, scale, sinks)
    # Causal tiling: query rows [q0, q1) never see a key at or past q1 (nor, on a sliding layer, before
    # q0 - window + 1), so each tile attends over that key range only (about half the scores of the whole square).
    outs = []
    for q0 in range(0, q.shape[1], CAUSAL_TILE):
        q1 = min(q0 + CAUSAL_TILE, q.shape[1])
        k0 = 0 if mask.window is None else max(0, q0 - mask.window + 1)
        tile = RangeMask(
            q_seg=rm.q_seg[:, q0:q1], k_seg=rm.k_seg[:, k0:q1], lo=rm.lo[:, q0:q1] - k0, hi=rm.hi[:, q0:q1] - k0
        )
        outs.append(_self_attend(q[:, q0:q1], k[:, k0:q1], v[:, k0:q1], tile, mask.impl, scale, sinks))
    return jnp.concatenate(outs, axis=1)


def _self_attend(q, k, v, mask: RangeMask, impl: str, scale, sinks) -> jax.Array:
    """Attention under a :class:`RangeMask` by ``impl`` (``auto`` resolved for these keys), sinks applied."""
    if resolve(impl, keys=k.shape[1]) == "dense":
        return masked_attention(q, k, v, mask.visible(), scale=scale, sinks=sinks)
    out, lse = range_attention(q, k, v, mask, impl, scale=scale)
    return with_sinks(out, lse, sinks)


def block_sparse_attention(
    q: jax.Array,
    k_blk: jax.Array,
    v_blk: jax.Array,
    k_ctx: jax.Array,
    v_ctx: jax.Array,
    mask: BlockMask,
    sinks: jax.Array | None = None,
) -> jax.Array:
    """Attention of ``N`` query blocks over shared context keys plus each block's own keys.

    Shapes: ``q [B, N*bs, NH, HD]``, ``k_blk/v_blk [B, N*bs, KVH, HD]``, ``k_ctx/v_ctx [B, S, KVH, HD]``,
    ``mask.keep [B, N]``; ``mask.impl`` picks the implementation. Returns ``[B, N*bs, NH, HD]`` in ``v``'s dtype.

    Equals ``softmax(q k^T / sqrt(HD) + M) v`` over keys ``[ctx ; all blocks]`` with the reference's dense mask
    ``M`` (docs/design.md §4.4), because block ``n`` sees no other block: the ``[Q, S]`` and block-diagonal
    ``[N, bs, bs]`` parts share one normaliser (fp32). ``dense`` builds both score parts and one softmax; the
    other implementations run the context part through :func:`range_attention` and merge the two parts by their
    log-sum-exp. A row with no visible key yields exactly 0 with zero gradient. ``sinks [NH]`` adds one logit per
    head to every normaliser (``layers.sink_softmax``; reference ``_sink_attention_impl``).
    """
    b, q_len, nh, hd = q.shape
    n = mask.keep.shape[1]
    bs = q_len // n
    kvh, g = k_ctx.shape[2], nh // k_ctx.shape[2]
    m_blk = mask.block(bs)[:, :, None, None]  # [B, N, 1, 1, bs, bs]
    s_blk = attention_scores(q.reshape(b * n, bs, nh, hd), k_blk.reshape(b * n, bs, kvh, hd))
    s_blk = jnp.where(m_blk, s_blk.reshape(b, n, kvh, g, bs, bs), MASK_VALUE)  # [B, N, KVH, G, bs, bs]
    impl = resolve(mask.impl, keys=k_ctx.shape[1])
    if impl == "dense":
        m_ctx = mask.ctx.visible()[:, None, None]
        s_ctx = jnp.where(m_ctx, attention_scores(q, k_ctx), MASK_VALUE)  # [B, KVH, G, Q, S]
        row_max = jnp.maximum(
            s_ctx.max(-1).reshape(b, kvh, g, n, bs), jnp.moveaxis(s_blk.max(-1), 1, 3)
        )  # [B, KVH, G, N, bs]
        sk = None if sinks is None else sinks.astype(jnp.float32).reshape(kvh, g, 1, 1)
        if sk is not None:
            row_max = jnp.maximum(row_max, sk)
        row_max = jax.lax.stop_gradient(row_max)
        p_ctx = jnp.where(m_ctx, jnp.exp(s_ctx - row_max.reshape(b, kvh, g, q_len)[..., None]), 0.0)
        p_blk = jnp.where(m_blk, jnp.exp(s_blk - jnp.moveaxis(row_max, 3, 1)[..., None]), 0.0)
        denom = p_ctx.sum(-1).reshape(b, kvh, g, n, bs) + jnp.moveaxis(p_blk.sum(-1), 1, 3)
        if sk is not None:
            denom = denom + jnp.exp(sk - row_max)
        inv = 1.0 / jnp.where(denom > 0, denom, 1.0)
        p_ctx = p_ctx * inv.reshape(b, kvh, g, q_len)[..., None]
        p_blk = (p_blk * jnp.moveaxis(inv, 3, 1)[..., None]).reshape(b * n, kvh, g, bs, bs)
        out_blk = attention_values(p_blk, v_blk.reshape(b * n, bs, kvh, hd)).reshape(b, q_len, nh, hd)
        return attention_values(p_ctx, v_ctx) + out_blk

    out_ctx, lse_ctx = range_attention(q, k_ctx, v_ctx, mask.ctx, impl)  # lse [B, KVH, G, Q]
    row_max = jax.lax.stop_gradient(s_blk.max(-1, keepdims=True))
    p_blk = jnp.where(m_blk, jnp.exp(s_blk - row_max), 0.0)
    l_blk = p_blk.sum(-1, keepdims=True)
    ok = l_blk > 0
    lse_blk = jnp.where(ok, row_max + jnp.log(jnp.where(ok, l_blk, 1.0)), MASK_VALUE)[..., 0]
    lse_blk = jnp.moveaxis(lse_blk, 1, 3).reshape(b, kvh, g, q_len)
    lse = jnp.logaddexp(lse_ctx, lse_blk)
    if sinks is not None:
        lse = jnp.logaddexp(lse, sinks.astype(jnp.float32).reshape(1, kvh, g, 1))
    # Weight of each part in the joint softmax; 0 for a part with no visible key (its output is 0 too).
    w_ctx = jnp.exp(lse_ctx - lse)
    w_blk = jnp.moveaxis(jnp.exp(lse_blk - lse).reshape(b, kvh, g, n, bs), 3, 1)[..., None]  # [B,N,KVH,G,bs,1]
    p_blk = (p_blk / jnp.where(ok, l_blk, 1.0) * w_blk).reshape(b * n, kvh, g, bs, bs)
    out_blk = attention_values(p_blk, v_blk.reshape(b * n, bs, kvh, hd)).reshape(b, q_len, nh, hd)
    w_ctx = jnp.moveaxis(w_ctx, 3, 1).reshape(b, q_len, nh, 1)
    return (out_ctx.astype(jnp.float32) * w_ctx).astype(v_ctx.dtype) + out_blk
