"""scripts/gpu_bench.py (issue 8): the CPU dry-run path of both systems, the FLOP formula and the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts")
sys.path.insert(0, SCRIPTS)

import gpu_bench  # noqa: E402


def test_flops_reference_executed_adds_dense_attention_and_full_teacher():
    sh = gpu_bench.bts.SHAPES["tiny"]
    f = gpu_bench.flops("tiny")
    b, s, bs, n, h, v = sh["batch"], sh["seq"], sh["block"], sh["anchors"], sh["hidden"], sh["vocab"]
    q = n * bs
    dense_extra = 3 * sh["draft_layers"] * 4 * b * q * (q - bs) * sh["heads"] * sh["head_dim"]  # fwd + 2x bwd
    teacher_extra = 2 * b * s * h * v - 2 * b * q * h * v  # all S positions instead of the Q KD rows
    assert f["reference_executed"] - f["model"] == dense_extra + teacher_extra
    assert f["model"] > 0


# Model FLOPs of one qwen3-8b step, by hand from the formula in bench_train_step's docstring (B=1, S=3072, N=512,
# bs=16 -> Q=8192; H=4096, 32 query / 8 KV heads of 128, I=12288, V=151936, 36 target / 5 draft layers, 5 taps):
#   target   2*S*36*192,937,984 (6.95e9 weights: Qwen3-8B's published non-embedding size) + 4*S^2*32*128*36
#                                                                                          =  48,241,072,668,672
#   draft    2*S*5H*H (fc) + 5 * (2*S*H*2048 + 2*Q*H*10240 + 2*Q*3*H*I + 4*Q*(S+16)*4096)  =  18,650,895,482,880
#   lm_head  2*Q*H*V                                                                       =  10,196,252,360,704
#   F = target + 3*draft + 2*lm_head + lm_head (KD teacher rows)                           = 134,782,516,199,424
QWEN3_8B_MODEL_FLOPS = 134_782_516_199_424


def _rec(system, config, step_s, mem, overhead=0.1):
    rec = dict(
        system=system,
        config=config,
        step_s=step_s,
        steps=10,
        warmup=2,
        peak_mem_gib=mem,
        peak_mem_kind="device",
        dpace_overhead_pct=overhead,
        loss=11.9,
        device="cuda:NVIDIA H200",
        versions={"x": "1"},
    )
    if system == "jax":
        rec.update(remat=False, compile_s=30.0, matmul_ceiling_tflops=800.0, nominal_peak_tflops=989.0)
    return rec


def test_report_ratio_targets_and_mfu():
    lines = gpu_bench.report(
        [
            _rec("reference", "qwen3-8b", 0.36, 40.0),
            _rec("jax", "qwen3-8b", 0.2, 30.0),
            _rec("jax", "qwen3-1.7b", 0.1, 10.0, overhead=0.7),
        ]
    )
    text = "\n".join(lines)
    section_17b = text[text.index("== qwen3-1.7b") : text.index("== qwen3-8b")]  # fixed config order
    assert "reference: MISSING (the process failed or timed out)" in section_17b  # no 1.7b reference record
    assert "ratio_vs_reference" not in section_17b and lines[-1] == "ratio_vs_reference=1.800"
    assert "ratio_vs_reference=1.800" in text and "speed: target >= 1.5x: met" in text
    assert "memory_ratio_jax_fp32_master_vs_reference_bf16=0.750" in text
    assert gpu_bench.flops("qwen3-8b")["model"] == QWEN3_8B_MODEL_FLOPS
    assert "mfu_vs_ceiling=84.2%" in text  # 100 * F / 0.2 s / 1e12 / 800 TFLOP/s = 84.24 %


def test_report_lists_a_dense_attention_run_beside_auto():
    dense = dict(_rec("jax", "qwen3-8b", 0.3, 50.0), attention="dense")
    lines = gpu_bench.report([_rec("reference", "qwen3-8b", 0.36, 40.0), _rec("jax", "qwen3-8b", 0.2, 30.0), dense])
    jax_lines = [ln for ln in lines if ln.startswith("jax")]
    assert [ln.split(":")[0] for ln in jax_lines] == ["jax", "jax[dense]"]
    assert "attention=dense" in jax_lines[1] and "attention=auto" in jax_lines[0]
    assert lines[-1] == "ratio_vs_reference=1.800"  # the targets compare the default (auto) run


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="system"):
        gpu_bench.run("tpu", "tiny", None)
    with pytest.raises(ValueError, match="config"):
        gpu_bench.run("jax", "qwen3-70b", None)
    with pytest.raises(ValueError, match="steps"):
        gpu_bench.run("jax", "tiny", None, steps=0)


def test_shell_script_parses():
    subprocess.run(["bash", "-n", os.path.join(SCRIPTS, "gpu_bench.sh")], check=True)


def test_jax_dry_run(tmp_path):
    out = tmp_path / "tiny.jax.json"
    rec = gpu_bench.run("jax", "tiny", str(out), steps=2, warmup=1)
    assert json.loads(out.read_text()) == json.loads(json.dumps(rec))
    assert rec["step_s"] > 0 and len(rec["times"]) == 2 and rec["step_s"] <= max(rec["times"])
    assert abs(rec["loss"] - math.log(gpu_bench.bts.SHAPES["tiny"]["vocab"])) < 0.5  # random init: ~uniform
    assert math.isfinite(rec["dpace_overhead_pct"]) and rec["loss_dpace_s"] > 0 and rec["loss_decay_s"] > 0
    assert rec["peak_mem_gib"] > 0 and rec["matmul_ceiling_tflops"] > 0 and rec["dtype"] == "bfloat16"


@pytest.mark.parity
def test_reference_dry_run(tmp_path):
    from oracle import hf_dflash

    hf_dflash()  # skips without torch / modelopt
    rec = gpu_bench.run("reference", "tiny", str(tmp_path / "tiny.reference.json"), steps=2, warmup=1)
    assert rec["step_s"] > 0 and rec["decay_step_s"] > 0 and rec["versions"]["modelopt"] == "0.47.0"
    assert abs(rec["loss"] - math.log(gpu_bench.bts.SHAPES["tiny"]["vocab"])) < 0.5
