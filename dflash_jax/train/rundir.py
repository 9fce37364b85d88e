"""The run directory: its layout, creation, and the config / held-out / metrics files in it.

Run directory layout (``RUN``)::

    RUN/config.yaml          the resolved config, mask token id included (what ``--resume`` reloads)
    RUN/draft_config.json    the resolved drafter config (export ``config.json`` format)
    RUN/heldout.jsonl        held-out conversations (never trained on; ``dflash-jax eval`` prompts)
    RUN/metrics.jsonl        one JSON object per logged step (see :data:`METRIC_KEYS`) and per eval
    RUN/checkpoints/<step>/  Orbax checkpoints (params, optimizer, data position, PRNG key, SHA-256 manifest)
    RUN/export/              the final drafter (``config.json`` + ``model.safetensors``, z-lab / vLLM / SGLang)
    RUN/plots/*.png          loss and simulated tau vs step, per-position acceptance, D-PACE weights per position
    RUN/tb/                  TensorBoard events (only when a SummaryWriter is importable)
    RUN/.lock.<process>      the run-directory lock of each writing process (dflash_jax.paths.DirLock)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import yaml

from dflash_jax import config as config_lib
from dflash_jax import export as export_lib
from dflash_jax import paths
from dflash_jax.data import readers
from dflash_jax.models.draft import DraftConfig

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

METRIC_KEYS = (
    "step",
    "loss",
    "accuracy",
    "simulated_tau",
    "accept_length",
    "tokens_per_s",
    "skipped_samples",
    "split_conversations",
    "truncated_conversations",
    "lr",
    "grad_norm",
    "real_token_fraction",
    "position_accuracy",
    "position_weight_mean",
    "skipped_updates",
    "skipped_steps",
    "epoch",
    "elapsed_s",
)
TIMING_KEYS = ("tokens_per_s", "elapsed_s", "eval_speedup", "eval_tokens_per_s_spec", "eval_tokens_per_s_plain")


def check_run_dir(run_dir: str, *, resume: bool, overwrite: bool) -> bool:
    """Refuse (ValueError, nothing touched) a non-empty ``run_dir`` (lock files aside) unless ``resume`` or
    ``overwrite``; ``overwrite`` accepts only a real directory holding :data:`RUN_MARKERS`. Returns whether
    ``run_dir`` holds a previous run that ``overwrite`` must delete."""
    if resume and overwrite:
        raise ValueError("--resume and --overwrite are exclusive")
    if resume or not os.path.isdir(run_dir) or all(paths.is_lock_file(n) for n in os.listdir(run_dir)):
        return False
    if not overwrite:
        raise ValueError(f"run dir {run_dir!r} is not empty; pass --resume to continue it or --overwrite to replace it")
    paths.check_clearable(run_dir, RUN_MARKERS)
    return True


def prepare_run_dir(run_dir: str, *, resume: bool, overwrite: bool, own_lock: str | None = None) -> None:
    """:func:`check_run_dir`, then delete a previous run when ``overwrite`` (its lock files stay; refused while a
    process other than the caller, whose lock file is ``own_lock``, holds one) and create ``run_dir``."""
    if check_run_dir(run_dir, resume=resume, overwrite=overwrite):
        paths.clear_run_dir(run_dir, RUN_MARKERS, own_lock)
    os.makedirs(run_dir, exist_ok=True)


def is_run_dir(path: str) -> bool:
    """Whether ``path`` holds a training run's ``config.yaml``."""
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def save_resolved(config: config_lib.Config, run_dir: str | os.PathLike) -> str:
    """Write the fully resolved ``config`` to ``run_dir/config.yaml`` atomically (a temporary file renamed over
    it: a process killed while writing leaves the previous file, never a truncated one); returns the path."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, CONFIG_FILE)
    with paths.atomic_open(path) as f:
        yaml.safe_dump(config_lib.to_dict(config), f, sort_keys=False, default_flow_style=None)
    return path


def write_run_files(
    run_dir: str, config: config_lib.Config, draft_cfg: DraftConfig, heldout: Sequence[readers.Conversation]
) -> None:
    """``config.yaml`` (with the resolved ``draft.mask_token_id``), ``draft_config.json`` and ``heldout.jsonl``, each
    written atomically."""
    resolved = dataclasses.replace(config.draft, mask_token_id=draft_cfg.mask_token_id)
    save_resolved(dataclasses.replace(config, draft=resolved), run_dir)
    with paths.atomic_open(os.path.join(run_dir, DRAFT_CONFIG_FILE)) as f:
        json.dump(export_lib.config_to_json(draft_cfg, "float32"), f, indent=2)
    write_heldout(os.path.join(run_dir, HELDOUT_FILE), heldout)


def write_heldout(path: str, conversations: Sequence[readers.Conversation]) -> None:
    """``conversations`` as OpenAI-style JSONL records (``dflash-jax eval`` reads them back), written atomically."""
    with paths.atomic_open(path) as f:
        for conv in conversations:
            f.write(json.dumps({"messages": [{"role": r, "content": t} for r, t in conv]}, ensure_ascii=False) + "\n")


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


def truncate_metrics(run_dir: str, step: int) -> None:
    """Keep only the records of steps <= ``step`` (a resume recomputes the rest)."""
    path = os.path.join(run_dir, METRICS_FILE)
    keep = [r for r in read_metrics(run_dir) if r["step"] <= step]
    with paths.atomic_open(path) as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)


class MetricsSink:
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
