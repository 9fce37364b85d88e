"""Google's ``sentencepiece`` as the tokenizer oracle of a GGUF SentencePiece vocabulary.

:func:`train_vocab` trains a small SentencePiece-BPE model (as Gemma's and Llama 2's were made: byte fallback,
control and user-defined symbols, identity normalisation) and returns it as the ``tokenizer.*`` metadata
llama.cpp's converter writes (pieces, scores, types, special ids). :func:`processor_from_gguf` rebuilds a
SentencePiece model from such metadata alone (a ``ModelProto`` of the pieces with their scores and types, the
BPE model type and the normaliser flags the metadata implies), which is what a real GGUF allows.
"""

import io

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb

CONTROL = ("<start_of_turn>", "<end_of_turn>")
# Gemma-style user-defined symbols: newlines, space runs (spaces are U+2581 in a SentencePiece vocab), HTML tags
USER_DEFINED = ("\n", "\n\n", "\t", "▁▁", "▁▁▁▁", "<h1>", "</h1>", "<td>")
SPECIAL_IDS = {"pad": 0, "eos": 1, "bos": 2, "unk": 3}
GGUF_NAMES = {"pad": "padding", "eos": "eos", "bos": "bos", "unk": "unknown"}  # tokenizer.ggml.<name>_token_id


def train_vocab(corpus, vocab_size: int, add_space_prefix: bool, user_defined=USER_DEFINED) -> dict:
    """GGUF ``tokenizer.*`` metadata of a SentencePiece-BPE model trained on ``corpus`` (a list of strings), with
    the control symbols :data:`CONTROL` and the ``user_defined`` symbols."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=add_space_prefix,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=list(user_defined),
        control_symbols=list(CONTROL),
        **{f"{k}_id": v for k, v in SPECIAL_IDS.items()},
        num_threads=1,
        minloglevel=2,
    )
    model = pb.ModelProto()
    model.ParseFromString(buf.getvalue())
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [p.piece for p in model.pieces],
        "tokenizer.ggml.scores": [p.score for p in model.pieces],
        "tokenizer.ggml.token_type": [int(p.type) for p in model.pieces],
        "tokenizer.ggml.add_space_prefix": add_space_prefix,
        "tokenizer.ggml.add_bos_token": True,
    }
    return meta | {f"tokenizer.ggml.{GGUF_NAMES[k]}_token_id": v for k, v in SPECIAL_IDS.items()}


def llamacpp_converted(meta: dict) -> dict:
    """``meta`` as llama.cpp's converter writes a vocab whose tokenizer config lists the user-defined tokens:
    their ``▁`` pre-normalized to spaces (``convert_hf_to_gguf.py``, added tokens that are not special)."""
    types = meta["tokenizer.ggml.token_type"]
    tokens = [t.replace("▁", " ") if k == 4 else t for t, k in zip(meta["tokenizer.ggml.tokens"], types)]
    return meta | {"tokenizer.ggml.tokens": tokens}


def processor_from_gguf(meta: dict) -> spm.SentencePieceProcessor:
    """A SentencePiece processor of the vocabulary in GGUF metadata ``meta`` (SentencePiece-BPE, ``llama``);
    user-defined pieces get their spaces back as ``▁`` (SentencePiece matches them in the escaped text)."""
    model = pb.ModelProto()
    for piece, score, kind in zip(
        meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"], meta["tokenizer.ggml.token_type"]
    ):
        if kind == pb.ModelProto.SentencePiece.USER_DEFINED:  # undo the converter's pre-normalization
            piece = piece.replace(" ", "▁")
        model.pieces.add(piece=piece, score=float(score), type=int(kind))
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = len(model.pieces)
    spec.byte_fallback = 6 in meta["tokenizer.ggml.token_type"]
    for field, key in GGUF_NAMES.items():
        setattr(spec, f"{field}_id", int(meta.get(f"tokenizer.ggml.{key}_token_id", -1)))
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    sp = spm.SentencePieceProcessor()
    sp.LoadFromSerializedProto(model.SerializeToString())
    return sp
