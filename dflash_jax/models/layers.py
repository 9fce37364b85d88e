"""Building blocks shared by the draft and the target model.

One implementation of each piece serves both models: RMSNorm (Qwen3/Llama semantics), rotary embeddings
(default and llama3 scaling, non-interleaved ``rotate_half``), the SwiGLU MLP and dense layers carrying logical
partition names. Attention lives in :mod:`dflash_jax.models.attention`.

Parameters are created with logical axis names only (``nnx.use_eager_sharding(False)`` is active inside
:func:`unsharded_init`); ``dflash_jax.train.sharding`` maps those names onto a device mesh through one rules
table. Logical axis names used here:

``embed`` (model width H), ``mlp`` (intermediate I), ``q_heads`` (NH*HD), ``kv_heads`` (KVH*HD),
``fused`` (T*H, the draft's fc input), ``vocab`` (V), ``norm`` (any norm weight), ``head_dim`` (HD).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

@contextlib.contextmanager
def unsharded_init():
    """Create variables with logical sharding metadata but without placing them on a mesh."""
    with nnx.use_eager_sharding(False):
        yield


def check_model_dims(cfg: Any, int_fields: tuple[str, ...]) -> None:
    """Shared architecture checks of a model config dataclass: every ``int_fields`` entry is a positive int,
    ``num_attention_heads % num_key_value_heads == 0`` and ``head_dim`` is even (RoPE). ``ValueError`` names
    the field as ``<ConfigClass>.<field>``."""
    name = type(cfg).__name__
    for f in int_fields:
        v = getattr(cfg, f)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}.{f} must be a positive integer, got {v!r}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"{name}.num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
                         f"num_key_value_heads ({cfg.num_key_value_heads})")
    if cfg.head_dim % 2:
        raise ValueError(f"{name}.head_dim must be even for RoPE, got {cfg.head_dim}")


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
    """Qwen3/Llama RMSNorm: ``w * cast(x32 / sqrt(mean(x32**2) + eps), x.dtype)``; weight shape ``[dim]``."""

    def __init__(self, dim: int, eps: float, *, param_dtype: Any = jnp.float32, axis: str = "norm"):
        self.eps = float(eps)
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=(axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return y.astype(dtype) * self.weight[...].astype(dtype)


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))`` with ``gate/up [H, I]`` and ``down [I, H]`` (no bias)."""

    def __init__(self, hidden: int, intermediate: int, *, rngs: nnx.Rngs, std: float = 0.02,
                 param_dtype: Any = jnp.float32, dtype: Any = None):
        kw = dict(rngs=rngs, std=std, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = dense(hidden, intermediate, ("embed", "mlp"), **kw)
        self.up_proj = dense(hidden, intermediate, ("embed", "mlp"), **kw)
        self.down_proj = dense(intermediate, hidden, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------------------------------------------------
# Rotary position embeddings
# ---------------------------------------------------------------------------------------------------------


def rope_inv_freq(head_dim: int, theta: float, scaling: Mapping[str, Any] | None = None) -> np.ndarray:
    """``inv_freq[i] = 1 / theta**(2i/HD)`` in float32, ``[HD/2]``; optional llama3-style frequency scaling.

    ``scaling`` follows HF ``rope_scaling``/``rope_parameters``: ``{"rope_type": "llama3", "factor",
    "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}``. ``None`` or
    ``rope_type == "default"`` gives plain RoPE.
    """
    inv = (1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))))
    inv = inv.astype(np.float32)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type={rope_type!r} is not supported (supported: default, llama3)")
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


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray | jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """cos/sin ``[..., L, HD]`` for integer ``positions [..., L]``; computed in fp32 then cast to ``dtype``."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Non-interleaved RoPE on ``x [..., L, heads, HD]`` with ``cos/sin [..., L, HD]``:
    ``x*cos + rotate_half(x)*sin`` where ``rotate_half(x) = concat(-x[HD/2:], x[:HD/2])``."""
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[..., None, :] + rot * sin[..., None, :]
