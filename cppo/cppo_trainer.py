"""CPPO (docs/algorithm.md §3–§5, §8): the PPO loop of `cppo.trainer` with two of its hooks overridden: per-rollout α
and β from the five rollout types (`prepare_losses`) and the knowledge-retention term (`extra_losses`), on the current
rollouts or on entries of the rollout memory of earlier tasks (`cppo.memory`)."""

from __future__ import annotations

import time

import torch

from . import core
from .config import Config
from .memory import MemoryBatch, RolloutMemory, memory_denominator, retention_loss
from .rollout import Rollout
from .session import Session, Stage
from .trainer import PPOTrainer
from .weighting import apply_ablation, batch_stats, heuristic_weights, learned_weights


class CPPOTrainer(PPOTrainer):
    """CPPO (docs/algorithm.md §3–§5): PPO whose rollouts are typed by (ℓ, R) and weighted by α in the policy loss
    and by β in the knowledge-retention term KR = Σ β m (log π_θ − log π_anchor)² / Σ β m.

    With `kr_anchor: previous_task` and `kl_reference: previous_task` the anchor and the KL reference
    are the same frozen π_{t−1}, so KR reuses the reference log-probs: no extra model pass.

    With a rollout `memory` of earlier tasks (docs/algorithm.md §8) each step draws a memory batch (`retrieve_memory`);
    its entries ride along with the rollouts of every micro-batch (`update_extras`, `extra_rows`) and add
    the memory term c_mem·KR_mem (`extra_losses`).
    """

    def __init__(self, session: Session, stage: Stage, regularizer=None, memory: RolloutMemory | None = None):
        self.memory = memory
        self.memory_batch: MemoryBatch | None = None  # the step's retrieved entries (prepare_losses)
        super().__init__(session, stage, regularizer)

    def prepare_losses(self, batch: Rollout, kl: torch.Tensor) -> dict[str, float]:
        ccfg = self.config.cppo
        # The five types need μ and σ over the whole batch: ℓ and R are computed on the gathered batch,
        # so the same rollouts give bit-identical statistics on any number of processes.
        mask = self.backend.gather_rows(batch.response_mask)
        # ℓ_i: mean token log-prob of the response [resolution: docs/algorithm.md §3]; R_i: score or shaped score.
        every_logprob = (self.backend.gather_rows(batch.old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        every_reward = self.backend.gather_rows(batch.scores)
        if ccfg.stats_reward == "shaped":
            every_reward = every_reward - self.kl_coef * (self.backend.gather_rows(kl) * mask).sum(-1)
        if ccfg.weighting == "learned":
            alpha, beta, types = learned_weights(every_logprob, every_reward, ccfg.k, ccfg.lb, ccfg.ub, ccfg.tau,
                                                 ccfg.coef_lr, ccfg.coef_steps, ccfg.coef_tol)
        else:
            alpha, beta, types = heuristic_weights(every_logprob, every_reward, ccfg.k, ccfg.lb, ccfg.ub,
                                                   ccfg.weighting)
        alpha, beta = apply_ablation(alpha.to(self.device), beta.to(self.device), ccfg.ablation)
        local_alpha = self.backend.local_rows(alpha, batch.scores)
        local_beta = self.backend.local_rows(beta, batch.scores)
        batch.loss_weights = {"policy": local_alpha, "value": local_alpha if ccfg.alpha_weights_value_loss else None}
        if ccfg.kr_source != "memory":
            batch.loss_weights["kr"] = local_beta
            if ccfg.kr_anchor == "rollout":
                batch.anchor_logprobs = batch.old_logprobs
            elif batch.anchor_logprobs is None:  # π_{t−1} is the KL reference: reuse its log-probs
                batch.anchor_logprobs = batch.ref_logprobs
        self.kr_active = bool(beta.any())  # the same on every process: β is the global batch's
        stats = self.weight_stats(every_logprob, every_reward, alpha, beta, types)
        if self.memory is not None:
            stats.update(self.retrieve_memory(batch))
        return stats

    def retrieve_memory(self, batch: Rollout) -> dict[str, float]:
        """The step's memory batch (docs/algorithm.md §8, retrieve): the same entries on every process, keyed by the
        global batch's prompts for `retrieve: similar`. Returns what the memory holds and what was drawn, per task."""
        started = time.perf_counter()
        mcfg, memory, names = self.config.memory, self.memory, [t.name for t in self.config.tasks]
        self.memory_batch = None
        stats = {"memory/size": float(len(memory))}
        stats.update({f"memory/size/{names[task]}": float(n) for task, n in memory.task_counts().items()})
        if not len(memory):
            return stats
        query = None
        if mcfg.retrieve == "similar":
            ids, mask = self.backend.gather_rows(batch.prompt_ids), self.backend.gather_rows(batch.prompt_mask)
            query = [row[keep.bool()].tolist() for row, keep in zip(ids, mask, strict=True)]
        self.memory_batch = memory.batch(memory.retrieve(mcfg.batch_size, query), self.tokenizer.pad_token_id,
                                         self.device)
        drawn = torch.bincount(self.memory_batch.task.cpu(), minlength=len(names))
        stats.update({f"memory/retrieved/{names[task]}": float(drawn[task]) for task in memory.task_counts()})
        stats["memory/tokens"] = float(self.memory_batch.response_mask.sum())
        stats["time/memory_retrieve_s"] = time.perf_counter() - started
        return stats

    def reads_reference(self) -> bool:
        # KR on the rollouts anchored to π_{t−1} reads the reference's log-probs when π_{t−1} is the reference.
        kr_on_reference = (self.config.cppo.kr_source != "memory" and self.config.cppo.kr_anchor == "previous_task"
                           and self.anchor_policy is None)
        return super().reads_reference() or kr_on_reference

    def reads_rollout_logprobs(self) -> bool:
        return True  # ℓ, the rollout statistic of the five types, is π_roll's (docs/algorithm.md §3)

    def update_extras(self, micro_batches: int) -> list[tuple[MemoryBatch | None, torch.Tensor] | None]:
        """This process's part of the step's memory batch, split over the micro-batches of an update, each with
        the memory term's denominator (the whole memory batch's, ÷ processes like `loss_denominators`)."""
        if self.memory is None:
            return [None] * micro_batches
        if self.memory_batch is None:  # nothing remembered yet (the first task): the term is 0
            return [(None, torch.ones((), device=self.device))] * micro_batches
        acc = self.accelerator
        denominator = memory_denominator(self.memory_batch, self.config.memory.loss) / acc.num_processes
        mine = self.memory_batch.parts(acc.num_processes)[acc.process_index]
        return [(part, denominator) for part in mine.parts(micro_batches)]

    def extra_rows(self, extra) -> MemoryBatch | None:
        entries = None if extra is None else extra[0]
        return entries if entries is not None and len(entries) else None

    def extra_losses(self, batch: Rollout, logprobs: torch.Tensor, denominators: dict[str, torch.Tensor],
                     extra=None, extra_logprobs: torch.Tensor | None = None) -> dict[str, tuple[float, torch.Tensor]]:
        terms = {}
        if "kr" in batch.loss_weights:  # KR on the current rollouts (not with kr_source: memory)
            kr_coef = self.config.cppo.kr_coef
            if not self.kr_active:  # β ≡ 0 over the batch: KR is 0 (docs/algorithm.md §5), skip its arithmetic
                terms["kr"] = (kr_coef, torch.zeros((), device=logprobs.device))
            else:
                squared = (logprobs - batch.anchor_logprobs) ** 2
                terms["kr"] = (kr_coef, core.masked_mean(squared, batch.response_mask, batch.loss_weights["kr"],
                                                         denominators["kr"]))
        # the memory term (docs/algorithm.md §8): 0 while the memory is empty or this part has no entry
        if extra is not None:
            mcfg = self.config.memory
            entries, denominator = extra
            terms["memory"] = (mcfg.kr_coef, torch.zeros((), device=logprobs.device) if extra_logprobs is None else
                               retention_loss(extra_logprobs, entries.logprobs, entries.response_mask, entries.beta,
                                              denominator, mcfg.loss))
        return terms

    def weight_stats(self, logprob_mean: torch.Tensor, reward: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                     types: torch.Tensor) -> dict[str, float]:
        stats = batch_stats(logprob_mean, reward)
        counts = torch.bincount(types.cpu(), minlength=6)[1:].double() / types.numel()
        out = {f"cppo/frac_r{j}": counts[j - 1].item() for j in range(1, 6)}
        spread = (lambda x: x.std().item()) if alpha.numel() > 1 else (lambda x: 0.0)
        out.update({
            "cppo/alpha_mean": alpha.mean().item(), "cppo/alpha_std": spread(alpha),
            "cppo/beta_mean": beta.mean().item(), "cppo/beta_std": spread(beta),
            "cppo/logprob_mu": stats.logprob_mu, "cppo/logprob_sigma": stats.logprob_sigma,
            "cppo/reward_mu": stats.reward_mu, "cppo/reward_sigma": stats.reward_sigma,
            "cppo/degenerate": float(stats.degenerate),
        })
        return out


def trainer_class(config: Config) -> type[PPOTrainer]:
    return CPPOTrainer if config.algo == "cppo" else PPOTrainer
