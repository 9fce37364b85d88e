"""GGUF files (llama.cpp format) -> target config, tensors and tokenizer, with the ``gguf`` package.

Tensor names come from gguf's own map (``gguf.get_tensor_name_map``: our HF parameter name -> GGUF name for the
file's ``general.architecture``: ``llama``, ``qwen2``, ``qwen3``, ``qwen3moe``, ``gemma3``, ``gpt-oss``); tensors
are dequantized with ``gguf.quants.dequantize`` (F32, F16, BF16, the Q/K/IQ quants, MXFP4) to float32 numpy in
torch ``[out, in]`` layout (GGUF lists dimensions reversed). What llama.cpp's converter (``convert_hf_to_gguf.py``,
class named per item) and loader (``src/llama-model.cpp`` ``load_hparams``) do differently from HF is undone:

* ``llama`` (``LlamaModel``): Q and K rows permuted for interleaved RoPE pairs; restored with
  ``w.reshape(n, HD/2, 2, ...).swapaxes(1, 2)`` (``n`` = heads for Q, kv heads for K). Qwen2/Qwen3/Qwen3-MoE,
  Gemma 3 and gpt-oss are written unpermuted (NeoX RoPE, as ours).
* stacked experts ``ffn_{gate,up,down}_exps`` (torch ``[E, out, in]``) are swapped to our ``[E, in, out]``;
  ``qwen3moe`` has no dense layers in llama.cpp and always renormalises the top-k weights (``norm_topk_prob``).
* ``gemma3`` (``Gemma3Model``): every ``*norm.weight`` (input/post-attention/pre-FFN/post-FFN sandwich norms,
  q/k norms, output norm) is stored as ``w + 1``; we subtract 1 (our Gemma RMSNorm multiplies by ``1 + w``). The
  ``sqrt(H)`` embedding scale is not baked in (``src/models/gemma3.cpp`` scales at run time, as we do). What the
  metadata does not carry, the loader fixes: with ``attention.sliding_window`` every 6th layer is full and the
  rest sliding (``set_swa_pattern(6)``), without it all are full; sliding layers use plain RoPE at base 10000;
  the attention scale is ``(H / heads)**-0.5`` for the 62-layer 27B, else ``head_dim**-0.5``
  (``query_pre_attn_scalar``). Logit soft-capping keys are refused (our family has none).
* ``gpt-oss`` (``GptOssModel``): the interleaved ``gate_up_proj`` is split into ``ffn_gate_exps`` (even rows) and
  ``ffn_up_exps`` (odd rows), or with ``--fuse-gate-up-exps`` stored as ``ffn_gate_up_exps`` (gate half, then up
  half), weights and biases alike; we interleave them back. Sinks are ``attn_sinks.weight``, the router
  ``ffn_gate_inp.{weight,bias}``, the second norm ``post_attention_norm``; layers alternate sliding / full from
  layer 0 (``set_swa_pattern(2)``). MXFP4 experts are dequantised by ``gguf.quants``. YaRN keeps transformers'
  ``truncate: false`` of ``GptOssConfig`` (the file carries factor, original context and betas).

``rope.scaling.type`` ``linear`` / ``yarn`` becomes the HF dict (``layers.rope_inv_freq``). Refused with the key or
tensor named: other architectures and scaling types, ``rope_freqs.weight`` (llama3 scaling), a missing required
key, a tensor of another shape, a quantisation type ``gguf.quants`` cannot dequantise (I8..I64, F64, Q8_1, Q8_K).
The tokenizer and chat template are rebuilt from the metadata (:func:`dflash_jax.models.tokenizer.gguf_tokenizer`:
byte-level BPE with ``pre`` in ``smollm``/``qwen2``/``gpt-2``/``gpt-4o``, or SentencePiece-BPE).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from dflash_jax.models import tokenizer as tok_lib
from dflash_jax.models.families import base
from dflash_jax.models.target import TargetConfig

_SUPPORTED_QUANTS = tuple(sorted({"F32", "F16"} | {t.name for t in gguf_quants._type_traits}))
# general.architecture -> our arch
GGUF_ARCHS = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma3": "gemma3_text",
    "gpt-oss": "gpt_oss",
}
_ROPE_SCALING = ("linear", "yarn")
_GATE_UP = ("experts.gate_up_proj", "experts.gate_up_proj_bias")  # gpt-oss, stored split or fused in GGUF
# llama.cpp src/llama-model.cpp load_hparams, LLM_ARCH_GEMMA3: the 27B (62 layers) scales attention by
# (H / heads)**-0.5, the other sizes by head_dim**-0.5; sliding layers use RoPE base 10000 whatever the file says
_GEMMA3_27B_LAYERS, _GEMMA3_LOCAL_THETA = 62, 10000.0


@functools.lru_cache(maxsize=None)
def _name_map(arch: str, n_blocks: int) -> gguf.TensorNameMap:
    arch_ids = {name: a for a, name in gguf.MODEL_ARCH_NAMES.items()}
    return gguf.get_tensor_name_map(arch_ids[arch], n_blocks)


def gguf_name(hf_name: str, arch: str, n_blocks: int) -> str:
    """HF parameter name -> GGUF tensor name through gguf's name map for ``general.architecture`` ``arch``
    (``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``; stacked experts and sinks, stored
    without a suffix in our state, get ``.weight``; gpt-oss ``*_proj_bias`` is ``*_proj.bias``)."""
    name = hf_name.replace("_proj_bias", "_proj.bias")
    out = _name_map(arch, n_blocks).get_name(name, try_suffixes=(".weight", ".bias"))
    if out is None:
        raise ValueError(f"no GGUF equivalent for tensor {hf_name!r} (general.architecture={arch!r})")
    return out if out.endswith((".weight", ".bias")) else out + ".weight"


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All GGUF key/value fields decoded to Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _f32_to_float(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.999999747e-06)."""
    return float(f"{float(x):.7g}")


def _rope_scaling(get, arch: str, source: str) -> dict | None:
    """``{arch}.rope.scaling.*`` -> the HF ``rope_scaling`` dict (``None`` for plain RoPE); keys as written by
    llama.cpp's ``TextModel.set_gguf_parameters``."""
    kind = get("rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind not in _ROPE_SCALING:
        raise ValueError(
            f"{source}: metadata {arch}.rope.scaling.type={kind!r} is not supported (supported: none, linear, yarn)"
        )
    scaling = {"rope_type": kind, "factor": _f32_to_float(get("rope.scaling.factor"))}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
        for key, hf in (("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"), ("attn_factor", "attention_factor")):
            value = get(f"rope.scaling.yarn_{key}", None)
            if value is not None:
                scaling[hf] = _f32_to_float(value)
        if arch == "gpt-oss":
            scaling["truncate"] = False
    return scaling


def _family_fields(arch: str, get, cfg: dict, source: str) -> dict:
    """Fields of the Gemma 3 / gpt-oss / Qwen3-MoE targets that llama.cpp fixes in code rather than metadata."""
    n = cfg["num_layers"]
    if arch == "gemma3":
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if get(key, None) is not None:
                raise ValueError(f"{source}: metadata {arch}.{key} is not supported (supported: absent)")
        window = int(get("attention.sliding_window", 0))
        types = base.layer_types_field({"num_hidden_layers": n, "sliding_window": window}, 6) if window > 0 else {}
        scalar = cfg["hidden_size"] // cfg["num_attention_heads"] if n == _GEMMA3_27B_LAYERS else cfg["head_dim"]
        return dict(
            types,
            hidden_act="gelu_pytorch_tanh",
            local_rope_theta=_GEMMA3_LOCAL_THETA,
            query_pre_attn_scalar=float(scalar),
        )
    if arch not in ("qwen3moe", "gpt-oss"):
        return {}
    moe = dict(
        moe_layers=tuple(range(n)),
        num_experts=int(get("expert_count")),
        num_experts_per_tok=int(get("expert_used_count")),
        moe_intermediate_size=int(get("expert_feed_forward_length")),
    )
    if arch == "qwen3moe":
        return dict(moe, norm_topk_prob=True)
    window = int(get("attention.sliding_window"))
    return dict(moe, **base.layer_types_field({"num_hidden_layers": n, "sliding_window": window}, 2))


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], source: str) -> TargetConfig:
    """A :class:`TargetConfig` from GGUF metadata (``{arch}.*`` keys, ``gguf.constants.Keys``) and the tensor
    list; a missing key raises a ValueError naming it."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ValueError(
            f"{source}: general.architecture={arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})"
        )
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{source}: tensor rope_freqs.weight (llama3 RoPE scaling) is not supported for GGUF")
    missing = object()

    def get(key, default=missing):
        full = f"{arch}.{key}"
        if full not in meta and default is missing:
            raise ValueError(f"{source}: metadata key {full!r} is missing")
        return meta.get(full, default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    eos = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    cfg = dict(
        arch=GGUF_ARCHS[arch],
        vocab_size=int(get("vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        num_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rope_theta=_f32_to_float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(get, arch, source),
        rms_norm_eps=_f32_to_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(get("context_length", 32768)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos if i is not None)),
    )
    cfg.update(_family_fields(arch, get, cfg, source))
    cfg["intermediate_size"] = int(get("feed_forward_length", cfg.get("moe_intermediate_size", missing)))
    return TargetConfig(**cfg)


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: rows ``[n, HD/2, 2]`` -> ``[n, 2, HD/2]``."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str) -> tuple[TargetConfig, "_GGUFReader", tok_lib.TokenizerBundle]:
    """``(config, fetch, tokenizer)`` of a GGUF file of an architecture in :data:`GGUF_ARCHS` (materialised by
    :func:`dflash_jax.models.target_io.load_target`)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: GGUF file not found")
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors on non-GGUF input
        raise ValueError(f"{path}: not a readable GGUF file ({e})") from e
    name = os.path.basename(path)
    tensors = {t.name: t for t in reader.tensors}
    meta = read_metadata(reader)
    cfg = config_from_metadata(meta, set(tensors), name)
    return cfg, _GGUFReader(name, tensors, cfg, meta["general.architecture"]), tok_lib.gguf_tokenizer(meta, name)


class _GGUFReader:
    """``fetch(hf_name, torch_shape)`` for :func:`~dflash_jax.models.target_io.build_target_model` over a GGUF
    file's tensors, llama.cpp's conventions undone (module docstring); ``hf_name in reader`` tells whether the
    file has the tensor."""

    def __init__(self, source: str, tensors: dict[str, Any], cfg: TargetConfig, gguf_arch: str):
        self.source, self.tensors, self.cfg, self.gguf_arch = source, tensors, cfg, gguf_arch

    def _name(self, hf_name: str) -> str:
        return gguf_name(hf_name, self.gguf_arch, self.cfg.num_layers)

    def _fused(self, gate_name: str) -> str:
        """``blk.N.ffn_gate_exps.*`` -> ``blk.N.ffn_gate_up_exps.*`` (llama.cpp's ``--fuse-gate-up-exps`` layout)."""
        return gate_name.replace("ffn_gate_exps", "ffn_gate_up_exps")

    def __contains__(self, hf_name: object) -> bool:
        name = str(hf_name)
        try:
            if name.endswith(_GATE_UP):
                gate = self._name(name.replace("gate_up_proj", "gate_proj"))
                return gate in self.tensors or self._fused(gate) in self.tensors
            return self._name(name) in self.tensors
        except ValueError:
            return False

    def _read(self, gname: str, shape: tuple[int, ...], hf_name: str) -> np.ndarray:
        """Tensor ``gname`` dequantised to float32 with torch shape ``shape`` (ValueError naming it otherwise)."""
        if gname not in self.tensors:
            raise ValueError(f"{self.source}: tensor {gname!r} (for {hf_name}) is missing")
        t = self.tensors[gname]
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype.name not in _SUPPORTED_QUANTS:
            raise ValueError(
                f"{self.source}: tensor {gname!r} has quantisation type {qtype.name}, not supported "
                f"(supported: {', '.join(_SUPPORTED_QUANTS)})"
            )
        stored = tuple(int(d) for d in reversed(t.shape))
        if stored != tuple(shape):
            raise ValueError(f"{self.source}: tensor {gname!r} has shape {stored}, the config implies {tuple(shape)}")
        return gguf_quants.dequantize(t.data, qtype).reshape(stored).astype(np.float32, copy=False)

    def _gate_up(self, hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        """gpt-oss ``gate_up_proj [E, H, 2I]`` / ``gate_up_proj_bias [E, 2I]`` from the split
        ``ffn_{gate,up}_exps`` or the fused ``ffn_gate_up_exps`` (gate half first), re-interleaved."""
        bias = hf_name.endswith("_bias")
        e, i = shape[0], shape[-1] // 2
        half = (e, i) if bias else (e, i, shape[1])  # torch layout of one half
        fused = self._fused(self._name(hf_name.replace("gate_up_proj", "gate_proj")))
        if fused in self.tensors:
            both = self._read(fused, (e, 2 * i, *half[2:]), hf_name)
            gate, up = both[:, :i], both[:, i:]
        else:
            gate, up = (self._read(self._name(hf_name.replace("gate_up", p)), half, hf_name) for p in ("gate", "up"))
        out = np.empty((e, 2 * i, *half[2:]), np.float32)
        out[:, 0::2], out[:, 1::2] = gate, up
        return out if bias else out.swapaxes(1, 2)

    def __call__(self, hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        if hf_name.endswith(_GATE_UP):
            return self._gate_up(hf_name, shape)
        gname = self._name(hf_name)
        experts = gname.endswith("_exps.weight")
        w = self._read(gname, (shape[0], shape[2], shape[1]) if experts else shape, hf_name)
        kind = gname.split(".")[-2]
        if experts:
            return w.swapaxes(1, 2)
        if self.gguf_arch == "llama" and kind in ("attn_q", "attn_k"):
            w = _unpermute(w, self.cfg.num_attention_heads if kind == "attn_q" else self.cfg.num_key_value_heads)
        if self.gguf_arch == "gemma3" and gname.endswith("norm.weight"):
            w = w - np.float32(1.0)
        return w
