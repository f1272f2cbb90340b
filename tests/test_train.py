"""End-to-end behaviour of `cppo train` on the tiny offline model: learning, outputs, errors."""

import json
import math
import textwrap

import pytest
import torch
from conftest import (
    TINY,
    TWO_PROCESSES,
    error_lines,
    mean_reward,
    quick_overrides,
    read_metrics,
    run_cppo,
    run_in_process,
)


@pytest.mark.slow
def test_ppo_tiny_learns_and_saves_a_loadable_policy(tmp_path, tiny_config):
    out = tmp_path / "run"
    result = run_cppo("train", tiny_config, f"output_dir={out}")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 41))
    required = {"step", "reward/mean", "kl/mean", "loss/policy", "loss/value", "policy/clipfrac",
                "policy/approx_kl", "time/step_s", "time/generate_s", "tokens_per_s"}
    assert required <= set(rows[0])
    first, last = mean_reward(rows[:5]), mean_reward(rows[-5:])
    assert last > first + 0.3, (first, last)
    # not a TTY: plain progress lines
    assert "step 40/40" in result.stderr

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    policy = AutoModelForCausalLM.from_pretrained(out / "policy")
    tokenizer = AutoTokenizer.from_pretrained(out / "policy")
    prompt = tokenizer(["describe the cat:"], return_tensors="pt")
    generated = policy.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    # the trained policy answers mostly in vowels
    assert sum(c in "aeiou" for c in text) / max(len(text), 1) > 0.5, text
    critic = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert critic.config.num_labels == 1
    saved = (out / "config.yaml").read_text()
    assert "vowel_fraction" in saved and "learning_rate: 0.0003" in saved


def run_cli(args, capsys):
    return run_in_process(["train", *args], capsys)


def reward_module(tmp_path, body):
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent(body))
    return f"{path}:score"


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "missing_model", "missing_data", "not_importable",
                                  "no_function", "wrong_length", "nan", "bad_stop_token"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_config, capsys, case):
    out = tmp_path / "out"
    bodies = {"wrong_length": "def score(p, c): return [1.0]",
              "nan": "def score(p, c): return [float('nan')] * len(c)"}
    module = reward_module(tmp_path, bodies.get(case, "def score(p, c): return [0.0] * len(c)"))
    extra = {
        "unknown_key": ["ppo.learning_rat=1"],
        "wrong_type": ["ppo.steps=ten"],
        "missing_model": [f"model.policy={tmp_path}/no/such/model"],
        "missing_data": [f"tasks.0.prompts.path={tmp_path}/missing.jsonl"],
        "not_importable": ["tasks.0.reward.function=no_such_module_xyz:score"],
        "no_function": ["tasks.0.reward.function=cppo.toy:no_such_function"],
        "wrong_length": [f"tasks.0.reward.function={module}"],
        "nan": [f"tasks.0.reward.function={module}"],
        "bad_stop_token": ["generation.stop_token=not-a-token"],
    }[case]
    expected = {
        "unknown_key": "unknown config key 'ppo.learning_rat'",
        "wrong_type": "ppo.steps must be an integer, got 'ten'",
        "missing_model": "model.policy: model directory",
        "missing_data": "tasks[0].prompts.path: file not found",
        "not_importable": "reward.function: cannot import 'no_such_module_xyz'",
        "no_function": "has no callable 'no_such_function'",
        "wrong_length": "returned 1 scores for 8 completions",
        "nan": "step 1: reward function",
        "bad_stop_token": "generation.stop_token must be",
    }[case]
    code, err = run_cli([tiny_config, *quick_overrides(out), *extra], capsys)
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err
    assert not out.exists()


def test_reward_model_value_init_and_local_jsonl_prompts(tmp_path, tiny_config, capsys):
    """A sequence-classification reward model scores rollouts and seeds the critic; prompts from a file."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cppo.models import resolve_model_source

    tiny = resolve_model_source("builtin:tiny-gpt2", "model.policy")
    torch.manual_seed(1)
    reward_model = AutoModelForSequenceClassification.from_pretrained(tiny, num_labels=1)
    reward_dir = tmp_path / "models" / "reward"
    reward_model.save_pretrained(reward_dir)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(reward_dir)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": f"prompt number {i}:", "id": i}) + "\n" for i in range(20)))

    out = tmp_path / "out"
    code, err = run_cli([tiny_config, *quick_overrides(out), "tasks.0.reward.function=null",
                         f"tasks.0.reward.model={reward_dir}", "model.value_init=reward_model",
                         f"tasks.0.prompts.path={prompts}", "tasks.0.prompts.prompt_field=text"], capsys)
    assert code == 0, err
    rows = read_metrics(out)
    assert len(rows) == 2 and all(math.isfinite(r["reward/mean"]) for r in rows)
    # the critic started as the reward model: same head weights before training moved them a little
    critic = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert torch.allclose(critic.score.weight, reward_model.score.weight, atol=0.05)
    assert not torch.equal(critic.score.weight, reward_model.score.weight)


def test_missing_prompt_column_is_reported(tmp_path, tiny_config, capsys):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("question\nhello\n")
    code, err = run_cli([tiny_config, *quick_overrides(tmp_path / "out"), f"tasks.0.prompts.path={prompts}"], capsys)
    assert code == 2 and "column 'prompt' not in" in err


def test_lora_policy_uses_the_base_as_reference_and_saves_merged(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    code, err = run_cli([tiny_config, *quick_overrides(out), "model.lora_r=4"], capsys)
    assert code == 0, err
    rows = read_metrics(out)
    assert rows[0]["kl/mean"] == pytest.approx(0.0, abs=1e-5)  # adapters start at zero: policy == reference
    assert (out / "task_1_vowels" / "policy_adapter" / "adapter_config.json").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert not any("lora" in name for name, _ in merged.named_parameters())


def test_lora_critic_trains_adapters_and_its_head_and_saves_a_plain_critic(tmp_path, tiny_config, capsys):
    from transformers import AutoModelForSequenceClassification

    from cppo.config_loading import load_config
    from cppo.continual import build_trainer
    from cppo.session import reset_accelerate_state

    out = tmp_path / "out"
    trainer = build_trainer(load_config(tiny_config, [*quick_overrides(tmp_path / "probe"), "model.value_lora_r=4"]))
    trainable = [n for n, p in trainer.unwrapped.value_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".score." in n for n in trainable)
    assert any(".score." in n for n in trainable)  # the scalar head trains whole
    before = trainer.unwrapped.value_model.get_base_model().score.modules_to_save["default"].weight.detach().clone()
    trainer.step()
    after = trainer.unwrapped.value_model.get_base_model().score.modules_to_save["default"].weight
    assert not torch.equal(before, after)
    del trainer
    reset_accelerate_state()

    code, err = run_cli([tiny_config, *quick_overrides(out), "model.value_lora_r=4"], capsys)
    assert code == 0, err
    critic = AutoModelForSequenceClassification.from_pretrained(out / "value_model")
    assert not any("lora" in name or "modules_to_save" in name for name, _ in critic.named_parameters())


def test_trackers_wandb_offline_and_tensorboard(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "out"
    code, err = run_cli([tiny_config, *quick_overrides(out), "report_to=[wandb,tensorboard]"], capsys)
    assert code == 0, err
    assert list((out / "wandb").glob("offline-run-*")), "no offline wandb run"
    assert list(out.rglob("events.out.tfevents.*")), "no tensorboard event file"


def test_gradient_accumulation_gives_the_same_gradient(tmp_path, tiny_config):
    """Token-weighted means are normalised over the whole mini-batch: splitting it into micro-batches
    changes the arithmetic order only, not the gradient."""
    from cppo.config_loading import load_config
    from cppo.continual import build_trainer

    gradients = []
    for accumulation in (1, 4):
        overrides = quick_overrides(tmp_path / f"a{accumulation}", steps=1,
                                    **{"ppo.gradient_accumulation_steps": accumulation, "ppo.mini_batch_size": 8,
                                       "ppo.max_grad_norm": "null"})
        trainer = build_trainer(load_config(tiny_config, overrides))
        step = trainer.optimizer.step

        def record_then_step(*args, _step=step, _trainer=trainer, **kwargs):
            gradients.append(torch.cat([p.grad.flatten() for p in _trainer.unwrapped.parameters()]))
            return _step(*args, **kwargs)

        trainer.optimizer.step = record_then_step
        trainer.step()
    assert len(gradients) == 2 and gradients[0].abs().sum() > 0
    torch.testing.assert_close(gradients[0], gradients[1], atol=1e-6, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "cppo"])
def test_two_process_launch_trains_and_only_rank_0_writes(tmp_path, tiny_config, algo):
    out = tmp_path / "out"
    result = run_cppo("train", tiny_config, *quick_overrides(out, steps=3), f"algo={algo}", launcher=TWO_PROCESSES)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert result.stderr.count("step 3/3") == 1


def test_hub_name_that_cannot_be_reached_is_a_one_line_error(tmp_path, tiny_config, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, err = run_cli([tiny_config, *quick_overrides(tmp_path / "out"), "model.policy=no-such-org/no-such-model"],
                        capsys)
    assert code == 2 and "cannot load" in err and "no-such-org/no-such-model" in err
    assert not (tmp_path / "out").exists()


def test_adaptive_kl_moves_the_coefficient(tmp_path, tiny_config, capsys):
    out = tmp_path / "out"
    code, err = run_cli([tiny_config, *quick_overrides(out, steps=3), "ppo.target_kl=0.001", "ppo.kl_horizon=100",
                         "ppo.learning_rate=1e-3"], capsys)
    assert code == 0, err
    rows = read_metrics(out)
    coefs = [r["kl/coef"] for r in rows]
    assert coefs[0] == pytest.approx(0.01)
    # step 1 has KL 0 (policy = reference): the coefficient drops by the clipped 20% × 8/100
    assert coefs[1] == pytest.approx(0.01 * (1 - 0.2 * 8 / 100))
    # afterwards it follows the controller on the logged sequence KL (above target here: it grows)
    assert rows[1]["kl/mean"] > 0.0012
    assert coefs[2] == pytest.approx(coefs[1] * (1 + 0.2 * 8 / 100))


def test_score_processing_order():
    """normalise → subtract the missing-EOS penalty → clip (documented in RewardConfig)."""
    from cppo.config import RewardConfig
    from cppo.rewards import RunningMoments, process_scores

    cfg = RewardConfig(function="m:f", normalize="batch", clip=1.0, missing_eos_penalty=0.5)
    raw = torch.tensor([1.0, 2.0, 3.0, 10.0])
    stopped = torch.tensor([True, False, True, True])
    scores = process_scores(raw, stopped, cfg, RunningMoments(), has_stop_token=True)
    z = (raw - raw.mean()) / raw.std()
    expected = (z - 0.5 * torch.tensor([0.0, 1.0, 0.0, 0.0])).clamp(-1, 1)
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=0)
    assert torch.equal(process_scores(raw, stopped, cfg, RunningMoments(), has_stop_token=False),
                       z.clamp(-1, 1))
    cfg.normalize = "running"
    moments = RunningMoments()
    process_scores(raw, stopped, cfg, moments, True)
    process_scores(raw + 4, stopped, cfg, moments, True)
    both = torch.cat([raw, raw + 4])
    assert moments.count == 8
    assert moments.mean == pytest.approx(both.mean().item())
    assert moments.std == pytest.approx(both.std().item(), rel=1e-6)


def test_without_a_stop_token_responses_run_to_full_length(cppo_cache):
    """transformers would otherwise bring back the model's EOS as a stop and cut the responses."""
    from transformers import AutoModelForCausalLM

    from cppo.engine import generate, make_generation_config
    from cppo.models import resolve_model_source

    class AlwaysEos(AutoModelForCausalLM._model_mapping[__import__("transformers").GPT2Config]):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[..., self.config.eos_token_id] += 100.0
            return out

    policy = AlwaysEos.from_pretrained(resolve_model_source("builtin:tiny-gpt2", "p"))
    prompt_ids, prompt_mask = torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long)
    eos = policy.config.eos_token_id
    responses, mask, stopped = generate(policy, prompt_ids, prompt_mask, make_generation_config(
        [], 1, do_sample=True, max_new_tokens=6, top_k=0), [], 1, 2)
    assert responses.shape == (2, 6) and mask.sum() == 12 and not stopped.any()
    assert (responses == eos).all()
    responses, mask, stopped = generate(policy, prompt_ids, prompt_mask, make_generation_config(
        [eos], 1, do_sample=True, max_new_tokens=6, top_k=0), [eos], 1, 2)
    assert responses.shape == (2, 1) and mask.sum() == 2 and stopped.all()


def test_a_cpu_run_starts_without_warnings_of_our_making(tmp_path):
    """DeepSpeed, installed but not used, is imported by transformers and accelerate; left to guess the device it
    announces that it fell back to the CPU. A plain run prints the back end line and its result, nothing else."""
    result = run_cppo("train", TINY, *quick_overrides(tmp_path / "out", steps=1))
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("[vowels] step")]
    printed = result.stdout + result.stderr
    assert "Setting accelerator" not in printed and "warn" not in printed.lower(), printed
    assert lines[0].startswith("cppo: backend single") and lines[-1].startswith("done: 1 task(s)"), lines
