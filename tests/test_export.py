"""Draft export/import: file format, bit-exact round trip, z-lab style configs, loud failures, atomic writes."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from dflash_jax.export import (
    config_from_json,
    config_to_json,
    draft_from_params,
    export_draft,
    import_draft,
    to_torch_tensors,
)
from dflash_jax.models import layers
from dflash_jax.models.draft import DFlashDraft, DraftConfig

CFG = DraftConfig(
    hidden_size=16,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=4,
    intermediate_size=24,
    vocab_size=50,
    num_target_layers=5,
    target_layer_ids=(1, 2, 3),
    block_size=4,
    mask_token_id=7,
    rope_theta=5e5,
    sliding_window=6,
    causal=True,
    attention_bias=True,
    max_position_embeddings=64,
)


def _params(cfg=CFG, seed=0):
    with layers.unsharded_init():
        model = DFlashDraft(cfg, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    for i, (_, var) in enumerate(nnx.to_flat_state(state)):  # no all-ones/all-zeros tensors: a swap would show
        var[...] = jax.random.normal(jax.random.key(i), var[...].shape)
    return state


def _flat(params):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(params)}


def test_round_trip_float32_is_bit_exact(tmp_path):
    params = _params()
    export_draft(CFG, params, tmp_path / "d", dtype="float32")
    cfg, loaded = import_draft(tmp_path / "d")
    assert cfg == CFG
    a, b = _flat(params), _flat(loaded)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32
        np.testing.assert_array_equal(a[k], b[k])
    model = draft_from_params(cfg, loaded)
    assert isinstance(model, DFlashDraft)
    np.testing.assert_array_equal(
        np.asarray(model.layers[1].mlp.up_proj.kernel[...]), a[("layers", 1, "mlp", "up_proj", "kernel")]
    )


def test_file_format_names_layout_and_config(tmp_path):
    params = _params()
    export_draft(CFG, params, tmp_path / "d")  # default bfloat16
    tensors = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert len(tensors) == 3 + 11 * 2 + 4 * 2  # + q/k/v/o biases (attention_bias)
    assert all(t.dtype == ml_dtypes.bfloat16 for t in tensors.values())
    assert not any("embed" in k or "lm_head" in k or "rotary" in k for k in tensors)
    assert tensors["fc.weight"].shape == (16, 48)  # torch [out, in]
    assert tensors["layers.0.self_attn.q_proj.weight"].shape == (16, 16)
    assert tensors["layers.0.self_attn.k_proj.weight"].shape == (8, 16)
    assert tensors["layers.1.mlp.down_proj.weight"].shape == (16, 24)
    assert tensors["layers.1.self_attn.k_norm.weight"].shape == (4,)
    kernel = np.asarray(params["layers"][0]["mlp"]["gate_proj"]["kernel"][...])
    np.testing.assert_array_equal(tensors["layers.0.mlp.gate_proj.weight"], kernel.T.astype(ml_dtypes.bfloat16))
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["DFlashDraftModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"] == {
        "mask_token_id": 7,
        "target_layer_ids": [1, 2, 3],
        "causal": True,
        "use_swa": True,
        "swa_window_size": 6,
    }
    assert cfg["sliding_window"] == 6 and cfg["block_size"] == 4 and cfg["num_target_layers"] == 5
    assert cfg["rope_theta"] == 5e5 and cfg["rope_parameters"] == {"rope_theta": 5e5, "rope_type": "default"}
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype"] == "bfloat16" and cfg["hidden_act"] == "silu"
    assert cfg["layer_types"] == ["full_attention"] * 2 and cfg["num_hidden_layers"] == 2
    _, loaded = import_draft(tmp_path / "d")  # bf16 file -> float32 params equal to the bf16-rounded values
    got = np.asarray(loaded["layers"][0]["mlp"]["gate_proj"]["kernel"][...])
    np.testing.assert_array_equal(got, kernel.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_zlab_style_config_is_read():
    """z-lab/SpecForge layout: block_size top level, theta only in rope_parameters, no SWA, no causal key."""
    d = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "block_size": 16,
        "hidden_size": 4096,
        "num_hidden_layers": 5,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "intermediate_size": 12288,
        "vocab_size": 151936,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 1000000, "rope_type": "default"},
        "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33], "num_target_layers": 36},
    }
    cfg = config_from_json(d)
    assert cfg.block_size == 16 and cfg.rope_theta == 1e6 and cfg.num_target_layers == 36
    assert cfg.sliding_window is None and not cfg.causal and cfg.target_layer_ids == (1, 9, 17, 25, 33)
    assert config_from_json(config_to_json(cfg)) == cfg


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda d: d.pop("dflash_config"), "dflash_config"),
        (lambda d: d["dflash_config"].update(target_layer_ids=[1, 5]), "target_layer_ids"),
        (lambda d: d["dflash_config"].update(swa_window_size=2), "sliding_window"),
        (lambda d: d["dflash_config"].update(mask_token_id=50), "mask_token_id"),
        (lambda d: d["dflash_config"].pop("mask_token_id"), "mask_token_id"),
        (lambda d: [d.pop("rope_theta"), d.pop("rope_parameters")], "rope_theta"),
        (lambda d: d.pop("num_target_layers"), "num_target_layers"),
        (lambda d: d.update(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_bad_config_json_names_the_field(mutate, field):
    d = config_to_json(CFG)
    mutate(d)
    with pytest.raises(ValueError, match=field):
        config_from_json(d)


@pytest.mark.parametrize(
    "change,what",
    [
        (lambda t: t.update({"layers.1.mlp.up_proj.weight": np.zeros((24, 15), np.float32)}), "layers.1.mlp.up_proj"),
        (lambda t: t.update({"lm_head.weight": np.zeros((50, 16), np.float32)}), "lm_head.weight"),
        (lambda t: t.pop("layers.0.self_attn.q_norm.weight"), "layers.0.self_attn.q_norm.weight"),
    ],
)
def test_bad_checkpoint_fails_loudly(tmp_path, change, what):
    export_draft(CFG, _params(), tmp_path / "d", dtype="float32")
    path = tmp_path / "d" / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=what.replace(".", r"\.")):
        import_draft(tmp_path / "d")


def test_import_missing_files(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        import_draft(tmp_path)


def test_export_is_atomic(tmp_path):
    out = tmp_path / "d"
    export_draft(CFG, _params(seed=1), out, dtype="float32")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    other = DraftConfig(**{**CFG.__dict__, "intermediate_size": 32})
    with pytest.raises(ValueError, match="wrong shapes"):  # params do not fit the config: nothing is touched
        export_draft(other, _params(seed=1), out)
    with pytest.raises(ValueError, match="dtype"):
        export_draft(CFG, _params(), out, dtype="int8")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temp dirs left behind
    export_draft(CFG, _params(seed=2), out, dtype="float32")  # replacing an existing export works
    _, loaded = import_draft(out)
    np.testing.assert_array_equal(_flat(loaded)[("fc", "kernel")], _flat(_params(seed=2))[("fc", "kernel")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_to_torch_tensors_accepts_plain_arrays():
    params = _params()
    plain = jax.tree.map(lambda v: v[...], params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    a, b = to_torch_tensors(params), to_torch_tensors(plain)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert jnp.asarray(a["fc.weight"]).shape == (16, 48)


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize(
    "options",
    [
        dict(rope_scaling=LLAMA3),
        dict(rope_scaling=YARN),
        dict(attention_sink=True),
        dict(rope_scaling=YARN, attention_sink=True),
    ],
    ids=["llama3", "yarn", "sink", "yarn+sink"],
)
def test_draft_options_round_trip(options, tmp_path):
    cfg = DraftConfig(**{**CFG.__dict__, **options})
    params = _params(cfg)
    export_draft(cfg, params, tmp_path / "d", dtype="float32")
    written = json.loads((tmp_path / "d" / "config.json").read_text())
    assert written["rope_scaling"] == options.get("rope_scaling")
    sink = options.get("attention_sink", False)
    dc = written["dflash_config"]
    assert dc.get("attention_sink_bias", False) == written.get("attention_sink_bias", False) == sink
    assert ("layers.1.self_attn.attention_sink_bias" in load_file(str(tmp_path / "d" / "model.safetensors"))) == sink
    got_cfg, loaded = import_draft(tmp_path / "d")
    assert got_cfg == cfg and hash(got_cfg) == hash(cfg)
    a, b = _flat(params), _flat(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_bad_draft_rope_scaling_names_the_field():
    with pytest.raises(ValueError, match="rope_scaling"):
        DraftConfig(**{**CFG.__dict__, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(ValueError, match="rope_scaling"):
        config_from_json({**config_to_json(CFG), "rope_scaling": {"rope_type": "yarn"}})  # no factor
