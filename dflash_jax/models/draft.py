"""The DFlash draft model (Flax NNX): feature fusion, KV-injection decoder layers, block-sparse attention.

Numerics follow the reference ``DFlashModule`` (nvidia-modelopt 0.47.0 ``modeling_dflash.py``; docs/design.md
§4.3-§4.4):

* fusion ``C = hidden_norm(fc(target_hidden))`` ``[B, S, T*H] -> [B, S, H]``, computed once, shared by all layers;
* per layer: ``q`` from the block only, ``k``/``v`` from ``[C ; block]`` through the same ``k_proj``/``v_proj``,
  per-head ``q_norm``/``k_norm`` before non-interleaved RoPE, GQA in HF ``repeat_kv`` order;
* final ``norm``; logits are the caller's ``hidden @ lm_head.T`` (embedding and ``lm_head`` are borrowed from
  the frozen target, never draft parameters).

Training attention never builds the reference's dense ``[B, 1, N*bs, S+N*bs]`` mask: a query of block ``n`` sees
(a) context keys by the per-block prefix rule and (b) the keys of its own block, so the scores are a ``[Q, S]``
part plus a block-diagonal ``[N, bs, bs]`` part, normalised by one shared softmax
(:func:`dflash_jax.models.attention.block_sparse_attention`; the mask is described by positions, never built).
Fully masked rows (dropped blocks) give an exactly zero attention output and zero gradient, never NaN.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dflash_jax import blocks, losses
from dflash_jax import config as config_lib
from dflash_jax.models import attention, layers

VARIANTS = typing.get_args(config_lib.Variant)


@dataclasses.dataclass(frozen=True)
class DraftConfig:
    """Every dimension of the draft, explicit (the reference's silent Qwen3Config defaults are a trap,
    docs/design.md §4.2).

    ``hidden_size``/``vocab_size`` must equal the target's; ``target_layer_ids`` index the target's decoder layers
    (feature ``lid`` is HF ``hidden_states[lid + 1]``) and their count ``T`` sets ``fc``'s input width ``T*H``.
    ``sliding_window`` ``W`` (>= ``block_size``) limits context keys to ``a + j - W < t < a``; ``causal`` makes
    attention inside a block causal (0.47.0 ``dflash_draft_attention="causal"``). ``rope_scaling``: an HF
    ``rope_scaling`` dict (yarn / llama3 / linear, ``layers.rope_inv_freq``) for the draft's RoPE, exported as
    ``config.json`` ``rope_scaling`` (ModelOpt ``dflash_export_rope_scaling``); ``attention_sink``: a learned
    per-head sink logit ``self_attn.attention_sink_bias [NH]`` in every layer (ModelOpt ``dflash_attention_sink``).
    """

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    block_size: int  # no default: the YAML's (draft.block_size) is the one default
    mask_token_id: int = 0  # draft.mask_token_id: null resolves against the target (train/run.py)
    rope_theta: float = 1e6  # draft.rope_theta: null = the target's (train/run.py)
    rms_norm_eps: float = 1e-6
    sliding_window: int | None = None
    causal: bool = False
    attention_bias: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 32768
    rope_scaling: dict | None = None
    attention_sink: bool = False
    variant: str = "dflash"
    conv_kernel_size: int = 2
    conv_group_size: int = 16
    selector_rank: int = 256
    selector_top_k: int = 16
    output_multiplier: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        # One normal form: JetSpec is DFlash with causal in-block attention (either spelling gives both fields).
        if self.variant == "jetspec" or (self.variant == "dflash" and self.causal):
            object.__setattr__(self, "variant", "jetspec")
            object.__setattr__(self, "causal", True)
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))
        self.validate()

    def __hash__(self):  # rope_scaling is a dict; hash the JSON form (the config is static module metadata)
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True))

    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field."""
        config_lib.check_draft_fields(self, "DraftConfig")
        config_lib.check_model_dims(self, ("hidden_size", "vocab_size", "num_target_layers", "max_position_embeddings"))
        if not self.target_layer_ids:
            raise ValueError("DraftConfig.target_layer_ids must not be empty")
        bad = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise ValueError(
                f"DraftConfig.target_layer_ids {list(self.target_layer_ids)} has ids {bad} outside "
                f"[0, num_target_layers={self.num_target_layers})"
            )
        if not self.mask_token_id < self.vocab_size:
            raise ValueError(
                f"DraftConfig.mask_token_id {self.mask_token_id} must be in [0, vocab_size="
                f"{self.vocab_size}) (a row of the target's embedding table)"
            )
        if self.variant == "dflash2":
            if self.causal:
                raise ValueError("DraftConfig.causal must be false with variant dflash2 (a bidirectional block)")
            if self.hidden_size % self.conv_group_size:
                raise ValueError(
                    f"DraftConfig.conv_group_size ({self.conv_group_size}) must divide hidden_size ({self.hidden_size})"
                )
            if not self.selector_top_k <= self.vocab_size:
                raise ValueError(
                    f"DraftConfig.selector_top_k ({self.selector_top_k}) must be <= vocab_size ({self.vocab_size})"
                )
        if not self.initializer_range > 0:
            raise ValueError(f"DraftConfig.initializer_range must be > 0, got {self.initializer_range!r}")
        try:
            layers.rope_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"DraftConfig.rope_scaling {self.rope_scaling!r} is invalid ({e!r})") from e

    @property
    def num_features(self) -> int:
        """``T``: number of fused target layers."""
        return len(self.target_layer_ids)

    @classmethod
    def from_target(cls, target_hidden: int, vocab: int, num_target_layers: int, **dims: Any) -> "DraftConfig":
        """A config whose forced fields (hidden size, vocab, target depth) come from the target.

        ``target_layer_ids`` defaults to the reference's ``build_target_layer_ids(num_target_layers, num_layers)``.
        """
        if "target_layer_ids" not in dims:
            dims["target_layer_ids"] = blocks.build_target_layer_ids(num_target_layers, dims["num_layers"])
        return cls(hidden_size=target_hidden, vocab_size=vocab, num_target_layers=num_target_layers, **dims)


@struct.dataclass
class DraftCache:
    """Fused-context K/V per draft layer for inference.

    ``k``/``v`` ``[Ld, B, max_len, KVH, HD]`` (keys already ``k_norm``-ed and RoPE'd at their absolute positions);
    ``length [B]`` int32: rows ``>= length`` are ignored.
    """

    k: jax.Array
    v: jax.Array
    length: jax.Array


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


def training_masks(
    anchors: jax.Array,
    keep: jax.Array,
    segment_ids: jax.Array,
    block_size: int,
    sliding_window: int | None,
    causal: bool,
    impl: str = "auto",
) -> attention.BlockMask:
    """Visibility for the training forward (docs/design.md §4.4, generalised to packed segments), as positions.

    ``anchors/keep [B, N]``, ``segment_ids [B, S]``: context ``t`` is visible to slot ``j`` of block ``n`` iff
    ``keep[n]``, ``t < a_n``, ``segment_ids[t] == segment_ids[a_n]`` and (with a window ``W``) ``a_n + j - W < t``;
    a block sees its own keys iff ``keep[n]`` (key slot <= query slot if ``causal``). ``impl``: the attention
    implementation (``attention.IMPLEMENTATIONS``).
    """
    b, n = anchors.shape
    s = segment_ids.shape[1]
    per_slot = lambda x: jnp.repeat(x.astype(jnp.int32), block_size, axis=1)  # noqa: E731  [B, N] -> [B, N*bs]
    seg_a = jnp.take_along_axis(segment_ids, jnp.clip(anchors, 0, s - 1), axis=1)
    hi = per_slot(jnp.where(keep, anchors, 0))
    lo = jnp.full_like(hi, -1)
    if sliding_window is not None:
        lo = per_slot(anchors) + jnp.tile(jnp.arange(block_size, dtype=jnp.int32), n)[None] - sliding_window
    ctx = attention.RangeMask(q_seg=per_slot(seg_a), k_seg=segment_ids.astype(jnp.int32), lo=lo, hi=hi)
    return attention.BlockMask(ctx=ctx, keep=keep, causal=causal, impl=impl)


# ---------------------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------------------


class DraftAttention(nnx.Module):
    """KV-injection attention: ``q`` from the block, ``k/v`` from ``[context ; block]`` (docs/design.md §4.3)."""

    def __init__(self, cfg: DraftConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
        kw = dict(
            rngs=rngs, use_bias=cfg.attention_bias, std=cfg.initializer_range, param_dtype=param_dtype, dtype=dtype
        )
        h, nh, kvh, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = nh, kvh, hd
        self.q_proj = layers.dense(h, nh * hd, ("embed", "q_heads"), **kw)
        self.k_proj = layers.dense(h, kvh * hd, ("embed", "kv_heads"), **kw)
        self.v_proj = layers.dense(h, kvh * hd, ("embed", "kv_heads"), **kw)
        self.o_proj = layers.dense(nh * hd, h, ("q_heads", "embed"), **kw)
        self.q_norm = layers.RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.k_norm = layers.RMSNorm(hd, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.attention_sink_bias = (
            nnx.Param(jnp.zeros((nh,), param_dtype), out_sharding=("norm",)) if cfg.attention_sink else None
        )

    def key_values(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, L, H]`` -> RoPE'd normed keys and values ``[B, L, KVH, HD]`` (used for context and block)."""
        b, length, _ = x.shape
        k = self.k_norm(self.k_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, length, self.num_kv_heads, self.head_dim)
        return layers.apply_rope(k, cos, sin), v

    def __call__(self, x, k_ctx, v_ctx, cos, sin, mask):
        """``x [B, Q, H]`` (normed block stream), context K/V ``[B, S, KVH, HD]``, block cos/sin ``[B, Q, HD]``,
        ``mask`` an ``attention.BlockMask`` ->
        ``(out [B, Q, H], None)`` (the :class:`~dflash_jax.models.layers.DecoderBlock` contract)."""
        b, q_len, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, q_len, self.num_heads, self.head_dim))
        q = layers.apply_rope(q, cos, sin)
        k_blk, v_blk = self.key_values(x, cos, sin)
        sinks = None if self.attention_sink_bias is None else self.attention_sink_bias[...]
        out = attention.block_sparse_attention(q, k_blk, v_blk, k_ctx, v_ctx, mask, sinks)
        return self.o_proj(out.reshape(b, q_len, self.num_heads * self.head_dim)), None


def block_conv(x: jax.Array, taps: jax.Array, base: jax.Array, block_size: int) -> jax.Array:
    """Grouped dynamic causal convolution inside blocks (DFlash2):
    ``y_t = sum_o (base[o] + taps_t[o, g(c)]) * x_{t-o}`` per channel ``c`` of group ``g(c) = c // (H / G)``.

    ``x [B, L, H]`` (``L`` a whole number of blocks laid end to end), ``taps [B, L, K, G]`` the per-position
    corrections, ``base [K, H]`` -> ``[B, L, H]``. Tap ``o`` reads slot ``j - o`` of the same block: slots ``j < o``
    read zeros, never the previous block's tail (so the packed training layout equals drafting one block at a
    time)."""
    b, length, h = x.shape
    k, g = taps.shape[-2:]
    n = length // block_size
    xb = x.reshape(b, n, block_size, g, h // g)
    tb = taps.reshape(b, n, block_size, k, g, 1).astype(x.dtype)
    wb = base.reshape(k, g, h // g).astype(x.dtype)
    out = jnp.zeros_like(xb)
    for o in range(min(k, block_size)):
        shifted = xb if o == 0 else jnp.pad(xb[:, :, : block_size - o], ((0, 0), (0, 0), (o, 0), (0, 0), (0, 0)))
        out = out + (wb[o] + tb[:, :, :, o]) * shifted
    return out.reshape(b, length, h)


class GroupedDynamicConv(nnx.Module):
    """The pre- and post-convolution of one sublayer (DFlash2 ``attention_conv`` / ``mlp_conv``).

    ``base_kernel [2, K, H]`` (index 0 the pre-, 1 the post-convolution) and ``kernel_projection: H -> 2*K*G`` (no
    bias; both sets of taps predicted from the sublayer's normed input). Identity at init: ``base[:, 0] = 1``,
    the rest and the projection zero, so a fresh DFlash2 layer computes the DFlash layer."""

    def __init__(self, cfg: DraftConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
        h, k = cfg.hidden_size, cfg.conv_kernel_size
        self.kernel_size, self.groups, self.block_size = k, h // cfg.conv_group_size, cfg.block_size
        base = jnp.zeros((2, k, h), param_dtype).at[:, 0].set(1)
        self.base_kernel = nnx.Param(base, out_sharding=("norm", "norm", "embed"))
        self.kernel_projection = nnx.Linear(
            h,
            2 * k * self.groups,
            use_bias=False,
            kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed", "norm")),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def prepare(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``x [B, L, H]`` (normed sublayer input) -> (pre-convolved ``[B, L, H]``, post taps ``[B, L, K, G]``)."""
        taps = self.kernel_projection(x).reshape(*x.shape[:-1], 2, self.kernel_size, self.groups)
        return block_conv(x, taps[..., 0, :, :], self.base_kernel[0], self.block_size), taps[..., 1, :, :]

    def finish(self, y: jax.Array, taps: jax.Array) -> jax.Array:
        """The post-convolution of the sublayer output ``y [B, L, H]`` with the taps of :meth:`prepare`."""
        return block_conv(y, taps, self.base_kernel[1], self.block_size)


class CandidateSelector(nnx.Module):
    """DFlash2's path selector: ``S_t(a, b) = U_t(b) + <A[a] * (P h_t), B[b]>`` over the top-``k`` candidates
    ``b`` of position ``t`` after predecessor ``a``.

    ``predecessor_codebook A [V, r]`` ~ N(0, std), ``successor_codebook B [V, r]`` zeros (a fresh selector scores
    the draft logits alone), ``hidden_projection P: H -> r`` (no bias)."""

    def __init__(self, cfg: DraftConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
        v, r = cfg.vocab_size, cfg.selector_rank
        self.top_k = cfg.selector_top_k
        a = cfg.initializer_range * jax.random.normal(rngs.params(), (v, r), param_dtype)
        self.predecessor_codebook = nnx.Param(a, out_sharding=("vocab", "norm"))
        self.successor_codebook = nnx.Param(jnp.zeros((v, r), param_dtype), out_sharding=("vocab", "norm"))
        kw = dict(rngs=rngs, std=cfg.initializer_range, param_dtype=param_dtype, dtype=dtype)
        self.hidden_projection = layers.dense(cfg.hidden_size, r, ("embed", "norm"), **kw)

    def scores(self, hidden: jax.Array, unary: jax.Array, candidates: jax.Array, predecessor: jax.Array) -> jax.Array:
        """``hidden [..., H]``, ``unary [..., k]`` (the draft logits of the candidates), ``candidates [..., k]`` and
        ``predecessor [...]`` int -> ``S [..., k]`` float32."""
        gate = self.predecessor_codebook[...][predecessor].astype(jnp.float32) * self.hidden_projection(hidden)
        succ = self.successor_codebook[...][candidates].astype(jnp.float32)
        return unary.astype(jnp.float32) + jnp.einsum("...r,...kr->...k", gate, succ)


def draft_layer(cfg: DraftConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any) -> layers.DecoderBlock:
    """One draft decoder layer: the shared pre-norm block around :class:`DraftAttention` (with DFlash2's
    :class:`GroupedDynamicConv` around both sublayers)."""
    kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
    attn = DraftAttention(cfg, **kw)
    convs = None
    if cfg.variant == "dflash2":
        convs = (GroupedDynamicConv(cfg, **kw), GroupedDynamicConv(cfg, **kw))
    return layers.DecoderBlock(
        attn,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.rms_norm_eps,
        std=cfg.initializer_range,
        convs=convs,
        **kw,
    )


def _apply_layer(layer, *args):
    """``layer(*args)``: the unit :func:`nnx.remat` recomputes in the backward pass when ``remat`` is on."""
    return layer(*args)


class DFlashDraft(nnx.Module):
    """The DFlash drafter. Parameters: ``fc``, ``hidden_norm``, ``layers[i]``, ``norm`` (export names,
    docs/design.md §4.2).

    ``param_dtype`` is the storage dtype of parameters; ``dtype`` the compute dtype (e.g. bf16 with fp32 params).
    Build inside :func:`dflash_jax.models.layers.unsharded_init` to get logically-annotated, unplaced parameters.
    """

    def __init__(
        self,
        cfg: DraftConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype: Any = jnp.float32,
        dtype: Any = jnp.float32,
        remat: bool = False,
    ):
        self.cfg = cfg
        self.dtype = dtype
        self.remat = bool(remat)  # recompute each layer in the backward pass (activation memory ~ one layer)
        self.fc = layers.dense(
            cfg.num_features * cfg.hidden_size,
            cfg.hidden_size,
            ("fused", "embed"),
            rngs=rngs,
            std=cfg.initializer_range,
            param_dtype=param_dtype,
            dtype=dtype,
        )
        self.hidden_norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.layers = nnx.List(
            [draft_layer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype) for _ in range(cfg.num_layers)]
        )
        self.norm = layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype)
        self.candidate_selector = (
            CandidateSelector(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)
            if cfg.variant == "dflash2"
            else None
        )

    def transform_logits(self, z: jax.Array) -> jax.Array:
        """``softcap(output_multiplier * z)`` of raw logits ``z = hidden @ lm_head.T`` (identity when both are
        null); ``softcap(x) = c * tanh(x / c)``."""
        return losses.logit_transform(z, self.cfg.output_multiplier, self.cfg.final_logit_softcapping)

    def _cos_sin(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        scaling = self.cfg.rope_scaling
        inv_freq = layers.rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, scaling)
        return layers.rope_cos_sin(positions, inv_freq, self.dtype, layers.rope_attention_factor(scaling))

    def fuse(self, target_hidden: jax.Array) -> jax.Array:
        """``[B, S, T*H] -> hidden_norm(fc(x)) [B, S, H]`` (docs/design.md §4.3)."""
        blocks.check_shape("target_hidden", target_hidden, (None, None, None))
        if target_hidden.shape[-1] != self.cfg.num_features * self.cfg.hidden_size:
            raise ValueError(
                f"target_hidden last dim {target_hidden.shape[-1]} != T*H = "
                f"{self.cfg.num_features}*{self.cfg.hidden_size}"
            )
        return self.hidden_norm(self.fc(target_hidden.astype(self.dtype)))

    def _decode(self, h, kv_of_layer, cos, sin, mask):
        h = h.astype(self.dtype)
        apply = nnx.remat(_apply_layer) if self.remat else _apply_layer
        for i, layer in enumerate(self.layers):
            k_ctx, v_ctx = kv_of_layer(i, layer)
            h, _ = apply(layer, h, k_ctx, v_ctx, cos, sin, mask)
        return self.norm(h)

    def __call__(
        self,
        noise_emb: jax.Array,
        target_hidden: jax.Array,
        anchors: jax.Array,
        keep: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_impl: str = "auto",
    ) -> jax.Array:
        """Training forward -> post-``norm`` hidden ``[B, N*bs, H]`` (logits: ``hidden @ lm_head.T``).

        ``noise_emb [B, N*bs, H]`` (target-embedded anchor token at slot 0 of kept blocks, mask token elsewhere),
        ``target_hidden [B, S, T*H]``, ``anchors [B, N]`` int32, ``keep [B, N]`` bool. ``positions [B, S]``
        (default ``arange(S)``) restart per packed segment; ``segment_ids [B, S]`` (default all 1) gate the
        context. Block ``n`` slot ``j`` sits at position ``positions[a_n] + j``. ``attention_impl``: one of
        ``attention.IMPLEMENTATIONS`` (``train.attention``).
        """
        cfg = self.cfg
        bs = cfg.block_size
        b, s, _ = target_hidden.shape
        n = anchors.shape[1]
        blocks.check_shape("noise_emb", noise_emb, (b, n * bs, cfg.hidden_size))
        blocks.check_shape("keep", keep, (b, n))
        if segment_ids is None:
            segment_ids = jnp.ones((b, s), jnp.int32)
        blocks.check_shape("segment_ids", segment_ids, (b, s))
        keep = keep.astype(bool)
        ctx = self.fuse(target_hidden)
        cos, sin = self._cos_sin(blocks.draft_position_ids(s, anchors, bs, positions))  # [B, S + N*bs, HD]
        cos_c, sin_c, cos_b, sin_b = cos[:, :s], sin[:, :s], cos[:, s:], sin[:, s:]
        mask = training_masks(anchors, keep, segment_ids, bs, cfg.sliding_window, cfg.causal, attention_impl)
        return self._decode(
            noise_emb, lambda i, layer: layer.self_attn.key_values(ctx, cos_c, sin_c), cos_b, sin_b, mask
        )

    # ----------------------------------------------------------------------------------------------------
    # Inference (speculative decoding): context K/V cache + one block at a time
    # ----------------------------------------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> DraftCache:
        """Empty cache: ``k, v [Ld, B, max_len, KVH, HD]`` zeros, ``length [B] = 0``."""
        shape = (self.cfg.num_layers, batch, max_len, self.cfg.num_key_value_heads, self.cfg.head_dim)
        dtype = dtype or self.dtype
        return DraftCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros((batch,), jnp.int32))

    def extend_cache(
        self,
        cache: DraftCache,
        target_hidden_new: jax.Array,
        positions_new: jax.Array,
        num_valid: jax.Array | None = None,
    ) -> DraftCache:
        """Append fused-context K/V for ``target_hidden_new [B, n, T*H]`` at ``positions_new [B, n]``.

        Row ``i`` goes to cache index ``length + i``; ``length += num_valid`` (default ``n``), so a static chunk can
        carry fewer real rows. Rows past ``max_len`` are dropped: keep ``length + num_valid <= max_len``.
        """
        b, n, _ = target_hidden_new.shape
        blocks.check_shape("positions_new", positions_new, (b, n))
        ctx = self.fuse(target_hidden_new)
        cos, sin = self._cos_sin(positions_new)
        idx = cache.length[:, None] + jnp.arange(n, dtype=jnp.int32)[None]  # [B, n]
        rows = jnp.arange(b)[:, None]
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            k, v = layer.self_attn.key_values(ctx, cos, sin)
            ks.append(cache.k[i].at[rows, idx].set(k.astype(cache.k.dtype), mode="drop"))
            vs.append(cache.v[i].at[rows, idx].set(v.astype(cache.v.dtype), mode="drop"))
        num_valid = jnp.full((b,), n, jnp.int32) if num_valid is None else jnp.asarray(num_valid, jnp.int32)
        blocks.check_shape("num_valid", num_valid, (b,))
        return DraftCache(k=jnp.stack(ks), v=jnp.stack(vs), length=cache.length + num_valid)

    @staticmethod
    def crop_cache(cache: DraftCache, length: jax.Array | int) -> DraftCache:
        """Roll back to ``length`` (scalar or ``[B]``): rows ``>= length`` are ignored from then on."""
        return cache.replace(length=jnp.minimum(cache.length, jnp.asarray(length, jnp.int32)))

    def propose(self, cache: DraftCache, noise_emb: jax.Array, block_start: jax.Array) -> jax.Array:
        """One block ``noise_emb [B, bs, H]`` at positions ``block_start + 0..bs-1`` -> post-norm hidden ``[B, bs, H]``.

        Sees every cached context row ``t < cache.length`` (with a window ``W``: ``t > block_start + j - W``) and
        its own block (bidirectional, or causal if ``cfg.causal``). ``block_start [B]`` is normally ``cache.length``.
        """
        cfg = self.cfg
        bs = cfg.block_size
        b, max_len = cache.k.shape[1], cache.k.shape[2]
        blocks.check_shape("noise_emb", noise_emb, (b, bs, cfg.hidden_size))
        block_start = jnp.asarray(block_start, jnp.int32)
        blocks.check_shape("block_start", block_start, (b,))
        j = jnp.arange(bs, dtype=jnp.int32)
        cos, sin = self._cos_sin(block_start[:, None] + j[None])
        lo = jnp.full((b, bs), -1, jnp.int32)
        if cfg.sliding_window is not None:
            lo = block_start[:, None] + j[None] - cfg.sliding_window
        zeros = jnp.zeros((b, max_len), jnp.int32)
        ctx = attention.RangeMask(
            q_seg=zeros[:, :bs], k_seg=zeros, lo=lo, hi=jnp.broadcast_to(cache.length[:, None], (b, bs))
        )
        mask = attention.BlockMask(ctx=ctx, keep=jnp.ones((b, 1), bool), causal=cfg.causal, impl="dense")
        return self._decode(noise_emb, lambda i, layer: (cache.k[i], cache.v[i]), cos, sin, mask)
