"""Batched autoregressive generation with the target's KV cache: the one decoding loop behind eval's plain
decoding, :func:`greedy_generate` and ``dflash-jax regenerate``.

Shapes are static per (rows, prompt bucket, capacity): prompts are right-padded to a bucket ``P`` (power of two),
the cache holds ``P + capacity`` slots, and a ``lax.while_loop`` emits one token per row per step until every row
has stopped, on a token of ``eos_token_ids`` (kept in the output) or on its own ``limits[b] <= capacity``. So a
new prompt length or token count reuses the executable of its bucket instead of compiling again. With a mesh,
rows are sharded over its batch axes ``("data", "fsdp")`` (``NamedSharding``) and the parameters placed by the
logical-axis rules.

Sampling: ``T = 0`` is greedy (argmax); ``T > 0`` samples ``softmax(z / T)``, restricted to the top-p nucleus
when ``top_p < 1`` (Holtzman et al. 2020: the most likely tokens whose probability mass first reaches ``top_p``).
Row ``b`` draws step ``t`` with ``fold_in(keys[b], t)``: a row's tokens depend on its own key only, never on the
batch it ran in.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dflash_jax import sharding

MIN_BUCKET = 8


class Generated(NamedTuple):
    """Host results of one batch: ``tokens[b]`` int32 (generated ids, EOS included, at most ``limits[b]``) and
    ``seconds``, the wall time of the compiled run (compile excluded)."""

    tokens: list[np.ndarray]
    seconds: float


# ---------------------------------------------------------------------------------------------------------
# Pure pieces (shared with eval/speculative.py)
# ---------------------------------------------------------------------------------------------------------


def bucket_length(n: int, limit: int | None = None) -> int:
    """Smallest power of two ``>= max(n, MIN_BUCKET)``, capped at ``limit`` (if given)."""
    b = max(MIN_BUCKET, 1 << max(int(n) - 1, 0).bit_length())
    return b if limit is None else min(b, int(limit))


def is_eos(values: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    """``values`` (any shape) int -> bool, true where the id is in ``eos_ids``."""
    return jnp.isin(values, jnp.asarray(eos_ids or (-1,), jnp.int32))


def top_p_logits(z: jax.Array, top_p: float) -> jax.Array:
    """``z [..., V]`` with every token outside the top-p nucleus set to ``-inf``: a token is kept when the mass
    of the strictly more likely tokens is ``< top_p`` (ties at the threshold are kept)."""
    desc = jnp.sort(z, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(desc, axis=-1)
    keep = jnp.cumsum(probs, axis=-1) - probs < top_p
    threshold = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(z >= threshold, z, -jnp.inf)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: float, top_p: float = 1.0) -> jax.Array:
    """Token ids int32 ``[...]`` from ``logits [..., V]``: argmax at ``temperature == 0``, else a sample of
    ``softmax(z / T)`` (within the top-p nucleus when ``top_p < 1``) drawn with the one ``key``."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    z = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        z = top_p_logits(z, top_p)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


def prefill(model, prompts: jax.Array, num_valid: jax.Array, max_len: int, layer_ids: tuple[int, ...] = ()):
    """Cached forward of right-padded ``prompts [B,P]`` (``num_valid [B]`` real tokens each) into a fresh cache of
    ``max_len`` slots. Returns ``(taps [B,P,T*H], cache, logits [B,V] fp32 of each row's last real token)``."""
    cache = model.init_cache(prompts.shape[0], max_len)
    taps, hidden, cache = model.decode(prompts, cache, layer_ids=layer_ids, num_valid=num_valid)
    last = jnp.take_along_axis(hidden, (num_valid - 1)[:, None, None], axis=1)[:, 0]
    return taps, cache, model.logits(last)


def decode_fn(
    state,
    prompts,
    num_valid,
    limits,
    keys,
    *,
    graph,
    capacity: int,
    temperature: float,
    top_p: float,
    eos_token_ids: tuple[int, ...],
    mesh=None,
):
    """Traceable batched decoding. ``prompts [B,P]`` int32 right-padded, ``num_valid [B]``, ``limits [B]`` (tokens
    to generate per row, ``1 <= limits <= capacity``), ``keys [B]`` PRNG keys.

    Returns ``(tokens [B, capacity] int32, lengths [B] int32)``; ``tokens[b, :lengths[b]]`` is row ``b``'s output.
    """
    model = nnx.merge(graph, state)
    _, cache, logits = prefill(model, prompts, num_valid, prompts.shape[1] + capacity)
    if mesh is not None:
        rows = NamedSharding(mesh, P(None, ("data", "fsdp")))
        cache = cache.replace(
            k=jax.lax.with_sharding_constraint(cache.k, rows), v=jax.lax.with_sharding_constraint(cache.v, rows)
        )

    def pick(logits, t):
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, t)
        return jax.vmap(lambda z, k: sample_logits(z, k, temperature, top_p))(logits, step_keys)

    first = pick(logits, 0)
    out = jnp.zeros((prompts.shape[0], capacity), jnp.int32).at[:, 0].set(first)
    done = (limits <= 1) | is_eos(first, eos_token_ids)
    lengths = jnp.ones_like(limits)

    def body(carry):
        cache, last, out, lengths, done, t = carry
        _, hidden, cache = model.decode(last[:, None], cache)
        tok = pick(model.logits(hidden[:, 0]), t)
        out = out.at[:, t].set(tok)
        lengths = jnp.where(done, lengths, t + 1)
        done = done | is_eos(tok, eos_token_ids) | (t + 1 >= limits)
        return cache, tok, out, lengths, done, t + 1

    carry = jax.lax.while_loop(
        lambda c: (c[5] < capacity) & ~jnp.all(c[4]), body, (cache, first, out, lengths, done, jnp.int32(1))
    )
    return carry[2], carry[3]


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compilation, cached per graph / shapes / shardings / static settings
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _jitted(fn: Callable, statics: tuple):
    return jax.jit(functools.partial(fn, **dict(statics)))


_COMPILED: dict = {}


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)


def run_compiled(fn: Callable, statics: dict, args: tuple) -> tuple[Any, float]:
    """Run ``jax.jit(partial(fn, **statics))(*args)``, compiled ahead of time once per (fn, statics, argument
    shapes/dtypes/shardings); returns the host outputs (numpy; gathered from every process when the arguments span
    several, a collective then) and the seconds of the compiled run alone."""
    frozen = tuple(sorted(statics.items()))
    sig = (fn, frozen, _signature(args))
    if sig not in _COMPILED:
        if len(_COMPILED) >= 64:
            _COMPILED.clear()
        _COMPILED[sig] = _jitted(fn, frozen).lower(*args).compile()
    start = time.perf_counter()
    out = jax.block_until_ready(_COMPILED[sig](*args))
    secs = time.perf_counter() - start
    return sharding.to_host(out), secs


# ---------------------------------------------------------------------------------------------------------
# Host driver
# ---------------------------------------------------------------------------------------------------------


def row_keys(seed: int, *ids: Sequence[int]) -> jax.Array:
    """``[B]`` PRNG keys ``fold_in(...fold_in(key(seed), ids[0][b])..., ids[-1][b])``: one reproducible key per
    row from its identity (e.g. source record and turn), whatever batch the row runs in."""
    n = len(ids[0]) if ids else 1
    keys = jnp.broadcast_to(jax.random.key(int(seed)), (n,))
    for col in ids:
        keys = jax.vmap(jax.random.fold_in)(keys, jnp.asarray(col, jnp.uint32))
    return keys


class Generator:
    """Batched generation for one target model (a ``models.target.TargetModel``), optionally on a mesh.

    ``mesh``: a ``("data", "fsdp", "tensor")`` mesh (``sharding.make_mesh``); the parameters are placed by
    the logical-axis rules once, here, and every batch is padded to a multiple of ``data * fsdp`` rows.
    """

    def __init__(self, model, *, mesh=None):
        self.graph, state = nnx.split(model)
        if mesh is not None:
            with nnx.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
                state = jax.device_put(state, sharding.state_shardings(state, mesh))
        self.state, self.mesh = state, mesh
        self.vocab_size = model.config.vocab_size

    def __call__(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int | Sequence[int],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        keys: jax.Array | None = None,
        seed: int = 0,
        eos_token_ids: Sequence[int] = (),
        prompt_bucket: int | None = None,
        capacity: int | None = None,
    ) -> Generated:
        """Generate for every prompt (1-D int arrays) at most ``max_new_tokens`` (one int, or one per prompt).

        ``keys [B]`` (default :func:`row_keys` ``(seed, range(B))``) seed the rows' sampling. ``prompt_bucket``
        (default :func:`bucket_length` of the longest prompt) and ``capacity`` (default the bucket of the largest
        limit) are the static shapes; reusing them reuses the compiled loop.
        """
        prompts = [np.asarray(p, np.int32) for p in prompts]
        n = len(prompts)
        limits = np.broadcast_to(np.asarray(max_new_tokens, np.int64), (n,)).astype(np.int32)
        if n == 0 or any(p.ndim != 1 or p.size == 0 for p in prompts):
            raise ValueError("generate: prompts must be a non-empty list of non-empty 1-D token-id arrays")
        if any(p.min() < 0 or p.max() >= self.vocab_size for p in prompts):
            raise ValueError(f"generate: prompt token ids must be in [0, vocab_size={self.vocab_size})")
        if limits.min() < 1:
            raise ValueError(f"generate: max_new_tokens must be >= 1, got {max_new_tokens!r}")
        if not temperature >= 0 or not 0 < top_p <= 1:
            raise ValueError(f"generate: temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        longest = max(p.size for p in prompts)
        bucket = prompt_bucket or bucket_length(longest)
        cap = capacity or bucket_length(int(limits.max()))
        if bucket < longest or cap < limits.max():
            raise ValueError(
                f"generate: prompt_bucket {bucket} < longest prompt {longest} or capacity {cap} < "
                f"max_new_tokens {int(limits.max())}"
            )
        keys = row_keys(seed, range(n)) if keys is None else keys
        rows = n
        if self.mesh is not None:  # pad with copies of row 0 to a multiple of the batch axes
            per = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            rows = -(-n // per) * per
        padded = np.zeros((rows, bucket), np.int32)
        num_valid = np.ones((rows,), np.int32)
        for i, p in enumerate(prompts):
            padded[i, : p.size], num_valid[i] = p, p.size
        limits = np.concatenate([limits, np.ones((rows - n,), np.int32)])
        keys = jnp.concatenate([keys, jnp.broadcast_to(keys[:1], (rows - n,))]) if rows > n else keys
        args = (self.state, jnp.asarray(padded), jnp.asarray(num_valid), jnp.asarray(limits), keys)
        if self.mesh is not None:
            args = (self.state, *(jax.device_put(a, sharding.batch_sharding(self.mesh, a.ndim)) for a in args[1:]))
        statics = dict(
            graph=self.graph,
            capacity=int(cap),
            temperature=float(temperature),
            top_p=float(top_p),
            eos_token_ids=tuple(int(e) for e in eos_token_ids),
            mesh=self.mesh,
        )
        (tokens, lengths), secs = run_compiled(decode_fn, statics, args)
        return Generated([np.asarray(tokens[i, : lengths[i]], np.int32) for i in range(n)], secs)


def greedy_generate(target: Any, prompt_ids: Sequence[int], max_new_tokens: int, *, stop_ids=None) -> list[int]:
    """Greedy continuation of one prompt by ``target`` (a ``models.target_io.Target``) with the KV cache; stops
    after a token in ``stop_ids`` (default the target's ``eos_token_ids``), which is included in the result. The
    batched loop above: one executable per power-of-two bucket of the prompt length and of ``max_new_tokens``."""
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim != 1 or prompt.size == 0 or max_new_tokens <= 0:
        raise ValueError("greedy_generate: prompt_ids must be a non-empty 1-D sequence and max_new_tokens > 0")
    stop = target.eos_token_ids if stop_ids is None else stop_ids
    return Generator(target.model)([prompt], int(max_new_tokens), eos_token_ids=stop).tokens[0].tolist()
