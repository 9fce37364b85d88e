"""Target model (no torch): KV-cache decoding, packing, tap convention, frozenness, HF/GGUF loaders, bad input."""

import dataclasses
import json
import os

import gguf
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file
from tokenizers import pre_tokenizers

from dflash_jax import load_target
from dflash_jax.models import gguf_io
from dflash_jax.models.hf_io import config_from_hf
from dflash_jax.models.target import KVCache, TargetConfig, TargetModel, make_target_model
from dflash_jax.models.target_io import build_target_model, hf_name, random_target

CFG = TargetConfig(
    arch="qwen3",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_theta=1000.0,
    qk_norm=True,
    attention_bias=True,
    eos_token_ids=(2,),
)
LLAMA = TargetConfig(
    arch="llama",
    vocab_size=300,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    bos_token_id=256,
    eos_token_ids=(257,),
)


# jitted once per distinct shape: eager op-by-op execution is several times slower on 2 CPU cores
fwd = nnx.jit(TargetModel.__call__, static_argnames="layer_ids")
dec = nnx.jit(TargetModel.decode, static_argnames="layer_ids")


@pytest.fixture(scope="module")
def target():
    t = random_target(CFG, seed=1)
    # non-trivial norms so that a wrong norm placement shows up
    for path, var in nnx.to_flat_state(nnx.state(t.model)):
        if path[-1] == "weight":
            var[...] = 1.0 + 0.3 * jax.random.normal(jax.random.key(len(path)), var.shape)
    return t


def _ids(b, s, seed=0, v=CFG.vocab_size):
    return jax.random.randint(jax.random.key(seed), (b, s), 0, v, jnp.int32)


def _torch_layout(model):
    """{HF name: numpy array in torch layout} of a TargetModel."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        name, transpose = hf_name(path)
        a = np.asarray(var[...])
        out[name] = np.ascontiguousarray(a.T) if transpose else a
    return out


def _hf_config(cfg: TargetConfig, **extra):
    d = dict(
        model_type=cfg.arch,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_bias=cfg.attention_bias,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        hidden_act="silu",
        dtype="float32",
        eos_token_id=list(cfg.eos_token_ids),
    )
    d.update(extra)
    return d


def _save_hf(model, cfg, path, shards=1, np_dtype=np.float32, **extra):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(_hf_config(cfg, **extra), f)
    tensors = {k: v.astype(np_dtype) for k, v in _torch_layout(model).items()}
    if shards == 1:
        save_file(tensors, os.path.join(path, "model.safetensors"))
        return
    names = sorted(tensors)
    wm = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, os.path.join(path, fname))
        wm.update({n: fname for n in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)


# ---------------------------------------------------------------------------------------------------------
# model semantics
# ---------------------------------------------------------------------------------------------------------


def test_cached_decoding_equals_full_forward(target):
    m = target.model
    ids = _ids(2, 14)
    lids = (0, 2, 1)
    taps, final = fwd(m, ids, layer_ids=lids)
    cache = m.init_cache(2, 16)
    got_t, got_f = [], []
    for a, b in ((0, 5), (5, 6), (6, 10)):
        t, f, cache = dec(m, ids[:, a:b], cache, layer_ids=lids)
        got_t.append(t)
        got_f.append(f)
    np.testing.assert_array_equal(np.asarray(cache.length), [10, 10])
    np.testing.assert_allclose(np.concatenate(got_t, 1), taps[:, :10], atol=2e-5)
    np.testing.assert_allclose(np.concatenate(got_f, 1), final[:, :10], atol=2e-5)
    # speculative step: propose 4 wrong tokens, accept 1 in row 0 and 3 in row 1 (num_valid), roll back, re-decode
    wrong = (ids[:, 10:14] + 7) % CFG.vocab_size
    wrong = wrong.at[0, 0].set(ids[0, 10]).at[1, :3].set(ids[1, 10:13])
    _, _, spec = dec(m, wrong, cache, layer_ids=lids, num_valid=jnp.array([1, 3]))
    np.testing.assert_array_equal(np.asarray(spec.length), [11, 13])
    rolled = TargetModel.rollback(spec, 11)
    t, f, done = dec(m, ids[:, 11:14], rolled, layer_ids=lids)
    np.testing.assert_allclose(t, taps[:, 11:14], atol=2e-5)
    np.testing.assert_allclose(f, final[:, 11:14], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(done.length), [14, 14])


def test_decode_under_jit_matches_and_drops_overflow(target):
    m = target.model
    ids = _ids(1, 6, seed=3)
    _, final = fwd(m, ids)
    step = nnx.jit(lambda mm, x, c: mm.decode(x, c)[1:])
    f1, c = step(m, ids[:, :4], m.init_cache(1, 6))
    f2, c = step(m, ids[:, 4:], c)
    np.testing.assert_allclose(np.concatenate([f1, f2], 1), final, atol=2e-5)
    full = c.k
    _, c2 = step(m, ids[:, :2], c)  # would write at 6, 7 >= max_len: dropped, cache untouched
    np.testing.assert_array_equal(np.asarray(c2.k), np.asarray(full))


def test_packed_segments_equal_separate_forwards(target):
    m = target.model
    a, b = _ids(1, 5, seed=4), _ids(1, 7, seed=5)
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), jnp.int32)], 1)
    seg = jnp.array([[1] * 5 + [2] * 7 + [0, 0]])
    pos = jnp.array([list(range(5)) + list(range(7)) + [0, 1]])
    taps, final = fwd(m, packed, positions=pos, segment_ids=seg, layer_ids=(1,))
    for x, sl in ((a, slice(0, 5)), (b, slice(5, 12))):
        t, f = fwd(m, x, layer_ids=(1,))
        np.testing.assert_allclose(taps[:, sl], t, atol=2e-5)
        np.testing.assert_allclose(final[:, sl], f, atol=2e-5)
    assert np.all(np.isfinite(np.asarray(final)))


def test_tap_convention_and_logits(target):
    m = target.model
    ids = _ids(2, 6, seed=6)
    taps, final = fwd(m, ids, layer_ids=(2, 0, 0))
    h = CFG.hidden_size
    assert taps.shape == (2, 6, 3 * h)
    np.testing.assert_array_equal(taps[..., :h], final)  # id Lt-1 = post-final-norm (HF quirk)
    np.testing.assert_array_equal(taps[..., h : 2 * h], taps[..., 2 * h :])
    assert not np.allclose(taps[..., :h], taps[..., h : 2 * h])
    assert fwd(m, ids)[0].shape == (2, 6, 0)
    logits = target.logits(ids)
    assert logits.dtype == jnp.float32 and logits.shape == (2, 6, CFG.vocab_size)
    np.testing.assert_allclose(logits, final @ m.lm_head[...].T, atol=1e-5)
    np.testing.assert_allclose(target.taps(ids, [0]), taps[..., h : 2 * h], atol=1e-6)


def test_target_is_frozen(target):
    gdef, state = nnx.split(target.model)
    ids = _ids(1, 4)

    def f(s):
        m = nnx.merge(gdef, s)
        taps, final = m(ids, layer_ids=(0,))
        return taps.sum() + final.sum() + m.logits(final).sum() + m.embed(ids).sum() + m.lm_head_weight().sum()

    grads = jax.jit(jax.grad(f))(state)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))
    assert float(jax.jit(f)(state)) != 0.0


def test_bad_inputs(target):
    m = target.model
    with pytest.raises(ValueError, match="input_ids"):
        m(jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="input_ids"):
        m(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="segment_ids"):
        m(jnp.zeros((2, 4), jnp.int32), segment_ids=jnp.ones((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="positions"):
        m(jnp.zeros((2, 4), jnp.int32), positions=jnp.ones((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="layer_ids"):
        m(jnp.zeros((1, 4), jnp.int32), layer_ids=(3,))
    with pytest.raises(ValueError, match="num_valid"):
        m.decode(jnp.zeros((1, 2), jnp.int32), m.init_cache(1, 4), num_valid=jnp.array([1, 1]))
    with pytest.raises(ValueError, match="rollback"):
        TargetModel.rollback(m.init_cache(2, 4), jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="target arch 'gpt2' is not supported"):  # no family registered for it
        make_target_model(TargetConfig(**{**CFG.__dict__, "arch": "gpt2"}))
    with pytest.raises(ValueError, match="num_key_value_heads"):
        TargetConfig(**{**CFG.__dict__, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="rope_type"):
        TargetConfig(**{**CFG.__dict__, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="dtype"):
        random_target(CFG, dtype="int8")


def test_config_v4_and_v5_semantics():
    rope = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    base = _hf_config(LLAMA)
    v5 = {**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **rope}}
    v4 = {k: v for k, v in base.items() if k not in ("rope_parameters", "dtype")}
    v4.update(rope_theta=5e5, rope_scaling={"rope_type": "llama3", **rope}, torch_dtype="float32")
    a, b = config_from_hf(v5), config_from_hf(v4)
    assert a == b and hash(a) == hash(b)
    assert a.rope_theta == 5e5 and a.rope_scaling["rope_type"] == "llama3" and a.tie_word_embeddings
    assert not np.allclose(a.inv_freq(), config_from_hf(base).inv_freq())
    q2 = config_from_hf({**base, "model_type": "qwen2", "attention_bias": False})
    assert q2.attention_bias and not q2.qk_norm
    assert config_from_hf({**base, "model_type": "qwen3"}).qk_norm
    with pytest.raises(ValueError, match="supported: llama, qwen2, qwen3"):
        config_from_hf({**base, "model_type": "mistral"})
    with pytest.raises(ValueError, match="sliding"):
        config_from_hf({**base, "use_sliding_window": True})


# ---------------------------------------------------------------------------------------------------------
# HF safetensors loader (checkpoints written here with safetensors.numpy; torch parity: test_parity_target.py)
# ---------------------------------------------------------------------------------------------------------


def test_hf_roundtrip_sharded_and_bf16(target, tmp_path):
    ids = _ids(2, 5, seed=7)
    want = np.asarray(target.logits(ids))
    _save_hf(target.model, CFG, tmp_path / "sharded", shards=3)
    got = load_target(tmp_path / "sharded")
    assert got.config == CFG and got.tokenizer is None
    np.testing.assert_allclose(got.logits(ids), want, atol=1e-5)
    _save_hf(target.model, CFG, tmp_path / "bf16", np_dtype=ml_dtypes.bfloat16, dtype="bfloat16")
    got16 = load_target(tmp_path / "bf16", dtype="bfloat16")
    assert got16.model.layers[0].mlp.up_proj.kernel[...].dtype == jnp.bfloat16
    # bf16 weights and compute, unit roundoff u = 2^-8: per layer ~20 roundings of activations (norms, projections,
    # RoPE, scores, softmax, PV, SwiGLU, residuals) and 7 of weight matrices, plus ~4 outside the layers (embedding,
    # final norm, lm_head); K independent roundings add in quadrature: error RMS <= sqrt(K) u of the logits' RMS.
    err = np.linalg.norm(np.asarray(got16.logits(ids), np.float32) - want) / np.linalg.norm(want)
    assert err <= np.sqrt(27 * CFG.num_layers + 4) * 2.0**-8, err


def test_hf_loader_places_onto_shardings(target, tmp_path):
    _save_hf(target.model, CFG, tmp_path / "m")
    mesh = jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    rules = (
        ("embed", "fsdp"),
        ("mlp", "tensor"),
        ("q_heads", "tensor"),
        ("kv_heads", None),
        ("vocab", "tensor"),
        ("norm", None),
    )
    with nnx.logical_axis_rules(rules):
        got = load_target(tmp_path / "m", mesh=mesh)
    k = got.model.layers[1].mlp.up_proj.kernel[...]
    assert k.sharding.spec == jax.P("fsdp", "tensor") and len(k.addressable_shards) == 8
    assert k.addressable_shards[0].data.shape == (CFG.hidden_size // 2, CFG.intermediate_size // 4)
    # no rules in scope: the one rules table (dflash_jax/sharding.py) places it, the same way
    again = load_target(tmp_path / "m", mesh=mesh).model.layers[1].mlp.up_proj.kernel[...]
    assert again.sharding.spec == k.sharding.spec
    ids = _ids(2, 5, seed=8)
    with jax.set_mesh(mesh):
        got_logits = np.asarray(got.logits(ids))
    np.testing.assert_allclose(got_logits, np.asarray(target.logits(ids)), atol=1e-5)


def test_hf_loader_bad_input(target, tmp_path):
    d = tmp_path / "m"
    _save_hf(target.model, CFG, d, shards=2)
    idx = json.load(open(d / "model.safetensors.index.json"))
    # index pointing to an absent file
    bad = dict(idx, weight_map={**idx["weight_map"], "model.norm.weight": "nope.safetensors"})
    json.dump(bad, open(d / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match="nope.safetensors"):
        load_target(d)
    # tensor missing from the index
    wm = dict(idx["weight_map"])
    del wm["model.layers.1.self_attn.k_norm.weight"]
    json.dump(dict(idx, weight_map=wm), open(d / "model.safetensors.index.json", "w"))
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_norm.weight"):
        load_target(d)
    # missing shard file
    json.dump(idx, open(d / "model.safetensors.index.json", "w"))
    os.remove(d / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors"):
        load_target(d)
    # shape mismatch between config and tensors
    _save_hf(target.model, CFG, tmp_path / "s", intermediate_size=40)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.(down|gate|up)_proj"):
        load_target(tmp_path / "s")
    # dtype mismatch between config and tensors
    _save_hf(target.model, CFG, tmp_path / "t", dtype="bfloat16")
    with pytest.raises(ValueError, match=r"model.safetensors: tensor .* stored as float32 .* bfloat16"):
        load_target(tmp_path / "t")
    # unsupported architecture; no weights; not a checkpoint at all
    _save_hf(target.model, CFG, tmp_path / "u", model_type="gpt_neox")
    with pytest.raises(ValueError, match="supported: llama, qwen2, qwen3"):
        load_target(tmp_path / "u")
    os.makedirs(tmp_path / "e")
    with pytest.raises(ValueError, match="config.json"):
        load_target(tmp_path / "e")
    with pytest.raises(ValueError, match="neither"):
        load_target(tmp_path / "x.bin")


# ---------------------------------------------------------------------------------------------------------
# GGUF loader: a tiny llama GGUF written here the way llama.cpp's converter does (Q/K rows permuted)
# ---------------------------------------------------------------------------------------------------------


def _llamacpp_permute(w, n):
    return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model, cfg, arch="llama", qtype=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(64)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = byte_chars + ["<|im_start|>", "<|im_end|>", "Ġt"] + [f"<unused{i}>" for i in range(cfg.vocab_size - 259)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3, 3] + [1] * (cfg.vocab_size - 258))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(256)
    w.add_eos_token_id(257)
    w.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    )
    for name, a in _torch_layout(model).items():
        gname = gguf_io.gguf_name(name, "llama", cfg.num_layers)
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            a = _llamacpp_permute(a, cfg.num_attention_heads if "attn_q" in gname else cfg.num_key_value_heads)
        if qtype is not None and a.ndim == 2 and a.shape[-1] % 32 == 0:  # Q8_0 blocks of 32
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_llama_unpermutes_and_rebuilds_tokenizer(tmp_path):
    src = random_target(LLAMA, seed=3)
    _write_gguf(tmp_path / "m.gguf", src.model, LLAMA)
    got = load_target(tmp_path / "m.gguf")
    assert got.config == dataclasses.replace(LLAMA, max_position_embeddings=64)
    ids = _ids(2, 7, seed=9, v=LLAMA.vocab_size)
    np.testing.assert_allclose(got.logits(ids), src.logits(ids), atol=1e-5)
    text = "Hello <|im_start|>wörld 123"
    enc = got.tokenizer.encode(text)
    assert 256 in enc.ids and enc.ids.count(256) == 1  # special token kept whole
    assert [got.tokenizer.id_to_token(i) for i in got.tokenizer.encode("12").ids] == ["1", "2"]  # digit split
    assert got.tokenizer.decode(enc.ids, skip_special_tokens=False) == text
    assert got.bos_token == "<|im_start|>" and got.eos_token == "<|im_end|>" and got.eos_token_ids == (257,)
    assert "<|im_start|>" in got.chat_template
    # the same tokenizer saved HF-style next to a checkpoint comes back with template and bos/eos strings
    hf = tmp_path / "hf"
    _save_hf(src.model, LLAMA, hf)
    got.tokenizer.save(str(hf / "tokenizer.json"))
    (hf / "tokenizer_config.json").write_text(
        json.dumps(
            {"chat_template": got.chat_template, "bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"}
        )
    )
    back = load_target(hf)
    assert back.tokenizer.encode(text).ids == enc.ids and back.chat_template == got.chat_template
    assert (back.bos_token, back.eos_token) == ("<|im_start|>", "<|im_end|>")


def test_gguf_quantized_and_bad_input(tmp_path):
    src = random_target(LLAMA, seed=4)
    _write_gguf(tmp_path / "q.gguf", src.model, LLAMA, qtype=gguf.GGMLQuantizationType.Q8_0)
    got = load_target(tmp_path / "q.gguf")
    ids = _ids(1, 6, seed=10, v=LLAMA.vocab_size)
    q8 = gguf.GGMLQuantizationType.Q8_0
    emb = np.asarray(src.model.embed_tokens[...])
    np.testing.assert_array_equal(
        np.asarray(got.model.embed_tokens[...]), gguf.quants.dequantize(gguf.quants.quantize(emb, q8), q8)
    )
    np.testing.assert_allclose(got.logits(ids), src.logits(ids), atol=1e-2)
    _write_gguf(tmp_path / "gpt2.gguf", src.model, LLAMA, arch="gpt2")
    with pytest.raises(ValueError, match=r"gpt2.gguf: general.architecture='gpt2' .*supported: llama, qwen2, qwen3"):
        load_target(tmp_path / "gpt2.gguf")
    with pytest.raises(ValueError, match="not found"):
        load_target(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="junk.gguf"):
        load_target(tmp_path / "junk.gguf")


def test_build_target_model_names_tensor_on_shape_mismatch():
    arrays = _torch_layout(random_target(CFG).model)
    arrays["model.norm.weight"] = np.ones((5,), np.float32)
    with pytest.raises(ValueError, match=r"model.norm.weight: shape \(5,\)"):
        build_target_model(CFG, lambda n, s: arrays[n])


def test_kvcache_is_a_pytree(target):
    c = target.model.init_cache(2, 8)
    assert isinstance(jax.tree.map(lambda x: x, c), KVCache)
    assert c.k.shape == (CFG.num_layers, 2, CFG.num_key_value_heads, 8, CFG.head_dim)
