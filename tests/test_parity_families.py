"""Parity vs transformers 5.14.1 (fp32) for the Qwen3-MoE, gpt-oss and Gemma 3 text targets: tiny random models
saved with save_pretrained and loaded by our loader (Levanter style); logits and taps within 1e-4; cached decode
(sliding layers included) equal to the full forward; ragged expert dispatch equal to the dense oracle; RoPE
scalings and MXFP4 dequantisation against transformers' own functions."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.integrations import mxfp4 as hf_mxfp4  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

from dflash_jax import load_target, sharding  # noqa: E402
from dflash_jax.models import hf_io, layers  # noqa: E402
from dflash_jax.models.families import gpt_oss  # noqa: E402
from dflash_jax.models.target import TargetModel  # noqa: E402

pytestmark = pytest.mark.parity

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)
WINDOW = 4  # shorter than the test sequences, so sliding layers really drop keys
CASES = {
    # layer 1 dense (mlp_only_layers), 0 and 2 sparse; renormalised top-2 of 4
    "qwen3_moe": (
        transformers.Qwen3MoeConfig,
        dict(
            intermediate_size=48,
            moe_intermediate_size=16,
            num_experts=4,
            num_experts_per_tok=2,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
            norm_topk_prob=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    # alternating sliding/full, sinks, biases, YaRN (gpt-oss's own default: factor 32, truncate false)
    "gpt_oss": (
        transformers.GptOssConfig,
        dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW),
    ),
    # sliding/full/sliding with different rope thetas, linear-scaled global rope, query_pre_attn_scalar != HD
    "gemma3_text": (
        transformers.Gemma3TextConfig,
        dict(
            intermediate_size=48,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            tie_word_embeddings=True,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            },
        ),
    ),
}
EXPECT = {
    "qwen3_moe": dict(moe_layers=(0, 2), num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, qk_norm=True),
    "gpt_oss": dict(
        moe_layers=(0, 1, 2),
        attention_bias=True,
        sliding_window=WINDOW,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    ),
    "gemma3_text": dict(
        hidden_act="gelu_pytorch_tanh",
        local_rope_theta=1e4,
        query_pre_attn_scalar=24.0,
        tie_word_embeddings=True,
        qk_norm=True,
    ),
}


def _save(arch, path, max_shard_size=None):
    cfg_cls, extra = CASES[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg_cls(**COMMON, **extra), attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # randomise norms, biases and sinks too (HF inits them to 1 / 0)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((0 if arch == "gemma3_text" else 1) + 0.2 * torch.randn_like(p))
            elif arch == "gpt_oss" and name.endswith("experts.gate_up_proj"):
                p.copy_(2.0 * torch.randn_like(p))  # large enough for gpt-oss's clamps at +-7 to bite
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, **({} if max_shard_size is None else dict(max_shard_size=max_shard_size)))
    return model


MOE_FAMILIES = ["gpt_oss", "qwen3_moe"]  # the families with experts (gemma3_text is dense)


@pytest.fixture(scope="module", params=sorted(CASES))
def saved(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    sharded = arch == "qwen3_moe"  # one case goes through model.safetensors.index.json (per-expert tensors)
    model = _save(arch, path, max_shard_size="20KB" if sharded else None)
    assert (path / "model.safetensors.index.json").exists() == sharded
    return arch, model, load_target(path), path


def test_logits_and_taps_match_transformers(saved):
    arch, model, target, _ = saved
    for field, want in EXPECT[arch].items():
        assert getattr(target.config, field) == want, field
    ids = np.random.default_rng(1).integers(0, COMMON["vocab_size"], (2, 12)).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    ref = out.logits.numpy()
    np.testing.assert_allclose(target.logits(ids), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    layer_ids = (2, 0, 1)  # id 2 = last layer = HF's post-norm hidden_states[3]
    want = np.concatenate([out.hidden_states[i + 1].numpy() for i in layer_ids], axis=-1)
    np.testing.assert_allclose(target.taps(ids, layer_ids), want, atol=1e-4 * np.abs(want).max(), rtol=0)


fwd = nnx.jit(TargetModel.__call__, static_argnames="layer_ids")
dec = nnx.jit(TargetModel.decode, static_argnames="layer_ids")


def test_cached_decode_and_rollback_equal_full_forward(saved):
    _, _, target, _ = saved
    m, lids = target.model, (0, 1, 2)
    ids = np.random.default_rng(2).integers(0, COMMON["vocab_size"], (2, 14)).astype(np.int32)
    taps, final = fwd(m, ids, layer_ids=lids)
    tol = 1e-5 * np.abs(taps).max()  # fp32, same math in a different reduction order
    cache = m.init_cache(2, 16)
    got = []
    for a, b in ((0, 5), (5, 6), (6, 10)):  # chunks cross the sliding window
        t, _, cache = dec(m, ids[:, a:b], cache, layer_ids=lids)
        got.append(t)
    np.testing.assert_allclose(np.concatenate(got, 1), taps[:, :10], atol=tol)
    wrong = (ids[:, 10:14] + 7) % COMMON["vocab_size"]  # speculative proposal, 1 and 3 tokens accepted
    wrong[0, 0], wrong[1, :3] = ids[0, 10], ids[1, 10:13]
    _, _, spec = dec(m, wrong, cache, layer_ids=lids, num_valid=np.array([1, 3]))
    np.testing.assert_array_equal(np.asarray(spec.length), [11, 13])
    t, f, _ = dec(m, ids[:, 11:14], TargetModel.rollback(spec, 11), layer_ids=lids)
    np.testing.assert_allclose(t, taps[:, 11:14], atol=tol)
    np.testing.assert_allclose(f, final[:, 11:14], atol=tol)


@pytest.mark.parametrize("saved", MOE_FAMILIES, indirect=True)
def test_ragged_dispatch_equals_dense_oracle(saved):
    arch, _, target, _ = saved
    block = target.model.layers[0].mlp
    x = np.random.default_rng(3).standard_normal((2, 9, COMMON["hidden_size"])).astype(np.float32)
    sparse = np.asarray(block(x))
    np.testing.assert_allclose(sparse, np.asarray(block(x, dense=True)), atol=1e-5 * np.abs(sparse).max())


@pytest.mark.parametrize("saved", MOE_FAMILIES, indirect=True)
def test_expert_parameters_sharded_over_the_mesh(saved):
    arch, _, target, _ = saved
    mesh = sharding.make_mesh((2, 2, 2))
    state = nnx.state(target.model, nnx.Param)
    placed = sharding.place(state, sharding.state_shardings(state, mesh))
    experts = placed["layers"][0]["mlp"]["experts"]
    w = experts["down_proj"][...]
    assert w.sharding.spec == jax.P("fsdp", "tensor", None)
    shard_bytes = {s.data.nbytes for s in w.addressable_shards}
    assert shard_bytes == {w.nbytes // 4}  # experts over fsdp (2) x intermediate over tensor (2)
    ids = np.arange(10, dtype=np.int32)[None] % COMMON["vocab_size"]
    sharded_model = nnx.merge(nnx.graphdef(target.model), placed, nnx.state(target.model, nnx.Not(nnx.Param)))
    with jax.set_mesh(mesh):
        got = np.asarray(fwd(sharded_model, ids)[1])
    np.testing.assert_allclose(got, np.asarray(fwd(target.model, ids)[1]), atol=1e-5)


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "rope_type": "yarn",
            "factor": 32.0,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "original_max_position_embeddings": 64,
            "truncate": False,
        },
        {
            "rope_type": "yarn",
            "factor": 48.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 1.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },  # ModelOpt's dflash_export_rope_scaling example
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "attention_factor": 0.9},
        {"rope_type": "linear", "factor": 8.0},
    ],
)
def test_rope_scalings_match_transformers(scaling):
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_attention_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        rope_parameters={"rope_theta": 5e5, **scaling},
    )
    inv, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, None)
    np.testing.assert_allclose(layers.rope_inv_freq(32, 5e5, scaling), inv.numpy(), rtol=1e-6)
    assert layers.rope_attention_factor(scaling) == pytest.approx(factor, rel=1e-7)


@pytest.mark.parametrize("saved", ["gpt_oss"], indirect=True)
def test_mxfp4_experts_dequantised_like_transformers(saved):
    arch, _, _, path = saved
    rng = np.random.default_rng(4)

    def packed(shape):
        return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(120, 130, shape[:-1], dtype=np.uint8)

    def reference(blocks, scales):
        return hf_mxfp4.convert_moe_packed_tensors(
            torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32
        ).numpy()

    blocks, scales = packed((3, 5, 2, 16))
    np.testing.assert_array_equal(gpt_oss.dequantize_mxfp4(blocks, scales), reference(blocks, scales))
    # a checkpoint whose layer-1 gate_up_proj [E, H=32, 2I=32] is stored as MXFP4 blocks/scales
    tensors = load_file(path / "model.safetensors")
    key = "model.layers.1.mlp.experts.gate_up_proj"
    e, h, two_i = tensors.pop(key).shape
    tensors[key + "_blocks"], tensors[key + "_scales"] = blocks, scales = packed((e, two_i, h // 32, 16))
    out = path.parent / "mxfp4"
    out.mkdir(exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text((path / "config.json").read_text())
    got = load_target(out).model.layers[1].mlp.experts.gate_up_proj[...]
    np.testing.assert_array_equal(np.asarray(got), reference(blocks, scales))


def test_family_config_refusals():
    base = dict(
        model_type="gemma3_text",
        vocab_size=8,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
        sliding_window=4,
    )
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        hf_io.config_from_hf({**base, "final_logit_softcapping": 30.0})
    with pytest.raises(ValueError, match="layer_types"):
        hf_io.config_from_hf({**base, "layer_types": ["sliding_attention"]})
    with pytest.raises(ValueError, match="sliding_window"):
        hf_io.config_from_hf({**base, "sliding_window": None})
    moe = dict(base, model_type="qwen3_moe", num_experts=2, num_experts_per_tok=3, moe_intermediate_size=4)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        hf_io.config_from_hf(moe)
    assert json.loads(json.dumps(hf_io.config_from_hf(base).layer_types)) == ["sliding_attention"] * 2


def test_multimodal_gemma3_checkpoint_loads_its_text_decoder(tmp_path):
    """Gemma 3 4B+ ship as ``gemma3`` (vision tower + ``language_model.model.*``): the text decoder loads and
    matches the multimodal model's text-only logits."""
    text = dict(COMMON, **{k: v for k, v in CASES["gemma3_text"][1].items() if k != "tie_word_embeddings"})
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    target = load_target(tmp_path)
    assert target.config.arch == "gemma3_text" and target.config.tie_word_embeddings
    ids = np.random.default_rng(5).integers(0, COMMON["vocab_size"], (2, 10)).astype(np.int64)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(target.logits(ids), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
