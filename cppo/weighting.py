"""CPPO's rollout types and weights (docs/algorithm.md §3, §4): pure functions over 1-D tensors of one batch.

Inputs are the **global** rollout batch (the trainer gathers it from every process first):
`logprob_mean` ℓ_i, the mean log π_roll over rollout i's response tokens, and `reward` R_i, its
sequence reward. Types are 1..5 for r1..r5.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

HIGH_PERFORMANCE, OVERFITTING, HIGH_VARIANCE, NOISY, NORMAL = 1, 2, 3, 4, 5
TYPE_NAMES = {1: "high_performance", 2: "overfitting", 3: "high_variance", 4: "noisy", 5: "normal"}


class BatchStats(NamedTuple):
    """μ and unbiased σ of ℓ and R over the batch; `degenerate` when no classification is possible."""

    logprob_mu: float
    logprob_sigma: float
    reward_mu: float
    reward_sigma: float
    degenerate: bool


def batch_stats(logprob_mean: torch.Tensor, reward: torch.Tensor) -> BatchStats:
    """docs/algorithm.md §3: degenerate when N < 2, or either σ is 0 or not finite."""
    n = logprob_mean.numel()
    if n < 2:
        mu_l = logprob_mean.double().mean().item() if n else math.nan
        mu_r = reward.double().mean().item() if n else math.nan
        return BatchStats(mu_l, math.nan, mu_r, math.nan, True)
    l64, r64 = logprob_mean.double(), reward.double()
    stats = (l64.mean().item(), l64.std().item(), r64.mean().item(), r64.std().item())
    sigmas = (stats[1], stats[3])
    degenerate = any(not math.isfinite(s) or s == 0.0 for s in sigmas) or not all(map(math.isfinite, stats))
    return BatchStats(*stats, degenerate)


def normalised_coordinates(logprob_mean: torch.Tensor, reward: torch.Tensor, k: float,
                           stats: BatchStats) -> tuple[torch.Tensor, torch.Tensor]:
    """u = (ℓ − μ_ℓ)/(kσ_ℓ), v = (R − μ_R)/(kσ_R) (float64): the thresholds sit at u, v = ±1."""
    u = (logprob_mean.double() - stats.logprob_mu) / (k * stats.logprob_sigma)
    v = (reward.double() - stats.reward_mu) / (k * stats.reward_sigma)
    return u, v


def _types_from_coordinates(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    high_l, low_l, high_r, low_r = u >= 1, u <= -1, v >= 1, v <= -1
    types = torch.full(u.shape, NORMAL, dtype=torch.long, device=u.device)
    types[high_l & high_r] = HIGH_PERFORMANCE
    types[high_l & low_r] = OVERFITTING
    types[low_l & high_r] = HIGH_VARIANCE
    types[low_l & low_r] = NOISY
    return types


def classify_rollouts(logprob_mean: torch.Tensor, reward: torch.Tensor, k: float) -> torch.Tensor:
    """Type 1..5 of each rollout (docs/algorithm.md §3 table); every rollout is r5 in a degenerate batch.

    High ℓ ⇔ ℓ ≥ μ_ℓ + kσ_ℓ and low ℓ ⇔ ℓ ≤ μ_ℓ − kσ_ℓ (same for R), μ and the unbiased σ taken
    over the batch. ℓ is the mean token log-prob of the response [resolution: docs/algorithm.md §3].
    """
    stats = batch_stats(logprob_mean, reward)
    if stats.degenerate:
        return torch.full(logprob_mean.shape, NORMAL, dtype=torch.long, device=logprob_mean.device)
    return _types_from_coordinates(*normalised_coordinates(logprob_mean, reward, k, stats))


def heuristic_weights(logprob_mean: torch.Tensor, reward: torch.Tensor, k: float, lb: float, ub: float,
                      mode: str = "heuristic") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α, β, types) per rollout, float32 (B,) and long (B,).

    `heuristic` is the continuous Table 2 of the paper (docs/algorithm.md §4), with r3's row mirrored
    [resolution: the published α = min(ub, u), β = max(lb, 2 + v) breaks the table's own
    constraints α(r3) > 1, β(r3) < 1]:

        r1  α = min(ub, u)       β = min(ub, v)
        r2  α = min(ub, u)       β = max(lb, 2 + v)
        r3  α = min(ub, −u)      β = max(lb, 2 − v)
        r4  α = max(lb, 2 + u)   β = max(lb, 2 + v)
        r5  α = 1                β = 1

    Every row equals 1 on its zone's boundary, so the weight surfaces are continuous.
    `balance` is the step version of the authors' code: r1 (ub, ub), r2 and r3 (ub, lb),
    r4 (lb, lb), r5 (1, 1).
    """
    if mode not in ("heuristic", "balance"):
        raise ValueError(f"mode must be heuristic or balance, got {mode!r}")
    stats = batch_stats(logprob_mean, reward)
    ones = torch.ones(logprob_mean.shape, dtype=torch.float64, device=logprob_mean.device)
    if stats.degenerate:
        return ones.float(), ones.float(), torch.full_like(ones, NORMAL, dtype=torch.long)
    u, v = normalised_coordinates(logprob_mean, reward, k, stats)
    alpha, beta, types = weights_at(u, v, lb, ub, mode)
    return alpha.float(), beta.float(), types


def weights_at(u: torch.Tensor, v: torch.Tensor, lb: float, ub: float,
               mode: str = "heuristic") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """α, β and the type at normalised coordinates (u, v) (docs/algorithm.md §4 tables): the weight surfaces."""
    types = _types_from_coordinates(u, v)
    ones = torch.ones_like(u)
    if mode == "balance":
        table = torch.tensor([[1.0, 1.0], [ub, ub], [ub, lb], [ub, lb], [lb, lb], [1.0, 1.0]],
                             dtype=u.dtype, device=u.device)
        alpha, beta = table[types].unbind(-1)
        return alpha, beta, types
    up_u, up_v = u.clamp(max=ub), v.clamp(max=ub)
    rows = {  # type: (α, β)
        HIGH_PERFORMANCE: (up_u, up_v),
        OVERFITTING: (up_u, (2 + v).clamp(min=lb)),
        HIGH_VARIANCE: ((-u).clamp(max=ub), (2 - v).clamp(min=lb)),
        NOISY: ((2 + u).clamp(min=lb), (2 + v).clamp(min=lb)),
    }
    alpha, beta = ones.clone(), ones.clone()
    for kind, (a, b) in rows.items():
        where = types == kind
        alpha, beta = torch.where(where, a, alpha), torch.where(where, b, beta)
    return alpha, beta, types


# Coefficients of each type's group mean in the τ-bracket of L_coef (docs/algorithm.md §4), index 1..5:
#   α: (ᾱ5 − ᾱ1) + (ᾱ5 − ᾱ2) + (ᾱ5 − ᾱ3) + (ᾱ4 − ᾱ5)
#   β: (β̄5 − β̄1) + (β̄2 − β̄5) + (β̄3 − β̄5) + (β̄4 − β̄5)
# A bracketed term pairs type j (1..4) with r5; it is dropped when group j is empty.
_ALPHA_SIGN = (0.0, -1.0, -1.0, -1.0, +1.0)  # sign of ᾱj in its term, j = 1..4 (index 0 unused)
_BETA_SIGN = (0.0, -1.0, +1.0, +1.0, +1.0)


def learned_weights(logprob_mean: torch.Tensor, reward: torch.Tensor, k: float, lb: float, ub: float,
                    tau: float, lr: float, steps: int, tol: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(α, β, types) minimising the paper's L_coef with Adam (docs/algorithm.md §4), detached.

    Each rollout has free parameters φ_i with α_i = lb + (ub − lb)·sigmoid(φ_i1) (β_i likewise),
    started at α = β = 1, and

        L_coef = mean_i[(α_i − 1)² + (β_i − 1)²] + τ·[(ᾱ5 − ᾱ1) + (β̄5 − β̄1) + (ᾱ5 − ᾱ2) + (β̄2 − β̄5)
                                                   + (ᾱ5 − ᾱ3) + (β̄3 − β̄5) + (ᾱ4 − ᾱ5) + (β̄4 − β̄5)]

    is minimised with Adam (β1 0.9, β2 0.999, ε 1e-8, step `lr`) for at most `steps` steps, stopping
    once no α or β moves by more than `tol` in a step. From the common start every rollout of a type
    gets the same gradient, so all rollouts of a type keep equal parameters throughout: optimising one
    (α, β) pair per type is the same computation, and costs O(steps) small-vector updates whatever
    the batch size. Deterministic: no random numbers are drawn.
    (A lone r5, the degenerate case, has zero gradient and keeps α = β = 1.)
    """
    types = classify_rollouts(logprob_mean, reward, k)
    if types.numel() == 0:
        empty = torch.zeros(0, dtype=torch.float32, device=types.device)
        return empty, empty.clone(), types
    counts = torch.bincount(types.cpu(), minlength=6)[1:].tolist()  # n_1..n_5
    n = types.numel()
    groups = [j for j in range(5) if counts[j]]
    kept = [j for j in groups if j < 4]  # bracketed terms whose group is present
    # d(bracket)/d(group mean): the sign of ᾱj (β̄j) in its term; r5 appears in every kept term with the
    # opposite sign; an empty r5's means are the constant 1 (no parameter).
    alpha_coef = [_ALPHA_SIGN[j + 1] for j in range(4)] + [-sum(_ALPHA_SIGN[j + 1] for j in kept)]
    beta_coef = [_BETA_SIGN[j + 1] for j in range(4)] + [-sum(_BETA_SIGN[j + 1] for j in kept)]
    # One φ per (present type, α|β). The gradient is that of one rollout of the type:
    # ∂L/∂α_i = 2(α_i − 1)/N + τ·coef_j/n_j, times dα/dφ. Plain floats: at most 10 scalars, for which
    # a Python loop is several times faster than tensor ops.
    pull = [tau * c[j] / counts[j] for j in groups for c in (alpha_coef, beta_coef)]
    start = min(max((1.0 - lb) / (ub - lb), 1e-6), 1 - 1e-6) if ub > lb else 0.5
    phi = [math.log(start / (1 - start))] * len(pull)
    m, v = [0.0] * len(pull), [0.0] * len(pull)
    span = ub - lb
    weights = [lb + span * start] * len(pull)
    for step in range(1, steps + 1):
        correction1, correction2 = 1 - 0.9**step, 1 - 0.999**step
        moved = 0.0
        for i, pull_i in enumerate(pull):
            sig = weights[i] - lb
            sig = sig / span if span else 0.5
            grad = (2 / n * (weights[i] - 1) + pull_i) * span * sig * (1 - sig)
            m[i] = 0.9 * m[i] + 0.1 * grad
            v[i] = 0.999 * v[i] + 0.001 * grad * grad
            phi[i] -= lr * (m[i] / correction1) / (math.sqrt(v[i] / correction2) + 1e-8)
            updated = lb + span / (1 + math.exp(-phi[i]))
            moved = max(moved, abs(updated - weights[i]))
            weights[i] = updated
        if moved <= tol:
            break
    table = torch.ones(5, 2, dtype=torch.float64)
    for g, j in enumerate(groups):
        table[j, 0], table[j, 1] = weights[2 * g], weights[2 * g + 1]
    per_rollout = table.to(types.device)[types - 1]
    return per_rollout[:, 0].float(), per_rollout[:, 1].float(), types


def apply_ablation(alpha: torch.Tensor, beta: torch.Tensor, ablation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`alpha_one` (α ≡ 1), `beta_one` (β ≡ 1), `beta_zero` (β ≡ 0), or several joined by `+`;
    `none` keeps both. `alpha_one+beta_zero` is plain PPO (docs/algorithm.md §4)."""
    for part in ablation.split("+"):
        if part == "alpha_one":
            alpha = torch.ones_like(alpha)
        elif part == "beta_one":
            beta = torch.ones_like(beta)
        elif part == "beta_zero":
            beta = torch.zeros_like(beta)
        elif part != "none":
            raise ValueError(f"unknown ablation {part!r}")
    return alpha, beta
