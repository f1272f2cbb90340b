"""The rollout memory of earlier tasks (docs/algorithm.md §8): KR where forgetting happens, on earlier tasks' prompts.

At the end of task j the policy π_j answers sampled prompts of task j; the responses, π_j's per-token
log-probs λ, ℓ and R are kept by `memory.select` (**build**). The memory holds at most `capacity` entries;
new ones evict old ones by `memory.update` (**update**). Each step of a later task draws `batch_size`
entries (**retrieve**), and the loss adds c_mem·KR_mem = Σ β m (log π_θ − λ)² / Σ β m on them, or the replay
term −Σ m log π_θ / Σ m. Only prompts, the policy's own responses, log-probs and scores are stored.

Every process holds the same memory (the build batch is gathered) and draws the same entries, then takes its
own part of them: the loss's denominator is the whole memory batch's, so the value does not depend on the split.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from accelerate.utils import gather_object

from . import core
from .config import CPPOConfig, MemoryConfig
from .data import left_pad
from .engine import SeedKey
from .outputs import replace_text
from .rewards import length_penalty
from .weighting import HIGH_PERFORMANCE, batch_stats, heuristic_weights


@dataclass
class Entry:
    """One remembered response of π_j to a prompt of task j."""

    task: int  # index of the task in the stream
    prompt_ids: list[int]
    response_ids: list[int]  # up to and including the stop token
    logprobs: list[float]  # λ: π_j's log-prob of each response token (rollout temperature), float32 values
    logprob_mean: float  # ℓ
    reward: float  # R: task j's processed score
    type: int  # 1..5 in its build batch (docs/algorithm.md §3)
    beta: float  # the §4 heuristic β of its type in its build batch
    order: int = 0  # when it entered the memory (fifo evicts the smallest)


@dataclass
class MemoryBatch:
    """Retrieved entries as tensors: prompts left-padded, responses right-padded (like a `Rollout`)."""

    prompt_ids: torch.Tensor  # (E, P)
    prompt_mask: torch.Tensor  # (E, P)
    response_ids: torch.Tensor  # (E, R)
    response_mask: torch.Tensor  # (E, R)
    logprobs: torch.Tensor  # (E, R) λ, 0 on padding
    beta: torch.Tensor  # (E,) β_e (1 with `weighting: uniform`)
    task: torch.Tensor  # (E,)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def parts(self, count: int) -> list[MemoryBatch]:
        """`count` contiguous parts of (nearly) equal size, padding columns no row of a part uses trimmed;
        a part may be empty when there are fewer rows than parts."""
        out = []
        for index in torch.arange(len(self)).tensor_split(count):
            if not len(index):
                out.append(replace(self, **{f.name: getattr(self, f.name)[:0] for f in fields(self)}))
                continue
            prompt_width = int(self.prompt_mask[index].sum(-1).max())
            response_width = int(self.response_mask[index].sum(-1).max())
            out.append(MemoryBatch(
                prompt_ids=self.prompt_ids[index, -prompt_width:], prompt_mask=self.prompt_mask[index, -prompt_width:],
                response_ids=self.response_ids[index, :response_width],
                response_mask=self.response_mask[index, :response_width],
                logprobs=self.logprobs[index, :response_width], beta=self.beta[index], task=self.task[index]))
        return out


def retention_loss(logprobs: torch.Tensor, stored_logprobs: torch.Tensor, mask: torch.Tensor, beta: torch.Tensor,
                   denominator: torch.Tensor, kind: str) -> torch.Tensor:
    """The memory term on (part of) a memory batch (docs/algorithm.md §8), with the whole batch's `denominator`.

    kr:  Σ β m (log π_θ − λ)² / denominator   (denominator = Σ β m over the memory batch)
    sft: −Σ m log π_θ / denominator           (denominator = Σ m over the memory batch)
    logprobs, stored_logprobs, mask: (E, R); beta: (E,).
    """
    if kind == "kr":
        return core.masked_mean((logprobs - stored_logprobs.to(logprobs.dtype)) ** 2, mask, beta, denominator)
    return core.masked_mean(-logprobs, mask, None, denominator)


def memory_denominator(batch: MemoryBatch, kind: str) -> torch.Tensor:
    """Σ β m (kr) or Σ m (sft) over the whole memory batch."""
    return core.weighted_token_count(batch.response_mask, batch.beta if kind == "kr" else None)


def keep_mask(logprob_mean: torch.Tensor, reward: torch.Tensor, k: float, select: str,
              types: torch.Tensor) -> torch.Tensor:
    """Which responses of a build batch are kept (B,) bool: `all`, `high_reward` (R ≥ μ_R + kσ_R over the
    batch) or `r1` (type 1: high ℓ and high R). When every R is the same (σ_R = 0, or a single response), each
    is at the top: `high_reward` keeps them all; `r1` keeps none (docs/algorithm.md §3: a degenerate batch is all
    r5)."""
    if select == "all":
        return torch.ones_like(reward, dtype=torch.bool)
    if select == "r1":
        return types == HIGH_PERFORMANCE
    stats = batch_stats(logprob_mean, reward)
    if not (math.isfinite(stats.reward_sigma) and stats.reward_sigma > 0):
        return torch.ones_like(reward, dtype=torch.bool)
    return reward.double() >= stats.reward_mu + k * stats.reward_sigma


def balanced_targets(counts: dict[int, int], capacity: int) -> dict[int, int]:
    """How many entries each task keeps under `balanced`: a task holding no more than an equal share keeps
    all; the others are cut to one common level (the slots a cut leaves, one each to the earliest tasks)."""
    if sum(counts.values()) <= capacity:
        return dict(counts)
    tasks = sorted(counts)
    level, left = 0, capacity
    # Raise the common level while every task still under it fits.
    remaining = sorted(tasks, key=lambda t: counts[t])
    while remaining:
        share = left // len(remaining)
        small = [t for t in remaining if counts[t] <= share]
        if not small:
            level = share
            break
        for t in small:
            left -= counts[t]
            remaining.remove(t)
    targets = {t: counts[t] for t in tasks if t not in remaining}
    extra = left - level * len(remaining)
    for t in sorted(remaining):
        targets[t] = level + (1 if extra > 0 else 0)
        extra -= 1
    return targets


def tfidf(documents: list[list[int]], vocabulary: dict[int, int], idf: torch.Tensor) -> torch.Tensor:
    """L2-normalised TF-IDF rows (D, V) of token-id documents over `vocabulary` (token id → column);
    tokens outside it are left out."""
    rows = torch.zeros(len(documents), len(vocabulary), dtype=torch.float64)
    for row, document in enumerate(documents):
        for token in document:
            column = vocabulary.get(token)
            if column is not None:
                rows[row, column] += 1.0
    rows = rows * idf
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def similarity(entry_prompts: list[list[int]], query_prompts: list[list[int]]) -> torch.Tensor:
    """For each entry, its prompt's highest cosine similarity to any query prompt, on TF-IDF vectors of prompt
    token ids with the IDF of the entries' prompts (smoothed: log((1 + N)/(1 + df)) + 1). (N,) float64.

    Token counts rather than the policy's hidden states: an entry's key must stay comparable with prompts
    seen tasks later, under a policy that has moved since, and needs no model of its own; the IDF discounts the
    template tokens every prompt shares, leaving the words that tell domains and subjects apart."""
    vocabulary: dict[int, int] = {}
    df: list[int] = []
    for prompt in entry_prompts:
        for token in set(prompt):
            if token not in vocabulary:
                vocabulary[token] = len(df)
                df.append(0)
            df[vocabulary[token]] += 1
    n = len(entry_prompts)
    idf = torch.log((1.0 + n) / (1.0 + torch.tensor(df, dtype=torch.float64))) + 1.0
    return (tfidf(entry_prompts, vocabulary, idf) @ tfidf(query_prompts, vocabulary, idf).T).amax(dim=1)


class RolloutMemory:
    """The entries of earlier tasks and the generator of eviction and random retrieval (all of it is state)."""

    def __init__(self, cfg: MemoryConfig, seed: int):
        self.cfg = cfg
        self.entries: list[Entry] = []
        self.added = 0  # entries ever added (their `order`)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.entries)

    def task_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for entry in self.entries:
            counts[entry.task] = counts.get(entry.task, 0) + 1
        return dict(sorted(counts.items()))

    # ------------------------------------------------------------------------------------------- update

    def add(self, entries: list[Entry]) -> int:
        """Add a task's entries, then evict down to `capacity` (docs/algorithm.md §8 update); returns how many went."""
        for entry in entries:
            self.entries.append(replace(entry, order=self.added))
            self.added += 1
        excess = len(self.entries) - self.cfg.capacity
        if excess <= 0:
            return 0
        if self.cfg.update == "fifo":
            self.entries = sorted(self.entries, key=lambda e: e.order)[excess:]
            return excess
        targets = balanced_targets(self.task_counts(), self.cfg.capacity)
        kept = []
        for task, target in targets.items():
            positions = [i for i, e in enumerate(self.entries) if e.task == task]
            chosen = torch.randperm(len(positions), generator=self.generator)[:target].tolist()
            kept.extend(positions[i] for i in chosen)
        self.entries = [self.entries[i] for i in sorted(kept)]
        return excess

    # ----------------------------------------------------------------------------------------- retrieve

    def retrieve(self, count: int, query_prompts: list[list[int]] | None = None) -> list[int]:
        """Positions of `count` distinct entries (all of them if the memory holds fewer): seeded random, or
        those most similar to `query_prompts` (ties in a seeded random order)."""
        count = min(count, len(self.entries))
        order = torch.randperm(len(self.entries), generator=self.generator)
        if self.cfg.retrieve == "random" or count == len(self.entries):
            return order[:count].tolist()
        scores = similarity([e.prompt_ids for e in self.entries], query_prompts)[order]
        best = torch.sort(scores, descending=True, stable=True).indices[:count]
        return order[best].tolist()

    def batch(self, positions: list[int], pad_token_id: int, device: torch.device) -> MemoryBatch:
        chosen = [self.entries[i] for i in positions]
        prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in chosen], pad_token_id)
        width = max(len(e.response_ids) for e in chosen)
        response_ids = torch.full((len(chosen), width), pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((len(chosen), width), dtype=torch.long)
        logprobs = torch.zeros((len(chosen), width), dtype=torch.float32)
        for row, e in enumerate(chosen):
            n = len(e.response_ids)
            response_ids[row, :n] = torch.tensor(e.response_ids)
            response_mask[row, :n] = 1
            logprobs[row, :n] = torch.tensor(e.logprobs, dtype=torch.float32)
        beta = torch.tensor([e.beta if self.cfg.weighting == "heuristic" else 1.0 for e in chosen])
        task = torch.tensor([e.task for e in chosen])
        return MemoryBatch(prompt_ids.to(device), prompt_mask.to(device), response_ids.to(device),
                           response_mask.to(device), logprobs.to(device), beta.to(device), task.to(device))

    # -------------------------------------------------------------------------------------------- state

    def state_dict(self) -> dict:
        return {"entries": [asdict(e) for e in self.entries], "added": self.added,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [Entry(**e) for e in state["entries"]]
        self.added = state["added"]
        self.generator.set_state(state["generator"])

    def write_jsonl(self, path: Path, tokenizer, task_names: list[str]) -> None:
        """The memory, readable: one entry per line with its texts."""
        lines = []
        for e in self.entries:
            record = {"task": task_names[e.task], "task_index": e.task,
                      "prompt": tokenizer.decode(e.prompt_ids, skip_special_tokens=True),
                      "response": tokenizer.decode(e.response_ids, skip_special_tokens=True),
                      **{k: v for k, v in asdict(e).items() if k != "task"}}
            lines.append(json.dumps(record))
        replace_text(path, "".join(line + "\n" for line in lines))


# ---------------------------------------------------------------------------------------------------- build


def build(trainer, task_index: int, cfg: MemoryConfig, ccfg: CPPOConfig, seed: int) -> tuple[list[Entry], dict]:
    """Task `task_index`'s entries, answered by the trainer's (task-end) policy, and the build's stats.

    `build_prompts` prompts of the stage are drawn (seeded), each answered `build_samples` times with the
    rollout sampling settings; every process answers its share, and the gathered batch is scored, typed and
    selected identically on every process.
    """
    started = time.perf_counter()
    acc = trainer.accelerator
    prompts = trainer.stage.prompts
    chosen = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed + 1000 * task_index))
    rows = [i for i in chosen[:cfg.build_prompts].tolist() for _ in range(cfg.build_samples)]
    rows = (rows * acc.num_processes)[:max(len(rows), acc.num_processes)]  # at least one row per process
    positions = torch.arange(len(rows)).tensor_split(acc.num_processes)[acc.process_index].tolist()
    mine = [rows[i] for i in positions]
    # The build's sampling has its own seed: the same policy gives the same entries, whatever ran before.
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), trainer.backend.whole(trainer.model) as model:
        torch.manual_seed(seed + 1000 * task_index + 7919 * acc.process_index)
        model.eval()
        key = SeedKey.contiguous(seed, "memory", task_index, positions[0], len(mine))
        sampled = trainer.sample(model.policy, mine, key)
        model.train()
    raw = trainer.score(mine, sampled)
    local = []
    for row in range(len(mine)):
        n = int(sampled.response_mask[row].sum())
        local.append({"prompt_ids": sampled.prompt_ids[row][sampled.prompt_mask[row].bool()].tolist(),
                      "response_ids": sampled.response_ids[row, :n].tolist(),
                      "logprobs": sampled.logprobs[row, :n].float().tolist(),
                      "raw": raw[row].tolist(), "stopped": bool(sampled.stopped[row])})
    everything = gather_object(local) if acc.num_processes > 1 else local

    task_reward = trainer.rewards[task_index]
    finite = [math.isfinite(sum(r["raw"])) and all(map(math.isfinite, r["logprobs"])) for r in everything]
    grouped = any(c.normalize == "group" for c in task_reward.configs)
    if grouped:  # a group of build_samples answers to one prompt is normalised whole, or left out whole
        size = cfg.build_samples
        finite = [all(finite[g - g % size:g - g % size + size]) for g in range(len(finite))]
    finite = [r for r, ok in zip(everything, finite, strict=True) if ok]
    # Processed like the task's rollouts; running moments continue from the task's, on a copy.
    reward = task_reward.combine(torch.tensor([r["raw"] for r in finite]).reshape(len(finite), -1),
                                 torch.tensor([r["stopped"] for r in finite], dtype=torch.bool),
                                 bool(trainer.stop_token_ids), cfg.build_samples if grouped else 1,
                                 task_reward.copied_moments())
    reward = reward + length_penalty(torch.tensor([len(r["response_ids"]) for r in finite]),
                                     trainer.config.ppo.overlong_penalty, trainer.config.generation.max_new_tokens)
    logprob_mean = torch.tensor([sum(r["logprobs"]) / max(len(r["logprobs"]), 1) for r in finite])
    _, beta, types = heuristic_weights(logprob_mean, reward, ccfg.k, ccfg.lb, ccfg.ub, "heuristic")
    keep = keep_mask(logprob_mean, reward, ccfg.k, cfg.select, types)
    entries = [Entry(task=task_index, prompt_ids=r["prompt_ids"], response_ids=r["response_ids"],
                     logprobs=r["logprobs"], logprob_mean=float(logprob_mean[i]), reward=float(reward[i]),
                     type=int(types[i]), beta=float(beta[i]))
               for i, r in enumerate(finite) if keep[i]]
    stats = {"memory/built": float(len(everything)), "memory/kept": float(len(entries)),
             "memory/kept_reward_mean": float(reward[keep].mean()) if entries else math.nan,
             "memory/build_reward_mean": float(reward.mean()) if len(finite) else math.nan,
             "memory/build_s": time.perf_counter() - started}
    return entries, stats
