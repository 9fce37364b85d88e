"""PNG plots of a run's ``metrics.jsonl`` records (matplotlib, Agg backend; no display needed).

* ``loss_tau.png``: training loss, simulated tau and the per-block acceptance length vs step (eval tau as points
  when logged);
* ``position_acceptance.png``: per-position accuracy of draft slots 1..bs-1 at the first and last logged step,
  and the eval per-position acceptance when logged;
* ``dpace_weights.png``: mean loss weight (D-PACE ``w_j``, or the decay weight) of every slot vs step.
"""

from __future__ import annotations

import os
from typing import Any, Sequence


def write_plots(records: Sequence[dict[str, Any]], out_dir: str) -> list[str]:
    """Write the three PNGs for ``records`` (training records have ``loss``; eval records ``eval_tau``) into
    ``out_dir``; returns their paths (none when there is no training record)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("loss") is not None]  # windows of only skipped updates have none
    evals = [r for r in records if r.get("eval_tau") is not None]
    if not train:
        return []
    os.makedirs(out_dir, exist_ok=True)
    steps = [r["step"] for r in train]
    paths = []

    fig, (ax_loss, ax_tau) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot(steps, [r["loss"] for r in train], color="tab:red")
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    ax_tau.plot(steps, [r["simulated_tau"] for r in train], color="tab:blue", label="simulated tau (train batch)")
    if all("accept_length" in r for r in train):  # runs logged before the metric existed lack it
        ax_tau.plot(
            steps,
            [r["accept_length"] for r in train],
            "--",
            color="tab:purple",
            label="accept length (train batch, per block)",
        )
    if evals:
        ax_tau.plot(
            [r["step"] for r in evals],
            [r["eval_tau"] for r in evals],
            "o",
            color="tab:green",
            label="eval tau (speculative decoding)",
        )
    ax_tau.set(xlabel="step", ylabel="tokens per target forward", title="acceptance length tau")
    ax_tau.legend()
    paths.append(_save(fig, out_dir, "loss_tau.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    slots = range(1, len(train[-1]["position_accuracy"]))
    for r, style in ((train[0], "--"), (train[-1], "-")):
        ax.plot(slots, r["position_accuracy"][1:], style, marker="o", label=f"train accuracy, step {r['step']}")
    if evals and evals[-1].get("eval_per_position_acceptance"):
        acc = evals[-1]["eval_per_position_acceptance"]
        ax.plot(range(1, len(acc) + 1), acc, ":", marker="s", label=f"eval acceptance, step {evals[-1]['step']}")
    ax.set(
        xlabel="draft position (slot after the anchor)",
        ylabel="fraction accepted / correct",
        ylim=(0, 1),
        title="per-position acceptance",
    )
    ax.legend()
    paths.append(_save(fig, out_dir, "position_acceptance.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for j in slots:
        ax.plot(steps, [r["position_weight_mean"][j] for r in train], label=f"slot {j}")
    ax.set(xlabel="step", ylabel="mean loss weight", title="mean D-PACE weight per position")
    ax.legend(fontsize="small", ncol=2)
    paths.append(_save(fig, out_dir, "dpace_weights.png"))
    return paths


def _save(fig, out_dir: str, name: str) -> str:
    import matplotlib.pyplot as plt

    path = os.path.join(out_dir, name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
