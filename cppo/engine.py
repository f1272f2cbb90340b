"""Engines: what samples responses from the policy, behind one interface (`Engine`), and `HFEngine`, which
samples with transformers' `generate` on the training process's own copy of the policy.

Every sampler of a run goes through an engine: the rollouts, the evaluation matrix, the rollout memory's
build and the EWC / MAS importance estimate. The Session builds the engines from the config and closes
them (cppo.session); `cppo.vllm_engine.VLLMEngine` is the other one. Code outside the engines depends only
on what an engine returns (`Generated.logprobs` is the engine's own log-probs, or None), never on which
engine it is.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .core import response_mask_from_stop
from .data import left_pad
from .modules import CACHE_ARGUMENT, position_ids_from_mask, prompt_sharing


@dataclass(frozen=True)
class SeedKey:
    """Where a batch of responses belongs: the run's seed, the purpose (`rollout`, `memory`, `importance`,
    `eval/<task>`), the step, and each response's global row. An engine that seeds each response (vLLM)
    seeds it from these alone: the same prompts give the same responses whichever process draws them and
    whatever else is in its batch."""

    seed: int
    purpose: str
    step: int
    rows: tuple[int, ...]

    @classmethod
    def contiguous(cls, seed: int, purpose: str, step: int, first_row: int, count: int) -> SeedKey:
        return cls(seed, purpose, step, tuple(range(first_row, first_row + count)))

    def seeds(self) -> list[int]:
        return [request_seed(self.seed, self.purpose, self.step, row) for row in self.rows]


def request_seed(seed: int, purpose: str, step: int, row: int) -> int:
    """The sampling seed of one response: the same for the same (run seed, purpose, step, global row) on
    any number of processes."""
    digest = hashlib.blake2b(f"{seed}/{purpose}/{step}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2**31 - 1)


@dataclass(frozen=True)
class Decoding:
    """How to pick each next token, in transformers' words (`do_sample`, `temperature`, `top_k`, `top_p`, ...:
    the fields of a GenerationConfig, every one set on purpose), and how many at most."""

    max_new_tokens: int
    settings: dict = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return not self.settings.get("do_sample", False)


@dataclass
class Generated:
    """One response per prompt, cut at the first stop token. B prompts, R response columns."""

    response_ids: torch.Tensor  # (B, R) right-padded with pad after the stop token
    response_mask: torch.Tensor  # (B, R) 1 up to and including the stop token
    stopped: torch.Tensor  # (B,) bool: the response ends with a stop token
    logprobs: torch.Tensor | None  # (B, R) the engine's own log-prob of each sampled token (0 on padding), or None
    stats: dict[str, float] = field(default_factory=dict)  # the engine's own timings, logged with the step


class Engine:
    """What every engine does. `load` gives it the policy's current weights (inside `backend.whole`, where
    they are whole on every process), `generate` answers prompts with them, `release` hands the device memory
    back to training until the next `load`, `shutdown` stops it for good (the Session calls it)."""

    holds: str | None = None  # the model directory whose weights it holds without a `load` (built from it)

    def decoding(self, settings: dict, max_new_tokens: int, field_name: str) -> Decoding:
        """`settings` (transformers' fields) as this engine's decoding; one line naming `field_name` for a
        setting the engine cannot apply."""
        return Decoding(max_new_tokens, dict(settings))

    def load(self, policy: nn.Module) -> None:
        """Take the policy's current weights."""
        raise NotImplementedError

    def generate(self, prompts: list[list[int]], decoding: Decoding, key: SeedKey) -> Generated:
        """One response to each prompt (token ids, unpadded)."""
        raise NotImplementedError

    def release(self) -> None:
        """Training runs next: let go of what `load` and `generate` took."""

    def shutdown(self) -> None:
        """The run is over."""


class HFEngine(Engine):
    """transformers' `generate` on the loaded policy module itself (no copy of its weights), in chunks of
    `batch_size` prompts (None: all at once), under `autocast` (the accelerator's). It samples from torch's
    generator, not per-response seeds, and returns no log-probs of its own. With `share_prompts`
    (ppo.share_prompts) a prompt repeated in a chunk is read once: its keys and values fill every copy's cache."""

    def __init__(self, device: torch.device, autocast: Callable[[], contextlib.AbstractContextManager],
                 batch_size: int | None, stop_token_ids: list[int], pad_token_id: int, share_prompts: bool = False):
        self.device, self.autocast, self.batch_size = device, autocast, batch_size
        self.stop_token_ids, self.pad_token_id, self.share_prompts = stop_token_ids, pad_token_id, share_prompts
        self.policy: nn.Module | None = None

    def load(self, policy: nn.Module) -> None:
        self.policy = policy

    def generation_config(self, decoding: Decoding):
        """`decoding` as the transformers GenerationConfig this engine samples with."""
        return make_generation_config(self.stop_token_ids, self.pad_token_id, max_new_tokens=decoding.max_new_tokens,
                                      **decoding.settings)

    def generate(self, prompts: list[list[int]], decoding: Decoding, key: SeedKey) -> Generated:
        prompt_ids, prompt_mask = left_pad(prompts, self.pad_token_id)
        config = self.generation_config(decoding)
        with self.autocast():
            responses, response_mask, stopped = generate(
                self.policy, prompt_ids.to(self.device), prompt_mask.to(self.device), config, self.stop_token_ids,
                self.pad_token_id, self.batch_size or len(prompts), self.share_prompts)
        return Generated(responses, response_mask, stopped, None)

    def release(self) -> None:
        self.policy = None


def make_generation_config(stop_token_ids: list[int], pad_token_id: int, **sampling):
    """A transformers GenerationConfig that stops exactly at `stop_token_ids`, and only there.

    transformers fills every field left None from the model's own generation config, so "no stop
    token" must be spelled as an empty list: None would bring back the model's EOS as a stop.
    """
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=list(stop_token_ids), pad_token_id=pad_token_id, bos_token_id=None,
                            **sampling)


@torch.no_grad()
def generate(policy: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, generation_config,
             stop_token_ids: list[int], pad_token_id: int, chunk: int, share_prompts: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample responses with transformers in chunks of `chunk` prompts. Returns (response_ids (B, R) with pad
    after the stop token, response_mask (B, R), stopped (B,)). `share_prompts`: `shared_prompt_cache`."""
    pieces = []
    for start in range(0, prompt_ids.shape[0], chunk):
        ids, mask = prompt_ids[start:start + chunk], prompt_mask[start:start + chunk]
        cache = shared_prompt_cache(policy, ids, mask) if share_prompts else None
        out = policy.generate(input_ids=ids, attention_mask=mask, generation_config=generation_config,
                              **({} if cache is None else {CACHE_ARGUMENT: cache}))
        pieces.append(out[:, ids.shape[1]:])
    width = max(p.shape[1] for p in pieces)
    responses = torch.cat([nn.functional.pad(p, (0, width - p.shape[1]), value=pad_token_id) for p in pieces])
    response_mask, stopped = response_mask_from_stop(responses, stop_token_ids)
    responses = responses.masked_fill(response_mask == 0, pad_token_id)
    return responses, response_mask, stopped


def shared_prompt_cache(policy: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
    """Where prompts repeat (G responses to each): the keys and values of every prompt but its last token, each
    distinct prompt computed once and copied to its rows, for `generate` to go on from (it then reads the last
    token of each row, and samples). None where no prompt repeats."""
    sharing = prompt_sharing(prompt_ids, prompt_mask, prompt_ids.shape[1])
    if sharing is None or prompt_ids.shape[1] < 2:
        return None
    first, owner = sharing
    mask = prompt_mask[first, :-1]
    out = policy(input_ids=prompt_ids[first, :-1], attention_mask=mask, position_ids=position_ids_from_mask(mask),
                 use_cache=True, logits_to_keep=1)
    cache = getattr(out, CACHE_ARGUMENT)
    cache.batch_select_indices(owner)
    return cache

