"""Gemma 3 and gpt-oss GGUFs vs transformers 5.14.1 (fp32): tiny random HF models written to GGUF the way llama.cpp's
converter does (``convert_hf_to_gguf.py`` ``Gemma3Model`` / ``GptOssModel``: gguf's tensor name map, Gemma norms
stored as ``w + 1``, gpt-oss gate/up split out of the interleaved ``gate_up_proj``, sinks as ``attn_sinks.weight``,
MXFP4 experts), loaded with ``load_target``: logits and taps within 1e-4 of the logit scale; the SentencePiece-BPE
vocab tokenizes like transformers' own GGUF conversion; the o200k pre-tokenizer; bad files name key/tensor."""

import re

import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dflash_jax import load_target  # noqa: E402
from dflash_jax.models import tokenizer as tok_lib  # noqa: E402

pytestmark = pytest.mark.parity

MXFP4 = gguf.GGMLQuantizationType.MXFP4
DIMS = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
WINDOW = 4

# A SentencePiece-BPE vocab laid out as SentencePiece writes one (and Gemma's is): control tokens, byte-fallback
# pieces, merged pieces scored -rank in merge order, then the single characters scored below every merge.
_MERGED = ["he", "▁t", "▁the", "ll", "llo", "▁w", "or", "▁wor", "ld", "▁world", "▁▁", "▁▁▁▁", "\n\n", "in", "▁in"]
_MERGED += ["ab", "abc", "bc", "▁a", "▁ab", "is", "▁is", "Hé", "▁H", "llé"]
_CHARS = ["▁", "t", "h", "e", "a", "b", "c", "l", "o", "w", "r", "d", "H", "W", "é", "n", "i", "s", "\n"]
SPM_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SPM_TOKENS += [f"<0x{b:02X}>" for b in range(256)] + _MERGED + _CHARS
SPM_TYPES = [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * (len(_MERGED) + len(_CHARS))
SPM_SCORES = [0.0] * 262 + [-float(i) for i in range(len(_MERGED) + len(_CHARS))]
BYTES = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
BPE_TOKENS = BYTES + ["Ġt", "he", "Ġthe", "<|start|>", "<|end|>", "<|return|>"]
BPE_TYPES = [1] * (len(BYTES) + 3) + [3, 3, 3]


def _hf_model(arch, vocab):
    if arch == "gemma3":
        cfg = transformers.Gemma3TextConfig(
            **DIMS,
            vocab_size=vocab,
            num_hidden_layers=6,  # llama.cpp's fixed pattern: layers 0-4 sliding, 5 full
            intermediate_size=48,
            sliding_window=WINDOW,
            query_pre_attn_scalar=8,  # llama.cpp: head_dim unless the 62-layer 27B
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},  # llama.cpp's fixed local base
            },
        )
    else:  # YaRN (gpt-oss default: factor 32, truncate false), alternating sliding / full, 32-wide experts (MXFP4)
        cfg = transformers.GptOssConfig(
            **DIMS,
            vocab_size=vocab,
            num_hidden_layers=3,
            intermediate_size=32,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=WINDOW,
        )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # randomise norms, biases and sinks too
        for name, p in model.named_parameters():
            scale = 2.0 if name.endswith("gate_up_proj") else 0.2 if "norm" in name else 0.1
            p.copy_((1.0 if "norm" in name and arch != "gemma3" else 0.0) + scale * torch.randn_like(p))
    return model


def _mxfp4_roundtrip(a):
    """MXFP4 blocks run along the last (input) dimension of torch-layout ``a``."""
    return gguf.quants.dequantize(gguf.quants.quantize(np.ascontiguousarray(a), MXFP4), MXFP4).reshape(a.shape)


def _llamacpp_tensors(arch, model, mxfp4=False):
    """``{gguf name: (array, qtype)}`` as llama.cpp's converter writes ``model``'s state dict."""
    cfg = model.config
    names = gguf.get_tensor_name_map({"gemma3": gguf.MODEL_ARCH.GEMMA3, "gpt-oss": gguf.MODEL_ARCH.GPT_OSS}[arch], 8)
    out = {}

    def put(hf, a, qtype=None):
        out[names.get_name(hf, try_suffixes=(".weight", ".bias"))] = (np.ascontiguousarray(a, np.float32), qtype)

    for name, t in model.state_dict().items():
        a = t.detach().numpy()
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if arch == "gemma3" and name.endswith("norm.weight"):
            a = a + 1  # Gemma3Model.norm_shift
        if name.endswith("self_attn.sinks"):
            name += ".weight"  # GptOssModel.filter_tensors
        q = MXFP4 if mxfp4 else None
        if name.endswith("experts.gate_up_proj"):  # [E, H, 2I] -> torch [E, 2I, H], even rows gate, odd up
            a = a.swapaxes(1, 2)
            put(name.replace("gate_up_proj", "gate_proj.weight"), a[:, ::2], q)
            put(name.replace("gate_up_proj", "up_proj.weight"), a[:, 1::2], q)
        elif name.endswith("experts.gate_up_proj_bias"):
            put(name.replace("gate_up_proj_bias", "gate_proj.bias"), a[..., ::2])
            put(name.replace("gate_up_proj_bias", "up_proj.bias"), a[..., 1::2])
        elif name.endswith("experts.down_proj"):
            put(name + ".weight", a.swapaxes(1, 2), q)
        elif name.endswith("experts.down_proj_bias"):
            put(name.replace("down_proj_bias", "down_proj.bias"), a)
        else:
            put(name, a)
    return out


def _write(path, arch, model, tensors, drop_key=None):
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": cfg.num_hidden_layers,
        "context_length": cfg.max_position_embeddings,
        "embedding_length": cfg.hidden_size,
        "feed_forward_length": cfg.intermediate_size,
        "head_count": cfg.num_attention_heads,
        "head_count_kv": cfg.num_key_value_heads,
        "key_length": cfg.head_dim,
        "value_length": cfg.head_dim,
        "layer_norm_rms_eps": cfg.rms_norm_eps,
        "sliding_window": cfg.sliding_window,
    }
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    keys["rope_freq_base"] = rope["rope_theta"]
    keys["rope_scaling_type"] = gguf.RopeScalingType(rope["rope_type"])
    keys["rope_scaling_factor"] = rope["factor"]
    if arch == "gpt-oss":
        keys.update(
            expert_count=cfg.num_local_experts,
            expert_used_count=cfg.num_experts_per_tok,
            expert_feed_forward_length=cfg.intermediate_size,
            rope_scaling_orig_ctx_len=rope["original_max_position_embeddings"],
            rope_scaling_yarn_beta_fast=rope["beta_fast"],
            rope_scaling_yarn_beta_slow=rope["beta_slow"],
        )
    for key, value in keys.items():
        if key != drop_key:
            getattr(w, f"add_{key}")(value)
    if arch == "gemma3":
        w.add_tokenizer_model("llama")
        w.add_token_list(SPM_TOKENS)
        w.add_token_scores(SPM_SCORES)
        w.add_token_types(SPM_TYPES)
        w.add_add_space_prefix(False)  # Gemma3Model.set_vocab
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        w.add_eot_token_id(5)
        w.add_add_bos_token(True)
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-4o")
        w.add_token_list(BPE_TOKENS)
        w.add_token_types(BPE_TYPES)
        w.add_token_merges(["Ġ t", "h e", "Ġt he"])
        w.add_eos_token_id(BPE_TOKENS.index("<|return|>"))
    for name, (a, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


VOCAB = {"gemma3": len(SPM_TOKENS), "gpt-oss": len(BPE_TOKENS)}
CASES = {"gemma3": ("gemma3", False), "gpt-oss": ("gpt-oss", False), "gpt-oss-mxfp4": ("gpt-oss", True)}


@pytest.fixture(scope="module", params=sorted(CASES))
def written(request, tmp_path_factory):
    arch, mxfp4 = CASES[request.param]
    model = _hf_model(arch, VOCAB[arch])
    if mxfp4:  # the reference holds exactly the MXFP4 values the file stores
        with torch.no_grad():
            for mlp in (layer.mlp for layer in model.model.layers):
                for p in (mlp.experts.gate_up_proj, mlp.experts.down_proj):
                    p.copy_(torch.from_numpy(_mxfp4_roundtrip(p.numpy().swapaxes(1, 2)).swapaxes(1, 2)))
    path = tmp_path_factory.mktemp(request.param) / "m.gguf"
    tensors = _llamacpp_tensors(arch, model, mxfp4)
    _write(path, arch, model, tensors)
    return request.param, model, tensors, path


def test_gguf_logits_and_taps_match_transformers(written):
    case, model, tensors, path = written
    arch = CASES[case][0]
    assert any(q == MXFP4 for _, q in tensors.values()) == CASES[case][1]
    target = load_target(path)
    cfg = target.config
    want_types = (("sliding_attention",) * 5 + ("full_attention",)) if arch == "gemma3" else None
    assert cfg.layer_types == (want_types or tuple(model.config.layer_types)) and cfg.sliding_window == WINDOW
    if arch == "gemma3":
        assert (cfg.local_rope_theta, cfg.query_pre_attn_scalar, cfg.rope_scaling) == (
            1e4,
            8.0,
            {"rope_type": "linear", "factor": 4.0},
        )
        assert cfg.eos_token_ids == (1, 5) and cfg.tie_word_embeddings
    else:
        assert cfg.rope_scaling["truncate"] is False and (cfg.num_experts, cfg.num_experts_per_tok) == (4, 2)
    ids = np.random.default_rng(1).integers(0, VOCAB[arch], (2, 12)).astype(np.int64)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_hidden_states=True)
    ref = out.logits.numpy()
    np.testing.assert_allclose(target.logits(ids), ref, atol=1e-4 * np.abs(ref).max(), rtol=0)
    n = model.config.num_hidden_layers
    layer_ids = (n - 1, 0, 1)  # the last id is HF's post-norm hidden_states[n]
    want = np.concatenate([out.hidden_states[i + 1].numpy() for i in layer_ids], axis=-1)
    np.testing.assert_allclose(target.taps(ids, layer_ids), want, atol=1e-4 * np.abs(want).max(), rtol=0)


TEXTS = [
    "Hello world",
    "the wor ld  is\n\nHé llé",
    "  leading and trailing  ",
    "unicode ünï 日本語 🙂 and bytes \x01\x7f\t",
    "<start_of_turn>user\nhe is in<end_of_turn>\n",
    "",
]
# "abc" merges before "▁a": SentencePiece-BPE (and llama.cpp) give ▁ abc abc; a Unigram over the same scores (what
# transformers' GGUFGemmaConverter builds) prefers ▁a bc, so only the llama.cpp oracle judges this one.
BPE_ONLY = "abc abcabc\tabc"


def _llamacpp_spm(text):
    """llama.cpp's SentencePiece tokenizer (src/llama-vocab.cpp ``llm_tokenizer_spm``), for the test vocab: control
    tokens split out whole; spaces -> ``▁``; repeatedly merge the adjacent pair whose concatenation is the
    highest-scoring piece (leftmost on ties); symbols outside the vocab as their UTF-8 ``<0xNN>`` pieces."""
    ids = {t: i for i, t in enumerate(SPM_TOKENS)}
    out = []
    for part in re.split("(<start_of_turn>|<end_of_turn>)", text):
        if part in ids:
            out.append(ids[part])
            continue
        syms = list(part.replace(" ", "▁"))
        while True:
            pairs = [(SPM_SCORES[ids[a + b]], -i) for i, (a, b) in enumerate(zip(syms, syms[1:])) if a + b in ids]
            if not pairs:
                break
            i = -max(pairs)[1]
            syms[i : i + 2] = [syms[i] + syms[i + 1]]
        for sym in syms:
            out += [ids[sym]] if sym in ids else [ids[f"<0x{b:02X}>"] for b in sym.encode()]
    return out


@pytest.mark.parametrize("written", ["gemma3"], indirect=True)
def test_spm_tokenizer_matches_llamacpp_and_transformers_gguf_conversion(written):
    path = written[-1]
    ours = load_target(path).tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS + [BPE_ONLY]:
        got = ours.encode(text, add_special_tokens=False).ids
        assert got == _llamacpp_spm(text), text
        if text != BPE_ONLY:
            assert got == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(got, skip_special_tokens=False) == text
    assert [SPM_TOKENS[i] for i in ours.encode(BPE_ONLY, add_special_tokens=False).ids][:3] == ["abc", "▁", "abc"]
    assert ours.encode("he").ids == [2, SPM_TOKENS.index("he")]  # tokenizer.ggml.add_bos_token


@pytest.mark.parametrize("written", ["gpt-oss"], indirect=True)
def test_o200k_pre_tokenizer_for_gpt_4o_and_unknown_pre_refused(written):
    tok = load_target(written[-1]).tokenizer
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("Hello World's 12345 HelloWorld")]
    assert pieces == ["Hello", "ĠWorld's", "Ġ", "123", "45", "ĠHello", "World"]  # o200k: case split, digits by 3
    assert tok.encode("the<|end|>").ids == [BPE_TOKENS.index(t) for t in ("t", "he", "<|end|>")]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.tokens": BYTES}
    with pytest.raises(ValueError, match="x.gguf: tokenizer.ggml.pre='llama-bpe' is not supported.*gpt-4o"):
        tok_lib.gguf_tokenizer(meta, "x.gguf")


@pytest.mark.parametrize("written", ["gpt-oss", "gemma3"], indirect=True)
def test_malformed_gguf_names_key_or_tensor(written, tmp_path):
    case, model, tensors, _ = written
    arch = CASES[case][0]
    bad = tmp_path / "bad.gguf"
    drop = "expert_count" if arch == "gpt-oss" else "block_count"
    _write(bad, arch, model, tensors, drop_key=drop)
    with pytest.raises(ValueError, match=f"bad.gguf: metadata key '{arch}.{drop}' is missing"):
        load_target(bad)
    name = "blk.1.attn_sinks.weight" if arch == "gpt-oss" else "blk.1.post_ffw_norm.weight"
    _write(bad, arch, model, {**tensors, name: (np.zeros(3, np.float32), None)})
    with pytest.raises(ValueError, match=rf"bad.gguf: tensor '{name}' has shape \(3,\), the config implies"):
        load_target(bad)
    _write(bad, arch, model, {k: v for k, v in tensors.items() if k != name})
    with pytest.raises(ValueError, match=f"bad.gguf: tensor '{name}' .* is missing"):
        load_target(bad)
    name = "blk.0.attn_q.weight"
    _write(bad, arch, model, {**tensors, name: (tensors[name][0].astype(np.int32), None)})  # written as I32
    with pytest.raises(ValueError, match=f"bad.gguf: tensor '{name}' has quantisation type I32, not supported"):
        load_target(bad)


@pytest.mark.parametrize("written", ["gpt-oss"], indirect=True)
def test_gpt_oss_fused_gate_up_experts(written, tmp_path):
    """llama.cpp's ``--fuse-gate-up-exps`` layout: ``ffn_gate_up_exps`` = gate rows, then up rows."""
    _, model, tensors, _ = written
    fused = dict(tensors)
    for i in range(model.config.num_hidden_layers):
        for kind in ("weight", "bias"):
            gate, up = (fused.pop(f"blk.{i}.ffn_{p}_exps.{kind}")[0] for p in ("gate", "up"))
            fused[f"blk.{i}.ffn_gate_up_exps.{kind}"] = (np.concatenate([gate, up], axis=1), None)
    _write(tmp_path / "f.gguf", "gpt-oss", model, fused)
    ids = np.random.default_rng(2).integers(0, VOCAB["gpt-oss"], (1, 9)).astype(np.int64)
    with torch.no_grad():
        ref = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(load_target(tmp_path / "f.gguf").logits(ids), ref, atol=1e-4 * np.abs(ref).max())


def _gemma3_meta(**extra):
    meta = {"general.architecture": "gemma3", "tokenizer.ggml.tokens": SPM_TOKENS}
    dims = dict(block_count=62, embedding_length=64, feed_forward_length=96, context_length=128)
    dims.update({"attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 8})
    return meta | {f"gemma3.{k}": v for k, v in (dims | extra).items()}


def test_gemma3_metadata_rules_of_llamacpp():
    """The 62-layer 27B scales attention by (H / heads)**-0.5, other sizes by head_dim**-0.5; no sliding window
    means all layers full; logit soft-capping is refused with the key named."""
    from dflash_jax.models.gguf_io import config_from_metadata

    cfg = config_from_metadata(_gemma3_meta(), set(), "g.gguf")
    assert cfg.query_pre_attn_scalar == 16.0 and cfg.layer_types is None and cfg.local_rope_theta == 1e4
    cfg = config_from_metadata(_gemma3_meta(block_count=12, **{"attention.sliding_window": 4}), set(), "g.gguf")
    assert cfg.query_pre_attn_scalar == 8.0 and cfg.layer_types.count("full_attention") == 2
    with pytest.raises(ValueError, match="g.gguf: metadata gemma3.final_logit_softcapping is not supported"):
        config_from_metadata(_gemma3_meta(final_logit_softcapping=30.0), set(), "g.gguf")
    with pytest.raises(ValueError, match="g.gguf: metadata gemma3.rope.scaling.type='longrope' is not supported"):
        config_from_metadata(_gemma3_meta(**{"rope.scaling.type": "longrope"}), set(), "g.gguf")


def test_spm_tokenizer_add_eos_and_space_prefix_flags():
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": SPM_TOKENS,
        "tokenizer.ggml.scores": SPM_SCORES,
        "tokenizer.ggml.token_type": SPM_TYPES,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.add_eos_token": True,
    }
    tok = tok_lib.gguf_tokenizer(meta, "t.gguf").tokenizer  # add_space_prefix absent: llama.cpp's default, true
    assert [SPM_TOKENS[i] for i in tok.encode("the").ids] == ["▁the", "<eos>"]
    with pytest.raises(ValueError, match="t.gguf: tokenizer.ggml.scores is missing"):
        tok_lib.gguf_tokenizer({k: v for k, v in meta.items() if k != "tokenizer.ggml.scores"}, "t.gguf")


@pytest.mark.parametrize("written", ["gemma3"], indirect=True)
def test_gemma3_file_reads_back_in_transformers_gguf_loader(written):
    """The test-side writer's conventions (names, ``w + 1`` norms) are llama.cpp's as transformers reads them:
    its own GGUF reader (``load_gguf_checkpoint``) recovers the HF state dict. (Its gpt-oss reader does not
    parse llama.cpp's files in 5.14.1, so gpt-oss has no such cross-check.)"""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    _, model, _, path = written
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(tensors) == set(state)
    for name, ref in state.items():
        np.testing.assert_allclose(tensors[name].numpy(), ref.numpy(), atol=1e-6, rtol=0, err_msg=name)
