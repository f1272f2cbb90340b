"""Continual RLHF, a wing on top of the trainer that the trainer never sees: the task-sequence runner with its
checkpoints (`runner`), the evaluation matrix (`evaluation`), the continual-learning baselines
(`regularizers`), the metrics of docs/algorithm.md §7 (`metrics`) and the plots and report of several
runs (`report`)."""

from .runner import build_trainer, run

__all__ = ["build_trainer", "run"]
