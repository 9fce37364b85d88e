"""The frozen target LLM in Flax NNX, with hidden-state taps and a KV cache.

One decoder covers the dense families (Llama / Qwen2 / Qwen3): GQA attention, SwiGLU MLP, RMSNorm, RoPE (default,
llama3, linear or YaRN scaling), tied or separate ``lm_head``; Qwen2 adds q/k/v biases, Qwen3 a per-head RMSNorm
on q and k before RoPE. Qwen3-MoE, gpt-oss and Gemma 3 are their differences from it (``models/families/``),
built from :class:`Attention` and :func:`decoder_layer`; sliding-window layers get their own rope and mask.

Tap convention (DFlash, docs/design.md §4.1): layer id ``k`` is the output of decoder layer ``k`` (HF
``hidden_states[k+1]``). HF quirk reproduced on purpose: the last entry ``hidden_states[Lt]`` is taken *after*
the final norm, so id ``Lt-1`` yields the normed final state.

The target is frozen: every output passes through ``jax.lax.stop_gradient`` and its parameters are never handed
to an optimizer. Parameters keep the HF names (``layers.{i}.self_attn.q_proj.kernel`` ...); kernels are stored
``[in, out]`` (torch ``weight.T``), ``embed_tokens``/``lm_head`` as ``[V, H]`` like torch.
"""

from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dflash_jax.models import attention, families, layers
from dflash_jax.models.decoder import KVCache, TargetConfig, resolve_dtype


def _as_int_array(name: str, x: Any, shape: tuple[int, ...]) -> jax.Array:
    x = jnp.asarray(x)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
    return x.astype(jnp.int32)


class TargetModel(nnx.Module):
    """Frozen decoder of any registered family (``models/families/``). ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype."""

    def __init__(self, cfg: TargetConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32, dtype: Any = jnp.float32):
        family = families.family(cfg.arch)
        self.config = cfg
        self.dtype = dtype
        embed_init = nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed"))
        self.embed_tokens = nnx.Param(embed_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.layers = nnx.List([family.make_layer(cfg, i, **kw) for i in range(cfg.num_layers)])
        self.embed_scale = family.embed_scale(cfg)
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, **family.norm_kw)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Param(embed_init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), param_dtype))
        )

    # -- shared pieces borrowed by the draft -------------------------------------------------------------
    def embed(self, input_ids: jax.Array) -> jax.Array:
        """Embedding lookup ``[B,S] int -> [B,S,H]`` (compute dtype, frozen), times the family's embedding scale
        in the parameter dtype (Gemma 3: ``sqrt(H)``, as HF's scaled embedding module)."""
        e = jnp.take(self.embed_tokens[...], input_ids, axis=0)
        if self.embed_scale is not None:
            e = e * jnp.asarray(self.embed_scale, e.dtype)
        return jax.lax.stop_gradient(e.astype(self.dtype))

    def lm_head_weight(self) -> jax.Array:
        """``[V,H]``: the tied embedding table or the separate ``lm_head`` (frozen)."""
        w = self.embed_tokens if self.lm_head is None else self.lm_head
        return jax.lax.stop_gradient(w[...])

    def logits(self, hidden: jax.Array) -> jax.Array:
        """``hidden [..., H] @ lm_head_weight().T -> [..., V]`` float32 (fp32 accumulation)."""
        w = self.lm_head_weight()
        return jnp.einsum("...h,vh->...v", hidden, w.astype(hidden.dtype), preferred_element_type=jnp.float32)

    # -- forward -----------------------------------------------------------------------------------------
    def _check_layer_ids(self, layer_ids: Sequence[int]) -> tuple[int, ...]:
        ids = tuple(int(i) for i in layer_ids)
        bad = [i for i in ids if not 0 <= i < self.config.num_layers]
        if bad:
            raise ValueError(f"layer_ids {bad} out of range [0, {self.config.num_layers})")
        return ids

    def _run(self, input_ids, positions, mask, key_positions, layer_ids, cache=None):
        """Shared body of ``__call__`` and ``decode``: returns ``(taps, final_hidden, new_kv or None)``.

        ``mask [B,S,Lk]`` (or an ``attention.SelfMask``) is the full-attention mask; sliding layers also need
        ``key_positions [B|1, Lk]``:
        key ``t`` is visible from query ``q`` when ``pos(q) - W < pos(t)`` (HF ``sliding_window_overlay``)."""
        ids = self._check_layer_ids(layer_ids)
        cfg = self.config
        ctx = {}
        for kind in sorted({cfg.layer_type(i) for i in range(cfg.num_layers)}):
            inv_freq, scale = cfg.rope(kind)
            m = mask
            if kind == "sliding_attention":
                m = attention.windowed(mask, cfg.sliding_window, positions, key_positions)
            ctx[kind] = (*layers.rope_cos_sin(positions, inv_freq, self.dtype, scale), m)
        h = self.embed(input_ids)
        outs, kv = {}, None if cache is None else (cache.k, cache.v)
        for i, layer in enumerate(self.layers):
            h, new_kv = layer(h, *ctx[cfg.layer_type(i)], None if kv is None else (*kv, i), positions)
            kv = None if cache is None else new_kv
            if i in ids:
                outs[i] = h
        final = self.norm(h)
        outs[self.config.num_layers - 1] = final  # HF quirk: hidden_states[Lt] is post final norm
        taps = jnp.concatenate([outs[i] for i in ids], axis=-1) if ids else h[..., :0]
        return jax.lax.stop_gradient(taps), jax.lax.stop_gradient(final), kv

    def __call__(
        self,
        input_ids,
        *,
        positions=None,
        segment_ids=None,
        layer_ids: Sequence[int] = (),
        attention_impl: str = "auto",
    ):
        """Full causal forward.

        ``input_ids [B,S]`` int; ``positions [B,S]`` (default ``arange(S)``); ``segment_ids [B,S]`` (default
        ones): token ``q`` attends key ``t <= q`` of the same segment (packing; padding = segment 0).
        Returns ``taps [B,S,len(layer_ids)*H]`` (layer_ids order, id k = output of decoder layer k; id
        ``Lt-1`` is post final norm) and ``final_hidden [B,S,H]`` (after the final norm), both frozen.
        ``attention_impl``: one of ``attention.IMPLEMENTATIONS`` (``train.attention``).
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B,S], got shape {input_ids.shape}")
        input_ids = _as_int_array("input_ids", input_ids, input_ids.shape)
        b, s = input_ids.shape
        positions = (
            jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if positions is None
            else _as_int_array("positions", positions, (b, s))
        )
        segment_ids = (
            jnp.ones((b, s), jnp.int32) if segment_ids is None else _as_int_array("segment_ids", segment_ids, (b, s))
        )
        if attention.resolve(attention_impl, keys=s) == "dense":
            causal = jnp.tril(jnp.ones((s, s), bool))
            mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
        else:  # described, never materialised
            mask = attention.SelfMask(segment_ids, impl=attention_impl)
        taps, final, _ = self._run(input_ids, positions, mask, positions, layer_ids)
        return taps, final

    # -- KV-cache decoding -------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> KVCache:
        """Empty cache ``k, v [L,batch,KVH,max_len,HD]`` (default compute dtype), ``length = 0``."""
        if batch <= 0 or max_len <= 0:
            raise ValueError(f"init_cache: batch ({batch}) and max_len ({max_len}) must be positive")
        c = self.config
        shape = (c.num_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        dt = self.dtype if dtype is None else dtype
        return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt), length=jnp.zeros((batch,), jnp.int32))

    def decode(self, input_ids, cache: KVCache, *, layer_ids: Sequence[int] = (), num_valid=None):
        """Incremental forward of ``input_ids [B,n]`` at positions ``cache.length + arange(n)``.

        Attends to ``cache[:length]`` plus causally within the new tokens; writes their K/V at ``length...``
        (writes past ``max_len`` are dropped: callers keep ``length + n <= max_len``). Returns
        ``(taps [B,n,T*H], final_hidden [B,n,H], cache)`` with ``length += num_valid`` (``[B]`` int, default n;
        tokens beyond ``num_valid`` are computed but left uncommitted).
        """
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B,n], got shape {input_ids.shape}")
        b, n = input_ids.shape
        input_ids = _as_int_array("input_ids", input_ids, (b, n))
        chex.assert_shape(cache.length, (b,))
        num_valid = jnp.full((b,), n, jnp.int32) if num_valid is None else _as_int_array("num_valid", num_valid, (b,))
        positions = cache.length[:, None] + jnp.arange(n, dtype=jnp.int32)[None]
        key_positions = jnp.arange(cache.k.shape[3])[None]
        mask = key_positions[:, None, :] <= positions[:, :, None]
        taps, final, (k, v) = self._run(input_ids, positions, mask, key_positions, layer_ids, cache)
        return taps, final, KVCache(k=k, v=v, length=cache.length + jnp.clip(num_valid, 0, n))

    @staticmethod
    def rollback(cache: KVCache, length) -> KVCache:
        """Set the committed length (scalar or ``[B]``); entries beyond it are ignored and later overwritten."""
        length = jnp.asarray(length)
        if length.shape not in ((), cache.length.shape):
            raise ValueError(f"rollback length must be a scalar or shape {cache.length.shape}, got {length.shape}")
        if not jnp.issubdtype(length.dtype, jnp.integer):
            raise ValueError(f"rollback length must be integer, got dtype {length.dtype}")
        return cache.replace(length=jnp.broadcast_to(length.astype(jnp.int32), cache.length.shape))


def make_target_model(cfg: TargetConfig, *, seed: int = 0, dtype: Any = "float32") -> TargetModel:
    """Random-init ``TargetModel`` (params and compute in ``dtype``), built with logical axes, unplaced."""
    dt = resolve_dtype(dtype)
    with layers.unsharded_init():
        return TargetModel(cfg, rngs=nnx.Rngs(seed), param_dtype=dt, dtype=dt)
