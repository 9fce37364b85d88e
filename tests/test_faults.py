"""Faults a user meets, reproduced through the CLI on configs/tiny.yaml, each asserted harmless.

kill -9 mid-run then --resume (bit-identical to an uninterrupted run); damaged newest checkpoint (fall back with a
warning naming the step); a taken quarantine name and leftovers of killed writers; a torn last metrics line; two
trainers / an export on one running run (lock naming the holder's PID); a double Ctrl-C (killed at once, the newest
complete checkpoint usable); a diverging run (exit 4 naming train.lr / train.clip_norm, skipped steps logged as
skipped); output paths that hold user data; --overwrite on a foreign or symbolic-linked directory; a garbage
model.safetensors. Training runs are subprocesses on one CPU device; the fast checks call ``cli.main``.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dflash_jax import cli, paths
from dflash_jax.train import checkpoint as ck
from dflash_jax.train import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
STEPS, CKPT, LOG = 40, 10, 5
SETS = {"train.steps": STEPS, "train.checkpoint_every": CKPT, "train.log_every": LOG, "data.max_conversations": 32}
TINY = ["--config", "tiny", "--no-progress", *[a for k, v in SETS.items() for a in ("--set", f"{k}={v}")]]
WEIGHTS = os.path.join(rundir.EXPORT_DIR, "model.safetensors")


def _cmd(*args):
    return [sys.executable, "-m", "dflash_jax.cli", *map(str, args)]


def _run(*args):
    return subprocess.run(_cmd(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"process exited early with {proc.returncode}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _untimed(run):
    return [{k: v for k, v in r.items() if k not in rundir.TIMING_KEYS} for r in rundir.read_metrics(str(run))]


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tree(d):
    """Every file under ``d`` but lock files, with its size and modification time (what a refused command must
    not change)."""
    return sorted(
        (
            os.path.relpath(os.path.join(r, f), d),
            os.path.getsize(os.path.join(r, f)),
            os.path.getmtime(os.path.join(r, f)),
        )
        for r, _, fs in os.walk(d)
        for f in fs
        if not paths.is_lock_file(f)
    )


def _copy(run, dest):
    shutil.copytree(run, dest, symlinks=True)
    return str(dest)


def _ckpt(run, step, *parts):
    return os.path.join(run, rundir.CHECKPOINT_DIR, str(step), *parts)


def _largest_data_file(step_dir):
    """The largest OCDBT data file of the step's params."""
    files = [
        os.path.join(r, f)
        for r, _, fs in os.walk(os.path.join(step_dir, "params"))
        for f in fs
        if os.sep + "d" + os.sep in os.path.join(r, f) + os.sep and "ocdbt" in r
    ]
    return max(files, key=os.path.getsize)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An uninterrupted run: checkpoints 30 and 40, metrics, export."""
    run = str(tmp_path_factory.mktemp("faults") / "base")
    r = _run("train", *TINY, "--run-dir", run)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(run, rundir.CHECKPOINT_DIR))) == ["30", "40"]
    return run


def _kill_9_when(args, predicate, err_path):
    """Start ``dflash-jax ARGS`` (stderr to ``err_path``), SIGKILL it once ``predicate()`` holds."""
    with open(err_path, "w") as err:
        proc = subprocess.Popen(_cmd(*args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_for(predicate, proc)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed while running, not finished


def test_kill_9_then_resume_is_bit_identical(base, tmp_path):
    """SIGKILL right after checkpoint 20 commits (mid-run, while saves and deletions go on), SIGKILL again while the
    resumed run starts (restore, compile), then --resume: every metric and every exported byte equals the
    uninterrupted run's."""
    run = str(tmp_path / "run")
    _kill_9_when(["train", *TINY, "--run-dir", run], lambda: ck.is_complete_step_dir(_ckpt(run, 20)), tmp_path / "1")
    assert not os.path.exists(os.path.join(run, rundir.EXPORT_DIR))
    resumed = tmp_path / "2"
    _kill_9_when(
        ["train", "--run-dir", run, "--resume", "--no-progress"],
        lambda: "resumed from step" in resumed.read_text(),
        resumed,
    )
    r = _run("train", "--run-dir", run, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stderr
    assert _untimed(run) == _untimed(base)
    assert _sha(os.path.join(run, WEIGHTS)) == _sha(os.path.join(base, WEIGHTS))


@pytest.fixture(scope="module")
def damaged_resume(base, tmp_path_factory):
    """--resume of a copy of ``base`` whose newest checkpoint (40) has 64 zeroed bytes inside an OCDBT data file,
    whose quarantine name 40.corrupt is taken, with leftovers of killed writers and a torn last metrics line."""
    run = _copy(base, tmp_path_factory.mktemp("damaged") / "run")
    data = _largest_data_file(_ckpt(run, 40))
    with open(data, "r+b") as f:
        f.seek(os.path.getsize(data) // 2)
        f.write(bytes(64))
    ckpts = os.path.join(run, rundir.CHECKPOINT_DIR)
    for leftover in ("40.corrupt", "35/params", "30.incomplete/params", "50.orbax-checkpoint-tmp/params"):
        os.makedirs(os.path.join(ckpts, leftover))
        with open(os.path.join(ckpts, leftover, "x"), "w") as f:
            f.write("partial")
    with open(os.path.join(run, rundir.METRICS_FILE), "a") as f:
        f.write('{"step": 45, "loss": 6.1, "accur')
    r = _run("train", "--run-dir", run, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    return run, r.stderr


def test_damaged_checkpoint_falls_back_to_the_previous_one(base, damaged_resume):
    run, err = damaged_resume
    assert "checkpoint step 40" in err and "does not match its SHA-256" in err and "resumed from step 30" in err
    assert _untimed(run) == _untimed(base)
    assert _sha(os.path.join(run, WEIGHTS)) == _sha(os.path.join(base, WEIGHTS))


def test_taken_quarantine_name_and_leftovers_are_handled(damaged_resume):
    run, err = damaged_resume
    ckpts = os.path.join(run, rundir.CHECKPOINT_DIR)
    assert sorted(os.listdir(ckpts)) == ["30", "40", "40.corrupt", "40.corrupt.1"]
    assert "set aside as" in err and "40.corrupt.1" in err
    for leftover in ("35", "30.incomplete", "50.orbax-checkpoint-tmp"):
        assert f"deleting {leftover}" in err


def test_torn_last_metrics_line_is_dropped(damaged_resume, tmp_path):
    run, err = damaged_resume
    assert "dropping the torn last line" in err and rundir.METRICS_FILE in err
    with open(os.path.join(run, rundir.METRICS_FILE)) as f:
        assert all(json.loads(line) for line in f)
    (tmp_path / rundir.METRICS_FILE).write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # not the last line
    with pytest.raises(ValueError, match=f"{rundir.METRICS_FILE} line 2 is not a JSON record"):
        rundir.read_metrics(str(tmp_path))


@pytest.mark.parametrize("damage", ["zeroed_bytes", "truncated_data", "missing_params_metadata", "truncated_meta"])
def test_export_skips_a_damaged_checkpoint(base, tmp_path, caplog, capsys, damage):
    run = _copy(base, tmp_path / "run")
    path = {
        "zeroed_bytes": _largest_data_file(_ckpt(run, 40)),
        "truncated_data": _largest_data_file(_ckpt(run, 40)),
        "missing_params_metadata": _ckpt(run, 40, "params", "_METADATA"),
        "truncated_meta": _ckpt(run, 40, "meta", "metadata"),
    }[damage]
    if damage == "missing_params_metadata":
        os.remove(path)
    elif damage == "zeroed_bytes":
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(bytes(64))
    else:
        os.truncate(path, os.path.getsize(path) // 2)
    assert cli.main(["export", "--run-dir", run, "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 30
    assert "checkpoint step 40" in caplog.text and "damaged" in caplog.text
    assert cli.main(["export", "--run-dir", run, "--out", str(tmp_path / "out40"), "--step", "40"]) == 2
    assert "checkpoint step 40" in capsys.readouterr().err and not os.path.exists(tmp_path / "out40")


def test_one_trainer_per_run_and_double_ctrl_c(tmp_path, capsys):
    """A second trainer and an export into a running run are refused naming the holder's PID (the winner's
    metrics stay intact); Ctrl-C twice kills the trainer at once without a traceback; the newest complete
    checkpoint then exports."""
    run = tmp_path / "run"
    err_path = tmp_path / "stderr.txt"
    metrics = run / rundir.METRICS_FILE
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            _cmd(
                "train",
                "--config",
                "tiny",
                "--set",
                "train.steps=100000",
                "--set",
                "train.log_every=1",
                "--set",
                f"train.checkpoint_every={CKPT}",
                "--set",
                "data.max_conversations=32",
                "--no-progress",
                "--run-dir",
                run,
            ),
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    try:
        _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) > CKPT + 1, proc)
        second = _run("train", "--run-dir", run, "--resume", "--no-progress")
        assert second.returncode == 2 and f"is in use by process {proc.pid}" in second.stderr
        assert cli.main(["export", "--run-dir", str(run), "--out", str(run / "export2")]) == 2
        assert f"is in use by process {proc.pid}" in capsys.readouterr().err
        steps = [r["step"] for r in rundir.read_metrics(str(run))]
        assert steps == list(range(1, len(steps) + 1))
        proc.send_signal(signal.SIGINT)
        _wait_for(lambda: "interrupt received" in err_path.read_text(), proc)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = err_path.read_text()
    assert proc.returncode == -signal.SIGINT and out == ""  # killed by the signal: no summary, no cleanup
    assert "Traceback" not in log and " ERROR " not in log
    assert cli.main(["export", "--run-dir", str(run), "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] >= CKPT


def test_dump_features_refuses_a_locked_directory(tmp_path, capsys):
    out = tmp_path / "features"
    with paths.DirLock(str(out)):
        assert (
            cli.main(
                [
                    "dump-features",
                    "--config",
                    "tiny",
                    "--set",
                    "data.max_conversations=32",
                    "--out",
                    str(out),
                    "--max-rows",
                    "4",
                ]
            )
            == 2
        )
    assert f"is in use by process {os.getpid()}" in capsys.readouterr().err
    assert os.listdir(out) == [".lock.0"]


def test_divergence_stops_with_exit_4_naming_lr_and_clip(tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--config",
                "tiny",
                "--set",
                "mesh.shape=[2,2,2]",
                "--set",
                "train.lr=1e30",
                "--set",
                "train.steps=10",
                "--set",
                "train.log_every=5",
                "--set",
                "data.max_conversations=32",
                "--run-dir",
                str(run),
                "--no-progress",
            ]
        )
        == cli.EXIT_DIVERGED
    )
    err = capsys.readouterr().err
    assert "error: training diverged" in err and "train.lr=1e+30" in err and "train.clip_norm=1.0" in err
    assert not (run / rundir.EXPORT_DIR).exists() and os.listdir(run / rundir.CHECKPOINT_DIR) == []
    last = rundir.read_metrics(str(run))[-1]
    assert last["step"] == 10 and last["skipped_steps"] == 5 and last["loss"] is None
    assert last["skipped_updates"] >= 5


def test_export_and_import_never_replace_user_data(base, tmp_path, capsys):
    run = _copy(base, tmp_path / "run")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    plain = tmp_path / "file.txt"
    plain.write_text("keep me too")
    before = {d: _tree(d) for d in (run, str(notes))}
    refused = {
        run: "is or contains",
        str(tmp_path): "is or contains",
        str(notes): "not a previous export",
        str(plain): "not a directory",
        os.path.join(run, rundir.CHECKPOINT_DIR): "not a previous export",
    }
    for out, why in refused.items():
        assert cli.main(["export", "--run-dir", run, "--out", out]) == 2, out
        assert why in capsys.readouterr().err, out
    assert cli.main(["import", os.path.join(run, rundir.EXPORT_DIR), "--out", str(notes)]) == 2
    assert "not a previous export" in capsys.readouterr().err
    assert {d: _tree(d) for d in (run, str(notes))} == before and plain.read_text() == "keep me too"
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", os.path.join(run, rundir.EXPORT_DIR)):  # the last: replaced
        assert cli.main(["export", "--run-dir", run, "--out", str(out)]) == 0
        assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert cli.main(["import", str(tmp_path / "new"), "--out", str(tmp_path / "new")]) == 0


def test_garbage_safetensors_and_overwrite_refusals_are_error_lines(base, tmp_path, capsys):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    shutil.copy(os.path.join(base, rundir.EXPORT_DIR, "config.json"), garbage)
    (garbage / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    assert cli.main(["import", str(garbage)]) == 2
    assert "model.safetensors is not a readable safetensors file" in capsys.readouterr().err
    foreign = tmp_path / "P"
    (foreign / "src").mkdir(parents=True)
    (foreign / rundir.CONFIG_FILE).write_text("db: prod\n")
    assert cli.main(["train", *TINY, "--run-dir", str(foreign), "--overwrite"]) == 2
    assert "not a dflash-jax run directory" in capsys.readouterr().err
    assert sorted(os.listdir(foreign)) == [rundir.CONFIG_FILE, "src"]
    victim = _copy(base, tmp_path / "victim")
    before = _tree(victim)
    link = tmp_path / "link"
    link.symlink_to(victim)
    assert cli.main(["train", *TINY, "--run-dir", str(link), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link; refusing to delete through it" in err and "Traceback" not in err
    assert _tree(victim) == before


def test_overwrite_refuses_while_another_process_holds_a_lock_of_the_run(tmp_path):
    """A peer process of another run holds ``.lock.1`` (its process 0 gone): ``--overwrite`` by a new 1-process run
    (its own ``.lock.0``) deletes nothing and names the holder's PID; once the holder exits it proceeds, the lock
    files kept."""
    run = tmp_path / "run"
    run.mkdir()
    for name in (*rundir.RUN_MARKERS, rundir.METRICS_FILE):
        (run / name).write_text("{}\n")
    code = f"from dflash_jax import paths; l = paths.DirLock({str(run)!r}, 1).acquire(); print('held', flush=True); input()"
    pipe = subprocess.PIPE
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=ENV, stdin=pipe, stdout=pipe, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _tree(run)
        with paths.DirLock(str(run)) as own:
            with pytest.raises(paths.DirLockedError, match=f"in use by process {holder.pid}"):
                rundir.prepare_run_dir(str(run), resume=False, overwrite=True, own_lock=own.path)
        assert _tree(run) == before
    finally:
        holder.communicate("\n", timeout=60)
    with paths.DirLock(str(run)) as own:
        rundir.prepare_run_dir(str(run), resume=False, overwrite=True, own_lock=own.path)
    assert sorted(os.listdir(run)) == [".lock.0", ".lock.1"]


def test_run_files_are_written_atomically(tmp_path, monkeypatch):
    """A writer that fails mid-file (a kill while writing) leaves the previous heldout.jsonl, and no temp file."""
    path = str(tmp_path / rundir.HELDOUT_FILE)
    rundir.write_heldout(path, [(("user", "old"), ("assistant", "kept"))])
    old = open(path).read()

    def torn(*_, **__):
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", torn)
    with pytest.raises(OSError, match="disk full"):
        rundir.write_heldout(path, [(("user", "new"), ("assistant", "lost"))])
    assert open(path).read() == old and os.listdir(tmp_path) == [rundir.HELDOUT_FILE]
