"""Critic-free advantages (docs/algorithm.md §9): RLOO, GRPO and REINFORCE++ by hand, groups of G responses per prompt,
and runs without a value model: nothing of a critic is built, trained, logged, checkpointed or saved."""

import json
import math
import signal

import pytest
import torch
from conftest import (
    CONTINUAL,
    CPPO_TINY,
    ROOT,
    TINY,
    TWO_PROCESSES,
    assert_same_run,
    mean_reward,
    quick_overrides,
    read_metrics,
    run_cppo,
)

from cppo import core
from cppo.config_loading import load_config
from cppo.errors import UserError

# --- the estimators, by hand -------------------------------------------------------------------------------


def close(actual: torch.Tensor, expected: list) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype))


def test_rloo_subtracts_the_mean_of_the_other_responses_of_the_group():
    # G = 2: each response's baseline is the other one
    assert core.rloo_advantages(torch.tensor([0.9, 0.1, 0.5, 0.5]), 2).tolist() == pytest.approx(
        [0.8, -0.8, 0.0, 0.0])
    # G = 4 with ties: for 1.0 the others average (1 + 1 + 3) / 3
    assert core.rloo_advantages(torch.tensor([1.0, 1.0, 1.0, 3.0]), 4).tolist() == pytest.approx(
        [-2 / 3, -2 / 3, -2 / 3, 2.0])
    # groups never mix: the second group is all ties
    assert core.rloo_advantages(torch.tensor([2.0, 0.0, 5.0, 5.0]), 2).tolist() == pytest.approx([2, -2, 0, 0])


def test_grpo_normalises_within_the_group_and_gives_0_to_a_group_of_equal_rewards():
    rewards = torch.tensor([1.0, 3.0, 2.0, 2.0])  # G = 2: the second group has zero variance
    scaled = core.grpo_advantages(rewards, 2, scale=True)
    std = math.sqrt(2.0)  # unbiased std of (1, 3)
    assert scaled.tolist() == pytest.approx([-1 / (std + 1e-4), 1 / (std + 1e-4), 0.0, 0.0])
    assert torch.isfinite(scaled).all()
    assert core.grpo_advantages(rewards, 2, scale=False).tolist() == pytest.approx([-1.0, 1.0, 0.0, 0.0])
    # G = 4 with a tie: (R − 1.5) / std(1, 1, 1, 3)
    four = core.grpo_advantages(torch.tensor([1.0, 1.0, 1.0, 3.0]), 4)
    std = math.sqrt((3 * 0.5 ** 2 + 1.5 ** 2) / 3)
    assert four.tolist() == pytest.approx([-0.5 / (std + 1e-4)] * 3 + [1.5 / (std + 1e-4)])


def test_sequence_estimators_use_the_shaped_return_and_broadcast_it_over_the_response_only():
    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.5, 0.5, 9.0], [1.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # padding after each response; its KL must not count
    rewards = core.shaped_rewards(scores, kl, mask, kl_coef=0.1)  # R = 1 − 0.1 · (0.5 + 0.5), 0 − 0.1 · 1
    advantages, returns = core.advantages("rloo", rewards, mask, group_size=2)
    assert returns is None
    close(advantages, [[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])
    advantages, _ = core.advantages("grpo", rewards, mask, group_size=2, scale_rewards=False)
    close(advantages, [[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0]])


def test_reinforce_pp_returns_to_go_by_hand():
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 7.0], [0.5, -0.5, 3.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    advantages, returns = core.advantages("reinforce_pp", rewards, mask)
    assert returns is None
    close(advantages, [[0.7, 0.8, 1.0, 0.0], [0.0, -0.5, 0.0, 0.0]])


def test_grpo_kl_loss_is_the_token_mean_of_k3_with_its_gradient():
    logprobs = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -2.0], [-0.5, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss = core.k3_loss(logprobs, ref, mask)
    d = -0.5  # ref − logprob of the one token that differs
    assert loss.item() == pytest.approx((math.exp(d) - d - 1) / 3)
    loss.backward()
    # d k3 / d logprob = 1 − exp(ref − logprob), / 3 tokens; 0 on the padding
    close(logprobs.grad, [[(1 - math.exp(d)) / 3, 0.0], [0.0, 0.0]])


# --- config -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    (["ppo.advantage=rloo"], "generation.num_generations"),  # G = 1 has no leave-one-out baseline
    (["ppo.advantage=grpo", "generation.num_generations=1"], "generation.num_generations"),
    (["ppo.advantage=rloo", "generation.num_generations=3"], "ppo.rollout_batch_size"),  # 32 % 3
    (["ppo.advantage=rloo", "generation.num_generations=4", "ppo.kl_in=loss"], "ppo.kl_in"),
    (["generation.num_generations=4", "generation.batch_size=6"], "generation.batch_size"),
    (["ppo.advantage=a2c"], "ppo.advantage"),
])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        load_config(CPPO_TINY, overrides)


def test_groups_must_not_be_split_across_processes():
    with pytest.raises(UserError, match=r"ppo\.rollout_batch_size"):
        load_config(CPPO_TINY, ["ppo.advantage=grpo", "generation.num_generations=8", "ppo.rollout_batch_size=8",
                                "ppo.mini_batch_size=4"], num_processes=2)


# --- the trainer without a critic ---------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_pp"])
def test_a_critic_free_trainer_has_no_value_model_and_groups_responses_by_prompt(tmp_path, estimator):
    from cppo.continual import build_trainer

    extra = ["ppo.kl_in=loss"] if estimator == "grpo" else []
    config = load_config(CPPO_TINY, [*quick_overrides(tmp_path / "o", steps=1), f"ppo.advantage={estimator}",
                                     "generation.num_generations=4", *extra])
    trainer = build_trainer(config)
    assert trainer.unwrapped.value_model is None and len(trainer.optimizer.param_groups) == 1
    assert sum(p.numel() for p in trainer.unwrapped.parameters()) == sum(
        p.numel() for p in trainer.unwrapped.policy.parameters())
    batch, _ = trainer.make_rollout()
    assert batch.old_values is None and batch.prompt_ids.shape[0] == 8  # 2 prompts × G = 4
    groups = batch.prompt_ids.view(2, 4, -1)
    assert (groups == groups[:, :1]).all() and not torch.equal(groups[0, 0], groups[1, 0])
    stats = trainer.step()
    assert not any(k.startswith("value/") or k == "loss/value" for k in stats)
    assert ("loss/kl" in stats) == (estimator == "grpo") and math.isfinite(stats["loss/total"])
    trainer.save_models(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == ["policy"]


def test_gae_with_several_responses_per_prompt_keeps_its_critic(tmp_path):
    from cppo.continual import build_trainer

    trainer = build_trainer(load_config(CPPO_TINY, [*quick_overrides(tmp_path / "o", steps=1),
                                                    "generation.num_generations=2"]))
    assert trainer.unwrapped.value_model is not None
    stats = trainer.step()
    assert "loss/value" in stats and "value/clipfrac" in stats


# --- end to end ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cppo_rloo_tiny_learns_without_a_critic(tmp_path):
    out = tmp_path / "run"
    run_cppo("train", str(ROOT / "configs" / "cppo_rloo_tiny.yaml"), f"output_dir={out}")
    rows = read_metrics(out)
    assert len(rows) == 40 and "cppo/frac_r1" in rows[0] and "loss/value" not in rows[0]
    first, last = mean_reward(rows[:5]), mean_reward(rows[-5:])
    assert last > first + 0.3, (first, last)
    assert (out / "policy").is_dir() and not (out / "value_model").exists()
    assert not (out / "task_1_vowels" / "value_model").exists()


RESUME = ["tasks.0.steps=4", "tasks.1.steps=4", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
          "ppo.ppo_epochs=2", "generation.max_new_tokens=8", "eval.max_prompts=8", "save_steps=2",
          "save_total_limit=null", "ppo.advantage=grpo", "generation.num_generations=4", "ppo.kl_in=loss",
          "cppo.kr_source=both", "memory.build_prompts=4", "memory.build_samples=2"]


def train(out, *extra, failpoint=None, check=True):
    return run_cppo("train", CONTINUAL, f"output_dir={out}", *RESUME, *extra, failpoint=failpoint, check=check)


@pytest.mark.slow
def test_a_critic_free_continual_run_killed_in_its_second_task_resumes_bit_identical(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight)
    killed = train(resumed, failpoint="step:7:mid", check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    train(resumed, "--resume")
    for task in ("task_1_vowels", "task_2_digits"):
        assert sorted(p.name for p in (straight / task).iterdir() if p.is_dir()) == ["policy"]
    assert_same_run(straight, resumed)
    rows = read_metrics(straight, timing=False)
    assert len(rows) == 8
    assert rows[-1]["loss/memory"] > 0 and "loss/kl" in rows[-1] and "loss/value" not in rows[-1]


@pytest.mark.slow
@pytest.mark.parametrize("estimator", [
    ["ppo.advantage=rloo", "generation.num_generations=2"],
    ["ppo.advantage=grpo", "generation.num_generations=4", "ppo.kl_in=loss"],
    ["ppo.advantage=reinforce_pp", "generation.num_generations=2"],
])
def test_two_processes_give_the_losses_and_gradient_of_one_without_a_critic(tmp_path, estimator):
    """tests/fixed_batch_step_script.py: one step on fixed rollouts, each process holding whole groups; the
    group baselines need no gather, REINFORCE++'s whitening is over the global batch."""
    settings = ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=8", "ppo.ppo_epochs=1", "ppo.max_grad_norm=null",
                "cppo.kr_source=both", "memory.batch_size=5", f"output_dir={tmp_path / 'o'}", *estimator]
    script = (str(ROOT / "tests" / "fixed_batch_step_script.py"),)
    results = []
    for launcher, extra in (((), []), (TWO_PROCESSES, ["ppo.gradient_accumulation_steps=2"])):
        out = tmp_path / f"{len(results)}.json"
        run_cppo(str(out), CONTINUAL, *settings, *extra, launcher=launcher, program=script)
        results.append(json.loads(out.read_text()))
    one, two = results
    assert two["processes"] == 2 and "loss/value" not in one["losses"] and one["losses"]["loss/policy"] != 0
    assert one["losses"].keys() == two["losses"].keys()
    for name, value in one["losses"].items():
        assert two["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    torch.testing.assert_close(torch.tensor(two["gradient"]), torch.tensor(one["gradient"]), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gae", "rloo", "grpo", "reinforce_pp"])
def test_cppo_with_the_default_kr_coef_learns_with_every_estimator(tmp_path, estimator):
    """configs/ppo_tiny.yaml switched to CPPO, nothing else changed but the estimator: the default KR lets the policy
    learn as PPO does (docs/results/kr_coef_defaults.md: first 5 → last 5 steps' reward 0.12 → 0.80–0.95; with the
    old default 1.0, 0.11 → 0.13–0.14). With `gae`, CPPO's whole loop on the tiny model: its types logged."""
    group = [] if estimator == "gae" else ["generation.num_generations=4"]
    out = tmp_path / estimator
    run_cppo("train", TINY, f"output_dir={out}", "algo=cppo", f"ppo.advantage={estimator}", *group)
    rows = read_metrics(out)
    rewards = [row["reward/mean"] for row in rows]
    assert len(rewards) == 40 and "cppo/frac_r1" in rows[0]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last - first > 0.5, (first, last)
