"""``dflash-jax train`` with each new target family (``target.random.arch``) on the 2x2x2 mesh (fsdp x tensor =
2x2 for the parameters), then ``dflash-jax eval --check-lossless``: speculative decoding against the family's KV
cache (sliding layers, rollback) must reproduce the target's own greedy output."""

import json

import numpy as np
import pytest

from dflash_jax import cli
from dflash_jax.train import rundir

pytestmark = pytest.mark.slow

TINY = [
    "--config",
    "tiny",
    "--set",
    "mesh.shape=[2,2,2]",
    "--set",
    "data.max_conversations=16",
    "--set",
    "train.steps=2",
    "--set",
    "train.log_every=1",
    "--set",
    "train.checkpoint_every=2",
    "--set",
    "target.random.num_layers=2",
    "--set",
    "target.random.sliding_window=6",
]


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "gemma3_text"])
def test_train_then_lossless_eval_with_family_target(arch, tmp_path, capsys):
    run = str(tmp_path / "run")
    assert cli.main(["train", *TINY, "--set", f"target.random.arch={arch}", "--run-dir", run, "--no-progress"]) == 0
    records = [r for r in rundir.read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
    capsys.readouterr()
    assert cli.main(["eval", "--draft", run, "--max-new-tokens", "12", "--num-prompts", "1", "--check-lossless"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["lossless"] is True and result["num_prompts"] == 1
