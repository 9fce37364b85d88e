"""Tokenised chat dataset, packing/padding batcher and a resumable, deterministic iterator.

``build_dataset`` renders and tokenises a whole (capped) source into memory (``dump-features``, the tests);
training reads the same examples from a token store (:mod:`dflash_jax.data.store`) through the grain loader
(:mod:`dflash_jax.data.loader`), with this module's :class:`DataIterator` planning the batches. The iterator is
plain numpy whose complete position is two integers ``(epoch, index)`` plus the seed, so ``state()`` is a JSON dict saved next to the Orbax checkpoint and
``restore(state)`` continues bit-exactly.

Stream: epoch ``e`` visits the training examples in the order ``default_rng([seed, e]).permutation(n)``; the
stream runs on across epoch boundaries (no partial batches, nothing dropped).

Batch (all numpy, ``S = seq_len``): ``input_ids [B,S] int32``, ``loss_mask [B,S] float32`` (0 on pad),
``segment_ids [B,S] int32``, ``positions [B,S] int32``.

* packing: a conversation longer than ``S`` becomes several examples cut at assistant-turn ends, each with as
  much earlier context as fits (:func:`split_example`); examples are appended greedily to a row while they fit;
  the next example that does not fit starts a new row. ``segment_ids`` = 1..k per row, 0 on pad; ``positions`` restart at 0 in every segment (the pad tail
  continues the last segment's count; it is masked everywhere).
* padding (``packing=False``): one example per row, right-padded; ``segment_ids`` = 1 on real tokens and 0 on
  pad, ``positions = arange(S)``, i.e. exactly the reference's collated rows.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from dflash_jax.data.chat import ChatRenderer, RenderError
from dflash_jax.data.readers import Conversation, Fields, Skip
from dflash_jax.data.sources import read_records

log = logging.getLogger(__name__)
MAX_REASONS = 5  # how many skip reasons are kept and logged

Example = tuple[np.ndarray, np.ndarray]  # (input_ids int32 [L], loss_mask float32 [L]), 1 <= L <= seq_len


@dataclass(frozen=True)
class TokenizedDataset:
    """Training examples (already truncated to ``seq_len``), held-out conversations and the skip report."""

    examples: tuple[Example, ...]
    heldout: tuple[Conversation, ...]
    seq_len: int
    skipped: int = 0
    skip_reasons: tuple[str, ...] = ()
    truncated: int = 0  # conversations with assistant tokens that no example trains on
    split: int = 0  # conversations split into several examples (split_long)

    @functools.cached_property
    def lengths(self) -> np.ndarray:
        """Tokens of every example, ``int64 [N]`` (what packing plans with)."""
        return np.array([len(ids) for ids, _ in self.examples], np.int64)

    @functools.cached_property
    def loss_tokens(self) -> np.ndarray:
        """Loss-mask sum of every example, ``float64 [N]`` (the batch stats)."""
        return np.array([float(np.sum(mask)) for _, mask in self.examples], np.float64)

    def heldout_prompts(self, n: int) -> list[Conversation]:
        """The first ``n`` held-out conversations cut before their first assistant turn (never trained on)."""
        if not 0 <= n <= len(self.heldout):
            raise ValueError(f"heldout_prompts(n={n}): only {len(self.heldout)} held-out conversations (data.heldout)")
        return [prompt_of(conv) for conv in self.heldout[:n]]


def prompt_of(conv: Conversation) -> Conversation | None:
    """``conv`` cut before its first assistant turn (all of it when it has none), or None if that holds no user
    turn."""
    first = next((i for i, (r, _) in enumerate(conv) if r == "assistant"), len(conv))
    if not any(r == "user" for r, _ in conv[:first]):
        return None
    return conv[:first]


def _has_prompt(conv: Conversation) -> bool:
    return prompt_of(conv) is not None


def split_example(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[list[Example], bool]:
    """A rendered conversation longer than ``seq_len`` as several examples cut at assistant-turn ends.

    ``ids int32 [L]``, ``mask float32 [L]`` (1 on assistant tokens). Each example ends where an assistant turn
    (a run of mask 1) ends and holds as many whole new turns as fit, preceded by as much earlier text as fits
    (context, masked 0: every assistant token is trained by exactly one example). A turn longer than ``seq_len``
    alone gives one example of its first tokens after ``seq_len // 2`` context tokens (its rest is dropped).
    Returns ``(examples, cut)``; ``cut`` says whether some assistant token is in no example's loss.
    """
    edges = np.diff(np.concatenate([[0], (mask > 0).astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    out, cut, k = [], False, 0
    while k < len(ends):
        first = int(starts[k])
        fit = k + int(np.searchsorted(ends[k:], first + seq_len, side="right"))  # turns k..fit-1 fit
        if fit > k:
            end = int(ends[fit - 1])
            begin, k = max(0, end - seq_len), fit
        else:
            begin = max(0, first - seq_len // 2)
            end, cut, k = begin + seq_len, True, k + 1
        m = mask[begin:end].copy()
        m[: max(0, first - begin)] = 0  # context: trained by an earlier example, or not assistant text
        out.append((ids[begin:end], m))
    return out, cut


def tokenize_rendered(
    renderer: ChatRenderer,
    records: Sequence[int],
    texts: list[str],
    spans: list[list[tuple[int, int]]],
    seq_len: int,
    split_long: bool,
) -> tuple[list[Example], list[Skip], int, int, int]:
    """Batch-tokenise rendered conversations (``records`` = their record indices) into training examples.

    Each becomes one example truncated to ``seq_len`` tokens, or with ``split_long`` (packing), when longer, the
    examples of :func:`split_example`; one with no assistant token inside ``seq_len`` is a :class:`Skip`. Returns
    ``(examples, skips, truncated, split, kept)`` in record order (counters as in :class:`TokenizedDataset`;
    ``kept`` = conversations giving examples). The one tokenisation behind :func:`build_dataset` and the token
    store (:mod:`dflash_jax.data.store`).
    """
    examples, skips, truncated, split, kept = [], [], 0, 0, 0
    # one extra token tells "was truncated"; splitting needs every token
    encoded = renderer.encode(texts, spans, max_tokens=None if split_long else seq_len + 1)
    for record, (ids, mask) in zip(records, encoded):
        if split_long and len(ids) > seq_len and mask.any():
            pieces, cut = split_example(ids, mask, seq_len)
            examples.extend(pieces)
            truncated += cut
            split += len(pieces) > 1
            kept += 1
            continue
        if not mask[:seq_len].any():
            skips.append(Skip(record, f"no assistant token within the first seq_len={seq_len} tokens"))
            continue
        truncated += len(ids) > seq_len
        examples.append((ids[:seq_len], mask[:seq_len]))
        kept += 1
    return examples, skips, truncated, split, kept


Rendered = tuple[str, list[tuple[int, int]]]  # ChatRenderer.render_text: text and assistant character spans


def select_conversations(
    items: Iterator[tuple[int, Conversation | Skip]],
    renderer: ChatRenderer,
    heldout: int,
    max_conversations: int | None,
    held: list[Conversation],
    render_all: bool,
) -> Iterator[tuple[int, Conversation | Skip, Rendered | None]]:
    """The training items of a record stream, in order: ``(record, conversation, rendered)`` or
    ``(record, Skip, None)`` (unusable record or a template rejection).

    The first ``heldout`` conversations that render and have a user turn before their first assistant turn are
    appended to ``held`` instead; after them the next ``max_conversations`` (None = all) that render are training
    items and reading stops. A conversation is rendered here when ``render_all``, or when that is needed to decide
    held-out / cap (else ``rendered`` is None and the caller renders it).
    """
    trained = 0
    for record, item in items:
        if max_conversations is not None and trained >= max_conversations and len(held) >= heldout:
            return
        if isinstance(item, Skip):
            yield record, item, None
            continue
        rendered = None
        if render_all or len(held) < heldout or max_conversations is not None:
            try:
                rendered = renderer.render_text(item)
            except RenderError as e:
                yield record, Skip(record, str(e)), None
                continue
            if len(held) < heldout and _has_prompt(item):
                held.append(item)
                continue
            if max_conversations is not None and trained >= max_conversations:
                continue
        trained += 1
        yield record, item, rendered


def build_dataset(
    path: str,
    renderer: ChatRenderer,
    *,
    seq_len: int,
    fmt: str = "auto",
    max_conversations: int | None = None,
    heldout: int = 0,
    split_long: bool = False,
    fields: Fields = (None, None, None),
) -> TokenizedDataset:
    """Read (:func:`~dflash_jax.data.sources.read_records`; ``fields`` = the column mapping), render and
    batch-tokenise ``path`` once, in memory.

    The first ``heldout`` usable conversations that have a user turn before their first assistant turn are held
    out; the next ``max_conversations`` (None = all) usable ones are training examples, truncated to
    ``seq_len`` tokens, or with ``split_long`` (packing) split at assistant-turn ends (:func:`split_example`).
    Unusable records (see :func:`read_conversations`), conversations the template rejects and examples with no
    assistant token inside ``seq_len`` are counted skips; the first few reasons are logged.
    """
    if seq_len < 1:
        raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    if heldout < 0 or (max_conversations is not None and max_conversations < 1):
        raise ValueError("data.heldout must be >= 0 and data.max_conversations >= 1 or null")
    reasons: list[str] = []
    skipped = 0

    def skip(item: Skip) -> None:
        nonlocal skipped
        skipped += 1
        if len(reasons) < MAX_REASONS:
            reasons.append(str(item))
            log.warning("skipping %s", item)

    held: list[Conversation] = []
    texts: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    records: list[int] = []
    for record, item, rendered in select_conversations(
        read_records(path, fmt, fields), renderer, heldout, max_conversations, held, render_all=True
    ):
        if isinstance(item, Skip):
            skip(item)
            continue
        texts.append(rendered[0])
        spans.append(rendered[1])
        records.append(record)
    examples, tok_skips, truncated, split, kept = tokenize_rendered(
        renderer, records, texts, spans, seq_len, split_long
    )
    for item in tok_skips:
        skip(item)
    if len(held) < heldout:
        raise ValueError(f"data.heldout={heldout} but only {len(held)} conversations with a prompt were found")
    if not examples:
        raise ValueError(f"data.path {path!r} gave no usable training conversation (skipped {skipped}: {reasons})")
    log.info(
        "data: %d training conversations as %d examples (%d split at assistant-turn ends, %d with assistant tokens "
        "cut by seq_len=%d), %d held out, %d skipped",
        kept,
        len(examples),
        split,
        truncated,
        seq_len,
        len(held),
        skipped,
    )
    return TokenizedDataset(tuple(examples), tuple(held), seq_len, skipped, tuple(reasons), truncated, split)


def build_iterator(
    data: Any, renderer: ChatRenderer, pad_id: int = 0, process_index: int = 0, process_count: int = 1
) -> DataIterator:
    """The training stream for a ``config.DataSection``: :func:`build_dataset` + :class:`DataIterator`
    (seed ``data.shuffle_seed``), yielding process ``process_index``'s rows of every global batch."""
    dataset = build_dataset(
        data.path,
        renderer,
        seq_len=data.seq_len,
        fmt=data.format,
        max_conversations=data.max_conversations,
        heldout=data.heldout,
        split_long=data.packing,
    )
    return iterate(dataset, data, pad_id=pad_id, process_index=process_index, process_count=process_count)


def iterate(
    dataset: Any, data: Any, *, pad_id: int = 0, process_index: int = 0, process_count: int = 1
) -> DataIterator:
    """:class:`DataIterator` over ``dataset`` (in memory or a token store) with a ``config.DataSection``'s batch
    size, packing and shuffle seed, yielding process ``process_index``'s rows of every global batch."""
    return DataIterator(
        dataset,
        data.batch_size,
        packing=data.packing,
        seed=data.shuffle_seed,
        pad_id=pad_id,
        process_index=process_index,
        process_count=process_count,
    )


def make_batch(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Lay out ``rows`` (each a list of examples, total length <= ``seq_len``) as one right-padded batch.

    Returns ``input_ids/segment_ids/positions [B,S] int32`` and ``loss_mask [B,S] float32``; segment ``k`` of a
    row gets id ``k`` (1-based) and positions ``0..len-1``; pad has segment 0, loss 0, id ``pad_id``.
    """
    b = len(rows)
    batch = {
        "input_ids": np.full((b, seq_len), pad_id, np.int32),
        "loss_mask": np.zeros((b, seq_len), np.float32),
        "segment_ids": np.zeros((b, seq_len), np.int32),
        "positions": np.zeros((b, seq_len), np.int32),
    }
    for r, row in enumerate(rows):
        start = 0
        for seg, (ids, mask) in enumerate(row, start=1):
            end = start + len(ids)
            if end > seq_len:
                raise ValueError(f"row {r} holds {end} tokens, more than seq_len={seq_len}")
            batch["input_ids"][r, start:end] = ids
            batch["loss_mask"][r, start:end] = mask
            batch["segment_ids"][r, start:end] = seg
            batch["positions"][r, start:end] = np.arange(len(ids))
            start = end
        batch["positions"][r, start:] = np.arange(start, seq_len) - (start - len(row[-1][0]) if row else 0)
    return batch


@dataclass
class DataIterator:
    """Deterministic, resumable batch stream over a :class:`TokenizedDataset`.

    ``next() -> (batch, stats)``: ``batch`` holds process ``process_index``'s rows ``[p*B/P, (p+1)*B/P)`` of
    the global batch of ``batch_size`` rows (all of them when ``process_count`` is 1; every process packs the
    same global rows, only its own are laid out); ``stats`` (of the global batch): ``real_token_fraction``
    (non-pad / B·S), ``loss_token_fraction``, ``conversations`` (segments in the batch), ``epoch``, ``skipped``,
    ``skip_reasons``, ``truncated``, ``split``.
    ``state()`` is a JSON dict ``{epoch, index, seed, num_examples, batch_size, packing}``.
    """

    dataset: TokenizedDataset
    batch_size: int
    packing: bool = True
    seed: int = 0
    pad_id: int = 0
    process_index: int = 0
    process_count: int = 1
    epoch: int = 0
    index: int = 0
    _order: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.batch_size % self.process_count or not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"data.batch_size {self.batch_size} must be divisible by the process count "
                f"{self.process_count} (process index {self.process_index})"
            )

    def _perm(self) -> np.ndarray:
        if self._order is None:
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.dataset.examples))
        return self._order

    def _advance(self) -> None:
        self.index += 1
        if self.index == len(self.dataset.examples):
            self.epoch, self.index, self._order = self.epoch + 1, 0, None

    def plan(self) -> list[list[int]]:
        """Example indices of the next global batch's rows, advancing the position; needs only the lengths."""
        s, lengths = self.dataset.seq_len, self.dataset.lengths
        rows: list[list[int]] = []
        used = 0
        while True:
            i = int(self._perm()[self.index])
            n = int(lengths[i])
            if rows and self.packing and used + n <= s:
                rows[-1].append(i)
            elif len(rows) < self.batch_size:
                rows.append([i])
                used = 0
            else:
                break
            used += n
            self._advance()
            if not self.packing and len(rows) == self.batch_size:
                break
        return rows

    def next(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The next batch (see module docstring) and its stats; reads only this process's rows' examples."""
        s, ds = self.dataset.seq_len, self.dataset
        rows = self.plan()
        per = self.batch_size // self.process_count
        mine = [
            [ds.examples[i] for i in row] for row in rows[self.process_index * per : (self.process_index + 1) * per]
        ]
        batch = make_batch(mine, s, self.pad_id)
        cells = len(rows) * s
        flat = [i for row in rows for i in row]
        stats = {
            "real_token_fraction": int(ds.lengths[flat].sum()) / cells,
            "loss_token_fraction": float(ds.loss_tokens[flat].sum()) / cells,
            "conversations": len(flat),
            "epoch": self.epoch,
            "skipped": ds.skipped,
            "skip_reasons": list(ds.skip_reasons),
            "truncated": ds.truncated,
            "split": ds.split,
        }
        return batch, stats

    def state(self) -> dict[str, Any]:
        """JSON-able position: restoring it into an iterator over the same dataset continues exactly."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "num_examples": len(self.dataset.examples),
            "batch_size": self.batch_size,
            "packing": self.packing,
        }

    # grain's checkpointable-iterator protocol (the loader's prefetch thread drives the iterator through it)
    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return self.next()

    def get_state(self) -> dict[str, Any]:
        return self.state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.restore(state)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state()``; ValueError if it was taken over a different dataset or batching."""
        for key, mine in (
            ("seed", self.seed),
            ("num_examples", len(self.dataset.examples)),
            ("batch_size", self.batch_size),
            ("packing", self.packing),
        ):
            if state.get(key) != mine:
                raise ValueError(f"data iterator state has {key}={state.get(key)!r}, this run has {mine!r}")
        if not (0 <= state["index"] < len(self.dataset.examples) and state["epoch"] >= 0):
            raise ValueError(f"data iterator state is out of range: {state}")
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None

    @classmethod
    def from_state(cls, dataset: TokenizedDataset, state: dict[str, Any], pad_id: int = 0) -> "DataIterator":
        """A new iterator positioned at ``state`` (as returned by :meth:`state`)."""
        it = cls(
            dataset, int(state["batch_size"]), packing=bool(state["packing"]), seed=int(state["seed"]), pad_id=pad_id
        )
        it.restore(state)
        return it

    def heldout_prompts(self, n: int) -> list[Conversation]:
        """See :meth:`TokenizedDataset.heldout_prompts`."""
        return self.dataset.heldout_prompts(n)
