import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def cppo_cache(tmp_path_factory):
    """Builtin models are built once per test session, away from the user's cache."""
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
    return str(ROOT / "configs" / "ppo_tiny.yaml")


def quick_overrides(output_dir, steps=2, **extra):
    """Overrides that make configs/ppo_tiny.yaml run in a couple of seconds."""
    values = {"output_dir": str(output_dir), "ppo.steps": steps, "ppo.rollout_batch_size": 8,
              "ppo.mini_batch_size": 4, "ppo.ppo_epochs": 1, "generation.max_new_tokens": 8, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def subprocess_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    return env


PYTHON = sys.executable
