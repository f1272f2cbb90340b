"""Bad input to any subcommand (sweep, build-tiny, train's resume of an earlier task, options that cannot take
effect) is one `cppo: error:` line and exit 2, with no traceback, and every file the user had is byte-identical
afterwards (sha256 of the whole tree). In this process: sweeps run their trials through tests/sweep_fake_train.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import CONTINUAL, PYTHON, ROOT, TINY, Killed, kills_raise, one_error_line, run_in_process, snapshot
from safetensors.torch import load_file

from cppo.cli import main, parse
from cppo.config_loading import load_config
from cppo.errors import UserError
from cppo.session import reset_accelerate_state

FAKE = f"{PYTHON} {ROOT / 'tests' / 'sweep_fake_train.py'}"
BASE = str(ROOT / "configs" / "continual_tiny.yaml")


def refused(args: list[str], capture, expected: str, *trees: Path) -> str:
    """`cppo ARGS` in this process: exit 2, one error line holding `expected`, no traceback, and each of
    `trees` exactly as it was (a tree that did not exist still does not)."""
    before = [snapshot(t) if t.exists() else None for t in trees]
    line = one_error_line(*run_in_process(args, capture), expected)
    assert [snapshot(t) if t.exists() else None for t in trees] == before
    return line


# ------------------------------------------------------------------------------------------- sweeps

def sweep_file(path: Path, out: Path, **fields) -> str:
    path.write_text(yaml.safe_dump({"base": BASE, "output_dir": str(out), "launcher": FAKE, **fields},
                                   sort_keys=False))
    return str(path)


@pytest.fixture
def finished_sweep(tmp_path, monkeypatch):
    """A finished sweep of two learning rates on two seeds, its output directory and the trials' call log."""
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "sweep"
    path = sweep_file(tmp_path / "s.yaml", out, parameters={"ppo.learning_rate": [1e-4, 3e-4]}, seeds=[1, 2])
    assert main(["sweep", path]) == 0
    return Path(path), out, calls


def test_a_changed_sweep_over_a_finished_one_is_refused_and_new_sweep_keeps_the_earlier_results(
        finished_sweep, tmp_path, capsys):
    path, out, calls = finished_sweep
    capsys.readouterr()
    results = (out / "results.jsonl").read_text()
    for name, fields in {"grid": {"parameters": {"ppo.learning_rate": [3e-4, 1e-3]}, "seeds": [1, 2]},
                         "seeds": {"parameters": {"ppo.learning_rate": [1e-4, 3e-4]}, "seeds": [1]},
                         "metric": {"parameters": {"ppo.learning_rate": [1e-4, 3e-4]}, "seeds": [1, 2],
                                    "metric": {"name": "reward.forgetting", "goal": "minimize"}}}.items():
        changed = sweep_file(tmp_path / f"{name}.yaml", out, **fields)
        line = refused(["sweep", changed], capsys, "holds another sweep", out)
        assert "--new-sweep" in line and "another output_dir" in line
        line = refused(["sweep", changed, "--report"], capsys, "holds another sweep", out)
        assert str(out / "sweep.yaml") in line
    # What only changes how trials run is the same sweep: more trials at once.
    jobs = sweep_file(tmp_path / "jobs.yaml", out, parameters={"ppo.learning_rate": [1e-4, 3e-4]}, seeds=[1, 2],
                      jobs=2)
    calls.unlink()
    assert main(["sweep", jobs]) == 0 and not calls.exists()

    grown = sweep_file(tmp_path / "grid.yaml", out, parameters={"ppo.learning_rate": [3e-4, 1e-3]}, seeds=[1, 2])
    assert main(["sweep", grown, "--new-sweep"]) == 0
    assert (out / "earlier" / "1" / "results.jsonl").read_text() == results
    assert (out / "earlier" / "1" / "sweep.yaml").read_text() == Path(jobs).read_text()  # as last run
    ran = sorted(Path(c["config"]).stem for c in map(json.loads, calls.read_text().splitlines()))
    assert ran == ["learning_rate=0.001-seed1", "learning_rate=0.001-seed2"]  # 3e-4 is reused
    names = [json.loads(line)["name"] for line in (out / "results.jsonl").read_text().splitlines()]
    assert names == ["learning_rate=0.0003-seed1", "learning_rate=0.0003-seed2", "learning_rate=0.001-seed1",
                     "learning_rate=0.001-seed2"]
    with pytest.raises(SystemExit) as exited:  # argparse's own usage error
        main(["sweep", grown, "--new-sweep", "--report"])
    one_error_line(exited.value.code, capsys.readouterr().err, "--new-sweep starts a sweep")


def test_report_refuses_a_directory_that_holds_no_sweep(finished_sweep, tmp_path, capsys):
    path, out, _ = finished_sweep
    run = tmp_path / "run"  # a training run's output
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    missing = tmp_path / "missing"
    for target, expected in ((run, "no sweep.yaml"), (empty, "it is empty"), (missing, "it does not exist")):
        spec = sweep_file(tmp_path / f"{target.name}.yaml", target, parameters={"ppo.learning_rate": [1e-4]})
        refused(["sweep", spec, "--report"], capsys, "holds no sweep", target, out)
        assert not missing.exists()
        assert expected in one_error_line(*run_in_process(["sweep", spec, "--report"], capsys), "--report")
    # A fresh sweep does not write into a directory of other files either.
    spec = sweep_file(tmp_path / "into_run.yaml", run)
    refused(["sweep", spec], capsys, "is not a sweep's directory", run)


def test_a_sweep_refused_after_its_file_loaded_has_written_nothing(finished_sweep, tmp_path, capsys, monkeypatch):
    path, out, _ = finished_sweep
    capsys.readouterr()
    same = yaml.safe_load(path.read_text())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no nvidia-smi: no GPUs
    gpus = sweep_file(tmp_path / "gpus.yaml", out, **{k: v for k, v in same.items() if k != "output_dir"},
                      devices_per_trial=1)
    refused(["sweep", gpus], capsys, "devices_per_trial: no GPUs found", out)
    monkeypatch.undo()

    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("ppo: [unclosed\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    cases = {
        "base": ({"base": str(bad_yaml)}, "is not valid YAML"),
        "output_dir a file": ({"output_dir": str(a_file)}, "is a file, not a directory"),
        "output_dir under a file": ({"output_dir": str(a_file / "sweep")}, f"{a_file} is a file"),
        "launcher": ({"launcher": "no-such-launcher -m cppo"}, "'no-such-launcher' is not an executable"),
        "output_dir unmakeable": ({"output_dir": "/proc/cppo-sweep"}, "output_dir /proc/cppo-sweep cannot be written"),
        "launcher quoting": ({"launcher": "python '-m cppo"}, "launcher must be a command line"),
        "when": ({"parameters": {"algo": ["ppo"], "cppo.kr_coef": {"values": [0.1], "when": {"algo": "cppo"}}}},
                 "when {algo: 'cppo'} never holds: algo takes only 'ppo'"),
        "when on a draw": ({"method": "random", "parameters": {
            "ppo.learning_rate": {"distribution": "log_uniform", "min": 1e-5, "max": 1e-3},
            "ppo.kl_coef": {"values": [0.1], "when": {"ppo.learning_rate": 1e-4}}}}, "never holds"),
    }
    for name, (fields, expected) in cases.items():
        spec = sweep_file(tmp_path / f"case-{len(name)}.yaml", tmp_path / f"out-{len(name)}", **fields)
        refused(["sweep", spec], capsys, expected, out, a_file, tmp_path / f"out-{len(name)}")


def test_a_metric_no_trial_produces_is_refused_at_the_first_finished_trial(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    out = tmp_path / "sweep"
    spec = sweep_file(tmp_path / "s.yaml", out, seeds=[1, 2, 3], metric={"name": "reward.finl_average"})
    line = one_error_line(*run_in_process(["sweep", spec], capsys), "metric.name must name a number")
    assert "'reward.finl_average'" in line and "reward.final_average" in line
    assert len((tmp_path / "calls.jsonl").read_text().splitlines()) == 1  # the other trials never started
    before = snapshot(out)  # run again, or report: refused at once, nothing run or written
    refused(["sweep", spec], capsys, "metric.name must name a number", out)
    refused(["sweep", spec, "--report"], capsys, "metric.name must name a number", out)
    assert snapshot(out) == before


def test_a_killed_sweep_is_not_taken_for_a_live_one(tmp_path):
    """The pid in a sweep's lock file: a live `cppo sweep` is live; a killed one that has not been reaped yet (a
    zombie), or a process that has since been given its pid, is not."""
    from cppo.sweep.runner import _live_sweep, hold_lock

    def process(*words):
        return subprocess.Popen([PYTHON, "-c", "import time, sys; time.sleep(float(sys.argv[1]))", *words])

    live = process("60", "sweep")
    other = process("60", "something-else")
    try:
        time.sleep(0.5)
        assert _live_sweep(live.pid, grace_s=0.2) and not _live_sweep(other.pid, grace_s=0.2)
        os.kill(live.pid, signal.SIGKILL)  # not reaped: a zombie until wait()
        time.sleep(0.5)
        assert Path(f"/proc/{live.pid}/status").read_text().count("zombie") == 1
        assert not _live_sweep(live.pid, grace_s=0.2)
    finally:
        for p in (live, other):
            p.kill()
            p.wait()

    # The lock itself: held by a trial of the killed sweep (it inherited the descriptor) while the pid written in it
    # is the killed sweep's zombie: the new sweep waits for the trial to exit, and then holds the lock.
    out = tmp_path / "sweep"
    out.mkdir()
    holder = subprocess.Popen([PYTHON, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(2)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    dead = process("60", "sweep")
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(dead.pid, signal.SIGKILL)
        time.sleep(0.3)
        (out / ".lock").write_text(str(dead.pid))
        started = time.time()
        with open(out / ".lock", "a+") as lock:
            hold_lock(lock, out)
            waited = time.time() - started
            assert holder.wait(timeout=5) == 0 and 1.0 < waited < 30  # it waited for the trial to let go
            assert (out / ".lock").read_text() == str(os.getpid())
    finally:
        for p in (holder, dead):
            p.kill()
            p.wait()


# --------------------------------------------------------------------------------------- build-tiny

def test_build_tiny_writes_a_new_or_empty_directory_and_refuses_anything_else(tmp_path, capsys):
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"mine")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for target, expected in ((a_file, "is a file, not a directory"), (mine, "is not empty (notes.txt)"),
                             (a_file / "tiny", f"{a_file} is a file")):
        refused(["build-tiny", str(target)], capsys, expected, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["build-tiny", str(empty)]) == 0
    assert (empty / "config.json").is_file() and (empty / "model.safetensors").is_file()
    assert main(["build-tiny", str(tmp_path / "new" / "tiny")]) == 0
    refused(["build-tiny", str(empty)], capsys, "is not empty", tmp_path)  # not built twice over itself


# ------------------------------------------------------------------------------------------- config

def test_config_refuses_bad_input_in_one_line_and_writes_nothing(tmp_path, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("ppo: [\n")
    for args, expected in (([str(tmp_path / "missing.yaml")], "config file not found"),
                           ([str(bad_yaml)], "is not valid YAML"),
                           ([TINY, "ppo.learning_rat=1e-4"], "did you mean ppo.learning_rate?"),
                           ([TINY, "--ppo.clip=-1"], "ppo.clip must be > 0"),
                           ([TINY, "tasks.3.steps=2"], "tasks.3 is not an existing list item")):
        refused(["config", *args], capsys, expected, tmp_path)


# ----------------------------------------------------------------------- train: what a resume reads

SHORT = ["tasks.0.steps=2", "tasks.1.steps=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
         "ppo.ppo_epochs=1", "generation.max_new_tokens=8", "eval.max_prompts=8", "save_steps=1",
         "save_total_limit=null"]


@pytest.fixture(scope="module")
def killed_in_task_2(tmp_path_factory):
    """A two-task run killed in the middle of its third step (task 2), a checkpoint after every step."""
    out = tmp_path_factory.mktemp("killed") / "run"
    mp = pytest.MonkeyPatch()
    kills_raise(mp)
    mp.setenv("CPPO_FAILPOINT", "step:3:mid")
    try:
        with pytest.raises(Killed):
            main(["train", CONTINUAL, f"output_dir={out}", *SHORT])
    finally:
        mp.undo()
        reset_accelerate_state()
    return out


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:len(data) // 2 + 1024] = bytes(1024)  # 1 KiB zeroed
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["policy", "value_model", "missing"])
def test_resuming_task_2_refuses_a_changed_task_1_model(killed_in_task_2, tmp_path, capfd, damage):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(killed_in_task_2, out, symlinks=True)
    task_1 = out / "task_1_vowels"
    if damage == "missing":
        (task_1 / "policy" / "config.json").unlink()
        expected = "task_1_vowels/policy/config.json is missing"
    else:
        corrupt(task_1 / damage / "model.safetensors")
        expected = f"task_1_vowels/{damage}/model.safetensors does not match the sha256 it was saved with"
    try:
        line = refused(["train", CONTINUAL, f"output_dir={out}", *SHORT, "--resume"], capfd, expected, out)
    finally:
        reset_accelerate_state()
    assert "checkpoint step_00000002" in line  # the task-end checkpoint of task 1 names it ...
    assert str(out / "checkpoints" / "step_00000001") in line  # ... and the step-1 one does without it


def test_a_finished_task_records_the_hashes_of_what_it_saved(killed_in_task_2):
    from cppo.checkpoint import read_state, tree_hashes

    state = read_state(killed_in_task_2 / "checkpoints" / "step_00000002")
    assert state["task_outputs"] == tree_hashes(killed_in_task_2 / "task_1_vowels", killed_in_task_2)
    assert "task_1_vowels/policy/model.safetensors" in state["task_outputs"]
    assert read_state(killed_in_task_2 / "checkpoints" / "step_00000001")["task_outputs"] == {}
    assert load_file(killed_in_task_2 / "task_1_vowels" / "policy" / "model.safetensors")


# -------------------------------------------------------------------- options that cannot take effect

@pytest.mark.parametrize(("overrides", "expected"), [
    (["ppo.advantage=grpo", "generation.num_generations=2", "model.value_model=some/critic"],
     "model.value_model must be null with ppo.advantage: grpo"),
    (["algo=cppo", "cppo.kr_source=memory"], "cppo.kr_source must be rollouts on a one-task run"),
    (["algo=cppo", "cppo.kr_source=both"], "cppo.kr_source must be rollouts on a one-task run"),
    (["ppo.scale_rewards=none"], "ppo.scale_rewards must be group (the default) with ppo.advantage: gae"),
    (["vllm.importance_sampling_cap=2.0"], "vllm.importance_sampling_cap must be null with generation.engine: hf"),
])
def test_an_option_that_cannot_take_effect_is_an_error(overrides, expected):
    with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(TINY, overrides)


def test_options_that_cannot_take_effect_end_the_command_with_one_line(tmp_path, capsys):
    memory = ["algo=cppo", "cppo.kr_source=memory", "memory.capacity=4", "memory.batch_size=8",
              f"output_dir={tmp_path / 'run'}"]
    refused(["train", CONTINUAL, *memory], capsys, "memory.batch_size must be <= memory.capacity (4)", tmp_path)
    assert load_config(CONTINUAL, memory[:-2] + ["memory.batch_size=4"]).memory.batch_size == 4


def test_the_critics_settings_under_a_critic_free_estimator_are_one_warning_each(tmp_path, capsys):
    """A base config's critic settings (ppo_tiny.yaml sets a learning rate, the benchmark's base value_init:
    reward_model) are what a user switching estimators by an override or a sweep variant keeps: a warning each."""
    config = load_config(TINY, ["ppo.advantage=grpo", "generation.num_generations=2", "model.value_lora_r=4",
                                "model.value_init=reward_model"])
    assert config.ignored() == [
        "model.value_init: 'reward_model' is ignored with ppo.advantage: grpo (critic-free: no value model is built)",
        "ppo.value_learning_rate: 0.001 is ignored with ppo.advantage: grpo (critic-free: no value model is built)",
        "model.value_lora_r: 4 is ignored with ppo.advantage: grpo (critic-free: no value model is built)"]
    assert load_config(TINY).ignored() == []
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")  # the run then stops on its output_dir, after the warnings
    code, err = run_in_process(["train", TINY, "ppo.advantage=grpo", "generation.num_generations=2",
                                f"output_dir={a_file}"], capsys)
    assert code == 2 and err.splitlines()[0] == ("cppo: warning: ppo.value_learning_rate: 0.001 is ignored with "
                                                 "ppo.advantage: grpo (critic-free: no value model is built)"), err


# ------------------------------------------------------------------------------------ the command line

def test_resume_takes_a_following_override_as_an_override(tmp_path, monkeypatch):
    args = parse(["train", "c.yaml", "--resume", "ppo.steps=80"])
    assert args.resume == "auto" and args.overrides == ["ppo.steps=80"]
    args = parse(["train", "c.yaml", "--resume", "runs/lr=1e-5/checkpoints/step_4", "ppo.steps=80"])
    assert args.resume == "runs/lr=1e-5/checkpoints/step_4" and args.overrides == ["ppo.steps=80"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kr=0.1").mkdir()  # a checkpoint directory of that very name is still the checkpoint
    assert parse(["train", "c.yaml", "--resume", "kr=0.1"]).resume == "kr=0.1"
    assert parse(["train", "c.yaml", "ppo.steps=80", "--resume"]).resume == "auto"



# ------------------------------------------------------------------------- launches: --accelerate-config

def test_accelerate_config_and_process_counts_are_checked_before_anything_launches(tmp_path, capsys, monkeypatch):
    import cppo.launch

    monkeypatch.setattr(cppo.launch.subprocess, "Popen", None)  # launching anything would fail the test
    run = [f"output_dir={tmp_path / 'run'}"]
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: [MULTI_GPU\n")
    typo = tmp_path / "typo.yaml"
    typo.write_text("distributed_type: MULTI_GPUS\nnum_processes: 2\n")
    zero = tmp_path / "zero.yaml"
    zero.write_text("distributed_type: MULTI_GPU\nnum_processes: 0\n")
    cases = [
        (["--accelerate-config", "zero4"], "neither a file nor the name of a shipped config (fsdp2, multi_gpu"),
        (["--accelerate-config", str(tmp_path / "missing.yaml")], "neither a file nor the name"),
        (["--accelerate-config", str(broken)], "is not valid YAML"),
        (["--accelerate-config", str(typo)], "distributed_type must be one of"),
        (["--accelerate-config", str(zero)], "num_processes must be an integer >= 1, got 0"),
        (["--accelerate-config", "multi_gpu", "--num-processes", "3"],
         "ppo.mini_batch_size must be a multiple of processes × gradient_accumulation_steps (3 × 1), got 8"),
        (["--accelerate-config", "multi_gpu", "--num-processes", "2", "ppo.advantage=grpo",
          "generation.num_generations=4", "ppo.rollout_batch_size=12", "ppo.mini_batch_size=4"],
         "(4 × 2): each process answers whole prompts G times"),
        (["--accelerate-config", "multi_gpu", "ppo.mini_batch_size=4"],  # the config's 8 processes
         "ppo.mini_batch_size must be a multiple of processes × gradient_accumulation_steps (8 × 1)"),
    ]
    for extra, expected in cases:
        refused(["train", TINY, *run, *extra], capsys, expected, tmp_path)
    assert not (tmp_path / "run").exists()


def test_the_launchers_report_of_a_process_that_reported_its_error_is_held_back():
    import io

    from cppo.launch import relay

    lines = ["[vowels] step 1/40 reward=0.1\n",
             "cppo: error: [rank 1] reward function r.py:score raised RuntimeError: reward server down\n",
             "W1202 10:00:00.123000 77 torch/distributed/elastic/multiprocessing/api.py:900] Sending process 78 "
             "closing signal SIGTERM\n",
             "E1202 10:00:01.000000 77 torch/distributed/elastic/multiprocessing/api.py:874] failed (exitcode: 2)\n",
             "Traceback (most recent call last):\n", "  File \"accelerate\", line 8, in <module>\n",
             "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"]
    out = io.StringIO()
    reported, held = relay(iter(lines), out)
    assert reported and out.getvalue() == "".join(lines[:2]) and held == lines[2:]
    crash = ["Traceback (most recent call last):\n", "ZeroDivisionError: division by zero\n"]
    out = io.StringIO()
    assert relay(iter(crash), out) == (False, []) and out.getvalue() == "".join(crash)  # a crash is shown whole


# --------------------------------------------------------------------------------------------- demo

def test_the_demo_refuses_a_directory_that_holds_what_is_not_its_own(tmp_path, capsys):
    """Checked before any artifact is built: the demo replaces only its own runs/<method>/ and report/."""
    mine = tmp_path / "mine"
    (mine / "runs" / "my_experiment").mkdir(parents=True)
    (mine / "notes.md").write_text("mine")
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    for target, expected in ((mine, "holds what is not the demo's (notes.md, runs/my_experiment)"),
                             (a_file, "is a file, not a directory"), (a_file / "demo", f"{a_file} is a file")):
        refused(["demo", "--quick", "--output-dir", str(target)], capsys, expected, tmp_path)
    from cppo.demo import check_output_dir

    earlier = tmp_path / "earlier"  # a demo's own earlier output is the demo's to replace
    (earlier / "runs" / "cppo").mkdir(parents=True)
    (earlier / "report").mkdir()
    check_output_dir(earlier)
    check_output_dir(tmp_path / "new")


def test_a_sweeps_records_are_verified_when_read_back(finished_sweep, capsys):
    path, out, _ = finished_sweep
    capsys.readouterr()
    trial = out / "trials" / "learning_rate=0.0001-seed1"
    record = json.loads((out / "trials" / f"{trial.name}.json").read_text())
    assert len(record["summary_sha256"]) == 64
    summary = json.loads((trial / "summary.json").read_text())
    summary["reward"]["final_average"] = 99.0  # edited: still JSON, no longer what the trial wrote
    (trial / "summary.json").write_text(json.dumps(summary))
    refused(["sweep", str(path), "--report"], capsys, "does not match the sha256 the sweep recorded", out)
    refused(["sweep", str(path)], capsys, "does not match the sha256 the sweep recorded", out)
    (trial / "summary.json").write_text('{"reward": ')
    refused(["sweep", str(path), "--report"], capsys, "the trial's summary is unreadable (JSONDecodeError)", out)
    (out / "trials" / f"{trial.name}.json").write_bytes(b"\x00" * 16)
    refused(["sweep", str(path), "--report"], capsys, "the trial's record is unreadable", out)
    (out / "trials" / f"{trial.name}.yaml").write_text("seed: [1\n")
    refused(["sweep", str(path), "--report"], capsys, "the trial's config", out)
