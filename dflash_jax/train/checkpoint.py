"""Orbax checkpoints of the training state with exact resume.

One step directory holds three items (Orbax v0 ``CheckpointManager``, ``args.Composite``):

- ``params``: the fp32 master draft parameters (``nnx.State``), ``StandardSave``;
- ``opt_state``: the optax state, ``StandardSave``;
- ``meta``: JSON ``{step, skipped_updates, data_state, rng, fingerprint}``: the data-iterator position (whatever
  JSON the iterator's ``state()`` returns), the base PRNG key as integers, and the config fingerprint.

Saves are asynchronous (device->host copies finish before ``save`` returns, so donated buffers are safe), happen
every ``save_every`` steps (plus ``force=True`` for the final step), and keep the ``keep`` newest steps.

Completeness: Orbax writes a step into a temporary directory and renames it when done. A step directory counts
only if its name is an integer and it holds ``_CHECKPOINT_METADATA`` and all three items; anything else (an
interrupted copy, a crashed remote write) is renamed to ``<name>.incomplete`` on start-up, never restored.

Restore takes an abstract :class:`~dflash_jax.train.step.TrainState` of ``jax.ShapeDtypeStruct`` carrying the
*current* mesh's ``NamedSharding``s, so a checkpoint written on one mesh shape resumes on another.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from dflash_jax.train import sharding
from dflash_jax.train.step import TrainState

log = logging.getLogger(__name__)

ITEMS = ("params", "opt_state", "meta")
_METADATA_FILE = "_CHECKPOINT_METADATA"


def config_fingerprint(**sections: Any) -> dict[str, Any]:
    """Flatten config sections (dataclasses / mappings / scalars) into ``{"section.field": json_value}``.

    Pass only what must not change across a resume (model architecture, target identity, block size, ...).
    """
    out: dict[str, Any] = {}

    def visit(prefix: str, obj: Any) -> None:
        if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
            obj = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        if isinstance(obj, Mapping):
            for k, v in obj.items():
                visit(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(obj, (list, tuple)):
            out[prefix] = [_jsonable(v) for v in obj]
        else:
            out[prefix] = _jsonable(obj)

    for name, section in sections.items():
        visit(name, section)
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, (np.generic,)):
        return v.item()
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def check_fingerprint(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise ValueError naming every field whose saved value differs from the current config."""
    keys = sorted(set(saved) | set(current))
    diffs = [f"{k}: checkpoint={saved.get(k, '<absent>')!r} config={current.get(k, '<absent>')!r}"
             for k in keys if saved.get(k, "<absent>") != current.get(k, "<absent>")]
    if diffs:
        raise ValueError("checkpoint was written with another config; differing fields: " + "; ".join(diffs))


def key_to_json(key: jax.Array) -> dict[str, Any]:
    """A PRNG key (typed or raw uint32) as ``{"impl": name, "data": [ints]}``."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return {"impl": str(jax.random.key_impl(key)), "data": np.asarray(jax.random.key_data(key)).tolist(),
                "typed": True}
    return {"impl": None, "data": np.asarray(key).tolist(), "typed": False}


def key_from_json(obj: Mapping[str, Any]) -> jax.Array:
    """Inverse of :func:`key_to_json`."""
    data = np.asarray(obj["data"], np.uint32)
    if obj["typed"]:
        return jax.random.wrap_key_data(data, impl=obj["impl"])
    return jax.numpy.asarray(data)


def is_complete_step_dir(path: str) -> bool:
    """A finalized step directory: integer name, Orbax metadata file and all items present."""
    name = os.path.basename(os.path.normpath(path))
    if not name.isdigit() or not os.path.isdir(path):
        return False
    return os.path.isfile(os.path.join(path, _METADATA_FILE)) and all(
        os.path.isdir(os.path.join(path, item)) and os.listdir(os.path.join(path, item)) for item in ITEMS)


class Checkpointer:
    """Async Orbax ``CheckpointManager`` for :class:`TrainState` + data position + RNG + config fingerprint.

    ``directory`` must be a local / mounted path (incomplete-step detection uses ``os``). ``fingerprint`` (from
    :func:`config_fingerprint`) is stored with every step and checked on restore.
    """

    def __init__(self, directory: str, *, save_every: int, keep: int | None = 3,
                 fingerprint: Mapping[str, Any] | None = None, async_save: bool = True):
        if save_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {save_every}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 or None, got {keep}")
        self.directory = os.path.abspath(directory)
        self.fingerprint = dict(fingerprint or {})
        self.save_every = int(save_every)
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            self._quarantine_incomplete()
        sharding.barrier("dflash_jax:checkpoints_quarantined")
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                                 enable_async_checkpointing=async_save))

    def _quarantine_incomplete(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.isdigit() and not is_complete_step_dir(path):
                log.warning("checkpoint step %s in %s is incomplete; renamed to %s.incomplete and ignored",
                            name, self.directory, name)
                os.replace(path, path + ".incomplete")

    def all_steps(self) -> list[int]:
        """Complete, restorable steps, ascending."""
        return sorted(s for s in self._mngr.all_steps()
                      if is_complete_step_dir(os.path.join(self.directory, str(s))))

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, state: TrainState, *, data_state: Any = None, rng: jax.Array | None = None,
             force: bool = False) -> bool:
        """Save ``state`` at ``int(state.step)`` if ``step % save_every == 0`` (or ``force``); returns whether it
        did. A step that is already saved is not written again."""
        step = int(jax.device_get(state.step))
        if not (force or step % self.save_every == 0) or step in self._mngr.all_steps():
            return False
        meta = {"step": step, "skipped_updates": int(jax.device_get(state.skipped_updates)),
                "data_state": data_state, "rng": None if rng is None else key_to_json(rng),
                "fingerprint": self.fingerprint}
        args = ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                  opt_state=ocp.args.StandardSave(state.opt_state),
                                  meta=ocp.args.JsonSave(meta))
        return self._mngr.save(step, args=args, force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict[str, Any]]:
        """Restore ``step`` (default: latest complete) onto the shardings carried by ``abstract_state``.

        Returns ``(state, meta)`` with ``meta = {"step", "data_state", "rng" (a key or None)}``. Raises
        FileNotFoundError when there is no complete step, ValueError on a config-fingerprint mismatch.
        """
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"checkpoint step {step} is not a complete step in {self.directory}: {steps}")
        meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        check_fingerprint(meta.get("fingerprint", {}), self.fingerprint)
        restored = self._mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state)))
        step_sharding = abstract_state.step.sharding
        state = TrainState(
            step=jax.device_put(np.int32(meta["step"]), step_sharding),
            params=restored["params"], opt_state=restored["opt_state"],
            skipped_updates=jax.device_put(np.int32(meta["skipped_updates"]), abstract_state.skipped_updates.sharding))
        rng = None if meta.get("rng") is None else key_from_json(meta["rng"])
        return state, {"step": int(meta["step"]), "data_state": meta.get("data_state"), "rng": rng}

    def wait(self) -> None:
        """Block until pending async saves are committed."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
