"""Continual-learning baselines: penalties that hold the policy near what earlier tasks taught.

One small interface, called by the runner and the trainer:
  task_start(trainer)   the task's training is about to start (θ_{t−1} is the policy now)
  penalty(trainer, mb, logits, token_denominator, last_micro) -> scalar added with `continual.reg_coef`
  task_end(trainer)     the task is trained (importance estimates are taken here)
  state_dict() / load_state_dict(state)

`l2`, `ewc` and `mas` are ½ Σ Ω (θ − θ_{t−1})² over the policy's weights with Ω = 1 (L2), the online
Fisher (EWC) or the MAS importance; they act once per optimiser step. `lwf` is a per-token
distillation KL to π_{t−1} on the current rollouts.
"""

from __future__ import annotations

import torch

from .. import core
from ..data import left_pad
from ..engine import SeedKey
from ..errors import UserError
from ..modules import policy_response_logits


class Regularizer:
    reads_logits = False  # whether `penalty` reads the policy's logits over the vocabulary (else it gets None)

    def task_start(self, trainer) -> None:
        pass

    def penalty(self, trainer, mb, logits: torch.Tensor | None, token_denominator: torch.Tensor,
                last_micro: bool) -> torch.Tensor:
        raise NotImplementedError

    def task_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _trainable(policy: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in policy.named_parameters() if p.requires_grad}


class ParameterPenalty(Regularizer):
    """½ Σ Ω (θ − θ*)² with θ* the policy's weights at the start of the current task."""

    def __init__(self):
        self.anchor: dict[str, torch.Tensor] = {}
        self.importance: dict[str, torch.Tensor] | None = None  # None: Ω ≡ 1

    def task_start(self, trainer) -> None:
        self.anchor = {name: p.detach().clone() for name, p in _trainable(trainer.unwrapped.policy).items()}

    def penalty(self, trainer, mb, logits, token_denominator, last_micro):
        # A penalty on the weights, not on tokens: added once per optimiser step (on the micro-batch
        # whose backward synchronises gradients; DDP's mean over processes leaves it unchanged).
        if not last_micro or not self.anchor:
            return torch.zeros((), device=trainer.device)
        params = _trainable(trainer.unwrapped.policy)
        total = torch.zeros((), device=trainer.device)
        for name, p in params.items():
            squared = (p - self.anchor[name].to(p.device)) ** 2
            if self.importance is not None:
                squared = squared * self.importance[name].to(p.device)
            total = total + squared.sum()
        return 0.5 * total

    # θ* is not state: every task start takes it from the policy it loads (π_{t−1}).
    def state_dict(self) -> dict:
        return {"importance": self.importance}

    def load_state_dict(self, state: dict) -> None:
        self.importance = state["importance"]


class L2(ParameterPenalty):
    """Online L2 to θ_{t−1}."""


class ImportancePenalty(ParameterPenalty):
    """EWC and MAS: per-weight importance, estimated at each task end on responses sampled from the
    task-end policy, normalised to mean 1 and accumulated as Ω ← decay·Ω + Ω_t."""

    def __init__(self, samples: int, decay: float, seed: int):
        super().__init__()
        self.samples, self.decay, self.seed = samples, decay, seed

    def penalty(self, trainer, mb, logits, token_denominator, last_micro):
        if self.importance is None:  # the first task: nothing learnt before it to protect
            return torch.zeros((), device=trainer.device)
        return super().penalty(trainer, mb, logits, token_denominator, last_micro)

    def sample_importance(self, policy, logits: torch.Tensor, response_mask: torch.Tensor,
                          response_ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """The scalar whose gradient, for one sampled sequence, measures the weights' importance."""
        raise NotImplementedError

    def task_end(self, trainer) -> None:
        with trainer.backend.whole(trainer.model) as model:
            new = self._importance(trainer, model.policy)
        mean = torch.cat([t.flatten() for t in new.values()]).mean().clamp_min(1e-30)
        new = {name: t / mean for name, t in new.items()}
        if self.importance is None:
            self.importance = new
        else:
            self.importance = {name: self.decay * self.importance[name] + new[name] for name in new}

    def _importance(self, trainer, policy) -> dict[str, torch.Tensor]:
        """This task's importance per trainable weight, averaged over the sampled sequences of every process."""
        acc = trainer.accelerator
        params = _trainable(policy)
        prompts = trainer.stage.prompts
        generator = torch.Generator().manual_seed(self.seed + trainer.stage.step_offset)
        chosen = torch.randperm(len(prompts), generator=generator)[:self.samples].tolist()
        rows = range(acc.process_index, len(chosen), acc.num_processes)
        mine = [chosen[row] for row in rows]
        totals = {name: torch.zeros_like(p) for name, p in params.items()}
        if mine:
            prompt_ids, prompt_mask = left_pad([prompts.ids[i] for i in mine], trainer.tokenizer.pad_token_id)
            prompt_ids, prompt_mask = prompt_ids.to(trainer.device), prompt_mask.to(trainer.device)
            policy.eval()
            # Responses sampled autoregressively from the task-end policy, as in the Fisher's definition, by the
            # rollout engine (as the rollouts and the memory build are).
            key = SeedKey(trainer.config.seed, "importance", trainer.stage.step_offset, tuple(rows))
            generated, _ = trainer.generate(policy, mine, key)
            responses, response_mask = generated.response_ids, generated.response_mask
            for row in range(len(mine)):  # one gradient per sequence: squared/abs per sequence, then averaged
                ids = torch.cat([prompt_ids[row:row + 1], responses[row:row + 1]], 1)
                mask = torch.cat([prompt_mask[row:row + 1], response_mask[row:row + 1]], 1)
                logits = policy_response_logits(policy, ids, mask, responses.shape[1])
                target = self.sample_importance(policy, logits, response_mask[row:row + 1], responses[row:row + 1],
                                                trainer.config.generation.temperature)
                grads = torch.autograd.grad(target, list(params.values()))
                for (name, _), grad in zip(params.items(), grads, strict=True):
                    totals[name] += self.accumulate(grad)
            policy.train()
        count = max(len(chosen), 1)
        return {name: acc.reduce(t, reduction="sum") / count if acc.num_processes > 1 else t / count
                for name, t in totals.items()}

    @staticmethod
    def accumulate(grad: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {**super().state_dict(), "samples": self.samples, "decay": self.decay}


class EWC(ImportancePenalty):
    """Online EWC: diagonal Fisher E[(∂ log π(y|x)/∂θ)²] over sampled responses y ~ π(·|x)."""

    def sample_importance(self, policy, logits, response_mask, response_ids, temperature):
        return (core.logprobs_from_logits(logits, response_ids, temperature) * response_mask).sum()

    @staticmethod
    def accumulate(grad):
        return grad.detach() ** 2


class MAS(ImportancePenalty):
    """Memory-aware synapses: E|∂ ‖log-softmax outputs at the response tokens‖² / ∂θ|."""

    def sample_importance(self, policy, logits, response_mask, response_ids, temperature):
        log_probs = (logits.float() / temperature).log_softmax(-1)
        return ((log_probs ** 2).sum(-1) * response_mask).sum()

    @staticmethod
    def accumulate(grad):
        return grad.detach().abs()


class LwF(Regularizer):
    """Learning without forgetting: T²·KL(softmax(z_{t−1}/T) ‖ softmax(z_θ/T)) over the full vocabulary
    at each response token of the current rollouts, a token mean like the policy loss."""

    reads_logits = True

    def __init__(self, temperature: float):
        self.temperature = temperature

    def penalty(self, trainer, mb, logits, token_denominator, last_micro):
        t = self.temperature
        with torch.no_grad(), trainer.previous_policy() as previous:
            previous_logits = policy_response_logits(previous, mb.input_ids, mb.attention_mask,
                                                     mb.response_ids.shape[1], trainer.config.ppo.share_prompts)
        previous_logp = (previous_logits.float() / t).log_softmax(-1)
        current_logp = (logits.float() / t).log_softmax(-1)
        kl = (previous_logp.exp() * (previous_logp - current_logp)).sum(-1) * t * t
        return core.masked_mean(kl, mb.response_mask, None, token_denominator)


def build_regularizer(config, backend) -> Regularizer | None:
    """The configured baseline, or None; one line, before any model loads, where the back end cannot
    compute it."""
    ccfg = config.continual
    if backend.sharded_weights and ccfg.regularizer in ("l2", "ewc", "mas"):
        raise UserError(f"continual.regularizer {ccfg.regularizer} penalises every weight against a whole copy and "
                        f"needs whole weights in each process; {backend.name} shards them (use DDP or DeepSpeed "
                        "ZeRO-2, or regularizer lwf)")
    if backend.sharded_weights and ccfg.regularizer == "lwf" and config.model.lora_r > 0:
        raise UserError(f"continual.regularizer lwf with model.lora_r {config.model.lora_r} reads π_{{t−1}} as the "
                        f"policy with its adapters off inside every update, a forward {backend.name} cannot make on "
                        "sharded weights (use DDP or DeepSpeed ZeRO-2, or model.lora_r 0)")
    if ccfg.regularizer == "l2":
        return L2()
    if ccfg.regularizer == "ewc":
        return EWC(ccfg.importance_samples, ccfg.importance_decay, config.seed)
    if ccfg.regularizer == "mas":
        return MAS(ccfg.importance_samples, ccfg.importance_decay, config.seed)
    if ccfg.regularizer == "lwf":
        return LwF(ccfg.lwf_temperature)
    return None
