"""Generation and scoring of one rollout batch: sampled responses, cut at the stop token, with the
log-probs of the policy and the reference, the critic's values, and the raw reward scores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import torch
from torch import nn

from .modules import response_logprobs_and_entropy, token_scalars


class PromptAndResponse:
    """Rows of left-padded prompts (`prompt_ids`, `prompt_mask`) followed by right-padded responses
    (`response_ids`, `response_mask`): the whole sequences a model reads."""

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.response_mask], dim=1)


@dataclass
class Sequences(PromptAndResponse):
    """B left-padded prompts (B, P) and their right-padded responses (B, R), with their masks."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor


@dataclass
class Rollout(PromptAndResponse):
    """One process's share of a rollout batch. B rollouts, P prompt columns (left-padded), R response
    columns (right-padded; `response_mask` marks the tokens up to and including the stop token)."""

    prompt_ids: torch.Tensor  # (B, P)
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R)
    response_mask: torch.Tensor  # (B, R)
    stopped: torch.Tensor  # (B,) bool: the response ends with the stop token
    old_logprobs: torch.Tensor | None  # (B, R) log π_roll of each response token (None: the training forward's)
    ref_logprobs: torch.Tensor | None  # (B, R) log π_ref of each response token (None: nothing reads them)
    old_values: torch.Tensor | None  # (B, R) critic's values at rollout time (None: critic-free, docs/algorithm.md §9)
    entropy: torch.Tensor | None  # (B, R) entropy of π_roll at each response position (None: not computed)
    raw_scores: torch.Tensor  # (B,) raw reward Σ_k w_k raw_k of the task's sources (one source: its raw score)
    task: torch.Tensor | None = None  # (B,) index of each prompt's task (each is scored by its own reward)
    anchor_logprobs: torch.Tensor | None = None  # (B, R) log π_{t−1}, when π_{t−1} is not the reference
    engine_logprobs: torch.Tensor | None = None  # (B, R) the vLLM engine's sampling log-probs
    is_weights: torch.Tensor | None = None  # (B, R) truncated importance weights min(π_roll/π_vllm, cap)
    source_scores: torch.Tensor | None = None  # (B, K) each reward source's raw score (None: `raw_scores` is the one)
    # Filled in by the trainer after the rollout:
    scores: torch.Tensor | None = None  # (B,) reward after clipping / normalisation / EOS penalty
    advantages: torch.Tensor | None = None  # (B, R)
    returns: torch.Tensor | None = None  # (B, R)
    loss_weights: dict[str, torch.Tensor | None] = field(default_factory=dict)  # per loss term, (B,) or None

    def select(self, index: torch.Tensor) -> Rollout:
        """Rows `index`, with the padding columns no selected row uses trimmed away (leading prompt
        columns, trailing response columns): fewer positions to run through the models."""
        response_width = int(self.response_mask[index].sum(-1).max())
        prompt_width = int(self.prompt_mask[index].sum(-1).max())

        def take(name: str, value):
            if isinstance(value, dict):
                return {k: take(name, v) for k, v in value.items()}
            if not isinstance(value, torch.Tensor):
                return value
            value = value[index]
            if value.dim() == 2:
                value = value[:, -prompt_width:] if name.startswith("prompt") else value[:, :response_width]
            return value

        return replace(self, **{f.name: take(f.name, getattr(self, f.name)) for f in fields(self)})


@dataclass
class Sampled(PromptAndResponse):
    """Responses sampled from a policy for B prompts, with their log-probs and entropies under it."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P)
    response_ids: torch.Tensor  # (B, R) right-padded
    response_mask: torch.Tensor  # (B, R)
    stopped: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor | None  # (B, R) at the rollout temperature (None: not computed, see PPOTrainer.sample)
    entropy: torch.Tensor | None  # (B, R); None with the vLLM engine's log-probs (`vllm.logprobs: engine`)
    task: torch.Tensor  # (B,) task index of each prompt
    generate_s: float  # seconds spent in generation
    engine_logprobs: torch.Tensor | None = None  # (B, R) the vLLM engine's own sampling log-probs
    engine_stats: dict = field(default_factory=dict)  # the engine's timings


def stack_sequences(*parts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of several batches with `prompt_ids`, `prompt_mask`, `response_ids` and `response_mask` (a
    `Rollout`, a memory batch) as one: prompts left-padded and responses right-padded to the widest.
    Returns (input_ids, attention_mask, response_ids); the padding is masked, so each row's outputs at its
    own positions are those of its own batch."""
    prompt_width = max(p.prompt_ids.shape[1] for p in parts)
    response_width = max(p.response_ids.shape[1] for p in parts)
    ids, masks, responses = [], [], []
    for p in parts:
        left, right = prompt_width - p.prompt_ids.shape[1], response_width - p.response_ids.shape[1]
        response = nn.functional.pad(p.response_ids, (0, right))
        ids.append(torch.cat([nn.functional.pad(p.prompt_ids, (left, 0)), response], 1))
        masks.append(torch.cat([nn.functional.pad(p.prompt_mask, (left, 0)),
                                nn.functional.pad(p.response_mask, (0, right))], 1))
        responses.append(response)
    return torch.cat(ids), torch.cat(masks), torch.cat(responses)


@torch.no_grad()
def response_logprobs(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_ids: torch.Tensor, temperature: float, chunk: int,
                      with_entropy: bool = False, share_prompts: bool = False, vocab_chunk: int | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log π(response token) for every response position, in chunks of `chunk` rows: (B, R) [and entropy (B, R)];
    `share_prompts`: a prompt repeated within a chunk goes through the policy once (`response_forward`);
    `vocab_chunk`: ppo.logprob_chunk_size (`response_logprobs_and_entropy`)."""
    logprobs, entropies = [], []
    for start in range(0, input_ids.shape[0], chunk):
        rows = slice(start, start + chunk)
        logprob, entropy, _ = response_logprobs_and_entropy(policy, input_ids[rows], attention_mask[rows],
                                                            response_ids[rows], temperature, share_prompts,
                                                            vocab_chunk, with_entropy)
        logprobs.append(logprob)
        entropies.append(entropy)
    return torch.cat(logprobs), torch.cat(entropies) if with_entropy else None


@torch.no_grad()
def response_values(value_model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    response_length: int, chunk: int, share_prompts: bool = False) -> torch.Tensor:
    """The critic's value before each response token: (B, R)."""
    values = [token_scalars(value_model, input_ids[s:s + chunk], attention_mask[s:s + chunk], response_length,
                            share_prompts) for s in range(0, input_ids.shape[0], chunk)]
    return torch.cat(values)


@dataclass
class RolloutPasses:
    """The no-grad passes over a rollout's sequences besides the policy's own: each (B, R), None where not run."""

    ref_logprobs: torch.Tensor | None
    old_values: torch.Tensor | None
    anchor_logprobs: torch.Tensor | None


def rollout_passes(sequences: PromptAndResponse, reference: nn.Module | None, value_model: nn.Module | None,
                   anchor: nn.Module | None, temperature: float, chunk: int, share_prompts: bool,
                   vocab_chunk: int | None) -> RolloutPasses:
    """The reference's and π_{t−1}'s log-probs and the critic's values of the responses, each where its model is
    given (None: that pass is skipped), `chunk` rows at a time (ppo.forward_batch_size, ppo.share_prompts,
    ppo.logprob_chunk_size as in `response_logprobs`)."""
    ids, mask, responses = sequences.input_ids, sequences.attention_mask, sequences.response_ids
    ref_logprobs = None if reference is None else response_logprobs(
        reference, ids, mask, responses, temperature, chunk, share_prompts=share_prompts, vocab_chunk=vocab_chunk)[0]
    old_values = None if value_model is None else response_values(value_model, ids, mask, responses.shape[1], chunk,
                                                                  share_prompts)
    anchor_logprobs = None if anchor is None else response_logprobs(
        anchor, ids, mask, responses, temperature, chunk, share_prompts=share_prompts, vocab_chunk=vocab_chunk)[0]
    return RolloutPasses(ref_logprobs, old_values, anchor_logprobs)


def rollout_stats(batch: Rollout, sequence_kl: torch.Tensor, kl_coef: float, gather_rows: Callable,
                  kl_measured: bool = True) -> dict[str, float]:
    """Means over the global batch (`gather_rows`: every process's rows) of what the rollout produced, with the KL
    coefficient `kl_coef` of its shaping (`kl/mean` where the KL was measured)."""
    lengths = batch.response_mask.sum(-1).float()
    columns = {"raw": batch.raw_scores.float(), "score": batch.scores.float(),
               "shaped": batch.scores.float() - kl_coef * sequence_kl, "kl": sequence_kl,
               "length": lengths, "stopped": batch.stopped.float()}
    if batch.entropy is not None:
        columns["entropy"] = (batch.entropy * batch.response_mask).sum(-1)
    if batch.engine_logprobs is not None:
        mismatch = ((batch.old_logprobs - batch.engine_logprobs).abs() * batch.response_mask).float()
        columns.update(mismatch_sum=mismatch.sum(-1), mismatch_max=mismatch.amax(-1))
    if batch.is_weights is not None:
        columns["is_weight"] = batch.is_weights.float().sum(-1)
    gathered = gather_rows(torch.stack(list(columns.values()), dim=1)).T
    every = dict(zip(columns, gathered, strict=True))  # each column over the global batch
    tokens = every["length"].sum().clamp_min(1)
    raw = every["raw"]
    stats = {
        "reward/mean": raw.mean().item(),
        "reward/std": raw.std().item() if raw.numel() > 1 else 0.0,
        "reward/score_mean": every["score"].mean().item(),
        "reward/shaped_mean": every["shaped"].mean().item(),
        "kl/coef": kl_coef,
        "response/length_mean": every["length"].mean().item(),
        "response/stopped_frac": every["stopped"].mean().item(),
        "response/tokens": every["length"].sum().item(),
    }
    if kl_measured:
        stats["kl/mean"] = every["kl"].mean().item()
    if "entropy" in every:
        stats["policy/entropy"] = (every["entropy"].sum() / tokens).item()
    if "mismatch_sum" in every:
        # How far the engine's sampling log-probs are from the trainer's (0 with vllm.logprobs: engine, which
        # uses the engine's own): mean over response tokens and largest, over the global batch.
        stats.update({"vllm/logprob_diff_mean": (every["mismatch_sum"].sum() / tokens).item(),
                      "vllm/logprob_diff_max": every["mismatch_max"].max().item()})
    if "is_weight" in every:
        stats["vllm/is_weight_mean"] = (every["is_weight"].sum() / tokens).item()
    return stats
