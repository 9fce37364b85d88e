"""Target-aligned training data: every assistant turn of a chat dataset replaced by the target's own answer.

A drafter learns to predict *the target's* continuations, so DFlash recipes train on answers the target wrote
(z-lab's released drafters; SpecForge's DFlash examples). For each conversation the user (and system) turns are
kept verbatim and each assistant turn is regenerated in order, so a later turn's prompt holds the target's
earlier answers, rendered with the target's chat template and stopped by its end-of-turn / EOS tokens.

**Batching.** Conversations are taken in file order in windows of ``batch_size`` usable ones; round ``r`` of a
window generates assistant turn ``r`` of all its conversations in one batched call of
:class:`dflash_jax.generate.Generator` (rows padded to ``batch_size``, so every round of every window reuses the
executables of a few prompt-length buckets). Row sampling keys are ``fold_in(seed, record, turn)``: a row's
answer does not depend on which rows shared its batch.

**Output.** OpenAI-format JSONL, one row per regenerated conversation, in source order::

    {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}, ...],
     "source": {"path": ..., "record": 17}, "generator": {"target": ..., "temperature": 0.0, ...},
     "truncated_answers": 0, "dropped_turns": 0}

An answer is its generated tokens decoded (the stop token excluded, control tokens dropped, every newline and
space kept as generated); an answer of whitespace only counts as empty.
``truncated_answers``: answers that reached ``max_new_tokens`` without a stop token (kept as they are);
``dropped_turns``: assistant turns not generated: those before the first user turn (no prompt; ShareGPT has
conversations continued from a cut-off start), and those whose prompt exceeded ``max_prompt_len`` or that follow
an empty answer (the row ends before them). Trailing user turns after the last assistant turn are dropped.

**Skips** (counted by reason, never written): unreadable records, conversations the template rejects, no
assistant turn after a user turn, first prompt longer than ``max_prompt_len``, empty first answer.

**Atomic and resumable.** Rows go to ``OUT.partial`` (appended and fsynced after every window, under an
exclusive ``flock``: one writer); the finished file is renamed to ``OUT``. ``resume`` cuts a torn last line, checks the generator settings of the rows already
written, and regenerates from the window holding the first missing row (same windows as an uninterrupted run),
so the resumed file equals an uninterrupted run's.
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from dflash_jax import generate
from dflash_jax.data import chat, readers
from dflash_jax.data.chat import ChatRenderer, RenderError

log = logging.getLogger(__name__)
PARTIAL_SUFFIX = ".partial"
MAX_REASONS = 5  # example skip messages kept in the summary


@dataclass(frozen=True)
class Sampling:
    """Generation settings recorded in every row's ``generator`` (a resume must use the same)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 16
    max_prompt_len: int = 256

    def check(self) -> None:
        """ValueError naming the option that is out of range."""
        for name in ("max_new_tokens", "batch_size", "max_prompt_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")


class _Counts:
    """Skip counts by reason, plus the first few messages."""

    def __init__(self):
        self.by_reason: collections.Counter = collections.Counter()
        self.examples: list[str] = []

    def add(self, reason: str, record: int, detail: str = "") -> None:
        self.by_reason[reason] += 1
        if len(self.examples) < MAX_REASONS:
            self.examples.append(f"record {record}: {reason}{': ' + detail if detail else ''}")
            log.warning("regenerate: skipping %s", self.examples[-1])


def stop_token_ids(target, renderer: ChatRenderer) -> tuple[int, ...]:
    """:func:`dflash_jax.data.chat.stop_token_ids` (EOS and the template's end-of-turn tokens); ValueError when
    there are none."""
    ids = chat.stop_token_ids(target, renderer)
    if not ids:
        raise ValueError(
            "regenerate: the target has no EOS token and the chat template no end-of-turn token; "
            "answers could never stop"
        )
    return ids


def _windows(
    items: Iterable[tuple[int, Any]], renderer: ChatRenderer, sampling: Sampling, limit: int | None, counts: _Counts
) -> Iterator[list[tuple[int, readers.Conversation]]]:
    """Windows of ``batch_size`` usable ``(record, conversation, leading assistant turns dropped)`` in file order
    (at most ``limit`` in all); unusable ones are counted in ``counts``."""
    window, used = [], 0
    for record, source in items:
        conv = source
        if limit is not None and used >= limit:
            break
        if isinstance(conv, readers.Skip):
            counts.add("unreadable record", record, conv.reason)
            continue
        user = next((i for i, (r, _) in enumerate(conv) if r == "user"), None)
        if user is not None:  # assistant turns before the first user turn have no prompt: dropped
            conv = tuple(m for i, m in enumerate(conv) if i > user or m[0] != "assistant")
        first = next((i for i, (r, _) in enumerate(conv) if r == "assistant"), None)
        if user is None or first is None:
            counts.add("no assistant turn after a user turn", record)
            continue
        try:
            n = renderer.render_prompt(conv[:first]).size
        except RenderError as e:
            counts.add("chat template rejected the conversation", record, str(e))
            continue
        if n > sampling.max_prompt_len:
            counts.add("prompt too long", record, f"{n} tokens > max_prompt_len {sampling.max_prompt_len}")
            continue
        window.append((record, conv, len(source) - len(conv)))
        used += 1
        if len(window) == sampling.batch_size:
            yield window
            window = []
    if window:
        yield window


class _Row:
    """One conversation being regenerated: the messages so far and the index of the next source message."""

    def __init__(self, record: int, conv: readers.Conversation, dropped: int):
        self.record, self.conv, self.pos, self.turn = record, conv, 0, 0
        self.messages: list[tuple[str, str]] = []
        self.alive, self.truncated, self.dropped = True, 0, dropped
        self.skip: str | None = None

    def next_prompt(self) -> list[tuple[str, str]] | None:
        """Copy source turns up to the next assistant turn; the prefix to answer, or None when none is left."""
        while self.pos < len(self.conv) and self.conv[self.pos][0] != "assistant":
            self.messages.append(self.conv[self.pos])
            self.pos += 1
        if self.pos >= len(self.conv):
            self.alive = False
            return None
        return list(self.messages)

    def stop(self, skip_reason: str) -> None:
        """End the row here: a skip before its first answer, else the remaining assistant turns are dropped."""
        self.alive = False
        if self.turn == 0:
            self.skip = skip_reason
        else:
            self.dropped += sum(r == "assistant" for r, _ in self.conv[self.pos :])

    def finished_messages(self) -> list[tuple[str, str]]:
        """The messages up to the last regenerated answer (trailing user turns dropped)."""
        last = max(i for i, (r, _) in enumerate(self.messages) if r == "assistant")
        return self.messages[: last + 1]


def _regenerate_window(
    gen: generate.Generator, renderer: ChatRenderer, window, sampling: Sampling, stop_ids: tuple[int, ...]
) -> tuple[list[_Row], int]:
    """Regenerate every turn of the conversations of one window; returns the rows and the tokens generated."""
    rows = [_Row(*item) for item in window]
    tokens = 0
    while True:
        tasks = []
        for row in rows:
            prefix = row.next_prompt() if row.alive else None
            if prefix is None:
                continue
            try:
                ids = renderer.render_prompt(prefix)
            except RenderError:
                row.stop("chat template rejected the conversation")
                continue
            if ids.size > sampling.max_prompt_len:
                row.stop("prompt too long")
                continue
            tasks.append((row, ids))
        if not tasks:
            return rows, tokens
        pad = sampling.batch_size - len(tasks)  # fixed batch shape: padding rows generate one token
        prompts = [ids for _, ids in tasks] + [np.zeros((1,), np.int32)] * pad
        limits = [sampling.max_new_tokens] * len(tasks) + [1] * pad
        keys = generate.row_keys(
            sampling.seed, [r.record for r, _ in tasks] + [0] * pad, [r.turn for r, _ in tasks] + [0] * pad
        )
        out = gen(
            prompts,
            limits,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            keys=keys,
            eos_token_ids=stop_ids,
            prompt_bucket=generate.bucket_length(max(p.size for p in prompts)),
            capacity=generate.bucket_length(sampling.max_new_tokens),
        )
        for (row, _), ids in zip(tasks, out.tokens):
            tokens += ids.size
            stopped = ids.size > 0 and int(ids[-1]) in stop_ids
            text = renderer.tokenizer.decode((ids[:-1] if stopped else ids).tolist(), skip_special_tokens=True)
            if not text.strip():
                row.stop("empty answer")
                continue
            row.truncated += not stopped
            row.messages.append(("assistant", text))
            row.pos += 1
            row.turn += 1


def check_output(out: str, resume: bool) -> None:
    """ValueError unless ``out`` is new: it must not exist, and ``OUT.partial`` only with ``resume``."""
    if os.path.exists(out):
        raise ValueError(f"--out {out!r} already exists (a finished regeneration); choose another path")
    if os.path.exists(out + PARTIAL_SUFFIX) and not resume:
        raise ValueError(
            f"{out + PARTIAL_SUFFIX!r} holds an unfinished regeneration: pass --resume to continue "
            "it, or remove it to start over"
        )


def _read_partial(path: str) -> list[dict]:
    """Complete rows of a partial output; a torn last line (a kill mid-write) is cut from the file."""
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep < len(data):
        log.warning("regenerate: dropping a torn last line of %s (%d bytes)", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
    rows = []
    for i, line in enumerate(data[:keep].splitlines()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"--resume: {path} line {i + 1} is not JSON ({e.msg}); it was not written by dflash-jax regenerate"
            ) from None
    return rows


def _resume_point(partial: str, generator: dict, data_path: str) -> tuple[int, int]:
    """``(rows already written, record of the last one or -1)``; ValueError if they were generated otherwise."""
    written = _read_partial(partial)
    for i, row in enumerate(written):
        if row.get("generator") != generator or row.get("source", {}).get("path") != data_path:
            theirs = row.get("generator") or {}
            diff = sorted(k for k in set(theirs) | set(generator) if theirs.get(k) != generator.get(k))
            raise ValueError(
                f"--resume: {partial} row {i + 1} was generated with other settings "
                f"(differing: {', '.join(diff) or 'source.path'}); rerun with the same ones"
            )
    return len(written), (written[-1]["source"]["record"] if written else -1)


def _row_json(row: _Row, source: str, generator: dict) -> str:
    return (
        json.dumps(
            {
                "messages": [{"role": r, "content": t} for r, t in row.finished_messages()],
                "source": {"path": source, "record": row.record},
                "generator": generator,
                "truncated_answers": row.truncated,
                "dropped_turns": row.dropped,
            },
            ensure_ascii=False,
        )
        + "\n"
    )


def regenerate(
    target,
    renderer: ChatRenderer,
    data_path: str,
    out: str,
    sampling: Sampling,
    *,
    fmt: str = "auto",
    num_conversations: int | None = None,
    resume: bool = False,
    mesh=None,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out`` (OpenAI JSONL) with the target's answers to the conversations of ``data_path``.

    ``target``: a ``models.target_io.Target``; ``renderer``: its :class:`ChatRenderer`; ``num_conversations``: the
    first N usable conversations (None = all); ``mesh``: rows sharded over its batch axes. Returns a JSON-ready
    summary (rows, skips by reason, generated tokens, tokens/s, seconds).
    """
    sampling.check()
    check_output(out, resume)
    partial = out + PARTIAL_SUFFIX
    generator = {"target": repr(target), **asdict(sampling)}
    stop_ids = stop_token_ids(target, renderer)
    gen = generate.Generator(target.model, mesh=mesh)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(partial, "a", encoding="utf-8") as f:
        try:  # one writer (released by the kernel if the process dies)
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{partial!r} is being written by another dflash-jax regenerate") from None
        done_rows, last_record = _resume_point(partial, generator, data_path)
        counts = _Counts()
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=num_conversations, initial=done_rows, desc="regenerate", unit="conv", dynamic_ncols=True)
        start, tokens, rows_written, truncated, dropped = time.perf_counter(), 0, 0, 0, 0
        for window in _windows(readers.read_indexed(data_path, fmt), renderer, sampling, num_conversations, counts):
            if window[-1][0] <= last_record:
                continue  # written before a resume
            rows, n_tok = _regenerate_window(gen, renderer, window, sampling, stop_ids)
            tokens += n_tok
            fresh = [r for r in rows if r.record > last_record]
            for row in fresh:
                if row.skip:
                    counts.add(row.skip, row.record)
                    continue
                f.write(_row_json(row, data_path, generator))
                rows_written += 1
                truncated += row.truncated
                dropped += row.dropped
            f.flush()
            os.fsync(f.fileno())
            if bar is not None:
                bar.update(len(fresh))
                bar.set_postfix(
                    tok_s=f"{tokens / (time.perf_counter() - start):.1f}",
                    skipped=sum(counts.by_reason.values()),
                    refresh=False,
                )
    if bar is not None:
        bar.close()
    os.replace(partial, out)
    seconds = time.perf_counter() - start
    return {
        "out": out,
        "rows": done_rows + rows_written,
        "resumed_rows": done_rows,
        "skipped": sum(counts.by_reason.values()),
        "skipped_by_reason": dict(counts.by_reason),
        "skip_examples": counts.examples,
        "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else None,
        "seconds": round(seconds, 2),
        "truncated_answers": truncated,
        "dropped_turns": dropped,
        "generator": generator,
    }
