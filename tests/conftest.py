"""What every test file shares: the offline environment, the configs, one way to run `cppo` in a process of its
own, one metrics reader, one tiny continual run, one "same run" assertion, one "one error line" assertion and
one snapshot of a directory tree."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cppo.launch import with_own_port

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable

TINY = str(ROOT / "configs" / "ppo_tiny.yaml")
CPPO_TINY = str(ROOT / "configs" / "cppo_tiny.yaml")
CONTINUAL = str(ROOT / "configs" / "continual_tiny.yaml")
# `accelerate launch` with two processes (gloo on a CPU); put before the program in `run_cppo(launcher=...)`.
TWO_PROCESSES = ("-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2")
# tests/rank_exit_script.py: `cppo` that records each process's exit code in $RANK_EXIT_DIR/rank_<RANK>.
RANK_EXIT_SCRIPT = (str(ROOT / "tests" / "rank_exit_script.py"),)
# What differs between two runs that trained the same: wall-clock measurements.
TIMING_KEYS = ("time/", "tokens_per_s", "perf/", "vllm/load_s")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def cppo_cache(tmp_path_factory):
    """Builtin models are built once per test session (per worker under pytest-xdist), away from the user's
    cache."""
    path = tmp_path_factory.mktemp("cppo-cache")
    os.environ["CPPO_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each test builds its own Accelerator; accelerate keeps its state in process-wide singletons."""
    from cppo.session import reset_accelerate_state

    yield
    reset_accelerate_state()


@pytest.fixture
def tiny_config():
    return TINY


# ------------------------------------------------------------------------------------------ overrides

def quick_overrides(output_dir, steps=2, **extra) -> list[str]:
    """Overrides that make configs/ppo_tiny.yaml run in a couple of seconds."""
    values = {"output_dir": str(output_dir), "ppo.steps": steps, "ppo.rollout_batch_size": 8,
              "ppo.mini_batch_size": 4, "ppo.ppo_epochs": 1, "generation.max_new_tokens": 8, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def tiny_continual(output_dir, steps=2, **extra) -> list[str]:
    """Overrides that make configs/continual_tiny.yaml (two tasks) run `steps` steps per task, briefly."""
    values = {"output_dir": str(output_dir), "tasks.0.steps": steps, "tasks.1.steps": steps,
              "ppo.rollout_batch_size": 8, "ppo.mini_batch_size": 4, "ppo.ppo_epochs": 1,
              "generation.max_new_tokens": 6, "eval.max_prompts": 8, **extra}
    return [f"{k}={v}" for k, v in values.items()]


# ------------------------------------------------------------------------------------------ processes

def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment, with this checkout first on the import path and no launcher's rank left over."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    env.update(extra)
    return env


def run_cppo(*args: str, launcher: tuple[str, ...] = (), program: tuple[str, ...] = ("-m", "cppo"),
             failpoint: str | None = None, env: dict | None = None, check: bool = True,
             timeout: float = 900) -> subprocess.CompletedProcess:
    """`cppo ARGS` in processes of their own, as a user starts it: `python [LAUNCHER] PROGRAM ARGS`. With
    `check`, the run must exit 0 (the assertion shows the end of its stderr). `failpoint` sets CPPO_FAILPOINT
    (the run kills itself with SIGKILL there: cppo/checkpoint.py)."""
    extra = {**(env or {}), **({"CPPO_FAILPOINT": failpoint} if failpoint else {})}
    command = with_own_port([PYTHON, *launcher, *program, *args])  # never the default port another run may hold
    result = subprocess.run(command, cwd=ROOT, env=subprocess_env(**extra), capture_output=True, text=True,
                            timeout=timeout)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_in_process(args: list[str], capture) -> tuple[int, str]:
    """`cppo ARGS` in this process (no interpreter start-up): its exit code and its stderr, read from
    pytest's `capsys` or `capfd`."""
    from cppo.cli import main

    code = main(args)
    return code, capture.readouterr().err


# ------------------------------------------------------------------------------------------ outputs

def read_metrics(output_dir, timing: bool = True) -> list[dict]:
    """metrics.jsonl's rows; without `timing`, less what measures wall-clock time."""
    rows = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    return rows if timing else [untimed(row) for row in rows]


def untimed(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.startswith(TIMING_KEYS)}


def mean_reward(rows: list[dict]) -> float:
    return sum(r["reward/mean"] for r in rows) / len(rows)


def summary_without_timing(output_dir) -> dict:
    summary = json.loads((Path(output_dir) / "summary.json").read_text())
    summary["final_stats"] = untimed(summary["final_stats"])
    return summary


def saved_weights(output_dir) -> dict[str, Path]:
    """Every model a run saved (task-end and final), by relative path; checkpoints' own files excluded."""
    root = Path(output_dir)
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("model.safetensors"))
            if "checkpoints" not in p.relative_to(root).parts}


def assert_same_run(expected, actual) -> None:
    """Two runs trained the same: bit-identical saved weights, the same metrics (timing aside), the same
    evaluation matrix and summary where the run wrote them."""
    import torch
    from safetensors.torch import load_file

    expected, actual = Path(expected), Path(actual)
    models = saved_weights(expected)
    assert models and sorted(models) == sorted(saved_weights(actual))
    for name, path in models.items():
        a, b = load_file(path), load_file(actual / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    assert read_metrics(expected, timing=False) == read_metrics(actual, timing=False)
    for name in ("eval_matrix.json",):
        if (expected / name).is_file():
            assert json.loads((expected / name).read_text()) == json.loads((actual / name).read_text()), name
    if (expected / "summary.json").is_file():
        assert summary_without_timing(expected) == summary_without_timing(actual)


# ------------------------------------------------------------------------------------------ errors

def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cppo: error:")]


def one_error_line(code: int, err: str, expected: str) -> str:
    """Exit 2, exactly one `cppo: error:` line holding `expected`, no traceback; the line."""
    lines = error_lines(err)
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err, err
    return lines[0]


def snapshot(directory) -> dict[str, str]:
    """Every file's sha256 and every link's target, by relative path: equal snapshots, identical trees."""
    found = {}
    for root, dirs, files in os.walk(directory):
        for name in dirs + files:
            path = os.path.join(root, name)
            key = os.path.relpath(path, directory)
            if os.path.islink(path):
                found[key] = "link:" + os.readlink(path)
            elif os.path.isfile(path):
                with open(path, "rb") as f:
                    found[key] = hashlib.sha256(f.read()).hexdigest()
            else:
                found[key] = "dir"
    return found


# ------------------------------------------------------------------------------------------ kills

class Killed(BaseException):
    """What the SIGKILL of a failpoint becomes in the test process (`killed_at`)."""


def kills_raise(monkeypatch) -> None:
    """A failpoint's SIGKILL of this process raises `Killed` instead (for module-scoped fixtures, which
    cannot use `killed_at`: give them a `pytest.MonkeyPatch()` of their own)."""
    import signal

    real_kill = os.kill

    def kill(pid, sig):
        if pid == os.getpid() and sig == signal.SIGKILL:
            raise Killed(os.environ.get("CPPO_FAILPOINT"))
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)


@pytest.fixture
def killed_at(monkeypatch):
    """`killed_at("step:2:mid")`: the next in-process run stops at that failpoint (cppo/checkpoint.py) by raising
    `Killed` instead of SIGKILL-ing the test process. It leaves the files a kill leaves; only the `finally` blocks
    that a real kill skips (signal handlers put back, the tracker closed) run. The real SIGKILL is tested in
    processes of their own (the `slow` and `long` resume tests)."""
    kills_raise(monkeypatch)

    def at(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv("CPPO_FAILPOINT", raising=False)
        else:
            monkeypatch.setenv("CPPO_FAILPOINT", name)
    return at
