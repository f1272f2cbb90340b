"""Non-finite values never reach the weights (`ppo.on_nonfinite`): the checks of a rollout and of one update,
counted over every process so that all agree, and the one place that skips or stops."""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from .config import PPOConfig
from .distributed import Backend
from .errors import UserError
from .rollout import Rollout


class NonFiniteGuard:
    """The trainer's guard over one stage. `rewards`: the task rewards (named in its lines), by task index;
    `skips`: the steps and updates dropped in this stage (saved with a checkpoint)."""

    def __init__(self, ppo: PPOConfig, accelerator: Accelerator, backend: Backend, rewards: list):
        self.ppo, self.accelerator, self.backend, self.rewards = ppo, accelerator, backend, rewards
        self.skips = 0

    def rollout_fault(self, batch: Rollout, step: int) -> str | None:
        """What in step `step`'s rollout is non-finite (counted over every process, so all agree), or None."""
        real = batch.response_mask.bool()
        per_token = {name: x for name, x in (("log-probs of the policy", batch.old_logprobs),
                                             ("log-probs of the reference", batch.ref_logprobs)) if x is not None}
        if batch.old_values is not None:
            per_token["value estimates of the critic"] = batch.old_values
        if batch.anchor_logprobs is not None:
            per_token["log-probs of the previous task's policy"] = batch.anchor_logprobs
        sources = batch.raw_scores.unsqueeze(1) if batch.source_scores is None else batch.source_scores
        bad_score = ~torch.isfinite(sources)  # (B, K)
        scorers = [(j, k) for j, reward in enumerate(self.rewards) for k in range(len(reward.sources))]
        counts = torch.stack([*((bad_score[:, k] & (batch.task == j)).sum() for j, k in scorers),
                              *((~torch.isfinite(x) & real).any(-1).sum() for x in per_token.values())]).float()
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        counts = [int(c) for c in counts.tolist()]
        total, where = self.ppo.rollout_batch_size, f"step {step}"
        for (j, k), count in zip(scorers, counts[:len(scorers)], strict=True):
            if count:
                return (f"{where}: {self.rewards[j].sources[k]} returned a non-finite score for {count} of {total} "
                        "rollouts")
        for name, count in zip(per_token, counts[len(scorers):], strict=True):
            if count:
                return f"{where}: the {name} are non-finite in {count} of {total} rollouts"
        return None

    def update_fault(self, update: dict[str, torch.Tensor], grad_norm: torch.Tensor | None) -> str | None:
        """Which loss terms of one update, or its gradient norm (None: not known before the step), are
        non-finite on any process, or None. Under fp16 the loss scaler skips non-finite gradients itself."""
        checked = {k: v for k, v in update.items() if k.startswith("loss/") and k != "loss/total"}
        if self.backend.precision != "fp16" and grad_norm is not None:
            checked["policy/grad_norm"] = grad_norm
        names = list(checked)
        bad = torch.stack([~torch.isfinite(torch.as_tensor(checked[k])) for k in names]).float()
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="max")
        found = [name for name, flag in zip(names, bad.tolist(), strict=True) if flag]
        if not found:
            return None
        terms = [n.removeprefix("loss/") for n in found if n.startswith("loss/")]
        return f"loss term {', '.join(terms)} is" if len(terms) == 1 else \
            f"loss terms {', '.join(terms)} are" if terms else "the gradient norm is"

    def skip_or_stop(self, fault: str, update: bool = False) -> None:
        """`on_nonfinite: stop` (or too many skips): one line, before anything reaches the weights."""
        pcfg = self.ppo
        cannot_skip = update and not self.backend.can_skip_update
        if pcfg.on_nonfinite == "stop" or self.skips >= pcfg.max_nonfinite_skips or cannot_skip:
            why = "" if pcfg.on_nonfinite == "stop" else \
                f" ({self.backend.name} cannot drop an update after its backward)" if cannot_skip else \
                f" ({self.skips} skipped before)"
            raise UserError(f"{fault}{why}; stopped before the optimiser step: nothing non-finite reached the "
                            "weights and the last checkpoint is intact (ppo.on_nonfinite: skip drops such "
                            "steps and updates)")
        self.skips += 1
        if self.accelerator.is_main_process:
            print(f"cppo: {fault}; skipped ({self.skips} of at most {pcfg.max_nonfinite_skips})",
                  file=sys.stderr, flush=True)
