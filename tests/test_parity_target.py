"""Parity vs transformers' PyTorch Llama / Qwen2 / Qwen3 (fp32): tiny random models saved with save_pretrained,
loaded by our loader (Levanter style); logits and taps within 1e-4."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dflash_jax import load_target  # noqa: E402

pytestmark = pytest.mark.parity

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)
CASES = {
    # llama3 rope scaling (short original context so every frequency band is exercised) + tied embeddings
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            tie_word_embeddings=True,
            rms_norm_eps=1e-5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "qwen2": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
    "qwen3": (
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        dict(tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    ),
}


def _save(arch, path, max_shard_size=None):
    cfg_cls, model_cls, extra = CASES[arch]
    torch.manual_seed(0)
    model = model_cls(cfg_cls(**COMMON, **extra, attn_implementation="eager")).eval()
    with torch.no_grad():  # randomise norms and biases too (HF inits them to 1 / 0)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, **kw)
    return model


@pytest.mark.parametrize("arch", sorted(CASES))
def test_logits_and_taps_match_transformers(arch, tmp_path):
    sharded = arch == "qwen2"  # one case goes through model.safetensors.index.json
    model = _save(arch, tmp_path, max_shard_size="20KB" if sharded else None)
    assert (tmp_path / "model.safetensors.index.json").exists() == sharded
    ids = np.random.default_rng(1).integers(0, COMMON["vocab_size"], (2, 40)).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    target = load_target(tmp_path)
    cfg = target.config
    assert (cfg.arch, cfg.tie_word_embeddings, cfg.attention_bias, cfg.qk_norm) == (
        arch,
        arch == "llama",
        arch == "qwen2",
        arch == "qwen3",
    )
    np.testing.assert_allclose(target.logits(ids), out.logits.numpy(), atol=1e-4, rtol=1e-4)
    layer_ids = (2, 0, 1)  # id 2 = last layer = HF's post-norm hidden_states[3]
    want = np.concatenate([out.hidden_states[i + 1].numpy() for i in layer_ids], axis=-1)
    np.testing.assert_allclose(target.taps(ids, layer_ids), want, atol=1e-4, rtol=1e-4)


def test_transformers_v4_config_semantics(tmp_path):
    """The same checkpoint with a v4-style config.json (top-level rope_theta/rope_scaling, torch_dtype)."""
    model = _save("llama", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = cfg.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ids = np.arange(30, dtype=np.int64)[None] % COMMON["vocab_size"]
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    target = load_target(tmp_path)
    assert target.config.rope_theta == 5e5 and target.config.rope_scaling["rope_type"] == "llama3"
    np.testing.assert_allclose(target.logits(ids), want, atol=1e-4, rtol=1e-4)
