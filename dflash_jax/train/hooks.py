"""The trainer's hook machinery (Levanter's ``add_hook(fn, every=N)``): a :class:`StepInfo` per step, the
:class:`Hooks` that run after it, and the run-control pieces the hooks share: the stop signals
(:class:`StopSignals`), the processes' agreement on stopping and on a wall-clock checkpoint (:class:`Control`),
the profiler window (:class:`Profiler`) and the device memory counters (:func:`device_memory`).

The hooks themselves (metrics window, log line / progress bar, divergence guard, eval, checkpoint) are
:mod:`dflash_jax.train.loop`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One finished step as the hooks see it. ``step``: its 1-based number (= updates taken); ``last_step``:
    ``train.steps``; ``state``: the train state after it; ``metrics``: its device metrics (not fetched);
    ``stats``: the host data counters of its batch; ``data_s``: seconds spent waiting for the batch
    (``iterator.next()``); ``started``: ``time.perf_counter()`` when the wait began."""

    step: int
    last_step: int
    state: Any
    metrics: dict[str, Any]
    stats: dict[str, Any]
    data_s: float
    started: float


@dataclasses.dataclass(frozen=True)
class _Hook:
    fn: Callable[[StepInfo], None]
    every: int
    at_end: bool


class Hooks:
    """Hooks run in the order they were added, after every step whose number is a multiple of ``every`` (and
    after the last step when ``at_end``)."""

    def __init__(self) -> None:
        self._hooks: list[_Hook] = []

    def add_hook(self, fn: Callable[[StepInfo], None], every: int = 1, *, at_end: bool = False) -> None:
        if every < 1:
            raise ValueError(f"hook every must be >= 1, got {every}")
        self._hooks.append(_Hook(fn, every, at_end))

    def run(self, info: StepInfo) -> None:
        for h in self._hooks:
            if info.step % h.every == 0 or (h.at_end and info.step == info.last_step):
                h.fn(info)


# ---------------------------------------------------------------------------------------------------------
# Stop signals and the processes' agreement
# ---------------------------------------------------------------------------------------------------------


class StopSignals:
    """SIGINT and ``names`` (``train.stop_signals``) set :attr:`received` (the first signal's number); the run then
    finishes its step, saves a checkpoint and stops. A second SIGINT kills the process at once (the default action
    is restored: even inside a compile or a save; the newest complete checkpoint stays usable, an unfinished save
    is cleaned up by the next run); a repeated SIGTERM / SIGUSR1 / ... is logged and otherwise ignored, so that a
    scheduler's repeated notice does not kill the save it asked for (its SIGKILL after the grace period still
    does). Installed only on the main thread."""

    def __init__(self, names: Sequence[str] = ()):
        self.signums = [signal.SIGINT] + [getattr(signal, n) for n in names if n != "SIGINT"]
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        first = self.received is None
        if first:
            self.received = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
        name = signal.Signals(signum).name
        if not first and signum != signal.SIGINT:
            log.warning("%s received again: already stopping at the end of this step", name)
            return
        log.warning(
            "%s received: finishing this step and saving a checkpoint%s (the newest complete checkpoint stays usable)",
            "interrupt" if signum == signal.SIGINT else name,
            " (Ctrl-C again to abort at once;" if signum == signal.SIGINT else "",
        )

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.signums:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


def agree(flags: Sequence[int]) -> list[int]:
    """The element-wise maximum of every process's ``flags`` (small non-negative ints): one all-gather of a host
    array over all processes (``multihost_utils.process_allgather``); the flags themselves on one process."""
    if jax.process_count() == 1:
        return [int(f) for f in flags]
    from jax.experimental import multihost_utils

    gathered = multihost_utils.process_allgather(np.asarray(flags, np.int32))
    return [int(x) for x in np.max(np.asarray(gathered).reshape(jax.process_count(), -1), axis=0)]


class Control:
    """When the run stops and when a wall-clock checkpoint is due, decided alike on every process.

    After a step (:meth:`poll`, every ``check_every`` steps; after every step on one process) the processes agree
    (:func:`agree`) on two flags: a stop signal received by any of them (:class:`StopSignals`; the largest signal
    number wins, so all report the same one) and ``checkpoint_every_minutes`` passed on process 0's clock since the
    last save (:meth:`saved` restarts it). ``stop`` / ``save_due`` then hold on every process at the same step."""

    def __init__(self, signals: StopSignals, *, check_every: int, every_minutes: float | None):
        self.signals = signals
        self.check_every = check_every if jax.process_count() > 1 else 1
        self.every_s = None if every_minutes is None else every_minutes * 60.0
        self.stop_signal: int | None = None
        self.save_due = False
        self._last_save = time.monotonic()

    @property
    def stop(self) -> bool:
        return self.stop_signal is not None

    def poll(self, step: int, *, force: bool = False) -> None:
        """Agree on the flags after ``step`` when it is a multiple of ``check_every`` (or ``force``: before the
        first step)."""
        if step % self.check_every and not force:
            return
        due = (
            self.every_s is not None and jax.process_index() == 0 and time.monotonic() - self._last_save >= self.every_s
        )
        stop, save = agree([self.signals.received or 0, int(due)])
        self.stop_signal = stop or None
        self.save_due = bool(save)

    def saved(self) -> None:
        """A checkpoint was just written: the wall-clock interval starts again."""
        self._last_save = time.monotonic()
        self.save_due = False


# ---------------------------------------------------------------------------------------------------------
# Profiler and device memory
# ---------------------------------------------------------------------------------------------------------


class Profiler:
    """A ``jax.profiler`` trace of steps ``start_step`` .. ``start_step + num_steps - 1`` into ``directory``
    (``plugins/profile/<time>/<host>.xplane.pb`` for TensorBoard's profile plugin / XProf, and
    ``<host>.trace.json.gz`` for ui.perfetto.dev). :meth:`before_step` starts the trace, the hook
    (:meth:`after_step`) stops it after the window's last step has finished on the device."""

    def __init__(self, directory: str, start_step: int, num_steps: int):
        self.directory, self.first, self.last = directory, start_step, start_step + num_steps - 1
        self.active = False

    def before_step(self, step: int) -> None:
        """Called before step number ``step`` runs."""
        if step == self.first and not self.active:
            os.makedirs(self.directory, exist_ok=True)
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
            self.active = True
            log.info("profiling steps %d..%d into %s", self.first, self.last, self.directory)

    def after_step(self, info: StepInfo) -> None:
        if self.active and (info.step >= self.last or info.step == info.last_step):
            self.stop(info.state)

    def stop(self, state: Any = None) -> None:
        if self.active:
            if state is not None:
                jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            log.info("profile written to %s (README: Profiling)", self.directory)


def device_memory() -> tuple[int | None, int | None]:
    """``(bytes in use, peak bytes in use)``: the largest over this process's devices of their
    ``memory_stats()``; ``None`` where the backend reports none (CPU)."""
    in_use, peak = [], []
    for d in jax.local_devices():
        stats = d.memory_stats() or {}
        if "bytes_in_use" in stats:
            in_use.append(int(stats["bytes_in_use"]))
        if "peak_bytes_in_use" in stats:
            peak.append(int(stats["peak_bytes_in_use"]))
    return (max(in_use) if in_use else None), (max(peak) if peak else None)
