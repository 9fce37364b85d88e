"""The per-family interface of a target decoder (what a new family implements; README "Adding a target family").

A family is the difference between its HF architecture and the dense pre-norm decoder (``families/dense.py``, pieces in ``models/decoder.py``):

* ``config_fields(hf_config) -> dict``: the :class:`~dflash_jax.models.decoder.TargetConfig` fields that
  ``config.json`` sets beyond the common ones (layer types, window, MoE dims, ...); ValueError on unsupported input;
* ``make_layer(cfg, i, *, rngs, param_dtype, dtype) -> nnx.Module``: decoder layer ``i``, called as
  ``layer(h, cos, sin, mask, past, write_pos) -> (h, kv)`` (the contract of ``decoder.decoder_layer``; ``past``
  and ``kv`` as in ``decoder.Attention.__call__``);
* ``read_tensor(cfg, fetch, name, shape) -> np.ndarray``: the checkpoint tensor behind parameter ``name`` (HF
  naming, torch layout ``shape``), e.g. stacking per-expert tensors; default ``fetch(name, shape)``;
* ``embed_scale(cfg)``: multiplier of the embedding lookup (``None`` = none) and ``norm_kw``: the final norm's
  :class:`~dflash_jax.models.layers.RMSNorm` options.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np


def default_read_tensor(
    cfg, fetch: Callable[[str, tuple[int, ...]], np.ndarray], name: str, shape: tuple[int, ...]
) -> np.ndarray:
    """The tensor stored under the parameter's own HF name."""
    del cfg
    return fetch(name, shape)


@dataclasses.dataclass(frozen=True)
class Family:
    """One target family (see the module docstring for each hook's contract)."""

    arch: str
    config_fields: Callable[[Mapping[str, Any]], dict]
    make_layer: Callable[..., Any]
    read_tensor: Callable[..., np.ndarray] = default_read_tensor
    embed_scale: Callable[[Any], float | None] = lambda cfg: None
    norm_kw: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def layer_types_field(hf: Mapping[str, Any], default_pattern: int | None) -> dict:
    """``layer_types``/``sliding_window`` from ``config.json``: the explicit list, else every
    ``default_pattern``-th layer full and the rest sliding (HF's generated default); ``None`` = all full."""
    n = hf["num_hidden_layers"]
    types = hf.get("layer_types")
    if types is None and default_pattern is not None:
        pattern = int(hf.get("sliding_window_pattern", default_pattern))
        types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if types is None:
        return {}
    return {"layer_types": tuple(types), "sliding_window": hf.get("sliding_window")}
