"""``dflash-jax compile``: the whole train step compiled from abstract shapes (no weights), its per-device memory
equal to the bytes of the sharded arguments, and the same step lowered for TPU and CUDA on this CPU machine."""

import json
import math

import jax
import numpy as np

from dflash_jax import cli, sharding
from dflash_jax import config as config_lib
from dflash_jax.train import aot

SETS = ["--set", "mesh.shape=[2,2,2]", "--set", "train.grad_accum=2", "--set", "data.batch_size=8"]


def _report(capsys, *args):
    assert cli.main(["compile", "--config", "tiny", *SETS, *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_compile_cpu_reports_per_device_bytes_of_the_sharded_arguments(capsys):
    rep = _report(capsys)
    assert rep["devices"] == 8 and rep["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and rep["grad_accum"] == 2
    config = config_lib.load_config("tiny", [s for s in SETS if s != "--set"])
    _, args = aot.abstract_step(config, aot.target_config(config), sharding.make_mesh(config.mesh.shape))

    def shard_bytes(x):
        shape = x.sharding.shard_shape(x.shape)
        itemsize = 8 if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize
        return math.prod(shape) * itemsize

    expected = sum(shard_bytes(x) for x in jax.tree.leaves(args))
    assert rep["per_device_bytes"]["argument"] == expected
    assert rep["flops_per_device"] > 0 and rep["compile_s"] > 0


def test_compile_lowers_for_tpu_and_cuda(capsys):
    for platform in ("tpu", "cuda"):
        rep = _report(capsys, "--platform", platform)
        assert rep["lowered"] and rep["nr_devices"] == 8 and rep["module_bytes"] > 0


def test_rows_constraint_keeps_fsdp_activations_batch_sharded(monkeypatch):
    """The residual stream's batch constraint (``sharding.constrain_rows`` in every decoder block) is what keeps
    the ``[1,8,1]`` step's activations split by rows: without it XLA lays them out like the fsdp-sharded weights
    and the compiled per-device temp bytes double (Qwen3-8B: 150 -> 81 GiB, docs/benchmarks.md)."""
    config = config_lib.load_config(
        "tiny",
        [
            "mesh.shape=[1,8,1]",
            "data.batch_size=8",
            "data.seq_len=256",
            "target.random.hidden_size=256",
            "target.random.intermediate_size=512",
        ],
    )
    constrained = aot.compile_report(config)["per_device_bytes"]["temp"]
    monkeypatch.setattr(sharding, "constrain_rows", lambda x: x)
    free = aot.compile_report(config)["per_device_bytes"]["temp"]
    assert constrained < 0.6 * free, (constrained, free)
