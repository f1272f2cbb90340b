"""scripts/benchmark_continual.py: run bookkeeping (names, configs, reuse, parallel runs) and statistics,
with `cppo train` replaced by a stand-in that writes a run's outputs from its config."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_continual", ROOT / "scripts" / "benchmark_continual.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def artifacts(tmp_path):
    return {"data": tmp_path / "data", "sft": tmp_path / "sft",
            "rewards": {n: tmp_path / n for n in ("sky", "ledger", "forest", "reference")}}


def fake_train(calls: list):
    """Writes summary.json and an eval matrix whose numbers depend on the config's seed and kr_coef."""

    def run(command, **kwargs):
        config_path = command[4]  # python -m cppo train CONFIG [--resume]
        config = yaml.safe_load(Path(config_path).read_text())
        calls.append((config_path, config["output_dir"], kwargs["env"].get("OMP_NUM_THREADS"), command[5:]))
        out = Path(config["output_dir"])
        out.mkdir(parents=True, exist_ok=True)
        x = config["seed"] + config["cppo"]["kr_coef"]
        S = [[0.0, 0.0, 0.0], [2.0, -1.0, 0.0], [1.0, 2.0, 0.0], [0.5, 1.0, 2.0 + x]]
        (out / "eval_matrix.json").write_text(json.dumps({"scores": {"reward": S}}))
        (out / "summary.json").write_text(json.dumps({"reward": {"final_average": x, "forgetting": 1.0}}))
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


def test_parallel_runs_with_dotted_labels_keep_their_own_config_and_directory(bench, artifacts, tmp_path,
                                                                             monkeypatch):
    calls = []
    monkeypatch.setattr(bench.subprocess, "run", fake_train(calls))
    specs = [("cppo_heuristic", bench.label("cppo_heuristic", v), seed, [f"cppo.kr_coef={v}"])
             for v in (0.01, 0.03) for seed in (101, 102)]
    summaries = bench.run_many(artifacts, tmp_path / "work", specs, steps=2, jobs=2)

    assert len({config for config, _, _, _ in calls}) == 4  # one config file per run, even with dots in labels
    directories = sorted(Path(out).name for _, out, _, _ in calls)
    assert directories == sorted(f"{name}-seed{seed}" for _, name, seed, _ in specs)
    assert {threads for _, _, threads, _ in calls} == {str(max(1, (bench.os.cpu_count() or 1) // 2))}
    # summaries come back in the order of the specs, each from its own run
    assert [s["reward"]["final_average"] for s in summaries] == pytest.approx([101.01, 102.01, 101.03, 102.03])
    assert summaries[0]["reward"]["task1_gain_lost"] == pytest.approx(0.75)  # (2 − 0.5) / (2 − 0)

    calls.clear()  # finished runs are reused, not run again
    assert bench.run_many(artifacts, tmp_path / "work", specs, steps=2, jobs=2) == summaries
    assert calls == []


def test_a_run_stopped_part_way_resumes_from_its_checkpoint(bench, artifacts, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(bench.subprocess, "run", fake_train(calls))
    work = tmp_path / "work"
    (work / "ppo-seed2" / "checkpoints" / "step_00000002").mkdir(parents=True)  # what a stopped run leaves
    bench.run_once(artifacts, work, "ppo", "ppo", 1, 2, [])
    bench.run_once(artifacts, work, "ppo", "ppo", 2, 2, [])
    assert [extra for *_, extra in calls] == [[], ["--resume"]]


def test_mean_ci_is_the_t_interval(bench):
    mean, half = bench.mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0 and half == pytest.approx(4.303 * 1.0 / math.sqrt(3))
    assert math.isnan(bench.mean_ci([5.0])[1])


def test_labels_name_the_method_and_its_coefficient(bench):
    assert bench.label("ppo", None) == "ppo"
    assert bench.label("lwf", 0.1) == "lwf-reg_coef0.1"
    assert bench.label("cppo_learned", 0.03) == "cppo_learned-kr_coef0.03"
