"""The PyTorch reference (nvidia-modelopt 0.47.0 ``hf_dflash``) as a numpy-in/numpy-out oracle.

This is the only module that imports the reference. The import is lazy (first call of :func:`hf_dflash`, ~6-12 s)
and skips the calling test cleanly when torch / modelopt are absent. ``HFDFlashModel`` methods are called unbound
with a ``SimpleNamespace`` standing in for ``self`` (docs/design.md §5). All wrappers work in float32.
"""

from __future__ import annotations

import functools
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest


@functools.cache
def hf_dflash() -> ModuleType:
    """The reference module ``modelopt.torch.speculative.plugins.hf_dflash`` (skips the test if unavailable)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return pytest.importorskip("modelopt.torch.speculative.plugins.hf_dflash")


def _torch():
    hf_dflash()
    import torch

    return torch


def _t(x, dtype=None):
    torch = _torch()
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def ref_dpace_weights(conf, alpha, valid_mask=None) -> np.ndarray:
    """``_dpace_position_weights`` on float32 ``conf [..., L]`` (optional 0/1 ``valid_mask``)."""
    torch = _torch()
    mask = None if valid_mask is None else _t(valid_mask, torch.float32)
    out = hf_dflash()._dpace_position_weights(_t(conf, torch.float32), alpha, valid_mask=mask)
    return out.numpy()


def _compute_loss_torch(
    logits, input_ids, anchors, keep, loss_mask, base_logits, *, block_size, objective, alpha, gamma
):
    """Run the unbound ``HFDFlashModel._compute_loss``; returns ``(logits_tensor [B,N*bs,V], loss, accuracy)``."""
    torch = _torch()
    self = SimpleNamespace(
        dflash_block_size=block_size,
        dflash_loss_objective=objective,
        dflash_dpace_alpha=alpha,
        dflash_loss_decay_factor=gamma,
    )
    arr = np.asarray(logits, np.float32)
    x = _t(arr.reshape(arr.shape[0], -1, arr.shape[-1])).requires_grad_(True)
    base = None if base_logits is None else _t(base_logits, torch.float32)
    loss, acc = hf_dflash().HFDFlashModel._compute_loss(
        self,
        x,
        _t(input_ids, torch.long),
        _t(anchors, torch.long),
        _t(keep, torch.bool),
        _t(loss_mask, torch.float32),
        base,
    )
    return x, loss, float(acc)


def ref_compute_loss(
    logits, input_ids, anchors, keep, loss_mask, base_logits=None, *, block_size, objective, alpha, gamma
) -> tuple[float, float]:
    """Unbound ``HFDFlashModel._compute_loss`` -> ``(loss, accuracy)``.

    ``logits [B, N*bs, V]`` or ``[B, N, bs, V]``; ``input_ids [B,S]``; ``anchors/keep [B,N]``; ``loss_mask [B,S]``;
    ``base_logits [B,S,V]`` for KD mode, ``None`` for CE.
    """
    _, loss, acc = _compute_loss_torch(
        logits,
        input_ids,
        anchors,
        keep,
        loss_mask,
        base_logits,
        block_size=block_size,
        objective=objective,
        alpha=alpha,
        gamma=gamma,
    )
    return float(loss.detach()), acc


def ref_compute_loss_grad(
    logits, input_ids, anchors, keep, loss_mask, base_logits=None, *, block_size, objective, alpha, gamma
) -> np.ndarray:
    """Gradient of :func:`ref_compute_loss`'s loss w.r.t. ``logits`` (returned in the shape of ``logits``)."""
    x, loss, _ = _compute_loss_torch(
        logits,
        input_ids,
        anchors,
        keep,
        loss_mask,
        base_logits,
        block_size=block_size,
        objective=objective,
        alpha=alpha,
        gamma=gamma,
    )
    loss.backward()
    return x.grad.numpy().reshape(np.shape(logits))


def ref_position_ids(seq_len, anchors, block_size) -> np.ndarray:
    """Unbound ``_build_position_ids`` -> int ``[B, S + N*bs]``."""
    torch = _torch()
    self = SimpleNamespace(dflash_block_size=block_size)
    out = hf_dflash().HFDFlashModel._build_position_ids(self, seq_len, _t(anchors, torch.long), "cpu")
    return out.numpy()


def ref_attention_mask(seq_len, anchors, keep, block_size, window=None, causal=False) -> np.ndarray:
    """Unbound ``_build_draft_attention_mask`` as a bool ``[B, Q, S+Q]`` array (True = attend)."""
    torch = _torch()
    self = SimpleNamespace(dflash_block_size=block_size, dflash_draft_attention="causal" if causal else "bidirectional")
    anchors_t = _t(anchors, torch.long)
    out = hf_dflash().HFDFlashModel._build_draft_attention_mask(
        self, seq_len, anchors_t, _t(keep, torch.bool), anchors_t.shape[1], torch.float32, "cpu", window=window
    )
    return (out[:, 0] == 0).numpy()


def ref_sample_anchors(seq_len, loss_mask, block_size, num_anchors, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """Unbound ``_sample_anchor_positions`` (torch RNG seeded with ``seed``) -> ``(anchors, keep)``."""
    torch = _torch()
    torch.manual_seed(seed)
    self = SimpleNamespace(dflash_block_size=block_size, _num_anchors=num_anchors)
    anchors, keep = hf_dflash().HFDFlashModel._sample_anchor_positions(
        self, seq_len, _t(loss_mask, torch.float32), "cpu"
    )
    return anchors.numpy(), keep.numpy()


def ref_build_target_layer_ids(num_target_layers, num_draft_layers) -> list[int]:
    """``modeling_dflash.build_target_layer_ids``."""
    hf_dflash()
    from modelopt.torch.speculative.plugins.modeling_dflash import build_target_layer_ids

    return list(build_target_layer_ids(num_target_layers, num_draft_layers))


# ---------------------------------------------------------------------------------------------------------
# Model-level oracle (docs/design.md §5): a tiny fp32 target converted to DFlash, injected anchors
# ---------------------------------------------------------------------------------------------------------


def ref_tiny_dflash_model(
    family: str = "qwen3",
    *,
    hidden=32,
    target_layers=6,
    vocab=64,
    draft_layers=2,
    draft_heads=4,
    draft_kv_heads=2,
    head_dim=8,
    intermediate=64,
    rope_theta=1e4,
    block_size=4,
    mask_token_id=0,
    target_layer_ids=None,
    swa_window=None,
    causal=False,
    attention_sink=False,
    seed=1234,
):
    """A tiny fp32 HF ``family`` ("qwen3" or "llama") target converted with ``mtsp.convert(.., "dflash")``.

    Every draft dim is explicit (docs/design.md §4.2); the target uses the same ``rope_theta`` so that the reference
    exporter, which writes the target's theta, describes the draft truthfully. Draft norm weights are set to
    ``1 + 0.1*randn`` so that parity also exercises them. ``attention_sink``: ``dflash_attention_sink`` with sink
    logits ``0.5*randn`` (run eagerly: the reference's lazily ``torch.compile``d sink function is swapped for its own
    eager implementation, which its docstring calls numerically interchangeable). Returns the converted model in
    train mode.
    """
    torch = _torch()
    import modelopt.torch.speculative as mtsp
    import transformers

    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=target_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=vocab,
        max_position_embeddings=128,
        rope_theta=rope_theta,
    )
    if family == "qwen3":
        target_cfg = transformers.Qwen3Config(**common)
    elif family == "llama":
        target_cfg = transformers.LlamaConfig(**common)
    else:
        raise ValueError(f"family must be 'qwen3' or 'llama', got {family!r}")
    model = transformers.AutoModelForCausalLM.from_config(target_cfg).float()
    arch = dict(
        num_hidden_layers=draft_layers,
        num_attention_heads=draft_heads,
        num_key_value_heads=draft_kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        rope_theta=rope_theta,
    )
    if target_layer_ids is not None:
        arch["target_layer_ids"] = list(target_layer_ids)
    cfg = {
        "dflash_block_size": block_size,
        "dflash_use_torch_compile": False,
        "dflash_mask_token_id": mask_token_id,
        "dflash_swa_window_size": swa_window,
        "dflash_architecture_config": arch,
        "dflash_draft_attention": "causal" if causal else "bidirectional",
        "dflash_attention_sink": attention_sink,
    }
    if attention_sink:
        from modelopt.torch.speculative.plugins import modeling_dflash

        modeling_dflash._compiled_sink_attention = modeling_dflash._sink_attention_impl
    mtsp.convert(model, [("dflash", cfg)])
    with torch.no_grad():
        for name, p in model.dflash_module.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("attention_sink_bias"):
                p.copy_(0.5 * torch.randn_like(p))
    model.train()
    return model


def ref_draft_state(model) -> dict[str, np.ndarray]:
    """The reference draft's weights by export name (torch ``[out, in]`` layout), float32 numpy."""
    return {
        k: v.detach().float().numpy().copy()
        for k, v in model.dflash_module.state_dict().items()
        if "rotary_emb" not in k
    }


def ref_dflash_forward(
    model, input_ids, labels, anchors, keep, *, objective="dpace", alpha=0.5, gamma=0.0, kd=True
) -> dict:
    """One reference training forward + backward with injected ``(anchors, keep)``.

    Returns numpy ``loss``, ``acc``, ``draft_logits [B, N*bs, V]`` (captured at ``lm_head``), ``target_hidden
    [B, S, T*H]`` and ``base_logits [B, S, V]`` (the target's own outputs), ``embed [V, H]``, ``lm_head [V, H]``,
    ``target_layer_ids`` and ``grads`` (draft parameter gradients by export name).
    """
    torch = _torch()
    ids = _t(input_ids, torch.long)
    lab = _t(labels, torch.long)
    mask = torch.ones_like(ids)
    model.eval()
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    model.train()
    target_hidden = torch.cat([base.hidden_states[i + 1] for i in model.target_layer_ids], dim=-1)
    model.dflash_loss_objective = objective
    model.dflash_dpace_alpha = alpha
    model.dflash_loss_decay_factor = gamma
    model.dflash_self_logit_distillation = kd
    anchors_t, keep_t = _t(anchors, torch.long), _t(keep, torch.bool)
    model._sample_anchor_positions = lambda seq_len, loss_mask, device: (anchors_t, keep_t)
    captured = []
    handle = model.lm_head.register_forward_hook(lambda mod, inp, out: captured.append(out.detach().clone()))
    try:
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, attention_mask=mask, labels=lab)
        out.loss.backward()
    finally:
        handle.remove()
        del model._sample_anchor_positions
    grads = {
        k: (p.grad.numpy().copy() if p.grad is not None else np.zeros(tuple(p.shape), np.float32))
        for k, p in model.dflash_module.named_parameters()
    }
    return dict(
        loss=out.loss.item(),
        acc=float(out.train_acc[0][0]),
        draft_logits=captured[-1].numpy(),
        target_hidden=target_hidden.numpy(),
        base_logits=base.logits.numpy(),
        embed=model.get_input_embeddings().weight.detach().numpy().copy(),
        lm_head=model.lm_head.weight.detach().numpy().copy(),
        target_layer_ids=list(model.target_layer_ids),
        grads=grads,
    )


def ref_load_draft(model, tensors: dict) -> None:
    """``model.dflash_module.load_state_dict(tensors, strict=True)`` from numpy/torch tensors."""
    torch = _torch()
    model.dflash_module.load_state_dict(
        {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in tensors.items()}, strict=True
    )


def ref_export(model, out_dir) -> None:
    """The reference exporter (``DFlashExporter``) writing ``out_dir`` in float32."""
    torch = _torch()
    model.get_exporter().export(out_dir, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# Speculative-decoding oracle (docs/design.md §4.10): pseudo_speculative_generate, AcceptanceRateValidation
# ---------------------------------------------------------------------------------------------------------


def ref_save_target(model, out_dir) -> None:
    """``save_pretrained`` of the converted model: an HF checkpoint whose base weights our ``load_target`` reads."""
    model.save_pretrained(out_dir)


def _ref_verify(model, ids, base, drafts) -> int:
    """Accepted drafts of one block: the reference's greedy posterior check (``validate_online`` step 3)."""
    torch = _torch()
    cand = torch.cat([ids, base, drafts], dim=-1)
    with torch.no_grad():
        posterior = model._base_model_lm_head(model._base_model(cand).last_hidden_state).argmax(-1)
    pos = ids.shape[1]  # index of the base token in the candidate
    match = (posterior[0, pos : pos + drafts.shape[1]] == drafts[0]).long()
    return int(torch.cumprod(match, 0).sum())


def ref_zlab_generate(model, prompt, max_new_tokens) -> tuple[list[int], list[int]]:
    """z-lab loop built on ``pseudo_speculative_generate`` (no KV cache): per step the base token is the last
    committed token, the drafts are verified by a full target forward and ``accepted + 1`` tokens are committed
    (the bonus is the next call's base token). Returns ``(generated tokens, accepted per step)``."""
    torch = _torch()
    model.eval()
    ids = _t(np.asarray(prompt)[None], torch.long)
    steps = model.dflash_block_size - 1
    with torch.no_grad():
        base, drafts = model.pseudo_speculative_generate(ids, steps=steps)
        out, accepted = [int(base)], []
        while len(out) < max_new_tokens:
            a = _ref_verify(model, ids, base, drafts)
            accepted.append(a)
            out += [int(t) for t in drafts[0, :a]]
            ids = torch.cat([ids, base, drafts[:, :a]], dim=-1)
            base, drafts = model.pseudo_speculative_generate(ids, steps=steps)
            out.append(int(base))
    return out[:max_new_tokens], accepted


def ref_validate_online(model, prompt, osl) -> tuple[list[np.ndarray], list[int], float]:
    """``AcceptanceRateValidation.validate_online`` (steps = bs - 1) with the states it visits recorded.

    Returns ``(states, accepted, ar)``: ``states[k]`` the token ids ``pseudo_speculative_generate`` saw at
    iteration ``k``; ``accepted[k]`` its accepted drafts, read off the next state (drafts are appended while they
    match, then the differing correction), for every iteration but the last (which ``isl + osl`` may cut).
    """
    torch = _torch()
    hf_dflash()
    from modelopt.torch.speculative.utils import AcceptanceRateValidation

    states, proposals = [], []
    original = model.pseudo_speculative_generate

    def recording(input_ids, steps=1):
        base, drafts = original(input_ids, steps=steps)
        states.append(input_ids[0].numpy().copy())
        proposals.append(drafts[0].numpy().copy())
        return base, drafts

    tokenizer = SimpleNamespace(chat_template="", eos_token="</s>", convert_tokens_to_ids=lambda tok: -1)
    model.pseudo_speculative_generate = recording
    try:
        validator = AcceptanceRateValidation(model, tokenizer)
        _, ar = validator.validate_online(
            osl, input_ids=_t(np.asarray(prompt)[None], torch.long), steps=model.dflash_block_size - 1
        )
    finally:
        del model.pseudo_speculative_generate
    accepted = []
    for k, (state, drafts) in enumerate(zip(states[:-1], proposals)):  # the last one may be cut by isl + osl
        tail = states[k + 1][len(state) + 1 :]
        a = 0
        while a < len(drafts) and a < len(tail) and tail[a] == drafts[a]:
            a += 1
        accepted.append(a)
    return states, accepted, float(ar)
