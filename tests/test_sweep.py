"""`cppo sweep`: expansion, names, validation, running (reuse, failures, resume), results and wandb definitions.

Bookkeeping runs trials through tests/sweep_fake_train.py (a stand-in for `python -m cppo` that writes a
finished run's outputs at once); resume exactness and a sweep killed at a random moment run real trials."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import PYTHON, ROOT, subprocess_env

from cppo.cli import main, parse
from cppo.config_loading import load_config
from cppo.errors import UserError
from cppo.sweep import load_sweep, run_sweep
from cppo.sweep.report import t_interval
from cppo.sweep.spec import resolve, settings
from cppo.sweep.wandb_export import wandb_definitions

BASE = str(ROOT / "configs" / "continual_tiny.yaml")
FAKE = f"{PYTHON} {ROOT / 'tests' / 'sweep_fake_train.py'}"


def sweep_file(tmp_path: Path, name: str = "s", **fields) -> Path:
    spec = {"base": BASE, "output_dir": str(tmp_path / f"{name}-out"), **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def trials_of(path: Path, stage="search"):
    sweep = load_sweep(path)
    return resolve(sweep, path, settings(sweep, path), sweep.seeds, stage)


# --- expansion and names -----------------------------------------------------------------------------------


def test_grid_with_a_condition_and_variants_expands_in_a_stable_order(tmp_path):
    path = sweep_file(tmp_path, parameters={"algo": ["ppo", "cppo"],
                                            "cppo.kr_coef": {"values": [0.01, 0.1], "when": {"algo": "cppo"}}},
                      seeds=[1, 2])
    names = [t.name for t in trials_of(path)]
    assert names == ["algo=ppo-seed1", "algo=ppo-seed2", "algo=cppo-kr_coef=0.01-seed1", "algo=cppo-kr_coef=0.01-seed2",
                     "algo=cppo-kr_coef=0.1-seed1", "algo=cppo-kr_coef=0.1-seed2"]
    trial = trials_of(path)[2]
    assert trial.overrides == ["algo=cppo", "cppo.kr_coef=0.01", "seed=1"]
    assert trial.config["cppo"]["kr_coef"] == 0.01 and trial.config["seed"] == 1 and trial.config["algo"] == "cppo"
    assert trial.config["output_dir"] == str(tmp_path / "s-out" / "trials" / "algo=cppo-kr_coef=0.01-seed1")
    assert trial.config["run_group"] == "s"  # one tracker group per sweep

    variants = sweep_file(tmp_path, "v", seeds=[3], overrides=["tasks.0.steps=2"], variants={
        "ppo": ["algo=ppo"],
        "l2": {"overrides": ["continual.regularizer=l2"], "parameters": {"continual.reg_coef": [0.1, 1.0]}},
        "cppo": {"overrides": ["algo=cppo"], "parameters": {"cppo.kr_coef": [0.03]}}})
    trials = trials_of(variants)
    assert [t.name for t in trials] == ["ppo-seed3", "l2-reg_coef=0.1-seed3", "l2-reg_coef=1.0-seed3",
                                        "cppo-kr_coef=0.03-seed3"]
    assert trials[1].config["continual"] == {**trials[1].config["continual"], "regularizer": "l2", "reg_coef": 0.1}
    assert all(t.config["tasks"][0]["steps"] == 2 for t in trials)


def test_names_are_stable_when_the_sweep_grows(tmp_path):
    small = sweep_file(tmp_path, "a", parameters={"ppo.learning_rate": [1e-4, 3e-4]}, seeds=[1])
    grown = sweep_file(tmp_path, "b", parameters={"ppo.learning_rate": [3e-5, 1e-4, 3e-4], "ppo.kl_coef": [0.01]},
                       seeds=[1, 2])
    assert [t.name for t in trials_of(small)] == ["learning_rate=0.0001-seed1", "learning_rate=0.0003-seed1"]
    grown_names = {t.name.replace("-kl_coef=0.01", "") for t in trials_of(grown)}
    assert {t.name for t in trials_of(small)} <= grown_names


def test_random_draws_are_seeded_bounded_and_rounded(tmp_path):
    def draw(sample_seed):
        path = sweep_file(tmp_path, f"r{sample_seed}", method="random", trials=6, sample_seed=sample_seed, parameters={
            "ppo.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 1e-3},
            "ppo.ppo_epochs": {"distribution": "int_uniform", "min": 1, "max": 4},
            "algo": ["ppo", "cppo"],
            "cppo.kr_coef": {"distribution": "uniform", "min": 0.0, "max": 0.5, "when": {"algo": "cppo"}}})
        return [t.params for t in trials_of(path)]

    first = draw(7)
    assert first == draw(7)
    assert first != draw(8)
    assert len(first) == 6
    for params in first:
        assert 1e-5 <= params["ppo.learning_rate"] <= 1e-3
        assert float(f"{params['ppo.learning_rate']:.4g}") == params["ppo.learning_rate"]
        assert params["ppo.ppo_epochs"] in (1, 2, 3, 4)
        assert ("cppo.kr_coef" in params) == (params["algo"] == "cppo")
        assert "cppo.kr_coef" not in params or 0.0 <= params["cppo.kr_coef"] <= 0.5


@pytest.mark.parametrize("fields, message", [
    ({"parameters": {"cppo.kr_cof": [0.1]}}, "unknown config key 'cppo.kr_cof'"),
    ({"parameters": {"ppo.learning_rate": ["fast"]}}, "ppo.learning_rate must be a number, got 'fast'"),
    ({"parameters": {"ppo.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 1e-3}}},
     "a distribution needs method: random"),
    ({"parameters": {"cppo.kr_coef": {"values": [0.1], "when": {"algo": "cppo"}}, "algo": ["cppo"]}},
     "when names 'algo', which is not a parameter listed before it"),
    ({"seeds": [1, 2], "confirm_seeds": [2, 3]}, "confirm_seeds must be disjoint from seeds"),
    ({"overrides": ["output_dir=x"]}, "free of output_dir and seed"),
    ({"jobs": 0}, "jobs must be > 0"),
    ({"metric": {"name": "x", "goal": "up"}}, "metric.goal must be one of maximize, minimize"),
    ({"parameters": {"seed": [1, 2]}}, "seed is set by the sweep"),
])
def test_a_bad_sweep_file_is_one_line_and_exit_2_before_anything_runs(tmp_path, capsys, fields, message):
    path = sweep_file(tmp_path, **fields)
    assert main(["sweep", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "s-out").exists()


def test_the_sweep_command_imports_neither_torch_nor_the_trainer(tmp_path):
    path = sweep_file(tmp_path, parameters={"algo": ["ppo", "cppo"]})
    code = ("import sys; from cppo.cli import main; assert main(['sweep', sys.argv[1], '--dry-run']) == 0; "
            "assert 'torch' not in sys.modules and 'cppo.trainer' not in sys.modules, 'imported'")
    result = subprocess.run([PYTHON, "-c", code, str(path)], capture_output=True, text=True, env=subprocess_env())
    assert result.returncode == 0, result.stderr
    assert "algo=cppo-seed0: algo=cppo" in result.stdout


def test_output_dir_placeholders_take_the_resolved_values():
    config = load_config(BASE, ["algo=cppo", "cppo.kr_coef=3e-5", "seed=4",
                                "output_dir=runs/x/{algo}-kr{cppo.kr_coef}-{tasks.1.name}-seed{seed}"])
    assert config.output_dir == "runs/x/cppo-kr3e-05-digits-seed4"
    with pytest.raises(UserError, match=r"output_dir: \{cppo.kr\} names no config field"):
        load_config(BASE, ["output_dir=runs/{cppo.kr}"])
    with pytest.raises(UserError, match=r"\{cppo\} is a section"):
        load_config(BASE, ["output_dir=runs/{cppo}"])


# --- statistics --------------------------------------------------------------------------------------------


def test_t_interval_against_hand_values():
    # [1, 2, 3, 4]: mean 2.5, s = sqrt(5/3) = 1.290994, t(0.975, 3) = 3.182446 → half-width 2.054260
    mean, half = t_interval([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and half == pytest.approx(2.054260, abs=1e-6)
    # [0.3, 0.5]: mean 0.4, s = 0.141421, t(0.975, 1) = 12.706205 → 12.706205 · 0.141421 / √2 = 1.270620
    assert t_interval([0.3, 0.5]) == pytest.approx((0.4, 1.270620), abs=1e-6)
    mean, half = t_interval([7.0])
    assert mean == 7.0 and math.isnan(half)


# --- running: reuse, failures, report ----------------------------------------------------------------------


def calls(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_finished_trials_are_reused_and_a_failed_trial_does_not_stop_the_sweep(tmp_path, monkeypatch, capsys):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(log))
    path = sweep_file(tmp_path, launcher=FAKE, jobs=2, seeds=[1, 2], confirm_seeds=[5],
                      parameters={"algo": ["ppo", "cppo"],
                                  "cppo.kr_coef": {"values": [0.666, 0.1], "when": {"algo": "cppo"}}})
    out = tmp_path / "s-out"
    assert run_sweep(path) == 0
    assert len(calls(log)) == 7  # 6 trials on seeds 1, 2, then the best setting on the held-out seed 5
    assert {c["threads"] for c in calls(log)} == {str(max(1, (os.cpu_count() or 1) // 2))}
    assert {c["group"] for c in calls(log)} == {"s"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["name"], r["status"]) for r in rows] == [
        ("algo=ppo-seed1", "finished"), ("algo=ppo-seed2", "finished"),
        ("algo=cppo-kr_coef=0.666-seed1", "failed"), ("algo=cppo-kr_coef=0.666-seed2", "failed"),
        ("algo=cppo-kr_coef=0.1-seed1", "finished"), ("algo=cppo-kr_coef=0.1-seed2", "finished"),
        ("algo=cppo-kr_coef=0.1-seed5", "finished")]
    assert rows[2]["error"] == "cppo: error: cppo.kr_coef must be a lucky number, got 0.666"
    assert rows[4]["metric"] == pytest.approx(2.0) and rows[6]["stage"] == "confirm"
    report = (out / "results.md").read_text()
    assert "| cppo | 0.1 | 2/2 | +2.500 ± 6.353 |" in report  # seeds 1, 2 → 2.0, 3.0; 12.706 · 0.7071 / √2
    assert "| cppo | 0.666 | 0/2 | – |" in report
    assert "Best: algo=cppo, cppo.kr_coef=0.1: reward.final_average = +2.5000" in report
    assert "## Held-out seeds [5]" in report and "| cppo | 0.1 | 1/1 | +6.000 |" in report
    assert "## Failed trials" in report and "lucky number" in report
    assert (out / "metric.png").stat().st_size > 0 and (out / "tradeoff.png").stat().st_size > 0
    assert "2 failed" in capsys.readouterr().err

    log.unlink()  # run again: only the failed trials run (and fail) again
    assert run_sweep(path) == 0
    assert sorted(Path(c["config"]).stem for c in calls(log)) == ["algo=cppo-kr_coef=0.666-seed1",
                                                                  "algo=cppo-kr_coef=0.666-seed2"]
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "wall_s"} for r in again] == [
        {k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    log.unlink()  # --report alone: nothing runs, the same results are rebuilt from disk
    report = (out / "results.md").read_text()
    (out / "results.md").unlink()
    (out / "results.jsonl").unlink()
    assert main(["sweep", str(path), "--report"]) == 0
    assert not log.exists()
    assert (out / "results.md").read_text() == report
    assert [json.loads(line)["status"] for line in (out / "results.jsonl").read_text().splitlines()].count(
        "finished") == 5


def test_a_sweep_stopped_by_a_signal_exits_128_plus_the_signal_and_says_it_did_not_finish(tmp_path):
    log = tmp_path / "calls.jsonl"
    path = sweep_file(tmp_path, launcher=FAKE, seeds=[1, 2])
    env = {**subprocess_env(), "FAKE_CALLS": str(log), "FAKE_SLEEP": "30"}
    process = subprocess.Popen([PYTHON, "-m", "cppo", "sweep", str(path)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not log.exists() and time.time() < deadline:  # a trial is running
        time.sleep(0.1)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGINT, err  # a script that waits on it can tell
    assert "sweep: stopped before every trial finished; run the same command again to finish" in err
    assert len(calls(log)) == 1


def test_a_trial_left_part_way_resumes_and_a_changed_config_is_not_reused(tmp_path, monkeypatch):
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(log))
    path = sweep_file(tmp_path, launcher=FAKE, seeds=[1, 2])
    out = tmp_path / "s-out" / "trials"
    (out / "seed1" / "checkpoints" / "step_00000003").mkdir(parents=True)  # what a stopped sweep leaves
    (out.parent / "sweep.yaml").write_text(path.read_text())
    (out / "seed2").mkdir()
    (out / "seed2" / "metrics.jsonl").write_text("")  # stopped before its first checkpoint
    assert run_sweep(path) == 0
    assert [c["flags"] for c in calls(log)] == [["--resume"], ["--overwrite"]]

    changed = sweep_file(tmp_path, launcher=FAKE, seeds=[1, 2], overrides=["ppo.learning_rate=1e-3"])
    with pytest.raises(UserError, match=r"holds another sweep: .* differs from its sweep.yaml in overrides"):
        run_sweep(changed)
    with pytest.raises(UserError, match=r"trial seed1 in .* ran with other values of ppo.learning_rate"):
        run_sweep(changed, new_sweep=True)  # a new sweep in the same directory reuses no trial of another config


# --- wandb -------------------------------------------------------------------------------------------------


def test_the_wandb_definition_runs_the_native_trials(tmp_path, monkeypatch):
    path = sweep_file(tmp_path, seeds=[1, 2], overrides=["tasks.0.steps=3"], variants={
        "ppo": ["algo=ppo"], "cppo": {"overrides": ["algo=cppo"], "parameters": {"cppo.kr_coef": [0.01, 0.1]}}},
        parameters={"ppo.learning_rate": [1e-4]}, metric={"name": "reward.forgetting", "goal": "minimize"})
    sweep = load_sweep(path)
    definitions = wandb_definitions(sweep, path, tmp_path / "s-out")
    assert set(definitions) == {"ppo", "cppo"}
    cppo = definitions["cppo"]
    assert cppo["parameters"] == {"ppo.learning_rate": {"values": [1e-4]}, "cppo.kr_coef": {"values": [0.01, 0.1]},
                                  "seed": {"values": [1, 2]}}
    assert cppo["metric"] == {"name": "summary/reward/forgetting", "goal": "minimize"}
    assert cppo["command"][:3] == ["cppo", "train", BASE] and cppo["command"][-1] == "${args_no_hyphens}"
    native = {t.name: t for t in trials_of(path)}
    assert len(native) == 6
    for name, definition in definitions.items():
        # what `wandb agent` runs for each point of the definition: ${args_no_hyphens} → key=value ...
        grid = [{}]
        for key, spec in definition["parameters"].items():
            grid = [{**g, key: v} for g in grid for v in spec["values"]]
        for point in grid:
            argv = [*definition["command"][1:-1], *(f"{k}={v}" for k, v in point.items())]
            args = parse(argv)
            config = load_config(args.config, args.overrides).to_dict()
            trial = native[Path(config["output_dir"]).name]
            assert trial.variant == name
            assert {k: v for k, v in config.items() if k != "report_to"} == {
                k: v for k, v in trial.config.items() if k != "report_to"}
            assert config["report_to"] == ["wandb"]
            native.pop(trial.name)
    assert native == {}  # every native trial, once

    assert main(["sweep", str(path), "--wandb"]) == 0
    written = yaml.safe_load((tmp_path / "s-out" / "wandb" / "cppo.yaml").read_text())
    assert written == cppo

    conditional = sweep_file(tmp_path, "c", parameters={"algo": ["cppo"],
                                                        "cppo.kr_coef": {"values": [0.1], "when": {"algo": "cppo"}}})
    with pytest.raises(UserError, match="has a condition"):
        run_sweep(conditional, wandb=True)


def test_a_run_started_by_wandb_agent_logs_under_the_id_it_was_given(tmp_path, monkeypatch, tiny_config):
    from conftest import quick_overrides

    monkeypatch.setenv("WANDB_RUN_ID", "agentgiven1")
    assert main(["train", tiny_config, *quick_overrides(tmp_path / "run", steps=1)]) == 0
    [checkpoint] = (tmp_path / "run" / "checkpoints").iterdir()
    assert json.loads((checkpoint / "state.json").read_text())["run_id"] == "agentgiven1"


# --- real trials: a killed trial resumes exactly; a killed sweep ends as a straight one ----------------------


def run_command(path: Path, env: dict | None = None, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "cppo", "sweep", str(path)], cwd=ROOT, capture_output=True, text=True,
                          env=env or subprocess_env(), timeout=timeout)


def comparable(out: Path) -> list[dict]:
    """results.jsonl without what measures time."""
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("wall_s")
        row["output_dir"] = Path(row["output_dir"]).name
        if row["summary"]:
            row["summary"]["final_stats"] = {k: v for k, v in row["summary"]["final_stats"].items()
                                             if not k.startswith(("time/", "perf/")) and k != "tokens_per_s"}
    return rows


TINY_CONTINUAL = ["tasks.0.steps=3", "tasks.1.steps=3", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                  "ppo.ppo_epochs=1", "generation.max_new_tokens=8"]


@pytest.mark.long
def test_a_killed_trial_resumes_bit_identical_to_an_uninterrupted_one(tmp_path):
    fields = {"overrides": [*TINY_CONTINUAL, "save_steps=1", "algo=cppo"], "seeds": [1]}
    straight = sweep_file(tmp_path, "straight", **fields)
    killed = sweep_file(tmp_path, "killed", **fields)
    assert run_command(straight).returncode == 0
    env = {**subprocess_env(), "CPPO_FAILPOINT": "step:5:mid"}  # in the second task, after a checkpoint
    first = run_command(killed, env)
    assert first.returncode == 0, first.stderr
    record = json.loads((tmp_path / "killed-out" / "trials" / "seed1.json").read_text())
    assert record["status"] == "failed" and record["error"] == "killed by SIGKILL"
    second = run_command(killed)
    assert second.returncode == 0, second.stderr
    assert "--resume" in (tmp_path / "killed-out" / "trials" / "seed1.log").read_text()
    assert comparable(tmp_path / "killed-out") == comparable(tmp_path / "straight-out")
    for name in ("policy/model.safetensors", "value_model/model.safetensors", "eval_matrix.json"):
        a = (tmp_path / "straight-out" / "trials" / "seed1" / name).read_bytes()
        assert a == (tmp_path / "killed-out" / "trials" / "seed1" / name).read_bytes(), name


@pytest.mark.long
def test_a_sweep_killed_at_a_random_moment_and_run_again_ends_as_one_that_ran_straight(tmp_path):
    fields = {"overrides": TINY_CONTINUAL, "seeds": [1, 2], "jobs": 2,
              "parameters": {"algo": ["ppo", "cppo"]}}
    straight = sweep_file(tmp_path, "straight", **fields)
    killed = sweep_file(tmp_path, "killed", **fields)
    assert run_command(straight).returncode == 0
    # A random moment while a trial trains: once some unfinished trial has logged `after` of its 6 steps. (A moment
    # drawn from the straight sweep's duration could fall between trials when the machine's load changes.)
    after = random.Random().randint(1, 5)
    started = time.time()
    process = subprocess.Popen([PYTHON, "-m", "cppo", "sweep", str(killed)], cwd=ROOT, env=subprocess_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials = tmp_path / "killed-out" / "trials"
    while time.time() - started < 600 and process.poll() is None and not any(
            after <= len(m.read_text().splitlines()) < 6 and not (m.parent / "summary.json").exists()
            for m in trials.glob("*/metrics.jsonl")):
        time.sleep(0.02)
    moment = time.time() - started
    process.send_signal(signal.SIGKILL)  # the sweep alone dies; its trials save a checkpoint and stop
    process.wait()
    again = run_command(killed)
    assert again.returncode == 0, again.stderr
    assert comparable(tmp_path / "killed-out") == comparable(tmp_path / "straight-out"), f"killed after {moment:.1f} s"
    logs = [log.read_text() for log in (tmp_path / "killed-out" / "trials").glob("*.log")]
    continued = [log for log in logs if log.count("=== ") == 2]
    assert continued, "no trial was running when the sweep was killed"
    for log in continued:  # one that saved a checkpoint on its SIGTERM continued from it
        first, second = log.split("=== ")[1:]
        assert ("stopped by a signal; checkpoint" in first) == second.splitlines()[0].endswith(" --resume"), log
    print(f"killed after {moment:.1f} s, a trial {after} steps in", file=sys.stderr)


@pytest.mark.long
def test_trials_at_once_under_accelerate_launch_each_rendezvous_on_their_own_port(tmp_path):
    accelerate = Path(PYTHON).parent / "accelerate"
    path = sweep_file(tmp_path, base=str(ROOT / "configs" / "ppo_tiny.yaml"), jobs=2, seeds=[1, 2],
                      launcher=f"{accelerate} launch --multi_gpu --num_processes 2 -m cppo",
                      overrides=["ppo.steps=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                                 "ppo.ppo_epochs=1", "generation.max_new_tokens=8"],
                      metric={"name": "reward/mean"})
    result = run_command(path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "s-out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["finished", "finished"], [r["error"] for r in rows]
    assert all(isinstance(r["metric"], float) for r in rows)  # metrics.jsonl's last line
    for row in rows:
        backend = json.loads((Path(row["output_dir"]) / "backend.json").read_text())
        assert backend["processes"] == 2 and backend["backend"] == "ddp"
        assert "--main_process_port" in (tmp_path / "s-out" / "trials" / f"{row['name']}.log").read_text()


@pytest.mark.long
def test_a_trial_logs_to_the_sweeps_wandb_group_and_its_summary_metrics_to_the_wandb_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "run"
    assert main(["train", BASE, f"output_dir={out}", "tasks.0.steps=1", "tasks.1.steps=1", "report_to=[wandb]",
                 "run_group=sweep-group-7", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4"]) == 0
    [record] = (out / "wandb").glob("offline-run-*/run-*.wandb")  # wandb's own record file, protobuf
    for _ in range(60):  # wandb's writer is a process of its own: its last records may land a moment later
        data = record.read_bytes()
        if b"exit_code" in data or b"summary/reward/final_average" in data:
            break
        time.sleep(0.5)
    assert b"sweep-group-7" in data
    assert b"eval/digits/reward" in data, "the evaluation, logged before the summary, is missing too"
    assert b"summary/reward/final_average" in data and b"summary/reward/forgetting" in data
