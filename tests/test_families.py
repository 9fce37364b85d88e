"""Target families without torch: the Qwen3-MoE GGUF loader (a tiny file written with gguf's own tensor names, as
llama.cpp's converter stacks experts) and the random-target configs (Gemma 3 / gpt-oss GGUFs: test_gguf_families.py)."""

import gguf
import numpy as np
import pytest
from flax import nnx
from tokenizers import pre_tokenizers

from dflash_jax import config as config_lib
from dflash_jax import load_target
from dflash_jax.models import hf_io
from dflash_jax.models.target_io import random_target

MOE = hf_io.random_target_config(
    config_lib.RandomTargetSection(
        arch="qwen3_moe",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        tie_word_embeddings=False,
    )
)
_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate": "ffn_gate_inp",
    "mlp.experts.gate_proj": "ffn_gate_exps",
    "mlp.experts.up_proj": "ffn_up_exps",
    "mlp.experts.down_proj": "ffn_down_exps",
}


def _write_moe_gguf(path, model, cfg, qtype=None):
    """Tensors under gguf's ``MODEL_TENSORS[QWEN3MOE]`` names, torch layout (experts ``[E, out, in]``)."""
    assert {"blk.{bid}." + v for v in _NAMES.values()} <= {
        gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.QWEN3MOE]
    }
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(64)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(sorted(pre_tokenizers.ByteLevel.alphabet()) + [f"<x{i}>" for i in range(cfg.vocab_size - 256)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_eos_token_id(257)
    tensors = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        a = np.asarray(var[...])
        if path[0] != "layers":
            tensors[{"embed_tokens": "token_embd", "lm_head": "output", "norm": "output_norm"}[path[0]] + ".weight"] = a
            continue
        module = ".".join(str(p) for p in path[2:] if p not in ("kernel", "weight"))
        tensors[f"blk.{path[1]}.{_NAMES[module]}.weight"] = a.swapaxes(-1, -2) if a.ndim > 1 else a  # torch layout
    for name, a in tensors.items():
        a = np.ascontiguousarray(np.asarray(a, np.float32))
        if qtype is not None and a.ndim >= 2 and a.shape[-1] % 32 == 0:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_qwen3_moe_gguf_loads_with_stacked_experts(tmp_path):
    src = random_target(MOE, seed=2)
    _write_moe_gguf(tmp_path / "m.gguf", src.model, MOE)
    got = load_target(tmp_path / "m.gguf")
    assert (got.config.arch, got.config.moe_layers, got.config.num_experts, got.config.norm_topk_prob) == (
        "qwen3_moe",
        (0, 1),
        4,
        True,
    )
    np.testing.assert_array_equal(
        np.asarray(got.model.layers[1].mlp.experts.down_proj[...]),
        np.asarray(src.model.layers[1].mlp.experts.down_proj[...]),
    )
    ids = np.random.default_rng(0).integers(0, MOE.vocab_size, (2, 7))
    np.testing.assert_allclose(got.logits(ids), src.logits(ids), atol=1e-5)
    _write_moe_gguf(tmp_path / "q.gguf", src.model, MOE, qtype=gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_allclose(load_target(tmp_path / "q.gguf").logits(ids), src.logits(ids), atol=2e-2)


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss", "gemma3_text"])
def test_random_target_configs(arch):
    cfg = hf_io.random_target_config(config_lib.RandomTargetSection(arch=arch, num_layers=4))
    assert cfg.arch == arch
    if arch != "qwen3_moe":
        assert cfg.layer_types == ("sliding_attention", "full_attention") * 2 and cfg.sliding_window == 8
    if arch != "gemma3_text":
        assert cfg.moe_layers == (0, 1, 2, 3) and (cfg.num_experts, cfg.num_experts_per_tok) == (4, 2)
    with pytest.raises(ValueError, match="target.random.num_experts_per_tok"):
        config_lib.load_config("tiny", [f"target.random.arch={arch}", "target.random.num_experts_per_tok=5"])


def test_random_target_fields_come_from_the_hf_parser():
    """A random target's derived fields are the config.json parser's (Qwen2: q/k/v biases), its dims stay its own."""
    qwen2 = hf_io.random_target_config(config_lib.RandomTargetSection(arch="qwen2"))
    assert qwen2.attention_bias and not qwen2.qk_norm and (qwen2.num_experts, qwen2.sliding_window) == (4, 8)
    explicit = hf_io.random_target_config(
        config_lib.RandomTargetSection(arch="gpt_oss"), layer_types=("full_attention",) * 4, attention_bias=False
    )
    assert explicit.layer_types == ("full_attention",) * 4 and explicit.moe_layers == (0, 1, 2, 3)
