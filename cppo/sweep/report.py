"""A sweep's results from what its trials left on disk: results.jsonl, results.md (mean ± 95 % t-interval over
seeds per setting, the best setting, the held-out seeds), metric.png and tradeoff.png."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

from ..errors import UserError
from .runner import read_json, read_record, sha256_of
from .spec import SweepConfig, Trial

CONTINUAL = ("final_average", "forgetting", "bwt", "fwt", "plasticity")


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval: t_{0.975, n−1} · s / √n (nan for one value)."""
    from scipy.stats import t

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, float(t.ppf(0.975, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))


def metric_value(name: str, summary: dict, run_dir: Path) -> float | None:
    """`name` as a dotted path into summary.json, else as a key of metrics.jsonl's last line."""
    node = summary
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, int | float) and not isinstance(node, bool):
        return float(node)
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        lines = metrics.read_text().splitlines()
        try:
            value = json.loads(lines[-1]).get(name) if lines else None
        except (json.JSONDecodeError, AttributeError):
            raise UserError(f"{metrics}: its last line is not a JSON object; remove {run_dir}* to run that trial "
                            "again") from None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def collect(sweep: SweepConfig, out: Path, trials: list[Trial]) -> list[dict]:
    """One row per trial, in the sweep's order: finished (with its summary and metric), failed (with its
    error), stopped (a checkpoint to resume from) or pending."""
    rows = []
    for trial in trials:
        run_dir = out / "trials" / trial.name
        record = read_record(out, trial.name)
        summary_path = run_dir / "summary.json"
        summary = read_json(summary_path, "the trial's summary") if summary_path.is_file() else None
        recorded = record.get("summary_sha256")
        if summary is not None and recorded is not None and sha256_of(summary_path) != recorded:
            raise UserError(f"{summary_path} does not match the sha256 the sweep recorded when the trial finished "
                            f"({out / 'trials' / trial.name}.json): restore it, or remove "
                            f"{out / 'trials' / trial.name}* to run that trial again")
        status = "finished" if summary is not None else record.get("status", "pending")
        rows.append({"name": trial.name, "stage": trial.stage, "variant": trial.variant, "params": trial.params,
                     "seed": trial.seed, "overrides": trial.overrides, "status": status,
                     "metric": metric_value(sweep.metric.name, summary, run_dir) if summary is not None else None,
                     "error": record.get("error") if status == "failed" else None, "summary": summary,
                     "wall_s": record.get("wall_s"), "output_dir": str(run_dir)})
    return rows


def _keys(node: dict, prefix: str = "") -> list[str]:
    """The dotted names of the numbers in a summary."""
    found = []
    for key, value in node.items():
        if isinstance(value, dict):
            found += _keys(value, f"{prefix}{key}.")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            found.append(f"{prefix}{key}")
    return found


def check_metric(sweep: SweepConfig, rows: list[dict]) -> None:
    """A metric that none of the finished trials has would rank nothing: refused, naming what they have."""
    finished = [r for r in rows if r["status"] == "finished"]
    if not finished or any(r["metric"] is not None for r in finished):
        return
    names = _keys(finished[0]["summary"] or {})
    metrics = Path(finished[0]["output_dir"]) / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    names += [k for k, v in (json.loads(lines[-1]) if lines else {}).items()
              if isinstance(v, int | float) and not isinstance(v, bool) and k not in names]
    shown = [n for n in names if n.startswith(("reward.", "final_stats.reward")) or "/" not in n][:6] or names[:6]
    raise UserError(f"metric.name must name a number the trials produce, got {sweep.metric.name!r}: none of the "
                    f"{len(finished)} finished trial(s) has it (they have e.g. {', '.join(shown)})")


def write_jsonl(sweep: SweepConfig, out: Path, trials: list[Trial]) -> list[dict]:
    rows = collect(sweep, out, trials)
    temporary = out / "results.jsonl.tmp"
    temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
    temporary.replace(out / "results.jsonl")
    return rows


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """Rows by setting (variant and parameter values), in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], json.dumps(row["params"])), []).append(row)
    return groups


def best_settings(sweep: SweepConfig, rows: list[dict]) -> dict:
    """variant → (variant, params) of its best setting among those with every seed finished (mean metric)."""
    best: dict = {}
    sign = 1 if sweep.metric.goal == "maximize" else -1
    for (variant, _), group in _groups([r for r in rows if r["stage"] == "search"]).items():
        if any(r["status"] != "finished" or r["metric"] is None for r in group):
            continue
        score = sign * statistics.fmean(r["metric"] for r in group)
        if variant not in best or score > best[variant][0]:
            best[variant] = (score, (variant, group[0]["params"]))
    return {variant: setting for variant, (_, setting) in best.items()}


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, half = t_interval(values)
    return f"{mean:+.3f}" if math.isnan(half) else f"{mean:+.3f} ± {half:.3f}"


def _continual_keys(rows: list[dict]) -> list[str]:
    found = {k for r in rows if r["summary"] for k, v in r["summary"].get("reward", {}).items()
             if isinstance(v, int | float)}
    return [k for k in CONTINUAL if k in found]


def _table(sweep: SweepConfig, rows: list[dict], marks: dict[tuple, str]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    leaves = [k.split(".")[-1] for k in keys]
    headers = [leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(keys, leaves, strict=True)]
    continual = [k for k in _continual_keys(rows) if f"reward.{k}" != sweep.metric.name]
    has_variants = any(r["variant"] for r in rows)
    columns = ["variant"] * has_variants + headers + ["seeds", f"{sweep.metric.name}"] + continual + [""]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for setting, group in _groups(rows).items():
        done = [r for r in group if r["status"] == "finished"]
        cells = [group[0]["variant"] or "–"] * has_variants
        cells += [_shown(group[0]["params"][k]) if k in group[0]["params"] else "–" for k in keys]
        cells.append(f"{len(done)}/{len(group)}")
        cells.append(_cell([r["metric"] for r in done if r["metric"] is not None]))
        cells += [_cell([r["summary"]["reward"][k] for r in done if isinstance(r["summary"].get("reward", {}).get(k),
                                                                                int | float)]) for k in continual]
        cells.append(marks.get(setting, ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _shown(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _describe(variant: str | None, params: dict) -> str:
    return ", ".join([f"variant {variant}"] * bool(variant) + [f"{k}={_shown(v)}" for k, v in params.items()]) \
        or "the base config"


def write(sweep: SweepConfig, path: Path, out: Path, search: list[Trial], confirm: list[Trial]) -> str:
    """Write results.jsonl, results.md and the plots from what is on disk; returns a few lines for the terminal."""
    from .. import __version__

    rows = write_jsonl(sweep, out, search + confirm)
    check_metric(sweep, rows)
    searched = [r for r in rows if r["stage"] == "search"]
    held_out = [r for r in rows if r["stage"] == "confirm"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("finished", "failed", "stopped", "pending")}
    best = best_settings(sweep, rows)
    sign = 1 if sweep.metric.goal == "maximize" else -1
    overall = max(best.values(), key=lambda s: sign * statistics.fmean(
        r["metric"] for r in searched if (r["variant"], json.dumps(r["params"])) == (s[0], json.dumps(s[1])))
        ) if best else None
    marks = {(v, json.dumps(p)): "best of variant" for v, p in best.values()} if len(best) > 1 else {}
    if overall is not None:
        marks[(overall[0], json.dumps(overall[1]))] = "**best**"
    records = [read_record(out, r["name"]) for r in rows]
    wall = sum(r.get("wall_s", 0.0) for r in records)
    starts = [r["started"] for r in records if "started" in r]
    ends = [r["ended"] for r in records if "ended" in r]
    span = (f"; they ran from {time.strftime('%Y-%m-%d %H:%M', time.gmtime(min(starts)))} to "
            f"{time.strftime('%H:%M', time.gmtime(max(ends)))} UTC ({(max(ends) - min(starts)) / 60:.1f} min, "
            f"{sweep.jobs} at a time)" if starts and ends else "")
    n_settings = len(_groups(searched))
    lines = [f"# Sweep `{path.stem}`", "",
             f"Sweep file `{path}` on base `{sweep.base}`: {sweep.method}, {n_settings} setting(s) × "
             f"{max(len(sweep.seeds), 1)} seed(s)"
             f"{f' + held-out seeds {sweep.confirm_seeds}' if sweep.confirm_seeds else ''}. "
             f"Metric `{sweep.metric.name}` ({sweep.metric.goal}). cppo {__version__}, python "
             f"{platform.python_version()}, {platform.machine()} with {os.cpu_count()} CPUs.  ",
             f"Trials: {counts['finished']} finished, {counts['failed']} failed, "
             f"{counts['stopped'] + counts['pending']} not finished. Trial wall time {wall / 60:.1f} min in all{span}.",
             "", "Mean ± 95 % t-interval over the finished seeds (`seeds` column: finished / run)."]
    if sweep.seeds or not held_out:
        lines += ["", f"## Settings{f' on seeds {sweep.seeds}' if sweep.seeds else ''}", "",
                  *_table(sweep, searched, marks)]
    if overall is not None:
        metric = statistics.fmean(r["metric"] for r in searched
                                  if (r["variant"], json.dumps(r["params"])) == (overall[0], json.dumps(overall[1])))
        lines += ["", f"Best: {_describe(*overall)}: {sweep.metric.name} = {metric:+.4f} (mean over its seeds)."]
    if sweep.confirm_seeds:
        lines += ["", f"## Held-out seeds {sweep.confirm_seeds}: each variant's best setting", ""]
        lines += _table(sweep, held_out, {}) if held_out else ["Not run yet: the settings above must finish first."]
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        lines += ["", "## Failed trials", ""]
        lines += [f"- `{r['name']}`: {r['error']} (log: `trials/{r['name']}.log`)" for r in failed]
    if plot_metric(sweep, searched, out / "metric.png"):
        lines += ["", f"![{sweep.metric.name} against each swept parameter](metric.png)"]
    if plot_tradeoff(searched, out / "tradeoff.png"):
        lines += ["", "![forgetting against plasticity, one point per setting](tradeoff.png)"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    verdict = f"best: {_describe(*overall)}" if overall else "no setting finished on every seed yet"
    return (f"sweep: {counts['finished']} finished, {counts['failed']} failed, "
            f"{counts['stopped'] + counts['pending']} not finished; {verdict}; results in {out / 'results.md'}")


def _numeric(values: list) -> bool:
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def plot_metric(sweep: SweepConfig, rows: list[dict], path: Path) -> bool:
    """The metric's mean ± interval against each swept parameter, one series per variant."""
    groups = {k: g for k, g in _groups(rows).items() if any(r["metric"] is not None for r in g)}
    keys = list(dict.fromkeys(k for g in groups.values() for k in g[0]["params"]))
    if not keys:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        values = list(dict.fromkeys(g[0]["params"][key] for g in groups.values() if key in g[0]["params"]))
        numeric = _numeric(values)
        order = [json.dumps(x) for x in values]

        def position(value, numeric=numeric, order=order):
            return value if numeric else order.index(json.dumps(value))
        for variant in dict.fromkeys(v for v, _ in groups):
            points = []
            for (v, _), group in groups.items():
                if v == variant and key in group[0]["params"]:
                    mean, half = t_interval([r["metric"] for r in group if r["metric"] is not None])
                    points.append((position(group[0]["params"][key]), mean, 0.0 if math.isnan(half) else half))
            points.sort()
            others = {json.dumps({k: x for k, x in g[0]["params"].items() if k != key})
                      for (v, _), g in groups.items() if v == variant and key in g[0]["params"]}
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=3, linestyle="-" if len(others) == 1 else "none", label=variant or None)
        if numeric and min(values) > 0 and max(values) / min(values) >= 20:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.metric.name)
        ax.grid(alpha=0.3)
    if any(v for v, _ in groups):
        axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def plot_tradeoff(rows: list[dict], path: Path) -> bool:
    """Forgetting against plasticity, a point per setting (mean over seeds); continual runs only."""
    points = []
    for (variant, _), group in _groups(rows).items():
        scores = [r["summary"].get("reward", {}) for r in group if r["status"] == "finished"]
        scores = [s for s in scores if isinstance(s.get("forgetting"), int | float)
                  and isinstance(s.get("plasticity"), int | float)]
        if scores:
            points.append((variant, group[0]["params"], statistics.fmean(s["plasticity"] for s in scores),
                           statistics.fmean(s["forgetting"] for s in scores)))
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for variant in dict.fromkeys(p[0] for p in points):
        mine = [p for p in points if p[0] == variant]
        ax.plot([p[2] for p in mine], [p[3] for p in mine], marker="o", linestyle="none", label=variant or None)
        for _, params, x, y in mine:
            ax.annotate(",".join(f"{k.split('.')[-1]}={v}" for k, v in params.items()), (x, y), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("plasticity (mean S[j][j] − S[j−1][j])")
    ax.set_ylabel("forgetting")
    ax.set_title("Forgetting against plasticity, one point per setting")
    if any(p[0] for p in points):
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
