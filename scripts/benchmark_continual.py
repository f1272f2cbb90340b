"""CPPO against its baselines on the demo's three-domain stream: methods × seeds, mean ± 95% CI.

The protocol is the sweep configs/sweeps/benchmark_continual.yaml (read it first): each method is a variant,
its one coefficient (kr_coef for CPPO variants, reg_coef for L2, EWC, MAS and LwF) is chosen on the tuning
seeds (`seeds`) by final average from a grid of three, then run on the reported seeds (`confirm_seeds`).
This script builds the demo's artifacts (data, SFT policy, reward models, reference PM; seed 0, cached),
writes the sweep's base config from them, runs the sweep (`cppo sweep`: finished trials are reused, stopped
ones resumed) and writes the benchmark's own analysis of its results:

    python scripts/benchmark_continual.py --jobs 2     # everything; run it again to finish or refresh
    python scripts/benchmark_continual.py --report     # the analysis from finished trials only

Writes <out>/results.json (every reported run's summary and the choices made), <out>/results.md (the table,
every tuning value's metrics and its distance from the common forgetting–plasticity line, versions and wall
time) and <out>/tradeoff.png; the sweep's own results.md, results.jsonl and trials are in its output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cppo.demo import DemoSizes, build_artifacts, continual_config  # noqa: E402
from cppo.sweep import load_sweep, run_sweep  # noqa: E402
from cppo.sweep.report import t_interval  # noqa: E402
from cppo.sweep.spec import sweep_dir  # noqa: E402

KEYS = ("final_average", "forgetting", "bwt", "plasticity", "task1_gain_lost")
MEANS = ("final_average", "forgetting", "plasticity")


def write_base(artifacts: dict, path: Path, steps: int) -> None:
    """The demo's continual run (PPO, seed 0) as the sweep's base config; the variants override it."""
    config = continual_config(artifacts, path.parent / "base-run", "ppo", 0, steps)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def with_gain_lost(row: dict) -> dict:
    """The run's reward metrics with the share of the first task's gain lost by the end of the stream,
    (S[1][1] − S[T][1]) / (S[1][1] − S[0][1]) (sequential runs only)."""
    reward = dict(row["summary"]["reward"])
    S = json.loads((Path(row["output_dir"]) / "eval_matrix.json").read_text())["scores"]["reward"]
    if len(S) == len(S[0]) + 1:
        gain = S[1][0] - S[0][0]
        reward["task1_gain_lost"] = (S[1][0] - S[-1][0]) / gain if gain > 0 else None
    return reward


def analyse(rows: list[dict], variants: list[str]) -> tuple[dict, dict, dict]:
    """From the sweep's rows: `results` (method → its chosen overrides and reported runs), `tuning` (method →
    the mean metrics of every value tried on the tuning seeds, and the choice) and `chosen` (method → value)."""
    finished = [r for r in rows if r["status"] == "finished"]
    results, tuning, chosen = {}, {}, {}
    for variant in variants:
        reported = [r for r in finished if r["variant"] == variant and r["stage"] == "confirm"]
        if reported:
            knob = next(iter(reported[0]["params"]), None)
            if knob is not None:
                chosen[variant] = reported[0]["params"][knob]
            results[variant] = {"overrides": reported[0]["overrides"][:-1], "runs": [
                {"seed": r["seed"], "reward": with_gain_lost(r), "final_stats": r["summary"]["final_stats"]}
                for r in reported]}
        tried: dict = {}
        for r in finished:
            if r["variant"] == variant and r["stage"] == "search":
                tried.setdefault(json.dumps(r["params"]), []).append(r)
        sequential = all(isinstance(r["summary"]["reward"].get(m), float) for runs in tried.values() for r in runs
                         for m in MEANS)
        if tried and sequential:  # the joint run has no forgetting: not on the forgetting–plasticity picture
            knob = next(iter(json.loads(next(iter(tried)))), None)
            means = {(json.loads(k)[knob] if knob else None): {m: statistics.fmean(r["summary"]["reward"][m]
                                                                                    for r in runs) for m in MEANS}
                     for k, runs in tried.items()}
            memory = any(o in ("cppo.kr_source=memory", "cppo.kr_source=both")
                         for runs in tried.values() for o in runs[0]["overrides"])
            critic_free = any(o.startswith("ppo.advantage=") and o != "ppo.advantage=gae"
                              for runs in tried.values() for o in runs[0]["overrides"])
            tuning[variant] = {"knob": knob, "means": means, "chosen": chosen.get(variant),
                               "reported": variant in results, "memory": memory, "critic_free": critic_free}
    return results, tuning, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sweep", default=str(ROOT / "configs" / "sweeps" / "benchmark_continual.yaml"))
    parser.add_argument("--out", default="docs/results/continual", help="results.json, results.md, tradeoff.png")
    parser.add_argument("--jobs", type=int, default=None, help="trials at once (default: the sweep file's)")
    parser.add_argument("--report", action="store_true", help="analyse finished trials; run nothing")
    parser.add_argument("--steps", type=int, default=DemoSizes().steps_per_task, help="PPO steps per task")
    args = parser.parse_args()

    started = time.time()
    sweep_path = Path(args.sweep)
    if not args.report:
        write_base(build_artifacts(DemoSizes(), 0, print), Path(yaml.safe_load(sweep_path.read_text())["base"]),
                   args.steps)
    sweep = load_sweep(sweep_path)
    if run_sweep(sweep_path, jobs=args.jobs, report_only=args.report) != 0:
        raise SystemExit("the sweep did not finish")
    sweep_out = sweep_dir(sweep, sweep_path)
    rows = [json.loads(line) for line in (sweep_out / "results.jsonl").read_text().splitlines()]
    results, tuning, chosen = analyse(rows, list(sweep.variants))

    import torch
    import transformers
    import trl

    records = [json.loads((sweep_out / "trials" / f"{r['name']}.json").read_text()) for r in rows
               if (sweep_out / "trials" / f"{r['name']}.json").is_file()]
    first, last = min(r["started"] for r in records), max(r["ended"] for r in records)
    jobs = args.jobs or sweep.jobs
    span = (f"the {len(rows)} runs ran from {time.strftime('%Y-%m-%d %H:%M', time.gmtime(first))} to "
            f"{time.strftime('%H:%M', time.gmtime(last))} UTC ({(last - first) / 60:.0f} min, {jobs} at a time; "
            f"finished runs are reused, so this invocation took {(time.time() - started) / 60:.1f} min)")
    meta = {"command": " ".join(["python", *sys.argv]), "sweep": str(sweep_path), "seeds": sweep.confirm_seeds,
            "tuning_seeds": sweep.seeds, "steps_per_task": args.steps, "runs_span_s": round(last - first),
            "tuning": tuning, "chosen": chosen,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {jobs} run(s) at a time"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    lines = write_markdown(meta, results, tuning, chosen, span)
    plot_tradeoff(tuning, out / "tradeoff.png")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def write_markdown(meta: dict, results: dict, tuning: dict, chosen: dict, span: str) -> list[str]:
    lines = ["# Continual benchmark on the demo stream (sky → ledger → forest)", "",
             f"Command: `{meta['command']}` (the sweep `{meta['sweep']}`)  ",
             f"Versions: {meta['versions']}; {meta['machine']}  ",
             f"Wall time: {span}. Reported seeds {meta['seeds']}; tuning seeds {meta['tuning_seeds']}.", "",
             "Mean ± 95% CI (t) over the reported seeds of the reference PM's reward metrics "
             "(`cppo/continual/metrics.py`); task1_gain_lost = (S[1][1] − S[T][1]) / (S[1][1] − S[0][1]).", "",
             "| method | " + " | ".join(KEYS) + " | coefficient |", "|---|" + "---|" * (len(KEYS) + 1)]
    for method, entry in results.items():
        cells = []
        for key in KEYS:
            values = [s["reward"][key] for s in entry["runs"] if s["reward"].get(key) is not None]
            mean, half = t_interval(values) if values else (None, None)
            cells.append("–" if mean is None else f"{mean:+.3f} ± {half:.3f}")
        knob = tuning.get(method, {}).get("knob")
        lines.append(f"| {method} | " + " | ".join(cells) + (f" | {knob}={chosen[method]} |" if knob else " | – |"))
    if "ppo" in results:
        lost = [s["reward"].get("task1_gain_lost") for s in results["ppo"]["runs"]]
        lines += ["", "PPO in order, task-1 gain lost per reported seed: "
                  + ", ".join(f"{x:.0%}" if x is not None else "–" for x in lost) + "."]
    points = line_points(tuning)
    if len(points) < 2:
        return lines
    slope, intercept = statistics.linear_regression([x["plasticity"] for x in points],
                                                    [x["forgetting"] for x in points])
    lines += ["", "Tuning: every value tried, mean over the tuning seeds (chosen by final average); the methods "
              "with nothing to tune ran on the tuning seeds too, as reference points; `ppo_lr` (PPO at smaller "
              "learning rates, its own trade-off) is never chosen:", "",
              "| method | value | final_average | forgetting | plasticity | chosen | residual |",
              "|---|---|---|---|---|---|---|"]
    for method, t in tuning.items():
        for value, x in t["means"].items():
            setting = f"{t['knob']}={value}" if t["knob"] else "– (nothing to tune)"
            mark = "✓" if t["knob"] and t["reported"] and value == t["chosen"] else ""
            lines.append(f"| {method} | {setting} | {x['final_average']:+.3f} | {x['forgetting']:+.3f} | "
                         f"{x['plasticity']:+.3f} | {mark} | "
                         f"{x['forgetting'] - (slope * x['plasticity'] + intercept):+.2f} |")
    correlation = statistics.correlation([x["plasticity"] for x in points], [x["forgetting"] for x in points])
    lines += ["", f"residual: forgetting minus the line fitted through the {len(points)} tuning points of the methods "
              f"with GAE and without the rollout memory, forgetting = {slope:.2f} × plasticity {intercept:+.2f} "
              f"(r = {correlation:.2f}); below zero, a method forgets less than that common trade-off at its "
              "plasticity.",
              "", "![forgetting against plasticity](tradeoff.png)"]
    return lines


def line_points(tuning: dict) -> list[dict]:
    """The tuning points the common forgetting–plasticity line is fitted through: every method's but those
    with the rollout memory or a critic-free estimator (whose distance from the line is the question)."""
    return [x for t in tuning.values() if not (t.get("memory") or t.get("critic_free")) for x in t["means"].values()]


def plot_tradeoff(tuning: dict, path: Path) -> None:
    """Forgetting against plasticity on the tuning seeds: each tuned method's curve over its grid, the
    untuned methods as points, PPO's learning-rate curve dotted. Lower-right is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5))
    for method, t in tuning.items():
        if method == "ppo_lr":
            curve = sorted(t["means"].items())
            if "ppo" in tuning:
                curve.append((None, tuning["ppo"]["means"][None]))
            ax.plot([x["plasticity"] for _, x in curve], [x["forgetting"] for _, x in curve], color="black",
                    linestyle=":", marker="x", label="ppo at learning rates " + " / ".join(
                        f"{v:g}" for v, _ in curve if v is not None) + " / base")
            for value, x in curve:
                if value is not None:
                    ax.annotate(f"lr {value:g}", (x["plasticity"], x["forgetting"]), fontsize=7, xytext=(3, -9),
                                textcoords="offset points")
            continue
        if t["knob"] is None:
            point = t["means"][None]
            ax.scatter([point["plasticity"]], [point["forgetting"]], marker="P" if t.get("critic_free") else "*",
                       s=180, zorder=3, label=method)
            continue
        points = sorted(t["means"].items())
        style = {"linestyle": "-", "linewidth": 2.5, "marker": "D"} if t.get("memory") else \
            {"linestyle": "-.", "linewidth": 2, "marker": "s"} if t.get("critic_free") else \
            {"linestyle": "-" if method.startswith("cppo") else "--", "marker": "o"}
        ax.plot([x["plasticity"] for _, x in points], [x["forgetting"] for _, x in points], label=method, **style)
        for value, x in points:
            ax.annotate(f"{value:g}", (x["plasticity"], x["forgetting"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    fitted = line_points(tuning)
    if len(fitted) >= 2:
        plasticity = [x["plasticity"] for x in fitted]
        slope, intercept = statistics.linear_regression(plasticity, [x["forgetting"] for x in fitted])
        ends = [min(plasticity), max(plasticity)]
        ax.plot(ends, [slope * p + intercept for p in ends], color="grey", alpha=0.5, linewidth=6, zorder=0,
                label="line through the GAE methods without memory")
    ax.set_xlabel("plasticity (mean S[j][j] − S[j−1][j])")
    ax.set_ylabel("forgetting")
    ax.set_title("Forgetting against plasticity over each method's grid (tuning seeds)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, not on them
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
