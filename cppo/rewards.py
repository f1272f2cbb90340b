"""Reward sources behind one interface: `reward(prompts, completions, input_ids, attention_mask[, prompt_width])
-> (B,)` (`prompt_width`: the prompt columns of `input_ids`, where they are known).

Either a sequence-classification reward model (its first logit, as its own `forward` computes it) or a Python
callable `f(prompts, completions) -> list[float]`. Both return raw scores; clipping, normalisation
and the missing-EOS penalty are applied by the trainer.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from .config import RewardConfig
from .errors import UserError, exception_line
from .models import is_causal_type, load_frozen, load_tokenizer, resolve_model_source, same_tokenizer
from .modules import backbone_of, position_ids_from_mask, response_forward, scalar_head


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
    """Scores from a user function of the decoded prompts and completions."""

    def __init__(self, spec: str):
        self.spec = spec
        self.function = import_reward_function(spec)

    def __call__(self, prompts: list[str], completions: list[str], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, prompt_width: int | None = None) -> torch.Tensor:
        try:
            values = self.function(list(prompts), list(completions))
        except Exception as e:  # the user's code: a failing scorer server, a bug
            raise UserError(f"reward function {self.spec} raised {exception_line(e)}") from e
        return check_scores(values, len(completions), f"reward function {self.spec}")

    def __str__(self) -> str:
        return f"reward function {self.spec}"


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
    def __call__(self, prompts: list[str], completions: list[str], input_ids: torch.Tensor,
                 attention_mask: torch.Tensor, prompt_width: int | None = None) -> torch.Tensor:
        device = next(self.model.parameters()).device
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
                   has_stop_token: bool) -> torch.Tensor:
    """Raw scores of one task's rollouts (the global batch's) → normalised (batch or running moments)
    → minus the missing-EOS penalty → clipped. (B,) -> (B,) float32."""
    scores = raw.float()
    if cfg.normalize == "batch" and scores.numel() > 1:
        scores = (scores - scores.mean()) / (scores.std() + 1e-8)
    elif cfg.normalize == "running":
        moments.update(scores)
        scores = (scores - moments.mean) / (moments.std + 1e-8)
    if cfg.missing_eos_penalty is not None and has_stop_token:
        scores = scores - cfg.missing_eos_penalty * (~stopped).float()
    if cfg.clip is not None:
        scores = scores.clamp(-cfg.clip, cfg.clip)
    return scores


class RewardBank:
    """Reward sources built once per run and shared by every task and the evaluation (a reward model
    that several tasks or the evaluation use is loaded once)."""

    def __init__(self, policy_tokenizer, model_cfg, device, share_prompts: bool = False):
        self.policy_tokenizer, self.model_cfg, self.device = policy_tokenizer, model_cfg, device
        self.share_prompts = share_prompts  # ppo.share_prompts
        self._sources: dict[tuple, object] = {}

    def get(self, cfg: RewardConfig):
        key = ("model", cfg.model, cfg.batch_size) if cfg.model is not None else ("function", cfg.function)
        if key not in self._sources:
            self._sources[key] = self._build(cfg)
        return self._sources[key]

    def _build(self, cfg: RewardConfig):
        if cfg.function is not None:
            return CallableReward(cfg.function)
        source = resolve_model_source(cfg.model, "reward.model")
        tokenizer = load_tokenizer(source, self.model_cfg.trust_remote_code)
        model = load_frozen("AutoModelForSequenceClassification", source, self.model_cfg, tokenizer.pad_token_id,
                            num_labels=1).to(self.device)
        return ModelReward(model, tokenizer, self.policy_tokenizer, cfg.batch_size, cfg.model, self.share_prompts)
