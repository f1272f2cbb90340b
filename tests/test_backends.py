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

import pytest
import torch
from conftest import CONTINUAL, RANK_EXIT_SCRIPT, ROOT, read_metrics, run_cppo
from safetensors.torch import load_file

pytestmark = pytest.mark.backends

# Two tasks of three steps, a checkpoint after every step: enough updates to move S. CPPO's KR acts on the
# rollouts and on the rollout memory of task 1 (built under the back end, its entries in every update's forward).
# Whole sequences and whole logits (ppo.share_prompts: false, ppo.logprob_chunk_size: null): ZeRO-3 and FSDP2 train on
# them in any case, and DDP's and ZeRO-2's shared prompts (the memory's entries share theirs) and chunks would round
# otherwise (test_shared_prompts_under_a_sharded_back_end runs the defaults).
RUN = ["tasks.0.steps=3", "tasks.1.steps=3", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=2",
       "ppo.learning_rate=1e-3", "generation.max_new_tokens=8", "eval.max_prompts=16", "save_steps=1",
       "cppo.kr_source=both", "memory.build_prompts=4", "memory.build_samples=2", "memory.batch_size=3",
       "ppo.share_prompts=false", "ppo.logprob_chunk_size=null"]
SHARDED = ["zero2", "zero3", "fsdp2"]
WEIGHT_TOLERANCE = 1e-4
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="DeepSpeed is not installed (scripts/setup.sh installs it)")
SHARDED_RUNS = [pytest.param(b, marks=needs_deepspeed if b.startswith("zero") else ()) for b in SHARDED]


def launch(backend: str, out, *extra: str, failpoint: str | None = None, force: bool = True,
           precision: str = "no", processes: int = 2):
    # Each process's exit code goes to <out>-exits/rank_<RANK> (the launcher reports only its own).
    env = {"RANK_EXIT_DIR": f"{out}-exits"}
    if backend == "ddp":
        where = ["--multi_gpu"] if processes > 1 else []
    else:
        if force:
            env["CPPO_TEST_FORCE_BACKEND_ON_CPU"] = "1"
        where = ["--config_file", str(ROOT / "configs" / "accelerate" / f"{backend}.yaml")]
    launcher = ("-m", "accelerate.commands.launch", *where, "--mixed_precision", precision,
                "--num_processes", str(processes))
    return run_cppo("train", CONTINUAL, f"output_dir={out}", *RUN, *extra, launcher=launcher,
                    program=RANK_EXIT_SCRIPT, failpoint=failpoint, env=env, check=False)


metrics = read_metrics


def weights(out, name: str) -> dict[str, torch.Tensor]:
    return load_file(out / "task_2_digits" / name / "model.safetensors")


def largest_difference(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def ddp_reference(tmp_path_factory, name: str, *extra: str):
    out = tmp_path_factory.mktemp(name) / "out"
    result = launch("ddp", out, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    return ddp_reference(tmp_path_factory, "ddp")


@pytest.mark.parametrize("backend", SHARDED_RUNS)
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
    # The rollout memory: the entries DDP built, and the same memory term in every update.
    entries = [[json.loads(line)["response_ids"] for line in (out / "task_1_vowels" / "memory.jsonl").open()]
               for out in (straight, ddp_run)]
    assert entries[0] == entries[1] and len(entries[0]) == 8
    assert [r["loss/memory"] for r in metrics(straight)] == pytest.approx(
        [r["loss/memory"] for r in metrics(ddp_run)], rel=1e-4, abs=1e-6)
    assert metrics(ddp_run)[-1]["loss/memory"] > 0
    for name in ("policy", "value_model"):
        difference = largest_difference(weights(straight, name), weights(ddp_run, name))
        assert difference <= WEIGHT_TOLERANCE

    # Killed in the middle of step 4 (the second task), resumed from the step-3 checkpoint: exact.
    assert launch(backend, resumed, failpoint="step:4:mid").returncode != 0
    assert launch(backend, resumed, "--resume").returncode == 0
    for name in ("policy", "value_model"):
        assert largest_difference(weights(straight, name), weights(resumed, name)) == 0.0
    timeless = [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "perf/"))}
                for r in metrics(resumed)]
    assert timeless == [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s", "perf/"))}
                        for r in metrics(straight)]

    # The saved policy is a plain HF directory.
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(straight / "policy").state_dict()
    assert all(torch.equal(policy[k], v) for k, v in weights(straight, "policy").items())


CRITIC_FREE = ["ppo.advantage=grpo", "generation.num_generations=2", "ppo.kl_in=loss", "ppo.share_prompts=false"]


@pytest.fixture(scope="module")
def ddp_critic_free_run(tmp_path_factory):
    return ddp_reference(tmp_path_factory, "ddp_critic_free", *CRITIC_FREE)


@pytest.mark.parametrize("backend", SHARDED_RUNS)
def test_a_critic_free_run_matches_ddp_without_any_value_model(backend, ddp_critic_free_run, tmp_path):
    """GRPO with its KL as a loss term (docs/algorithm.md §9) and the memory term: the back end wraps the policy
    alone."""
    out = tmp_path / "out"
    result = launch(backend, out, *CRITIC_FREE)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = metrics(out), metrics(ddp_critic_free_run)
    assert [r["reward/mean"] for r in ours] == [r["reward/mean"] for r in theirs]
    for key in ("loss/policy", "loss/kl", "loss/memory", "policy/grad_norm"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-4, abs=1e-6), key
    assert "loss/value" not in ours[-1] and theirs[-1]["loss/memory"] > 0
    assert largest_difference(weights(out, "policy"), weights(ddp_critic_free_run, "policy")) <= WEIGHT_TOLERANCE
    for run in (out, ddp_critic_free_run):
        assert not (run / "task_2_digits" / "value_model").exists()


@pytest.mark.parametrize("backend", SHARDED_RUNS)
def test_shared_prompts_under_a_sharded_back_end(backend, ddp_critic_free_run, tmp_path):
    """The defaults: with ppo.share_prompts the generation and the rollout passes share each prompt on every back end,
    and the log-probs come in vocabulary chunks; ZeRO-3 and FSDP2 then train on whole sequences and whole logits (a
    shared prompt's backward, and the chunks', would need weights they have let go), ZeRO-2 shares and chunks in
    training too: the run completes and its first update is that of whole sequences and logits, up to rounding."""
    out = tmp_path / "out"
    # one step a task: the first update is what is compared (its stats do not depend on the steps after it)
    result = launch(backend, out, *CRITIC_FREE[:-1], "ppo.share_prompts=true", "ppo.logprob_chunk_size=1024",
                    "tasks.0.steps=1", "tasks.1.steps=1", "save_steps=0")
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = metrics(out), metrics(ddp_critic_free_run)
    assert ours[0]["reward/mean"] == theirs[0]["reward/mean"]
    for key in ("loss/policy", "policy/grad_norm"):
        assert ours[0][key] == pytest.approx(theirs[0][key], rel=1e-4, abs=1e-6), key
    # k3 of two log-probs that each came by another path: the log-probs' own rounding (~1e-5, docs/results/
    # shared_prompts.md) in absolute terms; seen 6.7e-6 on a KL of 0.055 on one machine, within 5.5e-6 on another
    assert ours[0]["loss/kl"] == pytest.approx(theirs[0]["loss/kl"], abs=2e-5)


LORA_RUN = ["tasks.0.steps=2", "tasks.1.steps=2", "model.lora_r=4", "model.value_lora_r=4",
            "ppo.gradient_accumulation_steps=2",
            "ppo.max_grad_norm=0.5", "ppo.ppo_epochs=1", "ppo.lr_scheduler=linear", "model.gradient_checkpointing=true"]


@pytest.fixture(scope="module")
def ddp_lora_run(tmp_path_factory):
    return ddp_reference(tmp_path_factory, "ddp_lora", *LORA_RUN)


@pytest.mark.parametrize("backend", SHARDED_RUNS)
def test_lora_gradient_accumulation_and_clipping_match_ddp(backend, ddp_lora_run, tmp_path):
    """Two micro-batches per process and update (DeepSpeed would step at each one unless told), the
    gradient clipped to 0.5 (inside DeepSpeed's step), a decaying learning rate (cppo's schedule on
    DeepSpeed's optimiser), LoRA adapters on policy and critic initialised at load time (each process must
    start from the same ones), gradient checkpointing, merged models saved from sharded weights."""
    out = tmp_path / "out"
    result = launch(backend, out, *LORA_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = metrics(out), metrics(ddp_lora_run)
    for key in ("reward/mean", "kl/mean", "loss/policy", "loss/value", "policy/grad_norm", "lr"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-4, abs=1e-6), key
    for name in ("policy", "value_model"):
        assert largest_difference(weights(out, name), weights(ddp_lora_run, name)) <= WEIGHT_TOLERANCE
    assert (out / "task_2_digits" / "policy_adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("backend", SHARDED_RUNS)
def test_bf16_reference_computes_as_the_policy(backend, tmp_path):
    """Under bf16 the sharded back ends hold the policy's weights in bf16; the frozen reference must
    compute the same way, so that the first step's KL between two identical models is exactly 0."""
    out = tmp_path / "out"
    result = launch(backend, out, "tasks.0.steps=1", "tasks.1.steps=1", "eval.max_prompts=2", precision="bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "backend.json").read_text())["mixed_precision"] == "bf16"
    first = metrics(out)[0]
    assert first["kl/mean"] == 0.0 and first["reward/mean"] > 0


@pytest.mark.parametrize("backend", ["zero3", "fsdp2"])
def test_a_sharded_back_end_that_cannot_take_effect_is_a_one_line_error(backend, tmp_path):
    """On a machine without GPUs accelerate would run plain DDP under a DeepSpeed or FSDP config. (One DeepSpeed
    stage: the check reads accelerate's distributed type, the same for every stage.)"""
    out = tmp_path / "out"
    result = launch(backend, out, force=False)
    exits = [(tmp_path / "out-exits" / f"rank_{r}") for r in (0, 1)]
    assert [e.read_text() if e.is_file() else None for e in exits] == ["2", "2"], result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cppo: error")]
    assert len(errors) == 1 and "needs GPUs and none is visible" in errors[0] and "silently" in errors[0]
    assert "[rank0]" not in result.stderr  # no traceback
    assert not out.exists()


@pytest.mark.parametrize(("setting", "message"), [
    (("fsdp_version: 2", "fsdp_version: 1"), "fsdp1 is not supported"),
    (("fsdp_cpu_ram_efficient_loading: false", "fsdp_cpu_ram_efficient_loading: true"),
     "fsdp_cpu_ram_efficient_loading true leaves every model but rank 0's empty"),
])
def test_fsdp_settings_cppo_cannot_run_are_refused_with_one_line(setting, message, tmp_path):
    config = tmp_path / "fsdp.yaml"
    config.write_text((ROOT / "configs" / "accelerate" / "fsdp2.yaml").read_text().replace(*setting))
    out = tmp_path / "out"
    env = {"CPPO_TEST_FORCE_BACKEND_ON_CPU": "1", "RANK_EXIT_DIR": str(tmp_path / "exits")}
    launcher = ("-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2")
    result = run_cppo("train", CONTINUAL, f"output_dir={out}", *RUN, env=env, check=False, program=RANK_EXIT_SCRIPT,
                      launcher=launcher)
    exit_file = tmp_path / "exits" / "rank_0"
    assert exit_file.is_file() and exit_file.read_text() == "2", result.stderr[-3000:]
    assert message in result.stderr and not out.exists()


@pytest.mark.parametrize(("launcher", "configured", "effective"), [("bf16", None, "bf16"), ("bf16", "no", "no")])
def test_mixed_precision_left_unset_follows_the_accelerate_config(launcher, configured, effective, tmp_path):
    out = tmp_path / "out"
    extra = ["tasks.0.steps=1", "tasks.1.steps=1", "eval.max_prompts=2"]
    if configured is not None:
        extra.append(f"mixed_precision={configured}")
    result = launch("ddp", out, *extra, precision=launcher, processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "backend.json").read_text())["mixed_precision"] == effective


@pytest.mark.parametrize(("backend", "settings", "message"), [
    pytest.param("zero3", ["continual.regularizer=ewc"], "continual.regularizer ewc", marks=needs_deepspeed),
    ("fsdp2", ["continual.regularizer=ewc"], "continual.regularizer ewc"),
    ("fsdp2", ["continual.regularizer=lwf", "model.lora_r=4"], "continual.regularizer lwf with model.lora_r 4"),
])
def test_what_sharded_weights_cannot_do_is_refused_with_one_line(backend, settings, message, tmp_path):
    out = tmp_path / "out"
    result = launch(backend, out, *settings)
    assert (tmp_path / "out-exits" / "rank_0").read_text() == "2"
    errors = [line for line in result.stderr.splitlines() if line.startswith("cppo: error")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert not out.exists()


@needs_deepspeed
def test_ewc_under_zero2_matches_ddp(tmp_path):
    """EWC's importance is sampled on each process's share of prompts (different counts per process, no
    collective inside) and its penalty acts on ZeRO-2's whole weights."""
    extra = ["tasks.0.steps=2", "tasks.1.steps=2", "continual.regularizer=ewc", "continual.importance_samples=3"]
    ddp, zero2 = tmp_path / "ddp", tmp_path / "zero2"
    assert launch("ddp", ddp, *extra).returncode == 0
    result = launch("zero2", zero2, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    for key in ("reward/mean", "loss/reg"):
        assert [r[key] for r in metrics(zero2)] == pytest.approx([r[key] for r in metrics(ddp)], rel=1e-4, abs=1e-6)
    assert metrics(zero2)[-1]["loss/reg"] > 0  # the penalty acted in the second task
    s = [json.loads((out / "eval_matrix.json").read_text())["scores"]["reward"] for out in (zero2, ddp)]
    assert [v for row in s[0] for v in row] == pytest.approx([v for row in s[1] for v in row], abs=1e-6)
