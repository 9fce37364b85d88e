"""Where a training run starts, decided in one place: a fresh drafter, a warm start from an exported one
(``draft.init``), a resume from the newest good checkpoint (``--resume``), or an extension (``--resume`` with a
larger ``train.steps``; the schedule rule is :func:`~dflash_jax.train.run.check_resume`'s).

:func:`check_start` runs before the target loads (a refused resume fails in seconds); :func:`initial_state` then
turns the freshly built state (warm-started when ``draft.init`` is set: :func:`~dflash_jax.train.run.build_step`)
into the run's first state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import jax

from dflash_jax import config as config_lib
from dflash_jax.train import checkpoint as ckpt_lib
from dflash_jax.train import run as run_lib
from dflash_jax.train import rundir
from dflash_jax.train import step as step_lib

log = logging.getLogger(__name__)

KINDS = ("fresh", "warm", "resume", "extend")


@dataclasses.dataclass(frozen=True)
class Start:
    """The first state of a run: ``kind`` (one of :data:`KINDS`), the ``step`` already taken, the train ``state``,
    the base PRNG ``key``, and the checkpointed data state (``None`` on a fresh or warm start): the iterator's
    position, the unlogged steps of the current log window and the consecutive skipped updates."""

    kind: str
    step: int
    state: step_lib.TrainState
    key: jax.Array
    iterator_state: Any = None
    window: tuple[dict[str, Any], ...] = ()
    consecutive_skips: int = 0


def check_start(config: config_lib.Config, run_dir: str, *, resume: bool) -> None:
    """Before any model loads: ValueError unless ``config`` may continue the run in ``run_dir`` (with ``resume``
    and a previous run there; :func:`~dflash_jax.train.run.check_resume`)."""
    if resume and rundir.is_run_dir(run_dir):
        steps = ckpt_lib.complete_steps(os.path.join(run_dir, rundir.CHECKPOINT_DIR))
        run_lib.check_resume(run_dir, config, steps[-1] if steps else None)


def initial_state(
    config: config_lib.Config,
    run_dir: str,
    *,
    resume: bool,
    state: step_lib.TrainState,
    shardings: step_lib.TrainState,
    ckpt: ckpt_lib.Checkpointer,
) -> Start:
    """The run's :class:`Start`: with ``resume`` and a complete checkpoint in ``ckpt``, its state restored onto
    ``shardings`` (``"extend"`` when ``train.steps`` grew since the saved ``config.yaml``); otherwise ``state`` as
    built (``"warm"`` with ``draft.init``, else ``"fresh"``) at step 0 with the key of ``train.seed``."""
    tc = config.train
    if resume and ckpt.latest_step() is not None:
        restored, meta = ckpt.restore(step_lib.abstract_state(state, shardings))
        data = meta["data_state"]
        saved_steps = run_lib.load_run(run_dir)[0].train.steps
        kind = "extend" if tc.steps > saved_steps else "resume"
        log.info(
            "resumed from step %d of %d%s",
            meta["step"],
            tc.steps,
            f" (extended from {saved_steps})" * (kind == "extend"),
        )
        return Start(
            kind=kind,
            step=meta["step"],
            state=restored,
            key=meta["rng"],
            iterator_state=data["iterator"],
            window=tuple(data["window"]),
            consecutive_skips=data.get("consecutive_skips", 0),
        )
    if resume:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", run_dir)
    kind = "warm" if config.draft.init else "fresh"
    if kind == "warm":
        log.info("warm start from the exported drafter %s", config.draft.init)
    return Start(kind=kind, step=0, state=state, key=jax.random.key(tc.seed))
