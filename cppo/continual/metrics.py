"""Continual-learning metrics from the evaluation matrix (docs/algorithm.md §7).

S[i][j] is the score on task j's evaluation set after training tasks 1..i; row 0 is the initial
model. Tasks are 1-based in the formulas and 0-based in the lists: S[i][j - 1].
"""

from __future__ import annotations

from statistics import mean


def final_average(S: list[list[float]]) -> float:
    """A = (1/T) Σ_j S[T][j]."""
    return mean(S[-1])


def forgetting(S: list[list[float]]) -> float | None:
    """F = mean over j < T of (max over l in j..T−1 of S[l][j]) − S[T][j]; None when T = 1."""
    T = len(S[0])
    if T < 2:
        return None
    return mean(max(S[i][j - 1] for i in range(j, T)) - S[T][j - 1] for j in range(1, T))


def backward_transfer(S: list[list[float]]) -> float | None:
    """BWT = mean over j < T of S[T][j] − S[j][j]; None when T = 1."""
    T = len(S[0])
    if T < 2:
        return None
    return mean(S[T][j - 1] - S[j][j - 1] for j in range(1, T))


def forward_transfer(S: list[list[float]]) -> float | None:
    """FWT = mean over j ≥ 2 of S[j−1][j] − S[0][j]; None when T = 1."""
    T = len(S[0])
    if T < 2:
        return None
    return mean(S[j - 1][j - 1] - S[0][j - 1] for j in range(2, T + 1))


def plasticity(S: list[list[float]]) -> float:
    """P = mean over j of S[j][j] − S[j−1][j]."""
    T = len(S[0])
    return mean(S[j][j - 1] - S[j - 1][j - 1] for j in range(1, T + 1))


def summarize(S: list[list[float]]) -> dict[str, float | None]:
    """Every metric of a full sequential matrix (T + 1 rows, T columns). A matrix of two rows for
    more than one task (the joint schedule: initial, then after training on all tasks at once) has
    only a final average."""
    T = len(S[0])
    if len(S) != T + 1:
        return {"final_average": final_average(S), "forgetting": None, "bwt": None, "fwt": None,
                "plasticity": None}
    return {"final_average": final_average(S), "forgetting": forgetting(S), "bwt": backward_transfer(S),
            "fwt": forward_transfer(S), "plasticity": plasticity(S)}
