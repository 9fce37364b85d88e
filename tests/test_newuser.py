"""A new user's first hour, through the ``dflash-jax`` CLI (issue 16): config-key suggestions, the resolved run
config, ``data.heldout=0``, log-file output, eval prompt files and truncation, checks before the model loads,
extending a run, long conversations split by packing, and the plan printed before the first step."""

import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from dflash_jax import cli
from dflash_jax.train import rundir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "tiny", "--set", "mesh.shape=[2,2,2]", "--set", "data.max_conversations=32"]


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_unknown_key_suggests_the_near_match(tmp_path, capsys):
    assert cli.main(["train", *TINY, "--run-dir", str(tmp_path / "a"), "--set", "train.step=5"]) == 2
    assert "did you mean 'steps'?" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {seq_lenn: 64}\n")
    assert cli.main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "data.seq_lenn" in err and "did you mean 'seq_len'?" in err


def test_log_file_run_heldout_zero_resolved_mask(tmp_path, capsys):
    """A run logged to a file (stderr not a terminal), without JAX_PLATFORMS: no libtpu line, no redrawn bar,
    one plain line per log_every; ``data.heldout=0`` alone with in-training eval on trains (eval off, with a
    note); config.yaml holds the mask token id the run resolved from ``null``."""
    run = str(tmp_path / "run")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    with open(tmp_path / "log.txt", "w") as log:
        proc = subprocess.run(
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
                "train.steps=4",
                "--set",
                "train.log_every=2",
                "--set",
                "data.max_conversations=16",
                "--set",
                "data.heldout=0",
                "--set",
                "train.eval_every=2",
                "--set",
                "draft.mask_token_id=null",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=600,
        )
    err = (tmp_path / "log.txt").read_text()
    assert proc.returncode == 0, err[-3000:]
    assert "libtpu" not in err and "\r" not in err
    assert "step 2/4 loss" in err and "step 4/4 loss" in err
    assert "plan: 4 steps (of 4) x 256 tokens/step (4 x 64)" in err  # tiny: batch 4 x seq_len 64
    assert "ETA" in err and "for the remaining 1 steps" in err  # after the compiling step and 2 timed ones
    assert "data.heldout=0" in err and "in-training eval" in err
    with open(os.path.join(run, rundir.CONFIG_FILE)) as f:
        saved = yaml.safe_load(f)
    with open(os.path.join(run, rundir.DRAFT_CONFIG_FILE)) as f:
        mask = json.load(f)["dflash_config"]["mask_token_id"]
    assert saved["draft"]["mask_token_id"] == mask == 0  # <|endoftext|> of the byte tokenizer (run.py rule)
    assert not any("eval_tau" in r for r in rundir.read_metrics(run))
    assert cli.main(["eval", "--draft", run]) == 2  # no held-out prompts: say where prompts must come from
    assert "data.heldout=0" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("newuser") / "run")
    assert (
        cli.main(
            [
                "train",
                *TINY,
                "--run-dir",
                run,
                "--set",
                "train.steps=2",
                "--set",
                "train.log_every=1",
                "--set",
                "train.checkpoint_every=1",
                "--set",
                "eval.prompt_len=null",
                "--no-progress",
            ]
        )
        == 0
    )
    return run


def _chatml_len(user_text: str) -> int:
    """Tokens of a one-user-turn ChatML prompt under the byte tokenizer: 3 specials, 1 byte = 1 token."""
    return len(f"user\n{user_text}\nassistant\n".encode()) + 3


def test_eval_user_only_prompt_files_whole_file_and_counted_truncation(tiny_run, tmp_path, capsys):
    texts = ["Write a function that adds two numbers.", "Hi", "Explain the difference between a list and a tuple."]
    openai = tmp_path / "user_only.jsonl"
    openai.write_text("".join(json.dumps({"messages": [{"role": "user", "content": t}]}) + "\n" for t in texts))
    sharegpt = tmp_path / "user_only_sharegpt.json"
    sharegpt.write_text(json.dumps([{"conversations": [{"from": "human", "value": t}]} for t in texts]))
    plain = tmp_path / "prompts.txt"
    plain.write_text("\n".join(texts) + "\n\n")
    limit = 30
    lengths = [_chatml_len(t) for t in texts]
    long = [n for n in lengths if n > limit]
    assert 0 < len(long) < len(texts)
    for path in (openai, sharegpt, plain):  # no --num-prompts: the whole file
        with pytest.warns(UserWarning, match=f"{len(long)} of {len(texts)} prompts"):
            assert (
                cli.main(
                    [
                        "eval",
                        "--draft",
                        tiny_run,
                        "--prompts",
                        str(path),
                        "--max-new-tokens",
                        "2",
                        "--prompt-len",
                        str(limit),
                        "--out",
                        str(tmp_path / "ev"),
                    ]
                )
                == 0
            )
        result = _last_json(capsys)
        assert result["num_prompts"] == len(texts), path
        assert result["truncated_prompts"] == len(long)
        assert result["truncated_prompt_tokens"] == sum(n - limit for n in long)
    assert (
        cli.main(
            [
                "eval",
                "--draft",
                tiny_run,
                "--prompts",
                str(plain),
                "--num-prompts",
                "2",
                "--max-new-tokens",
                "2",
                "--out",
                str(tmp_path / "ev"),
            ]
        )
        == 0
    )
    result = _last_json(capsys)  # default prompt_len (null): the target's context, nothing cut
    assert result["num_prompts"] == 2 and result["truncated_prompts"] == 0 == result["truncated_prompt_tokens"]


def _cosine_with_warmup(count: int, lr: float, warmup: int, total: int) -> float:
    """optim.make_schedule('cosine') written out: linear 0 -> lr over ``warmup``, cosine to 0 at ``total``."""
    if count < warmup:
        return lr * count / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * min(count - warmup, total - warmup) / (total - warmup)))


def test_extend_a_run_with_a_larger_train_steps(tiny_run, tmp_path, capsys, monkeypatch):
    """``--resume --set train.steps=N`` (N larger) continues the run: steps already taken keep the old schedule,
    the rest follow the schedule recomputed for the new total. Other changes are refused before the target loads,
    with the keys that may change."""
    run = str(tmp_path / "run")
    shutil.copytree(tiny_run, run)  # 2 steps, cosine, warmup 2, lr 3e-3
    assert cli.main(["train", "--run-dir", run, "--resume", "--set", "train.steps=5", "--no-progress"]) == 0
    records = [r for r in rundir.read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    for r in records:  # metrics log lr = schedule(updates before the step) = schedule(step - 1)
        total = 2 if r["step"] <= 2 else 5
        assert r["lr"] == pytest.approx(_cosine_with_warmup(r["step"] - 1, 3e-3, 2, total), rel=1e-6)
    assert records[3]["lr"] > 0  # the old schedule had reached 0 at its end; the extension keeps learning
    with open(os.path.join(run, rundir.CONFIG_FILE)) as f:
        assert yaml.safe_load(f)["train"]["steps"] == 5

    from dflash_jax.train import run as run_lib

    def no_target(*_):
        raise AssertionError("the target was loaded before the resume was checked")

    monkeypatch.setattr(run_lib, "build_target", no_target)
    capsys.readouterr()
    assert cli.main(["train", "--run-dir", run, "--resume", "--set", "train.lr=1e-3", "--set", "train.steps=6"]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "--resume may change only: train.steps (larger: extends the run)" in err
    assert "train.log_every" in err and "mesh.shape" in err
    assert cli.main(["train", "--run-dir", run, "--resume", "--set", "train.steps=3"]) == 2
    assert "below the checkpoint's step 5" in capsys.readouterr().err


def test_input_checks_run_before_the_model_loads(tiny_run, tmp_path, capsys, monkeypatch):
    from dflash_jax.train import run as run_lib

    def no_target(*_):
        raise AssertionError("the target was loaded before the inputs were checked")

    monkeypatch.setattr(run_lib, "build_target", no_target)
    cases = [
        (
            ["train", *TINY, "--run-dir", str(tmp_path / "a"), "--set", f"data.path={tmp_path / 'missing.jsonl'}"],
            "data.path",
        ),
        (["train", *TINY, "--run-dir", str(tmp_path / "b"), "--set", f"data.path={tmp_path}"], "data.path"),
        (["train", *TINY, "--run-dir", str(tmp_path / "c"), "--set", f"draft.init={tmp_path / 'nope'}"], "draft.init"),
        (
            ["dump-features", *TINY, "--out", str(tmp_path / "f"), "--set", f"data.chat_template={tmp_path / 'x.j2'}"],
            "data.chat_template",
        ),
        (["eval", "--draft", tiny_run, "--prompts", str(tmp_path / "missing.txt")], "is not a file"),
    ]
    bad = tmp_path / "assistant_first.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hello"}]}) + "\n")
    cases.append((["eval", "--draft", tiny_run, "--prompts", str(bad)], "holds no usable prompt"))
    (tmp_path / "out_file").write_text("")
    cases.append((["eval", "--draft", tiny_run, "--out", str(tmp_path / "out_file")], "not a directory"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv


def _long_conversation(turns: int, seed: int) -> tuple:
    rng = __import__("random").Random(seed)
    conv = [("system", "You are terse. " * 3)]
    for t in range(turns):
        conv += [("user", f"q{t} " + "u" * rng.randrange(5, 30)), ("assistant", f"a{t} " + "x" * rng.randrange(5, 40))]
    return tuple(conv)


def test_packing_splits_long_conversations_at_turn_ends(tmp_path, capsys):
    """Every assistant token of a long conversation is trained by exactly one example; each example ends at an
    assistant-turn end, is preceded by as much context as fits, and its loss mask covers assistant tokens only
    (those of the full rendering); the counts reach metrics.jsonl through the CLI."""
    from dflash_jax.data import chat, pipeline

    seq_len = 96
    renderer = chat.ChatRenderer(chat.byte_chat_tokenizer(), chat.CHATML_TEMPLATE, eos_token="<|im_end|>")
    convs = [_long_conversation(6, s) for s in range(3)] + [(("user", "hi"), ("assistant", "short"))]
    convs.append((("user", "hi"), ("assistant", "y" * 200), ("user", "more"), ("assistant", "ok")))  # turn > seq_len
    path = tmp_path / "long.jsonl"
    path.write_text(
        "".join(json.dumps({"messages": [{"role": r, "content": c} for r, c in conv]}) + "\n" for conv in convs)
    )
    ds = pipeline.build_dataset(str(path), renderer, seq_len=seq_len, split_long=True)
    assert ds.split == 4 and ds.truncated == 1 and ds.skipped == 0
    full = [renderer.render(c) for c in convs]
    remaining = list(ds.examples)
    for (ids, mask), conv in zip(full, convs):
        trained = np.zeros(len(ids), bool)
        while remaining and len(ids) > 0:
            ex_ids, ex_mask = remaining[0]
            # where this example sits in the full rendering (unique: the rows carry distinct turn numbers)
            hits = (
                [b for b in range(len(ids) - len(ex_ids) + 1) if np.array_equal(ids[b : b + len(ex_ids)], ex_ids)]
                if len(ex_ids) <= len(ids)
                else []
            )
            if not hits:
                break
            b = hits[0]
            remaining.pop(0)
            assert len(ex_ids) <= seq_len
            sel = ex_mask > 0
            assert (mask[b : b + len(ex_ids)][sel] == 1).all()  # loss only on assistant tokens
            assert not (trained[b : b + len(ex_ids)] & sel).any()  # trained once
            trained[b : b + len(ex_ids)] |= sel
            if len(ids) > seq_len and conv[-1][1] != "ok":
                assert ex_mask[-1] == 1 and (b + len(ex_ids) == len(ids) or mask[b + len(ex_ids)] == 0)  # turn end
                assert b == 0 or len(ex_ids) == seq_len  # context carried as far as fits
        if conv[-1][1] != "ok":
            np.testing.assert_array_equal(trained, mask > 0)  # nothing lost
        else:
            assert 0 < trained.sum() < mask.sum()  # the 200-byte turn is cut: counted in ds.truncated
    assert not remaining

    run = str(tmp_path / "run")
    assert (
        cli.main(
            [
                "train",
                *TINY,
                "--run-dir",
                run,
                "--set",
                f"data.path={path}",
                "--set",
                "data.heldout=0",
                "--set",
                f"data.seq_len={seq_len}",
                "--set",
                "train.steps=1",
                "--no-progress",
            ]
        )
        == 0
    )
    record = rundir.read_metrics(run)[-1]
    assert record["split_conversations"] == 4 and record["truncated_conversations"] == 1


def test_train_flops_grow_with_the_vocabulary_as_documented():
    """lm_head (frozen: forward + input-gradient = 2x) and the KD teacher each cost 2*B*Q*H*V: the vocabulary
    term of the step (docs/benchmarks.md), and the offline mode drops exactly the target prefill minus logits."""
    from dflash_jax.models.draft import DraftConfig
    from dflash_jax.models.target import TargetConfig
    from dflash_jax.train import cost

    def cfgs(vocab):
        tc = TargetConfig(
            arch="qwen3",
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
        )
        return tc, DraftConfig.from_target(
            64,
            vocab,
            4,
            num_layers=1,
            block_size=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=128,
            mask_token_id=0,
        )

    b, s, n = 2, 64, 8
    q, h = n * 4, 64
    for kd in (False, True):
        diff = cost.train_flops(*cfgs(152_000), b, s, n, kd) - cost.train_flops(*cfgs(512), b, s, n, kd)
        assert diff == (3 if kd else 2) * 2 * b * q * h * (152_000 - 512)
    tc, dc = cfgs(512)
    p_mm = 4 * (64 * (4 + 2 * 2) * 16 + 4 * 16 * 64 + 3 * 64 * 128)
    online_only = 2 * b * s * p_mm + 4 * b * s * s * 4 * 16 * 4
    offline = cost.train_flops(tc, dc, b, s, n, True, online=False)
    assert cost.train_flops(tc, dc, b, s, n, True) - offline == online_only
