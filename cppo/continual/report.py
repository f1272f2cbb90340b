"""Plots and the markdown report of continual runs (one run directory per method)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..weighting import weights_at

SUMMARY_KEYS = ("final_average", "forgetting", "bwt", "fwt", "plasticity")


def load_run(directory: Path) -> dict:
    return {"metrics": [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()],
            "matrix": json.loads((directory / "eval_matrix.json").read_text()),
            "summary": json.loads((directory / "summary.json").read_text())}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_reward_curves(runs: dict[str, dict], path: Path) -> None:
    """Training reward per step for each method, with the task boundaries."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for method, run in runs.items():
        rows = run["metrics"]
        ax.plot([r["step"] for r in rows], [r["reward/mean"] for r in rows], label=method, linewidth=1.2)
    rows = next(iter(runs.values()))["metrics"]
    for previous, row in zip(rows, rows[1:], strict=False):
        if row["task"] != previous["task"]:
            ax.axvline(previous["step"] + 0.5, color="grey", linestyle="--", linewidth=0.8)
    starts = {}
    for row in rows:
        starts.setdefault(row["task"], row["step"])
    for task, step in starts.items():
        ax.annotate(task, (step, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=9)
    ax.set_xlabel("PPO step")
    ax.set_ylabel("mean reward of the current task's RM")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_matrices(runs: dict[str, dict], path: Path) -> None:
    """S (mean evaluation reward) per method as heatmaps."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False)
    for ax, (method, run) in zip(axes[0], runs.items(), strict=True):
        matrix = run["matrix"]
        S = torch.tensor(matrix["scores"]["reward"], dtype=torch.float32)
        image = ax.imshow(S.numpy(), cmap="viridis", aspect="auto")
        for i in range(S.shape[0]):
            for j in range(S.shape[1]):
                ax.text(j, i, f"{S[i, j]:.2f}", ha="center", va="center", color="white", fontsize=8)
        ax.set_xticks(range(S.shape[1]), matrix["tasks"])
        ax.set_yticks(range(S.shape[0]), matrix["rows"])
        ax.set_xlabel("evaluated on")
        ax.set_title(method)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_summary_bars(runs: dict[str, dict], path: Path) -> None:
    plt = _pyplot()
    keys = ("final_average", "forgetting", "bwt", "plasticity")
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(runs)
    for k, (method, run) in enumerate(runs.items()):
        values = [run["summary"]["reward"][key] for key in keys]
        ax.bar([i + k * width for i in range(len(keys))], values, width, label=method)
    ax.set_xticks([i + width * (len(runs) - 1) / 2 for i in range(len(keys))], keys)
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_ylabel("evaluation reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_type_fractions(run: dict, path: Path) -> None:
    """Fractions of CPPO's five rollout types over training."""
    plt = _pyplot()
    rows = run["metrics"]
    steps = [r["step"] for r in rows]
    fractions = [[r[f"cppo/frac_r{j}"] for r in rows] for j in range(1, 6)]
    labels = ["r1 high-performance", "r2 overfitting", "r3 high-variance", "r4 noisy", "r5 normal"]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    ax.stackplot(steps, fractions, labels=labels)
    ax.set_xlabel("PPO step")
    ax.set_ylabel("share of rollouts")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weight_surfaces(path: Path, lb: float = 0.2, ub: float = 2.0) -> None:
    """α and β over the normalised coordinates (u, v), heuristic and balance weighting (docs/algorithm.md §4)."""
    plt = _pyplot()
    grid = torch.linspace(-3, 3, 241, dtype=torch.float64)
    u, v = torch.meshgrid(grid, grid, indexing="xy")
    fig, axes = plt.subplots(2, 2, figsize=(8.5, 7))
    for row, mode in enumerate(("heuristic", "balance")):
        alpha, beta, _ = weights_at(u, v, lb, ub, mode)
        for col, (name, values) in enumerate((("α", alpha), ("β", beta))):
            ax = axes[row][col]
            image = ax.contourf(u.numpy(), v.numpy(), values.numpy(), levels=20, cmap="coolwarm", vmin=lb, vmax=ub)
            for edge in (-1, 1):
                ax.axvline(edge, color="black", linewidth=0.5)
                ax.axhline(edge, color="black", linewidth=0.5)
            ax.set_title(f"{name}, {mode} (lb {lb}, ub {ub})")
            ax.set_xlabel("u = (ℓ − μ) / kσ  (generation log-prob)")
            ax.set_ylabel("v = (R − μ) / kσ  (reward)")
            fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(runs: dict[str, dict]) -> str:
    header = "| method | " + " | ".join(SUMMARY_KEYS) + " |\n|---|" + "---|" * len(SUMMARY_KEYS)
    lines = [header]
    for method, run in runs.items():
        values = run["summary"]["reward"]
        lines.append(f"| {method} | " + " | ".join("–" if values.get(k) is None else f"{values[k]:+.4f}"
                                                   for k in SUMMARY_KEYS) + " |")
    return "\n".join(lines)


def matrix_table(run: dict) -> str:
    matrix = run["matrix"]
    lines = ["| after \\ on | " + " | ".join(matrix["tasks"]) + " |", "|---|" + "---|" * len(matrix["tasks"])]
    for name, row in zip(matrix["rows"], matrix["scores"]["reward"], strict=True):
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    return "\n".join(lines)


def write_report(directory: Path, runs: dict[str, dict], intro: str, extra_sections: str = "") -> Path:
    """report.md and its PNG plots in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    plot_reward_curves(runs, directory / "reward_curves.png")
    plot_matrices(runs, directory / "eval_matrices.png")
    plot_summary_bars(runs, directory / "forgetting_plasticity.png")
    plot_weight_surfaces(directory / "weight_surfaces.png")
    sections = [intro, extra_sections, "## Continual metrics (reference PM reward)", summary_table(runs),
                "![summary](forgetting_plasticity.png)", "## Evaluation matrices S"]
    for method, run in runs.items():
        sections += [f"### {method}", matrix_table(run)]
    sections += ["![S](eval_matrices.png)", "## Training reward", "![reward](reward_curves.png)"]
    for method, run in runs.items():
        if "cppo/frac_r1" in run["metrics"][0]:
            name = f"types_{method}.png"
            plot_type_fractions(run, directory / name)
            sections += [f"## CPPO rollout types ({method})", f"![types]({name})"]
    sections += ["## CPPO weight surfaces", "![weights](weight_surfaces.png)"]
    path = directory / "report.md"
    path.write_text("\n\n".join(s for s in sections if s) + "\n")
    return path
