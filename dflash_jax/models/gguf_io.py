"""GGUF files (llama.cpp format) -> target config, tensors and tokenizer, with the ``gguf`` package.

Tensors are dequantized with ``gguf.quants.dequantize`` to float32 numpy (torch ``[out, in]`` layout after
reversing GGUF's dimension order). For ``general.architecture == "llama"`` llama.cpp's converter permutes the
rows of Q and K (interleaved RoPE pairs); we undo it so the shared non-interleaved ``rotate_half`` RoPE applies:
``w.reshape(n, HD/2, 2, ...).swapaxes(1, 2).reshape(w.shape)`` with ``n`` = heads for Q, kv heads for K.
Qwen2/Qwen3/Qwen3-MoE GGUFs are stored unpermuted. Qwen3-MoE experts are stacked per layer
(``ffn_{gate,up,down}_exps``, torch ``[E, out, in]``), swapped to our ``[E, in, out]``; llama.cpp always
renormalises the top-k router weights of ``qwen3moe`` (``norm_topk_prob``) and has no dense layers there.
Gemma 3 and gpt-oss GGUFs are refused (SentencePiece / o200k tokenizers and conventions the metadata does not
carry); load their HF checkpoints. The tokenizer and chat template are rebuilt from the metadata.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf import quants as gguf_quants

from dflash_jax.models import tokenizer as tok_lib
from dflash_jax.models.target import TargetConfig

_SUPPORTED_QUANTS = tuple(sorted({"F32", "F16"} | {t.name for t in gguf_quants._type_traits}))

# HF tensor name (within a layer) -> GGUF tensor name.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.experts.gate_proj": "ffn_gate_exps.weight",
    "mlp.experts.up_proj": "ffn_up_exps.weight",
    "mlp.experts.down_proj": "ffn_down_exps.weight",
}
# general.architecture -> our arch; refused GGUF architectures with the reason
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
_REFUSED_ARCHS = {
    "gemma3": "Gemma 3 GGUFs carry a SentencePiece tokenizer and llama.cpp-side conventions (norm "
    "shift, attention scale, layer pattern)",
    "gpt-oss": "gpt-oss GGUFs carry an o200k tokenizer and llama.cpp's own expert layout",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")


def gguf_name(hf_name: str) -> str:
    """HF tensor name -> GGUF tensor name (``model.layers.3.mlp.up_proj.weight`` -> ``blk.3.ffn_up.weight``)."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    m = _LAYER_RE.fullmatch(hf_name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"no GGUF equivalent for tensor {hf_name!r}")
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All GGUF key/value fields decoded to Python values (strings, numbers, lists)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def _f32_to_float(x) -> float:
    """A float32 metadata value as the decimal it was written from (1e-5, not 9.999999747e-06)."""
    return float(f"{float(x):.7g}")


def config_from_metadata(meta: dict[str, Any], tensor_names: set[str], source: str) -> TargetConfig:
    """A :class:`TargetConfig` from GGUF metadata (``{arch}.*`` keys) and the tensor list."""
    arch = meta.get("general.architecture")
    if arch in _REFUSED_ARCHS:
        raise ValueError(
            f"{source}: general.architecture={arch!r} is not supported for GGUF: "
            f"{_REFUSED_ARCHS[arch]}; load the HF checkpoint directory instead"
        )
    if arch not in GGUF_ARCHS:
        raise ValueError(
            f"{source}: general.architecture={arch!r} is not supported (supported: {', '.join(GGUF_ARCHS)})"
        )
    if "rope_freqs.weight" in tensor_names or meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        raise ValueError(
            f"{source}: tensor rope_freqs.weight / {arch}.rope.scaling.* (scaled RoPE) is not "
            "supported for GGUF (supported: plain RoPE)"
        )

    def get(key, default=None):
        full = f"{arch}.{key}"
        if full not in meta and default is None:
            raise ValueError(f"{source}: metadata key {full!r} is missing")
        return meta.get(full, default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    tokens = meta.get("tokenizer.ggml.tokens")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    moe = {}
    if GGUF_ARCHS[arch] == "qwen3_moe":
        moe = dict(
            moe_layers=tuple(range(int(get("block_count")))),
            num_experts=int(get("expert_count")),
            num_experts_per_tok=int(get("expert_used_count")),
            norm_topk_prob=True,
            moe_intermediate_size=int(get("expert_feed_forward_length")),
        )
    return TargetConfig(
        arch=GGUF_ARCHS[arch],
        vocab_size=int(get("vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", moe.get("moe_intermediate_size"))),
        num_layers=int(get("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rope_theta=_f32_to_float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=_f32_to_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        max_position_embeddings=int(get("context_length", 32768)),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        **moe,
    )


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: rows ``[n, HD/2, 2]`` -> ``[n, 2, HD/2]``."""
    return w.reshape(n_heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def open_gguf(path: str) -> tuple[TargetConfig, "_GGUFReader", tok_lib.TokenizerBundle]:
    """``(config, fetch, tokenizer)`` of a Llama/Qwen2/Qwen3/Qwen3-MoE GGUF file (materialised by
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
    return cfg, _GGUFReader(name, tensors, cfg), tok_lib.gguf_tokenizer(meta, name)


class _GGUFReader:
    """``fetch(hf_name, torch_shape)`` for :func:`~dflash_jax.models.target_io.build_target_model` over a GGUF file's tensors (dequantised
    float32, llama Q/K unpermuted, stacked experts swapped to ``[E, in, out]``); ``hf_name in reader`` tells
    whether the file has the tensor."""

    def __init__(self, source: str, tensors: dict[str, Any], cfg: TargetConfig):
        self.source, self.tensors, self.cfg = source, tensors, cfg

    def __contains__(self, hf_name: object) -> bool:
        try:
            return gguf_name(str(hf_name)) in self.tensors
        except ValueError:
            return False

    def __call__(self, hf_name: str, shape: tuple[int, ...]) -> np.ndarray:
        name, cfg = self.source, self.cfg
        gname = gguf_name(hf_name)
        if gname not in self.tensors:
            raise ValueError(f"{name}: tensor {gname!r} (for {hf_name}) is missing")
        t = self.tensors[gname]
        qtype = GGMLQuantizationType(t.tensor_type)
        if qtype.name not in _SUPPORTED_QUANTS:
            raise ValueError(
                f"{name}: tensor {gname!r} has quantisation type {qtype.name}, not supported "
                f"(supported: {', '.join(_SUPPORTED_QUANTS)})"
            )
        experts = gname.endswith("_exps.weight")
        want = (shape[0], shape[2], shape[1]) if experts else tuple(shape)
        stored = tuple(int(d) for d in reversed(t.shape))
        if stored != want:
            raise ValueError(f"{name}: tensor {gname!r} has shape {stored}, the config implies {want}")
        w = gguf_quants.dequantize(t.data, qtype).reshape(stored)
        if experts:
            return w.swapaxes(1, 2)
        if cfg.arch == "llama" and gname.split(".")[-2] in ("attn_q", "attn_k"):
            w = _unpermute(w, cfg.num_attention_heads if gname.split(".")[-2] == "attn_q" else cfg.num_key_value_heads)
        return w
