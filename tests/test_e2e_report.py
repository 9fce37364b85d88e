"""scripts/e2e_report.py on a synthetic run directory: gain arithmetic, table, figures, loud failures."""

import importlib.util
import json
import os

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "e2e_report", os.path.join(os.path.dirname(__file__), "..", "scripts", "e2e_report.py")
)
report = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(report)


def _eval(taus, speedup):
    per = [{"tau": t} for t in taus]
    return {
        "tau": sum(taus) / len(taus),
        "speedup": speedup,
        "num_prompts": len(taus),
        "max_new_tokens": 8,
        "tokens_per_s_plain": 30.0,
        "per_position_acceptance": [0.5, 0.2, 0.1],
        "per_prompt": per,
    }


def _metrics(sim_tau):
    return [
        {
            "step": s,
            "loss": 5.0 / s,
            "accuracy": 0.1,
            "simulated_tau": sim_tau,
            "epoch": s // 4,
            "position_accuracy": [0.0, 0.3, 0.2, 0.1],
            "position_weight_mean": [0.0, 1.0, 0.5 + s / 100, 0.25],
        }
        for s in range(2, 12, 2)
    ]


def _write_run(root, arms, phases):
    """A run directory: features/index.json (12 rows), timings.jsonl (60 s a phase), and per (name, taus, sim)
    arm its metrics.jsonl and eval_T{0,1}/eval.json."""
    os.makedirs(root / "features")
    (root / "features" / "index.json").write_text(json.dumps({"num_rows": 12}))
    (root / "timings.jsonl").write_text("\n".join(json.dumps({"phase": p, "wall_s": 60.0}) for p in phases) + "\n")
    for obj, taus, sim in arms:
        (root / obj).mkdir()
        (root / obj / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in _metrics(sim)) + "\n")
        for t in (0, 1):
            (root / obj / f"eval_T{t}").mkdir()
            (root / obj / f"eval_T{t}" / "eval.json").write_text(json.dumps(_eval(list(taus), 0.5)))
    return root


def _run_dir(root, dpace_taus=(1.4, 1.2, 1.3), decay_taus=(1.2, 1.2, 1.1), regen_taus=None):
    arms = [("dpace", dpace_taus, 1.2), ("decay", decay_taus, 1.1)]
    if regen_taus is not None:
        arms.append(("dpace_regen", regen_taus, 1.3))
        gen = {
            "target": "Target(llama)",
            "max_new_tokens": 16,
            "temperature": 0.0,
            "top_p": 1.0,
            "seed": 0,
            "batch_size": 16,
            "max_prompt_len": 256,
        }
        rows = [
            {
                "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "source": {"path": "sharegpt", "record": i},
                "generator": gen,
                "truncated_answers": i % 2,
                "dropped_turns": 0,
            }
            for i in range(5)
        ]
        os.makedirs(root, exist_ok=True)
        (root / "regen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return _write_run(root, arms, ("dump", "train_dpace", "train_decay", "eval_dpace_T0"))


def test_paired_gain():
    gain, diff, se = report.paired_gain(_eval([1.4, 1.2, 1.3], 1.0), _eval([1.2, 1.2, 1.1], 1.0))
    assert gain == pytest.approx(1.3 / (3.5 / 3) - 1)
    assert diff == pytest.approx(0.4 / 3)
    assert se == pytest.approx(0.11547005 / 3**0.5)
    with pytest.raises(ValueError, match="same prompts"):
        report.paired_gain(_eval([1.4, 1.2], 1.0), _eval([1.2, 1.2, 1.1], 1.0))


def test_report_writes_table_and_figures(tmp_path):
    run = _run_dir(tmp_path / "run")
    out = tmp_path / "docs" / "results.md"
    report.main(["--run", str(run), "--out", str(out), "--budget", "cpu"])
    text = out.read_text()
    assert "**greedy: +11.4 %**" in text
    assert "simulated τ on the last training batches: +9.1 %" in text
    assert "| D-PACE (α 0.5) | 10 | 1.0 min |" in text
    assert "first 12 packed rows" in text
    for name in ("loss_tau", "position_acceptance", "dpace_weights"):
        png = tmp_path / "docs" / "results" / f"{name}.png"
        assert f"(results/{name}.png)" in text
        assert 0 < png.stat().st_size < 300_000


def test_report_missing_run_is_an_error(tmp_path):
    run = _run_dir(tmp_path / "run")
    os.remove(run / "decay" / "metrics.jsonl")
    with pytest.raises(ValueError, match="decay"):
        report.main(["--run", str(run), "--out", str(tmp_path / "r.md")])


def test_report_replicates(tmp_path):
    run = _run_dir(tmp_path / "run")
    rep = _run_dir(tmp_path / "rep", dpace_taus=(1.1, 1.1, 1.1), decay_taus=(1.1, 1.3, 1.2))
    out = tmp_path / "results.md"
    report.main(["--run", str(run), "--replicate", str(rep), "--out", str(out)])
    text = out.read_text()
    assert "## Replicates" in text
    assert f"| `{rep}` | 1.100 / 1.200 | -8.3 % |" in text


def test_report_regenerated_data_arm(tmp_path):
    run = _run_dir(tmp_path / "run", regen_taus=(1.5, 1.2, 1.4))
    out = tmp_path / "results.md"
    report.main(["--run", str(run), "--out", str(out)])
    text = out.read_text()
    assert "## Target-aligned data" in text
    assert (
        "first usable ShareGPT conversations (5 rows written)" in text
        and "5 answers, 2 of them cut at the limit" in text
    )
    # paired per prompt vs the D-PACE arm: (0.1 + 0 + 0.1) / 3, s.e. 0.0577 / sqrt(3)
    assert "**greedy: +5.1 %** (per-prompt paired Δτ = +0.067 ± 0.033 s.e.; within noise" in text
    assert "| SmolLM2's own answers | 1.300 | 0.100 | 1.367 | 1.367 |" in text
    assert "does not win beyond noise at both temperatures at this budget, so the README quick start keeps" in text
    assert "## Target-aligned data" not in report.render(
        report.load_run(str(_run_dir(tmp_path / "plain"))), "r", "cpu", "c", "results"
    )


def test_report_regenerated_data_winning_and_run_notes(tmp_path):
    """Regenerated data ahead by more than 2 s.e. at both temperatures is a win; --commit / --note and the
    recorded phase loads appear in the report."""
    run = _run_dir(tmp_path / "run", regen_taus=(1.6, 1.45, 1.5))
    with open(run / "timings.jsonl", "a") as f:
        f.write(json.dumps({"phase": "regenerate", "wall_s": 60.0, "load1": 3.25}) + "\n")
    out = tmp_path / "results.md"
    report.main(["--run", str(run), "--out", str(out), "--commit", "abc1234", "--note", "shared machine"])
    text = out.read_text()
    assert "Regenerated data wins beyond noise at both temperatures: the README quick start trains on it." in text
    assert "dflash_jax at commit abc1234" in text and "\n- shared machine\n" in text
    assert "(1-minute load average at the phase ends: 3.2–3.2)" in text


def _variants_dir(root):
    arms = [("dflash", (1.2, 1.2, 1.1), 1.1), ("dflash2", (1.4, 1.2, 1.3), 1.2), ("jetspec", (1.1, 1.2, 1.1), 1.0)]
    return _write_run(root, arms, ("dump", "train_dflash", "train_dflash2", "train_jetspec"))


def test_report_variants_section_paired_against_dflash(tmp_path):
    """--variants writes the section: every arm's τ and its per-prompt paired Δτ against DFlash (hand values)."""
    out = tmp_path / "results.md"
    report.main(["--variants", str(_variants_dir(tmp_path / "var")), "--out", str(out), "--budget", "cpu"])
    text = out.read_text()
    assert text.startswith(report.VARIANTS_BEGIN) and text.rstrip().endswith(report.VARIANTS_END)
    # dflash2 - dflash per prompt: (0.2, 0, 0.2): mean 0.133, s.d. 0.1155, s.e. 0.0667; tau 1.3 / 1.1667 - 1
    assert "| DFlash2 | 10 | 1.0 min | 0.100 | 1.200 | — | 1.300 | +0.133 ± 0.067 (+11.4 %) |" in text
    # jetspec - dflash: (-0.1, 0, 0): mean -0.033, s.e. 0.0333
    assert "JetSpec vs DFlash, greedy: Δτ = -0.033 ± 0.033 s.e. (within noise" in text
    assert "| DFlash | 10 | 1.0 min | 0.100 | 1.100 | — | 1.167 | — |" in text


def test_report_variants_section_survives_both_reports(tmp_path):
    """The objectives report keeps the file's variants section; a new --variants run replaces it in place."""
    out = tmp_path / "results.md"
    report.main(["--run", str(_run_dir(tmp_path / "run")), "--out", str(out)])
    report.main(["--variants", str(_variants_dir(tmp_path / "var")), "--out", str(out)])
    first, section = out.read_text(), report.existing_variants(str(out))
    assert "| DFlash2 | 10 |" in section
    assert first.count(report.VARIANTS_BEGIN) == 1 and first.index(report.VARIANTS_END) < first.index("## Table")
    report.main(["--run", str(_run_dir(tmp_path / "run2")), "--out", str(out)])
    assert out.read_text().count("## Drafter variants") == 1
    assert report.existing_variants(str(out)) == section and "**greedy: +11.4 %**" in out.read_text()
