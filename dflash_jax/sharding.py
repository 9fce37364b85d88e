"""Device mesh, the one logical-axis rules table, and pytree placement helpers.

Every parameter in ``dflash_jax`` carries logical axis names (see ``models/layers.py``); this module is the only
place that maps them onto the ``("data", "fsdp", "tensor")`` mesh. The same table shards the draft parameters,
their optimizer state and the frozen target parameters; the batch is sharded over ``("data", "fsdp")``.

A logical dimension whose size is not divisible by its mesh axes (or whose mesh axis is already used by an
earlier dimension of the same array) is replicated instead, so tiny test shapes work on any mesh.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")

# The ONE logical -> mesh rules table (MaxText-style). ``None`` = replicated.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("expert", "fsdp"),  # stacked MoE experts [E, ...]: expert-parallel (their leading dim takes fsdp from embed)
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("fused", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("head_dim", None),
)

_MULTIHOST_ENV = (
    "JAX_COORDINATOR_ADDRESS",
    "JAX_NUM_PROCESSES",
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


def _env_wants_multihost(env: Mapping[str, str]) -> bool:
    """True when the environment describes more than one process (explicit JAX vars, SLURM, OpenMPI, TPU pod)."""
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    for key in ("JAX_NUM_PROCESSES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if env.get(key, "").strip().isdigit() and int(env[key]) > 1:
            return True
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` once when multi-host environment variables are present.

    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` are passed explicitly when set;
    otherwise JAX auto-detects the cluster (SLURM, OpenMPI, Cloud TPU pods). Returns True if initialised here.
    Must run before anything touches ``jax.devices()``.
    """
    env = os.environ if env is None else env
    if not _env_wants_multihost(env):
        return False
    if jax.distributed.is_initialized():
        return False
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
    if env.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
    return True


def check_mesh_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``mesh.shape`` as ints: 3 entries ``[data, fsdp, tensor]``, each >= 1 or at most one ``-1``."""
    shape = tuple(int(s) for s in shape)
    _check(len(shape) == 3, f"mesh.shape must have 3 entries [data, fsdp, tensor], got {list(shape)}")
    _check(
        all(s >= 1 or s == -1 for s in shape) and shape.count(-1) <= 1,
        f"mesh.shape entries must be >= 1, with at most one -1 (= all remaining devices), got {list(shape)}",
    )
    return shape


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """``mesh.shape`` with its (at most one) ``-1`` entry replaced by the remaining devices; the product must equal
    ``num_devices``. Raises ``ValueError`` naming ``mesh.shape``."""
    shape = check_mesh_shape(shape)
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        _check(
            num_devices % known == 0, f"mesh.shape {list(shape)}: {num_devices} devices are not divisible by {known}"
        )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    _check(
        math.prod(shape) == num_devices,
        f"mesh.shape {list(shape)} has {math.prod(shape)} devices, but this machine has {num_devices} "
        f"(jax.device_count())",
    )
    return shape


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """An Auto-axis mesh ``("data", "fsdp", "tensor")`` of ``shape``; one entry may be -1 (fill the rest).

    ``devices`` defaults to all devices (of all processes); see :func:`resolve_mesh_shape`.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(shape, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES,
) -> P:
    """Map logical axis names of an array of ``shape`` to a mesh ``PartitionSpec`` through ``rules``.

    Unknown logical names raise ValueError. A dimension is replicated when its size is not divisible by the
    product of its mesh axes, or when one of those mesh axes was already used by an earlier dimension.
    """
    if not logical:
        return P()
    if len(logical) != len(shape):
        raise ValueError(f"logical axes {tuple(logical)} do not match array rank {len(shape)} (shape {tuple(shape)})")
    table = dict(rules)
    used: set[str] = set()
    out: list[Any] = []
    for name, size in zip(logical, shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule in the sharding table {sorted(table)}")
        axes = table[name]
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        axes = tuple(a for a in axes if mesh.shape[a] > 1)
        n = math.prod(mesh.shape[a] for a in axes)
        if not axes or size % n or used.intersection(axes):
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def mesh_batch_axes() -> tuple[str, ...]:
    """The batch axes (:data:`BATCH_AXES`) of the mesh set by ``jax.set_mesh`` that split it (size > 1); ``()``
    without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def constrain_rows(x: jax.Array) -> jax.Array:
    """Activation sharding: ``x [B, ...]`` with its rows over the batch axes of the mesh set by ``jax.set_mesh``
    (the step runs under it); unchanged without a mesh or when they do not divide ``B``. Without it XLA may lay
    the residual stream out like the fsdp-sharded weights and gather whole batches: the Qwen3-8B step on
    ``[1,8,1]`` needed 150 GiB of temp per device instead of 81 (docs/benchmarks.md)."""
    axes = mesh_batch_axes()
    n = math.prod(jax.sharding.get_abstract_mesh().shape[a] for a in axes)
    if not axes or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(axes))


def _array_shape(x: Any) -> tuple[int, ...]:
    return tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)


def state_shardings(state: Any, mesh: Mesh) -> Any:
    """NamedShardings for an ``nnx.State`` (concrete or abstract), same tree structure as ``state``.

    Variables are mapped through :data:`LOGICAL_AXIS_RULES` using their ``out_sharding`` logical names; plain
    array leaves (no metadata) are replicated.
    """

    def leaf(x):
        if isinstance(x, nnx.Variable):
            logical = x.get_metadata().get("out_sharding")
            return x.replace(NamedSharding(mesh, logical_to_mesh_spec(logical, _array_shape(x.get_value()), mesh)))
        return NamedSharding(mesh, P())

    return jax.tree.map(leaf, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_replication(params: Mapping[str, Any], shardings: Mapping[str, Any], mesh: Mesh, tolerance: float) -> None:
    """Refuse a mesh that leaves large parameters whole on every device.

    ``params`` / ``shardings``: name -> parameter tree (concrete or abstract) / its ``NamedSharding`` tree. With
    ``fsdp * tensor > 1``, the leaves whose sharding uses neither axis are counted; if their bytes exceed
    ``tolerance`` of all parameter bytes, ValueError naming the largest ones (``mesh.replicated_tolerance``)."""
    if mesh.shape["fsdp"] * mesh.shape["tensor"] == 1:
        return
    total, whole = 0, []
    for name, tree in params.items():
        leaves = jax.tree_util.tree_leaves_with_path(tree)
        for (path, x), sh in zip(leaves, jax.tree.leaves(shardings[name])):
            nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
            total += nbytes
            if not {a for axes in sh.spec if axes for a in ((axes,) if isinstance(axes, str) else axes)} & {
                "fsdp",
                "tensor",
            }:
                whole.append((nbytes, name + jax.tree_util.keystr(path)))
    kept = sum(n for n, _ in whole)
    if total and kept > tolerance * total:
        top = ", ".join(f"{p} ({n / 2**20:.1f} MiB)" for n, p in sorted(whole, reverse=True)[:5])
        raise ValueError(
            f"mesh.shape {list(mesh.shape.values())} leaves {kept / total:.1%} of the parameter bytes "
            f"unsharded on every device (mesh.replicated_tolerance = {tolerance:.1%}); largest: {top}. "
            "Choose fsdp/tensor sizes that divide these dimensions, or raise mesh.replicated_tolerance"
        )


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (batch) dimension over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """:func:`batch_sharding` for every array of a batch dict."""
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a batch dict of host arrays on ``mesh`` with the leading dim over ``("data", "fsdp")``.

    Each process passes its *own* rows (``global_B / process_count`` of them, see :func:`process_rows`); on a
    single process that is the whole batch. The global batch size must be divisible by ``data*fsdp``.
    """
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_b = v.shape[0] * jax.process_count()
        if global_b % n_batch:
            raise ValueError(f"batch[{k!r}]: global batch size {global_b} is not divisible by data*fsdp = {n_batch}")
        out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
    return out


def process_rows(global_batch_size: int) -> slice:
    """The rows of a global batch this process loads (contiguous, equal-sized split across processes)."""
    n = jax.process_count()
    if global_batch_size % n:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by process_count {n}")
    per = global_batch_size // n
    return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def place(tree: Any, shardings: Any) -> Any:
    """``jax.device_put`` a pytree onto matching shardings (a sharding tree or one sharding for all leaves)."""
    return jax.device_put(tree, shardings)


def to_host(tree: Any) -> Any:
    """Host numpy copies of a (possibly sharded) pytree's leaves, each the whole global value.

    Leaves that span other processes' devices are gathered with ``multihost_utils.process_allgather``, a
    collective: with several processes every process must call this with the same tree. Leaves this process
    holds whole (numpy, or arrays on its own devices) are copied locally."""
    leaves, treedef = jax.tree.flatten(tree)
    remote = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    out = [None if i in remote else np.asarray(jax.device_get(x)) for i, x in enumerate(leaves)]
    if remote:
        from jax.experimental import multihost_utils

        gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
        for i, x in zip(remote, gathered):
            out[i] = np.asarray(x)
    return jax.tree.unflatten(treedef, out)


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op on one process): after process 0 changes
    shared state (run directory, checkpoints) and before the others rely on it."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
