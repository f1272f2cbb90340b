"""The maths of cppo/core.py against values computed by hand (the arithmetic is in the comments)."""

import math

import pytest
import torch

from cppo import core


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), atol=tol, rtol=0)


def test_gae_three_steps_by_hand():
    # γ = 0.9, λ = 0.8, γλ = 0.72; V = [0.5, 0.4, 0.3], r = [0, 0, 1]
    # δ2 = 1 − 0.3 = 0.7; δ1 = 0.9·0.3 − 0.4 = −0.13; δ0 = 0.9·0.4 − 0.5 = −0.14
    # A2 = 0.7; A1 = −0.13 + 0.72·0.7 = 0.374; A0 = −0.14 + 0.72·0.374 = 0.12928
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.4, 0.3]])
    advantages, returns = core.gae(rewards, values, torch.ones(1, 3), gamma=0.9, lam=0.8)
    close(advantages, [[0.12928, 0.374, 0.7]])
    close(returns, [[0.62928, 0.774, 1.0]])


def test_gae_ignores_padding_after_the_response():
    # Row of length 2 padded with garbage: δ1 = 2 − 0.5 = 1.5 (no value after the last token),
    # δ0 = 0.9·0.5 − 1 = −0.55, A0 = −0.55 + 0.72·1.5 = 0.53; padded position → 0.
    rewards = torch.tensor([[0.0, 2.0, 99.0]])
    values = torch.tensor([[1.0, 0.5, 7.0]])
    mask = torch.tensor([[1, 1, 0]])
    advantages, returns = core.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    close(advantages, [[0.53, 1.5, 0.0]])
    close(returns, [[1.53, 2.0, 0.0]])


def test_gae_matches_the_reverse_loop_on_random_batches():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 9), torch.randn(5, 9)
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(9) < lengths.unsqueeze(1)).long()
    gamma, lam = 0.97, 0.9
    expected = torch.zeros(5, 9)
    for row in range(5):
        running = 0.0
        for t in reversed(range(int(lengths[row]))):
            next_value = values[row, t + 1] if t + 1 < lengths[row] else 0.0
            delta = rewards[row, t] + gamma * next_value - values[row, t]
            running = delta + gamma * lam * running
            expected[row, t] = running
    advantages, returns = core.gae(rewards, values, mask, gamma, lam)
    close(advantages, expected, tol=1e-5)
    close(returns, (expected + values) * mask, tol=1e-5)


def test_gae_with_lambda_zero_is_the_td_error():
    rewards = torch.tensor([[1.0, 2.0]])
    values = torch.tensor([[0.5, 0.25]])
    advantages, _ = core.gae(rewards, values, torch.ones(1, 2), gamma=1.0, lam=0.0)
    close(advantages, [[1.0 + 0.25 - 0.5, 2.0 - 0.25]])


def test_masked_mean_var_and_whiten_skip_padding():
    # Entries 1, 2, 3, 4: mean 2.5, unbiased var (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3.
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 100.0, -100.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(core.masked_mean(x, mask), 2.5)
    close(core.masked_var(x, mask), 5 / 3)
    close(core.masked_var(x, mask, unbiased=False), 1.25)
    s = math.sqrt(5 / 3)
    close(core.masked_whiten(x, mask), [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]], tol=1e-5)
    close(core.masked_whiten(x, mask, shift_mean=False)[0, 0], -1.5 / s + 2.5, tol=1e-5)


def test_masked_mean_weights_rows_and_is_zero_when_all_weights_are_zero():
    x = torch.tensor([[1.0, 3.0], [10.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # (3·(1 + 3) + 1·10) / (3·2 + 1·1) = 22 / 7
    close(core.masked_mean(x, mask, torch.tensor([3.0, 1.0])), 22 / 7)
    x.requires_grad_(True)
    zero = core.masked_mean(x, mask, torch.zeros(2))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def _ratio_batch():
    # Four tokens covering every branch of the clipped objective (ε = 0.2), plus a padded one.
    #  A = +1, ρ = 1.5: −1.5 vs −1.2 → −1.2 (clipped)   A = +1, ρ = 0.5: −0.5 vs −0.8 → −0.5
    #  A = −1, ρ = 1.5: +1.5 vs +1.2 → +1.5            A = −1, ρ = 0.5: +0.5 vs +0.8 → +0.8 (clipped)
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 9.0], [1.5, 0.5, 9.0]]))
    advantages = torch.tensor([[1.0, 1.0, 5.0], [-1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return new, old, advantages, mask


def test_policy_loss_takes_each_clip_branch():
    new, old, advantages, mask = _ratio_batch()
    loss, stats = core.policy_loss(new, old, advantages, mask, clip=0.2)
    close(loss, (-1.2 - 0.5 + 1.5 + 0.8) / 4)
    close(stats["clipfrac"], 0.5)
    # k3 = (ρ − 1) − log ρ: 0.5 − ln 1.5 and −0.5 + ln 2, two tokens each
    close(stats["approx_kl"], ((0.5 - math.log(1.5)) + (-0.5 + math.log(2))) / 2)


def test_policy_loss_with_rollout_weights():
    new, old, advantages, mask = _ratio_batch()
    loss, _ = core.policy_loss(new, old, advantages, mask, clip=0.2, weights=torch.tensor([3.0, 1.0]))
    # (3·(−1.2 − 0.5) + 1·(1.5 + 0.8)) / (3·2 + 1·2) = −2.8 / 8
    close(loss, -0.35)


def test_policy_loss_gradient_is_zero_on_the_clipped_branch():
    new, old, advantages, mask = _ratio_batch()
    new = new.clone().requires_grad_(True)
    core.policy_loss(new, old, advantages, mask, clip=0.2)[0].backward()
    # d/dlogπ of −A·ρ is −A·ρ/4 where unclipped, 0 where clipped or padded
    close(new.grad, [[0.0, -0.5 / 4, 0.0], [1.5 / 4, 0.0, 0.0]])


def test_value_loss_clipping_by_hand():
    # G = 1, ε_v = 0.2:  V_old 0, V 0.5 → clip 0.2: max(0.25, 0.64) = 0.64 (clipped branch)
    #                    V_old 0, V 0.1 → clip 0.1: 0.81 both (not counted as clipped)
    #                    V_old 1, V 2   → clip 1.2: max(1, 0.04) = 1
    values = torch.tensor([[0.5, 0.1, 2.0, 50.0]])
    old_values = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    returns = torch.ones(1, 4)
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = core.value_loss(values, old_values, returns, mask, clip=0.2)
    close(loss, 0.5 * (0.64 + 0.81 + 1.0) / 3)
    close(stats["clipfrac"], 1 / 3)
    weighted, _ = core.value_loss(values, old_values, returns, mask, clip=0.2, weights=torch.tensor([2.0]))
    close(weighted, loss)  # one rollout: its weight cancels


def test_kl_estimators():
    logprobs, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-2.0, -2.0]])
    close(core.kl_penalty(logprobs, ref, "k1"), [[1.0, 0.0]])
    # k3 with log(π/π_ref) = 1: e^(−1) − 1 + 1 = 0.367879
    close(core.kl_penalty(logprobs, ref, "k3"), [[math.exp(-1), 0.0]])
    with pytest.raises(ValueError):
        core.kl_penalty(logprobs, ref, "k2")


def test_shaped_rewards_put_the_score_on_the_last_response_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    rewards = core.shaped_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.5)
    close(rewards, [[-0.05, -0.1 + 2.0, 0.0], [-0.2, -0.25, -0.3 - 1.0]])


def test_response_mask_keeps_the_stop_token_and_cuts_after_it():
    responses = torch.tensor([[5, 0, 7, 0], [5, 6, 7, 8], [0, 3, 3, 3]])
    mask, stopped = core.response_mask_from_stop(responses, [0])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert stopped.tolist() == [True, False, True]
    mask, stopped = core.response_mask_from_stop(responses, [])
    assert mask.sum().item() == 12 and not stopped.any()
    mask, stopped = core.response_mask_from_stop(responses, [7, 3])  # the first of several stop tokens
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0]]
    assert stopped.tolist() == [True, True, True]


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, math.log(3.0)]]])  # softmax = [0.25, 0.75]
    close(core.logprobs_from_logits(logits, torch.tensor([[1]])), [[math.log(0.75)]])
    # at temperature 2 the logits halve: p1 = √3 / (1 + √3)
    close(core.logprobs_from_logits(logits, torch.tensor([[1]]), temperature=2.0),
          [[math.log(math.sqrt(3) / (1 + math.sqrt(3)))]])
    logprobs, entropy = core.logprobs_and_entropy(torch.zeros(1, 1, 4), torch.tensor([[2]]))
    close(logprobs, [[-math.log(4)]])
    close(entropy, [[math.log(4)]])
    # the same log-probs bit for bit, at any temperature, with the entropy of softmax(z / T)
    logits, tokens = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    for temperature in (1.0, 0.7):
        logprobs, entropy = core.logprobs_and_entropy(logits, tokens, temperature)
        assert torch.equal(logprobs, core.logprobs_from_logits(logits, tokens, temperature))
        logp = (logits / temperature).log_softmax(-1)
        torch.testing.assert_close(entropy, -(logp.exp() * logp).sum(-1))


def test_adaptive_kl_coefficient():
    # error clipped to +0.2: 0.1·(1 + 0.2·256/10000)
    assert core.adaptive_kl_coef(0.1, kl=12.0, target=6.0, horizon=10000, n_rollouts=256) == pytest.approx(0.100512)
    # error −1/6: 0.1·(1 − 256/60000)
    assert core.adaptive_kl_coef(0.1, kl=5.0, target=6.0, horizon=10000, n_rollouts=256) == pytest.approx(
        0.1 * (1 - 256 / 60000))


def test_weighted_token_count_is_the_masked_mean_denominator():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert core.weighted_token_count(mask).item() == 3
    assert core.weighted_token_count(mask, torch.tensor([0.5, 2.0])).item() == 0.5 * 2 + 2.0 * 1


# ------------------------------------------------------------------------------ policy-loss options (§10)


def test_clip_higher_moves_only_the_upper_bound():
    new, old, advantages, mask = _ratio_batch()
    # ε_low 0.2, ε_high 0.6: A = +1, ρ = 1.5 is no longer clipped (−1.5); the rest as with 0.2 on both sides.
    loss, stats = core.policy_loss(new, old, advantages, mask, clip=0.2, clip_high=0.6)
    close(loss, (-1.5 - 0.5 + 1.5 + 0.8) / 4)
    close(stats["clipfrac"], 0.25)
    # ε_low 0.6: A = −1, ρ = 0.5 falls inside [0.4, 1.2] and is unclipped (+0.5)
    close(core.policy_loss(new, old, advantages, mask, clip=0.6, clip_high=0.2)[0], (-1.2 - 0.5 + 1.5 + 0.5) / 4)
    same = core.policy_loss(new, old, advantages, mask, clip=0.2, clip_high=0.2)[0]
    assert torch.equal(same, core.policy_loss(new, old, advantages, mask, clip=0.2)[0])


def test_the_sequence_ratio_is_the_geometric_mean_of_the_token_ratios():
    old = torch.zeros(2, 3)
    new = torch.log(torch.tensor([[2.0, 0.5, 7.0], [1.1, 1.1, 1.1]]))
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    log_s = core.sequence_log_ratio(new, old, mask)
    close(log_s.exp(), [[1.0] * 3, [1.1] * 3])  # √(2 · 0.5) = 1; 1.1
    advantages = torch.tensor([[1.0] * 3, [-2.0] * 3])
    # s = 1: −1 on two tokens; s = 1.1 inside [0.8, 1.2]: +2.2 on three tokens; token mean over 5 tokens
    new = new.clone().requires_grad_(True)
    loss, _ = core.policy_loss(new, old, advantages, mask, clip=0.2, ratio_level="sequence")
    close(loss, (2 * -1.0 + 3 * 2.2) / 5)
    loss.backward()
    # d/d log π_t of −A·s·(tokens of i)/5, through s = exp(mean log ratio): −A·s/5 on each real token
    close(new.grad, [[-1 / 5, -1 / 5, 0.0], [2.2 / 5, 2.2 / 5, 2.2 / 5]])


def test_the_overlong_penalty_by_hand():
    lengths = torch.tensor([3, 4, 6, 7, 8, 10])
    # L = 8, b = 4: nothing up to 4 tokens, then −(|y| − 4)/4 · 0.5, −0.5 from 8 on
    close(core.overlong_penalty(lengths, 8, 4, 0.5), [0.0, 0.0, -0.25, -0.375, -0.5, -0.5])


def test_the_entropy_bonus_is_the_token_mean_and_differentiable():
    entropy = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    bonus = core.entropy_bonus(entropy, mask)
    close(bonus, 2.0)
    bonus.backward()
    close(entropy.grad, [[1 / 3, 1 / 3, 0.0], [1 / 3, 0.0, 0.0]])
