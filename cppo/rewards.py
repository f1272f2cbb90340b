"""Reward sources and a task's reward.

A source scores a `RewardBatch` (the prompts, the completions, their token ids and the prompts' dataset columns)
into raw scores (B,): a sequence-classification reward model (its first logit, as its own `forward` computes it)
or a Python function `f(prompts, completions, **keywords) -> list[float]`, plain or `async def`. A task's reward
(`TaskReward`) is the weighted sum of its sources' scores, each processed by its own settings (normalisation, the
missing-EOS penalty, clipping) first.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import math
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import core
from .config import REWARD_ARGUMENTS, OverlongPenaltyConfig, RewardConfig
from .errors import UserError, exception_line
from .models import is_causal_type, load_frozen, load_tokenizer, resolve_model_source, same_tokenizer
from .modules import backbone_of, position_ids_from_mask, response_forward, scalar_head


@dataclass
class RewardBatch:
    """What a reward source reads of B responses to their prompts."""

    prompts: list[str]  # each prompt as the policy read it (its chat template applied)
    completions: list[str]  # each response decoded, special tokens skipped
    completion_ids: list[list[int]]  # each response's token ids, up to and including its stop token
    columns: dict[str, list]  # the prompts' dataset columns (and `data.columns` keywords): B values each
    input_ids: torch.Tensor  # (B, P + R) left-padded prompt, then the right-padded response
    attention_mask: torch.Tensor  # (B, P + R)
    prompt_width: int | None = None  # P, where the prompt columns are known (ppo.share_prompts)

    @staticmethod
    def of(prompts, indices: list[int], tokenizer, sequences, prompt_width: int | None = None) -> RewardBatch:
        """The batch of the responses in `sequences` (a `PromptAndResponse`: prompt_ids, response_ids and
        their masks) to the prompts `indices` of the PromptSet `prompts`."""
        lengths = sequences.response_mask.sum(-1).tolist()
        ids = sequences.response_ids.tolist()
        rows = [prompts.columns[i] if prompts.columns else {} for i in indices]
        names = set().union(*rows)
        return RewardBatch(prompts=[prompts.texts[i] for i in indices],
                           completions=tokenizer.batch_decode(sequences.response_ids, skip_special_tokens=True),
                           completion_ids=[row[:n] for row, n in zip(ids, lengths, strict=True)],
                           columns={name: [row.get(name) for row in rows] for name in sorted(names)},
                           input_ids=sequences.input_ids, attention_mask=sequences.attention_mask,
                           prompt_width=prompt_width)

    def rows(self, index: list[int]) -> RewardBatch:
        """Rows `index` of the batch."""
        tensor_index = torch.tensor(index, dtype=torch.long, device=self.input_ids.device)
        return RewardBatch([self.prompts[i] for i in index], [self.completions[i] for i in index],
                           [self.completion_ids[i] for i in index],
                           {k: [v[i] for i in index] for k, v in self.columns.items()},
                           self.input_ids[tensor_index], self.attention_mask[tensor_index], self.prompt_width)


def import_reward_function(spec: str) -> Callable:
    """Import `module:function` or `path/to/file.py:function`, with one-line errors."""
    module_name, _, function_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise UserError(f"reward.function: file not found: {module_name}")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[path.stem] = module
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as e:  # the user's module may raise anything on import
        raise UserError(f"reward.function: cannot import {module_name!r}: {exception_line(e)}") from e
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"reward.function: {module_name!r} has no callable {function_name!r}")
    return function


class CallableReward:
    """Scores from a user function of the prompts and completions. Called by keyword when its parameters name
    `prompts` or `completions` (as TRL's reward functions are), else with those two positionally; either way it
    gets, by keyword, those of `completion_ids` and the dataset's columns that it names (all of them if it takes
    `**kwargs`). An `async def` function is called on `rows_per_call` rows at a time, `max_concurrency` calls at
    once, each within `timeout` seconds, on an event loop of its own thread."""

    def __init__(self, cfg: RewardConfig):
        self.cfg, self.spec = cfg, cfg.function
        self.function = import_reward_function(cfg.function)
        parameters = inspect.signature(self.function).parameters.values()
        self.takes_everything = any(p.kind is p.VAR_KEYWORD for p in parameters)
        named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.by_keyword = any(p.name in ("prompts", "completions") for p in named)
        positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        first_two = set() if self.by_keyword else {p.name for p in positional[:2]}
        self.keywords = {p.name for p in named} - first_two
        self.required = {p.name for p in named if p.default is p.empty} - first_two
        self.is_async = inspect.iscoroutinefunction(self.function) or inspect.iscoroutinefunction(
            type(self.function).__call__)  # a callable object with an `async def __call__`

    def check_arguments(self, columns: set[str], where: str, data: str) -> None:
        """One line if the function requires a keyword that neither cppo nor the columns of the prompts of the data
        section `data` provide."""
        missing = sorted(self.required - set(REWARD_ARGUMENTS) - columns)
        if missing:
            raise UserError(f"{where}: reward function {self.spec} requires {', '.join(map(repr, missing))}, which "
                            f"is not a column of the prompts (columns: {', '.join(sorted(columns)) or 'none'}; map "
                            f"one with {data}.columns, e.g. {{{missing[0]}: <column>}})")

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        if not self.is_async:
            return check_scores(self._call(batch), len(batch.completions), str(self))
        return torch.cat(_event_loop().run(self._concurrently(batch)))

    def _call(self, batch: RewardBatch):
        """The function's result on `batch` (a coroutine for an async function)."""
        offered = {"prompts": batch.prompts, "completions": batch.completions,
                   "completion_ids": batch.completion_ids,
                   **{k: v for k, v in batch.columns.items() if k not in REWARD_ARGUMENTS}}
        keywords = {k: v for k, v in offered.items() if self.takes_everything or k in self.keywords}
        try:
            if self.by_keyword:
                return self.function(**keywords)
            keywords.pop("prompts", None), keywords.pop("completions", None)
            return self.function(list(batch.prompts), list(batch.completions), **keywords)
        except Exception as e:  # the user's code: a failing scorer server, a bug
            raise UserError(f"{self} raised {exception_line(e)}") from e

    async def _concurrently(self, batch: RewardBatch) -> list[torch.Tensor]:
        limit = asyncio.Semaphore(self.cfg.max_concurrency)
        size, timeout = self.cfg.rows_per_call, self.cfg.timeout

        async def one(start: int) -> torch.Tensor:
            rows = list(range(start, min(start + size, len(batch.completions))))
            async with limit:
                try:
                    values = await asyncio.wait_for(self._call(batch.rows(rows)), timeout)
                except TimeoutError:
                    raise UserError(f"{self} timed out after {timeout:g} s (reward.timeout) on rows "
                                    f"{rows[0] + 1}-{rows[-1] + 1} of {len(batch.completions)}") from None
                except UserError:
                    raise
                except Exception as e:  # raised while awaited
                    raise UserError(f"{self} raised {exception_line(e)}") from e
            return check_scores(values, len(rows), str(self))

        try:
            async with asyncio.TaskGroup() as group:
                calls = [group.create_task(one(s)) for s in range(0, len(batch.completions), size)]
        except* UserError as failures:  # the first failure ends the others
            raise failures.exceptions[0] from None
        return [call.result() for call in calls]

    def __str__(self) -> str:
        return f"reward function {self.spec}"


class _EventLoop:
    """One asyncio event loop in a daemon thread, for every async reward function of the process: it works the
    same under a caller that runs a loop of its own (a notebook), and clients bound to it survive between steps."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="cppo-rewards", daemon=True).start()

    def run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()


_LOOP: _EventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _event_loop() -> _EventLoop:
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = _EventLoop()
        return _LOOP


def check_scores(values, expected: int, source: str) -> torch.Tensor:
    """Scores as a float tensor (B,), or a one-line error for a wrong count or type. Non-finite scores
    are the trainer's to handle (`ppo.on_nonfinite`)."""
    try:
        scores = torch.as_tensor([float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError):
        raise UserError(f"{source} must return a list of numbers, got {type(values).__name__}") from None
    if scores.numel() != expected:
        raise UserError(f"{source} returned {scores.numel()} scores for {expected} completions")
    return scores


class ModelReward:
    """Scores from a sequence-classification reward model, computed by its own `forward` (its first
    logit): a decoder scores its last non-padding token, an encoder its pooled first token, each the
    way it was trained.

    A decoder with exactly the policy's tokenizer reads the rollout's token ids as they are (with
    position ids that skip the left padding). Any other reward model gets prompt and completion as
    text, tokenised by its own tokenizer: its own special tokens, right padding, and truncation from
    the left to its context length, so that the end of the response is always scored.
    """

    def __init__(self, model, tokenizer, policy_tokenizer, batch_size: int, source: str = "(in memory)",
                 share_prompts: bool = False):
        self.model, self.tokenizer, self.batch_size, self.source = model, tokenizer, batch_size, source
        config = model.config
        self.reads_policy_ids = is_causal_type(config.model_type) and same_tokenizer(tokenizer, policy_tokenizer)
        # ppo.share_prompts: a repeated prompt through the decoder once, for the models whose pooling (the
        # rightmost token that is not the pad token) `pooled_scores` computes as their own forward does.
        from transformers.modeling_layers import GenericForSequenceClassification

        self.share_prompts = (share_prompts and self.reads_policy_ids
                              and isinstance(model, GenericForSequenceClassification)
                              and config.get_text_config().pad_token_id is not None)
        self.takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        limits = [n for n in (getattr(config, "max_position_embeddings", None), tokenizer.model_max_length)
                  if isinstance(n, int) and 0 < n < 1_000_000]
        self.max_length = min(limits) if limits else None
        tokenizer.truncation_side = "left"

    @torch.no_grad()
    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        device = next(self.model.parameters()).device
        prompts, completions, prompt_width = batch.prompts, batch.completions, batch.prompt_width
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        if self.share_prompts and prompt_width is not None:
            return torch.cat([self.pooled_scores(input_ids[s:s + self.batch_size].to(device),
                                                 attention_mask[s:s + self.batch_size].to(device), prompt_width)
                              for s in range(0, len(completions), self.batch_size)]).cpu()
        if self.reads_policy_ids:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.takes_position_ids:
                inputs["position_ids"] = position_ids_from_mask(attention_mask)
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
            inputs = dict(self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                                         truncation=self.max_length is not None, max_length=self.max_length))
        scores = []
        for start in range(0, len(completions), self.batch_size):
            chunk = {k: v[start:start + self.batch_size].to(device) for k, v in inputs.items()}
            scores.append(self.model(**chunk).logits[:, 0].float())
        return torch.cat(scores).cpu()

    def pooled_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int) -> torch.Tensor:
        """The model's first logit as its own forward pools it (at the rightmost token that is not the pad token),
        each distinct prompt through the decoder once (`response_forward`). (B,) float32."""
        response_length = input_ids.shape[1] - prompt_width
        non_pad = (input_ids != self.model.config.get_text_config().pad_token_id).int()
        pooled = (torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int32) * non_pad).argmax(-1)
        if bool((pooled < prompt_width - 1).any()):  # a pad token ends a prompt: the positions below do not hold it
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=position_ids_from_mask(attention_mask)).logits[:, 0].float()
        hidden = response_forward(backbone_of(self.model), input_ids, attention_mask, response_length, True,
                                  causal_lm=False, through_last=True)  # positions prompt_width - 1 onwards
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), pooled - (prompt_width - 1)]
        return scalar_head(self.model)(picked)[:, 0].float()

    def __str__(self) -> str:
        return f"reward model {self.source}"


class RunningMoments:
    """Running mean and standard deviation of every score seen so far (reward.normalize: running)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, x: torch.Tensor) -> None:
        # Chan et al.'s parallel update: merge the batch's moments into the running ones.
        x = x.double()
        n, mean = x.numel(), x.mean().item()
        m2 = ((x - mean) ** 2).sum().item()
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


def process_scores(raw: torch.Tensor, stopped: torch.Tensor, cfg: RewardConfig, moments: RunningMoments,
                   has_stop_token: bool, group_size: int = 1) -> torch.Tensor:
    """One source's raw scores of one task's rollouts (the global batch's, prompt groups of `group_size`
    contiguous) → normalised (over the batch, with running moments, or within each group) → minus the missing-EOS
    penalty → clipped. (B,) -> (B,) float32."""
    scores = raw.float()
    if cfg.normalize == "batch" and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    elif cfg.normalize == "running":
        moments.update(scores)
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    elif cfg.normalize == "group":
        grouped = scores.view(-1, group_size)
        scores = ((grouped - grouped.mean(-1, keepdim=True)) / (grouped.std(-1, keepdim=True) + 1e-8)).flatten()
    if cfg.missing_eos_penalty is not None and has_stop_token:
        scores = scores - cfg.missing_eos_penalty * (~stopped).float()
    if cfg.clip is not None:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores


def length_penalty(lengths: torch.Tensor, cfg: OverlongPenaltyConfig | None, max_new_tokens: int) -> torch.Tensor:
    """`ppo.overlong_penalty` of responses of `lengths` tokens (B,), added to R (docs/algorithm.md §10); 0 without
    one. Its length defaults to `generation.max_new_tokens`."""
    if cfg is None:
        return torch.zeros(lengths.shape, device=lengths.device)
    return core.overlong_penalty(lengths, cfg.length or max_new_tokens, cfg.buffer, cfg.factor)


class TaskReward:
    """A task's reward (docs/algorithm.md §2): R = Σ_k w_k · processed_k, each source's raw scores processed by its own
    settings (`process_scores`) first. Raw scores are (B, K), column k the k-th source's; with one source of
    weight 1, R is that source's processed score exactly. Each trainer has its own (the running moments are a
    task's), over the sources the run's `RewardBank` holds."""

    def __init__(self, configs: list[RewardConfig], sources: list):
        self.configs, self.sources = configs, sources
        self.names = [cfg.label for cfg in configs]
        self.weights = torch.tensor([cfg.weight for cfg in configs], dtype=torch.float32)
        self.moments = [RunningMoments() for _ in configs]

    def __call__(self, batch: RewardBatch) -> torch.Tensor:
        """Raw scores (B, K) of every source."""
        return torch.stack([source(batch).float().cpu() for source in self.sources], dim=1)

    def total(self, raw: torch.Tensor) -> torch.Tensor:
        """Σ_k w_k · raw_k, (B, ≥K) -> (B,): the raw reward (one source of weight 1: its raw score)."""
        raw = raw[:, :len(self.sources)].float()
        return raw[:, 0] if self.weights.tolist() == [1.0] else raw @ self.weights.to(raw.device)

    def combine(self, raw: torch.Tensor, stopped: torch.Tensor, has_stop_token: bool, group_size: int = 1,
                moments: list[RunningMoments] | None = None) -> torch.Tensor:
        """R of rollouts with raw scores `raw` (B, ≥K) (every process's rows, groups contiguous), updating
        `moments` (the task's own by default). -> (B,) float32."""
        moments = self.moments if moments is None else moments
        reward = None
        for k, cfg in enumerate(self.configs):
            part = process_scores(raw[:, k], stopped, cfg, moments[k], has_stop_token, group_size)
            part = part if cfg.weight == 1.0 else cfg.weight * part
            reward = part if reward is None else reward + part
        return reward

    def copied_moments(self) -> list[RunningMoments]:
        copies = [RunningMoments() for _ in self.moments]
        for copy, moments in zip(copies, self.moments, strict=True):
            copy.load_state_dict(moments.state_dict())
        return copies

    def state_dict(self) -> list[dict[str, float]]:
        return [m.state_dict() for m in self.moments]

    def load_state_dict(self, state: list[dict[str, float]] | dict[str, float]) -> None:
        for moments, saved in zip(self.moments, state if isinstance(state, list) else [state], strict=True):
            moments.load_state_dict(saved)

    def __str__(self) -> str:
        return " + ".join(map(str, self.sources)) if len(self.sources) > 1 else str(self.sources[0])


class StageRewards:
    """The rewards of a stage's tasks by task index (`PromptSet.task`): scores rollouts of any mix of them, each
    by its own task's reward, and turns raw scores into R."""

    def __init__(self, tasks: list[TaskReward]):
        self.tasks = tasks

    def __getitem__(self, task: int) -> TaskReward:
        return self.tasks[task]

    def __len__(self) -> int:
        return len(self.tasks)

    def score(self, prompts, indices: list[int], tokenizer, sequences, task: torch.Tensor) -> torch.Tensor:
        """Raw scores of the responses in `sequences` (a `PromptAndResponse`) to the prompts `indices` of the
        PromptSet `prompts`, whose tasks are `task` (B,): (B, K), K the most sources of a task (columns past a
        task's own: 0)."""
        batch = RewardBatch.of(prompts, indices, tokenizer, sequences, sequences.prompt_ids.shape[1])
        raw = torch.zeros(len(indices), max(len(t.sources) for t in self.tasks), device=task.device)
        for j in task.unique().tolist():
            rows = (task == j).nonzero().flatten()
            raw[rows, :len(self.tasks[j].sources)] = self.tasks[j](batch.rows(rows.tolist())).to(task.device)
        return raw

    def totals(self, raw: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
        """Each row's raw reward Σ_k w_k · raw_k by its task's weights: (B, K) -> (B,)."""
        totals = torch.zeros(raw.shape[0], device=raw.device)
        for j in task.unique().tolist():
            totals[task == j] = self.tasks[j].total(raw[task == j]).to(raw.device)
        return totals

    def combine(self, raw: torch.Tensor, stopped: torch.Tensor, task: torch.Tensor, has_stop_token: bool,
                group_size: int) -> torch.Tensor:
        """R of every process's rollouts (B, K) -> (B,) float32, each task's by its `TaskReward.combine`."""
        scores = torch.zeros(raw.shape[0], dtype=torch.float32, device=raw.device)
        for j in task.unique().tolist():
            rows = task == j
            scores[rows] = self.tasks[j].combine(raw[rows], stopped[rows], has_stop_token, group_size).to(raw.device)
        return scores

    def source_means(self, raw: torch.Tensor, task: torch.Tensor) -> dict[str, float]:
        """`reward/<name>`: each source's mean raw score over the rows it scored (raw (B, K) and task (B,) of every
        process)."""
        scored: dict[str, list[torch.Tensor]] = {}
        for j in task.unique().tolist():
            rows = raw[task == j]
            for k, name in enumerate(self.tasks[j].names):
                scored.setdefault(name, []).append(rows[:, k])
        return {f"reward/{name}": torch.cat(parts).float().mean().item() for name, parts in sorted(scored.items())}

    def state_dict(self) -> list:
        return [task.state_dict() for task in self.tasks]

    def load_state_dict(self, state: list) -> None:
        for task, saved in zip(self.tasks, state, strict=True):
            task.load_state_dict(saved)


class RewardBank:
    """Reward sources built once per run and shared by every task and the evaluation (a reward model
    that several tasks or the evaluation use is loaded once)."""

    def __init__(self, policy_tokenizer, model_cfg, device, share_prompts: bool = False):
        self.policy_tokenizer, self.model_cfg, self.device = policy_tokenizer, model_cfg, device
        self.share_prompts = share_prompts  # ppo.share_prompts
        self._sources: dict[tuple, object] = {}

    def task_reward(self, configs: list[RewardConfig]) -> TaskReward:
        """A fresh reward of the sources `configs` (moments at zero)."""
        return TaskReward(configs, [self.get(cfg) for cfg in configs])

    def stage_rewards(self, configs_by_task: list[list[RewardConfig]]) -> StageRewards:
        return StageRewards([self.task_reward(configs) for configs in configs_by_task])

    def check_arguments(self, configs: list[RewardConfig], columns: set[str], where: str, data: str) -> None:
        """Each reward function of `configs` (the field `where`) can be called with the columns `columns` of the
        data section `data` (no model is loaded)."""
        for index, cfg in enumerate(configs):
            if cfg.function is not None:
                self.get(cfg).check_arguments(columns, f"{where}[{index}]" if len(configs) > 1 else where, data)

    def get(self, cfg: RewardConfig):
        key = ("model", cfg.model, cfg.batch_size) if cfg.model is not None else (
            "function", cfg.function, cfg.rows_per_call, cfg.max_concurrency, cfg.timeout)
        if key not in self._sources:
            self._sources[key] = self._build(cfg)
        return self._sources[key]

    def _build(self, cfg: RewardConfig):
        if cfg.function is not None:
            return CallableReward(cfg)
        source = resolve_model_source(cfg.model, "reward.model")
        tokenizer = load_tokenizer(source, self.model_cfg.trust_remote_code)
        model = load_frozen("AutoModelForSequenceClassification", source, self.model_cfg, tokenizer.pad_token_id,
                            num_labels=1).to(self.device)
        return ModelReward(model, tokenizer, self.policy_tokenizer, cfg.batch_size, cfg.model, self.share_prompts)
