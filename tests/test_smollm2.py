"""The real SmolLM2-135M-Instruct (`builtin:smollm2-135m`, a Llama-architecture chat model): chat prompts,
`<|im_end|>` ending responses, rollout and training log-probs that agree (full and LoRA), and a two-task CPPO
run with LoRA whose saved, merged policy computes as the base with its adapter and which, killed and resumed,
ends bit-identical. Minutes on two CPU cores: the `long` step."""

import json
import math
import signal

import pytest
import torch
from conftest import ROOT, read_metrics, run_cppo
from safetensors.torch import load_file

from cppo.config_loading import load_config
from cppo.continual import build_trainer
from cppo.models import resolve_model_source

pytestmark = pytest.mark.long

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
        logprobs, *_ = trainer.model(mb.input_ids, mb.attention_mask, mb.response_ids,
                                     trainer.config.generation.temperature)
    gap = ((logprobs - mb.old_logprobs).abs() * mb.response_mask).max()
    assert gap < 1e-4, f"training and rollout log-probs differ by {gap:.2e} nats"


def train_cli(out, *extra, failpoint=None, check=True):
    return run_cppo("train", CONFIG, *overrides(out), "tasks.0.steps=1", "tasks.1.steps=1", *extra,
                    failpoint=failpoint, check=check)


def test_sigkill_and_resume_with_lora_is_bit_identical_and_the_saved_policy_is_the_merged_adapter(tmp_path, smollm2):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_cli(straight)
    rows = read_metrics(straight)
    assert len(rows) == 2 and all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    assert all(sum(r[f"cppo/frac_r{j}"] for j in range(1, 6)) == pytest.approx(1.0) for r in rows)
    # task 1's saved policy is the plain checkpoint its base and its adapter make together
    task = straight / "task_1_words"
    assert (task / "policy_adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(task / "policy").eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    tokenizer = AutoTokenizer.from_pretrained(task / "policy")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "How many days are there in a week?"}],
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(smollm2).eval()
        base_logits = base(ids).logits
        adapted = PeftModel.from_pretrained(base, task / "policy_adapter").eval()
        # W + BA in one matrix against W·x + B(A·x): float32 rounding (seen up to 1.2e-4), far below what the
        # training moved the logits.
        rounding = (merged(ids).logits - adapted(ids).logits).abs().max()
        moved = (adapted(ids).logits - base_logits).abs().max()
        assert rounding < 1e-3 and moved > 20 * rounding, (rounding, moved)
    # killed between the rollout and the update of the second task's step: resumed across the boundary
    killed = train_cli(resumed, failpoint="step:2:mid", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    train_cli(resumed, "--resume")
    for name in ("task_1_words/policy", "task_2_numerals/policy", "task_2_numerals/policy_adapter",
                 "task_2_numerals/value_model"):
        weights = "adapter_model.safetensors" if name.endswith("adapter") else "model.safetensors"
        a, b = load_file(straight / name / weights), load_file(resumed / name / weights)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name} differs"
    matrix = [json.loads((d / "eval_matrix.json").read_text()) for d in (straight, resumed)]
    assert matrix[0] == matrix[1]
