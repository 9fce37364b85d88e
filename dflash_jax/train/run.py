"""Assembling a run from a :class:`~dflash_jax.config.Config`, shared by every command (train, eval, export,
dump-features): the target, the mask-token policy, the drafter config derived from the ``draft`` section and the
target, a (warm-started) drafter, the resume fingerprint, a saved run's config and parameters, and the eval glue.

Mask token (``draft.mask_token_id: null``, SmolLM2 has none): a vocabulary token spelled like a mask
(``<mask>``, ``<|mask|>``, ``[MASK]``, ...) if the tokenizer has one; otherwise the lowest-id special token
that is neither BOS nor EOS and that the chat template does not emit (SmolLM2: ``<|endoftext|>``, id 0; never
``<|im_end|>``, which ends every assistant turn). An explicit id that is an EOS id is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from dflash_jax import config as config_lib
from dflash_jax import export as export_lib
from dflash_jax import sharding
from dflash_jax.data import chat, pipeline, readers, sources, store
from dflash_jax.eval import report
from dflash_jax.models import hf_io, layers, target_io
from dflash_jax.models.draft import DFlashDraft, DraftConfig
from dflash_jax.models.target_io import Target, load_target, random_target, smollm2_gguf_path
from dflash_jax.train import checkpoint as ckpt_lib
from dflash_jax.train import optim, rundir
from dflash_jax.train import step as step_lib

SMOLLM2 = "smollm2"
RANDOM = "random"
_MASK_SPELLINGS = ("<mask>", "<|mask|>", "[MASK]", "<MASK>", "<|MASK|>", "<|mask_token|>")
# DraftSection fields that are not DraftConfig fields of the same meaning.
_SECTION_ONLY = ("init",)


def build_target(
    section: config_lib.TargetSection, mesh: Mesh | None = None, only: Callable[[str], bool] | None = None
) -> Target:
    """The frozen target of ``target.path``: ``random`` (``target.random``: dims and ``seed``),
    ``smollm2`` (the installed SmolLM2-135M-Instruct GGUF), an HF checkpoint directory or a ``.gguf`` file; in
    ``target.dtype``. ``mesh``: every tensor is placed straight onto its sharding by the rules table (never whole
    on one device); ``only``: the tensors to read (:func:`~dflash_jax.models.target_io.build_target_model`)."""
    if section.path == RANDOM:
        cfg = hf_io.random_target_config(section.random)
        return random_target(cfg, seed=section.random.seed, dtype=section.dtype, mesh=mesh, only=only)
    path = smollm2_gguf_path() if section.path == SMOLLM2 else section.path
    if not os.path.exists(path):
        raise ValueError(
            f"target.path {section.path!r} does not exist (use an HF checkpoint directory, a .gguf "
            f"file, '{SMOLLM2}' or '{RANDOM}')"
        )
    return load_target(path, dtype=section.dtype, mesh=mesh, only=only)


def resolve_mask_token_id(configured: int | None, target: Target, renderer: chat.ChatRenderer) -> int:
    """``draft.mask_token_id`` or, when null, the documented rule (module docstring). ValueError naming the key."""
    vocab, eos = target.config.vocab_size, set(chat.stop_token_ids(target, renderer))
    tok = renderer.tokenizer
    if configured is not None:  # its range is DraftConfig's check (build_draft_config)
        if configured in eos:
            raise ValueError(
                f"draft.mask_token_id ({configured}) is an end-of-sequence token of the target; "
                "choose an id the target never emits"
            )
        return int(configured)
    for spelling in _MASK_SPELLINGS:
        i = tok.token_to_id(spelling)
        if i is not None and i < vocab:
            return int(i)
    bos = tok.token_to_id(renderer.bos_token) if renderer.bos_token else None
    probe = (("user", "Hello"), ("assistant", "Hi there."))
    used = set(renderer.render(probe)[0].tolist())
    for i in sorted(tok.get_added_tokens_decoder()):
        if i < vocab and i not in eos and i != bos and i not in used:
            return int(i)
    raise ValueError(
        "draft.mask_token_id is null and the tokenizer has no mask token and no unused special "
        "token; set draft.mask_token_id to an id of the target vocabulary that never occurs in text"
    )


def build_draft_config(section: config_lib.DraftSection, target: Target, mask_token_id: int) -> DraftConfig:
    """The drafter's config, derived in this one place: every set field of the ``draft`` section under its own
    name, ``mask_token_id`` resolved, hidden size / vocab / depth / max positions (and ``rope_theta`` when null)
    from the target, ``target_layer_ids`` (when null) by ``build_target_layer_ids``."""
    tc = target.config
    dims = {
        f.name: getattr(section, f.name)
        for f in dataclasses.fields(section)
        if f.name not in _SECTION_ONLY and getattr(section, f.name) is not None
    }
    dims.update(mask_token_id=mask_token_id, max_position_embeddings=tc.max_position_embeddings)
    dims.setdefault("rope_theta", tc.rope_theta)
    try:
        return DraftConfig.from_target(tc.hidden_size, tc.vocab_size, tc.num_layers, **dims)
    except ValueError as err:  # name the config key, not the class
        raise ValueError(str(err).replace("DraftConfig.", "draft.")) from None


def check_inputs(config: config_lib.Config) -> None:
    """The input files a config names, checked before any model loads (ValueError naming the key): ``data.path``
    readable (a file, a datasets directory or a token store), ``data.chat_template`` / ``draft.init`` / ``train.features_dir`` (offline) present (``target.path``:
    :func:`build_target` checks it before loading)."""
    da = config.data
    if os.path.isdir(da.path):
        if not store.is_store(da.path):
            sources.source_files(da.path)  # a datasets directory: ValueError naming data.path if it holds none
    elif da.path != readers.SHAREGPT_PACKAGE:
        if not os.path.isfile(da.path):
            raise ValueError(
                f"data.path {da.path!r} is not a file or directory (a ShareGPT/OpenAI JSON or JSONL chat file, a "
                f"Parquet file, a Hugging Face datasets directory, a token store, or '{readers.SHAREGPT_PACKAGE}')"
            )
        try:
            with open(da.path, "rb") as f:
                f.read(1)
        except OSError as e:
            raise ValueError(f"data.path {da.path!r} cannot be read: {e}") from None
    for key, path, isdir in (
        ("data.chat_template", da.chat_template, False),
        ("draft.init", config.draft.init, True),
        ("train.features_dir", config.train.features_dir if config.train.mode == "offline" else None, True),
    ):
        if path is not None and not (os.path.isdir(path) if isdir else os.path.isfile(path)):
            raise ValueError(f"{key} {path!r} is not a {'directory' if isdir else 'file'}")


def step_tensors(config: config_lib.Config) -> Callable[[str], bool] | None:
    """The target tensors a training run reads (``only`` of :func:`build_target`): offline training without
    in-training eval reads just the embedding and ``lm_head`` (:func:`~dflash_jax.models.target_io.head_tensors`);
    online training and in-training eval read the whole target (None)."""
    tc, ev = config.train, config.eval
    evaluates = bool(tc.eval_every and ev.num_prompts and config.data.heldout)
    return target_io.head_tensors if tc.mode == "offline" and not evaluates else None


def assemble(
    config: config_lib.Config, mesh: Mesh | None = None, only: Callable[[str], bool] | None = None
) -> tuple[Target, chat.ChatRenderer, DraftConfig]:
    """``(target, renderer, draft_cfg)`` of a config: its inputs checked (:func:`check_inputs`), the config
    checked against ``mesh`` before anything loads (:func:`~dflash_jax.config.validate_runtime`), the target
    loaded straight onto ``mesh`` (:func:`build_target`; ``only``: the tensors to read) and checked against the
    config, its chat renderer (``data.chat_template``) and the drafter config with the mask token resolved."""
    check_inputs(config)
    if mesh is not None:
        config_lib.validate_runtime(config, mesh.size)
    target = build_target(config.target, mesh, only)
    config_lib.validate_runtime(config, None, num_target_layers=target.config.num_layers)
    renderer = chat.ChatRenderer.from_target(target, config.data.chat_template)
    mask_id = resolve_mask_token_id(config.draft.mask_token_id, target, renderer)
    return target, renderer, build_draft_config(config.draft, target, mask_id)


def new_draft(draft_cfg: DraftConfig, train: config_lib.TrainSection, init: str | None = None) -> DFlashDraft:
    """A drafter with ``train.param_dtype`` parameters (seed ``train.seed``; float32 = master weights, bfloat16 =
    the reference's bf16 parameters, with fp32 optimizer moments either way) computing in ``train.compute_dtype``;
    ``init``: an exported drafter (``draft.init``) whose config must equal ``draft_cfg``, loaded as the starting
    weights."""
    param_dtype = getattr(jnp, train.param_dtype)
    with layers.unsharded_init():
        draft = DFlashDraft(
            draft_cfg,
            rngs=nnx.Rngs(train.seed),
            param_dtype=param_dtype,
            dtype=getattr(jnp, train.compute_dtype),
            remat=train.remat,
        )
    if init is not None:
        init_cfg, params = export_lib.import_draft(init, param_dtype=param_dtype)
        diffs = [
            f"{f.name}: {getattr(init_cfg, f.name)!r} there, {getattr(draft_cfg, f.name)!r} here"
            for f in dataclasses.fields(DraftConfig)
            if getattr(init_cfg, f.name) != getattr(draft_cfg, f.name)
        ]
        if diffs:
            raise ValueError(f"draft.init {init!r} does not match the configured drafter: " + "; ".join(diffs))
        nnx.update(draft, params)
    return draft


def build_step(
    config: config_lib.Config, target: Target, draft_cfg: DraftConfig, mesh: Mesh
) -> tuple[step_lib.TrainState, step_lib.TrainState, step_lib.TrainStep]:
    """``(state, state_shardings, step)`` of a training run on ``mesh``: a fresh drafter created directly in its
    shardings (a warm start, ``draft.init``, is read on the host and placed), the mesh checked against
    ``mesh.replicated_tolerance``, and the compiled step bound to ``target`` (its arrays used as they are when
    :func:`assemble` loaded it onto ``mesh``)."""
    tc = config.train
    tx, schedule = optim.optimizer_from_config(tc)
    build = functools.partial(new_draft, draft_cfg, tc, config.draft.init)
    draft = build() if config.draft.init else nnx.eval_shape(build)  # the step reads only graph, config, dtype
    _, state, shardings = step_lib.init_train_state(draft if config.draft.init else build, tx, mesh)
    target_params = nnx.state(target.model, nnx.Param)
    sharding.check_replication(
        {"target": target_params, "draft": state.params},
        {"target": sharding.state_shardings(target_params, mesh), "draft": shardings.params},
        mesh,
        config.mesh.replicated_tolerance,
    )
    step = step_lib.TrainStep(
        draft=draft,
        state_shardings=shardings,
        target=target.model,
        tx=tx,
        schedule=schedule,
        cfg=step_lib.StepConfig.from_config(config),
        mesh=mesh,
    )
    return state, shardings, step


# train keys a resume must keep: the optimizer's math and the data order. train.steps may grow (extend_run docs).
_FIXED_TRAIN = (
    "lr",
    "warmup_steps",
    "warmup_ratio",
    "schedule",
    "weight_decay",
    "clip_norm",
    "b1",
    "b2",
    "eps",
    "seed",
    "compute_dtype",
    "param_dtype",
    "mode",
)


# data keys a resume may change: how the store is prepared, read and checked, not which batches it yields.
_RESUMABLE_DATA = ("prepare_workers", "prefetch", "verify")


def _fixed_train(train: config_lib.TrainSection) -> dict[str, Any]:
    return {k: getattr(train, k) for k in _FIXED_TRAIN}


def _fixed(config: config_lib.Config, draft: Any) -> dict[str, Any]:
    """The config fingerprint of what ``--resume`` must keep, for the draft section or config ``draft``."""
    data = {f.name: getattr(config.data, f.name) for f in dataclasses.fields(config.data)}
    return ckpt_lib.config_fingerprint(
        target=config.target,
        draft=draft,
        loss=config.loss,
        data={k: v for k, v in data.items() if k not in _RESUMABLE_DATA},
        train=_fixed_train(config.train),
    )


def fingerprint(config: config_lib.Config, draft_cfg: DraftConfig) -> dict[str, Any]:
    """What must not change across ``--resume`` (:func:`resumable_keys` may)."""
    return _fixed(config, draft_cfg)


def resumable_keys() -> list[str]:
    """The config keys whose value ``--resume`` accepts a change of."""
    train = [
        f"train.{f.name}"
        for f in dataclasses.fields(config_lib.TrainSection)
        if f.name not in _FIXED_TRAIN and f.name != "steps"
    ]
    data = [f"data.{k}" for k in _RESUMABLE_DATA]
    return ["train.steps (larger: extends the run)", *train, *data, "mesh.shape", "eval.*", "draft.init"]


def check_resume(run_dir: str, config: config_lib.Config, step: int | None = None) -> None:
    """Before any model loads: ValueError unless ``config`` may continue the run saved in ``run_dir`` (its
    ``config.yaml``; the checkpoint's own fingerprint is checked again on restore) and, when the checkpoint
    ``step`` is known, ``train.steps >= step``. The message lists the keys that may change.

    Extending a run (``--resume --set train.steps=N`` with a larger N): the learning-rate schedule is recomputed
    for the new total (same warmup, decay to 0 at step N) and continues from the current step, so the steps
    already taken keep the old schedule's values and the remaining ones follow the new schedule's tail."""
    saved, _ = load_run(run_dir)
    draft = config.draft
    if draft.mask_token_id is None:  # config.yaml holds the id the run resolved from null
        draft = dataclasses.replace(draft, mask_token_id=saved.draft.mask_token_id)
    keys = (
        "--resume may change only: "
        + ", ".join(resumable_keys())
        + "; to change anything else start a new run (another --run-dir, or --overwrite)"
    )
    try:
        ckpt_lib.check_fingerprint(_fixed(saved, saved.draft), _fixed(config, draft))
    except ValueError as e:
        raise ValueError(f"--resume {run_dir}: {e}. {keys}") from None
    if step is not None and config.train.steps < step:
        raise ValueError(
            f"--resume {run_dir}: train.steps={config.train.steps} is below the checkpoint's step "
            f"{step}; a resume can only continue or extend a run. {keys}"
        )


def checkpointer(
    run_dir: str, config: config_lib.Config, draft_cfg: DraftConfig, keep: int | None, read_only: bool = False
) -> ckpt_lib.Checkpointer:
    """The Orbax checkpointer of ``RUN/checkpoints`` with the run's fingerprint (``read_only``: restore only)."""
    return ckpt_lib.Checkpointer(
        os.path.join(run_dir, rundir.CHECKPOINT_DIR),
        save_every=config.train.checkpoint_every,
        keep=keep,
        fingerprint=fingerprint(config, draft_cfg),
        read_only=read_only,
    )


def load_run(run_dir: str) -> tuple[config_lib.Config, DraftConfig]:
    """The resolved config and drafter config a training run saved in ``run_dir``."""
    path = os.path.join(run_dir, rundir.CONFIG_FILE)
    draft_path = os.path.join(run_dir, rundir.DRAFT_CONFIG_FILE)
    if not os.path.isfile(path) or not os.path.isfile(draft_path):
        raise ValueError(
            f"{run_dir!r} is not a dflash-jax run directory (no {rundir.CONFIG_FILE} / {rundir.DRAFT_CONFIG_FILE})"
        )
    with open(draft_path, encoding="utf-8") as f:
        return config_lib.load_config(path), export_lib.config_from_json(json.load(f))


def restore_params(run_dir: str, step: int | None = None) -> tuple[config_lib.Config, DraftConfig, Any, int]:
    """``(config, draft_cfg, params, step)`` from a run's checkpoint ``step`` (default: the latest complete one),
    restored on one local device without loading the target."""
    config, draft_cfg = load_run(run_dir)
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.local_devices()[:1])
    tx, _ = optim.optimizer_from_config(config.train)
    _, state, shardings = step_lib.init_train_state(new_draft(draft_cfg, config.train), tx, mesh)
    with checkpointer(run_dir, config, draft_cfg, keep=None, read_only=True) as ckpt:
        state, meta = ckpt.restore(step_lib.abstract_state(state, shardings), step)
    return config, draft_cfg, state.params, meta["step"]


def eval_prompts(
    renderer: chat.ChatRenderer, conversations: Sequence[readers.Conversation], n: int | None = None
) -> list[np.ndarray]:
    """Token ids (int32) of the first ``n`` (None = all) usable prompts: each conversation cut before its first
    assistant turn (:func:`~dflash_jax.data.pipeline.prompt_of`; a user-only one is taken whole), rendered with
    the generation prompt. Length limits are applied (and counted) by :func:`run_eval`."""
    out = []
    for conv in conversations:
        prefix = pipeline.prompt_of(conv)
        if prefix is None:
            continue
        try:
            ids = renderer.render_prompt(prefix)
        except chat.RenderError:
            continue
        if ids.size:
            out.append(ids)
        if len(out) == n:
            break
    return out


def run_eval(
    target: Target,
    draft_cfg: DraftConfig,
    params: Any,
    prompts: Sequence[np.ndarray],
    section: config_lib.EvalSection,
    *,
    seed: int = 0,
    check_lossless: bool = False,
    eos_token_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Speculative decoding of ``prompts`` with a drafter holding ``params`` (host or device pytree); prompts
    longer than ``section.prompt_len`` (or the target's context) keep their last tokens, counted in the result.
    ``eos_token_ids`` (default the target's) stop generation (:func:`dflash_jax.data.chat.stop_token_ids`)."""
    draft = export_lib.draft_from_params(draft_cfg, sharding.to_host(params))
    return report.evaluate(
        target,
        draft,
        draft_cfg,
        prompts,
        max_new_tokens=section.max_new_tokens,
        temperature=section.temperature,
        seed=seed,
        check_lossless=check_lossless,
        max_prompt_len=section.prompt_len,
        eos_token_ids=eos_token_ids,
    )
