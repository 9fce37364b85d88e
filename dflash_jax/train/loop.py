"""The effectful training driver behind ``dflash-jax train``: build everything from a :class:`~dflash_jax.config.Config`,
run the compiled step, log, checkpoint, evaluate, export and plot.

Run directory layout (``RUN``)::

    RUN/config.yaml          the resolved config (what ``--resume`` reloads)
    RUN/draft_config.json    the resolved drafter config (export ``config.json`` format)
    RUN/heldout.jsonl        held-out conversations (never trained on; ``dflash-jax eval`` prompts)
    RUN/metrics.jsonl        one JSON object per logged step (see :data:`METRIC_KEYS`) and per eval
    RUN/checkpoints/<step>/  Orbax checkpoints (params, optimizer, data position, PRNG key, SHA-256 manifest)
    RUN/export/              the final drafter (``config.json`` + ``model.safetensors``, z-lab / vLLM / SGLang)
    RUN/plots/*.png          loss and simulated tau vs step, per-position acceptance, D-PACE weights per position
    RUN/tb/                  TensorBoard events (only when a SummaryWriter is importable)
    RUN/.lock.<process>      the run-directory lock of each writing process (dflash_jax.paths.DirLock)

Logged values are means over the steps since the previous log line (the window). The unlogged part of the window
is stored in every checkpoint, so a resumed run writes exactly the metrics of an uninterrupted one (all keys but
the wall-clock ones, :data:`TIMING_KEYS`). Means cover the steps whose update was applied; ``skipped_steps`` counts
the others (non-finite loss or gradient), and ``train.max_consecutive_skips`` of them in a row stop the run
(:class:`DivergedError`).

Mask token (``draft.mask_token_id: null``, SmolLM2 has none): a vocabulary token spelled like a mask
(``<mask>``, ``<|mask|>``, ``[MASK]``, ...) if the tokenizer has one; otherwise the lowest-id special token
that is neither BOS nor EOS and that the chat template does not emit (SmolLM2: ``<|endoftext|>``, id 0; never
``<|im_end|>``, which ends every assistant turn). An explicit id that is an EOS id is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash_jax import config as config_lib
from dflash_jax import export as export_lib
from dflash_jax import paths
from dflash_jax.data import chat, pipeline, readers
from dflash_jax.models import layers
from dflash_jax.models.draft import DFlashDraft, DraftConfig
from dflash_jax.models.target import Target, TargetConfig, load_target, random_target, smollm2_gguf_path
from dflash_jax.train import checkpoint as ckpt_lib
from dflash_jax.train import features, optim, sharding
from dflash_jax.train import step as step_lib

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
DRAFT_CONFIG_FILE = "draft_config.json"
HELDOUT_FILE = "heldout.jsonl"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"
PLOTS_DIR = "plots"
TB_DIR = "tb"
RUN_MARKERS = (CONFIG_FILE, DRAFT_CONFIG_FILE)  # what --overwrite requires before deleting a directory
SMOLLM2 = "smollm2"
RANDOM = "random"

METRIC_KEYS = ("step", "loss", "accuracy", "simulated_tau", "accept_length", "tokens_per_s", "skipped_samples", "lr",
               "grad_norm", "real_token_fraction", "position_accuracy", "position_weight_mean", "skipped_updates",
               "skipped_steps", "epoch", "elapsed_s")
TIMING_KEYS = ("tokens_per_s", "elapsed_s", "eval_speedup", "eval_tokens_per_s_spec", "eval_tokens_per_s_plain")
_MEAN_KEYS = ("loss", "accuracy", "simulated_tau", "accept_length", "grad_norm", "real_token_fraction")
_VECTOR_KEYS = ("position_accuracy", "position_weight_mean")
_MASK_SPELLINGS = ("<mask>", "<|mask|>", "[MASK]", "<MASK>", "<|MASK|>", "<|mask_token|>")


# ---------------------------------------------------------------------------------------------------------
# Building blocks (each usable on its own: the CLI's eval / export / dump-features reuse them)
# ---------------------------------------------------------------------------------------------------------


def build_target(section: config_lib.TargetSection) -> Target:
    """The frozen target of ``target.path``: ``random`` (``target.random`` dims), ``smollm2`` (the installed
    SmolLM2-135M-Instruct GGUF), an HF checkpoint directory or a ``.gguf`` file; in ``target.dtype``."""
    if section.path == RANDOM:
        r = section.random
        return random_target(TargetConfig.from_hf_dict(r.hf_config()), seed=r.seed, dtype=section.dtype)
    path = smollm2_gguf_path() if section.path == SMOLLM2 else section.path
    if not os.path.exists(path):
        raise ValueError(f"target.path {section.path!r} does not exist (use an HF checkpoint directory, a .gguf "
                         f"file, '{SMOLLM2}' or '{RANDOM}')")
    return load_target(path, dtype=section.dtype)


def resolve_mask_token_id(configured: int | None, target: Target, renderer: chat.ChatRenderer) -> int:
    """``draft.mask_token_id`` or, when null, the documented rule (module docstring). ValueError naming the key."""
    vocab, eos = target.config.vocab_size, set(target.eos_token_ids)
    tok = renderer.tokenizer
    eos |= {i for i in (tok.token_to_id(t) for t in (renderer.eos_token, "<|im_end|>") if t) if i is not None}
    if configured is not None:
        if not 0 <= configured < vocab:
            raise ValueError(f"draft.mask_token_id ({configured}) must be in [0, target vocab_size={vocab})")
        if configured in eos:
            raise ValueError(f"draft.mask_token_id ({configured}) is an end-of-sequence token of the target; "
                             "choose an id the target never emits")
        return int(configured)
    for spelling in _MASK_SPELLINGS:
        i = tok.token_to_id(spelling)
        if i is not None and i < vocab:
            return int(i)
    bos = tok.token_to_id(renderer.bos_token) if renderer.bos_token else None
    probe = (("user", "Hello"), ("assistant", "Hi there."))
    used = set(renderer.render(probe)[0].tolist())
    for i in sorted(tok.get_added_tokens_decoder()):
        if i < vocab and i not in eos and i != bos and i not in used:
            return int(i)
    raise ValueError("draft.mask_token_id is null and the tokenizer has no mask token and no unused special "
                     "token; set draft.mask_token_id to an id of the target vocabulary that never occurs in text")


def build_draft_config(config: config_lib.Config, target: Target, mask_token_id: int) -> DraftConfig:
    """The drafter's config: the ``draft`` section's dims, hidden size / vocab / depth from the target."""
    d, tc = config.draft, target.config
    dims = dict(num_layers=d.num_layers, num_attention_heads=d.num_attention_heads,
                num_key_value_heads=d.num_key_value_heads, head_dim=d.head_dim,
                intermediate_size=d.intermediate_size, block_size=d.block_size, mask_token_id=mask_token_id,
                rope_theta=tc.rope_theta if d.rope_theta is None else d.rope_theta, rms_norm_eps=d.rms_norm_eps,
                sliding_window=d.sliding_window, causal=d.causal, rope_scaling=d.rope_scaling,
                attention_sink=d.attention_sink, max_position_embeddings=tc.max_position_embeddings)
    if d.target_layer_ids is not None:
        dims["target_layer_ids"] = d.target_layer_ids
    return DraftConfig.from_target(tc.hidden_size, tc.vocab_size, tc.num_layers, **dims)


def new_draft(draft_cfg: DraftConfig, train: config_lib.TrainSection, init: str | None = None) -> DFlashDraft:
    """A drafter with fp32 master parameters (seed ``train.seed``) in ``train.compute_dtype``; ``init``: an
    exported drafter (``draft.init``) whose config must equal ``draft_cfg``, loaded as the starting weights."""
    if train.param_dtype != "float32":
        raise ValueError(f"train.param_dtype must be float32 (the step keeps fp32 master weights), got "
                         f"{train.param_dtype!r}; use train.compute_dtype for bf16 compute")
    with layers.unsharded_init():
        draft = DFlashDraft(draft_cfg, rngs=nnx.Rngs(train.seed), param_dtype=jnp.float32,
                            dtype=getattr(jnp, train.compute_dtype), remat=train.remat)
    if init is not None:
        init_cfg, params = export_lib.import_draft(init)
        diffs = [f"{f.name}: {getattr(init_cfg, f.name)!r} there, {getattr(draft_cfg, f.name)!r} here"
                 for f in dataclasses.fields(DraftConfig) if getattr(init_cfg, f.name) != getattr(draft_cfg, f.name)]
        if diffs:
            raise ValueError(f"draft.init {init!r} does not match the configured drafter: " + "; ".join(diffs))
        nnx.update(draft, params)
    return draft


def fingerprint(config: config_lib.Config, draft_cfg: DraftConfig) -> dict[str, Any]:
    """What must not change across ``--resume`` (mesh shape and logging/checkpoint cadence may)."""
    t = config.train
    train = {k: getattr(t, k) for k in ("steps", "lr", "warmup_steps", "warmup_ratio", "schedule", "weight_decay",
                                        "clip_norm", "b1", "b2", "eps", "seed", "compute_dtype", "param_dtype",
                                        "mode")}
    return ckpt_lib.config_fingerprint(target=config.target, draft=draft_cfg, loss=config.loss, data=config.data,
                                       train=train)


def check_run_dir(run_dir: str, *, resume: bool, overwrite: bool) -> bool:
    """Refuse (ValueError, nothing touched) a non-empty ``run_dir`` (lock files aside) unless ``resume`` or
    ``overwrite``; ``overwrite`` accepts only a real directory holding :data:`RUN_MARKERS`. Returns whether
    ``run_dir`` holds a previous run that ``overwrite`` must delete."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite are exclusive")
    if resume or not os.path.isdir(run_dir) or all(paths.is_lock_file(n) for n in os.listdir(run_dir)):
        return False
    if not overwrite:
        raise ValueError(f"run dir {run_dir!r} is not empty; pass --resume to continue it or --overwrite to "
                         "replace it")
    paths.check_clearable(run_dir, RUN_MARKERS)
    return True


def prepare_run_dir(run_dir: str, *, resume: bool, overwrite: bool) -> None:
    """:func:`check_run_dir`, then delete a previous run when ``overwrite`` (its lock files stay) and create
    ``run_dir``."""
    if check_run_dir(run_dir, resume=resume, overwrite=overwrite):
        paths.clear_run_dir(run_dir, RUN_MARKERS)
    os.makedirs(run_dir, exist_ok=True)


def eval_prompts(renderer: chat.ChatRenderer, conversations: Sequence[readers.Conversation], n: int,
                 prompt_len: int) -> list[np.ndarray]:
    """Token ids (int32) of the first ``n`` usable prompts: each conversation cut before its first assistant turn
    (:func:`~dflash_jax.data.pipeline.prompt_of`), rendered with the generation prompt, last ``prompt_len``
    tokens kept."""
    out = []
    for conv in conversations:
        prefix = pipeline.prompt_of(conv)
        if prefix is None:
            continue
        try:
            ids = renderer.render_prompt(prefix)
        except chat.RenderError:
            continue
        if ids.size:
            out.append(ids[-prompt_len:])
        if len(out) == n:
            break
    return out


def read_heldout(path: str) -> list[readers.Conversation]:
    """The conversations of a ``heldout.jsonl`` (or any chat file), bad records dropped."""
    return [c for c in readers.read_conversations(path) if not isinstance(c, readers.Skip)]


def write_heldout(path: str, conversations: Sequence[readers.Conversation]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for conv in conversations:
            f.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in conv]}, ensure_ascii=False) + "\n")


def run_eval(target: Target, draft_cfg: DraftConfig, params: Any, prompts: Sequence[np.ndarray],
             section: config_lib.EvalSection, *, seed: int = 0, check_lossless: bool = False) -> dict[str, Any]:
    """Speculative decoding of ``prompts`` with a drafter holding ``params`` (host or device pytree)."""
    from dflash_jax.eval.report import evaluate

    draft = export_lib.draft_from_params(draft_cfg, sharding.to_host(params))
    return evaluate(target, draft, draft_cfg, prompts, max_new_tokens=section.max_new_tokens,
                    temperature=section.temperature, seed=seed, check_lossless=check_lossless)


def load_run(run_dir: str) -> tuple[config_lib.Config, DraftConfig]:
    """The resolved config and drafter config a training run saved in ``run_dir``."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(run_dir, DRAFT_CONFIG_FILE)):
        raise ValueError(f"{run_dir!r} is not a dflash-jax run directory (no {CONFIG_FILE} / {DRAFT_CONFIG_FILE})")
    with open(os.path.join(run_dir, DRAFT_CONFIG_FILE), encoding="utf-8") as f:
        return config_lib.load_config(path), export_lib.config_from_json(json.load(f))


def restore_params(run_dir: str, step: int | None = None) -> tuple[config_lib.Config, DraftConfig, Any, int]:
    """``(config, draft_cfg, params, step)`` from a run's checkpoint ``step`` (default: the latest complete one),
    restored on one local device without loading the target."""
    config, draft_cfg = load_run(run_dir)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.local_devices()[:1])
    tx, _ = optim.optimizer_from_config(config.train)
    _, state, shardings = step_lib.init_train_state(new_draft(draft_cfg, config.train), tx, mesh)
    with ckpt_lib.Checkpointer(os.path.join(run_dir, CHECKPOINT_DIR), save_every=config.train.checkpoint_every,
                               keep=None, fingerprint=fingerprint(config, draft_cfg), read_only=True) as ckpt:
        state, meta = ckpt.restore(step_lib.abstract_state(state, shardings), step)
    return config, draft_cfg, state.params, meta["step"]


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def _host_step_metrics(m: dict[str, Any], stats: dict[str, Any], tokens: int) -> dict[str, Any]:
    """One step's metrics as plain Python values (float64-exact copies of the float32 device values)."""
    m = jax.device_get(m)
    out = {k: float(m[k]) for k in ("loss", "accuracy", "simulated_tau", "accept_length", "grad_norm", "lr")}
    out.update({k: [float(x) for x in np.asarray(m[k])] for k in _VECTOR_KEYS})
    out.update(skipped_updates=int(m["skipped_updates"]), real_token_fraction=float(stats["real_token_fraction"]),
               tokens=int(tokens), epoch=int(stats.get("epoch", 0)), skipped_samples=int(stats.get("skipped", 0)),
               update_skipped=bool(m["update_skipped"]))
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
    rec.update(skipped_samples=last["skipped_samples"], lr=last["lr"], skipped_updates=last["skipped_updates"],
               epoch=last["epoch"], elapsed_s=round(elapsed, 3))
    rec.update({k: np.mean([w[k] for w in applied], axis=0).tolist() if applied else None for k in _VECTOR_KEYS})
    return {k: rec[k] for k in METRIC_KEYS}


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` (empty if absent). A torn last line (a process killed while writing
    it) is dropped with a warning; any other unparsable line is a ValueError naming the file and line."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records = []
    for i, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i != lines[-1][0]:
                raise ValueError(f"{path} line {i} is not a JSON record ({e}); fix or delete that line") from None
            log.warning("%s: dropping the torn last line %d (%s), written by an interrupted process", path, i, e)
    return records


def _truncate_metrics(run_dir: str, step: int) -> None:
    """Keep only the records of steps <= ``step`` (a resume recomputes the rest)."""
    path = os.path.join(run_dir, METRICS_FILE)
    keep = [r for r in read_metrics(run_dir) if r["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)


class _MetricsSink:
    """Appends records to metrics.jsonl (and TensorBoard scalars when a SummaryWriter is importable)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self._file = open(os.path.join(run_dir, METRICS_FILE), "a", encoding="utf-8") if enabled else None
        self._tb = _summary_writer(os.path.join(run_dir, TB_DIR)) if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _summary_writer(path: str):
    """A TensorBoard SummaryWriter (tensorboardX, or torch's when the tensorboard package exists), else None."""
    import importlib.util

    try:
        if importlib.util.find_spec("tensorboardX") is not None:
            from tensorboardX import SummaryWriter
        elif importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
        else:
            return None
        return SummaryWriter(path)
    except Exception as e:  # a broken optional install must not stop training
        log.warning("TensorBoard disabled: %s", e)
        return None


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
        log.warning("interrupt received: finishing this step and saving a checkpoint (Ctrl-C again to abort at "
                    "once; the newest complete checkpoint stays usable)")

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
                "the diverged state.")


def _process_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's rows of a global host batch (all of them on one process)."""
    if jax.process_count() == 1:
        return batch
    rows = sharding.process_rows(len(batch["input_ids"]))
    return {k: v[rows] for k, v in batch.items()}


def _gather(tree: Any) -> Any:
    if jax.process_count() == 1:
        return sharding.to_host(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def train(config: config_lib.Config, run_dir: str, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, on_step: Callable[[int], None] | None = None) -> RunResult:
    """Train a drafter as ``config`` says, writing the run directory (module docstring).

    ``resume``: continue from the newest good checkpoint in ``RUN/checkpoints`` (a fresh start if there is
    none); the config fingerprint must match. ``overwrite``: replace a previous run (only a directory with
    :data:`RUN_MARKERS`). ``progress``: tqdm bar on stderr. ``on_step(step)``: called after every step (tests
    inject interrupts with it). SIGINT (Ctrl-C) ends the current step, saves a checkpoint and returns with
    ``interrupted=True``; a second SIGINT kills the process at once. The run directory is locked
    (:class:`dflash_jax.paths.DirLock`) for the whole call; :class:`DivergedError` after
    ``train.max_consecutive_skips`` consecutive skipped updates.
    """
    run_dir = os.path.abspath(run_dir)
    main = jax.process_index() == 0
    if main:
        check_run_dir(run_dir, resume=resume, overwrite=overwrite)  # refuse before creating the lock file
    with paths.DirLock(run_dir, jax.process_index()), _SigintFlag() as sigint:
        if main:
            prepare_run_dir(run_dir, resume=resume, overwrite=overwrite)
        return _train(config, run_dir, resume=resume, progress=progress, on_step=on_step, sigint=sigint)


def _train(config: config_lib.Config, run_dir: str, *, resume: bool, progress: bool,
           on_step: Callable[[int], None] | None, sigint: _SigintFlag) -> RunResult:
    """:func:`train` inside the run-directory lock and the SIGINT handler."""
    main = jax.process_index() == 0
    t0 = time.perf_counter()
    tc = config.train

    target = build_target(config.target)
    config_lib.validate_runtime(config, jax.device_count(), target.config.vocab_size, target.config.num_layers)
    renderer = chat.ChatRenderer.from_target(target, config.data.chat_template)
    mask_id = resolve_mask_token_id(config.draft.mask_token_id, target, renderer)
    draft_cfg = build_draft_config(config, target, mask_id)
    log.info("target %r; drafter %s; mask_token_id %d", target, draft_cfg, mask_id)

    if tc.mode == "online":
        iterator = pipeline.build_iterator(config.data, renderer)
        heldout = iterator.dataset.heldout
    else:
        iterator = features.FeatureReader(tc.features_dir, layer_ids=draft_cfg.target_layer_ids,
                                          hidden_size=draft_cfg.hidden_size, batch_size=config.data.batch_size,
                                          seq_len=config.data.seq_len, with_teacher_hidden=config.loss.kd,
                                          seed=config.data.shuffle_seed)
        heldout = pipeline.build_dataset(config.data.path, renderer, seq_len=config.data.seq_len,
                                         fmt=config.data.format, max_conversations=1,
                                         heldout=config.data.heldout).heldout
    prompts = (eval_prompts(renderer, heldout, config.eval.num_prompts, config.eval.prompt_len)
               if tc.eval_every and config.eval.num_prompts else [])

    mesh = sharding.make_mesh(config.mesh.shape)
    tx, schedule = optim.optimizer_from_config(tc)
    draft = new_draft(draft_cfg, tc, config.draft.init)
    _, state, shardings = step_lib.init_train_state(draft, tx, mesh)
    step_fn = step_lib.TrainStep(draft=draft, state_shardings=shardings, target=target.model, tx=tx,
                                 schedule=schedule, cfg=step_lib.step_config_from(config, draft_cfg), mesh=mesh)
    key = jax.random.key(tc.seed)
    ckpt = ckpt_lib.Checkpointer(os.path.join(run_dir, CHECKPOINT_DIR), save_every=tc.checkpoint_every,
                                 keep=tc.keep_checkpoints, fingerprint=fingerprint(config, draft_cfg))
    window: list[dict[str, Any]] = []
    start = 0
    guard = _SkipGuard(tc.max_consecutive_skips, tc)
    if resume and ckpt.latest_step() is not None:
        state, meta = ckpt.restore(step_lib.abstract_state(state, shardings))
        start, key = meta["step"], meta["rng"]
        iterator.restore(meta["data_state"]["iterator"])
        window = list(meta["data_state"]["window"])
        guard.count = meta["data_state"].get("consecutive_skips", 0)
        log.info("resumed from step %d", start)
    elif resume:
        log.warning("--resume: no complete checkpoint in %s; starting from step 0", run_dir)
    if main:
        _truncate_metrics(run_dir, start)
        config_lib.save_resolved(config, run_dir)
        with open(os.path.join(run_dir, DRAFT_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(export_lib.config_to_json(draft_cfg, "float32"), f, indent=2)
        write_heldout(os.path.join(run_dir, HELDOUT_FILE), heldout)

    sink = _MetricsSink(run_dir, main)
    bar = None
    if progress and main:
        from tqdm import tqdm

        bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    pending: list[tuple[Any, dict[str, Any], int]] = []  # device metrics not yet fetched
    step, last, interrupted, state_valid = start, None, False, True
    t_window = time.perf_counter()

    def drain() -> None:
        new = [_host_step_metrics(m, s, n) for m, s, n in pending]
        pending.clear()
        window.extend(new)
        guard.observe(new)

    def save(force: bool) -> None:
        drain()
        guard.check(step)  # never checkpoint a diverged state
        ckpt.save(state, data_state={"iterator": iterator.state(), "window": window,
                                     "consecutive_skips": guard.count}, rng=key, force=force)

    try:
        while step < tc.steps and not sigint.raised:
            batch, stats = iterator.next()
            tokens = int((batch["segment_ids"] > 0).sum())
            state_valid = False
            state, metrics = step_fn(state, _process_rows(batch), key)
            state_valid = True
            step += 1
            pending.append((metrics, stats, tokens))
            if step % tc.log_every == 0 or step == tc.steps:
                drain()
                now = time.perf_counter()
                last = window_record(step, window, now - t_window, now - t0)
                window.clear()
                t_window = now
                sink.write(last)
                guard.check(step)
                if bar is not None and last["loss"] is not None:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", acc=f"{last['accuracy']:.3f}",
                                    tau=f"{last['simulated_tau']:.3f}", tok_s=f"{last['tokens_per_s'] or 0:.0f}")
            if prompts and (step % tc.eval_every == 0 or step == tc.steps):
                res = run_eval(target, draft_cfg, state.params, prompts, config.eval, seed=tc.seed)
                sink.write({"step": step, "eval_tau": res["tau"], "eval_speedup": res["speedup"],
                            "eval_num_prompts": res["num_prompts"],
                            "eval_per_position_acceptance": res["per_position_acceptance"],
                            "eval_tokens_per_s_spec": res["tokens_per_s_spec"],
                            "eval_tokens_per_s_plain": res["tokens_per_s_plain"]})
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
    if main:
        if not interrupted:
            export_dir = str(export_lib.export_draft(draft_cfg, _gather(state.params), os.path.join(run_dir, EXPORT_DIR)))
        from dflash_jax.train import plots

        plot_paths = tuple(plots.write_plots(read_metrics(run_dir), os.path.join(run_dir, PLOTS_DIR)))
    if interrupted:
        log.warning("interrupted at step %d; checkpoint saved in %s; continue with --resume", step, run_dir)
    return RunResult(run_dir=run_dir, step=step, interrupted=interrupted, last=last, export_dir=export_dir,
                     plots=plot_paths)
