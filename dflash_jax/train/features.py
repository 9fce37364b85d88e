"""Offline target features: dump them once, train many times without the target.

**Format: safetensors shards + a JSON index.** ``out_dir/index.json`` and ``out_dir/shard-00000.safetensors``, ...
Each shard holds ``rows`` training rows: ``input_ids``, ``segment_ids``, ``positions`` ``[rows,S]`` int32,
``loss_mask [rows,S]`` float32, ``target_hidden [rows,S,T*H]`` (taps of ``layer_ids``, in that order) and
optionally ``teacher_hidden [rows,S,H]`` (the target's final, post-norm hidden state).

Why this format: safetensors is memory-mapped (a batch reads only its rows, through ``get_slice``), is already a
project dependency (no array_record / tensorstore stack to install), carries bf16 natively and is readable by any
tool (numpy, torch, Rust). Why ``teacher_hidden`` rather than teacher top-k / full logits: the teacher logits
are exactly ``teacher_hidden @ lm_head.T`` (the training step recomputes them chunk by chunk), at ``H`` instead
of ``V`` numbers per token (V/H ~ 200x smaller for Qwen3) and without the top-k approximation.

**Resumable and atomic.** Each shard is written to a temporary name and renamed; the index is rewritten
atomically after every shard and lists only finished shards. A resumed dump skips (consumes without running the
target) the rows of the listed shards, so the input stream must be deterministic; rows go through the target in
fixed, padded groups of ``forward_batch`` rows of the whole stream, so a resumed dump is bit-equal to a one-go
dump. ``index.json`` records ``layer_ids``, ``hidden_size``, ``seq_len``, ``dtype``, ``forward_batch``, the target
identity and ``complete``.

**Reading.** :class:`FeatureReader` validates the index against the training config (clear ValueError naming the
field) and yields batches in a deterministic, resumable order (``state()`` / ``restore()``, like
``data.pipeline.DataIterator``), each process reading only its rows of every global batch.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT = "dflash_jax.features/1"
INDEX = "index.json"
BASE_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")
_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_index(features_dir: str) -> dict[str, Any]:
    """The parsed ``index.json`` of a feature directory (FileNotFoundError / ValueError if absent or foreign)."""
    path = os.path.join(features_dir, INDEX)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"features_dir {features_dir!r} has no {INDEX}")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise ValueError(f"features index {path}: format {index.get('format')!r} is not {FORMAT!r}")
    return index


@nnx.jit(static_argnames=("layer_ids",))
def _target_features(model, input_ids, positions, segment_ids, layer_ids):
    return model(input_ids, positions=positions, segment_ids=segment_ids, layer_ids=layer_ids)


def _rows_of(batches: Iterable[Any]) -> Iterator[dict[str, np.ndarray]]:
    """Single rows (dicts of ``[S]`` arrays) from batches given as dicts or ``(batch, stats)`` tuples."""
    for item in batches:
        batch = item[0] if isinstance(item, tuple) else item
        missing = [k for k in BASE_KEYS if k not in batch]
        if missing:
            raise ValueError(f"dump_features: batch is missing {missing}")
        for r in range(np.shape(batch["input_ids"])[0]):
            yield {k: np.asarray(batch[k][r]) for k in BASE_KEYS}


def dump_features(
    target: Any,
    batches: Iterable[Any],
    out_dir: str,
    layer_ids: Sequence[int],
    *,
    with_teacher_hidden: bool = False,
    shard_size: int = 256,
    resume: bool = True,
    dtype: str = "bfloat16",
    max_rows: int | None = None,
    forward_batch: int = 8,
    target_id: str | None = None,
) -> dict[str, Any]:
    """Run the frozen ``target`` over ``batches`` and write feature shards to ``out_dir``; returns the index.

    ``target``: a ``models.target_io.Target`` (or a bare ``TargetModel``); ``batches``: dicts with ``input_ids``,
    ``loss_mask``, ``segment_ids``, ``positions`` ``[B,S]`` (or ``(batch, stats)`` tuples, as ``DataIterator``
    yields), consumed until exhausted or ``max_rows`` rows (required for infinite iterators). Rows are grouped
    ``forward_batch`` at a time through the target and ``shard_size`` per shard. ``dtype``: storage dtype of the
    features. ``resume``: continue a dump with the same settings (ValueError naming the field if they differ);
    ``resume=False`` on a non-empty dump raises instead of overwriting.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    for name, v in (("shard_size", shard_size), ("forward_batch", forward_batch)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    model = getattr(target, "model", target)
    cfg = model.config
    layer_ids = tuple(int(i) for i in layer_ids)
    bad = [i for i in layer_ids if not 0 <= i < cfg.num_layers]
    if not layer_ids or bad:
        raise ValueError(f"layer_ids {list(layer_ids)} must be non-empty ids in [0, {cfg.num_layers})")
    identity = target_id or getattr(target, "source", None) or repr(cfg)
    os.makedirs(out_dir, exist_ok=True)
    settings = {
        "format": FORMAT,
        "layer_ids": list(layer_ids),
        "hidden_size": cfg.hidden_size,
        "num_target_layers": cfg.num_layers,
        "vocab_size": cfg.vocab_size,
        "dtype": dtype,
        "with_teacher_hidden": bool(with_teacher_hidden),
        "shard_size": int(shard_size),
        "target": identity,
    }
    index = {
        **settings,
        "seq_len": None,
        "shards": [],
        "num_rows": 0,
        "complete": False,
        "forward_batch": int(forward_batch),
    }
    if os.path.isfile(os.path.join(out_dir, INDEX)):
        old = read_index(out_dir)
        if not resume and old["shards"]:
            raise ValueError(f"out_dir {out_dir!r} already holds a feature dump; pass resume=True or a new dir")
        for k, v in settings.items():
            if old.get(k) != v:
                raise ValueError(f"cannot resume the dump in {out_dir!r}: {k} is {old.get(k)!r} there, {v!r} now")
        if old.get("forward_batch", forward_batch) != forward_batch:  # older dumps do not record it
            raise ValueError(
                f"cannot resume the dump in {out_dir!r}: forward_batch is {old['forward_batch']} "
                f"there, {forward_batch} now (a resumed dump computes its rows in the same groups)"
            )
        index = dict(old, forward_batch=int(forward_batch)) if resume else index
    done_rows = index["num_rows"]
    np_dtype = _DTYPES[dtype]
    rows = _rows_of(batches)
    # Rows go through the target in the fixed groups [g*forward_batch, (g+1)*forward_batch) of the whole stream,
    # each padded to forward_batch rows: every row is computed by the same program at the same batch position
    # whether the dump runs in one go or is resumed, so a resumed dump is bit-equal to a one-go dump. A resume
    # recomputes the already dumped head of its first group and drops it.
    redo = done_rows % forward_batch
    for _ in range(done_rows - redo):  # resume: consume the rows of the groups the finished shards hold
        if next(rows, None) is None:
            raise ValueError(f"resume: the input stream has fewer rows than the {done_rows} already dumped")
    if max_rows is not None:
        rows = itertools.islice(rows, max(int(max_rows) - done_rows + redo, 0))

    def forward(group: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        padded = group + [group[-1]] * (forward_batch - len(group))
        stacked = {k: np.stack([r[k] for r in padded]) for k in BASE_KEYS}
        taps, final = _target_features(
            model,
            jnp.asarray(stacked["input_ids"], jnp.int32),
            jnp.asarray(stacked["positions"], jnp.int32),
            jnp.asarray(stacked["segment_ids"], jnp.int32),
            layer_ids,
        )
        out = dict(stacked, target_hidden=np.asarray(jax.device_get(taps)).astype(np_dtype))
        if with_teacher_hidden:
            out["teacher_hidden"] = np.asarray(jax.device_get(final)).astype(np_dtype)
        for i in range(len(group)):
            yield {k: v[i] for k, v in out.items()}

    def feature_rows() -> Iterator[dict[str, np.ndarray]]:
        group: list[dict[str, np.ndarray]] = []
        for row in rows:
            group.append(row)
            if len(group) == forward_batch:
                yield from forward(group)
                group = []
        if group:
            yield from forward(group)

    featured = itertools.islice(feature_rows(), redo, None)
    while shard := list(itertools.islice(featured, shard_size)):
        seq_len = int(shard[0]["input_ids"].shape[0])
        if index["seq_len"] not in (None, seq_len):
            raise ValueError(f"seq_len changed within the dump: {index['seq_len']} vs {seq_len}")
        index["seq_len"] = seq_len
        name = _shard_name(len(index["shards"]))
        tensors = {k: np.ascontiguousarray(np.stack([r[k] for r in shard])) for k in shard[0]}
        tmp = os.path.join(out_dir, name + ".tmp")
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.replace(tmp, os.path.join(out_dir, name))
        index["shards"].append({"file": name, "rows": len(shard)})
        index["num_rows"] += len(shard)
        _write_json_atomic(os.path.join(out_dir, INDEX), index)
    index["complete"] = True
    _write_json_atomic(os.path.join(out_dir, INDEX), index)
    return index


class FeatureReader:
    """Deterministic, resumable batches from a feature dump (``next() -> (batch, stats)``, ``state``/``restore``).

    Validates the index against the training config: ``layer_ids`` (draft ``target_layer_ids``, same order),
    ``hidden_size``, and ``seq_len`` when given; ``with_teacher_hidden=True`` requires the dump to hold it.
    Rows are visited in a per-epoch permutation (``seed``; ``shuffle=False``: file order), ``batch_size`` global
    rows per batch (incomplete tails dropped); this process gets rows ``[p*B/P, (p+1)*B/P)`` of each.
    Feature arrays come back as float32 (cast from the storage dtype).
    """

    def __init__(
        self,
        features_dir: str,
        *,
        layer_ids: Sequence[int],
        hidden_size: int,
        batch_size: int,
        seq_len: int | None = None,
        with_teacher_hidden: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
        allow_incomplete: bool = False,
    ):
        index = read_index(features_dir)
        checks = [
            ("layer_ids", list(index["layer_ids"]), [int(i) for i in layer_ids]),
            ("hidden_size", index["hidden_size"], int(hidden_size)),
        ]
        if seq_len is not None:
            checks.append(("seq_len", index["seq_len"], int(seq_len)))
        for name, have, want in checks:
            if have != want:
                raise ValueError(f"feature dump {features_dir!r}: {name} is {have!r} but the config expects {want!r}")
        if with_teacher_hidden and not index["with_teacher_hidden"]:
            raise ValueError(f"feature dump {features_dir!r}: with_teacher_hidden is False but KD needs teacher_hidden")
        if not index["complete"] and not allow_incomplete:
            raise ValueError(f"feature dump {features_dir!r} is incomplete (complete=false); finish it with resume")
        self.dir, self.index = features_dir, index
        self.with_teacher_hidden = bool(with_teacher_hidden)
        self.batch_size, self.shuffle, self.seed = int(batch_size), bool(shuffle), int(seed)
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.process_count = jax.process_count() if process_count is None else int(process_count)
        if self.batch_size < 1 or self.batch_size % self.process_count:
            raise ValueError(
                f"batch_size {batch_size} must be >= 1 and divisible by process_count {self.process_count}"
            )
        self.num_rows = int(index["num_rows"])
        if self.num_rows < self.batch_size:
            raise ValueError(f"feature dump has {self.num_rows} rows, fewer than batch_size {self.batch_size}")
        self._starts = np.cumsum([0] + [s["rows"] for s in index["shards"]])
        width = len(index["layer_ids"]) * index["hidden_size"]
        self._files = []
        for s in index["shards"]:
            path = os.path.join(features_dir, s["file"])
            f = safe_open(path, framework="np")
            shape = tuple(f.get_slice("target_hidden").get_shape())
            if shape != (s["rows"], index["seq_len"], width):
                raise ValueError(
                    f"{path}: target_hidden has shape {shape}, the index says "
                    f"{(s['rows'], index['seq_len'], width)} (rows, seq_len, T*H)"
                )
            self._files.append(f)
        self.epoch, self.position = 0, 0
        self._order: np.ndarray | None = None

    def _perm(self) -> np.ndarray:
        if self._order is None:
            self._order = (
                np.random.default_rng([self.seed, self.epoch]).permutation(self.num_rows)
                if self.shuffle
                else np.arange(self.num_rows)
            )
        return self._order

    def _read_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        keys = list(BASE_KEYS) + ["target_hidden"] + (["teacher_hidden"] if self.with_teacher_hidden else [])
        out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        for r in rows:
            shard = int(np.searchsorted(self._starts, r, side="right") - 1)
            local = int(r - self._starts[shard])
            for k in keys:
                out[k].append(self._files[shard].get_slice(k)[local : local + 1])
        batch = {k: np.concatenate(v) for k, v in out.items()}
        for k in ("target_hidden", "teacher_hidden"):
            if k in batch:
                batch[k] = batch[k].astype(np.float32)
        return batch

    def next(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """This process's rows of the next global batch, and stats ``{epoch, real_token_fraction, ...}``."""
        if self.position + self.batch_size > self.num_rows:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        rows = self._perm()[self.position : self.position + self.batch_size]
        per = self.batch_size // self.process_count
        batch = self._read_rows(rows[self.process_index * per : (self.process_index + 1) * per])
        self.position += self.batch_size
        stats = {
            "epoch": self.epoch,
            "real_token_fraction": float((batch["segment_ids"] > 0).mean()),
            "loss_token_fraction": float(batch["loss_mask"].mean()),
        }
        return batch, stats

    __next__ = next

    def __iter__(self) -> "FeatureReader":
        return self

    def state(self) -> dict[str, Any]:
        """JSON-able position (``epoch``, ``position``, plus what must match on restore)."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "num_rows": self.num_rows,
            "batch_size": self.batch_size,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from :meth:`state`; ValueError naming the field if the dump or batching differ."""
        for k in ("seed", "shuffle", "num_rows", "batch_size"):
            if state.get(k) != getattr(self, k):
                raise ValueError(f"feature reader state has {k}={state.get(k)!r}, this reader has {getattr(self, k)!r}")
        self.epoch, self.position, self._order = int(state["epoch"]), int(state["position"]), None
