"""One compiled, sharded DFlash training step: ``train_step(state, batch, key) -> (state, metrics)``.

Functional MaxText style: the draft is ``nnx.split`` into a graphdef and an fp32 master ``nnx.State`` of
``nnx.Param``; one pure function runs, inside a single ``jax.jit`` with explicit ``NamedSharding``s and the state
donated:

1. target features: (online) the frozen target's forward -> taps ``[B,S,T*H]`` + final hidden ``[B,S,H]``;
   (offline) the batch's ``target_hidden`` and optional ``teacher_hidden``;
2. anchors ``sample_anchors(fold_in(key, step))`` -> labels / mask ``block_targets`` (docs/design.md §4.5, §4.8);
3. noise ids: the anchor token at slot 0 of kept blocks, ``mask_token_id`` elsewhere (§4.6), embedded with the
   target's table;
4. draft forward in the draft module's compute dtype (fp32 master params cast once; gradients flow back to fp32);
5. fused chunked-vocabulary loss ``losses.block_loss_from_hidden`` with the target's ``lm_head`` (never materialises
   the ``[B, N*bs, V]`` fp32 logits; its gradient is computed in the forward pass); KD teacher = final hidden at
   ``teacher_positions`` (§4.8);
6. gradients; if the loss or the gradient norm is non-finite the update is skipped (params and optimizer state
   untouched, ``skipped_updates`` += 1), otherwise optax (clip + AdamW) updates the params.

The target's parameters are a separate, non-donated argument sharded by the same rules table and never
differentiated (the target stops gradients itself and is outside ``jax.value_and_grad``'s argument).

Offline mode reads only the embedding table and ``lm_head``: a target loaded with only those
(:func:`dflash_jax.models.target_io.head_tensors`) passes them alone, its unread tensors stay abstract
(``target_unread``); a whole target is passed whole (XLA prunes what the step does not read).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dflash_jax import blocks, losses, sharding
from dflash_jax import config as config_lib
from dflash_jax.models import target_io
from dflash_jax.models.draft import DraftConfig
from dflash_jax.train import optim

PARAM_DTYPES = ("float32", "bfloat16")  # train.param_dtype: fp32 master weights, or bf16 params (fp32 moments)
BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


@flax.struct.dataclass
class TrainState:
    """``step`` int32 ``[]`` (batches consumed), ``params`` draft ``nnx.State`` (fp32 master weights, or bf16 with
    ``train.param_dtype: bfloat16``), ``opt_state`` (optax, fp32 moments),
    ``skipped_updates`` int32 ``[]`` (non-finite steps whose update was skipped)."""

    step: jax.Array
    params: Any
    opt_state: Any
    skipped_updates: jax.Array


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """The step's own settings; block size, mask id and target layer ids are read from the draft's
    :class:`~dflash_jax.models.draft.DraftConfig`, never copied here.

    ``num_anchors``: blocks per row (``train.num_anchors``). ``loss``: the YAML ``loss`` section, the pieces of
    :func:`dflash_jax.losses.block_loss_from_hidden` (``objective`` / ``per_token`` may also be functions, see
    docs/losses.md; ``chunk_blocks`` = blocks per vocabulary-loss chunk, None: all ``num_anchors`` in one chunk).
    ``mode``: ``online`` (target forward inside the step) or ``offline`` (features in the batch). ``attention``: the
    target's and the draft's attention implementation (``train.attention``). ``grad_accum``: micro-batches per step
    (:func:`train_step`). Values are validated where they are born (:func:`dflash_jax.config.validate`).
    """

    num_anchors: int
    loss: config_lib.LossSection = config_lib.LossSection()
    mode: str = "online"
    attention: str = "auto"
    grad_accum: int = 1

    @property
    def chunk_blocks(self) -> int:
        return self.num_anchors if self.loss.chunk_blocks is None else self.loss.chunk_blocks

    @classmethod
    def from_config(cls, config: config_lib.Config) -> "StepConfig":
        """The step settings of a run configuration."""
        return cls(
            num_anchors=config.train.num_anchors,
            loss=config.loss,
            mode=config.train.mode,
            attention=config.train.attention,
            grad_accum=config.train.grad_accum,
        )


# ---------------------------------------------------------------------------------------------------------
# Pure pieces
# ---------------------------------------------------------------------------------------------------------


def noise_ids(
    input_ids: jax.Array, anchors: jax.Array, keep: jax.Array, block_size: int, mask_token_id: int
) -> jax.Array:
    """Draft input ids ``[B, N*bs]`` int32: ``input_ids[a_n]`` at slot 0 of kept blocks, the mask id elsewhere
    (docs/design.md §4.6)."""
    b, s = input_ids.shape
    n = anchors.shape[1]
    anchor_tok = jnp.take_along_axis(input_ids.astype(jnp.int32), jnp.clip(anchors, 0, s - 1), axis=1)
    first = jnp.where(keep, anchor_tok, mask_token_id)
    ids = jnp.full((b, n, block_size), mask_token_id, jnp.int32).at[:, :, 0].set(first)
    return ids.reshape(b, n * block_size)


def micro_batches(x: jax.Array, k: int) -> jax.Array:
    """``[B, ...] -> [k, B/k, ...]``, micro-batch ``i`` = rows ``i, i+k, i+2k, ...``: with the batch split
    contiguously over the devices, every micro-batch keeps an equal share of each device's rows (no transfer)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)


def train_step(
    state: TrainState,
    target_state: Any,
    batch: Mapping[str, jax.Array],
    key: jax.Array,
    *,
    draft_graphdef: nnx.GraphDef,
    target_graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    draft_cfg: DraftConfig,
    cfg: StepConfig,
    compute_dtype: Any,
    target_unread: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The pure step (un-jitted; :class:`TrainStep` compiles it). Batch: ``input_ids [B,S]`` int32, ``loss_mask
    [B,S]`` f32, ``segment_ids``/``positions [B,S]`` int32, offline also ``target_hidden [B,S,T*H]`` and (KD)
    ``teacher_hidden [B,S,H]``; optionally injected ``anchors [B,num_anchors]`` int32 + ``keep`` bool instead of
    sampling. ``key``: the run's base PRNG key (folded with ``state.step``). ``compute_dtype``: the draft
    module's compute dtype (fp32 master params are cast to it for the forward; gradients come back in fp32).

    Gradient accumulation (``cfg.grad_accum = K > 1``): anchors are sampled on the whole batch, then ``lax.scan``
    runs the target and draft over K micro-batches (:func:`micro_batches`), summing the gradients of the loss
    numerator ``sum(W*l)`` and the unnormalised partials; the batch-global reduction and the gradient scale
    (:func:`~dflash_jax.losses.numerator_scale`, zero-loss rule included) are applied once to the sums, so the
    step equals the K = 1 step up to float summation order. ``target_unread``: the target's tensors that were
    never loaded (``jax.ShapeDtypeStruct`` leaves, offline mode only; the step must not read them)."""
    target = nnx.merge(target_graphdef, target_state, *([] if target_unread is None else [target_unread]))
    bs, n, lo, k = draft_cfg.block_size, cfg.num_anchors, cfg.loss, cfg.grad_accum
    if "anchors" in batch:  # injected (parity tests, replaying a run): [B, num_anchors] int32 + keep bool
        anchors, keep = batch["anchors"].astype(jnp.int32), batch["keep"].astype(bool)
    else:
        anchors, keep = blocks.sample_anchors(jax.random.fold_in(key, state.step), batch["loss_mask"], bs, n)
    lm_head = target.lm_head_weight()
    logits_options = dict(
        temperature=lo.temperature,
        logit_scale=draft_cfg.output_multiplier,
        softcap=draft_cfg.final_logit_softcapping,
    )

    def numerator_grad(params: Any, mb: Mapping[str, jax.Array]) -> tuple[Any, dict[str, jax.Array]]:
        """Gradient w.r.t. ``params`` of ``sum(W*l)`` over the rows of ``mb`` (times the loss scale when K = 1:
        the loss gradient itself), and their loss partials."""
        input_ids, segment_ids, positions = mb["input_ids"], mb["segment_ids"], mb["positions"]
        b = input_ids.shape[0]
        if cfg.mode == "online":
            taps, final = target(
                input_ids,
                positions=positions,
                segment_ids=segment_ids,
                layer_ids=draft_cfg.target_layer_ids,
                attention_impl=cfg.attention,
            )
        else:
            taps, final = mb["target_hidden"], mb.get("teacher_hidden")
        labels, mask = blocks.block_targets(input_ids, mb["loss_mask"], mb["anchors"], mb["keep"], bs, segment_ids)
        noise_emb = target.embed(noise_ids(input_ids, mb["anchors"], mb["keep"], bs, draft_cfg.mask_token_id))
        teacher = None
        if lo.kd:
            teacher = jax.lax.stop_gradient(blocks.gather_teacher_logits(final, mb["anchors"], bs))

        def numerator(params):
            draft = nnx.merge(draft_graphdef, jax.tree.map(lambda p: p.astype(compute_dtype), params))
            hidden = draft(
                noise_emb,
                taps,
                mb["anchors"],
                mb["keep"],
                positions=positions,
                segment_ids=segment_ids,
                attention_impl=cfg.attention,
            )
            hidden = hidden.reshape(b, n, bs, hidden.shape[-1])
            pieces = dict(
                objective=lo.objective,
                alpha=lo.alpha,
                gamma=lo.gamma,
                teacher_hidden=teacher,
                per_token=lo.per_token,
                confidence=lo.confidence,
                chunk_blocks=cfg.chunk_blocks,
                compute_dtype=compute_dtype,
                logits_options=logits_options,
            )
            partials = losses.block_partials_from_hidden(
                hidden, lm_head, labels, mask, normalization=lo.normalization, **pieces
            )
            if draft.candidate_selector is not None:  # DFlash2: + selector_weight * the selector loss
                candidates, weights = losses.selector_targets(
                    hidden, lm_head, labels, mask, top_k=draft_cfg.selector_top_k, **pieces
                )
                selector = losses.selector_partials(
                    draft.candidate_selector.scores,
                    hidden,
                    lm_head,
                    labels,
                    mask,
                    candidates,
                    weights,
                    missing=lo.selector_missing,
                    logits_options=logits_options,
                )
                partials = losses.with_selector(partials, selector, lo.selector_weight)
            # K = 1: the scale of this (whole) batch enters the backward pass as the loss's cotangent would;
            # K > 1: it is known only after the last micro-batch and applied to the summed gradients.
            scale = losses.numerator_scale(partials, lo.normalization) if k == 1 else 1.0
            return jnp.sum(partials["weighted_loss"]) * scale, partials

        return jax.grad(numerator, has_aux=True)(params)

    rows = {key_: v for key_, v in batch.items() if key_ not in ("anchors", "keep")}
    rows.update(anchors=anchors, keep=keep)
    if k == 1:
        grads, partials = numerator_grad(state.params, rows)
    else:
        micro = jax.tree.map(lambda x: micro_batches(x, k), rows)

        def micro_grad(mb):  # gradients summed in fp32 whatever the params' dtype
            g, p = numerator_grad(state.params, mb)
            return optim.as_float32(g), p

        def accumulate(acc, mb):
            return jax.tree.map(jnp.add, acc, micro_grad(mb)), None

        first = jax.tree.map(lambda x: x[0], micro)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(micro_grad, first))
        (num_grads, partials), _ = jax.lax.scan(accumulate, zeros, micro)
        scale = losses.numerator_scale(partials, lo.normalization)
        grads = jax.tree.map(lambda g: g * scale, num_grads)
    loss, metrics = losses.reduce_partials(partials, lo.normalization)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(params, opt_state):
        # The optimizer works in fp32 (fp32 moments, fp32 update); apply_updates rounds to the params' dtype.
        updates, new_opt = tx.update(optim.as_float32(grads), opt_state, optim.as_float32(params))
        return optax.apply_updates(params, updates), new_opt

    # A branch, not an elementwise select of new and old: the update then writes the donated buffers in place
    # (a select keeps the old values alive and XLA copies params and moments every step).
    new_params, new_opt = jax.lax.cond(finite, apply, lambda *a: a, state.params, state.opt_state)
    applied = state.step - state.skipped_updates  # optimizer updates so far = the schedule's count
    skipped = state.skipped_updates + (~finite).astype(jnp.int32)
    new_state = TrainState(
        step=state.step + 1,
        params=new_params,
        opt_state=new_opt,
        skipped_updates=skipped,
    )
    real = (batch["segment_ids"] > 0).astype(jnp.float32)  # the global batch's real tokens, on every process
    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        lr=jnp.asarray(schedule(applied), jnp.float32),
        skipped_updates=skipped,
        update_skipped=~finite,
        tokens=real.sum().astype(jnp.int32),
        real_token_fraction=real.mean(),
    )
    return new_state, metrics


# ---------------------------------------------------------------------------------------------------------
# State construction and the compiled step
# ---------------------------------------------------------------------------------------------------------


def split_draft(draft: nnx.Module) -> tuple[nnx.GraphDef, Any]:
    """``nnx.split(draft, nnx.Param)``; the draft must hold nothing but parameters."""
    graphdef, params = nnx.split(draft, nnx.Param)
    return graphdef, params


def init_train_state(
    draft: nnx.Module | Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[nnx.GraphDef, TrainState, TrainState]:
    """The initial state of a drafter (built with one ``param_dtype``: float32 master weights, or bfloat16
    parameters): params by the rules table, fp32 optimizer state on matching shardings. ``draft``: a module (its
    params are placed), or a zero-argument function building one: then its params are created directly in their
    shardings (``jax.jit(init, out_shardings=...)``), never whole on one device. Returns
    ``(draft_graphdef, state, state_shardings)``."""
    build = None if isinstance(draft, nnx.Module) else draft
    graphdef, params = split_draft(nnx.eval_shape(build) if build is not None else draft)
    dtypes = sorted({jnp.dtype(x.dtype).name for x in jax.tree.leaves(params)})
    if len(dtypes) != 1 or dtypes[0] not in PARAM_DTYPES:
        raise ValueError(f"draft params must all be one of {PARAM_DTYPES} (param_dtype), got {dtypes}")
    shardings = train_state_shardings(tx, params, mesh)
    if build is not None:
        params = jax.jit(lambda: split_draft(build())[1], out_shardings=shardings.params)()
    else:
        params = sharding.place(params, shardings.params)
    opt_state = optim.init_opt_state(tx, params, shardings.opt_state)
    rep = sharding.replicated(mesh)
    state = TrainState(
        step=jax.device_put(jnp.int32(0), rep),
        params=params,
        opt_state=opt_state,
        skipped_updates=jax.device_put(jnp.int32(0), rep),
    )
    return graphdef, state, shardings


def train_state_shardings(tx: optax.GradientTransformation, params: Any, mesh: Mesh) -> TrainState:
    """A :class:`TrainState` of ``NamedSharding``s: params by the rules table, moments alike, scalars replicated."""
    p_sh = sharding.state_shardings(params, mesh)
    rep = sharding.replicated(mesh)
    return TrainState(
        step=rep, params=p_sh, opt_state=optim.opt_state_shardings(tx, params, p_sh, mesh), skipped_updates=rep
    )


def abstract_state(state_or_shapes: TrainState, shardings: TrainState) -> TrainState:
    """``jax.ShapeDtypeStruct``s of a state carrying ``shardings`` (the restore target on the current mesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), state_or_shapes, shardings)


def check_batch(batch: Mapping[str, Any], cfg: StepConfig, draft_cfg: DraftConfig, mesh: Mesh) -> None:
    """Shape checks before compiling: clear ValueErrors naming the field (never a silent broadcast)."""
    kd, hidden_size = cfg.loss.kd, draft_cfg.hidden_size
    missing = [k for k in BATCH_KEYS if k not in batch]
    if cfg.mode == "offline" and "target_hidden" not in batch:
        missing.append("target_hidden")
    if cfg.mode == "offline" and kd and "teacher_hidden" not in batch:
        missing.append("teacher_hidden")
    if ("anchors" in batch) != ("keep" in batch):
        missing.append("keep" if "anchors" in batch else "anchors")
    if missing:
        raise ValueError(f"batch is missing {missing} (mode={cfg.mode}, kd={kd})")
    b, s = np.shape(batch["input_ids"])
    for k in ("anchors", "keep"):
        if k in batch and tuple(np.shape(batch[k])) != (b, cfg.num_anchors):
            raise ValueError(
                f"batch[{k!r}] must be [B, num_anchors] = {(b, cfg.num_anchors)}, got {tuple(np.shape(batch[k]))}"
            )
    for k in BATCH_KEYS:
        if tuple(np.shape(batch[k])) != (b, s):
            raise ValueError(f"batch[{k!r}] must have shape {(b, s)} like input_ids, got {tuple(np.shape(batch[k]))}")
    if s % draft_cfg.block_size:
        raise ValueError(f"seq_len {s} must be a multiple of block_size {draft_cfg.block_size}")
    if cfg.mode == "offline":
        th = (b, s, draft_cfg.num_features * hidden_size)
        if tuple(np.shape(batch["target_hidden"])) != th:
            raise ValueError(
                f"batch['target_hidden'] must be [B,S,T*H] = {th} (T = len(target_layer_ids)), "
                f"got {tuple(np.shape(batch['target_hidden']))}"
            )
        if kd and tuple(np.shape(batch["teacher_hidden"])) != (b, s, hidden_size):
            raise ValueError(
                f"batch['teacher_hidden'] must be [B,S,H] = {(b, s, hidden_size)}, "
                f"got {tuple(np.shape(batch['teacher_hidden']))}"
            )
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"] * cfg.grad_accum
    if b * jax.process_count() % n_batch:
        raise ValueError(
            f"global batch size {b * jax.process_count()} is not divisible by data*fsdp x grad_accum = {n_batch}"
        )


def jit_train_step(
    draft: nnx.Module,
    target_graphdef: nnx.GraphDef,
    state_shardings: TrainState,
    target_shardings: Any,
    *,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    cfg: StepConfig,
    mesh: Mesh,
    target_unread: Any = None,
) -> Any:
    """:func:`train_step` under ``jax.jit`` with explicit shardings, ``(state, target_state, batch, key)`` ->
    ``(state, metrics)``, the state donated. ``draft`` may be abstract (``nnx.eval_shape``): only its graph,
    config and compute dtype are read (:class:`TrainStep` and the ahead-of-time ``dflash-jax compile``).
    ``target_unread``: see :func:`train_step`."""
    draft_graphdef, _ = split_draft(draft)
    rep = sharding.replicated(mesh)
    fn = functools.partial(
        train_step,
        draft_graphdef=draft_graphdef,
        target_graphdef=target_graphdef,
        tx=tx,
        schedule=schedule,
        draft_cfg=draft.cfg,
        cfg=cfg,
        compute_dtype=draft.dtype,
        target_unread=target_unread,
    )
    return jax.jit(
        fn,
        in_shardings=(state_shardings, target_shardings, NamedSharding(mesh, P(sharding.BATCH_AXES)), rep),
        out_shardings=(state_shardings, rep),
        donate_argnums=(0,),
    )


class TrainStep:
    """``step(state, batch, key) -> (state, metrics)``: the jitted :func:`train_step` bound to a mesh and a frozen
    target (never donated, never differentiated). A target loaded onto the mesh by the rules table
    (``load_target(..., mesh=mesh)``) is used as it is, the same arrays as the caller's (eval shares them); any
    other is placed once here. Tensors left unread by the loader (``only``) are not passed.

    ``batch`` may hold host (numpy) arrays of this process's rows (placed over ``("data", "fsdp")`` here) or
    already-sharded ``jax.Array``s. ``state`` is donated: do not reuse the argument after the call.
    """

    def __init__(
        self,
        *,
        draft: nnx.Module,
        state_shardings: TrainState,
        target: nnx.Module,
        tx: optax.GradientTransformation,
        schedule: optax.Schedule,
        cfg: StepConfig,
        mesh: Mesh,
    ):
        self.cfg, self.draft_cfg, self.mesh = cfg, draft.cfg, mesh
        target_graphdef, target_state = nnx.split(target, nnx.Param)
        target_state, unread = nnx.split_state(target_state, lambda _, v: not target_io.is_unread(v.get_value()), ...)
        if unread and cfg.mode == "online":
            raise ValueError("online training reads the whole target, but it was loaded with only some tensors")
        self.target_shardings = sharding.state_shardings(target_state, mesh)
        self.target_state = sharding.place(target_state, self.target_shardings)  # no copy when already placed
        self.state_shardings = state_shardings
        self.jitted = jit_train_step(
            draft,
            target_graphdef,
            state_shardings,
            self.target_shardings,
            tx=tx,
            schedule=schedule,
            cfg=cfg,
            mesh=mesh,
            target_unread=unread if unread else None,
        )
        self._compiled: set[tuple] = set()  # batch signatures compiled (multi-process: see __call__)

    def place_batch(self, batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        """Validate a batch and put its host arrays on the mesh (already-placed arrays pass through)."""
        check_batch(batch, self.cfg, self.draft_cfg, self.mesh)
        host = {k: v for k, v in batch.items() if not isinstance(v, jax.Array)}
        return {**dict(batch), **sharding.shard_batch(host, self.mesh)}

    def __call__(
        self, state: TrainState, batch: Mapping[str, Any], key: jax.Array
    ) -> tuple[TrainState, dict[str, jax.Array]]:
        batch = self.place_batch(batch)
        with jax.set_mesh(self.mesh):  # the Pallas attention kernels run per batch shard (kernels.batch_sharded)
            if jax.process_count() > 1:
                # Processes finish compiling at different times, and the first collective of the step gives up
                # when its peers are late (gloo's connect timeout); compile first, meet, then run.
                sig = tuple((k, v.shape, str(v.dtype)) for k, v in sorted(batch.items()))
                if sig not in self._compiled:
                    self.jitted.lower(state, self.target_state, batch, key).compile()
                    sharding.barrier("dflash_jax:train_step_compiled")
                    self._compiled.add(sig)
            return self.jitted(state, self.target_state, batch, key)
