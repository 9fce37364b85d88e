"""Building blocks shared by the draft and the target model.

One implementation of each piece serves both models: RMSNorm (Qwen3/Llama semantics), rotary embeddings
(default and llama3 scaling, non-interleaved ``rotate_half``), the SwiGLU MLP, dense layers carrying logical
partition names, and grouped-query attention with a boolean mask.

Parameters are created with logical axis names only (``nnx.use_eager_sharding(False)`` is active inside
:func:`unsharded_init`); ``dflash_jax.sharding`` maps those names onto a device mesh through one rules
table. Logical axis names used here:

``embed`` (model width H), ``mlp`` (intermediate I), ``q_heads`` (NH*HD), ``kv_heads`` (KVH*HD),
``fused`` (T*H, the draft's fc input), ``vocab`` (V), ``norm`` (any norm weight), ``head_dim`` (HD),
``expert`` (E, the leading axis of stacked MoE expert weights, ``models/families/moe.py``).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash_jax import sharding

# Large finite negative used for masked attention logits. A finite value keeps fully-masked rows finite
# (softmax becomes uniform instead of NaN), which is what the reference does with finfo(dtype).min.
MASK_VALUE = -1e30


@contextlib.contextmanager
def unsharded_init():
    """Create variables with logical sharding metadata but without placing them on a mesh."""
    with nnx.use_eager_sharding(False):
        yield


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = False,
    std: float = 0.02,
    param_dtype: Any = jnp.float32,
    dtype: Any = None,
) -> nnx.Linear:
    """A bias-optional ``nnx.Linear``; kernel ``[in, out]`` ~ N(0, std), bias zeros, logical ``axes``."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(std), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class RMSNorm(nnx.Module):
    """RMSNorm with weight ``[dim]``; ``y = x32 / sqrt(mean(x32**2) + eps)``.

    Default (Qwen3/Llama): ``w * cast(y, x.dtype)``. ``upcast=True`` (gpt-oss, Gemma 3): ``cast((offset + w) * y,
    x.dtype)`` with the scale applied in fp32; ``offset=1`` is Gemma's ``(1 + w)`` form (weight initialised to 0).
    """

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        param_dtype: Any = jnp.float32,
        axis: str = "norm",
        offset: float = 0.0,
        upcast: bool = False,
    ):
        self.eps = float(eps)
        self.offset, self.upcast = float(offset), bool(upcast or offset)
        init = jnp.zeros if offset else jnp.ones
        self.weight = nnx.Param(init((dim,), param_dtype), out_sharding=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.upcast:
            return (y * (self.offset + self.weight[...].astype(jnp.float32))).astype(dtype)
        return y.astype(dtype) * self.weight[...].astype(dtype)


ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class SwiGLU(nnx.Module):
    """``down(act(gate(x)) * up(x))`` with ``gate/up [H, I]`` and ``down [I, H]`` (no bias); ``act`` is ``silu``
    (SwiGLU) or ``gelu_pytorch_tanh`` (Gemma's GeGLU), keys of :data:`ACTIVATIONS`."""

    def __init__(
        self,
        hidden: int,
        intermediate: int,
        *,
        rngs: nnx.Rngs,
        std: float = 0.02,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        act: str = "silu",
    ):
        self.act = ACTIVATIONS[act]
        kw = dict(rngs=rngs, std=std, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = dense(hidden, intermediate, ("embed", "mlp"), **kw)
        self.up_proj = dense(hidden, intermediate, ("embed", "mlp"), **kw)
        self.down_proj = dense(intermediate, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nnx.Module):
    """The pre-norm decoder block of both models (HF names): ``h += a`` with ``(a, aux) = self_attn(input_layernorm(h),
    *args)``, then ``h += mlp(post_attention_layernorm(h))``. Returns ``(h, aux)`` (the target's new K/V, the
    draft's ``None``). ``self_attn`` is built by the caller before the MLP (parameter init order); ``mlp``: a
    replacement MLP module (an MoE block) instead of the SwiGLU; ``norm_kw``: extra :class:`RMSNorm` options of
    both norms (gpt-oss ``upcast``)."""

    def __init__(
        self,
        self_attn: nnx.Module,
        hidden: int,
        intermediate: int,
        eps: float,
        *,
        rngs: nnx.Rngs,
        std: float = 0.02,
        param_dtype: Any = jnp.float32,
        dtype: Any = None,
        mlp: nnx.Module | None = None,
        norm_kw: Mapping[str, Any] | None = None,
        convs: tuple[nnx.Module, nnx.Module] | None = None,
    ):
        norm_kw = dict(norm_kw or {}, param_dtype=param_dtype)
        # DFlash2's in-block convolutions around the attention and the MLP (``prepare`` on the normed input,
        # ``finish`` on the sublayer output; models/draft.py GroupedDynamicConv); None = plain sublayers.
        self.attention_conv, self.mlp_conv = convs if convs is not None else (None, None)
        self.input_layernorm = RMSNorm(hidden, eps, **norm_kw)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(hidden, eps, **norm_kw)
        self.mlp = (
            mlp
            if mlp is not None
            else SwiGLU(hidden, intermediate, rngs=rngs, std=std, param_dtype=param_dtype, dtype=dtype)
        )

    def __call__(self, h: jax.Array, *args: Any) -> tuple[jax.Array, Any]:
        x, taps = _conv_prepare(self.attention_conv, self.input_layernorm(h))
        a, aux = self.self_attn(x, *args)
        h = sharding.constrain_rows(h + _conv_finish(self.attention_conv, a, taps))
        x, taps = _conv_prepare(self.mlp_conv, self.post_attention_layernorm(h))
        return sharding.constrain_rows(h + _conv_finish(self.mlp_conv, self.mlp(x), taps)), aux


def _conv_prepare(conv: nnx.Module | None, x: jax.Array) -> tuple[jax.Array, Any]:
    return (x, None) if conv is None else conv.prepare(x)


def _conv_finish(conv: nnx.Module | None, y: jax.Array, taps: Any) -> jax.Array:
    return y if conv is None else conv.finish(y, taps)


# ---------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------------------


_ROPE_REQUIRED = {
    "linear": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope_type(scaling: Mapping[str, Any] | None) -> str:
    scaling = scaling or {}
    return scaling.get("rope_type", scaling.get("type")) or "default"


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """``inv_freq[i] = 1 / theta**(2i/HD)`` in float32, ``[HD/2]``, with optional HF frequency scaling.

    ``scaling`` follows HF ``rope_scaling``/``rope_parameters`` (``rope_type`` or ``type``): ``default``/``None``
    plain RoPE; ``linear`` (``factor``: ``inv/factor``); ``llama3`` (``factor``, ``low_freq_factor``,
    ``high_freq_factor``, ``original_max_position_embeddings``); ``yarn`` (``factor``,
    ``original_max_position_embeddings``, optional ``beta_fast``=32, ``beta_slow``=1, ``truncate``=True; YaRN
    arXiv:2309.00071 as in transformers ``_compute_yarn_parameters``). Its cos/sin scale is
    :func:`rope_attention_factor`.
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    pos_freqs = (np.float32(theta) ** exponent).astype(np.float32)
    inv = (1.0 / pos_freqs).astype(np.float32)
    rope_type = _rope_type(scaling)
    if rope_type == "default":
        return inv
    if rope_type not in _ROPE_REQUIRED:
        raise ValueError(
            f"rope_scaling.rope_type={rope_type!r} is not supported (supported: default, {', '.join(_ROPE_REQUIRED)})"
        )
    missing = [k for k in _ROPE_REQUIRED[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling with rope_type={rope_type!r} is missing {missing}")
    if rope_type == "linear":
        return (inv / np.float32(scaling["factor"])).astype(np.float32)
    if rope_type == "yarn":
        factor = float(scaling["factor"])
        old_ctx = float(scaling["original_max_position_embeddings"])
        beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

        def correction_dim(rot):
            return head_dim * math.log(old_ctx / (rot * 2 * math.pi)) / (2 * math.log(theta))

        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        high = high + 0.001 if low == high else high
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = (1 - ramp).astype(np.float32)
        interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
        return (interpolation * (1 - extrapolation) + inv * extrapolation).astype(np.float32)
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_attention_factor(scaling: Mapping[str, Any] | None) -> float:
    """The factor multiplying cos/sin: YaRN's ``attention_factor`` (explicit, or ``mscale``-derived
    ``0.1 ln(factor) + 1``); 1 for every other rope type."""
    if _rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    factor, m, m_all = float(scaling["factor"]), scaling.get("mscale"), scaling.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


def rope_cos_sin(
    positions: jax.Array, inv_freq: np.ndarray | jax.Array, dtype: Any, scale: float = 1.0
) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[..., L, HD]`` for integer ``positions [..., L]``, times ``scale`` (YaRN's attention factor);
    computed in fp32 then cast to ``dtype``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return (jnp.cos(emb) * scale).astype(dtype), (jnp.sin(emb) * scale).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved RoPE on ``x [..., L, heads, HD]`` with ``cos/sin [..., L, HD]``:
    ``x*cos + rotate_half(x)*sin`` where ``rotate_half(x) = concat(-x[HD/2:], x[:HD/2])``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rot * sin[..., None, :]


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


def attention_scores(q: jax.Array, k: jax.Array, scale: float | None = None, heads_first: bool = False) -> jax.Array:
    """GQA logits in fp32: ``q [B, Lq, NH, HD]``, ``k [B, Lk, KVH, HD]`` (``[B, KVH, Lk, HD]`` with
    ``heads_first``, the KV-cache layout) -> ``[B, KVH, G, Lq, Lk]``.

    Query head ``h`` uses kv head ``h // G`` with ``G = NH / KVH`` (HF ``repeat_kv`` order). Scaled by ``scale``
    (default ``HD**-0.5``; Gemma 3 uses ``query_pre_attn_scalar**-0.5``).
    """
    b, lq, nh, hd = q.shape
    kvh = k.shape[1 if heads_first else 2]
    g = nh // kvh
    if heads_first:  # decode against the KV cache: the grouped heads as they are (2.6x faster here, measured)
        s = jnp.einsum("bqkgd,bktd->bkgqt", q.reshape(b, lq, kvh, g, hd), k, preferred_element_type=jnp.float32)
    else:
        # One batched matmul per (row, kv head) over its G*Lq query rows: [B,KVH,G*Lq,HD] x [B,KVH,Lk,HD]^T, the
        # operands XLA:CPU's matmul library takes without relayout (the target's attention forward at the CPU
        # bench shape: 2.0 -> 1.7 ms against the fused "bqkgd,btkd->bkgqt" einsum; docs/benchmarks.md).
        s = grouped_scores(group_query_rows(q, kvh), k.transpose(0, 2, 1, 3)).reshape(b, kvh, g, lq, -1)
    return s * (hd**-0.5 if scale is None else scale)


def attention_values(p: jax.Array, v: jax.Array, heads_first: bool = False) -> jax.Array:
    """``p [B, KVH, G, Lq, Lk]`` (probabilities) x ``v [B, Lk, KVH, HD]`` (``[B, KVH, Lk, HD]`` with
    ``heads_first``) -> ``[B, Lq, NH, HD]`` (v's dtype)."""
    b, kvh, g, lq, lk = p.shape
    if heads_first:  # decode against the KV cache (as attention_scores)
        out = jnp.einsum("bkgqt,bktd->bkgqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum(
            "bkqt,bktd->bkqd",
            p.reshape(b, kvh, g * lq, lk).astype(v.dtype),
            v.transpose(0, 2, 1, 3),
            preferred_element_type=jnp.float32,
        )
    return ungroup_query_rows(out.reshape(b, kvh, g * lq, -1), g).astype(v.dtype)


def group_query_rows(x: jax.Array, kvh: int) -> jax.Array:
    """Queries ``[B, Lq, NH, HD] -> [B, KVH, G*Lq, HD]``: the rows of kv head ``k`` are its G query heads,
    head-major (the layout of :func:`attention_scores` and of the chunked attention)."""
    b, lq, nh, hd = x.shape
    return x.reshape(b, lq, kvh, nh // kvh, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, nh // kvh * lq, hd)


def ungroup_query_rows(x: jax.Array, g: int) -> jax.Array:
    """The inverse of :func:`group_query_rows`: ``[B, KVH, G*Lq, HD] -> [B, Lq, KVH*G, HD]``."""
    b, kvh, rows, hd = x.shape
    return x.reshape(b, kvh, g, rows // g, hd).transpose(0, 3, 1, 2, 4).reshape(b, rows // g, kvh * g, hd)


def grouped_scores(qh: jax.Array, kh: jax.Array) -> jax.Array:
    """Unscaled fp32 logits of grouped query rows ``qh [B, KVH, R, HD]`` against keys ``kh [B, KVH, Lk, HD]``:
    ``[B, KVH, R, Lk]``."""
    return jnp.einsum("bkqd,bktd->bkqt", qh, kh, preferred_element_type=jnp.float32)


def sink_softmax(s: jax.Array, sinks: jax.Array | None) -> jax.Array:
    """Softmax over the last axis of ``s [B, KVH, G, Lq, Lk]`` (fp32). With per-head ``sinks [NH]`` (gpt-oss,
    DFlash ``attention_sink_bias``) one extra logit per head joins the normaliser and is dropped after:
    ``p = exp(s) / (sum exp(s) + exp(sink))``."""
    # exp(s - m) / sum with the row max m held constant (softmax is shift-invariant, so its gradient is exact) and
    # one reciprocal per row (the attention forward above: 1.7 -> 1.4 ms against jax.nn.softmax; docs/benchmarks.md).
    sk = None if sinks is None else sinks.astype(jnp.float32).reshape(s.shape[1], s.shape[2], 1, 1)
    m = s.max(-1, keepdims=True) if sk is None else jnp.maximum(s.max(-1, keepdims=True), sk)
    m = jax.lax.stop_gradient(m)
    e = jnp.exp(s - m)
    denom = e.sum(-1, keepdims=True) + (0.0 if sk is None else jnp.exp(sk - m))
    return e * (1.0 / denom)


def masked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array,
    *,
    scale: float | None = None,
    sinks: jax.Array | None = None,
    heads_first: bool = False,
) -> jax.Array:
    """Softmax attention with a boolean ``mask [B, Lq, Lk]`` (True = attend; B may be 1 to broadcast).

    Masked logits get :data:`MASK_VALUE` (finite), so fully-masked rows are uniform, never NaN. ``scale``: see
    :func:`attention_scores`; ``sinks [NH]``: see :func:`sink_softmax`; ``heads_first``: k/v in the KV-cache layout
    ``[B, KVH, Lk, HD]``. Returns ``[B, Lq, NH, HD]``.
    """
    s = attention_scores(q, k, scale, heads_first)
    s = jnp.where(mask[:, None, None], s, MASK_VALUE)
    return attention_values(sink_softmax(s, sinks), v, heads_first)
