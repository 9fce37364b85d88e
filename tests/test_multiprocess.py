"""Two real JAX processes on one machine (gloo CPU collectives, 2 simulated devices each) run ``dflash-jax train``
through ``scripts/multiprocess_cpu.sh`` (the documented JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID variables): both exit 0, and the per-step losses, in-training eval and the export equal those of a
1-process run on 4 devices with the same mesh (same program, same shapes; collectives reduce in another order,
hence the loss tolerance of 1e-6 relative and the one-bf16-ulp export tolerance)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy for safetensors.numpy)
import numpy as np
import pytest
import safetensors.numpy

from dflash_jax import cli
from train_fixtures import store_contents

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "multiprocess_cpu.sh")
TIMEOUT_S = 900
# 4 steps, a checkpoint at step 2, an in-training eval at steps 2 and 4, metrics every step.
SHORT = [
    "--set",
    "train.steps=4",
    "--set",
    "train.log_every=1",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "train.eval_every=2",
    "--set",
    "eval.num_prompts=1",
    "--set",
    "eval.max_new_tokens=4",
]


def _env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"))
    }
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_one_process(run_dir, args) -> None:
    """``dflash-jax train`` as one process on 4 simulated CPU devices."""
    env = dict(_env(), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "dflash_jax.cli",
            "train",
            "--config",
            "tiny",
            "--run-dir",
            str(run_dir),
            "--no-progress",
            *args,
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


def _two_processes(argv, logs) -> None:
    """``dflash-jax ARGV`` as 2 processes x 2 simulated CPU devices; both must exit 0."""
    env = dict(_env(), PYTHON=sys.executable)
    cmd = ["bash", SCRIPT, "-n", "2", "-d", "2", "-p", str(_free_port()), "-l", str(logs), "--", *argv]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    tails = "\n".join(open(os.path.join(logs, f)).read()[-2000:] for f in sorted(os.listdir(logs)))
    assert proc.returncode == 0, proc.stderr + tails


def _train_two_processes(run_dir, args, logs) -> None:
    """``dflash-jax train`` as 2 processes x 2 simulated CPU devices; both must exit 0."""
    _two_processes(["train", "--config", "tiny", "--run-dir", str(run_dir), "--no-progress", *args], logs)
    for i in (0, 1):  # each process printed its summary: it reached the end
        summary = json.loads(open(os.path.join(logs, f"process{i}.log")).read().strip().splitlines()[-1])
        assert summary["step"] == 4 and not summary["interrupted"]


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = {r["step"]: r["loss"] for r in records if "loss" in r}
    evals = {r["step"]: r["eval_tau"] for r in records if "eval_tau" in r}
    return steps, evals


def _assert_same_run(ref_dir, run_dir) -> None:
    ref_loss, ref_eval = _records(ref_dir)
    loss, evals = _records(run_dir)
    assert sorted(loss) == [1, 2, 3, 4] and sorted(ref_loss) == [1, 2, 3, 4]
    # 1e-6 relative to the loss (about 8 fp32 ulps): measured 0 online (mesh [2,2,1]) and at most 1.5e-7 (2 ulps
    # of 6.25, the batch-mean's sum over 4 fsdp shards in gloo's order) offline (mesh [1,4,1]).
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=0)
    assert sorted(evals) == [2, 4] and evals == pytest.approx(ref_eval, abs=1e-6)
    # The bf16 export: byte-equal when the reductions round alike; gloo sums the fsdp gradient shards in another
    # order than the in-process collectives, which can move an fp32 master weight across a bf16 rounding
    # boundary: at most one bf16 ulp (2^-7 relative) on at most 0.1% of the elements.
    ref = safetensors.numpy.load_file(os.path.join(ref_dir, "export", "model.safetensors"))
    out = safetensors.numpy.load_file(os.path.join(run_dir, "export", "model.safetensors"))
    assert sorted(ref) == sorted(out)
    for k, a in ref.items():
        a, b = a.astype(np.float32), out[k].astype(np.float32)
        assert np.all(np.abs(a - b) <= 2.0**-7 * np.maximum(np.abs(a), np.abs(b))), k
        assert np.mean(a != b) <= 1e-3, k


def test_two_processes_online_equal_one_process_with_eval_checkpoint_and_resume(tmp_path):
    # 16 records per store part: both processes prepare parts of RUN/data (part k by process k % 2)
    args = [*SHORT, "--set", "mesh.shape=[2,2,1]", "--set", "data.shard_records=16"]
    _train_one_process(tmp_path / "ref", args)
    run = tmp_path / "run"
    _train_two_processes(run, args, tmp_path / "logs")
    _assert_same_run(tmp_path / "ref", run)
    assert sorted(os.listdir(run / "checkpoints")) == ["2", "4"]

    # --resume from the step-2 checkpoint: steps 3 and 4 again, on both processes, same numbers.
    shutil.rmtree(run / "checkpoints" / "4")
    shutil.rmtree(run / "export")
    _train_two_processes(run, ["--resume", *args], tmp_path / "logs_resume")
    assert "resumed from step 2" in open(tmp_path / "logs_resume" / "process1.log").read()
    _assert_same_run(tmp_path / "ref", run)


def test_two_processes_offline_equal_one_process(tmp_path, capsys):
    feats = str(tmp_path / "features")
    assert (
        cli.main(["dump-features", "--config", "tiny", "--out", feats, "--set", "train.steps=4", "--dtype", "float32"])
        == 0
    )
    capsys.readouterr()
    args = [
        *SHORT,
        "--set",
        "mesh.shape=[1,4,1]",
        "--set",
        "train.mode=offline",
        "--set",
        f"train.features_dir={feats}",
    ]
    _train_one_process(tmp_path / "ref", args)
    _train_two_processes(tmp_path / "run", args, tmp_path / "logs")
    _assert_same_run(tmp_path / "ref", tmp_path / "run")


def test_two_processes_prepare_one_store_byte_equal_to_one_process(tmp_path, capsys):
    """``dflash-jax prepare`` on 2 processes, each writing its parts (part k by process k % 2) of one store with
    one manifest: every array byte-equal and every record equal (but for the files' mtimes) to one process's."""
    args = ["--workers", "1", "--set", "data.max_conversations=48", "--set", "data.shard_records=8"]
    ref = tmp_path / "ref"
    assert cli.main(["prepare", "--config", "tiny", "--out", str(ref), *args]) == 0
    capsys.readouterr()
    out = tmp_path / "two"
    _two_processes(["prepare", "--config", "tiny", "--out", str(out), *args], tmp_path / "logs")
    for i, mine in ((0, 4), (1, 3)):  # 7 parts of 8 records (52 selected records and 2 skips)
        assert f"process {i} of 2 wrote {mine} parts of 7" in open(tmp_path / "logs" / f"process{i}.log").read()
    assert store_contents(out) == store_contents(ref)
