"""The sharded back ends against DDP, each a real 2-process `accelerate launch` on gloo with the shipped
accelerate config. accelerate runs DeepSpeed and FSDP on GPUs only, so these runs set the test-only
switch cppo.distributed.FORCE_ON_CPU_ENV, which builds the requested back end on the CPU.

Tolerances (measured on this model, fp32, after 12 updates over two tasks): the sharded back ends reduce
gradients in buckets or by reduce-scatter, in another summation order than DDP's all-reduce, so their
weights differ from DDP's by rounding: largest difference 7.7e-6 (ZeRO-2), 1.0e-5 (ZeRO-3), 9.9e-6
(FSDP2); asserted ≤ 1e-4. The sampled responses, the rewards and the evaluation matrix S are the same as
DDP's (S to 1e-6). Resuming is exact on every back end (bit-identical weights and metrics).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess

import pytest
import torch
from conftest import PYTHON, ROOT, subprocess_env
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.backends]

CONTINUAL = str(ROOT / "configs" / "continual_tiny.yaml")
# Two tasks of three steps, a checkpoint after every step: enough updates to move S.
RUN = ["tasks.0.steps=3", "tasks.1.steps=3", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2",
       "ppo.learning_rate=1e-3", "generation.max_new_tokens=8", "eval.max_prompts=16", "save_steps=1"]
SHARDED = ["zero2", "zero3", "fsdp2"]
WEIGHT_TOLERANCE = 1e-4
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (scripts/setup.sh --backends)")


def launch(backend: str, out, *extra: str, failpoint: str | None = None, config: str = CONTINUAL):
    env = subprocess_env()
    if failpoint:
        env["CPPO_FAILPOINT"] = failpoint
    if backend == "ddp":
        where = ["--multi_gpu"]
    else:
        env["CPPO_TEST_FORCE_BACKEND_ON_CPU"] = "1"
        where = ["--config_file", str(ROOT / "configs" / "accelerate" / f"{backend}.yaml"), "--mixed_precision", "no"]
    return subprocess.run([PYTHON, "-m", "accelerate.commands.launch", *where, "--num_processes", "2", "-m", "cppo",
                           "train", config, f"output_dir={out}", *RUN, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out, name: str) -> dict[str, torch.Tensor]:
    return load_file(out / "task_2_digits" / name / "model.safetensors")


def largest_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "out"
    result = launch("ddp", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs_deepspeed if b.startswith("zero") else ())
                                     for b in SHARDED])
def test_two_task_cppo_run_matches_ddp_and_resumes_exactly(backend, ddp_run, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = launch(backend, straight)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {"zero2": "deepspeed-zero2", "zero3": "deepspeed-zero3", "fsdp2": "fsdp2"}[backend]
    described = json.loads((straight / "backend.json").read_text())
    assert described["backend"] == expected and described["processes"] == 2
    assert f"backend {expected}, processes 2" in result.stderr

    # The same rollouts, rewards and evaluation matrix as DDP; the weights to the stated tolerance.
    assert [r["reward/mean"] for r in metrics(straight)] == [r["reward/mean"] for r in metrics(ddp_run)]
    s_matrix = json.loads((straight / "eval_matrix.json").read_text())["scores"]["reward"]
    s_ddp = json.loads((ddp_run / "eval_matrix.json").read_text())["scores"]["reward"]
    assert [v for row in s_matrix for v in row] == pytest.approx([v for row in s_ddp for v in row], abs=1e-6)
    assert s_ddp[0] != s_ddp[-1]  # the run moved S: the comparison is not between untrained models
    for name in ("policy", "value_model"):
        difference = largest_difference(weights(straight, name), weights(ddp_run, name))
        assert difference <= WEIGHT_TOLERANCE

    # Killed in the middle of step 4 (the second task), resumed from the step-3 checkpoint: exact.
    assert launch(backend, resumed, failpoint="step:4:mid").returncode != 0
    assert launch(backend, resumed, "--resume").returncode == 0
    for name in ("policy", "value_model"):
        assert largest_difference(weights(straight, name), weights(resumed, name)) == 0.0
    timeless = [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in metrics(resumed)]
    assert timeless == [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))}
                        for r in metrics(straight)]

    # The saved policy is a plain HF directory.
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(straight / "policy").state_dict()
    assert all(torch.equal(policy[k], v) for k, v in weights(straight, "policy").items())
