"""The dense pre-norm decoder (Llama, Qwen2, Qwen3): GQA attention, SwiGLU MLP, RMSNorm, RoPE; Qwen2 adds q/k/v
biases (``config_from_hf``), Qwen3 a per-head RMSNorm on q and k (``decoder.QK_NORM_ARCHS``). The baseline the
other families state their differences from."""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from dflash_jax.models import decoder
from dflash_jax.models.families import base


def config_fields(hf: Mapping[str, Any]) -> dict:
    """No fields beyond the common ones; ValueError for an activation other than SiLU."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r} is not supported (supported: silu)")
    return {}


def make_layer(cfg: decoder.TargetConfig, i: int, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any) -> nnx.Module:
    del i  # every layer is alike
    return decoder.decoder_layer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)


FAMILIES = tuple(base.Family(arch, config_fields, make_layer) for arch in ("llama", "qwen2", "qwen3"))
