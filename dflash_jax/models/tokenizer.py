"""Target tokenizers (``tokenizers.Tokenizer``) and chat templates, from HF directories or GGUF metadata.

Rendering the template is ``dflash_jax.data.chat``'s job; here we only recover the template text.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

# llama.cpp ``tokenizer.ggml.pre`` values we can rebuild, and their pre-tokenizers.
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# o200k (gpt-oss / GPT-4o): the Split regex of gpt-oss's tokenizer.json (tiktoken ``o200k_base``), which llama.cpp
# also uses for ``tokenizer.ggml.pre == "gpt-4o"`` (src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT4O).
_O200K_REGEX = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_REGEX = {"qwen2": _QWEN2_REGEX, "gpt-4o": _O200K_REGEX}
SUPPORTED_GGUF_PRE = ("smollm", "qwen2", "gpt-2", "gpt-4o")
SUPPORTED_GGUF_MODELS = ("gpt2", "llama")
# GGUF token types (SentencePiece's ``ModelProto.SentencePiece.Type``): 1 normal, 2 unknown, 3 control,
# 4 user-defined, 5 unused, 6 byte. Control and unknown tokens are special (``decode(skip_special_tokens=True)``
# drops them); user-defined ones (Gemma's ``\n``, space runs, HTML tags) are text, matched whole as SentencePiece does.
_SPECIAL_TOKEN_TYPES = (2, 3)
_USER_DEFINED = 4


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


def _spm_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece-BPE vocab: every split ``(a, b)`` of a normal piece ``a + b`` into two pieces
    of the vocab, ranked by the score of ``a + b`` (highest first; ties by id). llama.cpp's SPM tokenizer merges
    the adjacent pair whose concatenation scores highest, which is BPE with exactly this rank."""
    ids = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, t in enumerate(tokens):
        if types[i] != 1:
            continue
        merges.extend(
            (-scores[i], i, ids[t[:k]], t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in ids and t[k:] in ids
        )
    return [(a, b) for *_, a, b in sorted(merges)]


def _spm_tokenizer(meta: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int], source: str) -> Tokenizer:
    """SentencePiece-BPE (``tokenizer.ggml.model == "llama"``, e.g. Gemma 3): BPE with byte fallback over the
    scores' merges (:func:`_spm_merges`), spaces replaced by ``▁``, a ``▁`` prepended when
    ``tokenizer.ggml.add_space_prefix`` (llama.cpp's default: true), no pre-split; the decoder reverses it (and
    drops that prefix space again, as SentencePiece and llama.cpp do)."""
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"{source}: tokenizer.ggml.scores is missing or not one score per token")
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    try:
        tok = Tokenizer(
            models.BPE(
                vocab={t: i for i, t in enumerate(tokens)},
                merges=_spm_merges(tokens, [float(x) for x in scores], types),
                unk_token=tokens[unk_id] if unk_id is not None else None,
                fuse_unk=True,
                byte_fallback=True,
            )
        )
    except Exception as e:  # tokenizers raises a bare Exception on an inconsistent vocab
        raise ValueError(f"{source}: tokenizer.ggml.tokens/scores do not form a BPE model ({e})") from e
    norm = [normalizers.Replace(" ", "▁")]
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        norm.insert(0, normalizers.Prepend("▁"))
        dec.append(decoders.Strip(" ", 1, 0))
    tok.normalizer = normalizers.Sequence(norm)
    tok.decoder = decoders.Sequence(dec)
    return tok


def _byte_level_tokenizer(meta: Mapping[str, Any], tokens: Sequence[str], source: str) -> Tokenizer:
    """Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): vocab/merges from ``tokenizer.ggml.tokens``/``merges``;
    pre-tokenizer by ``tokenizer.ggml.pre`` (``smollm``: digits split + ByteLevel; ``qwen2`` / ``gpt-4o``: the
    family's Split regex + ByteLevel; ``gpt-2``: ByteLevel regex); ByteLevel decoder."""
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in SUPPORTED_GGUF_PRE:
        raise ValueError(
            f"{source}: tokenizer.ggml.pre={pre!r} is not supported (supported: {', '.join(SUPPORTED_GGUF_PRE)})"
        )
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        tok = Tokenizer(
            models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
        )
    except Exception as e:  # tokenizers raises a bare Exception on inconsistent vocab/merges
        raise ValueError(f"{source}: tokenizer.ggml.tokens/merges do not form a BPE model ({e})") from e
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre not in _SPLIT_REGEX)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _SPLIT_REGEX:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated", invert=False), byte_level]
        )
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    return tok


def gguf_tokenizer(meta: Mapping[str, Any], source: str) -> TokenizerBundle:
    """Rebuild the tokenizer from GGUF ``tokenizer.*`` metadata (``meta``: key -> decoded value): byte-level BPE
    (``gpt2``) or SentencePiece-BPE (``llama``); control and unknown tokens (types 3, 2) become special added
    tokens, user-defined ones (type 4) non-special added tokens, matched whole (see below) and kept by
    ``decode(skip_special_tokens=True)``; BOS/EOS added by a post-processor when ``tokenizer.ggml.add_bos_token``
    / ``add_eos_token``."""
    model = meta.get("tokenizer.ggml.model")
    if model not in SUPPORTED_GGUF_MODELS:
        raise ValueError(
            f"{source}: tokenizer.ggml.model={model!r} is not supported (supported: gpt2 byte-level BPE, "
            "llama SentencePiece-BPE)"
        )
    tokens: Sequence[str] = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    tok = (
        _spm_tokenizer(meta, tokens, types, source) if model == "llama" else _byte_level_tokenizer(meta, tokens, source)
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty in _SPECIAL_TOKEN_TYPES]
    )
    # A user-defined piece is matched in the text as stored: with spaces as ``▁`` (a SentencePiece model's form) in
    # the normalized text, with raw spaces (llama.cpp's converter pre-normalizes added tokens) in the raw text.
    # With ``add_space_prefix`` the normalized form cannot be matched (tokenizers slices a normalized added token
    # wrongly after the length-changing ``▁`` prefix), so such pieces are left to the BPE model.
    spm_normalized = model == "llama" and not meta.get("tokenizer.ggml.add_space_prefix", True)
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=spm_normalized and "▁" in t)
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
    )
    bos_id, eos_id = (meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos"))
    bos_id, eos_id = (None if i is None else int(i) for i in (bos_id, eos_id))
    bos = tokens[bos_id] if bos_id is not None else None
    eos = tokens[eos_id] if eos_id is not None else None
    add_bos = bos is not None and bool(meta.get("tokenizer.ggml.add_bos_token", False))
    add_eos = eos is not None and bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:

        def wrap(seq: str) -> str:
            return " ".join([bos] * add_bos + [seq] + [eos] * add_eos)

        tok.post_processor = processors.TemplateProcessing(
            single=wrap("$A"),
            pair=f"{wrap('$A')} {wrap('$B')}",
            special_tokens=list(
                dict(([(bos, bos_id)] if add_bos else []) + ([(eos, eos_id)] if add_eos else [])).items()
            ),
        )
    return TokenizerBundle(tok, meta.get("tokenizer.chat_template"), bos, eos)
