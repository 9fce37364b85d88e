"""The token store: chat data rendered and tokenised once (``dflash-jax prepare``), read memory-mapped at training.

Layout of a store directory (``data.path`` may name one; docs/design.md "Data"):

* ``part-KKKKK.{tokens,mask,offsets,loss}.npy``: part ``K`` holds the training examples of source records
  ``[K*R, (K+1)*R)`` (``R = data.shard_records``) in record order: ``tokens int32 [T]`` and ``mask uint8 [T]``
  (1 = loss token) flat, ``offsets int64 [n+1]`` (example ``j`` is ``[offsets[j], offsets[j+1])``) and
  ``loss int32 [n]`` (loss tokens per example, for the batch stats);
* ``part-KKKKK.json``: the part's counters (skips with their first reasons, truncated, split), and the byte size,
  sha256 and modification time of each of its files; written last, so its presence means the part is complete;
* ``manifest.json``: the settings the store was prepared with (:func:`settings_of`: seq_len, packing, held-out
  and cap, format and column mapping, tokenizer / chat template sha256), the source files (name, bytes, mtime,
  sha256), every part's record, the totals and the held-out conversations. Written last.

Every file is written as ``NAME.partial`` and renamed, so a killed ``prepare`` leaves complete parts and
rerunning it prepares only the missing ones; a part depends only on its records, so the result is identical.
Processes split the parts (part ``K`` belongs to process ``K % P``); each runs its parts on ``data.prepare_workers``
worker processes (spawned: the parent may hold JAX threads), and the process finishing last (the one that finds
every part complete) writes the manifest. The examples are those of :func:`~dflash_jax.data.pipeline.build_dataset`
in the same order (the same selection, rendering and splitting code).

Why ``.npy`` and not ArrayRecord: the loader needs random access to variable-length int32/uint8 slices; a memory
mapped ``.npy`` gives them with no decode and no copy (a slice of the page cache), and the whole index of an
800k-conversation store is two small arrays. ArrayRecord stores serialized records in compressed chunks: every
read decodes a chunk and copies bytes. scripts/bench_data.py measures the reads (docs/benchmarks.md).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import logging
import multiprocessing
import os
from typing import Any, Iterator, Sequence

import numpy as np

from dflash_jax.data.chat import ChatRenderer, RenderError
from dflash_jax.data.pipeline import MAX_REASONS, Example, Rendered, select_conversations, tokenize_rendered
from dflash_jax.data.readers import Conversation, Skip
from dflash_jax.data.sources import file_digest, read_records, source_files

log = logging.getLogger(__name__)

STORE_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = ("tokens", "mask", "offsets", "loss")
# settings key -> what the user changes to match it (the error names it)
SETTING_NAMES = {
    "version": "the store format version (prepare it again with this dflash-jax)",
    "tokenizer_sha256": "the tokenizer (target.path)",
    "chat_template_sha256": "the chat template (data.chat_template or the target's)",
    "bos_token": "the tokenizer's bos_token",
    "eos_token": "the tokenizer's eos_token",
    "seq_len": "data.seq_len",
    "packing": "data.packing",
    "heldout": "data.heldout",
    "max_conversations": "data.max_conversations",
    "format": "data.format",
    "messages_field": "data.messages_field",
    "role_field": "data.role_field",
    "content_field": "data.content_field",
}
_PARTIAL = ".partial"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def settings_of(data: Any, renderer: ChatRenderer) -> dict[str, Any]:
    """What a store's content depends on besides its source: ``data`` (a ``config.DataSection``) and the
    renderer's tokenizer (sha256 of its JSON) and chat template (sha256 of its text)."""
    return {
        "version": STORE_VERSION,
        "tokenizer_sha256": _sha256(renderer.tokenizer.to_str()),
        "chat_template_sha256": _sha256(renderer.chat_template),
        "bos_token": renderer.bos_token,
        "eos_token": renderer.eos_token,
        "seq_len": data.seq_len,
        "packing": data.packing,
        "heldout": data.heldout,
        "max_conversations": data.max_conversations,
        "format": data.format,
        "messages_field": data.messages_field,
        "role_field": data.role_field,
        "content_field": data.content_field,
    }


def check_settings(path: str, stored: dict[str, Any], expected: dict[str, Any]) -> None:
    """ValueError naming the first setting in which the store at ``path`` differs from this config."""
    for key, name in SETTING_NAMES.items():
        if stored.get(key) != expected[key]:
            raise ValueError(
                f"data store {path!r} was prepared with {key} = {stored.get(key)!r} but this config has "
                f"{expected[key]!r} ({name}); prepare a store for this config (dflash-jax prepare)"
            )


def is_store(path: str) -> bool:
    """Whether ``path`` is a complete token store (a directory with ``manifest.json``)."""
    return os.path.isfile(os.path.join(path, MANIFEST))


def _write_atomic(path: str, write) -> None:
    tmp = path + _PARTIAL
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: str, obj: Any) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode("utf-8")))


def _part_name(k: int) -> str:
    return f"part-{k:05d}"


def _part_done(out: str, k: int, settings_sha: str) -> bool:
    try:
        with open(os.path.join(out, _part_name(k) + ".json")) as f:
            return json.load(f).get("settings_sha256") == settings_sha
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------------
# Preparing
# ---------------------------------------------------------------------------------------------------------

PartItem = tuple[int, "Conversation | Skip", "Rendered | None"]
_WORKER_RENDERER: ChatRenderer | None = None


def _renderer_spec(renderer: ChatRenderer) -> tuple[str, str, str | None, str | None]:
    return renderer.tokenizer.to_str(), renderer.chat_template, renderer.bos_token, renderer.eos_token


def _init_worker(spec: tuple[str, str, str | None, str | None]) -> None:
    global _WORKER_RENDERER
    import tokenizers

    tok, template, bos, eos = spec
    _WORKER_RENDERER = ChatRenderer(tokenizers.Tokenizer.from_str(tok), template, bos, eos)


def _worker_part(args: tuple) -> dict[str, Any]:
    return write_part(_WORKER_RENDERER, *args)


def part_examples(
    renderer: ChatRenderer, items: Sequence[PartItem], seq_len: int, packing: bool
) -> tuple[list[Example], list[Skip], int, int, int]:
    """Render (where :func:`~dflash_jax.data.pipeline.select_conversations` did not) and tokenise one part's
    items: ``(examples, skips, truncated, split, kept)`` as :func:`~dflash_jax.data.pipeline.tokenize_rendered`."""
    records, texts, spans, skips = [], [], [], []
    for record, item, rendered in items:
        if isinstance(item, Skip):
            skips.append(item)
            continue
        if rendered is None:
            try:
                rendered = renderer.render_text(item)
            except RenderError as e:
                skips.append(Skip(record, str(e)))
                continue
        records.append(record)
        texts.append(rendered[0])
        spans.append(rendered[1])
    examples, tok_skips, truncated, split, kept = tokenize_rendered(renderer, records, texts, spans, seq_len, packing)
    return examples, skips + tok_skips, truncated, split, kept


def write_part(
    renderer: ChatRenderer, out: str, k: int, items: Sequence[PartItem], settings: dict[str, Any], settings_sha: str
) -> dict[str, Any]:
    """Write part ``k`` of the store ``out`` (module docstring) and return its record."""
    examples, skips, truncated, split, kept = part_examples(renderer, items, settings["seq_len"], settings["packing"])
    lengths = np.array([len(ids) for ids, _ in examples], np.int64)
    arrays = {
        "tokens": np.concatenate([ids for ids, _ in examples]).astype(np.int32) if examples else np.zeros(0, np.int32),
        "mask": np.concatenate([m for _, m in examples]).astype(np.uint8) if examples else np.zeros(0, np.uint8),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "loss": np.array([int(np.sum(m)) for _, m in examples], np.int32),
    }
    files = {}
    for name, arr in arrays.items():
        file = f"{_part_name(k)}.{name}.npy"
        _write_atomic(os.path.join(out, file), lambda f, a=arr: np.save(f, a, allow_pickle=False))
        files[name] = file_digest(os.path.join(out, file))
    part = {
        "index": k,
        "records": [items[0][0], items[-1][0] + 1],
        "conversations": kept,
        "examples": len(examples),
        "tokens": int(lengths.sum()),
        "loss_tokens": int(arrays["loss"].sum()),
        "skipped": len(skips),
        "skip_reasons": [str(s) for s in skips[:MAX_REASONS]],
        "truncated": truncated,
        "split": split,
        "files": files,
        "settings_sha256": settings_sha,
    }
    _write_json(os.path.join(out, _part_name(k) + ".json"), part)
    return part


def _parts(items: Iterator[PartItem], shard_records: int) -> Iterator[tuple[int, list[PartItem]]]:
    """Group the selected items by part ``record // shard_records`` (non-empty parts only)."""
    k, chunk = None, []
    for item in items:
        kk = item[0] // shard_records
        if kk != k and chunk:
            yield k, chunk
            chunk = []
        k = kk
        chunk.append(item)
    if chunk:
        yield k, chunk


def _source_record(path: str) -> dict[str, Any]:
    return {"path": path, "files": [file_digest(file) for file in source_files(path)]}


def prepare(
    data: Any,
    renderer: ChatRenderer,
    out: str,
    *,
    workers: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> bool:
    """Prepare this process's parts of the store ``out`` for ``data`` (a ``config.DataSection``) with
    ``workers`` processes (None: ``data.prepare_workers``, 0 = every core); write the manifest when every part is
    complete. Returns whether the manifest exists (the store is complete). A complete store in ``out`` is checked
    against the settings (ValueError naming the field) and kept; complete parts of a killed run are kept."""
    if data.shard_records < 1:
        raise ValueError(f"data.shard_records must be >= 1, got {data.shard_records}")
    if data.seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {data.seq_len}")
    if data.heldout < 0 or (data.max_conversations is not None and data.max_conversations < 1):
        raise ValueError("data.heldout must be >= 0 and data.max_conversations >= 1 or null")
    settings = dict(settings_of(data, renderer), shard_records=data.shard_records)
    settings_sha = _sha256(json.dumps(settings, sort_keys=True))
    if is_store(out):
        check_settings(out, read_manifest(out)["settings"], settings)
        return True
    os.makedirs(out, exist_ok=True)
    workers = data.prepare_workers if workers is None else workers
    workers = workers or os.cpu_count() or 1
    held: list[Conversation] = []
    fields = (data.messages_field, data.role_field, data.content_field)
    selected = select_conversations(
        read_records(data.path, data.format, fields), renderer, data.heldout, data.max_conversations, held, False
    )
    all_parts: list[int] = []

    def mine() -> Iterator[tuple]:
        for k, items in _parts(selected, data.shard_records):
            all_parts.append(k)
            if k % process_count == process_index and not _part_done(out, k, settings_sha):
                yield (out, k, items, settings, settings_sha)

    tasks = mine()
    first = list(itertools.islice(tasks, 2))
    tasks = itertools.chain(first, tasks)
    done = 0
    if workers == 1 or len(first) < 2:  # one part to write (a small source): no worker processes to spawn
        for task in tasks:
            write_part(renderer, *task)
            done += 1
    else:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(_renderer_spec(renderer),)
        ) as pool:
            in_flight: set[concurrent.futures.Future] = set()
            for task in tasks:  # at most 2 parts per worker in flight: the source is read as fast as they work
                in_flight.add(pool.submit(_worker_part, task))
                if len(in_flight) >= 2 * workers:
                    finished, in_flight = concurrent.futures.wait(in_flight, return_when="FIRST_COMPLETED")
                    for f in finished:
                        f.result()
                        done += 1
            for f in concurrent.futures.as_completed(in_flight):
                f.result()
                done += 1
    if len(held) < data.heldout:
        raise ValueError(f"data.heldout={data.heldout} but only {len(held)} conversations with a prompt were found")
    log.info("prepare: process %d of %d wrote %d parts of %d", process_index, process_count, done, len(all_parts))
    if not all(_part_done(out, k, settings_sha) for k in all_parts):
        return False  # another process's parts are still running; the last one writes the manifest
    _write_manifest(out, data.path, settings, all_parts, held)
    return True


def _write_manifest(out: str, source: str, settings: dict, parts: list[int], held: list[Conversation]) -> None:
    records = []
    for k in parts:
        with open(os.path.join(out, _part_name(k) + ".json")) as f:
            records.append(json.load(f))
    totals = {key: sum(p[key] for p in records) for key in ("conversations", "examples", "tokens", "skipped")}
    totals.update(truncated=sum(p["truncated"] for p in records), split=sum(p["split"] for p in records))
    if not totals["examples"]:
        reasons = [r for p in records for r in p["skip_reasons"]][:MAX_REASONS]
        raise ValueError(
            f"data.path {source!r} gave no usable training conversation (skipped {totals['skipped']}: {reasons})"
        )
    manifest = {
        "settings": settings,
        "source": _source_record(source),
        "totals": totals,
        "skip_reasons": [r for p in records for r in p["skip_reasons"]][:MAX_REASONS],
        "parts": records,
        "heldout": [[list(turn) for turn in conv] for conv in held],
    }
    _write_json(os.path.join(out, MANIFEST), manifest)
    log.info(
        "prepare: %d training conversations as %d examples (%d tokens; %d split at assistant-turn ends, %d with "
        "assistant tokens cut by seq_len=%d), %d held out, %d skipped -> %s",
        totals["conversations"],
        totals["examples"],
        totals["tokens"],
        totals["split"],
        totals["truncated"],
        settings["seq_len"],
        len(held),
        totals["skipped"],
        out,
    )


def read_manifest(path: str) -> dict[str, Any]:
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def source_unchanged(path: str, data_path: str) -> None:
    """ValueError naming ``data.path`` when the store at ``path`` was prepared from another source, or when a
    source file's size or modification time changed since (a stat, the source is not read)."""
    src = read_manifest(path)["source"]
    if src["path"] != data_path:
        raise ValueError(
            f"data store {path!r} was prepared from data.path {src['path']!r}, this config has {data_path!r}"
        )
    for file, rec in zip(source_files(data_path), src["files"]):
        if os.path.isfile(file) and (os.path.getsize(file), os.stat(file).st_mtime_ns) != (
            rec["bytes"],
            rec["mtime_ns"],
        ):
            raise ValueError(f"data.path file {file!r} changed since the store {path!r} was prepared from it")


# ---------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------


VERIFY = ("changed", "all")  # data.verify


def _check_file(path: str, rec: dict[str, Any], verify: str) -> str | None:
    """Why the store file ``path`` does not match its manifest record, or None: its size, then its sha256 (every
    file for ``verify="all"``; for ``"changed"`` only when its modification time differs from the one ``prepare``
    recorded, the stat-based quick check of rsync and make)."""
    if not os.path.isfile(path):
        return "is missing"
    stat = os.stat(path)
    if stat.st_size != rec["bytes"]:
        return f"is truncated or altered ({stat.st_size} bytes, the manifest says {rec['bytes']})"
    if verify == "changed" and stat.st_mtime_ns == rec.get("mtime_ns"):
        return None
    if file_digest(path)["sha256"] != rec["sha256"]:
        return "is corrupted (its sha256 differs from the manifest's)"
    return None


class TokenStore:
    """A prepared store, memory-mapped: the dataset protocol of :class:`~dflash_jax.data.pipeline.DataIterator`.

    ``examples[i] -> (input_ids int32 [L], loss_mask float32 [L])`` (a grain ``MapDataset`` over the parts:
    random access, nothing read before it is asked for), ``lengths int64 [N]``, ``loss_tokens int64 [N]``,
    ``seq_len``, the counters ``skipped / skip_reasons / truncated / split`` and ``heldout`` conversations.
    Opening checks every file against the manifest (ValueError naming the file) on ``verify_threads`` threads:
    its size, and its sha256 when its modification time changed since ``prepare`` wrote it (``verify="changed"``,
    a stat per file: start-up does not grow with the store) or always (``"all"``, every byte read); memory held:
    the two index arrays (16 bytes per example).
    """

    def __init__(
        self, path: str, expected: dict[str, Any] | None = None, verify: str = "changed", verify_threads: int = 4
    ):
        import grain

        if verify not in VERIFY:
            raise ValueError(f"data.verify must be one of {VERIFY}, got {verify!r}")
        if not is_store(path):
            raise ValueError(f"data.path {path!r} is not a token store (no {MANIFEST}; see dflash-jax prepare)")
        manifest = read_manifest(path)
        if expected is not None:
            check_settings(path, manifest["settings"], expected)
        self.path = path
        checks = [
            (os.path.join(path, rec["name"]), rec) for part in manifest["parts"] for rec in part["files"].values()
        ]
        with concurrent.futures.ThreadPoolExecutor(max(1, verify_threads)) as ex:
            for (file, _), problem in zip(checks, ex.map(lambda c: _check_file(*c, verify), checks)):
                if problem:
                    raise ValueError(
                        f"data store file {file!r} {problem}; prepare the store again (dflash-jax prepare)"
                    )
        parts = manifest["parts"]

        def load(part: dict[str, Any], name: str) -> np.ndarray:
            return np.load(os.path.join(path, part["files"][name]["name"]), mmap_mode="r", allow_pickle=False)

        self._tokens = [load(p, "tokens") for p in parts]
        self._mask = [load(p, "mask") for p in parts]
        self._offsets = [load(p, "offsets") for p in parts]
        self.lengths = np.concatenate([np.diff(o) for o in self._offsets]).astype(np.int64)
        self.loss_tokens = np.concatenate([np.asarray(load(p, "loss"), np.int64) for p in parts])
        self._starts = np.concatenate([[0], np.cumsum([p["examples"] for p in parts])])
        self.seq_len = int(manifest["settings"]["seq_len"])
        totals = manifest["totals"]
        self.skipped, self.truncated, self.split = (
            int(totals["skipped"]),
            int(totals["truncated"]),
            int(totals["split"]),
        )
        self.skip_reasons = tuple(manifest["skip_reasons"])
        self.heldout = tuple(tuple((r, t) for r, t in conv) for conv in manifest["heldout"])
        self.examples = grain.MapDataset.source(self)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> Example:
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        j = i - int(self._starts[k])
        a, b = int(self._offsets[k][j]), int(self._offsets[k][j + 1])
        return np.asarray(self._tokens[k][a:b]), self._mask[k][a:b].astype(np.float32)
