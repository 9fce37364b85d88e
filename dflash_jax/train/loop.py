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
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from dflash_jax import config as config_lib
from dflash_jax import export as export_lib
from dflash_jax import paths, sharding
from dflash_jax.data import chat, loader, pipeline
from dflash_jax.train import cost, features, plots, rundir
from dflash_jax.train import hooks as hooks_lib
from dflash_jax.train import run as run_lib
from dflash_jax.train import start as start_lib

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


def window_record(
    step: int,
    window: Sequence[dict[str, Any]],
    seconds: float,
    elapsed: float,
    health: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics.jsonl record of the steps in ``window``: means over the steps whose update was applied
    (``None`` when every update was skipped: a non-finite loss or gradient), ``skipped_steps`` = the others;
    last value of lr / counters; the run-health keys from ``health`` (None each when not given)."""
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
    rec.update(health or dict.fromkeys(rundir.HEALTH_KEYS))
    return {k: rec[k] for k in (*rundir.METRIC_KEYS, *selector)}


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What :func:`train` did: ``step`` reached, ``interrupted`` (a stop signal), ``stop_signal`` (its number, the
    same on every process), the last metrics record, paths."""

    run_dir: str
    step: int
    interrupted: bool
    last: dict[str, Any] | None
    export_dir: str | None
    plots: tuple[str, ...]
    stop_signal: int | None = None


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
    (tests inject interrupts with it). SIGINT (Ctrl-C) and ``train.stop_signals`` end the current step (on every
    process at the same step), save a checkpoint and return with ``interrupted=True`` and ``stop_signal``; a
    second SIGINT kills the process at once (:class:`~dflash_jax.train.hooks.StopSignals`). The run directory is
    locked (:class:`dflash_jax.paths.DirLock`) for the whole call; :class:`DivergedError` after
    ``train.max_consecutive_skips`` consecutive skipped updates.
    """
    run_dir = os.path.abspath(run_dir)
    main = jax.process_index() == 0
    if main:
        rundir.check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # refuse before creating the lock file
    with paths.DirLock(run_dir, jax.process_index()) as lock, hooks_lib.StopSignals(config.train.stop_signals) as sig:
        if main:
            rundir.prepare_run_dir(run_dir, resume=resume, overwrite=overwrite, own_lock=lock.path)
        return _train(config, run_dir, resume=resume, progress=progress, on_step=on_step, signals=sig)


def _data(config: config_lib.Config, renderer: Any, draft_cfg: Any, run_dir: str) -> tuple[Any, Sequence[Any]]:
    """``(iterator, heldout conversations)``: this process's batches (online: the token store, ``data.path`` itself
    or prepared into ``RUN/data``; offline: the feature shards) and the held-out conversations of ``data.path``."""
    tc = config.train
    if tc.mode == "online":
        procs = dict(process_index=jax.process_index(), process_count=jax.process_count())
        store = loader.ensure_store(config.data, renderer, run_dir, barrier=sharding.barrier, **procs)
        iterator = loader.build_loader(config.data, renderer, store, **procs)
        return iterator, iterator.heldout
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
    return iterator, heldout


# ---------------------------------------------------------------------------------------------------------
# The hooks
# ---------------------------------------------------------------------------------------------------------


class _Health:
    """The run-health part of a metrics record (:data:`~dflash_jax.train.rundir.HEALTH_KEYS`): ``flops`` per step
    (:func:`~dflash_jax.train.cost.train_flops`, the global batch) against ``peak_tflops`` per device over
    ``devices`` devices."""

    def __init__(self, flops: float, peak_tflops: float, devices: int):
        self.flops, self.peak, self.devices = flops, peak_tflops * 1e12, devices

    def record(self, window: Sequence[dict[str, Any]], seconds: float) -> dict[str, Any]:
        step_s = seconds / len(window)
        tokens = sum(w["tokens"] for w in window)
        in_use, peak = hooks_lib.device_memory()
        return {
            "step_time_s": step_s,
            "data_wait_s": sum(w.get("data_s", 0.0) for w in window) / len(window),
            "tokens_per_s_per_device": tokens / seconds / self.devices if seconds > 0 else None,
            "mfu": self.flops / step_s / (self.peak * self.devices) if step_s > 0 else None,
            "memory_bytes_in_use": in_use,
            "memory_peak_bytes": peak,
        }


class _MetricsWindow:
    """The log window: every step's device metrics are queued (:meth:`collect`), fetched when a record is due or
    a checkpoint is written (:meth:`drain`), and averaged into one metrics.jsonl record every ``train.log_every``
    steps (:meth:`write`). The divergence guard observes every fetched step."""

    def __init__(self, sink: rundir.MetricsSink, guard: _SkipGuard, window: Sequence[dict[str, Any]], health, t0):
        self.sink, self.guard, self.health, self.t0 = sink, guard, health, t0
        self.window: list[dict[str, Any]] = list(window)
        self.pending: list[tuple[Any, dict[str, Any], float]] = []
        self.last: dict[str, Any] | None = None
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t_window = time.perf_counter()

    def collect(self, info: hooks_lib.StepInfo) -> None:
        self.pending.append((info.metrics, info.stats, info.data_s))

    def drain(self) -> None:
        new = [dict(_host_step_metrics(m, s), data_s=d) for m, s, d in self.pending]
        self.pending.clear()
        self.window.extend(new)
        self.guard.observe(new)

    def write(self, info: hooks_lib.StepInfo) -> None:
        self.drain()
        now = time.perf_counter()
        seconds = now - self.t_window
        health = self.health.record(self.window, seconds) if self.health is not None else None
        self.last = window_record(info.step, self.window, seconds, now - self.t0, health)
        self.window.clear()
        self.t_window = now
        self.sink.write(self.last)


def _log_line(metrics: _MetricsWindow) -> Callable[[hooks_lib.StepInfo], None]:
    """The plain log line of a record (no progress bar: a log file, ``--no-progress``)."""

    def hook(info: hooks_lib.StepInfo) -> None:
        last = metrics.last
        log.info(
            "step %d/%d loss %s acc %s tau %s tok/s %.0f",
            info.step,
            info.last_step,
            *(
                f"{last[k]:.4f}" if last[k] is not None else "n/a (updates skipped)"
                for k in ("loss", "accuracy", "simulated_tau")
            ),
            last["tokens_per_s"] or 0,
        )

    return hook


class _ProgressBar:
    """The tqdm bar on a terminal: advanced every step, its postfix set from every record."""

    def __init__(self, total: int, initial: int, metrics: _MetricsWindow):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
        self.metrics = metrics

    def postfix(self, info: hooks_lib.StepInfo) -> None:
        last = self.metrics.last
        if last["loss"] is not None:
            self.bar.set_postfix(
                loss=f"{last['loss']:.3f}",
                acc=f"{last['accuracy']:.3f}",
                tau=f"{last['simulated_tau']:.3f}",
                tok_s=f"{last['tokens_per_s'] or 0:.0f}",
            )

    def update(self, info: hooks_lib.StepInfo) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _EtaLine:
    """Times the first ``1 + _WARMUP_STEPS`` steps (synchronised) and logs the plan's step time and ETA."""

    def __init__(self, main: bool):
        self.main, self.times = main, []

    def __call__(self, info: hooks_lib.StepInfo) -> None:
        if len(self.times) > _WARMUP_STEPS:
            return
        jax.block_until_ready(info.metrics["loss"])
        self.times.append(time.perf_counter() - info.started)
        if len(self.times) == _WARMUP_STEPS + 1 and self.main:
            log.info(
                cost.eta_line(
                    step_s=float(np.median(self.times[1:])),
                    measured=_WARMUP_STEPS,
                    first_s=self.times[0],
                    steps_left=info.last_step - info.step,
                )
            )


def _eval_hook(config, target, draft_cfg, prompts, stop_ids, sink, metrics: _MetricsWindow, main: bool):
    """Speculative decoding of the held-out ``prompts`` with the current weights, one eval record."""

    def hook(info: hooks_lib.StepInfo) -> None:
        params = sharding.to_host(info.state.params)  # a collective: on every process
        # Decoding runs on every process: the target is the step's own copy, sharded over all of them.
        res = run_lib.run_eval(
            target, draft_cfg, params, prompts, config.eval, seed=config.train.seed, eos_token_ids=stop_ids
        )
        if main:
            sink.write(
                {
                    "step": info.step,
                    "eval_tau": res["tau"],
                    "eval_speedup": res["speedup"],
                    "eval_num_prompts": res["num_prompts"],
                    "eval_per_position_acceptance": res["per_position_acceptance"],
                    "eval_tokens_per_s_spec": res["tokens_per_s_spec"],
                    "eval_tokens_per_s_plain": res["tokens_per_s_plain"],
                }
            )
        metrics.restart_clock()  # eval time is not training throughput

    return hook


class _Checkpoints:
    """Saves every ``train.checkpoint_every`` steps, when a wall-clock checkpoint is due and when the run stops
    (:class:`~dflash_jax.train.hooks.Control`, agreed by every process after the step); :meth:`save` fetches the
    window first and never saves a diverged state."""

    def __init__(self, ckpt, iterator, metrics: _MetricsWindow, control: hooks_lib.Control, key, every: int):
        self.ckpt, self.iterator, self.metrics, self.control, self.key, self.every = (
            ckpt,
            iterator,
            metrics,
            control,
            key,
            every,
        )

    def save(self, state, step: int, *, force: bool) -> None:
        self.metrics.drain()
        self.metrics.guard.check(step)  # never checkpoint a diverged state
        data_state = {
            "iterator": self.iterator.state(),
            "window": self.metrics.window,
            "consecutive_skips": self.metrics.guard.count,
        }
        if self.ckpt.save(state, data_state=data_state, rng=self.key, force=force):
            self.control.saved()

    def __call__(self, info: hooks_lib.StepInfo) -> None:
        self.control.poll(info.step)
        if self.control.stop:
            return  # the final save (synchronous) follows the loop
        if info.step % self.every == 0:
            self.save(info.state, info.step, force=False)
        elif self.control.save_due:
            log.info("step %d: train.checkpoint_every_minutes passed; saving a checkpoint", info.step)
            self.save(info.state, info.step, force=True)


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


def _train(
    config: config_lib.Config,
    run_dir: str,
    *,
    resume: bool,
    progress: bool,
    on_step: Callable[[int], None] | None,
    signals: hooks_lib.StopSignals,
) -> RunResult:
    """:func:`train` inside the run-directory lock and the stop-signal handlers."""
    main = jax.process_index() == 0
    sharding.barrier("dflash_jax:run_dir_prepared")  # process 0 prepared (or replaced) the run directory
    t0 = time.perf_counter()
    start_lib.check_start(config, run_dir, resume=resume)  # before the target loads: a refused resume fails fast
    tc = config.train

    mesh = sharding.make_mesh(config.mesh.shape)  # first: the target loads straight onto it
    target, renderer, draft_cfg = run_lib.assemble(config, mesh, only=run_lib.step_tensors(config))
    log.info("target %r; drafter %s; mask_token_id %d", target, draft_cfg, draft_cfg.mask_token_id)
    iterator, heldout = _data(config, renderer, draft_cfg, run_dir)
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

    fresh, shardings, step_fn = run_lib.build_step(config, target, draft_cfg, mesh)
    ckpt = run_lib.checkpointer(run_dir, config, draft_cfg, keep=tc.keep_checkpoints)
    begin = start_lib.initial_state(config, run_dir, resume=resume, state=fresh, shardings=shardings, ckpt=ckpt)
    del fresh
    state, key, step = begin.state, begin.key, begin.step
    if begin.iterator_state is not None:
        iterator.restore(begin.iterator_state)
    if main:
        rundir.truncate_metrics(run_dir, step)
        rundir.write_run_files(run_dir, config, draft_cfg, heldout)
    sharding.barrier("dflash_jax:run_files_written")

    sink = rundir.MetricsSink(run_dir, main)
    flops = cost.train_flops(
        target.config,
        draft_cfg,
        config.data.batch_size,
        config.data.seq_len,
        config.train.num_anchors,
        config.loss.kd,
        online=tc.mode == "online",
    )
    health = None
    if main:
        log.info(
            cost.plan_line(
                steps=tc.steps, start=step, batch=config.data.batch_size, seq_len=config.data.seq_len, flops=flops
            )
        )
        peak, source = cost.peak_tflops(jax.devices()[0], tc.compute_dtype)
        log.info("MFU peak: %.4g TFLOP/s per device (%s, %s)", peak, source, tc.compute_dtype)
        health = _Health(flops, peak, jax.device_count())
    guard = _SkipGuard(tc.max_consecutive_skips, tc, begin.consecutive_skips)
    metrics = _MetricsWindow(sink, guard, begin.window, health, t0)
    control = hooks_lib.Control(signals, check_every=tc.stop_check_every, every_minutes=tc.checkpoint_every_minutes)
    checkpoints = _Checkpoints(ckpt, iterator, metrics, control, key, tc.checkpoint_every)
    bar = _ProgressBar(tc.steps, step, metrics) if progress and main and sys.stderr.isatty() else None
    profiler = None
    if tc.profile.num_steps:
        directory = tc.profile.dir or os.path.join(run_dir, rundir.PROFILE_DIR)
        profiler = hooks_lib.Profiler(directory, tc.profile.start_step, tc.profile.num_steps)

    hooks = hooks_lib.Hooks()
    hooks.add_hook(_EtaLine(main))
    hooks.add_hook(metrics.collect)
    hooks.add_hook(metrics.write, tc.log_every, at_end=True)
    hooks.add_hook(lambda info: guard.check(info.step), tc.log_every, at_end=True)
    if bar is not None:
        hooks.add_hook(bar.postfix, tc.log_every, at_end=True)
    elif main:
        hooks.add_hook(_log_line(metrics), tc.log_every, at_end=True)
    if prompts:
        hooks.add_hook(
            _eval_hook(config, target, draft_cfg, prompts, stop_ids, sink, metrics, main), tc.eval_every, at_end=True
        )
    if profiler is not None:
        hooks.add_hook(profiler.after_step)
    if bar is not None:
        hooks.add_hook(bar.update)
    if on_step is not None:
        hooks.add_hook(lambda info: on_step(info.step))
    hooks.add_hook(checkpoints)  # last: it agrees on stopping after everything else saw the step

    state_valid = True
    control.poll(step, force=True)  # a signal during loading or compilation stops before the first step
    try:
        while step < tc.steps and not control.stop:
            if profiler is not None:
                profiler.before_step(step + 1)
            t_step = time.perf_counter()
            batch, stats = iterator.next()  # this process's rows
            data_s = time.perf_counter() - t_step
            state_valid = False
            state, step_metrics = step_fn(state, batch, key)
            state_valid = True
            step += 1
            hooks.run(hooks_lib.StepInfo(step, tc.steps, state, step_metrics, stats, data_s, t_step))
    except KeyboardInterrupt:  # raised by an on_step callback or a caller's own handler
        control.stop_signal = control.stop_signal or signal.SIGINT
        if not state_valid:
            log.error("interrupted inside a step; the last checkpoint is the newest state")
    except DivergedError:
        state_valid = False  # no final checkpoint, no export of the diverged state
        raise
    finally:
        if profiler is not None:
            profiler.stop()
        if bar is not None:
            bar.close()
        try:
            if state_valid:
                checkpoints.save(state, step, force=True)
        finally:
            ckpt.close()  # waits for the save: the checkpoint is complete before the run returns
            sink.close()
    interrupted = step < tc.steps

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
        run_dir=run_dir,
        step=step,
        interrupted=interrupted,
        last=metrics.last,
        export_dir=export_dir,
        plots=plot_paths,
        stop_signal=control.stop_signal if interrupted else None,
    )
