"""The frozen target LLM in Flax NNX, with hidden-state taps and a KV cache.

One decoder covers the dense families (Llama / Qwen2 / Qwen3): GQA attention, SwiGLU MLP, RMSNorm, RoPE (default,
llama3, linear or YaRN scaling), tied or separate ``lm_head``; Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm
on q and k before RoPE. Qwen3-MoE, gpt-oss and Gemma 3 are their differences from it (``models/families/``),
built from :class:`Attention` and :func:`decoder_layer`; sliding-window layers get their own rope and mask.

Tap convention (DFlash, docs/design.md §4.1): layer id ``k`` is the output of decoder layer ``k`` (HF
``hidden_states[k+1]``). HF quirk reproduced on purpose: the last entry ``hidden_states[Lt]`` is taken *after*
the final norm, so id ``Lt-1`` yields the normed final state.

The target is frozen: every output passes through ``jax.lax.stop_gradient`` and its parameters are never handed
to an optimizer. Parameters keep the HF names (``layers.{i}.self_attn.q_proj.kernel`` ...); kernels are stored
``[in, out]`` (torch ``weight.T``), ``embed_tokens``/``lm_head`` as ``[V, H]`` like torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dflash_jax.models import attention, layers

DENSE_ARCHS = ("llama", "qwen2", "qwen3")
SUPPORTED_ARCHS = DENSE_ARCHS + ("qwen3_moe", "gpt_oss", "gemma3_text")  # the last three: models/families/
QK_NORM_ARCHS = ("qwen3", "qwen3_moe", "gemma3_text")  # per-head RMSNorm on q and k before RoPE
LAYER_TYPES = ("full_attention", "sliding_attention")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: Any) -> Any:
    """``"float32" | "bfloat16" | "float16"`` (or the jnp dtype itself) -> jnp dtype; ValueError otherwise."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported (supported: {', '.join(_DTYPES)})")
        return _DTYPES[dtype]
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in _DTYPES.values()]:
        raise ValueError(f"dtype={dtype!r} is not supported (supported: {', '.join(_DTYPES)})")
    return jnp.dtype(dtype).type


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TargetConfig:
    """Hyper-parameters of a Llama / Qwen2 / Qwen3 decoder (HF field meanings).

    ``attention_bias``: biases on q/k/v (Qwen2 always; Llama/Qwen3 when their config says so, in which case
    ``o_proj`` has a bias too, as in HF). ``qk_norm``: Qwen3 per-head RMSNorm on q and k before RoPE.
    ``rope_scaling``: ``None`` (default RoPE) or an HF dict (llama3, linear or yarn; ``layers.rope_inv_freq``).
    HF ``config.json`` and GGUF metadata are parsed in :mod:`dflash_jax.models.hf_io` /
    :mod:`~dflash_jax.models.gguf_io`.

    Fields used by the families of ``models/families/`` (defaults = the dense decoder): ``layer_types`` (per layer
    ``full_attention`` | ``sliding_attention``; ``None`` = all full) with ``sliding_window`` ``W`` (key ``t`` is
    visible from query ``q`` when ``q - W < t <= q``); ``local_rope_theta`` (sliding layers use plain RoPE at this
    theta, Gemma 3); ``query_pre_attn_scalar`` (attention scale ``s**-0.5``, Gemma 3); ``hidden_act`` of the gated
    MLP; MoE: ``moe_layers`` (indices of sparse layers), ``num_experts``, ``num_experts_per_tok``,
    ``moe_intermediate_size``, ``norm_topk_prob``.
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool | None = None  # None = the family's rule (QK_NORM_ARCHS)
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    local_rope_theta: float | None = None
    query_pre_attn_scalar: float | None = None
    hidden_act: str = "silu"
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False

    def __post_init__(self):
        if self.arch not in SUPPORTED_ARCHS:
            raise ValueError(
                f"{type(self).__name__}.arch={self.arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        layers.check_model_dims(
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "max_position_embeddings",
            ),
        )
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(
                f"{type(self).__name__}.rope_theta ({self.rope_theta}) and rms_norm_eps "
                f"({self.rms_norm_eps}) must be positive"
            )
        layers.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)  # validates rope_scaling
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", self.arch in QK_NORM_ARCHS)
        name = type(self).__name__
        object.__setattr__(self, "moe_layers", tuple(int(i) for i in self.moe_layers))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if len(self.layer_types) != self.num_layers or bad:
                raise ValueError(
                    f"{name}.layer_types must list {self.num_layers} entries of {LAYER_TYPES}, got {self.layer_types}"
                )
            if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) >= 1:
                raise ValueError(
                    f"{name}.sliding_window must be a positive integer when layer_types has "
                    f"sliding_attention layers, got {self.sliding_window!r}"
                )
        if self.hidden_act not in layers.ACTIVATIONS:
            raise ValueError(
                f"{name}.hidden_act={self.hidden_act!r} is not supported (supported: {', '.join(layers.ACTIVATIONS)})"
            )
        if self.moe_layers:
            if any(not 0 <= i < self.num_layers for i in self.moe_layers):
                raise ValueError(f"{name}.moe_layers {self.moe_layers} outside [0, {self.num_layers})")
            if not 1 <= self.num_experts_per_tok <= self.num_experts or self.moe_intermediate_size < 1:
                raise ValueError(
                    f"{name}.num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, "
                    f"{name}.num_experts ({self.num_experts})] and {name}.moe_intermediate_size "
                    f"({self.moe_intermediate_size}) >= 1"
                )

    def __hash__(self):  # rope_scaling is a dict; hash the JSON form so the config can be a static jit argument
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies ``[HD/2]`` float32 (``layers.rope_inv_freq``)."""
        return layers.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)

    def layer_type(self, i: int) -> str:
        """``full_attention`` or ``sliding_attention`` for decoder layer ``i``."""
        return "full_attention" if self.layer_types is None else self.layer_types[i]

    def rope(self, layer_type: str = "full_attention") -> tuple[np.ndarray, float]:
        """``(inv_freq [HD/2] float32, cos/sin scale)`` of the layers of ``layer_type`` (``local_rope_theta``
        for Gemma's sliding layers)."""
        if layer_type == "sliding_attention" and self.local_rope_theta is not None:
            return layers.rope_inv_freq(self.head_dim, self.local_rope_theta), 1.0
        return self.inv_freq(), layers.rope_attention_factor(self.rope_scaling)


# ---------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------


@struct.dataclass
class KVCache:
    """Fixed-size KV cache: ``k, v [L, B, KVH, max_len, HD]`` (heads before positions: the attention dots read it
    without a relayout); ``length [B] int32`` = committed tokens per row."""

    k: jax.Array
    v: jax.Array
    length: jax.Array


class Attention(nnx.Module):
    """GQA self-attention projections (HF names); the attention itself is ``attention.attend``.

    ``norm_kw``: extra :class:`layers.RMSNorm` options of q/k-norm (Gemma's ``offset=1``); ``sinks``: a learned
    per-head sink logit ``sinks [NH]`` (gpt-oss). The scale is ``query_pre_attn_scalar**-0.5`` when set.
    """

    def __init__(
        self,
        cfg: TargetConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any,
        dtype: Any,
        norm_kw: Mapping[str, Any] | None = None,
        sinks: bool = False,
    ):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        h, nh, kvh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = layers.dense(h, nh * hd, ("embed", "q_heads"), use_bias=bias, **kw)
        self.k_proj = layers.dense(h, kvh * hd, ("embed", "kv_heads"), use_bias=bias, **kw)
        self.v_proj = layers.dense(h, kvh * hd, ("embed", "kv_heads"), use_bias=bias, **kw)
        self.o_proj = layers.dense(nh * hd, h, ("q_heads", "embed"), use_bias=bias and cfg.arch != "qwen2", **kw)
        if cfg.qk_norm:
            self.q_norm = layers.RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, **(norm_kw or {}))
            self.k_norm = layers.RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype, **(norm_kw or {}))
        else:
            self.q_norm = self.k_norm = None
        self.sinks = (
            nnx.Param(
                nnx.with_partitioning(nnx.initializers.normal(0.02), ("norm",))(rngs.params(), (nh,), param_dtype)
            )
            if sinks
            else None
        )
        self.scale = None if cfg.query_pre_attn_scalar is None else float(cfg.query_pre_attn_scalar) ** -0.5
        self.shape = (nh, kvh, hd)

    def __call__(self, x, cos, sin, mask, past=None, write_pos=None):
        """``x [B,S,H]`` (normed) -> ``(o_proj(attention) [B,S,H], kv)``. Without ``past`` the keys are the S new
        tokens, ``mask [B,S,Lk]`` is bool or an ``attention.SelfMask`` (the packed causal mask without building it),
        and ``kv = (k, v)`` of those tokens. With ``past = (k, v, i)``, the whole cache ``k, v [L,B,KVH,max_len,HD]``
        and this layer's index ``i``, the new k/v are scattered into layer ``i`` at ``write_pos [B,S]`` (out-of-range
        writes dropped; in place: a decode step copies no cache), attention runs over that layer's cache under the
        bool ``mask [B,S,max_len]``, and ``kv`` is the updated ``(k, v)`` of all layers."""
        q, k, v = self.qkv(x, cos, sin)
        kv = (k, v)
        if past is not None:
            rows = jnp.arange(x.shape[0])[:, None]
            kv = tuple(
                c.at[past[2], rows, :, write_pos].set(new.astype(c.dtype), mode="drop")
                for c, new in zip(past[:2], (k, v))
            )
            k, v = kv[0][past[2]], kv[1][past[2]]
        sinks = None if self.sinks is None else self.sinks[...]
        if past is None:
            a = attention.attend(q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=self.scale, sinks=sinks)
        else:
            a = layers.masked_attention(
                q, k.astype(q.dtype), v.astype(q.dtype), mask, scale=self.scale, sinks=sinks, heads_first=True
            )
        return self.o_proj(a.reshape(*x.shape[:2], -1)), kv

    def qkv(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``x [B,S,H]`` -> q ``[B,S,NH,HD]``, k/v ``[B,S,KVH,HD]``; qk-norm (Qwen3) then RoPE on q and k."""
        b, s, _ = x.shape
        nh, kvh, hd = self.shape
        q = self.q_proj(x).reshape(b, s, nh, hd)
        k = self.k_proj(x).reshape(b, s, kvh, hd)
        v = self.v_proj(x).reshape(b, s, kvh, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin), v


def decoder_layer(
    cfg: TargetConfig,
    *,
    rngs: nnx.Rngs,
    param_dtype: Any,
    dtype: Any,
    mlp: nnx.Module | None = None,
    norm_kw: Mapping[str, Any] | None = None,
    attn_kw: Mapping[str, Any] | None = None,
) -> layers.DecoderBlock:
    """One target decoder layer: the shared pre-norm block around :class:`Attention`. ``mlp``: a replacement MLP
    (an MoE block) instead of the dense SwiGLU; ``norm_kw``: extra :class:`layers.RMSNorm` options of both norms;
    ``attn_kw``: extra :class:`Attention` options."""
    attn = Attention(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype, **(attn_kw or {}))
    return layers.DecoderBlock(
        attn,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.rms_norm_eps,
        rngs=rngs,
        param_dtype=param_dtype,
        dtype=dtype,
        mlp=mlp,
        norm_kw=norm_kw,
    )


def _as_int_array(name: str, x: Any, shape: tuple[int, ...]) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x.astype(jnp.int32)


class TargetModel(nnx.Module):
    """Frozen Llama/Qwen2/Qwen3 decoder. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype."""

    def __init__(self, cfg: TargetConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32, dtype: Any = jnp.float32):
        self.config = cfg
        self.dtype = dtype
        embed_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
        self.embed_tokens = nnx.Param(embed_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        if cfg.arch in DENSE_ARCHS:
            family = None
            self.layers = nnx.List([decoder_layer(cfg, **kw) for _ in range(cfg.num_layers)])
        else:
            from dflash_jax.models import families  # the families build their layers from this module's pieces

            family = families.FAMILIES[cfg.arch]
            self.layers = nnx.List([family.make_layer(cfg, i, **kw) for i in range(cfg.num_layers)])
        self.embed_scale = None if family is None else family.embed_scale(cfg)
        self.norm = layers.RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, **({} if family is None else family.norm_kw)
        )
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(embed_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        )

    # -- shared pieces borrowed by the draft -------------------------------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Embedding lookup ``[B,S] int -> [B,S,H]`` (compute dtype, frozen), times the family's embedding scale
        in the parameter dtype (Gemma 3: ``sqrt(H)``, as HF's scaled embedding module)."""
        e = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        if self.embed_scale is not None:
            e = e * jnp.asarray(self.embed_scale, e.dtype)
        return jax.lax.stop_gradient(e.astype(self.dtype))

    def lm_head_weight(self) -> jax.Array:
        """``[V,H]``: the tied embedding table or the separate ``lm_head`` (frozen)."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return jax.lax.stop_gradient(w[...])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., H] @ lm_head_weight().T -> [..., V]`` float32 (fp32 accumulation)."""
        w = self.lm_head_weight()
        return jnp.einsum("...h,vh->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)

    # -- forward -----------------------------------------------------------------------------------------
    def _check_layer_ids(self, layer_ids: Sequence[int]) -> tuple[int, ...]:
        ids = tuple(int(i) for i in layer_ids)
        bad = [i for i in ids if not 0 <= i < self.config.num_layers]
        if bad:
            raise ValueError(f"layer_ids {bad} out of range [0, {self.config.num_layers})")
        return ids

    def _run(self, input_ids, positions, mask, key_positions, layer_ids, cache=None):
        """Shared body of ``__call__`` and ``decode``: returns ``(taps, final_hidden, new_kv or None)``.

        ``mask [B,S,Lk]`` (or an ``attention.SelfMask``) is the full-attention mask; sliding layers also need
        ``key_positions [B|1, Lk]``:
        key ``t`` is visible from query ``q`` when ``pos(q) - W < pos(t)`` (HF ``sliding_window_overlay``)."""
        ids = self._check_layer_ids(layer_ids)
        cfg = self.config
        ctx = {}
        for kind in sorted({cfg.layer_type(i) for i in range(cfg.num_layers)}):
            inv_freq, scale = cfg.rope(kind)
            m = mask
            if kind == "sliding_attention":
                m = attention.windowed(mask, cfg.sliding_window, positions, key_positions)
            ctx[kind] = (*layers.rope_cos_sin(positions, inv_freq, self.dtype, scale), m)
        h = self.embed(input_ids)
        outs, kv = {}, None if cache is None else (cache.k, cache.v)
        for i, layer in enumerate(self.layers):
            h, new_kv = layer(h, *ctx[cfg.layer_type(i)], None if kv is None else (*kv, i), positions)
            kv = None if cache is None else new_kv
            if i in ids:
                outs[i] = h
        final = self.norm(h)
        outs[self.config.num_layers - 1] = final  # HF quirk: hidden_states[Lt] is post final norm
        taps = jnp.concatenate([outs[i] for i in ids], axis=-1) if ids else h[..., :0]
        return jax.lax.stop_gradient(taps), jax.lax.stop_gradient(final), kv

    def __call__(
        self,
        input_ids,
        *,
        positions=None,
        segment_ids=None,
        layer_ids: Sequence[int] = (),
        attention_impl: str = "auto",
    ):
        """Full causal forward.

        ``input_ids [B,S]`` int; ``positions [B,S]`` (default ``arange(S)``); ``segment_ids [B,S]`` (default
        ones): token ``q`` attends key ``t <= q`` of the same segment (packing; padding = segment 0).
        Returns ``taps [B,S,len(layer_ids)*H]`` (layer_ids order, id k = output of decoder layer k; id
        ``Lt-1`` is post final norm) and ``final_hidden [B,S,H]`` (after the final norm), both frozen.
        ``attention_impl``: one of ``attention.IMPLEMENTATIONS`` (``train.attention``).
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B,S], got shape {input_ids.shape}")
        input_ids = _as_int_array("input_ids", input_ids, input_ids.shape)
        b, s = input_ids.shape
        positions = (
            jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if positions is None
            else _as_int_array("positions", positions, (b, s))
        )
        segment_ids = (
            jnp.ones((b, s), jnp.int32) if segment_ids is None else _as_int_array("segment_ids", segment_ids, (b, s))
        )
        if attention.resolve(attention_impl, keys=s) == "dense":
            causal = jnp.tril(jnp.ones((s, s), bool))
            mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        else:  # described, never materialised
            mask = attention.SelfMask(segment_ids, impl=attention_impl)
        taps, final, _ = self._run(input_ids, positions, mask, positions, layer_ids)
        return taps, final

    # -- KV-cache decoding -------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """Empty cache ``k, v [L,batch,KVH,max_len,HD]`` (default compute dtype), ``length = 0``."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be positive")
        c = self.config
        shape = (c.num_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        dt = self.dtype if dtype is None else dtype
        return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), length=jnp.zeros((batch,), jnp.int32))

    def decode(self, input_ids, cache: KVCache, *, layer_ids: Sequence[int] = (), num_valid=None):
        """Incremental forward of ``input_ids [B,n]`` at positions ``cache.length + arange(n)``.

        Attends to ``cache[:length]`` plus causally within the new tokens; writes their K/V at ``length...``
        (writes past ``max_len`` are dropped: callers keep ``length + n <= max_len``). Returns
        ``(taps [B,n,T*H], final_hidden [B,n,H], cache)`` with ``length += num_valid`` (``[B]`` int, default n;
        tokens beyond ``num_valid`` are computed but left uncommitted).
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B,n], got shape {input_ids.shape}")
        b, n = input_ids.shape
        input_ids = _as_int_array("input_ids", input_ids, (b, n))
        chex.assert_shape(cache.length, (b,))
        num_valid = jnp.full((b,), n, jnp.int32) if num_valid is None else _as_int_array("num_valid", num_valid, (b,))
        positions = cache.length[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
        key_positions = jnp.arange(cache.k.shape[3])[None]
        mask = key_positions[:, None, :] <= positions[:, :, None]
        taps, final, (k, v) = self._run(input_ids, positions, mask, key_positions, layer_ids, cache)
        return taps, final, KVCache(k=k, v=v, length=cache.length + jnp.clip(num_valid, 0, n))

    @staticmethod
    def rollback(cache: KVCache, length) -> KVCache:
        """Set the committed length (scalar or ``[B]``); entries beyond it are ignored and later overwritten."""
        length = jnp.asarray(length)
        if length.shape not in ((), cache.length.shape):
            raise ValueError(f"rollback length must be a scalar or shape {cache.length.shape}, got {length.shape}")
        if not jnp.issubdtype(length.dtype, jnp.integer):
            raise ValueError(f"rollback length must be integer, got dtype {length.dtype}")
        return cache.replace(length=jnp.broadcast_to(length.astype(jnp.int32), cache.length.shape))


def make_target_model(cfg: TargetConfig, *, seed: int = 0, dtype: Any = "float32") -> TargetModel:
    """Random-init ``TargetModel`` (params and compute in ``dtype``), built with logical axes, unplaced."""
    dt = resolve_dtype(dtype)
    with layers.unsharded_init():
        return TargetModel(cfg, rngs=nnx.Rngs(seed), param_dtype=dt, dtype=dt)


# ---------------------------------------------------------------------------------------------------------
# Target: the effectful edge
# ---------------------------------------------------------------------------------------------------------


@functools.partial(nnx.jit, static_argnames=("layer_ids",))
def _taps_jit(model, input_ids, layer_ids):
    return model(input_ids, layer_ids=layer_ids)[0]


@nnx.jit
def _logits_jit(model, input_ids):
    return model.logits(model(input_ids)[1])


class Target:
    """A loaded frozen target: model + tokenizer + chat template (what :func:`load_target` returns)."""

    def __init__(
        self,
        config: TargetConfig,
        model: TargetModel,
        *,
        tokenizer=None,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        source: str | None = None,
    ):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = config.bos_token_id
        self.eos_token_ids = config.eos_token_ids
        self.source = source
        self._generator = None  # generate.Generator, built on the first greedy_generate

    def __repr__(self):
        c = self.config
        return f"Target({c.arch}, L={c.num_layers}, H={c.hidden_size}, V={c.vocab_size}, source={self.source!r})"

    def logits(self, input_ids) -> jax.Array:
        """``[B,S]`` int -> ``[B,S,V]`` float32 logits (full causal forward, jitted)."""
        return _logits_jit(self.model, jnp.asarray(input_ids))

    def taps(self, input_ids, layer_ids: Sequence[int]) -> jax.Array:
        """``[B,S]`` int -> ``[B,S,len(layer_ids)*H]`` (id k = output of decoder layer k), jitted."""
        return _taps_jit(self.model, jnp.asarray(input_ids), tuple(int(i) for i in layer_ids))

    def greedy_generate(self, prompt_ids: Sequence[int], max_new_tokens: int, *, stop_ids=None) -> list[int]:
        """Greedy continuation of one prompt with the KV cache; stops after a token in ``stop_ids`` (default
        ``eos_token_ids``), which is included in the result. Runs the batched loop of :mod:`dflash_jax.generate`
        (one executable per power-of-two bucket of the prompt length and of ``max_new_tokens``)."""
        from dflash_jax import generate

        prompt = np.asarray(prompt_ids, np.int32)
        if prompt.ndim != 1 or prompt.size == 0 or max_new_tokens <= 0:
            raise ValueError("greedy_generate: prompt_ids must be a non-empty 1-D sequence and max_new_tokens > 0")
        if self._generator is None:
            self._generator = generate.Generator(self.model)
        stop = self.eos_token_ids if stop_ids is None else stop_ids
        return self._generator([prompt], int(max_new_tokens), eos_token_ids=stop).tokens[0].tolist()
