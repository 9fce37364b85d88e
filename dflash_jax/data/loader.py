"""The training data loader: a token store (:mod:`dflash_jax.data.store`) streamed with grain.

:class:`Loader` = :class:`~dflash_jax.data.pipeline.DataIterator` (global shuffle per epoch, greedy packing into
rows, planned from the store's lengths alone, so every process plans the same global batch and reads only its own
rows) over the store's grain ``MapDataset`` source, driven by grain's ``ThreadPrefetchDatasetIterator``: a thread
lays out the next ``data.prefetch`` batches while the step runs, and ``state()`` is the position of the batch the
caller last received (not of the prefetched ones), so a checkpointed state resumes bit-exactly.

A raw ``data.path`` (a chat file or a datasets directory) is prepared into ``RUN/data`` on first use, each process
preparing its share; later starts and ``--resume`` open that store without reading the source (its size and
modification time are checked). There is no in-memory path for small files: one code path, and a tiny file's
store costs milliseconds.
"""

from __future__ import annotations

import os
import weakref
from typing import Any, Callable

import numpy as np

from dflash_jax.data import pipeline
from dflash_jax.data import store as store_lib
from dflash_jax.data.chat import ChatRenderer

DATA_DIR = "data"  # the store of a raw data.path, inside the run directory


class Loader:
    """``next() -> (batch, stats)`` as :meth:`DataIterator.next`, prefetched on a grain thread; ``state()`` /
    ``restore(state)`` as :meth:`DataIterator.state`; ``heldout``: the store's held-out conversations."""

    def __init__(self, iterator: pipeline.DataIterator, prefetch: int):
        import grain

        self.iterator = iterator
        self.heldout = iterator.dataset.heldout
        self._it = grain.experimental.ThreadPrefetchDatasetIterator(iterator, prefetch)
        weakref.finalize(self, self._it.close)  # stop the thread before interpreter shutdown tears down queue

    def next(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        return next(self._it)

    def state(self) -> dict[str, Any]:
        return dict(self._it.get_state())

    def restore(self, state: dict[str, Any]) -> None:
        self._it.set_state(state)

    def close(self) -> None:
        self._it.close()


def store_path(data: Any, run_dir: str) -> str:
    """The store a run reads: ``data.path`` when it is one, else ``RUN/data``."""
    return data.path if store_lib.is_store(data.path) else os.path.join(run_dir, DATA_DIR)


def ensure_store(
    data: Any,
    renderer: ChatRenderer,
    run_dir: str,
    *,
    process_index: int = 0,
    process_count: int = 1,
    barrier: Callable[[str], None] = lambda name: None,
) -> str:
    """The path of the store for ``data`` (a ``config.DataSection``): ``data.path`` itself, or ``RUN/data``
    prepared (this process's parts; ``barrier`` waits for the others) unless complete from a previous start."""
    path = store_path(data, run_dir)
    if path == data.path:
        return path
    if store_lib.is_store(path):
        store_lib.source_unchanged(path, data.path)
    store_lib.prepare(data, renderer, path, process_index=process_index, process_count=process_count)
    barrier("dflash_jax:data_store_prepared")
    return path


def build_loader(
    data: Any,
    renderer: ChatRenderer,
    path: str,
    *,
    pad_id: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Loader:
    """The training stream over the store at ``path``, checked against ``data`` and ``renderer`` (ValueError
    naming a mismatching setting, a truncated or corrupted file: ``data.verify``), seed ``data.shuffle_seed``."""
    dataset = store_lib.TokenStore(path, expected=store_lib.settings_of(data, renderer), verify=data.verify)
    it = pipeline.iterate(dataset, data, pad_id=pad_id, process_index=process_index, process_count=process_count)
    return Loader(it, data.prefetch)
