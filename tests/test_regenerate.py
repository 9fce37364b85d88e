"""``dflash-jax regenerate``: the target's own answers turn by turn (equal to cache-free greedy decoding at T=0,
batched = unbatched), user turns verbatim, counted skips, reproducible sampling, resumable after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from decode_oracle import greedy_reference
from dflash_jax import cli
from dflash_jax import config as config_lib
from dflash_jax import regenerate as regen
from dflash_jax.data import chat
from dflash_jax.train import run

MAX_NEW = 16
SYSTEM, LONG = "You answer briefly.", "word " * 15


def _conversations():
    u, a, s = "user", "assistant", "system"
    return [
        [(s, SYSTEM), (u, "What is 2+2?"), (a, "4"), (u, "And 3+3?"), (a, "6"), (u, "trailing, never answered")],
        "{not json",
        [(a, "...cut-off start"), (u, "Tell me a joke."), (a, "A joke.")],  # leading assistant turn dropped
        [(u, LONG * 4), (a, "too long")],  # first prompt > max_prompt_len: skipped
        [(u, "Name a colour."), (a, "Blue.")],
        [(u, "no answer")],  # no assistant turn: unreadable
        [(u, LONG), (a, "x"), (u, LONG), (a, "y")],  # second prompt too long: row ends after turn 1
        [(u, "a"), (a, "b"), (u, "c"), (a, "d"), (u, "e"), (a, "f")],
    ]


def _write_data(path, copies=1):
    with open(path, "w") as f:
        for _ in range(copies):
            for conv in _conversations():
                f.write(
                    conv + "\n"
                    if isinstance(conv, str)
                    else json.dumps({"messages": [{"role": r, "content": t} for r, t in conv]}) + "\n"
                )
    return str(path)


def _sets(data, mesh="[-1,1,1]"):
    sets = [
        "target.random.vocab_size=259",
        "draft.mask_token_id=258",
        "target.random.tie_word_embeddings=false",
        f"data.path={data}",
        "data.max_conversations=null",
        f"mesh.shape={mesh}",
    ]
    return [x for s in sets for x in ("--set", s)]


def _run(tmp_path, capsys, name, data, *extra):
    out = str(tmp_path / name)
    assert (
        cli.main(
            [
                "regenerate",
                "--config",
                "tiny",
                "--out",
                out,
                *_sets(data),
                "--max-new-tokens",
                str(MAX_NEW),
                "--max-prompt-len",
                "128",
                "--no-progress",
                *extra,
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(out) as f:
        return [json.loads(line) for line in f], summary, out


@pytest.fixture(scope="module")
def target_and_renderer():
    config = config_lib.load_config("tiny", [s for s in _sets("x.jsonl", "[1,1,1]") if s != "--set"])
    target = run.build_target(config.target)
    return target, chat.ChatRenderer.from_target(target)


def test_greedy_answers_are_the_targets_turn_by_turn(tmp_path, capsys, target_and_renderer):
    target, renderer = target_and_renderer
    data = _write_data(tmp_path / "data.jsonl")
    rows, summary, _ = _run(tmp_path, capsys, "batched.jsonl", data, "--batch-size", "3")
    assert [r["source"]["record"] for r in rows] == [0, 2, 4, 6, 7]
    assert summary["rows"] == 5 and summary["skipped"] == 3
    assert summary["skipped_by_reason"] == {"unreadable record": 2, "prompt too long": 1}
    assert [r["dropped_turns"] for r in rows] == [0, 1, 0, 1, 0]
    g = rows[0]["generator"]
    assert (g["temperature"], g["top_p"], g["seed"], g["max_new_tokens"]) == (0.0, 1.0, 0, MAX_NEW)
    assert "random(seed=0)" in g["target"] and rows[0]["source"]["path"] == data
    # user (and system) turns verbatim, in place; trailing user turn and the too-long second turn dropped
    convs = _conversations()
    expected_users = {
        0: [("system", SYSTEM), ("user", "What is 2+2?"), ("user", "And 3+3?")],
        2: [("user", "Tell me a joke.")],
        4: [("user", "Name a colour.")],
        6: [("user", LONG.strip())],
        7: [("user", "a"), ("user", "c"), ("user", "e")],
    }
    stop = regen.stop_token_ids(target, renderer)
    for row in rows:
        msgs = [(m["role"], m["content"]) for m in row["messages"]]
        assert [m for m in msgs if m[0] != "assistant"] == expected_users[row["source"]["record"]]
        assert msgs[-1][0] == "assistant"
        n_answers = sum(r == "assistant" for r, _ in msgs)
        assert n_answers == sum(r == "assistant" for r, _ in convs[row["source"]["record"]]) - row["dropped_turns"]
        for k, (role, text) in enumerate(msgs):  # each answer = cache-free greedy decoding of its prompt
            if role != "assistant":
                continue
            ids = greedy_reference(target.model, renderer.render_prompt(tuple(msgs[:k])), MAX_NEW, stop)
            ids = ids[:-1] if ids[-1] in stop else ids
            assert text == renderer.tokenizer.decode(ids, skip_special_tokens=True)  # as generated, byte for byte
    unbatched, _, _ = _run(tmp_path, capsys, "unbatched.jsonl", data, "--batch-size", "1")
    for a, b in zip(rows, unbatched):
        assert a["messages"] == b["messages"]  # batched = unbatched, token for token


def test_sampling_reproducible_from_seed(tmp_path, capsys):
    data = _write_data(tmp_path / "data.jsonl")
    kw = ("--temperature", "1.0", "--top-p", "0.95")
    a, _, _ = _run(tmp_path, capsys, "a.jsonl", data, *kw, "--seed", "5", "--batch-size", "4")
    b, _, _ = _run(tmp_path, capsys, "b.jsonl", data, *kw, "--seed", "5", "--batch-size", "4")
    c, _, _ = _run(tmp_path, capsys, "c.jsonl", data, *kw, "--seed", "6", "--batch-size", "4")
    assert a == b
    assert [r["messages"] for r in a] != [r["messages"] for r in c]
    assert a[0]["generator"]["seed"] == 5 and c[0]["generator"]["seed"] == 6


def test_resume_after_kill_equals_one_run(tmp_path, capsys):
    data = _write_data(tmp_path / "data.jsonl", copies=4)
    args = ["--max-new-tokens", str(MAX_NEW), "--max-prompt-len", "128", "--batch-size", "2", "--no-progress"]
    whole, _, _ = _run(tmp_path, capsys, "whole.jsonl", data, "--batch-size", "2")
    out = str(tmp_path / "killed.jsonl")
    cmd = [
        sys.executable,
        "-m",
        "dflash_jax.cli",
        "regenerate",
        "--config",
        "tiny",
        "--out",
        out,
        *_sets(data, "[1,1,1]"),
        *args,
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = out + regen.PARTIAL_SUFFIX
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(partial) and os.path.getsize(partial) > 0:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out), "the run finished before it could be killed"
    with open(partial, "ab") as f:
        f.write(b'{"messages": [{"role": "us')  # a torn last line, as a kill mid-write leaves it
    assert cli.main(["regenerate", "--config", "tiny", "--out", out, *_sets(data, "[1,1,1]"), *args]) == 2
    assert "--resume" in capsys.readouterr().err
    res = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["resumed_rows"] >= 1
    with open(out) as f:
        assert [json.loads(line) for line in f] == whole
    assert not os.path.exists(partial)


def test_bad_invocations_are_clear_errors(tmp_path, capsys):
    data = _write_data(tmp_path / "data.jsonl")
    _run(tmp_path, capsys, "done.jsonl", data)
    base = ["regenerate", "--config", "tiny", *_sets(data), "--no-progress"]
    assert cli.main([*base, "--out", str(tmp_path / "done.jsonl")]) == 2
    assert "already exists" in capsys.readouterr().err
    with open(tmp_path / "p.jsonl.partial", "w") as f:  # a partial run with other settings
        with open(tmp_path / "done.jsonl") as src:
            f.write(src.readline())
    assert cli.main([*base, "--out", str(tmp_path / "p.jsonl"), "--resume", "--temperature", "0.5"]) == 2
    assert "(differing: max_new_tokens, max_prompt_len, temperature)" in capsys.readouterr().err
    assert cli.main([*base, "--out", str(tmp_path / "x.jsonl"), "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err
    assert (
        cli.main(
            ["regenerate", "--config", "tiny", *_sets(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "y.jsonl")]
        )
        == 2
    )
    assert "is not a file" in capsys.readouterr().err
    assert np.all([not os.path.exists(tmp_path / n) for n in ("x.jsonl", "y.jsonl")])
