"""CPPO against its baselines on the demo's three-domain stream: methods × seeds, mean ± 95% CI.

Protocol. The demo's artifacts (data, SFT policy, reward models, reference PM) are built once with
seed 0 and shared. Each method's one coefficient (kr_coef for CPPO variants, reg_coef for L2, EWC,
MAS and LwF) is chosen on TUNING seeds, disjoint from the REPORTED seeds, from the same grid size for
every method, by final average; PPO, β ≡ 0 and the joint reference have nothing to tune (the first
two also run on the tuning seeds, as reference points beside the grids). Every run is a separate
`cppo train` process on a config written next to its run directory; `--jobs N` runs N at a time.

    python scripts/benchmark_continual.py --tune --seeds 1 2 3 4 5 --jobs 2   # tuning, then the table
    python scripts/benchmark_continual.py --out docs/results/continual --methods ppo cppo_heuristic

Writes <out>/results.json (every run's summary and the choices made), <out>/results.md (the table,
every tuning value's metrics, the command, versions and wall time) and <out>/tradeoff.png (forgetting
against plasticity over the grids); the runs themselves go to --work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cppo.checkpoint import checkpoints  # noqa: E402
from cppo.demo import DemoSizes, build_artifacts, continual_config  # noqa: E402

# method → (overrides, the tuned coefficient's name or None)
METHODS = {
    "ppo": (["algo=ppo"], None),
    "cppo_heuristic": (["algo=cppo", "cppo.weighting=heuristic"], "cppo.kr_coef"),
    "cppo_balance": (["algo=cppo", "cppo.weighting=balance"], "cppo.kr_coef"),
    "cppo_learned": (["algo=cppo", "cppo.weighting=learned"], "cppo.kr_coef"),
    "cppo_alpha_one": (["algo=cppo", "cppo.ablation=alpha_one"], "cppo.kr_coef"),
    "cppo_beta_one": (["algo=cppo", "cppo.ablation=beta_one"], "cppo.kr_coef"),
    "cppo_beta_zero": (["algo=cppo", "cppo.ablation=beta_zero"], None),  # no KR term: nothing to tune
    "cppo_kr_rollout": (["algo=cppo", "cppo.kr_anchor=rollout"], "cppo.kr_coef"),
    "l2": (["algo=ppo", "continual.regularizer=l2"], "continual.reg_coef"),
    "ewc": (["algo=ppo", "continual.regularizer=ewc"], "continual.reg_coef"),
    "mas": (["algo=ppo", "continual.regularizer=mas"], "continual.reg_coef"),
    "lwf": (["algo=ppo", "continual.regularizer=lwf"], "continual.reg_coef"),
    "joint": (["algo=ppo", "continual.schedule=joint"], None),
}
GRIDS = {"cppo.kr_coef": [0.01, 0.03, 0.1], "continual.reg_coef": [0.01, 0.1, 1.0]}
DEFAULTS = {"cppo.kr_coef": 0.03, "continual.reg_coef": 0.1}
# PPO's own trade-off, for comparison at equal plasticity: a smaller learning rate also learns less and
# forgets less, with no retention mechanism at all. Run on the tuning seeds only; never chosen.
PPO_SLOWER = [3e-5, 1e-4]
KEYS = ("final_average", "forgetting", "bwt", "plasticity", "task1_gain_lost")
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_once(artifacts: dict, out: Path, method: str, label: str, seed: int, steps: int,
             overrides: list[str], threads: int | None = None) -> dict:
    """One `cppo train` process of `method` (with `overrides`), named `label`: its summary, with the
    share of the first task's gain lost by the end of the stream."""
    run_dir = out / f"{label}-seed{seed}"
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():  # finished before: reused
        return _with_gain_lost(run_dir)
    base, _ = METHODS[method]
    config = continual_config(artifacts, run_dir, "ppo", seed, steps, [*base, *overrides])
    config_path = run_dir.parent / f"{run_dir.name}.yaml"  # not with_suffix: labels hold dots
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "-m", "cppo", "train", str(config_path)]
    if checkpoints(run_dir):  # stopped part-way before: continue from its newest checkpoint, exactly
        command.append("--resume")
    elif run_dir.is_dir():  # stopped before its first checkpoint: start that run again
        command.append("--overwrite")
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{result.stderr[-3000:]}")
    return _with_gain_lost(run_dir)


def run_many(artifacts: dict, out: Path, specs: list[tuple], steps: int, jobs: int) -> list[dict]:
    """`run_once` for every (method, label, seed, overrides) in `specs`, `jobs` processes at a time,
    the CPU's threads split between them; summaries in the order of `specs`."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_once, artifacts, out, method, name, seed, steps, overrides, threads)
                   for method, name, seed, overrides in specs]
        summaries = []
        for spec, future in zip(specs, futures, strict=True):
            summaries.append(future.result())
            print(f"done: {spec[1]} seed {spec[2]}", flush=True)
        return summaries


def _with_gain_lost(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    S = json.loads((run_dir / "eval_matrix.json").read_text())["scores"]["reward"]
    if len(S) == len(S[0]) + 1:  # sequential: (S[1][1] − S[T][1]) / (S[1][1] − S[0][1])
        gain = S[1][0] - S[0][0]
        summary["reward"]["task1_gain_lost"] = (S[1][0] - S[-1][0]) / gain if gain > 0 else None
    return summary


def label(method: str, value: float | None) -> str:
    """A run's directory name: the method and its coefficient (runs are reused across invocations)."""
    knob = METHODS[method][1]
    return method if knob is None else f"{method}-{knob.split('.')[-1]}{value}"


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="reported seeds")
    parser.add_argument("--tune", action="store_true", help="choose each coefficient on the tuning seeds first")
    parser.add_argument("--tuning-seeds", nargs="+", type=int, default=[101, 102])
    parser.add_argument("--steps", type=int, default=DemoSizes().steps_per_task, help="PPO steps per task")
    parser.add_argument("--out", default="docs/results/continual", help="results.json and results.md")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (the CPU's threads are split between them)")
    parser.add_argument("--work", default="runs/benchmark_continual",
                        help="the runs themselves (models, checkpoints); finished runs are reused")
    args = parser.parse_args()
    if set(args.seeds) & set(args.tuning_seeds):
        raise SystemExit("reported and tuning seeds must be disjoint")

    started = time.time()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    artifacts = build_artifacts(DemoSizes(), 0, print)
    chosen, tuning = {}, {}
    tuned = [m for m in args.methods if METHODS[m][1] is not None]
    if args.tune:
        specs = [(m, label(m, v), seed, [f"{METHODS[m][1]}={v}"])
                 for m in tuned for v in GRIDS[METHODS[m][1]] for seed in args.tuning_seeds]
        # the sequential methods with nothing to tune run on the tuning seeds too: reference points
        # for the forgetting-against-plasticity picture, measured on the same seeds as the grids
        fixed = [m for m in args.methods if METHODS[m][1] is None and m != "joint"]
        specs += [(m, label(m, None), seed, []) for m in fixed for seed in args.tuning_seeds]
        if "ppo" in fixed:
            specs += [("ppo", f"ppo-learning_rate{v}", seed, [f"ppo.learning_rate={v}"])
                      for v in PPO_SLOWER for seed in args.tuning_seeds]
        tuning_specs = specs
        runs = iter(run_many(artifacts, work, specs, args.steps, args.jobs))
        for method in tuned:
            knob = METHODS[method][1]
            grid = {v: [next(runs)["reward"] for _ in args.tuning_seeds] for v in GRIDS[knob]}
            means = {v: {k: statistics.fmean(r[k] for r in rs) for k in ("final_average", "forgetting", "plasticity")}
                     for v, rs in grid.items()}
            chosen[method] = max(means, key=lambda v: means[v]["final_average"])
            tuning[method] = {"knob": knob, "scores": {v: m["final_average"] for v, m in means.items()},
                              "means": means, "chosen": chosen[method]}
            print(f"tuning {method}: " + ", ".join(f"{knob}={v} {m['final_average']:.4f}" for v, m in means.items())
                  + f" → {chosen[method]}", flush=True)
        def means(rewards: list[dict]) -> dict:
            return {k: statistics.fmean(r[k] for r in rewards) for k in ("final_average", "forgetting", "plasticity")}

        for method in fixed:
            tuning[method] = {"knob": None, "means": {None: means([next(runs)["reward"] for _ in args.tuning_seeds])},
                              "chosen": None}
        if "ppo" in fixed:
            tuning["ppo"]["slower"] = {v: means([next(runs)["reward"] for _ in args.tuning_seeds]) for v in PPO_SLOWER}
    else:
        chosen = {m: DEFAULTS[METHODS[m][1]] for m in tuned}

    specs = [(m, label(m, chosen.get(m)), seed, [f"{METHODS[m][1]}={chosen[m]}"] if m in chosen else [])
             for m in args.methods for seed in args.seeds]
    summaries = iter(run_many(artifacts, work, specs, args.steps, args.jobs))
    results = {}
    for method in args.methods:
        runs = [next(summaries) for _ in args.seeds]
        extra = [f"{METHODS[method][1]}={chosen[method]}"] if method in chosen else []
        results[method] = {"overrides": METHODS[method][0] + extra, "runs": runs}
        print(f"{method}: " + ", ".join(f"{k} {statistics.fmean(s['reward'][k] for s in runs):+.4f}"
                                        for k in KEYS if runs[0]["reward"].get(k) is not None), flush=True)

    import torch
    import transformers
    import trl

    wall = time.time() - started
    used = [work / f"{name}-seed{seed}" for _, name, seed, _ in specs]
    if args.tune:
        used += [work / f"{name}-seed{seed}" for _, name, seed, _ in tuning_specs]
    first = min((d.parent / f"{d.name}.yaml").stat().st_mtime for d in used)  # written as each run starts
    last = max((d / "summary.json").stat().st_mtime for d in used)
    span = (f"the {len(used)} runs ran from {time.strftime('%Y-%m-%d %H:%M', time.gmtime(first))} to "
            f"{time.strftime('%H:%M', time.gmtime(last))} UTC ({(last - first) / 60:.0f} min, {args.jobs} at a time; "
            f"finished runs are reused, so a later invocation takes {wall / 60:.1f} min)")
    meta = {"command": " ".join(["python", *sys.argv]), "seeds": args.seeds, "tuning_seeds": args.tuning_seeds,
            "steps_per_task": args.steps, "wall_time_s": round(wall), "runs_span_s": round(last - first),
            "tuning": tuning, "chosen": chosen,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "trl": trl.__version__},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.jobs} run(s) at a time"}
    (out / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["# Continual benchmark on the demo stream (sky → ledger → forest)", "",
             f"Command: `{meta['command']}`  ", f"Versions: {meta['versions']}; {meta['machine']}  ",
             f"Wall time: {span}. Reported seeds {args.seeds}; tuning seeds {args.tuning_seeds or '–'}.", "",
             "Mean ± 95% CI (t) over the reported seeds of the reference PM's reward metrics "
             "(`cppo/metrics.py`); task1_gain_lost = (S[1][1] − S[T][1]) / (S[1][1] − S[0][1]).", "",
             "| method | " + " | ".join(KEYS) + " | coefficient |", "|---|" + "---|" * (len(KEYS) + 1)]
    for method, entry in results.items():
        cells = []
        for key in KEYS:
            values = [s["reward"][key] for s in entry["runs"] if s["reward"].get(key) is not None]
            if not values:
                cells.append("–")
                continue
            mean, half = mean_ci(values)
            cells.append(f"{mean:+.3f} ± {half:.3f}")
        knob = METHODS[method][1]
        lines.append(f"| {method} | " + " | ".join(cells) + (f" | {knob}={chosen[method]} |" if knob else " | – |"))
    if "ppo" in results:
        lost = [s["reward"]["task1_gain_lost"] for s in results["ppo"]["runs"]]
        lines += ["", "PPO in order, task-1 gain lost per reported seed: "
                  + ", ".join(f"{x:.0%}" if x is not None else "–" for x in lost) + "."]
    if tuning:
        lines += ["", "Tuning: every value tried, mean over the tuning seeds (chosen by final average); the methods "
                  "with nothing to tune ran on the tuning seeds too, as reference points:", "",
                  "| method | value | final_average | forgetting | plasticity | chosen |", "|---|---|---|---|---|---|"]
        points = [x for t in tuning.values() for x in t["means"].values()]
        slope, intercept = statistics.linear_regression([x["plasticity"] for x in points],
                                                        [x["forgetting"] for x in points])
        lines[-2] += " residual |"
        lines[-1] += "---|"
        lines += [f"| {m} | {f'{k}={v}' if k else '– (nothing to tune)'} | {x['final_average']:+.3f} | "
                  f"{x['forgetting']:+.3f} | {x['plasticity']:+.3f} | {'✓' if k and v == t['chosen'] else ''} | "
                  f"{x['forgetting'] - (slope * x['plasticity'] + intercept):+.2f} |"
                  for m, t in tuning.items() for k in [t["knob"]] for v, x in t["means"].items()]
        if "slower" in tuning.get("ppo", {}):
            lines += [f"| ppo (not tuned: its own trade-off) | ppo.learning_rate={v} | {x['final_average']:+.3f} | "
                      f"{x['forgetting']:+.3f} | {x['plasticity']:+.3f} |  | "
                      f"{x['forgetting'] - (slope * x['plasticity'] + intercept):+.2f} |"
                      for v, x in tuning["ppo"]["slower"].items()]
        correlation = statistics.correlation([x["plasticity"] for x in points], [x["forgetting"] for x in points])
        lines += ["", f"residual: forgetting minus the line fitted through all {len(points)} tuning points, "
                  f"forgetting = {slope:.2f} × plasticity {intercept:+.2f} (r = {correlation:.2f}); below zero, "
                  "a method forgets less than the common trade-off at its plasticity."]
        plot_tradeoff(tuning, out / "tradeoff.png")
        lines += ["", "![forgetting against plasticity](tradeoff.png)"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot_tradeoff(tuning: dict, path: Path) -> None:
    """Forgetting against plasticity on the tuning seeds: each tuned method's curve over its grid, the
    untuned methods as points. Lower-right is better: learns as much, forgets less."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for method, t in tuning.items():
        if t["knob"] is None:
            point = t["means"][None]
            ax.scatter([point["plasticity"]], [point["forgetting"]], marker="*", s=180, zorder=3, label=method)
            if "slower" in t:  # PPO at smaller learning rates: its own curve, no retention mechanism
                curve = [*t["slower"].items(), (None, point)]
                ax.plot([x["plasticity"] for _, x in curve], [x["forgetting"] for _, x in curve], color="black",
                        linestyle=":", marker="x", label="ppo, learning rate 3e-5 / 1e-4 / 3e-4")
                for value, x in curve[:-1]:
                    ax.annotate(f"lr {value:g}", (x["plasticity"], x["forgetting"]), fontsize=7, xytext=(3, -9),
                                textcoords="offset points")
            continue
        points = list(t["means"].items())
        ax.plot([x["plasticity"] for _, x in points], [x["forgetting"] for _, x in points], marker="o",
                linestyle="-" if method.startswith("cppo") else "--", label=method)
        for value, x in points:
            ax.annotate(f"{value:g}", (x["plasticity"], x["forgetting"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("plasticity (mean S[j][j] − S[j−1][j])")
    ax.set_ylabel("forgetting")
    ax.set_title("Forgetting against plasticity over each method's grid (tuning seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

if __name__ == "__main__":
    main()
