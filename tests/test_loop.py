"""Training driver: run-dir outputs, exact resume after Ctrl-C, run-dir refusal, mask-token rule, warm start.

All runs use configs/tiny.yaml (random tiny target, a slice of ShareGPT) on the 8 simulated CPU devices.
"""

import dataclasses
import json
import os
import signal
import types

import jax
import numpy as np
import pytest
from flax import nnx

from dflash_jax import cli
from dflash_jax import config as config_lib
from dflash_jax import export as export_lib
from dflash_jax.data import chat, loader
from dflash_jax.data import store as store_lib
from dflash_jax.train import loop, rundir
from dflash_jax.train import run as run_lib
from train_fixtures import smollm2_tokenizer

STEPS, LOG_EVERY, CKPT_EVERY, INTERRUPT_AT = 12, 3, 5, 7
TINY = [
    "mesh.shape=[2,2,2]",
    f"train.steps={STEPS}",
    f"train.log_every={LOG_EVERY}",
    f"train.checkpoint_every={CKPT_EVERY}",
    f"train.eval_every={STEPS}",
    "eval.max_new_tokens=6",
    "eval.num_prompts=1",
    "data.max_conversations=48",
    "train.lr=1e-2",
]


def tiny_config(*extra):
    return config_lib.load_config("tiny", TINY + list(extra))


def _untimed(records):
    return [{k: v for k, v in r.items() if k not in rundir.TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full"))
    result = loop.train(tiny_config(), run_dir, progress=False)
    return run_dir, result


def test_run_dir_outputs(full_run):
    run_dir, result = full_run
    assert not result.interrupted and result.step == STEPS
    records = rundir.read_metrics(run_dir)
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    bs = tiny_config().draft.block_size
    for r in train:
        assert set(rundir.METRIC_KEYS) <= set(r)
        assert np.isfinite(r["loss"]) and r["tokens_per_s"] > 0
        assert 1.0 <= r["accept_length"] <= bs
        assert len(r["position_accuracy"]) == len(r["position_weight_mean"]) == bs
        # tau_t = 1 + sum_k prod_{i<=k} acc_{t,i} per step; the window mean lies between 1 + mean acc_1 and
        # 1 + sum_k min_{i<=k} (mean acc_i), from the logged per-slot means (slot 0 is never predicted)
        acc = np.asarray(r["position_accuracy"])
        assert acc[0] == 0.0
        assert 1 + acc[1] - 1e-6 <= r["simulated_tau"] <= 1 + np.sum(np.minimum.accumulate(acc[1:])) + 1e-6
        assert 0 < r["real_token_fraction"] <= 1 and r["skipped_samples"] >= 0
        # run health: the window's seconds per step, of which data wait is a part; 8 devices share the tokens
        assert 0 <= r["data_wait_s"] < r["step_time_s"]
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 8)
        assert 0 < r["mfu"] < 1
        if jax.devices()[0].platform == "cpu":  # the CPU backend reports no memory statistics
            assert r["memory_bytes_in_use"] is None and r["memory_peak_bytes"] is None
    assert train[-1]["loss"] < train[0]["loss"]
    assert max(r["position_accuracy"][1] for r in train) > 0  # the tau bounds bite in some window
    evals = [r for r in records if "eval_tau" in r]
    assert [r["step"] for r in evals] == [STEPS] and 1.0 <= evals[0]["eval_tau"] <= bs
    assert config_lib.load_config(os.path.join(run_dir, rundir.CONFIG_FILE)) == tiny_config()
    for name in ("loss_tau.png", "position_acceptance.png", "dpace_weights.png"):
        path = os.path.join(run_dir, rundir.PLOTS_DIR, name)
        assert path in result.plots and os.path.getsize(path) > 1000
    with open(os.path.join(run_dir, rundir.HELDOUT_FILE)) as f:
        assert len(f.readlines()) == tiny_config().data.heldout
    # the export holds the final checkpoint's weights (bf16)
    exp_cfg, exp_params = export_lib.import_draft(result.export_dir)
    _, draft_cfg, ckpt_params, step = run_lib.restore_params(run_dir)
    assert step == STEPS and exp_cfg == draft_cfg
    flat_e, flat_c = dict(nnx.to_flat_state(exp_params)), dict(nnx.to_flat_state(ckpt_params))
    assert flat_e.keys() == flat_c.keys()
    for k in flat_e:
        np.testing.assert_allclose(np.asarray(flat_e[k][...]), np.asarray(flat_c[k][...]), rtol=1e-2, atol=1e-3)


def test_sigint_checkpoint_then_resume_equals_uninterrupted(full_run, tmp_path):
    """SIGINT after step 7 (mid log window, between checkpoints) saves step 7; --resume reproduces every metric."""
    ref_dir, _ = full_run
    run_dir = str(tmp_path / "run")

    def interrupt(step):
        if step == INTERRUPT_AT:
            os.kill(os.getpid(), signal.SIGINT)

    first = loop.train(tiny_config(), run_dir, progress=False, on_step=interrupt)
    assert first.interrupted and first.step == INTERRUPT_AT and first.export_dir is None
    assert sorted(os.listdir(os.path.join(run_dir, rundir.CHECKPOINT_DIR)))[-1] == str(INTERRUPT_AT)
    with pytest.raises(ValueError, match="not empty"):
        loop.train(tiny_config(), run_dir, progress=False)
    second = loop.train(tiny_config(), run_dir, resume=True, progress=False)
    assert not second.interrupted and second.step == STEPS
    assert _untimed(rundir.read_metrics(run_dir)) == _untimed(rundir.read_metrics(ref_dir))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_checkpoint_then_resume_equals_uninterrupted(full_run, tmp_path, signum):
    """SIGTERM / SIGUSR1 (train.stop_signals) after step 7 finish the step, save step 7 and report the signal;
    --resume then reproduces every metric and the export byte for byte."""
    ref_dir, ref = full_run
    run_dir = str(tmp_path / "run")

    def stop(step):
        if step == INTERRUPT_AT:
            os.kill(os.getpid(), signum)

    first = loop.train(tiny_config(), run_dir, progress=False, on_step=stop)
    assert first.interrupted and first.step == INTERRUPT_AT and first.stop_signal == signum
    assert sorted(os.listdir(os.path.join(run_dir, rundir.CHECKPOINT_DIR)), key=int)[-1] == str(INTERRUPT_AT)
    assert signal.getsignal(signum) is signal.SIG_DFL  # the handler is removed when train returns
    second = loop.train(tiny_config(), run_dir, resume=True, progress=False)
    assert not second.interrupted and second.step == STEPS and second.stop_signal is None
    assert _untimed(rundir.read_metrics(run_dir)) == _untimed(rundir.read_metrics(ref_dir))
    with open(os.path.join(second.export_dir, "model.safetensors"), "rb") as a:
        with open(os.path.join(ref.export_dir, "model.safetensors"), "rb") as b:
            assert a.read() == b.read()


def test_wall_clock_checkpoints_and_profile_window(tmp_path):
    """train.checkpoint_every_minutes (tiny: due after every step) saves steps that train.checkpoint_every never
    reaches; train.profile writes a TensorBoard (xplane) and a Perfetto trace of its step window."""
    run_dir = tmp_path / "run"
    profile = tmp_path / "profile"
    config = tiny_config(
        "train.steps=4",
        "train.eval_every=0",
        "train.checkpoint_every=1000",
        "train.keep_checkpoints=10",
        "train.checkpoint_every_minutes=1e-9",
        f"train.profile={{start_step: 2, num_steps: 2, dir: {profile}}}",
    )
    result = loop.train(config, str(run_dir), progress=False)
    assert result.step == 4
    assert sorted(os.listdir(run_dir / rundir.CHECKPOINT_DIR), key=int) == ["1", "2", "3", "4"]
    _assert_trace(profile)


def _assert_trace(directory) -> None:
    """``directory`` holds a non-empty TensorBoard (xplane) and Perfetto (trace.json.gz) trace."""
    traces = [os.path.join(d, f) for d, _, files in os.walk(directory) for f in files]
    assert any(t.endswith(".xplane.pb") and os.path.getsize(t) > 0 for t in traces), traces
    assert any(t.endswith(".trace.json.gz") and os.path.getsize(t) > 0 for t in traces), traces


def test_bench_train_step_profile_writes_a_trace(tmp_path, capsys):
    """``dflash-jax bench train_step --profile DIR`` traces two timed steps into DIR."""
    profile = tmp_path / "bench_profile"
    assert cli.main(["bench", "train_step", "--shape", "cpu", "--steps", "1", "--profile", str(profile)]) == 0
    assert f"profile={profile}" in capsys.readouterr().out
    _assert_trace(profile)


def test_training_from_a_prepared_store_equals_training_from_the_raw_file(full_run, tmp_path):
    """``dflash-jax prepare`` then ``data.path=STORE``: the same metrics, held-out prompts and export as the run on
    the raw file (which prepared RUN/data itself); a raw-file run leaves its store in RUN/data."""
    run_dir, _ = full_run
    assert store_lib.is_store(os.path.join(run_dir, loader.DATA_DIR))
    out = str(tmp_path / "store")
    overrides = [a for o in TINY for a in ("--set", o)]
    assert cli.main(["prepare", "--config", "tiny", "--out", out, "--workers", "1", *overrides]) == 0
    other = str(tmp_path / "from_store")
    loop.train(tiny_config(f"data.path={out}"), other, progress=False)
    assert _untimed(rundir.read_metrics(other)) == _untimed(rundir.read_metrics(run_dir))
    assert not os.path.exists(os.path.join(other, loader.DATA_DIR))
    for name in (rundir.HELDOUT_FILE, os.path.join(rundir.EXPORT_DIR, "model.safetensors")):
        with open(os.path.join(run_dir, name), "rb") as a, open(os.path.join(other, name), "rb") as b:
            assert a.read() == b.read()


def test_resume_rejects_a_changed_config_and_accepts_the_data_reading_keys(full_run, tmp_path):
    run_dir = str(tmp_path / "run")
    base = ("train.steps=3", "train.eval_every=0")
    loop.train(tiny_config(*base), run_dir, progress=False)
    for key in ("train.lr=0.5", "data.seq_len=48", "data.shuffle_seed=1"):
        with pytest.raises(ValueError, match=key.split("=")[0].replace(".", r"\.")):
            loop.train(tiny_config(*base, key), run_dir, resume=True, progress=False)
    # how the store is prepared, read and checked does not change the batches: the checkpoint restores
    reading = ("data.prefetch=0", "data.verify=all", "data.prepare_workers=1")
    result = loop.train(tiny_config(*base, *reading), run_dir, resume=True, progress=False)
    assert result.step == 3 and not result.interrupted


def test_run_dir_refusal_and_overwrite(tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "src").mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        rundir.prepare_run_dir(str(foreign), resume=False, overwrite=False)
    (foreign / rundir.CONFIG_FILE).write_text("db: prod\n")  # a config.yaml alone does not make a run
    with pytest.raises(ValueError, match="no draft_config.json, so it is not a dflash-jax run"):
        rundir.prepare_run_dir(str(foreign), resume=False, overwrite=True)
    assert sorted(os.listdir(foreign)) == [rundir.CONFIG_FILE, "notes.txt", "src"]
    old_run = tmp_path / "old"
    old_run.mkdir()
    for name in (*rundir.RUN_MARKERS, rundir.METRICS_FILE, ".lock.0"):
        (old_run / name).write_text("{}\n")
    (old_run / "link").symlink_to(foreign)  # unlinked, never followed
    link = tmp_path / "link_run"
    link.symlink_to(old_run)
    with pytest.raises(ValueError, match="symbolic link; refusing to delete through it"):
        rundir.prepare_run_dir(str(link), resume=False, overwrite=True)
    rundir.prepare_run_dir(str(old_run), resume=False, overwrite=True)
    assert os.listdir(old_run) == [".lock.0"] and (foreign / "notes.txt").read_text() == "keep me"
    rundir.prepare_run_dir(str(old_run), resume=False, overwrite=False)  # a lock file alone is an empty run dir
    with pytest.raises(ValueError, match="exclusive"):
        rundir.prepare_run_dir(str(old_run), resume=True, overwrite=True)


def _fake_target(vocab, eos=()):
    return types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=vocab), eos_token_ids=tuple(eos))


def test_mask_token_rule_byte_tokenizer():
    renderer = chat.ChatRenderer(chat.byte_chat_tokenizer(), chat.CHATML_TEMPLATE, eos_token="<|im_end|>")
    # ids 0..2 = <|endoftext|> <|im_start|> <|im_end|>: the template emits 1 and 2, so the rule picks 0
    assert run_lib.resolve_mask_token_id(None, _fake_target(512), renderer) == 0
    assert run_lib.resolve_mask_token_id(300, _fake_target(512), renderer) == 300
    with pytest.raises(ValueError, match="end-of-sequence"):
        run_lib.resolve_mask_token_id(2, _fake_target(512), renderer)
    target = run_lib.build_target(config_lib.TargetSection())  # the random target, vocabulary 512
    section = config_lib.DraftSection()
    assert run_lib.build_draft_config(section, target, 511).mask_token_id == 511
    with pytest.raises(ValueError, match=r"draft.mask_token_id 512 must be in \[0, vocab_size=512\)"):
        run_lib.build_draft_config(section, target, 512)
    tok = chat.byte_chat_tokenizer()
    tok.add_special_tokens(["<|mask|>"])
    with_mask = chat.ChatRenderer(tok, chat.CHATML_TEMPLATE, eos_token="<|im_end|>")
    assert run_lib.resolve_mask_token_id(None, _fake_target(512), with_mask) == tok.token_to_id("<|mask|>")


def test_mask_token_rule_smollm2_is_endoftext_not_im_end():
    bundle = smollm2_tokenizer()
    renderer = chat.ChatRenderer.from_target(bundle)
    mask = run_lib.resolve_mask_token_id(None, _fake_target(49152, eos=(2,)), renderer)
    assert bundle.tokenizer.id_to_token(mask) == "<|endoftext|>" and mask != bundle.tokenizer.token_to_id("<|im_end|>")


def test_warm_start_from_export(full_run):
    run_dir, result = full_run
    config = tiny_config()
    _, draft_cfg = run_lib.load_run(run_dir)
    draft = run_lib.new_draft(draft_cfg, config.train, init=result.export_dir)
    _, params = export_lib.import_draft(result.export_dir)
    got = np.asarray(draft.fc.kernel[...])
    np.testing.assert_array_equal(got, np.asarray(dict(nnx.to_flat_state(params))[("fc", "kernel")][...]))
    other = dataclasses.replace(draft_cfg, intermediate_size=draft_cfg.intermediate_size * 2)
    with pytest.raises(ValueError, match="intermediate_size"):
        run_lib.new_draft(other, config.train, init=result.export_dir)


def test_window_record_means_and_keys():
    w = [
        dict(
            loss=1.0,
            accuracy=0.5,
            simulated_tau=1.5,
            accept_length=2.0,
            grad_norm=2.0,
            real_token_fraction=1.0,
            lr=0.1,
            position_accuracy=[0.0, 1.0],
            position_weight_mean=[0.0, 1.0],
            skipped_updates=0,
            tokens=10,
            epoch=0,
            skipped_samples=3,
            split_conversations=2,
            truncated_conversations=1,
        ),
        dict(
            loss=3.0,
            accuracy=0.7,
            simulated_tau=1.7,
            accept_length=1.0,
            grad_norm=4.0,
            real_token_fraction=0.5,
            lr=0.2,
            position_accuracy=[0.0, 0.5],
            position_weight_mean=[0.0, 0.5],
            skipped_updates=1,
            tokens=30,
            epoch=1,
            skipped_samples=3,
            split_conversations=2,
            truncated_conversations=1,
        ),
    ]
    r = loop.window_record(8, w, seconds=2.0, elapsed=5.0)
    assert list(r) == list(rundir.METRIC_KEYS)
    assert r["loss"] == 2.0 and r["grad_norm"] == 3.0 and r["tokens_per_s"] == 20.0 and r["lr"] == 0.2
    assert r["accept_length"] == 1.5
    assert r["position_accuracy"] == [0.0, 0.75] and r["skipped_updates"] == 1 and r["real_token_fraction"] == 0.75
    json.dumps(r)
