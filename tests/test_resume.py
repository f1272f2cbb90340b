"""Exact resume: a run killed anywhere and resumed ends bit-identical to one that ran straight (in processes of
their own, killed for real); what resume refuses, keeps and writes (in this process, `killed_at`)."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import (
    CONTINUAL,
    PYTHON,
    ROOT,
    TWO_PROCESSES,
    Killed,
    assert_same_run,
    error_lines,
    read_metrics,
    run_cppo,
    run_in_process,
    subprocess_env,
    summary_without_timing,
)

from cppo.cli import main
from cppo.session import reset_accelerate_state

# Two tasks of 8 steps, a checkpoint every 3 steps (and at each task end).
SETTINGS = ["tasks.0.steps=8", "tasks.1.steps=8", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
            "ppo.ppo_epochs=2", "generation.max_new_tokens=8", "eval.max_prompts=16", "save_steps=3",
            "save_total_limit=null", "continual.regularizer=ewc", "continual.importance_samples=4",
            "tasks.0.reward.normalize=running"]
# The same run, two steps a task: what the in-process tests of resume's bookkeeping train.
SHORT = [*SETTINGS, "tasks.0.steps=2", "tasks.1.steps=2"]


def train(out, *extra, failpoint=None, check=True):
    return run_cppo("train", CONTINUAL, f"output_dir={out}", *SETTINGS, *extra, failpoint=failpoint, check=check)


def train_here(out, *extra, capsys=None):
    """The short run in this process; with `capsys`, (exit code, stderr)."""
    args = ["train", CONTINUAL, f"output_dir={out}", *SHORT, *extra]
    try:
        return run_in_process(args, capsys) if capsys is not None else main(args)
    finally:
        reset_accelerate_state()


def killed_here(killed_at, out, failpoint, *extra):
    killed_at(failpoint)
    with pytest.raises(Killed):
        train_here(out, *extra)
    killed_at(None)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    train(out)
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 17))
    return out


@pytest.mark.long
@pytest.mark.parametrize("failpoint", [
    "step:5:mid",  # between the rollout and the update of a step
    "checkpoint:step_00000006:before_rename",  # a checkpoint fully written but not yet in place
    "task_end:vowels",  # task 1 trained, saved and evaluated; its task-end checkpoint not written
    "step:10:mid",  # in task 2, after a task boundary
])
def test_sigkill_then_resume_is_bit_identical(tmp_path, straight, failpoint):
    out = tmp_path / "run"
    killed = train(out, failpoint=failpoint, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    # the killed run's staging directory is never taken for a checkpoint
    assert all(not p.name.startswith(".staging") for p in (out / "checkpoints").iterdir()
               if p.name.startswith("step_"))
    resumed = train(out, "--resume")
    assert "after digits" in resumed.stdout
    assert_same_run(straight, out)


@pytest.mark.long
def test_a_run_killed_after_its_last_step_resumes_with_the_same_summary(tmp_path):
    """The newest checkpoint is the last step's (save_steps divides it), the kill comes before the task-end
    checkpoint: the resumed run has no step left to train, and its summary still holds the last step's stats."""
    short = ["tasks.0.steps=2", "tasks.1.steps=2", "save_steps=2"]
    straight_out, out = tmp_path / "straight", tmp_path / "run"
    train(straight_out, *short)
    killed = train(out, *short, failpoint="task_end:digits", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    train(out, *short, "--resume")
    assert summary_without_timing(out)["final_stats"], "the resumed run's summary lost the last step's stats"
    assert summary_without_timing(out) == summary_without_timing(straight_out)


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, straight):
    out = tmp_path / "run"
    train(out, failpoint="step:11:mid", check=False)
    newest = sorted((out / "checkpoints").glob("step_*"))[-1]
    assert newest.name == "step_00000009"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    resumed = train(out, "--resume")
    assert "skipping corrupt checkpoint" in resumed.stderr and "step_00000009" in resumed.stderr
    assert_same_run(straight, out)


@pytest.mark.slow
def test_sigterm_saves_exits_0_and_resumes_exactly(tmp_path, straight):
    out = tmp_path / "run"
    process = subprocess.Popen([PYTHON, "-m", "cppo", "train", CONTINUAL, f"output_dir={out}", *SETTINGS],
                               cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    assert "Resume with: cppo train <config> --resume" in stderr
    stopped_at = len(metrics.read_text().splitlines())
    assert 4 <= stopped_at < 16
    assert (out / "checkpoints" / f"step_{stopped_at:08d}").is_dir()  # saved right after the current step
    train(out, "--resume")
    assert_same_run(straight, out)


@pytest.mark.slow
def test_two_process_run_resumes_exactly(tmp_path):
    """Under `accelerate launch` (gloo on CPU): each process's RNG and the gathered statistics resume."""
    args = ["tasks.0.steps=2", "tasks.1.steps=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
            "eval.max_prompts=8", "save_steps=1", "continual.regularizer=ewc", "continual.importance_samples=4"]

    def launch(out, *extra, failpoint=None):
        return run_cppo("train", CONTINUAL, f"output_dir={out}", *args, *extra, launcher=TWO_PROCESSES,
                        failpoint=failpoint, check=False)

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert launch(straight).returncode == 0
    assert launch(resumed, failpoint="step:3:mid").returncode != 0
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]
    assert launch(resumed, "--resume").returncode == 0
    assert_same_run(straight, resumed)


@pytest.mark.slow
def test_wandb_run_continues_after_resume(tmp_path):
    out = tmp_path / "run"
    extra = ["tasks.0.steps=2", "tasks.1.steps=2", "save_steps=1", "report_to=[wandb]"]
    env = {"WANDB_MODE": "offline"}
    run_cppo("train", CONTINUAL, f"output_dir={out}", *SETTINGS, *extra, env=env, failpoint="step:3:mid",
             check=False)
    run_cppo("train", CONTINUAL, f"output_dir={out}", *SETTINGS, *extra, "--resume", env=env)
    runs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name.split("-")[-1] == runs[1].name.split("-")[-1]
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]


# ------------------------------------------------------------------ resume's bookkeeping, in this process

def test_changed_config_is_refused_unless_forced(tmp_path, killed_at, capsys):
    out = tmp_path / "run"
    killed_here(killed_at, out, "step:2:mid", "save_steps=1")
    code, err = train_here(out, "save_steps=1", "ppo.learning_rate=1e-3", "seed=7", "--resume", capsys=capsys)
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1, err
    assert "ppo.learning_rate" in lines[0] and "seed" in lines[0] and "--force" in lines[0]
    # reporting and saving fields may change
    killed_here(killed_at, out, "step:3:mid", "save_steps=2", "logging_steps=5", "--resume")
    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"differs .* in: ppo\.learning_rate; resuming anyway \(--force\)"):
        code, err = train_here(out, "ppo.learning_rate=1e-3", "--resume", "--force", capsys=capsys)
    assert code == 0, err
    assert (out / "summary.json").is_file()


def test_resume_errors(tmp_path, killed_at, capsys):
    out = tmp_path / "run"
    code, err = train_here(out, "--resume", capsys=capsys)
    assert code == 2 and "no checkpoint to resume from" in err
    killed_here(killed_at, out, "task_end:digits", "tasks.0.steps=1", "tasks.1.steps=1")
    for checkpoint in (out / "checkpoints").glob("step_*"):
        (checkpoint / "manifest.json").write_text("not json")
    capsys.readouterr()
    code, err = train_here(out, "tasks.0.steps=1", "tasks.1.steps=1", "--resume", capsys=capsys)
    assert code == 2 and "no valid checkpoint" in err
    code, err = train_here(out, "--resume", str(tmp_path / "nowhere"), capsys=capsys)
    assert code == 2 and "checkpoint directory not found" in err


def test_save_total_limit_keeps_the_newest(tmp_path):
    out = tmp_path / "run"
    assert train_here(out, "tasks.0.steps=3", "tasks.1.steps=3", "save_steps=1", "save_total_limit=2") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000005", "step_00000006"]
    assert (out / "task_1_vowels" / "policy" / "config.json").is_file()  # task-end policies stay


def test_checkpoint_files_and_manifest(tmp_path, killed_at):
    from cppo.checkpoint import verify

    out = tmp_path / "run"
    killed_here(killed_at, out, "step:2:mid", "save_steps=1")
    checkpoint = out / "checkpoints" / "step_00000001"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_0.pt", "regularizer.pt", "state.json",
            "manifest.json"} <= names
    assert verify(checkpoint) is None
    state = json.loads((checkpoint / "state.json").read_text())
    assert state["global_step"] == 1 and state["stage_index"] == 0 and not state["stage_complete"]
    assert state["trainer"]["prompt_stream"]["task"] == "vowels" and len(state["trainer"]["prompt_stream"][
        "fingerprint"]) == 64
    assert state["matrix"]["row_names"] == ["initial"]
    (checkpoint / "state.json").write_text(" " + (checkpoint / "state.json").read_text())
    assert "state.json does not match" in verify(checkpoint)
    assert os.path.exists(out / "task_1_vowels") is False  # killed before the first task ended


def test_files_in_subdirectories_of_a_checkpoint_are_hashed(tmp_path):
    """DeepSpeed and FSDP2 write each process's shard into a subdirectory of the checkpoint: those files
    are in the manifest too, so a damaged shard is found before a resume loads it."""
    from cppo.checkpoint import CheckpointWriter, verify

    class OneProcess:
        is_main_process = True

        def wait_for_everyone(self):
            pass

    with CheckpointWriter(OneProcess(), tmp_path, 7) as staging:
        (staging / "state.json").write_text("{}")
        (staging / "deepspeed").mkdir()
        (staging / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"shard of rank 1")
    checkpoint = tmp_path / "checkpoints" / "step_00000007"
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt" in manifest and verify(checkpoint) is None
    (checkpoint / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"shard of rank 0")
    assert verify(checkpoint) == ("deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt does not match the sha256 it "
                                  "was saved with")
