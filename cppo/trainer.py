"""The PPO loop for causal language models (SPEC §2), with the hooks CPPO overrides (SPEC §5).

One step reads top to bottom in `PPOTrainer.step`: rollout → scores → KL-shaped rewards → advantages
→ per-rollout loss weights (the `prepare_losses` hook) → epochs of mini-batch updates → KL controller → stats.
Statistics over the batch are taken on the batch gathered from every process, in `gather_rows`.
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from . import core
from .config import Config, UserError
from .data import PromptStream, check_data_source, left_pad, load_prompts, tokenize_prompts
from .models import (
    ActorCritic,
    load_frozen,
    load_policy,
    load_tokenizer,
    load_value_model,
    resolve_model_source,
)
from .rewards import CallableReward, ModelReward, import_reward_function
from .rollout import Rollout, generate, response_logprobs, response_values
from .tracking import Tracker
from .weighting import apply_ablation, batch_stats, heuristic_weights, learned_weights


class RunningMoments:
    """Running mean and standard deviation of every score seen so far (reward.normalize: running)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        # Chan et al.'s parallel update: merge the batch's moments into the running ones.
        n, mean, m2 = x.numel(), x.double().mean().item(), ((x.double() - x.double().mean()) ** 2).sum().item()
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]


def check_sources(config: Config) -> None:
    """Every path and import the run needs, checked before any model loads."""
    resolve_model_source(config.model.policy, "model.policy")
    for name in ("tokenizer", "value_model"):
        if getattr(config.model, name) is not None:
            resolve_model_source(getattr(config.model, name), f"model.{name}")
    if config.reward.model is not None:
        resolve_model_source(config.reward.model, "reward.model")
    else:
        import_reward_function(config.reward.function)
    check_data_source(config.data)


class PPOTrainer:
    """PPO with a separate critic, a frozen reference policy and a reward model or function.

    Subclasses change the algorithm through two hooks, never the loop: `prepare_losses` (per-rollout
    weights of each loss term, and anything else the terms need) and `extra_losses` (added terms).
    """

    def __init__(self, config: Config, accelerator: Accelerator | None = None):
        self.config = config
        check_sources(config)
        # cpu=True without an accelerator makes a multi-process launch use gloo on the CPU.
        self.accelerator = accelerator or Accelerator(
            cpu=not torch.accelerator.is_available(), mixed_precision=config.mixed_precision,
            log_with=config.report_to or None, project_dir=config.output_dir)
        config.validate(self.accelerator.num_processes)
        # A different seed per process, so processes sample different responses.
        set_seed(config.seed, device_specific=True)
        self.device = self.accelerator.device
        mcfg = config.model

        policy_source = resolve_model_source(mcfg.policy, "model.policy")
        self.tokenizer = load_tokenizer(
            resolve_model_source(mcfg.tokenizer, "model.tokenizer") if mcfg.tokenizer else policy_source,
            mcfg.trust_remote_code)
        self.stop_token_id = self._stop_token_id()
        prompts = load_prompts(config.data)
        self.prompt_ids, self.prompt_texts, self.prompt_counts = tokenize_prompts(
            prompts, self.tokenizer, config.data.max_prompt_length, config.data.long_prompts)
        self.prompt_stream = PromptStream(len(self.prompt_ids), config.seed)
        self.reward = self._build_reward()

        pad = self.tokenizer.pad_token_id
        policy = load_policy(policy_source, mcfg, pad)
        # With LoRA the reference is the same weights with the adapters switched off: no second copy.
        self.ref_policy = None if mcfg.lora_r > 0 else load_frozen(
            "AutoModelForCausalLM", policy_source, mcfg, pad).to(self.device)
        value_source = mcfg.value_model or (config.reward.model if mcfg.value_init == "reward_model" else mcfg.policy)
        value_model = load_value_model(resolve_model_source(value_source, "model.value_model"), mcfg, pad)
        model = ActorCritic(policy, value_model)
        self.optimizer = self._build_optimizer(model)
        self.model, self.optimizer = self.accelerator.prepare(model, self.optimizer)
        self.scheduler = self._build_scheduler()

        from transformers import GenerationConfig

        gcfg = config.generation
        self.generation_config = GenerationConfig(
            do_sample=True, max_new_tokens=gcfg.max_new_tokens, temperature=gcfg.temperature, top_k=gcfg.top_k,
            top_p=gcfg.top_p, eos_token_id=self.stop_token_id, pad_token_id=pad, bos_token_id=None)
        self.kl_coef = config.ppo.kl_coef
        self.score_moments = RunningMoments()
        self.shuffle_generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        self.global_step = 0
        self.tracker = Tracker(self.accelerator, config)

    # ------------------------------------------------------------------------------------------ setup

    def _stop_token_id(self) -> int | None:
        stop = self.config.generation.stop_token
        if stop is None:
            return None
        if stop == "eos":
            if self.tokenizer.eos_token_id is None:
                raise UserError("generation.stop_token is 'eos' but the tokenizer has no eos token")
            return self.tokenizer.eos_token_id
        token_id = self.tokenizer.convert_tokens_to_ids(stop)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise UserError(f"generation.stop_token must be 'eos', null or a single token, got {stop!r}")
        return token_id

    def _build_reward(self):
        rcfg = self.config.reward
        if rcfg.function is not None:
            return CallableReward(rcfg.function)
        source = resolve_model_source(rcfg.model, "reward.model")
        model = load_frozen("AutoModelForSequenceClassification", source, self.config.model,
                            self.tokenizer.pad_token_id, num_labels=1).to(self.device)
        reward_tokenizer = load_tokenizer(source, self.config.model.trust_remote_code)
        model.config.pad_token_id = reward_tokenizer.pad_token_id
        return ModelReward(model, reward_tokenizer, self.tokenizer, rcfg.batch_size)

    def _build_optimizer(self, model: ActorCritic) -> torch.optim.Optimizer:
        pcfg = self.config.ppo
        groups = [
            {"params": [p for p in model.policy.parameters() if p.requires_grad], "lr": pcfg.learning_rate},
            {"params": [p for p in model.value_model.parameters() if p.requires_grad],
             "lr": pcfg.value_learning_rate or pcfg.learning_rate},
        ]
        return torch.optim.AdamW(groups, weight_decay=pcfg.weight_decay)

    def _build_scheduler(self):
        from transformers import get_scheduler

        pcfg = self.config.ppo
        updates = pcfg.steps * pcfg.ppo_epochs * (pcfg.rollout_batch_size // pcfg.mini_batch_size)
        name = "constant_with_warmup" if pcfg.lr_scheduler == "constant" else pcfg.lr_scheduler
        return get_scheduler(name, self.optimizer.optimizer, num_warmup_steps=pcfg.warmup_steps,
                             num_training_steps=updates)

    @property
    def unwrapped(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------ the loop

    def train(self) -> dict[str, float]:
        """Run the remaining steps, then save the final policy and critic."""
        stats: dict[str, float] = {}
        with self.tracker.progress(self.config.ppo.steps, self.global_step) as progress:
            while self.global_step < self.config.ppo.steps:
                stats = self.step()
                self.global_step += 1
                self.tracker.log(stats, self.global_step)
                progress.update(self.global_step, stats)
        self.save_models(Path(self.config.output_dir))
        self.tracker.finish()
        return stats

    def step(self) -> dict[str, float]:
        """One PPO step on the next batch of prompts; returns the step's global stats."""
        start = time.perf_counter()
        batch, generate_s = self.make_rollout()
        batch.scores = self.process_scores(batch.raw_scores, batch.stopped)
        kl = core.kl_penalty(batch.old_logprobs, batch.ref_logprobs, self.config.ppo.kl_estimator)
        rewards = core.shaped_rewards(batch.scores, kl, batch.response_mask, self.kl_coef)
        batch.advantages, batch.returns = core.gae(rewards, batch.old_values, batch.response_mask,
                                                   self.config.ppo.gamma, self.config.ppo.lam)
        if self.config.ppo.whiten_advantages:
            batch.advantages = self.whiten(batch.advantages, batch.response_mask)
        weight_stats = self.prepare_losses(batch, kl)
        train_start = time.perf_counter()
        train_stats = self.optimise(batch)
        sequence_kl = (kl * batch.response_mask).sum(-1)
        stats = self.rollout_stats(batch, sequence_kl)
        self.update_kl_coef(stats["kl/mean"])
        end = time.perf_counter()
        stats.update(train_stats)
        stats.update(weight_stats)
        stats.update({
            "time/step_s": end - start,
            "time/generate_s": generate_s,
            "time/train_s": end - train_start,
            "tokens_per_s": stats["response/tokens"] / (end - start),
            "lr": self.scheduler.get_last_lr()[0],
        })
        return stats

    # -------------------------------------------------------------------------------- the rollout

    def make_rollout(self) -> tuple[Rollout, float]:
        """Generate this process's share of the next prompt batch and score it."""
        pcfg, gcfg = self.config.ppo, self.config.generation
        acc = self.accelerator
        indices = self.prompt_stream.next_indices(pcfg.rollout_batch_size, acc.process_index, acc.num_processes)
        prompt_ids, prompt_mask = left_pad([self.prompt_ids[i] for i in indices], self.tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        local = len(indices)
        model = self.unwrapped
        model.eval()
        started = time.perf_counter()
        with acc.autocast():
            responses, response_mask, stopped = generate(
                model.policy, prompt_ids, prompt_mask, self.generation_config, self.stop_token_id,
                self.tokenizer.pad_token_id, gcfg.batch_size or local)
        generate_s = time.perf_counter() - started
        input_ids = torch.cat([prompt_ids, responses], 1)
        attention_mask = torch.cat([prompt_mask, response_mask], 1)
        chunk = pcfg.forward_batch_size or local
        temperature = gcfg.temperature
        with acc.autocast():
            old_logprobs, entropy = response_logprobs(model.policy, input_ids, attention_mask, responses,
                                                      temperature, chunk, with_entropy=True)
            with self.reference_policy() as ref:
                ref_logprobs, _ = response_logprobs(ref, input_ids, attention_mask, responses, temperature, chunk)
            old_values = response_values(model.value_model, input_ids, attention_mask, responses.shape[1], chunk)
        prompts = [self.prompt_texts[i] for i in indices]
        completions = self.tokenizer.batch_decode(responses, skip_special_tokens=True)
        raw_scores = self.reward(prompts, completions, input_ids, attention_mask).to(self.device)
        model.train()
        batch = Rollout(prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=responses,
                        response_mask=response_mask, stopped=stopped, old_logprobs=old_logprobs,
                        ref_logprobs=ref_logprobs, old_values=old_values, entropy=entropy, raw_scores=raw_scores)
        return batch, generate_s

    @contextlib.contextmanager
    def reference_policy(self):
        """The frozen reference: its own model, or the policy with LoRA adapters switched off."""
        if self.ref_policy is not None:
            yield self.ref_policy
        else:
            policy = self.unwrapped.policy
            with policy.disable_adapter():
                yield policy

    def process_scores(self, raw_scores: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
        """Raw scores → normalised (batch or running moments) → missing-EOS penalty → clipped."""
        rcfg = self.config.reward
        scores = raw_scores.float()
        if rcfg.normalize == "batch":
            everything = self.gather_rows(scores)
            scores = (scores - everything.mean()) / (everything.std() + 1e-8)
        elif rcfg.normalize == "running":
            self.score_moments.update(self.gather_rows(scores))
            scores = (scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)
        if rcfg.missing_eos_penalty is not None and self.stop_token_id is not None:
            scores = scores - rcfg.missing_eos_penalty * (~stopped).float()
        if rcfg.clip is not None:
            scores = scores.clamp(-rcfg.clip, rcfg.clip)
        return scores

    # ------------------------------------------------------------------ global (all-process) statistics

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows → the global batch (every process's rows in rank order, columns padded
        with zeros to the widest). Every batch-level statistic is taken on this."""
        if self.accelerator.num_processes == 1:
            return x
        if x.dim() > 1:
            x = self.accelerator.pad_across_processes(x, dim=1, pad_index=0)
        return self.accelerator.gather(x)

    def local_rows(self, global_x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """This process's slice of a gathered tensor, cut back to the local shape of `like`."""
        rows = like.shape[0]
        start = self.accelerator.process_index * rows
        out = global_x[start:start + rows]
        return out[:, :like.shape[1]] if like.dim() > 1 else out

    def whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked whitening with the mean and variance of the global batch (SPEC §2)."""
        whitened = core.masked_whiten(self.gather_rows(x), self.gather_rows(mask))
        return self.local_rows(whitened, x)

    def update_kl_coef(self, sequence_kl: float) -> None:
        pcfg = self.config.ppo
        if pcfg.target_kl is not None:
            self.kl_coef = core.adaptive_kl_coef(self.kl_coef, sequence_kl, pcfg.target_kl, pcfg.kl_horizon,
                                                 pcfg.rollout_batch_size)

    # --------------------------------------------------------------------------------------- hooks

    def prepare_losses(self, batch: Rollout, kl: torch.Tensor) -> dict[str, float]:
        """Fill in what the loss terms need, at least `batch.loss_weights`: per-rollout (B,) weights of
        each term (None for 1), returning stats to log.

        PPO weighs every rollout equally. CPPO sets α for `policy` (and `value`), β for `kr`, and
        the anchor log-probs of KR.
        """
        batch.loss_weights = {"policy": None, "value": None}
        return {}

    def extra_losses(self, batch: Rollout, logprobs: torch.Tensor,
                     denominators: dict[str, torch.Tensor]) -> dict[str, tuple[float, torch.Tensor]]:
        """Loss terms added to PG + c_vf·VF: name → (coefficient, Σ w·m·loss over `batch` divided by
        `denominators[name]`, w = `batch.loss_weights[name]`). PPO has none."""
        return {}

    # ------------------------------------------------------------------------------- the update

    def optimise(self, batch: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of shuffled mini-batches; each mini-batch is one optimiser step made of
        `gradient_accumulation_steps` micro-batches per process."""
        pcfg, acc = self.config.ppo, self.accelerator
        local_mini = pcfg.mini_batch_size // acc.num_processes
        local_micro = local_mini // pcfg.gradient_accumulation_steps
        sums: dict[str, torch.Tensor] = {}  # summed over micro-batches, kept on device: no sync per step
        updates = 0
        self.model.train()
        for _ in range(pcfg.ppo_epochs):
            order = torch.randperm(batch.response_ids.shape[0], generator=self.shuffle_generator)
            for mini in order.split(local_mini):
                micro_batches = mini.split(local_micro)
                denominators = self.loss_denominators(batch, mini)
                for i, rows in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    with contextlib.nullcontext() if last else acc.no_sync(self.model):
                        loss, stats = self.micro_batch_loss(batch.select(rows.to(batch.response_ids.device)),
                                                            denominators)
                        acc.backward(loss)
                    stats["loss/total"] = loss.detach()
                    for key, value in stats.items():
                        # loss terms add up over micro-batches to the mini-batch's value; the rest average
                        share = 1.0 if key.startswith("loss/") else 1.0 / len(micro_batches)
                        sums[key] = sums.get(key, 0.0) + value * share
                if pcfg.max_grad_norm is not None:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), pcfg.max_grad_norm)
                    sums["policy/grad_norm"] = sums.get("policy/grad_norm", 0.0) + grad_norm.detach()
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                updates += 1
        names = sorted(sums)
        means = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device) for k in names])
        means = means / updates
        # Loss terms carry × processes / global denominators: their mean over processes is the global value.
        means = acc.reduce(means, reduction="mean") if acc.num_processes > 1 else means
        return dict(zip(names, means.tolist(), strict=True))

    def loss_denominators(self, batch: Rollout, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each loss term's Σ w·m over the whole mini-batch on all processes, ÷ processes.

        Every micro-batch divides its Σ w·m·loss by this, so the micro-batches add up, and DDP's mean
        over processes gives exactly the mini-batch's Σ w·m·loss / Σ w·m of SPEC §5, however the
        mini-batch is split.
        """
        mask = batch.response_mask[rows]
        names = sorted(batch.loss_weights)
        local = torch.stack([core.weighted_token_count(mask, None if batch.loss_weights[name] is None
                                                       else batch.loss_weights[name][rows]) for name in names])
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, reduction="sum") / self.accelerator.num_processes
        return dict(zip(names, local, strict=True))

    def micro_batch_loss(self, mb: Rollout, denominators: dict[str, torch.Tensor]) -> tuple[torch.Tensor,
                                                                                         dict[str, torch.Tensor]]:
        """This micro-batch's part of the mini-batch loss PG + c_vf·VF + extra terms, and its stats."""
        pcfg = self.config.ppo
        with self.accelerator.autocast():
            logits, values = self.model(mb.input_ids, mb.attention_mask, mb.response_ids.shape[1])
        logprobs = core.logprobs_from_logits(logits, mb.response_ids, self.config.generation.temperature)
        mask = mb.response_mask
        pg, pg_stats = core.policy_loss(logprobs, mb.old_logprobs, mb.advantages, mask, pcfg.clip,
                                        mb.loss_weights["policy"], denominators["policy"])
        vf, vf_stats = core.value_loss(values, mb.old_values, mb.returns, mask, pcfg.value_clip,
                                       mb.loss_weights["value"], denominators["value"])
        terms = {"policy": (1.0, pg), "value": (pcfg.vf_coef, vf), **self.extra_losses(mb, logprobs, denominators)}
        loss = sum(coef * term for coef, term in terms.values())
        stats = {f"loss/{name}": term.detach() for name, (_, term) in terms.items()}
        stats.update({"policy/clipfrac": pg_stats["clipfrac"], "policy/approx_kl": pg_stats["approx_kl"],
                      "value/clipfrac": vf_stats["clipfrac"]})
        return loss, stats

    # --------------------------------------------------------------------------------- reporting

    def rollout_stats(self, batch: Rollout, sequence_kl: torch.Tensor) -> dict[str, float]:
        """Means over the global batch of what the rollout produced."""
        lengths = batch.response_mask.sum(-1).float()
        per_rollout = torch.stack([
            batch.raw_scores.float(), batch.scores.float(), batch.scores.float() - self.kl_coef * sequence_kl,
            sequence_kl, lengths, batch.stopped.float(), (batch.entropy * batch.response_mask).sum(-1),
        ], dim=1)
        everything = self.gather_rows(per_rollout)
        raw, score, shaped, kl, length, stopped, entropy_sum = everything.T
        return {
            "reward/mean": raw.mean().item(),
            "reward/std": raw.std().item() if raw.numel() > 1 else 0.0,
            "reward/score_mean": score.mean().item(),
            "reward/shaped_mean": shaped.mean().item(),
            "kl/mean": kl.mean().item(),
            "kl/coef": self.kl_coef,
            "policy/entropy": (entropy_sum.sum() / length.sum().clamp_min(1)).item(),
            "response/length_mean": length.mean().item(),
            "response/stopped_frac": stopped.mean().item(),
            "response/tokens": length.sum().item(),
        }

    # ------------------------------------------------------------------------------------ saving

    def save_models(self, directory: Path) -> None:
        """The policy (merged if LoRA) and the critic as standard HF directories, with the tokenizer."""
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        model = self.unwrapped
        policy = model.policy
        if self.config.model.lora_r > 0:
            policy.save_pretrained(directory / "policy_adapter")
            import copy

            policy = copy.deepcopy(policy).merge_and_unload()
        policy.save_pretrained(directory / "policy")
        self.tokenizer.save_pretrained(directory / "policy")
        model.value_model.save_pretrained(directory / "value_model")
        self.tokenizer.save_pretrained(directory / "value_model")


class CPPOTrainer(PPOTrainer):
    """CPPO (SPEC §3–§5): PPO whose rollouts are typed by (ℓ, R) and weighted by α in the policy loss
    and by β in the knowledge-retention term KR = Σ β m (log π_θ − log π_anchor)² / Σ β m.

    With `kr_anchor: previous_task` and `kl_reference: previous_task` the anchor and the KL reference
    are the same frozen π_{t−1}, so KR reuses the reference log-probs: no extra model pass.
    """

    def prepare_losses(self, batch: Rollout, kl: torch.Tensor) -> dict[str, float]:
        ccfg = self.config.cppo
        # The five types need μ and σ over the whole batch: ℓ and R are computed on the gathered batch,
        # so the same rollouts give bit-identical statistics on any number of processes.
        mask = self.gather_rows(batch.response_mask)
        # ℓ_i: mean token log-prob of the response [resolution: SPEC §3]; R_i: score or shaped score.
        every_logprob = (self.gather_rows(batch.old_logprobs) * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        every_reward = self.gather_rows(batch.scores)
        if ccfg.stats_reward == "shaped":
            every_reward = every_reward - self.kl_coef * (self.gather_rows(kl) * mask).sum(-1)
        if ccfg.weighting == "learned":
            alpha, beta, types = learned_weights(every_logprob, every_reward, ccfg.k, ccfg.lb, ccfg.ub, ccfg.tau,
                                                 ccfg.coef_lr, ccfg.coef_steps, ccfg.coef_tol)
        else:
            alpha, beta, types = heuristic_weights(every_logprob, every_reward, ccfg.k, ccfg.lb, ccfg.ub,
                                                   ccfg.weighting)
        alpha, beta = apply_ablation(alpha.to(self.device), beta.to(self.device), ccfg.ablation)
        local_alpha, local_beta = self.local_rows(alpha, batch.scores), self.local_rows(beta, batch.scores)
        batch.loss_weights = {"policy": local_alpha, "value": local_alpha if ccfg.alpha_weights_value_loss else None,
                              "kr": local_beta}
        batch.anchor_logprobs = batch.old_logprobs if ccfg.kr_anchor == "rollout" else batch.ref_logprobs
        self.kr_active = bool(beta.any())  # the same on every process: β is the global batch's
        return self.weight_stats(every_logprob, every_reward, alpha, beta, types)

    def extra_losses(self, batch: Rollout, logprobs: torch.Tensor,
                     denominators: dict[str, torch.Tensor]) -> dict[str, tuple[float, torch.Tensor]]:
        kr_coef = self.config.cppo.kr_coef
        if not self.kr_active:  # β ≡ 0 over the batch: KR is 0 (SPEC §5), skip its arithmetic
            return {"kr": (kr_coef, torch.zeros((), device=logprobs.device))}
        squared = (logprobs - batch.anchor_logprobs) ** 2
        return {"kr": (kr_coef, core.masked_mean(squared, batch.response_mask, batch.loss_weights["kr"],
                                                 denominators["kr"]))}

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
