"""Speculative-decoding evaluation: input checks, per-prompt runs, metrics, JSON and histogram PNG.

Metrics (z-lab / vLLM definition, docs/design.md §4.10): one verify step commits ``a + 1`` tokens (``a`` accepted
drafts plus the target's bonus/correction token, at most ``bs``).

* ``tau``: mean tokens committed per target verify forward, pooled over all steps of all prompts
  (``sum(a + 1) / steps``); each ``per_prompt`` entry has its own ``tau``. ``None`` when no step ran.
* ``acceptance_histogram[k]``: number of steps that committed ``k + 1`` tokens (``k = 0..bs-1``); sums to
  ``num_steps``.
* ``per_position_acceptance[i]``: fraction of steps whose draft ``i + 1`` was accepted (``a >= i + 1``).
* ``tokens_per_s_spec`` / ``tokens_per_s_plain``: generated tokens per second of the compiled speculative and
  plain-target loops (same machine, compile time excluded); ``speedup`` is their ratio.
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Sequence

import numpy as np

from dflash_jax.eval import speculative


def _check_compatible(target, draft_cfg) -> None:
    """ValueError naming the first draft field that disagrees with the target (before any compute)."""
    tc = target.config
    if draft_cfg.hidden_size != tc.hidden_size:
        raise ValueError(f"draft hidden_size={draft_cfg.hidden_size} != target hidden_size={tc.hidden_size}")
    if draft_cfg.vocab_size != tc.vocab_size:
        raise ValueError(f"draft vocab_size={draft_cfg.vocab_size} != target vocab_size={tc.vocab_size}")
    bad = [i for i in draft_cfg.target_layer_ids if not 0 <= i < tc.num_layers]
    if bad:
        raise ValueError(
            f"draft target_layer_ids {list(draft_cfg.target_layer_ids)} has ids {bad} outside the "
            f"target's layers [0, {tc.num_layers})"
        )
    if draft_cfg.num_target_layers != tc.num_layers:
        raise ValueError(f"draft num_target_layers={draft_cfg.num_target_layers} != target num_layers={tc.num_layers}")


def _check_prompts(prompts: Sequence[np.ndarray], vocab_size: int) -> list[np.ndarray]:
    if len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of 1-D token-id arrays")
    out = []
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(
                f"prompts[{i}] must be a non-empty 1-D integer array, got shape {arr.shape} dtype {arr.dtype}"
            )
        if arr.min() < 0 or arr.max() >= vocab_size:
            raise ValueError(f"prompts[{i}] has token ids outside [0, vocab_size={vocab_size})")
        out.append(arr.astype(np.int32))
    return out


def evaluate(
    target,
    draft_model,
    draft_cfg,
    prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    check_lossless: bool = False,
    block_size: int | None = None,
    max_cache_len: int | None = None,
    max_prompt_len: int | None = None,
    eos_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Speculative decoding of every prompt with ``draft_model`` (a ``DFlashDraft``) against ``target`` (a
    ``Target``), plus plain target decoding of the same prompts for the speedup baseline.

    ``block_size``: verified block (default ``draft_cfg.block_size``; smaller = fewer speculative tokens).
    ``max_cache_len`` (default ``target.config.max_position_embeddings``): prompts longer than
    ``min(max_prompt_len, max_cache_len - max_new_tokens - block_size)`` keep their last tokens; one warning
    says how many prompts and tokens were cut, and ``truncated_prompts`` / ``truncated_prompt_tokens`` count them.
    ``eos_token_ids`` (default the target's) stop generation. ``check_lossless`` (greedy only) compares every
    speculative output with the plain target's; at ``temperature > 0`` ``lossless`` is ``None``.
    Returns a JSON-ready dict (see the module docstring for the metric definitions).
    """
    _check_compatible(target, draft_cfg)
    if draft_model.cfg != draft_cfg:
        raise ValueError("draft_cfg differs from draft_model.cfg (pass the drafter's own config)")
    tc = target.config
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    bs = int(block_size or draft_cfg.block_size)
    if not 2 <= bs <= draft_cfg.block_size:
        raise ValueError(f"block_size={block_size} must be in [2, draft block_size={draft_cfg.block_size}]")
    prompts = _check_prompts(prompts, tc.vocab_size)
    cache_len = int(max_cache_len or tc.max_position_embeddings)
    limit = cache_len - max_new_tokens - bs
    if limit < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} + block_size={bs} leaves no room for a prompt in a "
            f"cache of max_cache_len={cache_len}"
        )
    why = f"max_cache_len {cache_len} - max_new_tokens {max_new_tokens} - block_size {bs}"
    if max_prompt_len is not None and max_prompt_len < limit:
        limit, why = int(max_prompt_len), "the prompt length limit (eval.prompt_len / --prompt-len)"
    long = [i for i, p in enumerate(prompts) if p.size > limit]
    dropped = sum(prompts[i].size - limit for i in long)
    if long:
        warnings.warn(
            f"{len(long)} of {len(prompts)} prompts (prompts{long[:8]}{'...' if len(long) > 8 else ''}) "
            f"have more than {limit} tokens ({why}); keeping their last {limit} tokens drops {dropped} "
            "prompt tokens, including the start of each (system turn, instructions)",
            stacklevel=2,
        )
    eos = tuple(tc.eos_token_ids if eos_token_ids is None else (int(e) for e in eos_token_ids))

    per_prompt, mismatches = [], []
    for i, prompt in enumerate(prompts):
        prompt = prompt[-limit:]
        bucket = speculative.bucket_length(prompt.size, limit)
        kw = dict(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            seed=seed + i,
            eos_token_ids=eos,
            bucket=bucket,
        )
        spec = speculative.speculative_generate(target.model, draft_model, prompt, block_size=bs, **kw)
        plain = speculative.plain_generate(target.model, prompt, **kw)
        same = None
        if check_lossless and temperature == 0.0:
            same = bool(np.array_equal(spec.tokens, plain.tokens))
            if not same:
                mismatches.append(i)
        steps = spec.accepted.size
        per_prompt.append(
            {
                "prompt_tokens": int(prompt.size),
                "new_tokens": int(spec.tokens.size),
                "num_steps": int(steps),
                "tau": float(np.mean(spec.accepted + 1)) if steps else None,
                "accepted": spec.accepted.tolist(),
                "seconds_spec": spec.seconds,
                "seconds_plain": plain.seconds,
                "lossless": same,
                "tokens": spec.tokens.tolist(),
            }
        )
    return summarize(
        per_prompt,
        bs,
        mismatches=mismatches,
        check_lossless=check_lossless and temperature == 0.0,
        extra={
            "max_new_tokens": int(max_new_tokens),
            "temperature": float(temperature),
            "truncated_prompts": len(long),
            "truncated_prompt_tokens": int(dropped),
        },
    )


def summarize(
    per_prompt: list[dict], block_size: int, *, mismatches: list[int], check_lossless: bool, extra: dict | None = None
) -> dict[str, Any]:
    """Aggregate per-prompt records (``accepted``, ``new_tokens``, ``seconds_spec``, ``seconds_plain``)."""
    acc = np.concatenate([np.asarray(p["accepted"], np.int64) for p in per_prompt]) if per_prompt else np.zeros(0)
    steps = int(acc.size)
    hist = np.bincount(acc, minlength=block_size)[:block_size] if steps else np.zeros(block_size, np.int64)
    tokens = sum(p["new_tokens"] for p in per_prompt)
    t_spec = sum(p["seconds_spec"] for p in per_prompt)
    t_plain = sum(p["seconds_plain"] for p in per_prompt)
    tps_spec = tokens / t_spec if t_spec > 0 else None
    tps_plain = tokens / t_plain if t_plain > 0 else None
    return {
        "tau": float(np.mean(acc + 1)) if steps else None,
        "speedup": tps_spec / tps_plain if tps_spec and tps_plain else None,
        "num_prompts": len(per_prompt),
        "num_steps": steps,
        "num_tokens": int(tokens),
        "block_size": int(block_size),
        "acceptance_histogram": hist.astype(int).tolist(),
        "per_position_acceptance": [float(np.mean(acc >= i)) if steps else 0.0 for i in range(1, block_size)],
        "tokens_per_s_spec": tps_spec,
        "tokens_per_s_plain": tps_plain,
        "lossless": (not mismatches) if check_lossless else None,
        "mismatches": list(mismatches),
        **(extra or {}),
        "per_prompt": per_prompt,
    }


def write_report(result: dict[str, Any], out_dir: str | os.PathLike) -> dict[str, str]:
    """Write ``eval.json`` and ``acceptance_histogram.png`` (matplotlib Agg) into ``out_dir``; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "eval.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    hist = result["acceptance_histogram"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(np.arange(1, len(hist) + 1), hist, color="tab:blue")
    tau = result.get("tau")
    ax.set_title(f"tokens per verify step (tau = {tau:.3f})" if tau is not None else "tokens per verify step")
    ax.set_xlabel("tokens committed per target forward (accepted + 1)")
    ax.set_ylabel("steps")
    ax.set_xticks(np.arange(1, len(hist) + 1))
    fig.tight_layout()
    png_path = os.path.join(out_dir, "acceptance_histogram.png")
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return {"json": json_path, "png": png_path}
