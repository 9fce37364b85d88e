"""Strict YAML config: shipped configs, unknown keys, types, ranges, cross-field checks, overrides, saving."""

import os
import warnings

import pytest
import yaml

from dflash_jax import sharding
from dflash_jax.config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    parse_override,
    to_dict,
    validate_runtime,
)
from dflash_jax.train import rundir


def test_shipped_configs_load():
    tiny = load_config("tiny")
    assert tiny.target.path == "random" and tiny.target.random.vocab_size == 512 and tiny.data.seq_len == 64
    smol = load_config("configs/smollm2-135m.yaml")
    assert (smol.target.path, smol.data.path, smol.loss.objective, smol.loss.alpha) == (
        "smollm2",
        "sharegpt",
        "dpace",
        0.5,
    )
    assert smol.draft.block_size in (8, 16) and smol.draft.num_layers <= 2
    q = load_config("qwen3-8b")
    assert (q.draft.block_size, q.train.num_anchors, q.draft.num_layers, q.data.seq_len) == (16, 512, 5, 3072)
    assert (q.train.lr, q.train.warmup_ratio, q.train.schedule, q.train.clip_norm) == (6e-4, 0.04, "cosine", 1.0)


def test_readme_recipe_block_is_the_shipped_qwen3_8b_config():
    """The README's annotated recipe (the first ```yaml block) equals configs/qwen3-8b.yaml but for the two paths."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        block = f.read().split("```yaml\n", 1)[1].split("```", 1)[0]
    with open(os.path.join(root, "configs", "qwen3-8b.yaml"), encoding="utf-8") as f:
        shipped = yaml.safe_load(f)
    readme = yaml.safe_load(block)
    for section, key in (("target", "path"), ("data", "path")):
        readme[section].pop(key), shipped[section].pop(key)
    assert readme == shipped


def test_defaults_are_valid_and_empty_sections_allowed():
    assert from_dict(None) == Config()
    assert from_dict({"train": None, "loss": {}}) == Config()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"trian": {}}, "unknown config key trian"),
        ({"loss": {"alpah": 0.5}}, "unknown config key loss.alpah"),
        ({"target": {"random": {"hidden": 8}}}, "unknown config key target.random.hidden"),
        ({"train": {"steps": "ten"}}, "train.steps must be an integer"),
        ({"train": {"steps": 10.5}}, "train.steps must be an integer"),
        ({"data": {"packing": 1}}, "data.packing must be true or false"),
        ({"draft": {"num_layers": True}}, "draft.num_layers must be an integer"),
        ({"loss": {"alpha": "half"}}, "loss.alpha must be a number"),
        ({"loss": {"alpha": None}}, "loss.alpha must be a number, got None"),
        ({"loss": {"objective": "kl"}}, r"loss.objective must be one of \['dpace', .*'uniform'\], got 'kl'"),
        ({"loss": {"per_token": "mse"}}, r"loss.per_token must be one of \['ce', 'kd', .*'tv'\], got 'mse'"),
        ({"loss": {"normalization": "mean"}}, r"loss.normalization must be one of \['modelopt', 'batch', 'tokens'\]"),
        ({"loss": {"confidence": "teacher"}}, r"loss.confidence must be one of \['data', 'loss'\]"),
        ({"loss": {"kd": True}}, r"config key loss.kd was replaced by loss.per_token \(kd: true -> per_token: kd"),
        ({"mesh": {"shape": [2, 2]}}, "mesh.shape must be a list of 3 values"),
        ({"mesh": {"shape": [2, "x", 2]}}, r"mesh.shape\[1\] must be an integer"),
        ({"draft": {"target_layer_ids": 3}}, "draft.target_layer_ids must be a list"),
        ({"data": {"path": 5}}, "data.path must be a string"),
        ({"loss": []}, "loss must be a mapping"),
        ({"loss": {"alpha": 1.5}}, r"loss.alpha must be in \[0, 1\], got 1.5"),
        ({"loss": {"alpha": -0.1}}, r"loss.alpha must be in \[0, 1\], got -0.1"),
        ({"loss": {"gamma": -1}}, "loss.gamma must be >= 0"),
        ({"loss": {"chunk_blocks": 0}}, "loss.chunk_blocks must be >= 1"),
        (
            {"data": {"seq_len": 100}, "draft": {"block_size": 8}},
            r"data.seq_len \(100\) must be a positive multiple of draft.block_size \(8\)",
        ),
        ({"draft": {"sliding_window": 4, "block_size": 8}}, r"draft.sliding_window must be >= draft.block_size \(8\)"),
        (
            {"draft": {"block_size": 1}, "data": {"seq_len": 8}},
            "draft.block_size must be > 1 with loss.objective dpace",
        ),
        ({"train": {"num_anchors": 0}}, "train.num_anchors must be >= 1"),
        ({"draft": {"num_anchors": 8}}, "config key draft.num_anchors was replaced by train.num_anchors"),
        ({"draft": {"num_attention_heads": 6, "num_key_value_heads": 4}}, "draft.num_attention_heads"),
        ({"draft": {"head_dim": 15}}, "draft.head_dim must be even"),
        ({"draft": {"mask_token_id": -1}}, "draft.mask_token_id must be >= 0"),
        ({"draft": {"target_layer_ids": [1, 2]}}, "draft.target_layer_ids must have draft.num_layers=1 entries"),
        ({"draft": {"num_layers": 2, "target_layer_ids": [1, 1]}}, "draft.target_layer_ids must be distinct"),
        (
            {"draft": {"num_layers": 2, "target_layer_ids": [1, 9]}},
            r"draft.target_layer_ids \[1, 9\] must be < the target's 4 layers",
        ),
        ({"draft": {"num_layers": 5}}, r"draft.num_layers \(5\) must be <= the target's 4 layers"),
        ({"train": {"steps": 0}}, "train.steps must be >= 1"),
        ({"train": {"max_consecutive_skips": 0}}, "train.max_consecutive_skips must be >= 1"),
        ({"train": {"lr": 0}}, "train.lr must be > 0"),
        (
            {"train": {"warmup_steps": 5, "warmup_ratio": 0.1}},
            "train.warmup_steps and train.warmup_ratio are exclusive",
        ),
        ({"train": {"warmup_ratio": 1.0}}, r"train.warmup_ratio must be in \[0, 1\)"),
        ({"train": {"warmup_steps": -1}}, "train.warmup_steps must be >= 0"),
        ({"train": {"b2": 1.0}}, r"train.b2 must be in \[0, 1\)"),
        ({"train": {"mode": "offline"}}, "train.features_dir must be set"),
        ({"train": {"schedule": "step"}}, "train.schedule must be one of"),
        ({"train": {"compute_dtype": "float16"}}, "train.compute_dtype must be one of"),
        ({"mesh": {"shape": [0, 1, 1]}}, "mesh.shape entries must be >= 1"),
        ({"data": {"batch_size": 0}}, "data.batch_size must be >= 1"),
        ({"data": {"format": "alpaca"}}, "data.format must be one of"),
        ({"eval": {"num_prompts": 20}, "data": {"heldout": 4}}, r"eval.num_prompts must be in \[0, data.heldout=4\]"),
        ({"target": {"random": {"num_attention_heads": 3}}}, "target.random.num_attention_heads"),
    ],
)
def test_invalid_configs_name_the_key(raw, message):
    with pytest.raises(ValueError, match=message):
        from_dict(raw)


def test_numeric_strings_and_ints_are_floats():
    c = from_dict({"train": {"lr": "6e-4", "eps": 1}})  # PyYAML reads 6e-4 as a string
    assert c.train.lr == 6e-4 and isinstance(c.train.eps, float)
    assert yaml.safe_load("lr: 6e-4")["lr"] == "6e-4"  # the reason numeric strings are accepted


def test_runtime_validation():
    c = from_dict(
        {
            "mesh": {"shape": [2, 2, 2]},
            "data": {"batch_size": 8},
            "target": {"path": "smollm2"},
            "draft": {"mask_token_id": 49152},
        }
    )
    validate_runtime(c, num_devices=8)
    with pytest.raises(ValueError, match=r"mesh.shape \[2, 2, 2\] has 8 devices, but this machine has 1"):
        validate_runtime(c, num_devices=1)
    c_fill = from_dict({"mesh": {"shape": [1, -1, 1]}, "data": {"batch_size": 8}})
    assert sharding.resolve_mesh_shape(c_fill.mesh.shape, 8) == (1, 8, 1)
    validate_runtime(c_fill, num_devices=8)
    with pytest.raises(ValueError, match=r"mesh.shape \[1, -1, 3\]: 8 devices are not divisible by 3"):
        sharding.resolve_mesh_shape((1, -1, 3), 8)
    with pytest.raises(ValueError, match="at most one -1"):
        from_dict({"mesh": {"shape": [-1, -1, 1]}})
    c2 = from_dict({"mesh": {"shape": [4, 1, 2]}, "data": {"batch_size": 6}})
    with pytest.raises(ValueError, match=r"data.batch_size \(6\) must be a multiple of mesh data\*fsdp \(4\)"):
        validate_runtime(c2, num_devices=8)


def test_overrides():
    c = load_config(
        "tiny",
        [
            "loss.alpha=0.3",
            "mesh.shape=[2,2,2]",
            "data.max_conversations=null",
            "draft.target_layer_ids=[1]",
            "train.lr=1e-3",
            "target.random.seed=5",
        ],
    )
    assert c.loss.alpha == 0.3 and c.mesh.shape == (2, 2, 2) and c.data.max_conversations is None
    assert c.draft.target_layer_ids == (1,) and c.train.lr == 1e-3 and c.target.random.seed == 5
    assert parse_override("data.path= a=b.jsonl") == ("data.path", "a=b.jsonl")
    raw = {"loss": {"alpha": 0.5}}
    assert apply_overrides(raw, ["loss.per_token=ce"]) == {"loss": {"alpha": 0.5, "per_token": "ce"}}
    assert raw == {"loss": {"alpha": 0.5}}  # not mutated
    with pytest.raises(ValueError, match="unknown config key loss.alhpa"):
        load_config("tiny", ["loss.alhpa=0.3"])
    with pytest.raises(ValueError, match="unknown config key nope"):
        apply_overrides({}, ["nope.x=1"])
    with pytest.raises(ValueError, match="key=value"):
        parse_override("loss.alpha")
    with pytest.raises(ValueError, match="loss.alpha.x"):
        apply_overrides({}, ["loss.alpha.x=1"])
    with pytest.raises(ValueError, match=r"loss.alpha must be in \[0, 1\], got 2.0"):
        load_config("tiny", ["loss.alpha=2"])


def test_save_resolved_round_trip(tmp_path):
    c = load_config("smollm2-135m", ["train.steps=7"])
    path = rundir.save_resolved(c, tmp_path / "run")
    assert path == str(tmp_path / "run" / "config.yaml")
    assert load_config(path) == c
    with open(path) as f:
        assert yaml.safe_load(f) == to_dict(c)


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a file nor a shipped config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must be a mapping of sections"):
        load_config(bad)


def test_ignored_loss_keys_warn():
    with pytest.warns(UserWarning, match="loss.gamma=4.0 is ignored by loss.objective dpace"):
        load_config("tiny", ["loss.gamma=4"])
    with pytest.warns(UserWarning, match="loss.confidence=loss is ignored by loss.objective decay"):
        load_config("tiny", ["loss.objective=decay", "loss.confidence=loss"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("tiny", "smollm2-135m", "qwen3-8b"):  # the shipped configs set nothing that is ignored
            load_config(name)
        load_config("tiny", ["loss.objective=decay", "loss.gamma=4"])
