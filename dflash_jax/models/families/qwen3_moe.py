"""Qwen3-MoE (HF ``qwen3_moe``): the Qwen3 decoder (q/k-norm) with sparse MoE blocks.

Layer ``i`` is sparse when ``i not in mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0`` (and
``num_experts > 0``), else a dense SwiGLU of ``intermediate_size``. Sparse block (transformers
``Qwen3MoeSparseMoeBlock``): router ``gate [H, E]`` (no bias) -> :func:`moe.softmax_topk` (``norm_topk_prob``),
experts ``down(silu(gate(x)) * up(x))`` of ``moe_intermediate_size``. Checkpoints store one tensor per expert
(``mlp.experts.{e}.gate_proj.weight [I, H]``); they are stacked to ``mlp.experts.gate_proj [E, H, I]``.
"""

from __future__ import annotations

import re
from collections.abc import Container
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from dflash_jax.models import decoder, layers
from dflash_jax.models.families import base, moe

_STACKED = re.compile(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)")


class SwiGLUExperts(nnx.Module):
    """Stacked SwiGLU experts: ``gate_proj/up_proj [E, H, I]``, ``down_proj [E, I, H]`` (no bias)."""

    def __init__(self, e: int, h: int, i: int, *, rngs: nnx.Rngs, param_dtype: Any):
        self.gate_proj = moe.expert_param(rngs, (e, h, i), ("expert", "embed", "mlp"), param_dtype)
        self.up_proj = moe.expert_param(rngs, (e, h, i), ("expert", "embed", "mlp"), param_dtype)
        self.down_proj = moe.expert_param(rngs, (e, i, h), ("expert", "mlp", "embed"), param_dtype)

    def __call__(self, x, expert_ids, group_sizes):
        """See :func:`moe.dispatch` (``experts`` argument)."""
        del expert_ids

        def mm(a, w):
            return moe.grouped_matmul(a, w[...], group_sizes)

        return mm(jax.nn.silu(mm(x, self.gate_proj)) * mm(x, self.up_proj), self.down_proj)


class SparseMoeBlock(nnx.Module):
    """``x [B,S,H] -> [B,S,H]``: router ``gate``, top-k of the softmax, ragged expert dispatch."""

    def __init__(self, cfg: decoder.TargetConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
        self.gate = layers.dense(
            cfg.hidden_size, cfg.num_experts, ("embed", None), rngs=rngs, param_dtype=param_dtype, dtype=dtype
        )
        self.experts = SwiGLUExperts(
            cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, rngs=rngs, param_dtype=param_dtype
        )
        self.top_k, self.normalize, self.num_experts = cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.num_experts

    def __call__(self, x: jax.Array, dense: bool = False) -> jax.Array:
        flat = x.reshape(-1, x.shape[-1])
        w, idx = moe.softmax_topk(self.gate(flat), self.top_k, self.normalize)
        return moe.dispatch(flat, idx, w, self.experts, self.num_experts, dense=dense).reshape(x.shape)


def config_fields(hf: Mapping[str, Any]) -> dict:
    """Qwen3-MoE fields of ``config.json`` (v4 ``num_experts`` or v5 ``num_local_experts``; sliding-window
    variants are refused by the common parser)."""
    n, e = hf["num_hidden_layers"], int(hf.get("num_experts") or hf.get("num_local_experts") or 0)
    mlp_only, step = set(hf.get("mlp_only_layers") or ()), int(hf.get("decoder_sparse_step", 1))
    sparse = tuple(i for i in range(n) if e > 0 and i not in mlp_only and (i + 1) % step == 0)
    return dict(
        qk_norm=True,
        moe_layers=sparse,
        num_experts=e,
        num_experts_per_tok=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
    )


def make_layer(cfg: decoder.TargetConfig, i: int, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any) -> nnx.Module:
    """Pre-norm decoder layer whose MLP is a :class:`SparseMoeBlock` on ``cfg.moe_layers``."""
    mlp = SparseMoeBlock(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype) if i in cfg.moe_layers else None
    return decoder.decoder_layer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype, mlp=mlp)


def read_tensor(cfg: decoder.TargetConfig, fetch, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Stack the per-expert checkpoint tensors ``{prefix}.{e}.{proj}.weight`` (torch ``[out, in]``) into the
    ``[E, in, out]`` parameter ``{prefix}.{proj}``, unless ``fetch`` (a container of names) has it stacked
    already (GGUF); every other tensor is read under its own name."""
    del cfg
    m = _STACKED.fullmatch(name)
    if m is None or (isinstance(fetch, Container) and name in fetch):
        return fetch(name, shape)
    e, d_in, d_out = shape
    return np.stack([np.asarray(fetch(f"{m.group(1)}.{j}.{m.group(2)}.weight", (d_out, d_in))).T for j in range(e)])


FAMILY = base.Family(arch="qwen3_moe", config_fields=config_fields, make_layer=make_layer, read_tensor=read_tensor)
