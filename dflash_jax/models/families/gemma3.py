"""Gemma 3 text (HF ``gemma3_text``): 5:1 sliding/full layers, sandwich norms, ``(1 + w)`` RMSNorm, GeGLU.

Differences from the dense decoder (transformers ``modeling_gemma3``): every RMSNorm is Gemma's
``cast((1 + w) * norm(x32))`` (weights stored as offsets from 1); embeddings are scaled by ``sqrt(H)`` (cast to
the parameter dtype first); q/k-norm before RoPE; attention scale ``query_pre_attn_scalar**-0.5``; sliding layers
use a window ``W`` and plain RoPE at ``rope_local_base_freq`` (v5: ``rope_parameters.sliding_attention``), full
layers ``rope_parameters.full_attention`` (possibly ``linear`` scaled); the block is

``h += post_attention_layernorm(attn(input_layernorm(h)))``;
``h += post_feedforward_layernorm(mlp(pre_feedforward_layernorm(h)))``

with a GeGLU MLP (``gelu_pytorch_tanh``) and a tied head. Logit soft-capping (Gemma 2) is refused.

Gemma 3 4B and larger ship as the multimodal ``gemma3`` (``Gemma3ForConditionalGeneration``): its ``text_config``
is this decoder, stored under ``language_model.model.*``; :func:`unwrap_multimodal` reads that part only.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx

from dflash_jax.models import decoder, layers
from dflash_jax.models.families import base

NORM_KW = {"offset": 1.0}


class Gemma3DecoderLayer(nnx.Module):
    """Sandwich-norm decoder layer (see the module docstring); same call contract as ``decoder.decoder_layer``."""

    def __init__(self, cfg: decoder.TargetConfig, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any):
        def norm():
            return layers.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, **NORM_KW)

        self.input_layernorm = norm()
        self.self_attn = decoder.Attention(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype, norm_kw=NORM_KW)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = layers.SwiGLU(
            cfg.hidden_size, cfg.intermediate_size, rngs=rngs, param_dtype=param_dtype, dtype=dtype, act=cfg.hidden_act
        )
        self.post_feedforward_layernorm = norm()

    def __call__(self, h, cos, sin, mask, past=None, write_pos=None):
        a, kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, past, write_pos)
        h = h + self.post_attention_layernorm(a)
        h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        return h, kv


def config_fields(hf: Mapping[str, Any]) -> dict:
    """Gemma 3 fields of ``config.json`` (v4 ``rope_local_base_freq`` or v5 per-layer-type ``rope_parameters``)."""
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(key) is not None:
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported (supported: null)")
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json use_bidirectional_attention=true is not supported (supported: causal)")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    rope = hf.get("rope_parameters") or {}
    local = rope.get("sliding_attention") or {}
    if (local.get("rope_type") or "default") != "default":
        raise ValueError(
            f"config.json rope_parameters.sliding_attention {local!r} is not supported "
            "(supported: plain RoPE on sliding layers)"
        )
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    return dict(
        base.layer_types_field(hf, default_pattern=6),
        qk_norm=True,
        hidden_act=act,
        local_rope_theta=float(local_theta),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def unwrap_multimodal(hf: Mapping[str, Any]) -> tuple[dict, str]:
    """A multimodal ``gemma3`` ``config.json`` -> ``(gemma3_text config dict, checkpoint prefix of its tensors)``;
    the top-level ``tie_word_embeddings``/``dtype``/``eos_token_id`` apply to the text model."""
    text = hf.get("text_config")
    if not isinstance(text, Mapping):
        raise ValueError("config.json model_type='gemma3' has no 'text_config' object")
    inherited = {
        k: hf[k]
        for k in ("tie_word_embeddings", "dtype", "torch_dtype", "eos_token_id", "bos_token_id")
        if k in hf and k not in text
    }
    return {**text, **inherited, "model_type": "gemma3_text"}, "language_model."


def make_layer(cfg: decoder.TargetConfig, i: int, *, rngs: nnx.Rngs, param_dtype: Any, dtype: Any) -> nnx.Module:
    del i
    return Gemma3DecoderLayer(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype)


FAMILY = base.Family(
    arch="gemma3_text",
    config_fields=config_fields,
    make_layer=make_layer,
    embed_scale=lambda cfg: cfg.hidden_size**0.5,
    norm_kw=NORM_KW,
)
