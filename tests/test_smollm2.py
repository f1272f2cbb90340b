"""The real SmolLM2-135M-Instruct (`builtin:smollm2-135m`, a Llama-architecture chat model): chat prompts,
`<|im_end|>` ending responses, rollout and training log-probs that agree (full and LoRA), short PPO
and CPPO runs whose saved, merged policy reloads and answers the same, and exact resume with LoRA."""

import json
import signal
import subprocess

import pytest
import torch
from conftest import PYTHON, ROOT, subprocess_env
from safetensors.torch import load_file

from cppo.config import load_config
from cppo.continual import build_trainer
from cppo.models import resolve_model_source

pytestmark = pytest.mark.slow

CONFIG = str(ROOT / "configs" / "smollm2_lora.yaml")
NUMERIC = "configs/data/smollm2/numeric_train.jsonl"
# One optimiser step per PPO step on 4 prompts with short answers: seconds per step on 2 cores.
SMALL = {"ppo.rollout_batch_size": 4, "ppo.mini_batch_size": 4, "ppo.ppo_epochs": 1,
         "generation.max_new_tokens": 16, "eval.max_prompts": 2, "eval.max_new_tokens": 8}


def overrides(output_dir, **extra):
    return [f"{k}={v}" for k, v in {"output_dir": str(output_dir), **SMALL, **extra}.items()]


@pytest.fixture(scope="module")
def smollm2(cppo_cache):
    return resolve_model_source("builtin:smollm2-135m", "model.policy")


def greedy_answer(model, tokenizer, question, max_new_tokens=12):
    from transformers import GenerationConfig

    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        out = model.generate(**ids, generation_config=config)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_builtin_is_a_standard_hf_chat_checkpoint(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((ROOT / smollm2 / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert "Paris" in greedy_answer(model, tokenizer, "What is the capital of France?")
    model.save_pretrained(tmp_path / "again")  # a model loaded from it saves like any other


@pytest.mark.parametrize("lora_r", [0, 16])
def test_chat_rollout_stops_at_im_end_and_training_logprobs_match_the_rollout(tmp_path, smollm2, lora_r):
    # Short factual answers at a low temperature: most responses end with <|im_end|> well within 32 tokens.
    trainer = build_trainer(load_config(CONFIG, overrides(
        tmp_path / "out", **{"model.lora_r": lora_r, "tasks.0.prompts.path": NUMERIC, "ppo.rollout_batch_size": 8,
                             "ppo.mini_batch_size": 8, "generation.max_new_tokens": 32,
                             "generation.temperature": 0.3})))
    prompts = trainer.stage.prompts
    assert all(t.startswith("<|im_start|>system\n") and t.endswith("<|im_start|>assistant\n") for t in prompts.texts)
    batch, _ = trainer.make_rollout()
    eos = trainer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert trainer.stop_token_ids == [eos]
    lengths = batch.response_mask.sum(-1)
    assert batch.stopped.any(), trainer.tokenizer.batch_decode(batch.response_ids)
    for row in batch.stopped.nonzero().flatten().tolist():  # a stopped response ends with <|im_end|>, masked after
        assert batch.response_ids[row, lengths[row] - 1] == eos
        assert (batch.response_ids[row, :lengths[row] - 1] != eos).all()
    trainer.model.train()
    rows = torch.arange(len(lengths))
    mb = batch.select(rows)
    with torch.no_grad():
        logits, _ = trainer.model(mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])
    from cppo.core import logprobs_from_logits

    logprobs = logprobs_from_logits(logits, mb.response_ids, trainer.config.generation.temperature)
    gap = ((logprobs - mb.old_logprobs).abs() * mb.response_mask).max()
    assert gap < 1e-4, f"training and rollout log-probs differ by {gap:.2e} nats"


@pytest.mark.parametrize("algo", ["ppo", "cppo"])
def test_two_steps_then_the_saved_merged_policy_answers_the_same(tmp_path, smollm2, algo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer = build_trainer(load_config(CONFIG, overrides(tmp_path / "out", algo=algo, **{"tasks.0.steps": 2})))
    stats = trainer.train()
    assert trainer.step_in_stage == 2 and all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    if algo == "cppo":
        assert sum(stats[f"cppo/frac_r{j}"] for j in range(1, 6)) == pytest.approx(1.0)
    saved = trainer.stage.output_dir
    assert (saved / "policy_adapter" / "adapter_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(saved / "policy").eval()
    assert not any("lora" in name for name, _ in reloaded.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(saved / "policy")
    policy = trainer.unwrapped.policy.eval()
    for question in ("How many days are there in a week?", "Why is the sky blue?"):
        assert greedy_answer(reloaded, tokenizer, question) == greedy_answer(policy, tokenizer, question)


def train_cli(out, *extra, env_extra=None):
    env = subprocess_env()
    env.update(env_extra or {})
    return subprocess.run([PYTHON, "-m", "cppo", "train", CONFIG, *overrides(out), "tasks.0.steps=1",
                           "tasks.1.steps=1", *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_sigkill_and_resume_with_lora_is_bit_identical(tmp_path, smollm2):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train_cli(straight)
    assert result.returncode == 0, result.stderr[-3000:]
    # killed between the rollout and the update of the second task's step: resumed across the boundary
    killed = train_cli(resumed, env_extra={"CPPO_FAILPOINT": "step:2:mid"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    result = train_cli(resumed, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("task_1_words/policy", "task_2_numerals/policy", "task_2_numerals/policy_adapter",
                 "task_2_numerals/value_model"):
        weights = "adapter_model.safetensors" if name.endswith("adapter") else "model.safetensors"
        a, b = load_file(straight / name / weights), load_file(resumed / name / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    matrix = [json.loads((d / "eval_matrix.json").read_text()) for d in (straight, resumed)]
    assert matrix[0] == matrix[1]
