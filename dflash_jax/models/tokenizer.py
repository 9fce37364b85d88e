"""Target tokenizers (``tokenizers.Tokenizer``) and chat templates, from HF directories or GGUF metadata.

Rendering the template is ``dflash_jax.data.chat``'s job; here we only recover the template text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp ``tokenizer.ggml.pre`` values we can rebuild, and their pre-tokenizers.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_GGUF_PRE = ("smollm", "qwen2", "gpt-2")
# GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_SPECIAL_TOKEN_TYPES = (3, 4)


@dataclasses.dataclass(frozen=True)
class TokenizerBundle:
    """A tokenizer with its chat template and bos/eos strings (any may be ``None``)."""

    tokenizer: Tokenizer | None
    chat_template: str | None
    bos_token: str | None
    eos_token: str | None


def _token_str(t: Any) -> str | None:
    return t.get("content") if isinstance(t, Mapping) else t


def load_hf_tokenizer(path: str) -> TokenizerBundle:
    """``tokenizer.json`` + chat template (``chat_template.jinja`` or ``tokenizer_config.json``) of an HF
    directory; all ``None`` where the files are absent."""
    tj = os.path.join(path, "tokenizer.json")
    tok = Tokenizer.from_file(tj) if os.path.isfile(tj) else None
    tc_path = os.path.join(path, "tokenizer_config.json")
    tc = {}
    if os.path.isfile(tc_path):
        with open(tc_path, encoding="utf-8") as fh:
            tc = json.load(fh)
    template = tc.get("chat_template")
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as fh:
            template = fh.read()
    return TokenizerBundle(tok, template, _token_str(tc.get("bos_token")), _token_str(tc.get("eos_token")))


def gguf_tokenizer(meta: Mapping[str, Any], source: str) -> TokenizerBundle:
    """Rebuild a byte-level BPE tokenizer from GGUF ``tokenizer.*`` metadata (``meta``: key -> decoded value).

    Vocab/merges from ``tokenizer.ggml.tokens``/``merges``; pre-tokenizer by ``tokenizer.ggml.pre``
    (``smollm``: digits split + ByteLevel; ``qwen2``: Qwen regex + ByteLevel; ``gpt-2``: ByteLevel regex);
    token types 3/4 become special tokens; ByteLevel decoder; optional BOS post-processor.
    """
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model={model!r} is not supported (supported: gpt2 byte-level BPE)")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in SUPPORTED_GGUF_PRE:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre={pre!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_PRE)})"
        )
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        tok = Tokenizer(
            models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
        )
    except Exception as e:  # tokenizers raises a bare Exception on inconsistent vocab/merges
        raise ValueError(f"{source}: tokenizer.ggml.tokens/merges do not form a BPE model ({e})") from e
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "qwen2")
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_REGEX), behavior="isolated", invert=False), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in _SPECIAL_TOKEN_TYPES]
    )
    bos_id, eos_id = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    bos = tokens[bos_id] if bos_id is not None else None
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )
    return TokenizerBundle(
        tok, meta.get("tokenizer.chat_template"), bos, tokens[eos_id] if eos_id is not None else None
    )
