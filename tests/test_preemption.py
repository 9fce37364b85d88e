"""Preemption as a cluster does it: SIGTERM sent from outside to a running ``dflash-jax train`` (1 process, and
1 of 2 jax.distributed processes over gloo). The run finishes the step, saves a checkpoint at the stop step, exits
128 + SIGTERM = 143 (every process at the same step: they agree through a collective flag), and ``--resume``
reaches the end with metrics and export equal, byte for byte, to an uninterrupted run of the same processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

from dflash_jax.train import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 900
STEPS = 200  # long enough that the signal, sent after step 2 is logged, lands well before the end
ARGS = [
    "--set",
    f"train.steps={STEPS}",
    "--set",
    "train.log_every=1",
    "--set",
    "train.checkpoint_every=100000",  # the only checkpoint is the one the signal writes
    "--set",
    "train.eval_every=0",
    "--set",
    "train.stop_check_every=1",
]


def _env(devices: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "XLA_FLAGS"))
    }
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir, processes: int, logs, extra=()) -> list[subprocess.Popen]:
    """``dflash-jax train --config tiny`` as ``processes`` processes x 2 CPU devices (mesh all data-parallel)."""
    port = _free_port()
    os.makedirs(logs, exist_ok=True)
    procs = []
    for i in range(processes):
        env = _env(2)
        if processes > 1:
            env.update(
                JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES=str(processes),
                JAX_PROCESS_ID=str(i),
            )
        cmd = [sys.executable, "-m", "dflash_jax.cli", "train", "--config", "tiny", "--run-dir", str(run_dir)]
        cmd += ["--no-progress", *ARGS, "--set", f"mesh.shape=[{2 * processes},1,1]", *extra]
        log = open(os.path.join(logs, f"process{i}.log"), "w")
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    return procs


def _wait(procs, logs) -> list[int]:
    codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    if any(c not in (0, 128 + signal.SIGTERM) for c in codes):
        tails = "\n".join(open(os.path.join(logs, f)).read()[-3000:] for f in sorted(os.listdir(logs)))
        raise AssertionError(f"exit codes {codes}\n{tails}")
    return codes


def _logged_step(run_dir) -> int:
    path = os.path.join(run_dir, rundir.METRICS_FILE)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
    return max(steps, default=0)


def _untimed(run_dir):
    return [{k: v for k, v in r.items() if k not in rundir.TIMING_KEYS} for r in rundir.read_metrics(run_dir)]


def _export_bytes(run_dir) -> bytes:
    with open(os.path.join(run_dir, rundir.EXPORT_DIR, "model.safetensors"), "rb") as f:
        return f.read()


def _preempt_then_resume_equals_uninterrupted(tmp_path, processes: int, victim: int) -> None:
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert _wait(_launch(ref, processes, tmp_path / "logs_ref"), tmp_path / "logs_ref") == [0] * processes

    procs = _launch(run, processes, tmp_path / "logs_run")
    deadline = time.monotonic() + TIMEOUT_S
    while _logged_step(run) < 2:  # training is under way (compiled, stepping)
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.02)
    procs[victim].send_signal(signal.SIGTERM)  # one process only: the others learn it through the collective
    assert _wait(procs, tmp_path / "logs_run") == [128 + signal.SIGTERM] * processes
    saved = sorted(int(s) for s in os.listdir(run / rundir.CHECKPOINT_DIR))
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved  # the stop step's checkpoint, nothing else
    for i in range(processes):  # every process stopped at that same step
        summary = json.loads(open(tmp_path / "logs_run" / f"process{i}.log").read().strip().splitlines()[-1])
        assert summary["step"] == saved[0] and summary["interrupted"] and summary["stop_signal"] == "SIGTERM"
    assert _logged_step(run) == saved[0]

    logs = tmp_path / "logs_resume"
    assert _wait(_launch(run, processes, logs, ["--resume"]), logs) == [0] * processes
    assert _untimed(run) == _untimed(ref)
    assert _export_bytes(run) == _export_bytes(ref)


def test_sigterm_one_process_checkpoints_exits_143_and_resumes_bit_exactly(tmp_path):
    _preempt_then_resume_equals_uninterrupted(tmp_path, processes=1, victim=0)


def test_sigterm_to_one_of_two_processes_stops_both_at_one_step_and_resumes_bit_exactly(tmp_path):
    _preempt_then_resume_equals_uninterrupted(tmp_path, processes=2, victim=1)
