"""The PPO loop for causal language models (docs/algorithm.md §2), with the hooks CPPO overrides (docs/algorithm.md §5).

One step reads top to bottom in `PPOTrainer.step`: rollout → scores → KL-shaped rewards → advantages (GAE, or a
critic-free estimator of §9) → loss weights (`prepare_losses`) → mini-batch updates → KL controller → stats.
Statistics over the batch are taken on the batch gathered from every process, in `gather_rows`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed

from . import core, perf
from .checkpoint import check_stage_state, failpoint, restore_rng, rng_state
from .data import PromptStream, left_pad
from .dynamic_sampling import informative_groups
from .engine import Generated, SeedKey
from .errors import UserError
from .models import load_frozen, load_policy, load_value_model, save_models
from .modules import ActorCritic
from .nonfinite import NonFiniteGuard
from .optim import build_optimizer, build_scheduler
from .outputs import writing
from .rewards import length_penalty
from .rollout import (
    PromptAndResponse,
    Rollout,
    Sampled,
    response_logprobs,
    rollout_passes,
    rollout_stats,
    stack_sequences,
)
from .session import Session, Stage


class PPOTrainer:
    """PPO with a separate critic (or none: `ppo.advantage` rloo, grpo, reinforce_pp), a frozen reference
    policy and reward models or functions.

    It trains one `Stage` (a task, or the union of tasks) of a `Session`. Subclasses change the
    algorithm through hooks, never the loop: `prepare_losses` (per-rollout weights of each loss term, and
    anything else the terms need), `extra_losses` (added terms), and for terms on other sequences than the
    rollouts (CPPO's rollout memory) `update_extras` and `extra_rows`. A continual-learning `regularizer`
    (cppo.continual.regularizers) adds its penalty as one more term.
    """

    def __init__(self, session: Session, stage: Stage, regularizer=None):
        self.session, self.stage, self.regularizer = session, stage, regularizer
        self.backend = session.backend
        self.config = config = session.config
        self.accelerator = session.accelerator
        self.tokenizer = session.tokenizer
        self.tracker = session.tracker
        self.stop_token_ids = session.stop_token_ids
        # A different seed per process, so processes sample different responses.
        set_seed(config.seed, device_specific=True)
        self.device = session.device
        mcfg = config.model
        self.prompt_stream = PromptStream(len(stage.prompts), config.seed)
        self.rewards = session.rewards.stage_rewards(stage.reward_configs)

        pad = self.tokenizer.pad_token_id
        policy = load_policy(stage.policy, mcfg, pad)
        # With LoRA and π_{t−1} as reference, the reference is the policy with its adapters switched
        # off: no second copy.
        shares_weights = mcfg.lora_r > 0 and stage.reference == stage.policy
        self.ref_policy = None if shares_weights else self.backend.place_frozen(load_frozen(
            "AutoModelForCausalLM", stage.reference, mcfg, pad))
        self.anchor_policy = None if stage.anchor is None else self.backend.place_frozen(load_frozen(
            "AutoModelForCausalLM", stage.anchor, mcfg, pad))
        value_model = None if stage.value_model is None else load_value_model(stage.value_model, mcfg, pad)
        model = ActorCritic(policy, value_model, config.ppo.share_prompts, config.ppo.logprob_chunk_size)
        optimizer = build_optimizer(model, config.ppo)
        self.scheduler = build_scheduler(optimizer, config.ppo, stage.steps)
        self.model, self.optimizer = self.backend.prepare(model, optimizer, config)

        gcfg = config.generation
        self.engine = session.engine("generation")  # rollouts, the memory build, importance estimates
        self.decoding = self.engine.decoding(
            {"do_sample": True, "temperature": gcfg.temperature, "top_k": gcfg.top_k, "top_p": gcfg.top_p},
            gcfg.max_new_tokens, "generation.engine")
        pcfg, self.kl_coef = config.ppo, config.ppo.kl_coef
        # What decides the passes a step skips (reads_reference, reads_rollout_logprobs).
        self.kl_used = pcfg.kl_coef > 0 or pcfg.target_kl is not None
        self.single_update = pcfg.ppo_epochs == 1 and pcfg.mini_batch_size == pcfg.rollout_batch_size
        self.guard = NonFiniteGuard(config.ppo, self.accelerator, self.backend, self.rewards)
        self.shuffle_generator = torch.Generator().manual_seed(config.seed + self.accelerator.process_index)
        self.step_in_stage = 0
        self.engine_stats: dict[str, float] = {}  # the engine's own timings in the last rollout
        self.source_stats: dict[str, float] = {}  # the last rollout's reward/<name> (`process_scores`)
        self.last_stats: dict[str, float] = {}  # the stage's last step's stats (the run's summary takes them)
        if regularizer is not None:
            regularizer.task_start(self)

    @property
    def unwrapped(self) -> ActorCritic:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------------ the loop

    @property
    def global_step(self) -> int:
        return self.stage.step_offset + self.step_in_stage

    def train(self, after_step=None) -> dict[str, float]:
        """Run the stage's remaining steps, then save its final policy and critic. `after_step(trainer)`
        is called after each logged step (the runner's checkpointing and preemption)."""
        stage = self.stage
        with self.tracker.progress(stage.steps, self.step_in_stage, stage.name) as progress:
            while self.step_in_stage < stage.steps:
                self.last_stats = self.step()
                self.step_in_stage += 1
                self.tracker.log({"task": stage.name, "task_step": self.step_in_stage, **self.last_stats},
                                 self.global_step)
                progress.update(self.step_in_stage, self.last_stats)
                if after_step is not None:
                    after_step(self)
        self.save_models(stage.output_dir)
        return self.last_stats  # also when resumed after the last step: it comes with the checkpoint

    def close(self) -> None:
        """The stage is over (trained, evaluated, checkpointed): the back end lets go of its models."""
        self.backend.release()
        self.model = self.optimizer = None

    def step(self) -> dict[str, float]:
        """One PPO step on the next batch of prompts; returns the step's global stats."""
        start = time.perf_counter()
        batch, generate_s = self.make_rollout()
        fault = self.guard.rollout_fault(batch, self.global_step + 1)
        if fault is not None:  # nothing of this rollout may reach the weights, the score moments or the KL
            self.guard.skip_or_stop(fault)
            return {"nonfinite/skipped_step": 1.0, "nonfinite/skipped_updates": 0.0,
                    "time/step_s": time.perf_counter() - start, "time/generate_s": generate_s}
        batch.scores = self.process_scores(batch)
        pcfg = self.config.ppo
        # Without one of the two passes nothing reads the rollout's KL (reads_reference, reads_rollout_logprobs):
        # it is 0 for the rewards, whose KL coefficient is then 0 too, and not logged.
        measured = batch.ref_logprobs is not None and batch.old_logprobs is not None
        kl = core.kl_penalty(batch.old_logprobs, batch.ref_logprobs, pcfg.kl_estimator) if measured else \
            torch.zeros_like(batch.response_mask, dtype=torch.float32)
        # With GRPO's `kl_in: loss` the KL is a loss term instead of a part of the reward (docs/algorithm.md §9).
        rewards = core.shaped_rewards(batch.scores, kl, batch.response_mask,
                                      self.kl_coef if pcfg.kl_in == "reward" else 0.0)
        # Each process holds whole prompt groups (rows of one prompt contiguous), so the group estimators
        # need no gather; the whitening of GAE and REINFORCE++ is over the global batch.
        batch.advantages, batch.returns = core.advantages(
            pcfg.advantage, rewards, batch.response_mask, batch.old_values, pcfg.gamma, pcfg.lam,
            self.config.generation.num_generations, pcfg.scale_rewards == "group")
        if core.whitens(pcfg.advantage, pcfg.whiten_advantages):
            batch.advantages = self.whiten(batch.advantages, batch.response_mask)
        weight_stats = self.prepare_losses(batch, kl)
        if pcfg.mask_truncated:  # a response cut at max_new_tokens leaves the policy loss (docs/algorithm.md §10)
            weights = batch.loss_weights["policy"]
            batch.loss_weights["policy"] = batch.stopped.float() * (1.0 if weights is None else weights)
        failpoint(f"step:{self.global_step + 1}:mid")
        train_start = time.perf_counter()
        train_stats = self.optimise(batch)
        sequence_kl = (kl * batch.response_mask).sum(-1)
        stats = rollout_stats(batch, sequence_kl, self.kl_coef, self.backend.gather_rows, measured)
        stats.update({k: float(v) for k, v in self.engine_stats.items()})
        stats.update(self.source_stats)
        if measured:
            self.update_kl_coef(stats["kl/mean"])
        end = time.perf_counter()
        stats.update(train_stats)
        stats.update(weight_stats)
        stats.update({
            "time/step_s": end - start,
            "time/generate_s": generate_s,
            "time/train_s": end - train_start,
            "tokens_per_s": stats["response/tokens"] / (end - start),
            **perf.step_stats(self, batch, end - start, end - train_start),
            "lr": self.scheduler.get_last_lr()[0],
        })
        return stats

    # -------------------------------------------------------------------------------- the rollout

    def make_rollout(self) -> tuple[Rollout, float]:
        """Generate this process's share of the next prompt batch and score it."""
        pcfg, gcfg = self.config.ppo, self.config.generation
        acc = self.accelerator
        group = gcfg.num_generations  # G responses to each prompt, contiguous rows (docs/algorithm.md §9)
        chunk, share, vocab = pcfg.forward_batch_size, pcfg.share_prompts, pcfg.logprob_chunk_size
        temperature, source_scores = gcfg.temperature, None
        with self.backend.whole(self.model) as model:
            model.eval()
            if gcfg.dynamic_sampling:  # groups whose rewards all agree are replaced (docs/algorithm.md §10)
                indices, sampled, source_scores = informative_groups(self, model.policy)
            else:
                prompts = self.prompt_stream.next_indices(pcfg.rollout_batch_size // group, acc.process_index,
                                                          acc.num_processes)
                indices = [i for i in prompts for _ in range(group)]
                key = SeedKey.contiguous(self.config.seed, "rollout", self.global_step,
                                         acc.process_index * len(indices), len(indices))  # global rows
                sampled = self.sample(model.policy, indices, key, logprobs=self.reads_rollout_logprobs())
            reference = self.reference_policy() if self.reads_reference() else contextlib.nullcontext()
            with acc.autocast(), reference as ref:
                passes = rollout_passes(sampled, ref, model.value_model, self.anchor_policy, temperature,
                                        chunk or len(indices), share, vocab)
            model.train()
        source_scores = self.score(indices, sampled) if source_scores is None else source_scores
        batch = Rollout(prompt_ids=sampled.prompt_ids, prompt_mask=sampled.prompt_mask,
                        response_ids=sampled.response_ids, response_mask=sampled.response_mask, stopped=sampled.stopped,
                        old_logprobs=sampled.logprobs, ref_logprobs=passes.ref_logprobs, old_values=passes.old_values,
                        entropy=sampled.entropy, raw_scores=self.rewards.totals(source_scores, sampled.task),
                        task=sampled.task, anchor_logprobs=passes.anchor_logprobs,
                        engine_logprobs=sampled.engine_logprobs, source_scores=source_scores)
        cap = self.config.vllm.importance_sampling_cap
        if batch.engine_logprobs is not None and cap is not None:
            batch.is_weights = (torch.exp(batch.old_logprobs - batch.engine_logprobs).clamp(max=cap)
                                * batch.response_mask)
        self.engine_stats = sampled.engine_stats
        return batch, sampled.generate_s

    def generate(self, policy, indices: list[int], key: SeedKey) -> tuple[Generated, float]:
        """The rollout engine's responses to the stage's prompts `indices` with the rollout decoding, from `policy`
        (in eval mode, inside `backend.whole`), and the seconds it took (loading the weights included)."""
        started = time.perf_counter()
        self.engine.load(policy)
        try:
            generated = self.engine.generate([self.stage.prompts.ids[i] for i in indices], self.decoding, key)
        finally:
            self.engine.release()
        return generated, time.perf_counter() - started

    def sample(self, policy, indices: list[int], key: SeedKey, logprobs: bool = True) -> Sampled:
        """Responses to the stage's prompts `indices` from `policy` (in eval mode, inside `backend.whole`) with
        the rollout decoding, and their log-probs and entropies under it: our own forward, or the engine's own
        log-probs where it returned them and `vllm.logprobs: engine` asks for them. Without `logprobs` (nothing
        reads them before the update: `reads_rollout_logprobs`) there is no forward; an engine that returned
        log-probs of its own still gets them computed (its importance weights and mismatch read them)."""
        return self.sampled_from(policy, indices, *self.generate(policy, indices, key), logprobs)

    def sampled_from(self, policy, indices: list[int], generated: Generated, generate_s: float,
                     logprobs: bool) -> Sampled:
        """`sample`'s result from the engine's responses `generated` to the prompts `indices`."""
        pcfg, gcfg, acc = self.config.ppo, self.config.generation, self.accelerator
        prompts = self.stage.prompts
        prompt_ids, prompt_mask = left_pad([prompts.ids[i] for i in indices], self.tokenizer.pad_token_id)
        prompt_ids, prompt_mask = prompt_ids.to(self.device), prompt_mask.to(self.device)
        responses = generated.response_ids
        input_ids = torch.cat([prompt_ids, responses], 1)
        attention_mask = torch.cat([prompt_mask, generated.response_mask], 1)
        if generated.logprobs is not None and self.config.vllm.logprobs == "engine":
            logprobs, entropy = generated.logprobs, None
        elif generated.logprobs is None and not logprobs:
            logprobs = entropy = None  # the training forward's, detached (reads_rollout_logprobs)
        else:
            with acc.autocast():
                logprobs, entropy = response_logprobs(policy, input_ids, attention_mask, responses,
                                                      gcfg.temperature, pcfg.forward_batch_size or len(indices),
                                                      with_entropy=True, share_prompts=pcfg.share_prompts,
                                                      vocab_chunk=pcfg.logprob_chunk_size)
        task = torch.tensor([prompts.task[i] for i in indices], device=self.device)
        return Sampled(prompt_ids, prompt_mask, responses, generated.response_mask, generated.stopped, logprobs,
                       entropy, task, generate_s, generated.logprobs, generated.stats)

    def score(self, indices: list[int], sampled: Sampled) -> torch.Tensor:
        """Raw scores (B, K) of sampled responses; a failure in the user's reward code stops every process together."""
        raw = failure = None
        try:
            raw = self.rewards.score(self.stage.prompts, indices, self.tokenizer, sampled, sampled.task)
        except UserError as e:  # the user's reward code failed on this process's share
            failure = e
        self.session.fail_together(failure)
        return raw

    @contextlib.contextmanager
    def previous_policy(self):
        """The frozen π_{t−1}: its own model when it is not the KL reference, else the reference."""
        if self.anchor_policy is not None:
            yield self.anchor_policy
        else:
            with self.reference_policy() as ref:
                yield ref

    @contextlib.contextmanager
    def reference_policy(self):
        """The frozen reference: its own model, or the policy with LoRA adapters switched off (then only
        inside `backend.whole`, or in a forward of the wrapped model)."""
        if self.ref_policy is not None:
            yield self.ref_policy
        else:
            policy = self.unwrapped.policy
            with policy.disable_adapter():
                yield policy

    def process_scores(self, batch: Rollout) -> torch.Tensor:
        """Each task's reward R from its sources' raw scores, over the global batch (docs/algorithm.md §2)."""
        sources = batch.raw_scores.unsqueeze(1) if batch.source_scores is None else batch.source_scores
        raw, stopped, task = (self.backend.gather_rows(x) for x in (sources, batch.stopped, batch.task))
        scores = self.rewards.combine(raw, stopped, task, bool(self.stop_token_ids),
                                      self.config.generation.num_generations)
        self.source_stats = self.rewards.source_means(raw, task)
        scores = self.backend.local_rows(scores, batch.stopped)  # DAPO's overlong penalty is part of R (§10 of
        # docs/algorithm.md), here and in the rollout memory's build
        return scores + length_penalty(batch.response_mask.sum(-1), self.config.ppo.overlong_penalty,
                                       self.config.generation.max_new_tokens).to(scores.device)

    # ------------------------------------------------------------------ global (all-process) statistics

    def whiten(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Masked whitening with the mean and variance of the global batch (docs/algorithm.md §2)."""
        whitened = core.masked_whiten(self.backend.gather_rows(x), self.backend.gather_rows(mask))
        return self.backend.local_rows(whitened, x)

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

    def extra_losses(self, batch: Rollout, logprobs: torch.Tensor, denominators: dict[str, torch.Tensor],
                     extra=None, extra_logprobs: torch.Tensor | None = None) -> dict[str, tuple[float, torch.Tensor]]:
        """Loss terms added to PG + c_vf·VF: name → (coefficient, Σ w·m·loss over `batch` divided by
        `denominators[name]`, w = `batch.loss_weights[name]`), and terms on the micro-batch's `extra` (its share of
        `update_extras`) with `extra_logprobs`, the policy's log-probs of the responses of `extra_rows(extra)`
        (None without them). PPO has none."""
        return {}

    def reads_reference(self) -> bool:
        """Whether the step reads the reference's log-probs; if not, their pass is skipped. PPO reads them for the
        KL, in the reward or as a loss term, or to adapt its coefficient to a target; with `kl_coef` 0 and no
        target nothing reads them (the reward and the loss are bit for bit those with the pass)."""
        return self.kl_used

    def reads_rollout_logprobs(self) -> bool:
        """Whether anything before the update reads π_roll's log-probs. If not, and the step makes exactly one
        update on the rollouts just sampled (`ppo_epochs` 1, one mini-batch), they are the training forward's,
        detached (same weights, same tokens: the ratio is 1 by definition, as in TRL's GRPO), and the rollout's
        own pass is skipped. PPO reads them before the update for the KL in the reward, or to adapt the KL
        coefficient to a target; with the KL as a loss term (GRPO's `kl_in: loss`) `loss/kl` measures it."""
        pcfg = self.config.ppo
        return not self.single_update or (self.kl_used and pcfg.kl_in == "reward") or pcfg.target_kl is not None

    def update_extras(self, micro_batches: int) -> list:
        """What each of an update's `micro_batches` micro-batches carries besides its rollouts, the same for
        every update of the step (CPPO: its share of the rollout memory's entries). PPO: nothing."""
        return [None] * micro_batches

    def extra_rows(self, extra) -> PromptAndResponse | None:
        """The sequences of a micro-batch's `extra` that go through the policy's forward with its rollouts
        (prompts left-padded, responses right-padded), or None. PPO: none."""
        return None

    # ------------------------------------------------------------------------------- the update

    def optimise(self, batch: Rollout) -> dict[str, float]:
        """`ppo_epochs` passes of shuffled mini-batches; each mini-batch is one optimiser step made of
        `gradient_accumulation_steps` micro-batches per process."""
        pcfg, acc = self.config.ppo, self.accelerator
        local_mini = pcfg.mini_batch_size // acc.num_processes
        local_micro = local_mini // pcfg.gradient_accumulation_steps
        extras = self.update_extras(pcfg.gradient_accumulation_steps)
        sums: dict[str, torch.Tensor] = {}  # summed over applied updates, kept on device
        updates = skipped = 0
        self.model.train()
        for _ in range(pcfg.ppo_epochs):
            order = torch.randperm(batch.response_ids.shape[0], generator=self.shuffle_generator)
            for mini in order.split(local_mini):
                micro_batches = mini.split(local_micro)
                denominators = self.loss_denominators(batch, mini)
                update: dict[str, torch.Tensor] = {}  # this update's stats, summed over its micro-batches
                for i, rows in enumerate(micro_batches):
                    last = i == len(micro_batches) - 1
                    with self.backend.no_sync(self.model, last):
                        loss, stats = self.micro_batch_loss(batch.select(rows.to(batch.response_ids.device)),
                                                            denominators, last, extras[i])
                        self.backend.backward(self.model, loss)
                    stats["loss/total"] = loss.detach()
                    for key, value in stats.items():
                        # loss terms (and token sums over the mini-batch) add up over micro-batches to the
                        # mini-batch's value; the rest average
                        share = 1.0 if key.startswith("loss/") or key == "policy/entropy" else 1.0 / len(micro_batches)
                        update[key] = update.get(key, 0.0) + value * share
                grad_norm, fault = self.backend.step_unless(
                    self.model, self.optimizer, pcfg.max_grad_norm, functools.partial(self.guard.update_fault, update))
                if fault is None:
                    self.scheduler.step()
                    update["policy/grad_norm"] = grad_norm.detach()
                    for key, value in update.items():
                        sums[key] = sums.get(key, 0.0) + value
                    updates += 1
                else:  # no optimiser step, so no schedule step either: the schedule counts applied updates
                    self.guard.skip_or_stop(f"step {self.global_step + 1}, update {updates + skipped + 1}: {fault} "
                                            "non-finite", update=True)
                    skipped += 1
                self.optimizer.zero_grad(set_to_none=True)
        out = {"nonfinite/skipped_step": 0.0, "nonfinite/skipped_updates": float(skipped)}
        if not updates:  # every update was skipped (the same on every process)
            return out
        names = sorted(sums)
        means = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32, device=self.device) for k in names])
        means = means / updates
        # Loss terms carry × processes / global denominators: their mean over processes is the global value.
        means = acc.reduce(means, reduction="mean") if acc.num_processes > 1 else means
        return {**dict(zip(names, means.tolist(), strict=True)), **out}

    def loss_denominators(self, batch: Rollout, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each loss term's Σ w·m over the whole mini-batch on all processes, ÷ processes.

        Every micro-batch divides its Σ w·m·loss by this, so the micro-batches add up, and DDP's mean
        over processes gives exactly the mini-batch's Σ w·m·loss / Σ w·m of docs/algorithm.md §5, however the
        mini-batch is split.
        """
        mask = batch.response_mask[rows]
        weights = {"tokens": None, **batch.loss_weights}  # plain token count, for token-mean penalties
        names = sorted(weights)
        local = torch.stack([core.weighted_token_count(mask, None if weights[name] is None else weights[name][rows])
                             for name in names])
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, reduction="sum") / self.accelerator.num_processes
        return dict(zip(names, local, strict=True))

    def micro_batch_loss(self, mb: Rollout, denominators: dict[str, torch.Tensor], last_micro: bool = True,
                         extra=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's part of the mini-batch loss PG + c_vf·VF + extra terms, and its stats. `extra`: this
        micro-batch's share of `update_extras`; the sequences `extra_rows` makes of it go through the same
        forward as the rollouts (one pass of every back end's hooks), their log-probs to `extra_losses`."""
        pcfg, temperature = self.config.ppo, self.config.generation.temperature
        rows, width = mb.response_ids.shape
        more = self.extra_rows(extra)
        if more is None:
            input_ids, attention_mask, response_ids = mb.input_ids, mb.attention_mask, mb.response_ids
        else:
            input_ids, attention_mask, response_ids = stack_sequences(mb, more)
        with self.accelerator.autocast():  # without a π_roll pass the entropy statistic is this forward's
            every_logprob, every_entropy, logits, values = self.model(
                input_ids, attention_mask, response_ids, temperature, value_rows=rows,
                entropy=mb.old_logprobs is None or pcfg.entropy_coef > 0,
                logits=self.regularizer is not None and self.regularizer.reads_logits)
        logits, logprobs = None if logits is None else logits[:rows, :width], every_logprob[:rows, :width]
        extra_logprobs = None if more is None else every_logprob[rows:, :more.response_ids.shape[1]]
        mask = mb.response_mask
        old_logprobs = mb.old_logprobs
        if old_logprobs is None:  # one update on the rollouts just sampled: π_roll is π_θ (reads_rollout_logprobs)
            old_logprobs = logprobs.detach()
        pg, pg_stats = core.policy_loss(logprobs, old_logprobs, mb.advantages, mask, pcfg.epsilon_low,
                                        mb.loss_weights["policy"], denominators["policy"], mb.is_weights,
                                        pcfg.epsilon_high, pcfg.ratio_level)
        terms = {"policy": (1.0, pg)}
        stats = {"policy/clipfrac": pg_stats["clipfrac"], "policy/approx_kl": pg_stats["approx_kl"]}
        if values is not None:
            vf, vf_stats = core.value_loss(values[:, :width], mb.old_values, mb.returns, mask, pcfg.value_clip,
                                           mb.loss_weights["value"], denominators["value"])
            terms["value"] = (pcfg.vf_coef, vf)
            stats["value/clipfrac"] = vf_stats["clipfrac"]
        if mb.old_logprobs is None:
            stats["policy/entropy"] = (every_entropy[:rows, :width].detach() * mask).sum() / denominators["tokens"]
        if pcfg.entropy_coef > 0:  # the entropy bonus (docs/algorithm.md §10)
            terms["entropy"] = (-pcfg.entropy_coef,
                                core.entropy_bonus(every_entropy[:rows, :width], mask, denominators["tokens"]))
        if pcfg.kl_in == "loss" and mb.ref_logprobs is not None:  # GRPO's KL term (docs/algorithm.md §9), token mean
            terms["kl"] = (self.kl_coef, core.k3_loss(logprobs, mb.ref_logprobs, mask, denominators["tokens"]))
        terms.update(self.extra_losses(mb, logprobs, denominators, extra, extra_logprobs))
        if self.regularizer is not None:
            terms["reg"] = (self.config.continual.reg_coef,
                            self.regularizer.penalty(self, mb, logits, denominators["tokens"], last_micro))
        loss = sum(coef * term for coef, term in terms.values())
        stats.update({f"loss/{name}": term.detach() for name, (_, term) in terms.items()})
        return loss, stats

    # ----------------------------------------------------------------------------- checkpointing

    def save_state(self, directory: Path) -> dict:
        """Write this process's part of a mid-stage checkpoint into `directory` (every process calls
        it); return the JSON part of the state."""
        acc = self.accelerator
        self.backend.save_training_state(directory, self.model, self.optimizer)
        if acc.is_main_process:
            torch.save(self.scheduler.state_dict(), directory / "scheduler.pt")
        torch.save(rng_state(self.shuffle_generator), directory / f"rng_{acc.process_index}.pt")
        return {"step_in_stage": self.step_in_stage, "kl_coef": self.kl_coef, "nonfinite_skips": self.guard.skips,
                "last_stats": self.last_stats,
                "score_moments": self.rewards.state_dict(),
                "prompt_stream": {**self.prompt_stream.state_dict(), "task": self.stage.name,
                                  "fingerprint": self.stage.prompts.fingerprint()},
                # π_{t−1} and the KL reference by reference: the saved policy directories they load from.
                "start_policy": self.stage.policy, "reference": self.stage.reference,
                "processes": acc.num_processes}

    def load_state(self, directory: Path, state: dict, force: bool = False) -> None:
        """Continue exactly where `save_state` left off: weights, optimiser, schedule, RNG, data position."""
        acc = self.accelerator
        check_stage_state(directory, state, self.stage.name, self.stage.prompts.fingerprint(), acc.num_processes, force)
        self.backend.load_training_state(directory, self.model, self.optimizer)
        self.scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=False))
        restore_rng(torch.load(directory / f"rng_{acc.process_index}.pt", weights_only=False),
                    self.shuffle_generator)
        self.step_in_stage, self.kl_coef = state["step_in_stage"], state["kl_coef"]
        self.guard.skips = state.get("nonfinite_skips", 0)
        self.last_stats = state.get("last_stats", {})
        self.rewards.load_state_dict(state["score_moments"])
        self.prompt_stream.load_state_dict(state["prompt_stream"])

    # ------------------------------------------------------------------------------------ saving

    def save_models(self, directory) -> None:
        """The policy (merged if LoRA) and the critic as standard HF directories, with the tokenizer."""
        self.accelerator.wait_for_everyone()
        self.session.output.claim()
        with self.backend.whole_on_main(self.model) as model:
            if model is not None:
                with writing(directory, "the models of task " + repr(self.stage.name) + " in"):
                    save_models(model, directory, self.config.model, self.tokenizer, self.stage.policy)
        self.accelerator.wait_for_everyone()  # the next task loads what was just written
