"""The pieces of a target decoder, below the model and its families: ``TargetConfig`` (HF field meanings), the
KV cache, GQA self-attention with HF names and the pre-norm decoder layer. ``models/target.py`` stacks them into
the model; each family of ``models/families/`` (the dense Llama/Qwen2/Qwen3 one included) builds its layers from
them.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from dflash_jax import config as config_lib
from dflash_jax.models import attention, layers

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
        config_lib.check_model_dims(
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
