"""The fused attention kernels behind ``train.attention: pallas`` (the mask/dispatch layer is
``models/attention.py``):

* :func:`range_attention_kernel`: the forward of attention under a range mask (key ``t`` visible to query ``i``
  iff ``q_seg[i] == k_seg[t]`` and ``lo[i] < t < hi[i]``), one Pallas kernel compiled by Mosaic on TPU and Triton
  on GPU, interpreted elsewhere; it returns the output and the log-sum-exp the chunked backward needs;
* :func:`splash_causal` / :func:`triton_causal`: the target's packed causal self-attention through splash
  attention (TPU) and the Triton flash kernel of ``jax.experimental.pallas.ops.gpu.attention`` (GPU).

A Pallas custom call is opaque to XLA's SPMD partitioner: :func:`batch_sharded` runs it per batch shard.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from dflash_jax import sharding
from dflash_jax.models.layers import MASK_VALUE

BLOCK_Q = BLOCK_K = 128  # Pallas tiles (TPU lanes; Triton wants powers of two)


def range_attention_kernel(
    lo_ref,
    hi_ref,
    qseg_ref,
    kseg_ref,
    q_ref,
    k_ref,
    v_ref,
    o_ref,
    lse_ref,
    *,
    scale: float,
    block_k: int,
    num_k_blocks: int,
):
    """One ``[block_q, HD]`` query tile of one head: online softmax over the key tiles in ``[min lo, max hi)``.

    ``lo/hi/qseg [block_q, 1]``, ``kseg [1, Lk]``, ``k/v [Lk, HD]`` (the head's whole key sequence).
    """
    q = q_ref[...]
    lo, hi, q_seg = lo_ref[...], hi_ref[...], qseg_ref[...]
    block_q, hd = q.shape
    # Key tiles outside [min lo + 1, max hi) hold no visible key (lax.div: truncation of non-negatives).
    first = jax.lax.div(jnp.maximum(jnp.min(lo) + 1, 0), block_k)
    last = jnp.minimum(jax.lax.div(jnp.maximum(jnp.max(hi), 0) + block_k - 1, block_k), num_k_blocks)

    def body(i, carry):
        m, l_sum, acc = carry
        start = pl.multiple_of(i * block_k, block_k)
        k = k_ref[pl.ds(start, block_k), :]
        v = v_ref[pl.ds(start, block_k), :]
        t = start + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        vis = (q_seg == kseg_ref[:, pl.ds(start, block_k)]) & (t > lo) & (t < hi)
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        s = jnp.where(vis, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(-1, keepdims=True))
        p = jnp.where(vis, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m - m_new)
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return m_new, alpha * l_sum + p.sum(-1, keepdims=True), alpha * acc + pv

    init = (
        jnp.full((block_q, 1), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q, 1), jnp.float32),
        jnp.zeros((block_q, hd), jnp.float32),
    )
    m, l_sum, acc = jax.lax.fori_loop(first, last, body, init)
    ok = l_sum > 0
    safe_l = jnp.where(ok, l_sum, 1.0)
    o_ref[...] = (acc / safe_l).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(ok, m + jnp.log(safe_l), MASK_VALUE)


def pallas_call(
    q,
    k,
    v,
    mask: Any,
    platform: str | None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
    scale: float | None = None,
):
    """Run :func:`range_attention_kernel` compiled for ``platform`` (``"tpu"``: Mosaic, ``"cuda"``: Triton) or
    interpreted (``None``); ``Lk`` must be a multiple of ``block_k`` (``attention._pad_keys`` pads them)."""
    b, lq, nh, hd = q.shape
    lk, kvh = k.shape[1], k.shape[2]
    g = nh // kvh
    block_q = min(block_q, 8 * pl.cdiv(lq, 8))
    pad = -lq % block_q
    pad_q = lambda x: jnp.pad(x, ((0, 0), (0, pad)))[..., None]  # noqa: E731  [B, Lq', 1]
    lo, hi, q_seg = pad_q(mask.lo), pad_q(mask.hi), pad_q(mask.q_seg)  # padded queries: hi = 0, see nothing
    qt = jnp.moveaxis(jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))), 2, 1)  # [B, NH, Lq', HD]
    kt, vt = jnp.moveaxis(k, 2, 1), jnp.moveaxis(v, 2, 1)  # [B, KVH, Lk, HD]
    lq_p = lq + pad
    per_q = pl.BlockSpec((None, block_q, 1), lambda bi, h, i: (bi, i, 0))
    kernel = functools.partial(
        range_attention_kernel, scale=hd**-0.5 if scale is None else scale, block_k=block_k, num_k_blocks=lk // block_k
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, nh, lq_p // block_q),
        in_specs=[
            per_q,
            per_q,
            per_q,
            pl.BlockSpec((None, 1, lk), lambda bi, h, i: (bi, 0, 0)),
            pl.BlockSpec((None, None, block_q, hd), lambda bi, h, i: (bi, h, i, 0)),
            pl.BlockSpec((None, None, lk, hd), lambda bi, h, i: (bi, jax.lax.div(h, g), 0, 0)),
            pl.BlockSpec((None, None, lk, hd), lambda bi, h, i: (bi, jax.lax.div(h, g), 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_q, hd), lambda bi, h, i: (bi, h, i, 0)),
            pl.BlockSpec((None, None, block_q, 1), lambda bi, h, i: (bi, h, i, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, nh, lq_p, hd), v.dtype),
            jax.ShapeDtypeStruct((b, nh, lq_p, 1), jnp.float32),
        ],
        interpret=platform is None,
        compiler_params=compiler_params(platform),
        name="dflash_range_attention",
    )(lo, hi, q_seg, mask.k_seg[:, None, :], qt, kt, vt)
    out = jnp.moveaxis(out[:, :, :lq], 1, 2)
    return out, lse[:, :, :lq, 0].reshape(b, kvh, g, lq)


def compiler_params(platform: str | None) -> Any:
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
    if platform == "cuda":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams(num_warps=4, num_stages=2)
    return None


def batch_sharded(fn, *args):
    """``fn(*args)`` per batch shard (``jax.shard_map`` over the batch axes of the mesh set by ``jax.set_mesh``):
    a Pallas custom call is opaque to XLA's SPMD partitioner, which would run it on the whole batch on every device.
    Every leaf of ``args`` and of the result has the batch as its leading axis."""
    axes = sharding.mesh_batch_axes()
    if not axes:
        return fn(*args)
    spec = jax.sharding.PartitionSpec(axes)
    return jax.shard_map(fn, in_specs=(spec,) * len(args), out_specs=spec, check_vma=False)(*args)


def pallas_fwd_pass(q, k, v, mask: Any, scale: float):
    """The kernel compiled for TPU (Mosaic) or CUDA (Triton), interpreted on any other platform."""

    def call(platform):
        return lambda: batch_sharded(lambda *a: pallas_call(*a, platform, scale=scale), q, k, v, mask)

    return jax.lax.platform_dependent(tpu=call("tpu"), cuda=call("cuda"), default=call(None))


def splash_causal(q, k, v, segment_ids, scale: float | None = None, interpret: bool = False):
    """Splash attention (TPU, Mosaic): static causal mask + segment ids; ``S`` padded to the 128 tiles."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    b, s, nh, hd = q.shape
    pad = -s % BLOCK_Q
    sp = s + pad
    seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)  # padded rows see only padded keys
    heads = lambda x: jnp.moveaxis(jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))), 2, 1)  # noqa: E731
    blocks = dict(
        block_q=BLOCK_Q,
        block_kv=BLOCK_K,
        block_kv_compute=BLOCK_K,
        block_q_dkv=BLOCK_Q,
        block_kv_dkv=BLOCK_K,
        block_kv_dkv_compute=BLOCK_K,
        block_q_dq=BLOCK_Q,
        block_kv_dq=BLOCK_K,
    )
    kernel = splash.make_splash_mha(
        splash_mask.MultiHeadMask([splash_mask.CausalMask((sp, sp))] * nh),
        block_sizes=splash.BlockSizes(**blocks),
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )
    scale = hd**-0.5 if scale is None else scale
    out = jax.vmap(kernel)(
        heads(q * jnp.asarray(scale, q.dtype)), heads(k), heads(v), segment_ids=splash.SegmentIds(seg, seg)
    )
    return jnp.moveaxis(out, 1, 2)[:, :s]


def triton_causal(q, k, v, segment_ids, scale: float | None = None, interpret: bool = False):
    """The Triton flash kernel of ``jax.experimental.pallas.ops.gpu.attention`` (k/v heads repeated for GQA)."""
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, s, nh, hd = q.shape
    g = nh // k.shape[2]
    pad = -s % BLOCK_Q
    pad_s = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0)))  # noqa: E731
    seg = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=-1)
    out = gpu_attention.mha(
        pad_s(q),
        pad_s(jnp.repeat(k, g, 2)),
        pad_s(jnp.repeat(v, g, 2)),
        seg,
        sm_scale=hd**-0.5 if scale is None else scale,
        causal=True,
        interpret=interpret,
    )
    return out[:, :s]
