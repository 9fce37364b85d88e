"""HuggingFace checkpoint directories -> target config, tensors and tokenizer, without torch.

Reads ``config.json`` (transformers v4 and v5 semantics), ``model.safetensors`` or a sharded
``model.safetensors.index.json`` with ``safe_open(framework="np")`` (bf16 arrives as ``ml_dtypes.bfloat16``),
and the tokenizer (``tokenizer.json``) with its chat template (``tokenizer_config.json`` or
``chat_template.jinja``). Every error names the file and the tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import numpy as np
from safetensors import safe_open

from dflash_jax.models import families
from dflash_jax.models import tokenizer as tok_lib
from dflash_jax.models.decoder import TargetConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype tag -> HF config dtype name
_ST_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
_PACKED_SUFFIXES = ("_blocks", "_scales")  # MXFP4 experts (uint8), dequantised by models/families/gpt_oss.py


def read_config(path: str) -> dict:
    """``path/config.json`` as a dict (ValueError naming the file when absent or malformed)."""
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise ValueError(f"{f}: missing (an HF checkpoint directory needs config.json)")
    try:
        with open(f, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from e


def config_dtype(cfg: dict) -> str | None:
    """The checkpoint dtype declared by the config: v5 ``dtype`` or v4 ``torch_dtype`` (``None`` if absent)."""
    d = cfg.get("dtype", cfg.get("torch_dtype"))
    return None if d in (None, "auto") else str(d).removeprefix("torch.")


def weight_map(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file (absolute path), from the index of a sharded checkpoint or the single file."""
    index = os.path.join(path, INDEX_FILE)
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as fh:
            wm = json.load(fh).get("weight_map")
        if not isinstance(wm, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        missing = sorted({f for f in wm.values() if not os.path.isfile(os.path.join(path, f))})
        if missing:
            raise ValueError(f"{index}: points to absent shard file(s) {missing}")
        return {name: os.path.join(path, f) for name, f in wm.items()}
    if os.path.isfile(single):
        with safe_open(single, framework="np") as fh:
            return {name: single for name in fh.keys()}
    raise ValueError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} found")


def config_from_hf(cfg: Mapping[str, Any]) -> TargetConfig:
    """Build from an HF ``config.json`` dict; transformers v4 (``rope_theta``/``rope_scaling``) and v5
    (``rope_parameters``) semantics. Unsupported families or features raise ValueError."""
    arch = cfg.get("model_type")
    if arch not in families.FAMILIES:
        raise ValueError(
            f"config.json model_type={arch!r} is not supported (supported: {', '.join(families.SUPPORTED_ARCHS)})"
        )
    if cfg.get("mlp_bias", False):
        raise ValueError("config.json mlp_bias=true is not supported (supported: no MLP bias)")
    if cfg.get("use_sliding_window", False):
        raise ValueError("config.json use_sliding_window=true is not supported (supported: full attention)")
    rope = cfg.get("rope_parameters")
    if isinstance(rope, Mapping) and rope.get("rope_theta") is None and "full_attention" in rope:
        rope = rope["full_attention"]  # v5 per-layer-type form
    if rope is not None:  # v5
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = dict(rope)
    else:  # v4
        theta = cfg.get("rope_theta", 10000.0)
        scaling = dict(cfg["rope_scaling"]) if cfg.get("rope_scaling") else {}
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    scaling = None if rope_type in (None, "default") else scaling
    heads = cfg["num_attention_heads"]
    eos = cfg.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    fields = dict(
        arch=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=float(theta),
        rope_scaling=scaling,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=True if arch == "qwen2" else bool(cfg.get("attention_bias", False)),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos,
    )
    fields.update(families.FAMILIES[arch].config_fields(cfg))
    return TargetConfig(**fields)


class _SafetensorsReader:
    """``fetch(name, shape)`` for :func:`~dflash_jax.models.target_io.build_target_model`: reads one tensor,
    checks shape and dtype; ``name in reader`` tells whether the checkpoint has a tensor. ``prefix`` is prepended
    to every name (the decoder of a multimodal checkpoint)."""

    def __init__(self, path: str, expected_dtype: str | None, prefix: str = ""):
        self.path, self.prefix = path, prefix
        self.map = {name.removeprefix(prefix): f for name, f in weight_map(path).items() if name.startswith(prefix)}
        self.expected_dtype = expected_dtype
        self._handles: dict[str, Any] = {}

    def _handle(self, file: str):
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="np")
        return self._handles[file]

    def __contains__(self, name: object) -> bool:
        return name in self.map

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.map:
            raise ValueError(f"{self.path}: tensor {self.prefix + name!r} is missing from the checkpoint")
        file, name = self.map[name], self.prefix + name
        where = f"{os.path.basename(file)}: tensor {name!r}"
        h = self._handle(file)
        if name not in h.keys():
            raise ValueError(f"{where} listed in {INDEX_FILE} but absent from the file")
        sl = h.get_slice(name)
        stored = sl.get_dtype()
        packed = stored == "U8" and name.endswith(_PACKED_SUFFIXES)
        if stored not in _ST_DTYPES and not packed:
            raise ValueError(f"{where}: dtype {stored} is not supported (supported: {', '.join(_ST_DTYPES)})")
        if not packed and self.expected_dtype is not None and _ST_DTYPES[stored] != self.expected_dtype:
            raise ValueError(
                f"{where}: stored as {_ST_DTYPES[stored]} but config.json declares dtype {self.expected_dtype}"
            )
        if tuple(sl.get_shape()) != tuple(shape):
            raise ValueError(f"{where}: shape {tuple(sl.get_shape())} does not match the config's {tuple(shape)}")
        return h.get_tensor(name)


def random_target_config(section: Any, **fields: Any) -> TargetConfig:
    """The ``TargetConfig`` of a random target (``config.RandomTargetSection``): parsed from its ``config.json``
    form like a loaded target's, its own dims kept (those that are ``TargetConfig`` fields), then any explicit
    ``fields``. ValueError names ``target.random.<field>``."""
    families.family(section.arch, "target.random.arch")
    own = {f.name for f in dataclasses.fields(TargetConfig)}
    dims = {f.name: getattr(section, f.name) for f in dataclasses.fields(section) if f.name in own}
    try:
        return dataclasses.replace(config_from_hf(section.hf_config()), **dims, **fields)
    except ValueError as err:
        raise ValueError(str(err).replace("TargetConfig.", "target.random.")) from None


def open_hf(path: str) -> tuple[TargetConfig, "_SafetensorsReader", tok_lib.TokenizerBundle]:
    """``(config, fetch, tokenizer)`` of an HF checkpoint directory of a supported family (materialised by
    :func:`dflash_jax.models.target_io.load_target`); a multimodal wrapper (``families.WRAPPERS``) yields its
    text decoder."""
    raw, prefix = read_config(path), ""
    try:
        if raw.get("model_type") in families.WRAPPERS:
            raw, prefix = families.WRAPPERS[raw["model_type"]](raw)
        cfg = config_from_hf(raw)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{os.path.join(path, 'config.json')}: missing or invalid field {e}") from e
    return cfg, _SafetensorsReader(path, config_dtype(raw), prefix), tok_lib.load_hf_tokenizer(path)
