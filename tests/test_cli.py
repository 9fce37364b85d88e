"""``dflash-jax`` CLI: --help for every option, train/export/import/eval/dump-features/offline train on the tiny
config, bad input (exit 2 naming the key), Ctrl-C in a real subprocess, and the README's Python example."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dflash_jax import cli
from dflash_jax import export as export_lib
from dflash_jax.train import run as run_lib
from dflash_jax.train import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "tiny", "--set", "mesh.shape=[2,2,2]", "--set", "data.max_conversations=32"]


def _last_json(capsys):
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_help_explains_every_option(capsys):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {
        "train",
        "eval",
        "export",
        "import",
        "dump-features",
        "compile",
        "regenerate",
        "prepare",
        "bench",
    }
    for name, p in sub.choices.items():
        for action in p._actions:
            assert action.help and len(action.help) > 10, f"{name} {action.option_strings or action.dest}"
        with pytest.raises(SystemExit) as e:
            cli.main([name, "--help"])
        assert e.value.code == 0
        assert "usage: dflash-jax " + name in capsys.readouterr().out


def test_bad_input_exits_2_naming_the_key(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--run-dir", str(tmp_path / "a"), "--set", "train.bogus=1"]) == 2
    assert "train.bogus" in capsys.readouterr().err
    assert cli.main(["train", *TINY, "--run-dir", str(tmp_path / "b"), "--set", "loss.alpha=1.5"]) == 2
    assert "loss.alpha" in capsys.readouterr().err
    assert cli.main(["train", "--config", "tiny", "--run-dir", str(tmp_path / "c")]) == 2  # 1x1x1 mesh, 8 devices
    assert "mesh.shape" in capsys.readouterr().err
    assert cli.main(["train", "--run-dir", str(tmp_path / "d")]) == 2
    assert "--config is required" in capsys.readouterr().err
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x").write_text("")
    assert cli.main(["train", *TINY, "--run-dir", str(tmp_path / "e")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["eval", "--draft", str(tmp_path / "e")]) == 2
    assert "neither a run directory" in capsys.readouterr().err
    blind = tmp_path / "blind.jinja"  # drops message contents: assistant spans cannot be found
    blind.write_text("{% for m in messages %}<{{ m['role'] }}>{% endfor %}")
    assert cli.main(["train", *TINY, "--run-dir", str(tmp_path / "f"), "--set", f"data.chat_template={blind}"]) == 2
    assert "set data.chat_template" in capsys.readouterr().err
    assert cli.main(["bench", "nope"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("cli") / "run")
    assert (
        cli.main(
            ["train", *TINY, "--run-dir", run, "--set", "train.steps=4", "--set", "train.log_every=2", "--no-progress"]
        )
        == 0
    )
    return run


def test_train_export_import_eval(tiny_run, tmp_path, capsys):
    records = rundir.read_metrics(tiny_run)
    assert [r["step"] for r in records] == [2, 4]
    out = str(tmp_path / "exp")
    assert cli.main(["export", "--run-dir", tiny_run, "--out", out, "--dtype", "float32"]) == 0
    summary = _last_json(capsys)
    assert summary["step"] == 4 and summary["config"]["architectures"] == ["DFlashDraftModel"]
    ckpt_params = run_lib.restore_params(tiny_run)[2]
    _, exp_params = export_lib.import_draft(out)
    for a, b in zip(jax.tree.leaves(ckpt_params), jax.tree.leaves(exp_params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # float32 export is exact

    copy = str(tmp_path / "copy")
    assert cli.main(["import", out, "--out", copy]) == 0
    summary = _last_json(capsys)
    assert summary["num_params"] > 0 and os.path.isfile(os.path.join(copy, "model.safetensors"))

    assert (
        cli.main(["eval", "--draft", tiny_run, "--max-new-tokens", "5", "--num-prompts", "2", "--check-lossless"]) == 0
    )
    result = _last_json(capsys)
    assert result["num_prompts"] == 2 and 1.0 <= result["tau"] <= 4 and result["speedup"] > 0
    assert result["lossless"] is True and os.path.isfile(os.path.join(tiny_run, "eval", "eval.json"))


def test_eval_flags_are_aliases_of_eval_keys(tiny_run, capsys):
    """eval's flags set eval.* keys of the run's config and meet the config's checks (the error names the key and
    the flag); --set reaches the same keys; --config replaces the run's config.yaml."""
    assert cli.main(["eval", "--draft", tiny_run, "--max-new-tokens", "0"]) == 2
    assert "eval.max_new_tokens must be >= 1, got 0 (set by --max-new-tokens)" in capsys.readouterr().err
    assert cli.main(["eval", "--draft", tiny_run, "--set", "eval.temperature=-1"]) == 2
    assert "eval.temperature must be >= 0, got -1.0" in capsys.readouterr().err
    assert cli.main(["eval", "--draft", tiny_run, "--config", "tiny", "--set", "eval.bogus=1"]) == 2
    assert "unknown config key eval.bogus" in capsys.readouterr().err
    assert cli.main(["eval", "--draft", tiny_run, "--num-prompts", "99"]) == 2  # the held-out set has fewer
    assert "eval.num_prompts must be in [0, data.heldout=" in capsys.readouterr().err


def test_dump_features_of_no_usable_conversation_fails_with_the_reasons(tmp_path, capsys):
    """A dump that would hold 0 rows is an error (status 2) naming data.path and each skip's reason."""
    data = tmp_path / "bad.jsonl"
    data.write_text('{not json\n{"messages": [{"role": "user", "content": "no answer"}]}\n')
    sets = ["--set", f"data.path={data}", "--set", "data.heldout=0"]
    assert cli.main(["dump-features", *TINY, *sets, "--out", str(tmp_path / "feats")]) == 2
    err = capsys.readouterr().err
    assert "gave no usable training conversation (skipped 2" in err
    assert "malformed JSON" in err and "no assistant turn" in err
    assert not (tmp_path / "feats" / "index.json").exists()


def test_dump_features_then_offline_train(tmp_path, capsys):
    feats = str(tmp_path / "feats")
    common = [*TINY, "--set", "train.steps=3"]
    assert cli.main(["dump-features", *common, "--out", feats, "--dtype", "float32", "--shard-size", "5"]) == 0
    index = _last_json(capsys)
    assert index["num_rows"] == 12 and index["complete"] and index["with_teacher_hidden"]
    run = str(tmp_path / "offline")
    assert (
        cli.main(
            [
                "train",
                *common,
                "--run-dir",
                run,
                "--set",
                "train.mode=offline",
                "--set",
                f"train.features_dir={feats}",
                "--set",
                "train.log_every=1",
                "--no-progress",
            ]
        )
        == 0
    )
    records = rundir.read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    for r in records:  # one step per record: simulated tau = 1 + sum_k prod_{i<=k} acc_i of the logged accuracies
        np.testing.assert_allclose(r["simulated_tau"], 1 + np.sum(np.cumprod(r["position_accuracy"][1:])), rtol=1e-6)


def test_ctrl_c_in_a_subprocess_saves_a_checkpoint(tmp_path):
    run = str(tmp_path / "run")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dflash_jax.cli",
            "train",
            "--config",
            "tiny",
            "--run-dir",
            run,
            "--set",
            "train.steps=100000",
            "--set",
            "train.log_every=1",
            "--set",
            "data.max_conversations=32",
            "--no-progress",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = os.path.join(run, rundir.METRICS_FILE)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == cli.EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["interrupted"] is True and summary["step"] >= 2
    steps = [int(s) for s in os.listdir(os.path.join(run, rundir.CHECKPOINT_DIR)) if s.isdigit()]
    assert max(steps) == summary["step"]


def test_bench_lists_the_scripts(capsys):
    assert cli.main(["bench"]) == 0
    names = capsys.readouterr().out
    for name in ("draft", "loss", "target", "train_step"):
        assert name in names


def test_readme_python_example_equals_block_loss():
    """The README's hand-written D-PACE loss (dpace_weights in your own loss) equals block_loss on the same inputs."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = text[text.index("## Public Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    # Same fp32 formula, two programs (log_softmax vs block_loss's shifted logsumexp, separately reduced sums):
    # each of the two sums over B*N*bs = 64 terms and each logsumexp over V = 100 rounds by at most ~log2(n) * 2^-24
    # relative (pairwise reduction), so the ratio differs by a few 1e-7; 4e-6 leaves a margin of ~4x.
    np.testing.assert_allclose(float(namespace["loss"]), float(namespace["reference_loss"]), rtol=4e-6)
