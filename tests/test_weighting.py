"""CPPO's five rollout types and α/β weights (cppo/weighting.py) on hand-built batches."""

import math

import pytest
import torch

from cppo.weighting import apply_ablation, batch_stats, classify_rollouts, heuristic_weights, learned_weights

# Nine rollouts with mean 0 and unbiased σ = 2 exactly for both ℓ and R (Σx² = 32 = 8·2²).
LOGPROB = torch.tensor([4.0, 2.0, -2.0, -2.0, -2.0, 0.0, 0.0, 0.0, 0.0])
REWARD = torch.tensor([2.0, -2.0, 4.0, -2.0, -2.0, 0.0, 0.0, 0.0, 0.0])
# type of each row, by hand: (high, high) r1, (high, low) r2, (low, high) r3, (low, low) r4 ×2, r5 ×4
TYPES = [1, 2, 3, 4, 4, 5, 5, 5, 5]


def test_batch_stats_are_mean_and_unbiased_std():
    stats = batch_stats(LOGPROB, REWARD)
    assert stats == (0.0, 2.0, 0.0, 2.0, False)


@pytest.mark.parametrize("k", [0.5, 0.8, 1.0])
def test_classification_hits_every_type(k):
    # with k ≤ 1 every off-centre row is beyond ±kσ (|ℓ|, |R| ≥ 2 = σ)
    assert classify_rollouts(LOGPROB, REWARD, k).tolist() == TYPES


def test_classification_thresholds_are_inclusive_and_k_matters():
    # k = 1: thresholds at ±2, rows 1–4 sit on them (inclusive) → unchanged; k = 1.5: thresholds at ±3,
    # only row 0's ℓ = 4 and row 2's R = 4 pass, and no row passes on both axes → all r5.
    assert classify_rollouts(LOGPROB, REWARD, 1.0).tolist() == TYPES
    assert classify_rollouts(LOGPROB, REWARD, 1.5).tolist() == [5] * 9


def test_heuristic_weights_interior_values():
    # k = 0.8: kσ = 1.6, so u = ℓ/1.6 = [2.5, 1.25, −1.25, −1.25, −1.25, 0…], v = [1.25, −1.25, 2.5, −1.25, …]
    alpha, beta, types = heuristic_weights(LOGPROB, REWARD, k=0.8, lb=0.1, ub=3.0)
    assert types.tolist() == TYPES
    expected_alpha = [2.5,   # r1: min(ub, u)
                      1.25,  # r2: min(ub, u)
                      1.25,  # r3: min(ub, −u)
                      0.75, 0.75,  # r4: max(lb, 2 + u)
                      1, 1, 1, 1]
    expected_beta = [1.25,  # r1: min(ub, v)
                     0.75,  # r2: max(lb, 2 + v)
                     0.1,   # r3: max(lb, 2 − v) = max(0.1, −0.5): clamped at lb
                     0.75, 0.75,  # r4: max(lb, 2 + v)
                     1, 1, 1, 1]
    torch.testing.assert_close(alpha, torch.tensor(expected_alpha), atol=1e-6, rtol=0)
    torch.testing.assert_close(beta, torch.tensor(expected_beta), atol=1e-6, rtol=0)


def test_heuristic_weights_clamp_at_both_bounds():
    # k = 0.5: kσ = 1, u = ℓ, v = R exactly.
    alpha, beta, _ = heuristic_weights(LOGPROB, REWARD, k=0.5, lb=0.2, ub=2.0)
    # r1 (4, 2): α = min(2, 4) = ub, β = min(2, 2) = 2; r2 (2, −2): α = 2, β = max(0.2, 0) = lb
    # r3 (−2, 4): α = min(2, 2) = 2, β = max(0.2, −2) = lb; r4 (−2, −2): α = β = max(0.2, 0) = lb
    assert alpha.tolist() == pytest.approx([2.0, 2.0, 2.0, 0.2, 0.2, 1, 1, 1, 1])
    assert beta.tolist() == pytest.approx([2.0, 0.2, 0.2, 0.2, 0.2, 1, 1, 1, 1])
    assert alpha.max().item() == pytest.approx(2.0) and alpha.min().item() == pytest.approx(0.2)


def test_heuristic_weights_are_exactly_one_on_the_zone_boundaries():
    # k = 1: kσ = 2, so rows 1–4 sit exactly on u, v = ±1 (a boundary of their zone).
    alpha, beta, types = heuristic_weights(LOGPROB, REWARD, k=1.0, lb=0.2, ub=2.0)
    assert types.tolist() == TYPES
    assert alpha[1:].tolist() == [1.0] * 8
    # row 2 (r3) is on the ℓ boundary only: β = max(lb, 2 − v) with v = 2 → lb
    assert beta.tolist() == pytest.approx([1.0, 1.0, 0.2, 1.0, 1.0, 1, 1, 1, 1])
    # and just inside a zone the weights are continuous: 1 + O(ε)
    nudged = LOGPROB.clone()
    nudged[1] += 1e-4
    alpha, beta, types = heuristic_weights(nudged, REWARD, k=1.0, lb=0.2, ub=2.0)
    assert types[1] == 2 and abs(alpha[1].item() - 1) < 1e-3 and abs(beta[1].item() - 1) < 1e-3


def test_balance_weights_are_the_step_constants():
    alpha, beta, types = heuristic_weights(LOGPROB, REWARD, k=0.8, lb=0.1, ub=3.0, mode="balance")
    assert types.tolist() == TYPES
    assert alpha.tolist() == pytest.approx([3.0, 3.0, 3.0, 0.1, 0.1, 1, 1, 1, 1])
    assert beta.tolist() == pytest.approx([3.0, 0.1, 0.1, 0.1, 0.1, 1, 1, 1, 1])
    with pytest.raises(ValueError):
        heuristic_weights(LOGPROB, REWARD, k=0.8, lb=0.1, ub=3.0, mode="linear")


@pytest.mark.parametrize("logprob, reward", [
    (torch.tensor([-1.0]), torch.tensor([0.5])),  # N = 1
    (torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([0.5, 0.5, 0.5])),  # σ_R = 0
    (torch.tensor([-1.0, -1.0]), torch.tensor([0.0, 1.0])),  # σ_ℓ = 0
    (torch.tensor([-1.0, float("-inf"), -2.0]), torch.tensor([0.0, 1.0, 2.0])),  # non-finite σ
    (torch.tensor([]), torch.tensor([])),  # empty
])
def test_degenerate_batches_are_all_normal_with_unit_weights(logprob, reward):
    assert (classify_rollouts(logprob, reward, 0.85) == 5).all()
    for mode in ("heuristic", "balance"):
        alpha, beta, types = heuristic_weights(logprob, reward, 0.85, 0.2, 2.0, mode)
        assert (types == 5).all() and (alpha == 1).all() and (beta == 1).all()
    alpha, beta, types = learned_weights(logprob, reward, 0.85, 0.2, 2.0, 0.05, 0.05, 100, 1e-5)
    assert (types == 5).all() and torch.isfinite(alpha).all() and torch.isfinite(beta).all()
    assert (alpha == 1).all() and (beta == 1).all()  # only r5 present: nothing pulls away from 1


def five_type_batch(per_corner=4, centre=48, seed=0):
    """r5 in the middle, `per_corner` rollouts in each of r1–r4's corners."""
    generator = torch.Generator().manual_seed(seed)
    middle = torch.rand(centre, 2, generator=generator) - 0.5
    corners = torch.tensor([[3.0, 3.0], [3.0, -3.0], [-3.0, 3.0], [-3.0, -3.0]]).repeat_interleave(per_corner, 0)
    points = torch.cat([middle, corners + 0.1 * torch.randn(corners.shape, generator=generator)])
    return points[:, 0], points[:, 1]


def closed_form(types, tau):
    """docs/algorithm.md §4's unbounded minimiser, per rollout."""
    n = types.numel()
    counts = torch.bincount(types, minlength=6).double()
    alpha_shift = {1: 1, 2: 1, 3: 1, 4: -1}
    beta_shift = {1: 1, 2: -1, 3: -1, 4: -1}
    alpha = torch.ones(n, dtype=torch.float64)
    beta = torch.ones(n, dtype=torch.float64)
    for j in range(1, 5):
        alpha[types == j] = 1 + alpha_shift[j] * tau * n / (2 * counts[j])
        beta[types == j] = 1 + beta_shift[j] * tau * n / (2 * counts[j])
    alpha[types == 5] = 1 - tau * n / counts[5]
    beta[types == 5] = 1 + tau * n / counts[5]
    return alpha.float(), beta.float()


def test_learned_weights_satisfy_the_order_constraints_with_r5_the_majority():
    logprob, reward = five_type_batch()
    alpha, beta, types = learned_weights(logprob, reward, k=0.85, lb=0.2, ub=2.0, tau=0.05, lr=0.05, steps=1000,
                                         tol=1e-5)
    assert sorted(set(types.tolist())) == [1, 2, 3, 4, 5] and (types == 5).sum() == 48
    mean_a = {j: alpha[types == j].mean().item() for j in range(1, 6)}
    mean_b = {j: beta[types == j].mean().item() for j in range(1, 6)}
    assert mean_a[1] > mean_a[5] and mean_a[2] > mean_a[5] and mean_a[3] > mean_a[5] and mean_a[4] < mean_a[5]
    assert mean_b[1] > mean_b[5] and mean_b[2] < mean_b[5] and mean_b[3] < mean_b[5] and mean_b[4] < mean_b[5]
    assert mean_a[1] > 1 and mean_a[4] < 1 and mean_b[1] > 1 and mean_b[2] < 1
    assert abs(alpha.mean().item() - 1) < 0.1 and abs(beta.mean().item() - 1) < 0.1
    assert ((alpha >= 0.2) & (alpha <= 2.0) & (beta >= 0.2) & (beta <= 2.0)).all()


def test_learned_weights_match_the_closed_form_in_the_unbounded_regime():
    logprob, reward = five_type_batch()
    alpha, beta, types = learned_weights(logprob, reward, k=0.85, lb=0.05, ub=5.0, tau=0.05, lr=0.05, steps=3000,
                                         tol=1e-7)
    expected_alpha, expected_beta = closed_form(types, 0.05)
    # r1–r4: 1 ± 0.05·64/8 = 1 ± 0.4; r5: 1 ∓ 0.05·64/48
    assert expected_alpha.unique().tolist() == pytest.approx(sorted([0.6, 1 - 3.2 / 48, 1.4]))
    torch.testing.assert_close(alpha, expected_alpha, atol=1e-4, rtol=0)
    torch.testing.assert_close(beta, expected_beta, atol=1e-4, rtol=0)
    assert alpha.mean().item() == pytest.approx(1.0, abs=1e-4) and beta.mean().item() == pytest.approx(1.0, abs=1e-4)


def test_learned_weights_equal_per_rollout_adam_on_l_coef():
    """The per-type optimisation is the same computation as the paper's per-rollout one: compare with a
    direct autograd implementation of L_coef over φ ∈ R^(N×2) and torch.optim.Adam."""
    logprob, reward = five_type_batch(per_corner=3, centre=20, seed=3)
    lb, ub, tau, lr, steps = 0.2, 2.0, 0.1, 0.05, 200
    types = classify_rollouts(logprob, reward, 0.85)
    start = math.log((1 - lb) / (ub - 1))
    phi = torch.full((types.numel(), 2), start, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([phi], lr=lr)
    for _ in range(steps):
        weights = lb + (ub - lb) * torch.sigmoid(phi)
        a, b = weights[:, 0], weights[:, 1]
        g = {j: (a[types == j].mean(), b[types == j].mean()) for j in range(1, 6)}
        bracket = ((g[5][0] - g[1][0]) + (g[5][1] - g[1][1]) + (g[5][0] - g[2][0]) + (g[2][1] - g[5][1])
                   + (g[5][0] - g[3][0]) + (g[3][1] - g[5][1]) + (g[4][0] - g[5][0]) + (g[4][1] - g[5][1]))
        loss = ((a - 1) ** 2 + (b - 1) ** 2).mean() + tau * bracket
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reference = lb + (ub - lb) * torch.sigmoid(phi.detach())
    alpha, beta, _ = learned_weights(logprob, reward, 0.85, lb, ub, tau, lr, steps, tol=0.0)
    torch.testing.assert_close(alpha, reference[:, 0].float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(beta, reference[:, 1].float(), atol=1e-6, rtol=0)


def test_learned_weights_with_missing_groups_and_determinism():
    logprob, reward = five_type_batch()
    keep = torch.ones_like(logprob, dtype=torch.bool)
    keep[-8:] = False  # drop r3 and r4
    first = learned_weights(logprob[keep], reward[keep], 0.85, 0.2, 2.0, 0.05, 0.05, 1000, 1e-5)
    second = learned_weights(logprob[keep], reward[keep], 0.85, 0.2, 2.0, 0.05, 0.05, 1000, 1e-5)
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    alpha, beta, types = first
    assert set(types.tolist()) == {1, 2, 5}
    # kept terms only: ᾱ5 has coefficient 2 (r1, r2 terms) and β̄5 0 (+1 − 1), so β(r5) stays 1
    assert beta[types == 5].unique().tolist() == pytest.approx([1.0], abs=1e-4)
    assert alpha[types == 1].mean() > 1 and beta[types == 2].mean() < 1


def test_ablations():
    alpha, beta = torch.tensor([2.0, 0.5]), torch.tensor([0.3, 1.7])
    assert apply_ablation(alpha, beta, "none")[0] is alpha
    assert apply_ablation(alpha, beta, "alpha_one")[0].tolist() == [1, 1]
    assert apply_ablation(alpha, beta, "beta_one")[1].tolist() == [1, 1]
    a, b = apply_ablation(alpha, beta, "alpha_one+beta_zero")
    assert a.tolist() == [1, 1] and b.tolist() == [0, 0]
    with pytest.raises(ValueError):
        apply_ablation(alpha, beta, "gamma_one")
