"""The training loop behind ``dflash-jax train``: :func:`train` runs the compiled step over the data, logs,
checkpoints, evaluates, exports and plots into a run directory (layout: :mod:`dflash_jax.train.rundir`; the run
is assembled by :mod:`dflash_jax.train.run`).

Logged values are means over the steps since the previous log line (the window). The unlogged part of the window
is stored in every checkpoint, so a resumed run writes exactly the metrics of an uninterrupted one (all keys but
the wall-clock ones, :data:`~dflash_jax.train.rundir.TIMING_KEYS`). Means cover the steps whose update was
applied; ``skipped_steps`` counts the others (non-finite loss or gradient), and ``train.max_consecutive_skips`` of
them in a row stop the run (:class:`DivergedError`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dflash_jax import config as config_lib
from dflash_jax import export as export_lib
from dflash_jax import paths, sharding
from dflash_jax.data import chat, loader, pipeline
from dflash_jax.train import checkpoint as ckpt_lib
from dflash_jax.train import cost, features, plots, rundir
from dflash_jax.train import run as run_lib
from dflash_jax.train import step as step_lib

log = logging.getLogger(__name__)

_WARMUP_STEPS = 2  # timed steps after the first (compiling) one, for the plan's step-time estimate and ETA
_MEAN_KEYS = ("loss", "accuracy", "simulated_tau", "accept_length", "grad_norm", "real_token_fraction")
_VECTOR_KEYS = ("position_accuracy", "position_weight_mean")
# DFlash2 only (losses.reduce_partials): logged after the common keys when the step reports them.
_SELECTOR_KEYS = (
    "selector_loss",
    "selector_accuracy",
    "selector_simulated_tau",
    "selector_accept_length",
    "candidate_recall",
    "selector_position_accuracy",
)


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def _host_step_metrics(m: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """One step's metrics as plain Python values (float64-exact copies of the float32 device values; the step
    computes them on the global batch, replicated, so every process reads the same numbers)."""
    m = jax.device_get(m)
    out = {
        k: float(m[k])
        for k in ("loss", "accuracy", "simulated_tau", "accept_length", "grad_norm", "lr", "real_token_fraction")
    }
    out.update({k: [float(x) for x in np.asarray(m[k])] for k in _VECTOR_KEYS})
    out.update({k: np.asarray(m[k], np.float64).tolist() for k in _SELECTOR_KEYS if k in m})
    out.update(
        skipped_updates=int(m["skipped_updates"]),
        tokens=int(m["tokens"]),
        epoch=int(stats.get("epoch", 0)),
        skipped_samples=int(stats.get("skipped", 0)),
        split_conversations=int(stats.get("split", 0)),
        truncated_conversations=int(stats.get("truncated", 0)),
        update_skipped=bool(m["update_skipped"]),
    )
    return out


def window_record(step: int, window: Sequence[dict[str, Any]], seconds: float, elapsed: float) -> dict[str, Any]:
    """The metrics.jsonl record of the steps in ``window``: means over the steps whose update was applied
    (``None`` when every update was skipped: a non-finite loss or gradient), ``skipped_steps`` = the others;
    last value of lr / counters."""
    last = window[-1]
    applied = [w for w in window if not w.get("update_skipped", False)]
    rec: dict[str, Any] = {"step": int(step), "skipped_steps": len(window) - len(applied)}
    rec.update({k: float(np.mean([w[k] for w in applied])) if applied else None for k in _MEAN_KEYS})
    tokens = sum(w["tokens"] for w in window)
    rec["tokens_per_s"] = tokens / seconds if seconds > 0 else None
    rec.update(
        {
            k: last[k]
            for k in (
                "skipped_samples",
                "split_conversations",
                "truncated_conversations",
                "lr",
                "skipped_updates",
                "epoch",
            )
        },
        elapsed_s=round(elapsed, 3),
    )
    rec.update({k: np.mean([w[k] for w in applied], axis=0).tolist() if applied else None for k in _VECTOR_KEYS})
    selector = [k for k in _SELECTOR_KEYS if k in last]
    rec.update({k: np.mean([w[k] for w in applied], axis=0).tolist() if applied else None for k in selector})
    return {k: rec[k] for k in (*rundir.METRIC_KEYS, *selector)}


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`train` did: ``step`` reached, ``interrupted`` (SIGINT), the last metrics record, paths."""

    run_dir: str
    step: int
    interrupted: bool
    last: dict[str, Any] | None
    export_dir: str | None
    plots: tuple[str, ...]


class _SigintFlag:
    """SIGINT sets ``raised`` and restores the default action, so that a second SIGINT kills the process at once
    (even inside a compile or a save; the newest complete checkpoint stays usable, an unfinished save is cleaned
    up by the next run). Installed only on the main thread."""

    def __init__(self):
        self.raised = False
        self._previous = None

    def _handle(self, signum, frame):
        self.raised = True
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        log.warning(
            "interrupt received: finishing this step and saving a checkpoint (Ctrl-C again to abort at "
            "once; the newest complete checkpoint stays usable)"
        )

    def __enter__(self) -> "_SigintFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class DivergedError(RuntimeError):
    """Training stopped: too many consecutive updates were skipped (non-finite loss or gradient)."""


class _SkipGuard:
    """Counts consecutive skipped updates (:class:`DivergedError` after ``limit``); the count is part of the
    checkpointed data state, so a resumed run stops where an uninterrupted one would."""

    def __init__(self, limit: int, tc: config_lib.TrainSection, count: int = 0):
        self.limit, self.tc, self.count = limit, tc, count

    def observe(self, steps: Sequence[dict[str, Any]]) -> None:
        for w in steps:
            self.count = self.count + 1 if w.get("update_skipped", False) else 0

    def check(self, step: int) -> None:
        if self.count >= self.limit:
            clip = f"train.clip_norm={self.tc.clip_norm}" + (" (clipping is off)" if not self.tc.clip_norm else "")
            raise DivergedError(
                f"training diverged: the last {self.count} updates (to step {step}) were skipped because the loss or "
                f"gradient was not finite (train.max_consecutive_skips={self.limit}). The likely cause is a learning "
                f"rate too high (train.lr={self.tc.lr:g}) or gradients too large ({clip}): lower train.lr, enable "
                "or tighten train.clip_norm, and start over (--overwrite). No checkpoint or export was written for "
                "the diverged state."
            )


def train(
    config: config_lib.Config,
    run_dir: str,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> RunResult:
    """Train a drafter as ``config`` says, writing the run directory (module docstring).

    ``resume``: continue from the newest good checkpoint in ``RUN/checkpoints`` (a fresh start if there is
    none); the config must match the run's (:func:`~dflash_jax.train.run.check_resume`, checked before the target
    loads; a larger ``train.steps`` extends the run). ``overwrite``: replace a previous run (only a directory with
    :data:`~dflash_jax.train.rundir.RUN_MARKERS`). ``progress``: tqdm bar on stderr when it is a terminal, else
    (and with ``progress=False``) one log line per ``train.log_every``. ``on_step(step)``: called after every step
    (tests inject interrupts with it). SIGINT (Ctrl-C) ends the current step, saves a checkpoint and returns with
    ``interrupted=True``; a second SIGINT kills the process at once. The run directory is locked
    (:class:`dflash_jax.paths.DirLock`) for the whole call; :class:`DivergedError` after
    ``train.max_consecutive_skips`` consecutive skipped updates.
    """
    run_dir = os.path.abspath(run_dir)
    main = jax.process_index() == 0
    if main:
        rundir.check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # refuse before creating the lock file
    with paths.DirLock(run_dir, jax.process_index()) as lock, _SigintFlag() as sigint:
        if main:
            rundir.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, own_lock=lock.path)
        return _train(config, run_dir, resume=resume, progress=progress, on_step=on_step, sigint=sigint)


def _train(
    config: config_lib.Config,
    run_dir: str,
    *,
    resume: bool,
    progress: bool,
    on_step: Callable[[int], None] | None,
    sigint: _SigintFlag,
) -> RunResult:
    """:func:`train` inside the run-directory lock and the SIGINT handler."""
    main = jax.process_index() == 0
    sharding.barrier("dflash_jax:run_dir_prepared")  # process 0 prepared (or replaced) the run directory
    t0 = time.perf_counter()
    if resume and rundir.is_run_dir(run_dir):  # before the target loads: a refused resume fails in seconds
        steps = ckpt_lib.complete_steps(os.path.join(run_dir, rundir.CHECKPOINT_DIR))
        run_lib.check_resume(run_dir, config, steps[-1] if steps else None)
    tc = config.train

    mesh = sharding.make_mesh(config.mesh.shape)  # first: the target loads straight onto it
    target, renderer, draft_cfg = run_lib.assemble(config, mesh, only=run_lib.step_tensors(config))
    log.info("target %r; drafter %s; mask_token_id %d", target, draft_cfg, draft_cfg.mask_token_id)

    if tc.mode == "online":
        procs = dict(process_index=jax.process_index(), process_count=jax.process_count())
        store = loader.ensure_store(config.data, renderer, run_dir, barrier=sharding.barrier, **procs)
        iterator = loader.build_loader(config.data, renderer, store, **procs)
        heldout = iterator.heldout
    else:
        iterator = features.FeatureReader(
            tc.features_dir,
            layer_ids=draft_cfg.target_layer_ids,
            hidden_size=draft_cfg.hidden_size,
            batch_size=config.data.batch_size,
            seq_len=config.data.seq_len,
            with_teacher_hidden=config.loss.kd,
            seed=config.data.shuffle_seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        heldout = pipeline.build_dataset(
            config.data.path,
            renderer,
            seq_len=config.data.seq_len,
            fmt=config.data.format,
            max_conversations=1,
            heldout=config.data.heldout,
        ).heldout
    stop_ids = chat.stop_token_ids(target, renderer)
    prompts = (
        run_lib.eval_prompts(renderer, heldout, config.eval.num_prompts)
        if tc.eval_every and config.eval.num_prompts and heldout
        else []
    )
    if tc.eval_every and not heldout:
        log.warning(
            "data.heldout=0: no held-out prompts, so in-training eval (train.eval_every) is off; evaluate "
            "afterwards with dflash-jax eval --draft RUN --prompts FILE"
        )

    state, shardings, step_fn = run_lib.build_step(config, target, draft_cfg, mesh)
    key = jax.random.key(tc.seed)
    ckpt = run_lib.checkpointer(run_dir, config, draft_cfg, keep=tc.keep_checkpoints)
    window: list[dict[str, Any]] = []
    start = 0
    guard = _SkipGuard(tc.max_consecutive_skips, tc)
    if resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(step_lib.abstract_state(state, shardings))
        start, key = meta["step"], meta["rng"]
        iterator.restore(meta["data_state"]["iterator"])
        window = list(meta["data_state"]["window"])
        guard.count = meta["data_state"].get("consecutive_skips", 0)
        log.info("resumed from step %d of %d", start, tc.steps)
    elif resume:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", run_dir)
    if main:
        rundir.truncate_metrics(run_dir, start)
        rundir.write_run_files(run_dir, config, draft_cfg, heldout)
    sharding.barrier("dflash_jax:run_files_written")

    sink = rundir.MetricsSink(run_dir, main)
    if main:
        flops = cost.train_flops(
            target.config,
            draft_cfg,
            config.data.batch_size,
            config.data.seq_len,
            config.train.num_anchors,
            config.loss.kd,
            online=tc.mode == "online",
        )
        log.info(
            cost.plan_line(
                steps=tc.steps, start=start, batch=config.data.batch_size, seq_len=config.data.seq_len, flops=flops
            )
        )
    warmup: list[float] = []  # seconds of the first steps (data + step, synchronised)
    bar = None
    if progress and main and sys.stderr.isatty():  # a log file gets the plain lines below, not a redrawn bar
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    pending: list[tuple[Any, dict[str, Any]]] = []  # device metrics not yet fetched
    step, last, interrupted, state_valid = start, None, False, True
    t_window = time.perf_counter()

    def drain() -> None:
        new = [_host_step_metrics(m, s) for m, s in pending]
        pending.clear()
        window.extend(new)
        guard.observe(new)

    def save(force: bool) -> None:
        drain()
        guard.check(step)  # never checkpoint a diverged state
        ckpt.save(
            state,
            data_state={"iterator": iterator.state(), "window": window, "consecutive_skips": guard.count},
            rng=key,
            force=force,
        )

    try:
        while step < tc.steps and not sigint.raised:
            t_step = time.perf_counter()
            batch, stats = iterator.next()  # this process's rows
            state_valid = False
            state, metrics = step_fn(state, batch, key)
            state_valid = True
            step += 1
            if len(warmup) <= _WARMUP_STEPS:
                jax.block_until_ready(metrics["loss"])
                warmup.append(time.perf_counter() - t_step)
                if len(warmup) == _WARMUP_STEPS + 1 and main:
                    log.info(
                        cost.eta_line(
                            step_s=float(np.median(warmup[1:])),
                            measured=_WARMUP_STEPS,
                            first_s=warmup[0],
                            steps_left=tc.steps - step,
                        )
                    )
            pending.append((metrics, stats))
            if step % tc.log_every == 0 or step == tc.steps:
                drain()
                now = time.perf_counter()
                last = window_record(step, window, now - t_window, now - t0)
                window.clear()
                t_window = now
                sink.write(last)
                guard.check(step)
                if bar is None and main:
                    log.info(
                        "step %d/%d loss %s acc %s tau %s tok/s %.0f",
                        step,
                        tc.steps,
                        *(
                            f"{last[k]:.4f}" if last[k] is not None else "n/a (updates skipped)"
                            for k in ("loss", "accuracy", "simulated_tau")
                        ),
                        last["tokens_per_s"] or 0,
                    )
                elif bar is not None and last["loss"] is not None:
                    bar.set_postfix(
                        loss=f"{last['loss']:.3f}",
                        acc=f"{last['accuracy']:.3f}",
                        tau=f"{last['simulated_tau']:.3f}",
                        tok_s=f"{last['tokens_per_s'] or 0:.0f}",
                    )
            if prompts and (step % tc.eval_every == 0 or step == tc.steps):
                params = sharding.to_host(state.params)  # a collective: on every process
                # Decoding runs on every process: the target is the step's own copy, sharded over all of them.
                res = run_lib.run_eval(
                    target, draft_cfg, params, prompts, config.eval, seed=tc.seed, eos_token_ids=stop_ids
                )
                if main:
                    sink.write(
                        {
                            "step": step,
                            "eval_tau": res["tau"],
                            "eval_speedup": res["speedup"],
                            "eval_num_prompts": res["num_prompts"],
                            "eval_per_position_acceptance": res["per_position_acceptance"],
                            "eval_tokens_per_s_spec": res["tokens_per_s_spec"],
                            "eval_tokens_per_s_plain": res["tokens_per_s_plain"],
                        }
                    )
                t_window = time.perf_counter()  # eval time is not training throughput
            if step % tc.checkpoint_every == 0:
                save(force=False)
            if bar is not None:
                bar.update(1)
            if on_step is not None:
                on_step(step)
        interrupted = step < tc.steps
    except KeyboardInterrupt:  # raised by an on_step callback or a caller's own handler
        interrupted = True
        if not state_valid:
            log.error("interrupted inside a step; the last checkpoint is the newest state")
    except DivergedError:
        state_valid = False  # no final checkpoint, no export of the diverged state
        raise
    finally:
        if bar is not None:
            bar.close()
        try:
            if state_valid:
                save(force=True)
        finally:
            ckpt.close()
            sink.close()

    export_dir = None
    plot_paths: tuple[str, ...] = ()
    params = None if interrupted else sharding.to_host(state.params)  # a collective: on every process
    if main:
        if params is not None:
            export_dir = str(export_lib.export_draft(draft_cfg, params, os.path.join(run_dir, rundir.EXPORT_DIR)))
        plot_paths = tuple(plots.write_plots(rundir.read_metrics(run_dir), os.path.join(run_dir, rundir.PLOTS_DIR)))
    sharding.barrier("dflash_jax:run_finished")  # the others return once the export and plots exist
    if interrupted:
        log.warning("interrupted at step %d; checkpoint saved in %s; continue with --resume", step, run_dir)
    return RunResult(
        run_dir=run_dir, step=step, interrupted=interrupted, last=last, export_dir=export_dir, plots=plot_paths
    )
