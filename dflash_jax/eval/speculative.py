"""DFlash speculative decoding in JAX (greedy and speculative sampling) and the plain-target baseline.

One verification step (z-lab loop; ModelOpt ``pseudo_speculative_generate``, docs/design.md §4.10):

* state: the target KV cache and the draft context cache both hold the ``L`` committed positions ``0..L-1``;
  the last committed token ``x_L`` sits at position ``L`` and has **no** taps in either cache yet;
* the drafter sees the block ``[x_L, mask × (B-1)]`` (``B`` = the drafter's block size) at positions ``L..``
  with context ``t < L`` and proposes ``d_1..d_{bs-1}`` from slots ``1..bs-1`` (argmax, or samples of
  ``q_i = softmax(z_i / T)``); the verified block size ``bs <= B`` (``bs < B`` = fewer speculative tokens);
* the target verifies ``[x_L, d_1..d_{bs-1}]`` in one cached forward; its row ``i`` gives ``p_i``, the
  distribution of the token at ``L+i+1``;
* greedy: ``a = cumprod(d_{i+1} == argmax p_i).sum()``, bonus ``argmax p_a``; sampling (Leviathan et al. 2023):
  accept ``d_{i+1}`` with probability ``min(1, p_i(d)/q_i(d))``, on the first rejection resample from
  ``norm(max(p_a - q_a, 0))``, if all are accepted sample the bonus from ``p_{bs-1}``;
* commit ``d_1..d_a`` and the bonus (``a + 1`` tokens, at most ``bs``), roll the target cache back to
  ``L + a + 1`` and append the target taps of positions ``L..L+a`` to the draft context cache.

Shapes are static: batch 1, prompts right-padded to a bucket ``P`` (power of two), caches of
``P + max_new_tokens + bs`` slots, a ``lax.while_loop`` over steps. One executable per (bucket, max_new_tokens,
block size, temperature); executables are compiled ahead of time so timings exclude compiles. Plain decoding (the
baseline) is the batched loop of :mod:`dflash_jax.generate` with one row.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dflash_jax import generate
from dflash_jax.generate import bucket_length  # also public here: eval/report.py buckets prompts


class DecodeOutput(NamedTuple):
    """Result of one prompt (host numpy): ``tokens [N]`` int32 (generated tokens, truncated at EOS and
    ``max_new_tokens``), ``accepted [steps]`` int32 accepted drafts per verify step (empty for plain
    decoding), ``seconds`` wall time of the compiled run (compile excluded)."""

    tokens: np.ndarray
    accepted: np.ndarray
    seconds: float


# ---------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------


def verify_block(
    draft_logits: jax.Array, drafts: jax.Array, target_logits: jax.Array, key: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """Accepted count and bonus token of one block.

    ``draft_logits [bs-1, V]`` (the distributions ``drafts [bs-1]`` were drawn from), ``target_logits [bs, V]``
    (row ``i`` predicts the token after block slot ``i``). Returns ``(a, bonus)`` int32 scalars, ``0 <= a <= bs-1``.
    Greedy: longest prefix with ``drafts[i] == argmax target_logits[i]``, bonus ``argmax target_logits[a]``.
    Sampling: accept with ``min(1, p/q)``; bonus from ``norm(max(p_a - q_a, 0))`` (``q_{bs-1} := 0``).
    """
    q = None if temperature == 0.0 else jax.nn.softmax(draft_logits.astype(jnp.float32) / temperature, axis=-1)
    return verify_proposal(q, drafts, target_logits, key, temperature)


def verify_proposal(
    q: jax.Array | None, drafts: jax.Array, target_logits: jax.Array, key: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array]:
    """:func:`verify_block` given the proposal distributions ``q [bs-1, V]`` the drafts were drawn from (any
    proposal: DFlash's ``softmax(z / T)``, DFlash2's selector walk supported on its candidates; unused, may be
    None, at ``temperature == 0``)."""
    n = drafts.shape[0]
    if temperature == 0.0:
        best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)
        a = jnp.sum(jnp.cumprod(drafts == best[:n])).astype(jnp.int32)
        return a, best[a]
    k_u, k_b = jax.random.split(key)
    p = jax.nn.softmax(target_logits.astype(jnp.float32) / temperature, axis=-1)
    idx = jnp.arange(n)
    p_d, q_d = p[idx, drafts], q[idx, drafts]
    u = jax.random.uniform(k_u, (n,))
    a = jnp.sum(jnp.cumprod(u * q_d < p_d)).astype(jnp.int32)
    q_ext = jnp.concatenate([q, jnp.zeros_like(q[:1])], axis=0)
    resid = jnp.maximum(p[a] - q_ext[a], 0.0)
    resid = jnp.where(jnp.sum(resid) > 0, resid, p[a])  # p == q exactly: rejection had probability 0
    bonus = jax.random.categorical(k_b, jnp.log(resid)).astype(jnp.int32)
    return a, bonus


def selector_walk(
    selector, hidden: jax.Array, logits: jax.Array, anchor: jax.Array, key: jax.Array, temperature: float
) -> tuple[jax.Array, jax.Array | None]:
    """DFlash2's walk from the anchor through the per-position candidates: ``(drafts [n] int32, q [n, V] | None)``.

    ``hidden [n, H]`` / ``logits [n, V]`` of the block's draft slots, ``anchor`` the last committed token (the
    predecessor of slot 1). Step ``i`` scores its top-``k`` candidates ``S_i = selector.scores(h_i, U_i, C_i,
    d_{i-1})`` and takes ``argmax S_i`` (greedy) or a sample of ``softmax(S_i / T)``; ``q`` is that proposal
    over the vocabulary (zero off the candidates), what rejection sampling needs to stay lossless."""
    unary, cand = jax.lax.top_k(logits.astype(jnp.float32), selector.top_k)
    keys = jax.random.split(key, hidden.shape[0])

    def step(prev, xs):
        h, u, c, k = xs
        s = selector.scores(h, u, c, prev)
        if temperature == 0.0:
            choice, probs = jnp.argmax(s), jnp.zeros_like(s)
        else:
            choice, probs = jax.random.categorical(k, s / temperature), jax.nn.softmax(s / temperature)
        tok = c[choice].astype(jnp.int32)
        return tok, (tok, probs)

    _, (drafts, probs) = jax.lax.scan(step, jnp.asarray(anchor, jnp.int32), (hidden, unary, cand, keys))
    if temperature == 0.0:
        return drafts, None
    rows = jnp.arange(hidden.shape[0])[:, None]
    return drafts, jnp.zeros(logits.shape, jnp.float32).at[rows, cand].set(probs)


def propose_drafts(draft, hidden: jax.Array, logits: jax.Array, anchor: jax.Array, key: jax.Array, temperature):
    """The drafts of one block and their proposal ``q`` (None when greedy): DFlash samples each slot from
    ``softmax(z / T)`` (argmax at 0); DFlash2 walks its selector (:func:`selector_walk`)."""
    if draft.candidate_selector is not None:
        return selector_walk(draft.candidate_selector, hidden, logits, anchor, key, temperature)
    drafts = generate.sample_logits(logits, key, temperature)
    q = None if temperature == 0.0 else jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return drafts, q


def _write(out: jax.Array, start: jax.Array, values: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_slice(out, values, (start,))


def speculative_decode_fn(
    t_state,
    d_state,
    prompt,
    num_valid,
    key,
    *,
    t_graph,
    d_graph,
    max_new_tokens: int,
    block_size: int,
    temperature: float,
    eos_token_ids: tuple[int, ...],
):
    """Traceable DFlash decoding of one prompt ``[1, P]`` with ``num_valid [1]`` real tokens; the mask token and
    the tapped target layers come from the drafter's config.

    Returns ``(tokens [max_new_tokens + bs] int32, num_generated int32, accepted [max_new_tokens] int32,
    num_steps int32)``; entries past ``num_generated`` / ``num_steps`` are meaningless.
    """
    target, draft = nnx.merge(t_graph, t_state), nnx.merge(d_graph, d_state)
    bs, p_len = block_size, prompt.shape[1]
    cfg = draft.cfg
    layer_ids = cfg.target_layer_ids
    max_len = p_len + max_new_tokens + bs
    key, k0 = jax.random.split(key)
    taps, tcache, logits = generate.prefill(target, prompt, num_valid, max_len, layer_ids)
    first = generate.sample_logits(logits[0], k0, temperature)
    dcache = draft.extend_cache(draft.init_cache(1, max_len), taps, jnp.arange(p_len)[None], num_valid=num_valid)
    out = jnp.zeros((max_new_tokens + bs,), jnp.int32).at[0].set(first)
    accepted = jnp.zeros((max_new_tokens,), jnp.int32)
    done = (max_new_tokens <= 1) | generate.is_eos(first, eos_token_ids)
    init = (tcache, dcache, first, num_valid[0], out, jnp.int32(1), accepted, jnp.int32(0), done, key)

    def body(carry):
        tcache, dcache, last, pos, out, n_gen, accepted, step, _, key = carry
        key, k_draft, k_ver = jax.random.split(key, 3)
        block = jnp.full((1, cfg.block_size), cfg.mask_token_id, jnp.int32).at[0, 0].set(last)
        hidden = draft.propose(dcache, target.embed(block), pos[None])
        d_logits = draft.transform_logits(target.logits(hidden[0, 1:bs]))  # [bs-1, V] fp32
        drafts, q = propose_drafts(draft, hidden[0, 1:bs], d_logits, last, k_draft, temperature)
        ver = jnp.concatenate([last[None], drafts])[None]  # [1, bs]
        t_taps, t_hidden, tcache = target.decode(ver, tcache, layer_ids=layer_ids)
        a, bonus = verify_proposal(q, drafts, target.logits(t_hidden[0]), k_ver, temperature)
        new = jnp.concatenate([drafts, jnp.zeros((1,), jnp.int32)]).at[a].set(bonus)  # [bs], first a+1 valid
        tcache = target.rollback(tcache, (pos + a + 1)[None])
        dcache = draft.extend_cache(dcache, t_taps, (pos + jnp.arange(bs))[None], num_valid=(a + 1)[None])
        out = _write(out, n_gen, new)
        n_gen = n_gen + a + 1
        done = (n_gen >= max_new_tokens) | jnp.any(generate.is_eos(new, eos_token_ids) & (jnp.arange(bs) <= a))
        return (tcache, dcache, bonus, pos + a + 1, out, n_gen, accepted.at[step].set(a), step + 1, done, key)

    carry = jax.lax.while_loop(lambda c: ~c[8], body, init)
    return carry[4], carry[5], carry[6], carry[7]


# ---------------------------------------------------------------------------------------------------------
# Host drivers
# ---------------------------------------------------------------------------------------------------------


def _pad_prompt(prompt: np.ndarray, bucket: int) -> tuple[jax.Array, jax.Array]:
    padded = np.zeros((1, bucket), np.int32)
    padded[0, : len(prompt)] = prompt
    return jnp.asarray(padded), jnp.asarray([len(prompt)], jnp.int32)


def _truncate(tokens: np.ndarray, n: int, max_new_tokens: int, eos_token_ids: tuple[int, ...]) -> np.ndarray:
    toks = np.asarray(tokens[: min(int(n), max_new_tokens)], np.int32)
    hits = np.flatnonzero(np.isin(toks, eos_token_ids))
    return toks[: hits[0] + 1] if hits.size else toks


def speculative_generate(
    target_model,
    draft_model,
    prompt: np.ndarray,
    *,
    max_new_tokens: int,
    block_size: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_ids=(),
    bucket: int | None = None,
) -> DecodeOutput:
    """DFlash speculative decoding of one (already truncated) ``prompt [n]`` int; ``bucket >= n`` pads it.

    ``block_size`` (default: the drafter's) is the verified block, ``1 + `` the number of speculative tokens."""
    (t_graph, t_state), (d_graph, d_state) = nnx.split(target_model), nnx.split(draft_model)
    prompt_j, nv = _pad_prompt(prompt, bucket or bucket_length(len(prompt)))
    eos = tuple(int(e) for e in eos_token_ids)
    statics = dict(
        t_graph=t_graph,
        d_graph=d_graph,
        max_new_tokens=int(max_new_tokens),
        block_size=int(block_size or draft_model.cfg.block_size),
        temperature=float(temperature),
        eos_token_ids=eos,
    )
    (toks, n, acc, steps), secs = generate.run_compiled(
        speculative_decode_fn, statics, (t_state, d_state, prompt_j, nv, jax.random.key(seed))
    )
    return DecodeOutput(_truncate(toks, n, max_new_tokens, eos), np.asarray(acc[: int(steps)], np.int32), secs)


def plain_generate(
    target_model,
    prompt: np.ndarray,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    seed: int = 0,
    eos_token_ids=(),
    bucket: int | None = None,
) -> DecodeOutput:
    """Plain target decoding of one ``prompt [n]`` (the batched loop of :mod:`dflash_jax.generate` with one row):
    the speedup baseline and the lossless reference."""
    out = generate.Generator(target_model)(
        [prompt],
        max_new_tokens,
        temperature=temperature,
        keys=generate.row_keys(seed, [0]),
        eos_token_ids=eos_token_ids,
        prompt_bucket=bucket or bucket_length(len(prompt)),
        capacity=max_new_tokens,
    )
    return DecodeOutput(out.tokens[0], np.zeros((0,), np.int32), out.seconds)
