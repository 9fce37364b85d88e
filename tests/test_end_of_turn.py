"""End of turn, read off the chat template: for Gemma-, Llama-3- and ChatML-style templates (GGUF-style vocabs
saved as HF checkpoints of a tiny random target) the token written right after an assistant's content is found by
the renderer's probe, joins the loaded target's ``eos_token_ids``, stops greedy generation and lies inside the
loss span (the EOS token differs from it in all three). GGUF ``eot``/``eom`` ids join ``eos_token_ids`` too."""

import json

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from dflash_jax import generate
from dflash_jax.data import chat
from dflash_jax.models import gguf_io
from dflash_jax.models import tokenizer as tok_lib
from dflash_jax.models.target import TargetConfig
from dflash_jax.models.target_io import load_target, random_target
from test_target import _save_hf

BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())
GEMMA_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
GEMMA_USER_DEFINED = ["\n", "\n\n", "  ", "    ", "<h1>", "</h1>"]  # raw spaces, as llama.cpp's converter writes
GEMMA_CHARS = sorted(set("abcdefghijklmnopqrstuvwxyzHW?.,:()+*=1234 ".replace(" ", "▁")))
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
LLAMA3_CONTROL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _gemma_meta():
    tokens = GEMMA_CONTROL + [f"<0x{b:02X}>" for b in range(256)] + GEMMA_USER_DEFINED + GEMMA_CHARS
    types = [3, 3, 3, 2, 3, 3] + [6] * 256 + [4] * len(GEMMA_USER_DEFINED) + [1] * len(GEMMA_CHARS)
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (len(tokens) - len(GEMMA_CHARS)) + [-1.0] * len(GEMMA_CHARS),
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.bos_token_id": 2,
        "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3,
        "tokenizer.chat_template": GEMMA_TEMPLATE,
    }


def _byte_meta(control, template, eos):
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": control + BYTES,
        "tokenizer.ggml.token_type": [3] * len(control) + [1] * len(BYTES),
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": control.index(eos),
        "tokenizer.chat_template": template,
    }


# name -> (GGUF-style tokenizer metadata, end-of-turn token, EOS token)
STYLES = {
    "gemma": (_gemma_meta(), "<end_of_turn>", "<eos>"),
    "llama3": (_byte_meta(LLAMA3_CONTROL, LLAMA3_TEMPLATE, "<|end_of_text|>"), "<|eot_id|>", "<|end_of_text|>"),
    "chatml": (_byte_meta(CHATML_CONTROL, chat.CHATML_TEMPLATE, "<|endoftext|>"), "<|im_end|>", "<|endoftext|>"),
}


def write_hf_target(path, meta, seed=0):
    """A tiny random llama target saved as an HF checkpoint with the tokenizer of ``meta`` and its template."""
    bundle = tok_lib.gguf_tokenizer(meta, "t.gguf")
    vocab = len(meta["tokenizer.ggml.tokens"])
    eos = int(meta["tokenizer.ggml.eos_token_id"])
    cfg = TargetConfig(
        arch="llama",
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        eos_token_ids=(eos,),
    )
    _save_hf(random_target(cfg, seed=seed).model, cfg, path)
    bundle.tokenizer.save(str(path / "tokenizer.json"))
    tc = {"chat_template": bundle.chat_template, "bos_token": bundle.bos_token, "eos_token": bundle.eos_token}
    (path / "tokenizer_config.json").write_text(json.dumps(tc))
    return eos


@pytest.fixture(scope="module", params=sorted(STYLES))
def style(request, tmp_path_factory):
    meta, eot, eos = STYLES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    write_hf_target(path, meta)
    target = load_target(path)
    return request.param, target, chat.ChatRenderer.from_target(target), eot, eos


def test_end_of_turn_found_in_eos_ids_and_stop_ids(style):
    _, target, renderer, eot, eos = style
    tok = target.tokenizer
    eot_id, eos_id = tok.token_to_id(eot), tok.token_to_id(eos)
    assert renderer.end_of_turn == (eot,) and renderer.end_of_turn_ids == (eot_id,)
    assert target.eos_token_ids == (eos_id, eot_id)  # config.json's EOS, then the template's end of turn
    assert chat.stop_token_ids(target, renderer) == tuple(sorted((eos_id, eot_id)))


def test_end_of_turn_is_inside_the_loss_span(style):
    _, target, renderer, eot, _ = style
    eot_id = target.tokenizer.token_to_id(eot)
    conv = (("user", "Hi"), ("assistant", "Hello."), ("user", "Why?"), ("assistant", "def f(x):\n    return x"))
    ids, mask = renderer.render(conv)
    at = np.flatnonzero(ids == eot_id)
    assert mask[at].tolist() == [0, 1, 0, 1]  # the assistant turns' end-of-turn tokens are training targets
    text = target.tokenizer.decode(ids[mask > 0].tolist(), skip_special_tokens=False)
    assert text == f"Hello.{eot}def f(x):\n    return x{eot}"  # content + end of turn, nothing else
    assert all(mask[i + 1] == 0 for i in at if i + 1 < len(ids))


def test_generation_stops_at_end_of_turn(style):
    """Greedy decoding with the loaded target's own stop ids ends at the end-of-turn token: its ``lm_head`` row
    is set to the row of the token greedy decoding picks at step k (ties go to the lower id), so decoding emits
    the end-of-turn token there and stops; with only the EOS as stop it goes on."""
    _, target, renderer, eot, eos = style
    tok = target.tokenizer
    eot_id, eos_id = tok.token_to_id(eot), tok.token_to_id(eos)
    prompt = renderer.render_prompt((("user", "Hi"), ("assistant", "Hello."), ("user", "Why?")))
    free = generate.greedy_generate(target, prompt, 12, stop_ids=())
    k = next(i for i, t in enumerate(free) if t > eot_id and t not in free[:i] and eot_id not in free[:i])
    head = target.model.lm_head
    head[...] = head[...].at[eot_id].set(head[...][free[k]])
    target._generator = None  # rebuilt for the new weights
    assert generate.greedy_generate(target, prompt, 12) == free[:k] + [eot_id]
    went_on = generate.greedy_generate(target, prompt, 12, stop_ids=(eos_id,))
    assert went_on[: k + 1] == free[:k] + [eot_id] and len(went_on) > k + 1


def test_gguf_eot_and_eom_ids_are_eos_ids():
    meta = {"general.architecture": "llama", "tokenizer.ggml.tokens": ["a"] * 8}
    dims = {"block_count": 2, "embedding_length": 32, "feed_forward_length": 48, "attention.head_count": 4}
    meta |= {f"llama.{k}": v for k, v in dims.items()}
    meta |= {"tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.eot_token_id": 5, "tokenizer.ggml.eom_token_id": 6}
    assert gguf_io.config_from_metadata(meta, set(), "m.gguf").eos_token_ids == (1, 5, 6)


def test_regenerate_keeps_newlines_and_indentation_byte_for_byte(tmp_path):
    """``regenerate`` on a Gemma-style target: each answer is the target's greedy tokens decoded (stop excluded)
    equal to the un-skipped decode, so user-defined ``\\n`` / space-run / tag tokens survive. The ``lm_head`` rows
    of all but the user-defined tokens and three characters are zeroed, so that the answers
    are made of them."""
    from decode_oracle import greedy_reference
    from dflash_jax import regenerate as regen

    meta = _gemma_meta()
    write_hf_target(tmp_path / "gemma", meta, seed=4)
    target = load_target(tmp_path / "gemma")
    renderer = chat.ChatRenderer.from_target(target)
    types = np.asarray(meta["tokenizer.ggml.token_type"])
    keep = types == 4
    keep[[meta["tokenizer.ggml.tokens"].index(t) for t in ("x", ":", "▁")]] = True
    head = target.model.lm_head
    head[...] = head[...] * keep[:, None]
    data = tmp_path / "chat.jsonl"
    prompts = ["Write code.", "List fruit:", "Hi", "Why?", "<h1>x</h1>", "a\n  b"]
    data.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "-"}]}) + "\n"
            for p in prompts
        )
    )
    out = tmp_path / "regen.jsonl"
    sampling = regen.Sampling(max_new_tokens=24, batch_size=3, max_prompt_len=64)
    summary = regen.regenerate(target, renderer, str(data), str(out), sampling, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    stop = regen.stop_token_ids(target, renderer)
    answers = []
    for row in rows:
        msgs = [(m["role"], m["content"]) for m in row["messages"]]
        ids = greedy_reference(target.model, renderer.render_prompt(tuple(msgs[:-1])), 24, stop)
        ids = ids[:-1] if ids[-1] in stop else ids
        assert msgs[-1][1] == target.tokenizer.decode(ids, skip_special_tokens=False)
        answers.append(msgs[-1][1])
    assert len(rows) == len(prompts), summary["skip_examples"]
    joined = "".join(answers)
    assert "\n" in joined and "    " in joined  # newlines and indentation were generated and kept


def test_readme_base_model_template():
    """The README's minimal template for base models: the EOS token after an answer is its end of turn."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```jinja\n(.*?)```", readme, re.S).group(1)
    template = "\n".join(line.removeprefix("   ") for line in block.split("\n"))
    renderer = chat.ChatRenderer(chat.byte_chat_tokenizer(), template, eos_token="<|endoftext|>")
    assert renderer.end_of_turn == ("<|endoftext|>",)
    text, spans = renderer.render_text((("user", "Hi"), ("assistant", "Hello.")))
    assert text == "User: Hi\nAssistant: Hello.<|endoftext|>\n" and [text[s:e] for s, e in spans] == [
        "Hello.<|endoftext|>"
    ]
    prompt = renderer.render_prompt((("user", "Hi"),))
    assert renderer.tokenizer.decode(prompt.tolist(), skip_special_tokens=False) == "User: Hi\nAssistant:"
