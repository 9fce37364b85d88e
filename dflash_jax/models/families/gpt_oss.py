"""gpt-oss (HF ``gpt_oss``): MoE with biases and a clamped SwiGLU, attention sinks, alternating sliding/full
layers, YaRN RoPE.

Differences from the dense decoder (transformers ``modeling_gpt_oss``): RMSNorm scales in fp32 before the cast;
q/k/v/o biases; a learned sink logit per head (``self_attn.sinks``) joins each softmax; ``layer_types`` alternate
``sliding_attention`` (window ``sliding_window``) and ``full_attention``; YaRN inverse frequencies and attention
factor. MLP: router ``[H, E]`` with bias -> :func:`moe.topk_softmax`; experts (stacked as in the checkpoint)
``gate_up = x @ gate_up_proj[e] + b`` with gate/up interleaved (``[..., ::2]`` / ``[..., 1::2]``),
``gate = min(gate, 7)``, ``up = clip(up, -7, 7)``, ``out = ((up + 1) * gate * sigmoid(1.702 gate)) @ down_proj[e] + b``.

OpenAI's checkpoints store the experts as MXFP4 (``*_blocks`` uint8 e2m1 pairs, ``*_scales`` uint8 e8m0
exponents); they are dequantised on load (:func:`dequantize_mxfp4`, transformers ``convert_moe_packed_tensors``).
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash_jax.models import decoder, layers
from dflash_jax.models.families import base, moe

ALPHA, LIMIT = 1.702, 7.0  # transformers GptOssExperts constants
NORM_KW = {"upcast": True}
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32
)


class ClampedSwiGLUExperts(nnx.Module):
    """``gate_up_proj [E, H, 2I]`` (+ bias ``[E, 2I]``), ``down_proj [E, I, H]`` (+ bias ``[E, H]``)."""

    def __init__(self, e: int, h: int, i: int, *, rngs: nnx.Rngs, param_dtype: Any):
        self.gate_up_proj = moe.expert_param(rngs, (e, h, 2 * i), ("expert", "embed", "mlp"), param_dtype)
        self.gate_up_proj_bias = moe.expert_param(rngs, (e, 2 * i), ("expert", "mlp"), param_dtype, std=None)
        self.down_proj = moe.expert_param(rngs, (e, i, h), ("expert", "mlp", "embed"), param_dtype)
        self.down_proj_bias = moe.expert_param(rngs, (e, h), ("expert", "embed"), param_dtype, std=None)

    def __call__(self, x, expert_ids, group_sizes):
        """See :func:`moe.dispatch` (``experts`` argument)."""
        gate_up = moe.grouped_matmul(x, self.gate_up_proj[...], group_sizes) + moe.expert_bias(
            self.gate_up_proj_bias[...], expert_ids, x.dtype
        )
        gate = jnp.minimum(gate_up[..., ::2], LIMIT)
        up = jnp.clip(gate_up[..., 1::2], -LIMIT, LIMIT)
        glu = (up + 1) * (gate * jax.nn.sigmoid(gate * ALPHA))
        return moe.grouped_matmul(glu, self.down_proj[...], group_sizes) + moe.expert_bias(
            self.down_proj_bias[...], expert_ids, x.dtype
        )


class GptOssMLP(nnx.Module):
    """``x [B,S,H] -> [B,S,H]``: biased router, softmax over the top-k logits, ragged expert dispatch."""

    def __init__(self, cfg: decoder.TargetConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
        self.router = layers.dense(
            cfg.hidden_size,
            cfg.num_experts,
            ("embed", None),
            use_bias=True,
            rngs=rngs,
            param_dtype=param_dtype,
            dtype=dtype,
        )
        self.experts = ClampedSwiGLUExperts(
            cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, rngs=rngs, param_dtype=param_dtype
        )
        self.top_k, self.num_experts = cfg.num_experts_per_tok, cfg.num_experts

    def __call__(self, x: jax.Array, dense: bool = False) -> jax.Array:
        flat = x.reshape(-1, x.shape[-1])
        w, idx = moe.topk_softmax(self.router(flat), self.top_k)
        return moe.dispatch(flat, idx, w, self.experts, self.num_experts, dense=dense).reshape(x.shape)


def config_fields(hf: Mapping[str, Any]) -> dict:
    """gpt-oss fields of ``config.json`` (OpenAI's own configs also spell ``experts_per_token``)."""
    e = int(hf.get("num_local_experts") or hf["num_experts"])
    return dict(
        base.layer_types_field(hf, default_pattern=2),
        attention_bias=bool(hf.get("attention_bias", True)),
        moe_layers=tuple(range(hf["num_hidden_layers"])),
        num_experts=e,
        num_experts_per_tok=int(hf.get("num_experts_per_tok") or hf["experts_per_token"]),
        moe_intermediate_size=int(hf["intermediate_size"]),
    )


def make_layer(cfg: decoder.TargetConfig, i: int, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any) -> nnx.Module:
    del i
    return decoder.decoder_layer(
        cfg,
        rngs=rngs,
        param_dtype=param_dtype,
        dtype=dtype,
        norm_kw=NORM_KW,
        attn_kw={"sinks": True},
        mlp=GptOssMLP(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype),
    )


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 -> float32: ``blocks [E, out, G, 16]`` uint8 (two e2m1 codes per byte, low nibble first),
    ``scales [E, out, G]`` uint8 (exponent + 127) -> ``[E, in = G*32, out]`` (transformers
    ``convert_moe_packed_tensors``: ``ldexp(FP4[code], scale - 127)``, then ``transpose(1, 2)``)."""
    blocks = np.asarray(blocks, np.uint8)
    if blocks.shape[:-1] != np.shape(scales):
        raise ValueError(f"MXFP4 blocks {blocks.shape} and scales {np.shape(scales)} do not match")
    vals = np.empty((*blocks.shape[:-1], 2 * blocks.shape[-1]), np.float32)
    vals[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    vals[..., 1::2] = FP4_VALUES[blocks >> 4]
    vals = np.ldexp(vals, (np.asarray(scales, np.int32) - 127)[..., None])
    return vals.reshape(*blocks.shape[:2], -1).swapaxes(1, 2)


def read_tensor(cfg: decoder.TargetConfig, fetch, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The tensor under its own name, or for an MXFP4 checkpoint (``fetch`` is a container of tensor names
    without ``name`` but with ``name_blocks``) the dequantised ``*_blocks``/``*_scales`` pair."""
    del cfg
    if not (isinstance(fetch, Container) and name not in fetch and f"{name}_blocks" in fetch):
        return fetch(name, shape)
    e, d_in, d_out = shape
    blocks = fetch(f"{name}_blocks", (e, d_out, d_in // 32, 16))
    return dequantize_mxfp4(blocks, fetch(f"{name}_scales", (e, d_out, d_in // 32)))


FAMILY = base.Family(
    arch="gpt_oss", config_fields=config_fields, make_layer=make_layer, read_tensor=read_tensor, norm_kw=NORM_KW
)
