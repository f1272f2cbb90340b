"""The optimiser and its learning-rate schedule, built for one stage's policy and critic."""

from __future__ import annotations

import torch

from .config import PPOConfig
from .modules import ActorCritic


def build_optimizer(model: ActorCritic, pcfg: PPOConfig) -> torch.optim.Optimizer:
    """AdamW, one parameter group per model, on torch's fused kernel where the device has one: one kernel over
    all tensors instead of a loop over them (about four times faster an update for SmolLM2-135M's policy and
    critic on a CPU, scripts/benchmark_step.py). It rounds differently from the loop, so results differ from it
    in the last bits; from one run to the next, and across resume, they are identical."""
    groups = [{"params": [p for p in model.policy.parameters() if p.requires_grad], "lr": pcfg.learning_rate}]
    if model.value_model is not None:
        groups.append({"params": [p for p in model.value_model.parameters() if p.requires_grad],
                       "lr": pcfg.value_learning_rate or pcfg.learning_rate})
    try:
        return torch.optim.AdamW(groups, weight_decay=pcfg.weight_decay, fused=True)
    except RuntimeError:  # a device (or parameter type) without the fused kernel
        return torch.optim.AdamW(groups, weight_decay=pcfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, pcfg: PPOConfig, steps: int):
    """The schedule over the stage's `steps` steps, counted in optimiser updates (skipped updates not counted)."""
    from transformers import get_scheduler

    updates = steps * pcfg.ppo_epochs * (pcfg.rollout_batch_size // pcfg.mini_batch_size)
    name = "constant_with_warmup" if pcfg.lr_scheduler == "constant" else pcfg.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=pcfg.warmup_steps, num_training_steps=updates)
