"""The SentencePiece-BPE GGUF tokenizer against Google's ``sentencepiece`` (tests/spm_oracle.py): a vocabulary
trained by SentencePiece with byte fallback, control and user-defined symbols (Gemma-style: newlines, space runs,
HTML tags), written to a GGUF file, read back and rebuilt both by us and as a SentencePiece model from the GGUF
pieces, scores and types: equal ids, BOS handling and decode round trip on a multilingual text set; user-defined
tokens are text for ``decode(skip_special_tokens=True)``, only control (and unknown) tokens are special."""

import gguf
import pytest

import spm_oracle
from dflash_jax.models import gguf_io
from dflash_jax.models import tokenizer as tok_lib

CORPUS = [
    "the quick brown fox jumps over the lazy dog and the cat",
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x):\n        self.x = x\n",
    "Hello world, hello there. How are you today?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le cœur a ses raisons que la raison ne connaît point.",
    "日本語のテキストです。東京は大きい都市です。",
    "Привет, как дела? Всё хорошо.",
    "<h1>Title</h1>\n<p>Some text</p>\n<td>cell</td>",
    "for i in range(10):\n\tprint(i)  # tab indented",
]
TEXTS = [
    "the quick brown fox",
    "  two  spaces   three    four     five        eight",
    "def mul(a, b):\n    return a * b\n\n\ndef div(a, b):\n\treturn a / b\n",
    "Repeat this list exactly:\n1. apples\n2. pears\n",
    "<h1>Hi</h1><td>cell</td>\n<p>para</p>",
    "Über Größe — naïve café, cœur",
    "日本語と中文和한국어",
    "Привет мир",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flag 🇩🇪",
    "tab\there\r\nwindows line\x0bvt",
    " leading space",
    "trailing spaces   ",
    "\n",
    " ",
    "",
]
# Gemma: no space prefix, user-defined pieces as SentencePiece stores them (spaces as U+2581) or as llama.cpp's
# converter writes them from the tokenizer config (raw spaces); Llama 2: space prefix, no user-defined pieces.
VARIANTS = {
    "gemma-spm": (False, spm_oracle.USER_DEFINED, False),
    "gemma-llamacpp": (False, spm_oracle.USER_DEFINED, True),
    "llama2": (True, (), False),
}


def _write_gguf(path, meta):
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_tokenizer_model("llama")
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_add_space_prefix(meta["tokenizer.ggml.add_space_prefix"])
    w.add_add_bos_token(True)
    ids = spm_oracle.SPECIAL_IDS
    w.add_pad_token_id(ids["pad"])
    w.add_eos_token_id(ids["eos"])
    w.add_bos_token_id(ids["bos"])
    w.add_unk_token_id(ids["unk"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def vocab(request, tmp_path_factory):
    """``(name, GGUF metadata as read back, our tokenizer, SentencePiece oracle)``."""
    prefix, user_defined, converted = VARIANTS[request.param]
    meta = spm_oracle.train_vocab(CORPUS, 560, prefix, user_defined)
    if converted:
        meta = spm_oracle.llamacpp_converted(meta)
    path = tmp_path_factory.mktemp(request.param) / "vocab.gguf"
    _write_gguf(path, meta)
    meta = gguf_io.read_metadata(gguf.GGUFReader(str(path)))
    tok = tok_lib.gguf_tokenizer(meta, path.name).tokenizer
    return request.param, meta, tok, spm_oracle.processor_from_gguf(meta)


def test_ids_bos_and_decode_equal_sentencepiece(vocab):
    name, meta, ours, sp = vocab
    bos = spm_oracle.SPECIAL_IDS["bos"]
    used = set()
    for text in TEXTS:
        ids = sp.encode(text)
        assert ours.encode(text, add_special_tokens=False).ids == ids, text
        assert ours.encode(text).ids == [bos] + ids == sp.encode(text, add_bos=True), text  # add_bos_token
        assert ours.decode(ids, skip_special_tokens=True) == sp.decode(ids) == text, text
        assert ours.decode([bos] + ids, skip_special_tokens=True) == text, text
        used |= {meta["tokenizer.ggml.token_type"][i] for i in ids}
    assert {1, 6} <= used  # merged pieces and byte fallback are exercised
    assert (4 in used) == (name != "llama2")  # and user-defined pieces where the vocab has them


@pytest.mark.parametrize("vocab", ["gemma-llamacpp", "gemma-spm"], indirect=True)
def test_skip_special_tokens_drops_control_tokens_only(vocab):
    """User-defined tokens (``\\n``, space runs, tags) survive ``skip_special_tokens=True`` byte for byte; control
    tokens do not (SentencePiece decodes them to nothing)."""
    _, meta, ours, sp = vocab
    types = meta["tokenizer.ggml.token_type"]
    specials = {i for i, t in ours.get_added_tokens_decoder().items() if t.special}
    assert specials == {i for i, k in enumerate(types) if k in (2, 3)}
    body = "user\n<h1>Title</h1>\n\n    code\tindented\n        deeper 🙂"
    text = f"<start_of_turn>{body}<end_of_turn>\n"
    ids = ours.encode(text, add_special_tokens=False).ids
    assert {types[i] for i in ids} >= {3, 4, 6}  # control, user-defined and byte tokens
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids, skip_special_tokens=True) == body + "\n" == sp.decode(ids)
