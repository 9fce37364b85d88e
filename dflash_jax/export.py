"""Export and import of DFlash drafters in the z-lab / vLLM / SGLang / ModelOpt format (docs/design.md §4.11).

A checkpoint is a directory with ``model.safetensors`` (torch ``[out, in]`` layout, names ``fc.weight``,
``hidden_norm.weight``, ``layers.{i}.self_attn.{q,k,v,o}_proj.weight``, ``layers.{i}.self_attn.{q,k}_norm.weight``,
``layers.{i}.mlp.{gate,up,down}_proj.weight``, ``layers.{i}.{input,post_attention}_layernorm.weight``,
``norm.weight``, with the sink option ``layers.{i}.self_attn.attention_sink_bias``; no embedding, no
``lm_head``) and ``config.json`` (Qwen3-style dims plus ``block_size``, ``num_target_layers``, ``dflash_config``,
``rope_scaling``).

DFlash2 (``architectures: ["DFlash2DraftModel"]``) adds ``layers.{i}.{attention_conv,mlp_conv}.{base_kernel,
kernel_projection.weight}`` and ``candidate_selector.{predecessor_codebook,successor_codebook,
hidden_projection.weight}``, and ``dflash_config`` ``conv_kernel_size``, ``conv_group_size``, ``selector_rank``,
``selector_top_k`` (z-lab ``dflash/model.py``; NeMo Automodel ``draft_qwen3_dflash2.py``); ``is_causal: false``.
JetSpec is the DFlash checkpoint with ``dflash_config.causal = true`` and ``is_causal: true`` (vLLM reads
``is_causal``, then ``dflash_config.causal``). ``output_multiplier`` / ``final_logit_softcapping``, when set, are
``dflash_config`` fields of any variant.

``params`` is always the draft's ``nnx.State`` of ``nnx.Param`` (``nnx.state(model, nnx.Param)``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from dflash_jax import paths
from dflash_jax.models import layers
from dflash_jax.models.draft import DFlashDraft, DraftConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_CODEBOOK_ALIASES = {
    f"candidate_selector.{name}.weight": f"candidate_selector.{name}"
    for name in ("predecessor_codebook", "successor_codebook")
}
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _abstract_draft(config: DraftConfig, param_dtype: Any = jnp.float32) -> DFlashDraft:
    with layers.unsharded_init():
        return nnx.eval_shape(lambda: DFlashDraft(config, rngs=nnx.Rngs(0), param_dtype=param_dtype))


def _export_name(path: tuple) -> tuple[str, bool]:
    """NNX param path -> (torch name, transpose?): ``('layers', 0, 'mlp', 'up_proj', 'kernel')`` ->
    ``('layers.0.mlp.up_proj.weight', True)``."""
    *head, leaf = (str(p) for p in path)
    return ".".join([*head, "weight" if leaf == "kernel" else leaf]), leaf == "kernel"


def to_torch_tensors(params: nnx.State) -> dict[str, np.ndarray]:
    """Draft params -> ``{export name: array}`` in torch ``[out, in]`` layout, in the params' own dtype."""
    out = {}
    for path, var in nnx.to_flat_state(params):
        name, transpose = _export_name(path)
        arr = np.asarray(var[...] if isinstance(var, nnx.Variable) else var)
        out[name] = np.ascontiguousarray(arr.T if transpose else arr)
    return out


def from_torch_tensors(
    config: DraftConfig, tensors: Mapping[str, np.ndarray], param_dtype: Any = jnp.float32
) -> nnx.State:
    """``{export name: array}`` (torch layout) -> draft params; every key and shape is checked.

    Raises ``ValueError`` listing unknown keys, missing keys and wrong shapes (``embed_tokens``/``lm_head``/
    ``rotary_emb`` entries are not part of a draft and count as unknown).
    """
    # The codebooks are nn.Embedding modules in z-lab's model (state_dict ``....codebook.weight``); published
    # checkpoints and our export name them without ``.weight`` (z-lab's from_pretrained key_mapping).
    tensors = {_CODEBOOK_ALIASES.get(k, k): v for k, v in tensors.items()}
    abstract = nnx.state(_abstract_draft(config, param_dtype), nnx.Param)
    flat = list(nnx.to_flat_state(abstract))
    expected = {}
    for path, var in flat:
        name, transpose = _export_name(path)
        expected[name] = (path, var, transpose)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(set(expected) - set(tensors))
    wrong = []
    for name, (_, var, transpose) in expected.items():
        if name in tensors:
            want = tuple(var.shape[::-1] if transpose else var.shape)
            if tuple(tensors[name].shape) != want:
                wrong.append(f"{name}: got {tuple(tensors[name].shape)}, expected {want}")
    if unknown or missing or wrong:
        raise ValueError(
            "draft checkpoint does not match the config: "
            f"unknown keys {unknown}; missing keys {missing}; wrong shapes {wrong}"
        )
    new = []
    for name, (path, var, transpose) in expected.items():
        arr = np.asarray(tensors[name])
        new.append((path, var.replace(jnp.asarray(arr.T if transpose else arr, dtype=param_dtype))))
    return nnx.from_flat_state(new)


def draft_from_params(config: DraftConfig, params: nnx.State, *, dtype: Any = jnp.float32) -> DFlashDraft:
    """Build a :class:`DFlashDraft` (compute ``dtype``) holding ``params``."""
    with layers.unsharded_init():
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: DFlashDraft(config, rngs=nnx.Rngs(0), dtype=dtype)))
    return nnx.merge(graphdef, params)


def config_to_json(config: DraftConfig, dtype: str = "bfloat16") -> dict:
    """The exported ``config.json`` (docs/design.md §4.11), ``rope_theta`` = the theta the draft really uses."""
    dflash_config = {
        "mask_token_id": config.mask_token_id,
        "target_layer_ids": list(config.target_layer_ids),
        "causal": bool(config.causal),
    }
    if config.variant == "dflash2":
        dflash_config.update(
            conv_kernel_size=config.conv_kernel_size,
            conv_group_size=config.conv_group_size,
            selector_rank=config.selector_rank,
            selector_top_k=config.selector_top_k,
        )
    for key in ("output_multiplier", "final_logit_softcapping"):
        if getattr(config, key) is not None:
            dflash_config[key] = getattr(config, key)
    out = {
        "architectures": ["DFlash2DraftModel" if config.variant == "dflash2" else "DFlashDraftModel"],
        "model_type": "qwen3",
        "block_size": config.block_size,
        "dflash_config": dflash_config,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "initializer_range": config.initializer_range,
        "attention_bias": config.attention_bias,
        "attention_dropout": 0.0,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_theta": config.rope_theta, "rope_type": "default"},
        "rope_scaling": config.rope_scaling,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "num_target_layers": config.num_target_layers,
        "layer_types": ["full_attention"] * config.num_layers,
    }
    if config.variant != "dflash":
        out["is_causal"] = bool(config.causal)
    if config.sliding_window is not None:
        out["sliding_window"] = config.sliding_window
        dflash_config.update(use_swa=True, swa_window_size=config.sliding_window)
    if config.attention_sink:  # ModelOpt's export: vLLM reads dflash_config.attention_sink_bias
        out["attention_sink_bias"] = dflash_config["attention_sink_bias"] = True
    return out


def _field(d: Mapping, key: str, where: str = "config.json"):
    if key not in d:
        raise ValueError(f"{where} has no field {key!r}")
    return d[key]


def config_from_json(d: Mapping[str, Any]) -> DraftConfig:
    """Parse a z-lab / ModelOpt / dflash_jax ``config.json`` into a validated :class:`DraftConfig`."""
    dc = _field(d, "dflash_config")
    if not isinstance(dc, Mapping):
        raise ValueError(f"config.json field 'dflash_config' must be an object, got {type(dc).__name__}")
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json field 'hidden_act' must be 'silu', got {d['hidden_act']!r}")
    scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ValueError(f"config.json field 'rope_scaling' must be an object or null, got {scaling!r}")
    if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        scaling = None
    if "rope_theta" in d:
        theta = d["rope_theta"]
    elif isinstance(d.get("rope_parameters"), Mapping) and "rope_theta" in d["rope_parameters"]:
        theta = d["rope_parameters"]["rope_theta"]
    else:
        raise ValueError("config.json has neither 'rope_theta' nor 'rope_parameters.rope_theta'")
    use_swa = bool(dc.get("use_swa", False))
    window = None
    if use_swa:
        window = dc.get("swa_window_size", d.get("sliding_window"))
        if window is None:
            raise ValueError(
                "config.json 'dflash_config.use_swa' is true but 'dflash_config.swa_window_size' "
                "(or 'sliding_window') is missing"
            )
    hidden = int(_field(d, "hidden_size"))
    heads = int(_field(d, "num_attention_heads"))
    variant = "dflash2" if "DFlash2DraftModel" in (d.get("architectures") or ()) else "dflash"
    extra = {}
    if variant == "dflash2":  # z-lab / NeMo defaults for the fields a checkpoint may leave out
        defaults = dict(conv_kernel_size=2, conv_group_size=16, selector_rank=256, selector_top_k=16)
        extra = {k: int(dc.get(k, v)) for k, v in defaults.items()}
    for key in ("output_multiplier", "final_logit_softcapping"):
        if dc.get(key) is not None:
            extra[key] = float(dc[key])
    return DraftConfig(
        hidden_size=hidden,
        num_layers=int(_field(d, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(d.get("num_key_value_heads", heads)),
        head_dim=int(d.get("head_dim") or hidden // heads),
        intermediate_size=int(_field(d, "intermediate_size")),
        vocab_size=int(_field(d, "vocab_size")),
        num_target_layers=int(dc["num_target_layers"] if "num_target_layers" in dc else _field(d, "num_target_layers")),
        target_layer_ids=tuple(_field(dc, "target_layer_ids", "config.json dflash_config")),
        block_size=int(dc["block_size"] if "block_size" in dc else _field(d, "block_size")),
        mask_token_id=int(_field(dc, "mask_token_id", "config.json dflash_config")),
        rope_theta=float(theta),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        sliding_window=None if window is None else int(window),
        causal=bool(d.get("is_causal", dc.get("causal", False))),
        attention_bias=bool(d.get("attention_bias", False)),
        initializer_range=float(d.get("initializer_range", 0.02)),
        max_position_embeddings=int(d.get("max_position_embeddings", 32768)),
        rope_scaling=dict(scaling) if scaling else None,
        attention_sink=bool(dc.get("attention_sink_bias", d.get("attention_sink_bias", False))),
        variant=variant,
        **extra,
    )


def export_draft(
    config: DraftConfig,
    params: nnx.State,
    out_dir: str | os.PathLike,
    dtype: str = "bfloat16",
    protect: Sequence[str] = (),
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` to ``out_dir`` atomically (temp dir beside it, then rename).

    ``dtype`` in ``{"float32", "bfloat16", "float16"}``. ``out_dir`` must be absent, empty or a previous export
    (nothing but those two files), and neither one of ``protect`` nor a directory containing one
    (:func:`dflash_jax.paths.check_output_dir`; ValueError otherwise, nothing touched); a previous export is
    replaced only once the new one is complete. Returns the output path.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    paths.check_output_dir(str(out_dir), (WEIGHTS_FILE, CONFIG_FILE), protect)
    tensors = to_torch_tensors(params)
    from_torch_tensors(config, tensors)  # validates keys and shapes against the config before writing anything
    tensors = {k: v.astype(_DTYPES[dtype]) for k, v in tensors.items()}
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_json(config, dtype), indent=2) + "\n")
        for f in (WEIGHTS_FILE, CONFIG_FILE):  # mkdtemp makes a private 0700 dir; an export is for sharing
            os.chmod(tmp / f, 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def import_draft(in_dir: str | os.PathLike, *, param_dtype: Any = jnp.float32) -> tuple[DraftConfig, nnx.State]:
    """Read a z-lab / ModelOpt / dflash_jax export -> ``(config, params)`` (params cast to ``param_dtype``)."""
    d = Path(in_dir)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (d / f).is_file():
            raise ValueError(f"in_dir {str(d)!r} has no {f}")
    try:
        raw = json.loads((d / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{d / CONFIG_FILE} is not valid JSON: {e}") from None
    config = config_from_json(raw)
    try:
        tensors = load_file(str(d / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{d / WEIGHTS_FILE} is not a readable safetensors file: {e}") from None
    return config, from_torch_tensors(config, tensors, param_dtype)
