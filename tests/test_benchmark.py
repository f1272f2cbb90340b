"""scripts/benchmark_continual.py: the benchmark's protocol as a sweep (configs/sweeps/benchmark_continual.yaml)
and its analysis of the sweep's results, with `cppo train` replaced by tests/sweep_fake_train.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections import Counter

import pytest
import yaml
from conftest import PYTHON, ROOT

from cppo.sweep import load_sweep, run_sweep
from cppo.sweep.spec import resolve, settings

SWEEP = ROOT / "configs" / "sweeps" / "benchmark_continual.yaml"
TUNED = ["cppo_heuristic", "cppo_balance", "cppo_learned", "cppo_alpha_one", "cppo_beta_one", "cppo_kr_rollout",
         "l2", "ewc", "mas", "lwf", "cppo_memory", "ppo_memory", "ppo_memory_small", "cppo_memory_both",
         "cppo_memory_similar", "memory_replay", "cppo_rloo"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_continual", ROOT / "scripts" / "benchmark_continual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def benchmark_sweep(tmp_path):
    """The shipped benchmark sweep on the toy two-task stream, run by the stand-in trainer."""
    spec = yaml.safe_load(SWEEP.read_text())
    spec.update(base=str(ROOT / "configs" / "continual_tiny.yaml"), output_dir=str(tmp_path / "sweep"),
                launcher=f"{PYTHON} {ROOT / 'tests' / 'sweep_fake_train.py'}")
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_the_protocol_tunes_every_method_on_the_tuning_seeds_from_a_grid_of_three(benchmark_sweep):
    sweep = load_sweep(benchmark_sweep)
    assert sweep.seeds == [101, 102] and sweep.confirm_seeds == [1, 2, 3, 4, 5]
    trials = resolve(sweep, benchmark_sweep, settings(sweep, benchmark_sweep), sweep.seeds, "search")
    per_variant = Counter(t.variant for t in trials)
    assert all(per_variant[m] == 3 * 2 for m in TUNED)
    assert per_variant["ppo"] == per_variant["cppo_beta_zero"] == per_variant["joint"] == per_variant["ppo_rloo"] == 2
    assert per_variant["ppo_lr"] == 2 * 2 and not sweep.variants["ppo_lr"].confirm
    assert len(trials) == 114
    balance = next(t for t in trials if t.name == "cppo_balance-kr_coef=0.03-seed101")
    assert (balance.config["algo"], balance.config["cppo"]["weighting"], balance.config["cppo"]["kr_coef"],
            balance.config["seed"]) == ("cppo", "balance", 0.03, 101)
    memory = next(t for t in trials if t.name == "ppo_memory_small-kr_coef=0.3-seed101")
    assert (memory.config["cppo"]["ablation"], memory.config["cppo"]["kr_source"], memory.config["memory"]["capacity"],
            memory.config["memory"]["kr_coef"], memory.config["memory"]["weighting"]) == (
        "alpha_one", "memory", 32, 0.3, "uniform")
    ewc = next(t for t in trials if t.name == "ewc-reg_coef=1.0-seed102")
    assert (ewc.config["algo"], ewc.config["continual"]["regularizer"], ewc.config["continual"]["reg_coef"]) == (
        "ppo", "ewc", 1.0)


@pytest.mark.slow
@pytest.mark.slow
def test_the_analysis_chooses_on_tuning_seeds_and_reports_held_out_ones(bench, benchmark_sweep, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    assert run_sweep(benchmark_sweep, jobs=2) == 0
    calls = (tmp_path / "calls.jsonl").read_text().splitlines()
    assert len(calls) == 114 + 21 * 5  # every method but ppo_lr on the five reported seeds
    out = tmp_path / "docs"
    monkeypatch.setattr(sys, "argv", ["benchmark_continual.py", "--report", "--sweep", str(benchmark_sweep),
                                      "--out", str(out)])
    bench.main()
    results = json.loads((out / "results.json").read_text())
    chosen = results["meta"]["chosen"]
    assert chosen["cppo_heuristic"] == 0.1 and chosen["l2"] == 1.0  # the stand-in's score grows with them
    runs = results["results"]["cppo_heuristic"]["runs"]
    assert [r["seed"] for r in runs] == [1, 2, 3, 4, 5]
    assert runs[0]["reward"]["final_average"] == pytest.approx(1 + 10 * 0.1)
    # S = [[0, 0], [2, −1], [1 − kr, 2]]: gain 2, lost 2 − (1 − kr) → (1 + kr) / 2
    assert runs[0]["reward"]["task1_gain_lost"] == pytest.approx((1 + 0.1) / 2)
    tuning = results["meta"]["tuning"]
    assert "joint" not in tuning and "joint" in results["results"]  # no forgetting: reported, not on the plot
    assert "ppo_lr" in tuning and "ppo_lr" not in results["results"]
    # the common line is fitted without the rollout memory's and the critic-free methods: their distance from
    # it is the question
    assert tuning["ppo_memory"]["memory"] and tuning["memory_replay"]["memory"]
    assert not tuning["cppo_heuristic"]["memory"] and not tuning["ppo_lr"]["memory"]
    assert tuning["cppo_rloo"]["critic_free"] and tuning["ppo_rloo"]["critic_free"]
    assert not tuning["cppo_memory"]["critic_free"] and not tuning["ppo"]["critic_free"]
    assert len(bench.line_points(tuning)) == len([x for m, t in tuning.items() if "memory" not in m
                                                  and "rloo" not in m for x in t["means"].values()])
    assert tuning["cppo_heuristic"]["means"]["0.01"]["final_average"] == pytest.approx(101.5 + 0.1)
    report = (out / "results.md").read_text()
    assert "tuning points of the methods with GAE and without the rollout memory" in report
    assert "| cppo_heuristic | +4.000 ± 1.963 |" in report  # seeds 1..5 (mean 3) + 1; t(4) · s / √5 = 1.963
    assert "| cppo_heuristic | cppo.kr_coef=0.1 |" in report and (out / "tradeoff.png").stat().st_size > 0


def test_the_sweep_runs_the_trials_of_the_committed_results(tmp_path, bench):
    """The runner the script had before sweeps (it measured the benchmark's first table, 2026-11-25) made each
    run's config from the demo's continual config with the method's overrides, its coefficient and its seed.
    For the methods it had, the sweep's trials are those configs (the tracker group and output_dir aside), at
    the values docs/results/continual chose: 133 runs."""
    from cppo.demo import continual_config

    artifacts = {"data": tmp_path / "data", "sft": tmp_path / "sft",
                 "rewards": {n: tmp_path / n for n in ("sky", "ledger", "forest", "reference")}}
    base = tmp_path / "base.yaml"
    bench.write_base(artifacts, base, 40)
    spec = {**yaml.safe_load(SWEEP.read_text()), "base": str(base), "output_dir": str(tmp_path / "sweep")}
    path = tmp_path / "benchmark.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    sweep = load_sweep(path)
    trials = resolve(sweep, path, settings(sweep, path), sweep.seeds, "search")
    chosen = json.loads((ROOT / "docs" / "results" / "continual" / "results.json").read_text())["meta"]["chosen"]
    old_methods = {  # the earlier runner's table: method → overrides
        "ppo": ["algo=ppo"], "cppo_heuristic": ["algo=cppo", "cppo.weighting=heuristic"],
        "cppo_balance": ["algo=cppo", "cppo.weighting=balance"],
        "cppo_learned": ["algo=cppo", "cppo.weighting=learned"],
        "cppo_alpha_one": ["algo=cppo", "cppo.ablation=alpha_one"],
        "cppo_beta_one": ["algo=cppo", "cppo.ablation=beta_one"],
        "cppo_beta_zero": ["algo=cppo", "cppo.ablation=beta_zero"],
        "cppo_kr_rollout": ["algo=cppo", "cppo.kr_anchor=rollout"],
        "l2": ["algo=ppo", "continual.regularizer=l2"], "ewc": ["algo=ppo", "continual.regularizer=ewc"],
        "mas": ["algo=ppo", "continual.regularizer=mas"], "lwf": ["algo=ppo", "continual.regularizer=lwf"],
        "joint": ["algo=ppo", "continual.schedule=joint"], "ppo_lr": ["algo=ppo"]}
    knobs = {t.variant: next(iter(t.params), None) for t in trials}
    best = [(v, {knob: chosen[v]} if knob else {}) for v, knob in knobs.items() if sweep.variants[v].confirm
            and v in old_methods]
    trials += resolve(sweep, path, best, sweep.confirm_seeds, "confirm")
    compared = 0
    for trial in trials:
        if (trial.variant == "joint" and trial.stage == "search") or trial.variant not in old_methods:
            continue  # new: the joint run on the tuning seeds, the rollout memory's methods
        knob = [f"{k}={v}" for k, v in trial.params.items()]
        old = continual_config(artifacts, tmp_path / "old", "ppo", trial.seed, 40,
                               [*old_methods[trial.variant], *knob]).to_dict()
        new = {k: v for k, v in trial.config.items() if k not in ("output_dir", "run_group")}
        assert new == {k: v for k, v in old.items() if k not in ("output_dir", "run_group")}, trial.name
        compared += 1
    assert compared == 133
