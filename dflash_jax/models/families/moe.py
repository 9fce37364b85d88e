"""Sparse mixture-of-experts pieces shared by the MoE families (Qwen3-MoE, gpt-oss).

Experts are stacked parameters ``[E, in, out]`` whose first logical axis is ``expert`` (mapped onto the mesh by
``dflash_jax/sharding.py``). Token dispatch never computes an expert for a token that did not pick it: the ``T*K``
(token, slot) pairs are sorted by expert and each expert's contiguous rows go through ``jax.lax.ragged_dot``
(:func:`dispatch`). ``dense=True`` runs every expert on every token instead; it exists only as a test oracle.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx


def expert_param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], param_dtype: Any, std: float | None = 0.02
) -> nnx.Param:
    """A stacked expert parameter ``shape`` (leading dim E) ~ N(0, std) (zeros when ``std`` is None)."""
    init = nnx.initializers.zeros_init() if std is None else nnx.initializers.normal(std)
    return nnx.Param(nnx.with_partitioning(init, axes)(rngs.params(), shape, param_dtype))


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array | None) -> jax.Array:
    """Per-expert ``x @ w[e]`` in x's dtype (fp32 accumulation).

    Sparse: ``x [N, in]`` rows sorted by expert, ``group_sizes [E]`` -> ``[N, out]`` (``jax.lax.ragged_dot``).
    Dense oracle (``group_sizes`` None): ``x [E, N, in]`` -> ``[E, N, out]``.
    """
    w = w.astype(x.dtype)
    if group_sizes is None:
        y = jnp.einsum("eni,eio->eno", x, w, preferred_element_type=jnp.float32)
    else:
        y = jax.lax.ragged_dot(x, w, group_sizes, preferred_element_type=jnp.float32)
    return y.astype(x.dtype)


def expert_bias(b: jax.Array, expert_ids: jax.Array | None, dtype: Any) -> jax.Array:
    """Bias ``b [E, out]`` for sorted rows (``expert_ids [N]`` -> ``[N, out]``) or the dense ``[E, 1, out]``."""
    b = b.astype(dtype)
    return b[:, None] if expert_ids is None else b[expert_ids]


def dispatch(
    x: jax.Array, top_idx: jax.Array, top_w: jax.Array, experts: Callable, num_experts: int, *, dense: bool = False
) -> jax.Array:
    """``sum_k top_w[t,k] * expert_{top_idx[t,k]}(x[t])`` for ``x [T, H]``, ``top_idx/top_w [T, K]`` -> ``[T, H]``.

    ``experts(x, expert_ids, group_sizes)`` maps rows grouped by expert (``x [N, H]``, ``expert_ids [N]``,
    ``group_sizes [E]``) to ``[N, H]``, or with ``expert_ids = group_sizes = None`` a dense ``[E, T, H]`` stack.
    """
    t, k = top_idx.shape
    if dense:
        y = experts(jnp.broadcast_to(x, (num_experts, *x.shape)), None, None)  # [E, T, H]
        combine = jnp.einsum("tk,tke->te", top_w, jax.nn.one_hot(top_idx, num_experts, dtype=top_w.dtype))
        return jnp.einsum("eth,te->th", y, combine.astype(y.dtype))
    flat = top_idx.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
    expert_ids = flat[order]
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    y = experts(x[order // k], expert_ids, group_sizes)  # [T*K, H]
    y = jnp.zeros_like(y).at[order].set(y).reshape(t, k, -1)
    return jnp.einsum("tkh,tk->th", y, top_w.astype(y.dtype))


def softmax_topk(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array]:
    """Qwen3-MoE router: ``softmax`` (fp32) over all experts, top-``k``, optionally renormalised to sum 1
    (``norm_topk_prob``); weights cast back to ``logits.dtype``. Returns ``(weights [T,K], experts [T,K])``."""
    w, idx = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), k)
    if normalize:
        w = w / w.sum(-1, keepdims=True)
    return w.astype(logits.dtype), idx


def topk_softmax(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """gpt-oss router: top-``k`` logits, then ``softmax`` over those ``k`` (in ``logits.dtype``)."""
    v, idx = jax.lax.top_k(logits, k)
    return jax.nn.softmax(v, axis=-1), idx
