"""What the trainer and the back ends run: the `ActorCritic` module (policy and critic as one) and the
forward helpers that read logits and values at the response positions."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import core
from .errors import UserError

# The keys and values a forward takes and returns: `cache` in recent transformers, `past_key_values` before.
CACHE_ARGUMENT = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"


def scalar_head(model: nn.Module) -> nn.Module:
    """The scalar output layer of a sequence-classification model (named differently per family)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise UserError(f"{type(model).__name__} has no scalar head (score/classifier) to use as a critic")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def prompt_sharing(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows that repeat a prompt (the first `prompt_width` columns, ids and mask): (first, owner), the first row
    holding each distinct prompt and, for every row, the index of its prompt in `first`; None when no prompt
    repeats (nothing to share)."""
    key = input_ids[:, :prompt_width].masked_fill(attention_mask[:, :prompt_width] == 0, -1)
    _, owner = torch.unique(key, dim=0, return_inverse=True)
    rows = key.shape[0]
    distinct = int(owner.max()) + 1
    if distinct == rows:
        return None
    first = torch.full((distinct,), rows, dtype=torch.long, device=key.device).scatter_reduce_(
        0, owner, torch.arange(rows, device=key.device), "amin")
    return first, owner


def response_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                     share_prompts: bool, causal_lm: bool, through_last: bool = False) -> torch.Tensor:
    """The model's output at the positions that predict the last `response_length` tokens (B, R, ...): the
    CausalLM's logits (`causal_lm`) or the backbone's hidden states; with `through_last` the last position too
    (B, R + 1, ...).

    With `share_prompts`, a prompt that several rows repeat (G responses to one prompt) goes through the model
    once: its keys and values (but its last token's) are computed for its first row and reused by the others'
    responses, forward and backward (the gradient of a shared prompt sums over its responses, as the full
    forward's does). The arithmetic is the same; the results differ from the full forward by rounding
    (docs/results/shared_prompts.md). A model training with gradient checkpointing keeps no keys and values (its
    backward would recompute them into the cache again): it runs the full forward.
    """
    positions = position_ids_from_mask(attention_mask)
    length = input_ids.shape[1]
    width = length - response_length
    checkpointing = torch.is_grad_enabled() and activation_checkpointing(model)
    sharing = prompt_sharing(input_ids, attention_mask, width) if share_prompts and width > 0 and not checkpointing \
        else None

    def run(which, columns, keep, **kwargs):
        out = model(input_ids=input_ids[which, columns], attention_mask=attention_mask[which, :columns.stop],
                    position_ids=positions[which, columns], **({"logits_to_keep": keep} if causal_lm else {}),
                    **kwargs)
        return out, (out.logits if causal_lm else out.last_hidden_state)

    end = length if through_last else length - 1  # the wanted positions: width - 1 up to `end`
    if sharing is None:
        _, outputs = run(slice(None), slice(0, length), response_length + 1, use_cache=False)
        return outputs[:, -(response_length + 1):][:, :end - width + 1]
    first, owner = sharing
    cached = max(width - 1, 1)  # columns read once per prompt; the rest, row by row, go on from their cache
    head, head_outputs = run(first, slice(0, cached), 1, use_cache=True)
    cache = getattr(head, CACHE_ARGUMENT)
    cache.batch_select_indices(owner)
    _, outputs = run(slice(None), slice(cached, max(end, cached + 1)), 0, use_cache=True, **{CACHE_ARGUMENT: cache})
    if cached == width:  # a one-token prompt: its position's output is the head's
        outputs = torch.cat([head_outputs[:, -1:][owner], outputs], 1)
        return outputs[:, :end - width + 1]
    return outputs[:, :end - cached]


def activation_checkpointing(model: nn.Module) -> bool:
    """Whether a transformers model recomputes its activations in the backward (gradient checkpointing)."""
    name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else \
        "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


def backbone_of(model: nn.Module) -> nn.Module:
    """The decoder without its head, of a causal LM or a sequence-classification model (inside peft's wrapper
    where LoRA is on)."""
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model


# Families whose causal LM's logits are exactly its output layer applied to the decoder's last hidden state (no
# soft-capping, scaling or bias): their log-probs can be computed from the hidden states a chunk at a time.
PLAIN_OUTPUT_LAYER = frozenset({"gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"})


def plain_output_weight(policy: nn.Module) -> torch.Tensor | None:
    """The weight (V, H) of the policy's output layer where its logits are hidden · Wᵀ and nothing more (a family
    of PLAIN_OUTPUT_LAYER, a bias-free nn.Linear head without LoRA), else None."""
    model = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if model.config.model_type not in PLAIN_OUTPUT_LAYER or type(head) is not nn.Linear or head.bias is not None:
        return None
    return head.weight


def response_logprobs_and_entropy(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                  response_ids: torch.Tensor, temperature: float, share_prompts: bool = False,
                                  chunk: int | None = None, entropy: bool = True, logits: bool = False
                                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """log π(response token) (B, R), the entropy of π at each response position (B, R; None without `entropy`)
    and, with `logits`, the logits (B, R, V) themselves.

    With `chunk` (ppo.logprob_chunk_size) and an output layer that `plain_output_weight` finds, and no `logits`
    asked for, the log-probs come from the decoder's hidden states `chunk` positions at a time
    (core.head_logprobs_and_entropy): no (B, R, V) tensor is ever held, forward or backward. Otherwise from the
    model's own logits (core.logprobs_and_entropy)."""
    response_length = response_ids.shape[1]
    weight = None if chunk is None or logits else plain_output_weight(policy)
    if weight is not None:
        hidden = response_forward(backbone_of(policy), input_ids, attention_mask, response_length, share_prompts,
                                  causal_lm=False)
        logprobs, every_entropy = core.head_logprobs_and_entropy(hidden, weight, response_ids, temperature, chunk)
        return logprobs, every_entropy if entropy else None, None
    every_logit = policy_response_logits(policy, input_ids, attention_mask, response_length, share_prompts)
    if entropy:
        logprobs, every_entropy = core.logprobs_and_entropy(every_logit, response_ids, temperature)
    else:
        logprobs, every_entropy = core.logprobs_from_logits(every_logit, response_ids, temperature), None
    return logprobs, every_entropy, every_logit if logits else None


def token_scalars(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                  share_prompts: bool = False) -> torch.Tensor:
    """Scalar head at the positions before each of the last `response_length` tokens: (B, R), float32."""
    hidden = response_forward(backbone_of(model), input_ids, attention_mask, response_length, share_prompts,
                              causal_lm=False)
    return scalar_head(model)(hidden).squeeze(-1).float()


class ActorCritic(nn.Module):
    """Policy and critic as one module, so one optimiser and one `accelerator.prepare` cover both
    (DDP, DeepSpeed and FSDP each wrap a single module). `value_model` is None for the critic-free
    estimators (docs/algorithm.md §9): the module is then the policy alone."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None, share_prompts: bool = False,
                 logprob_chunk_size: int | None = None):
        super().__init__()
        self.logprob_chunk_size = logprob_chunk_size  # ppo.logprob_chunk_size
        self.policy = policy
        self.value_model = value_model
        self.share_prompts = share_prompts  # ppo.share_prompts: a repeated prompt goes through each model once
        # Set by a back end that gathers the weights at each call (ZeRO-3, FSDP2; Backend.prepare): the training
        # forward then reads every row's whole sequence, since the backward of a shared prompt's keys and values
        # would need weights that such a back end has already let go, and takes the logits from the output layer.
        self.sharded_weights = False
        # The decoder-layer classes, which FSDP shards as units (accelerate reads this name).
        self._no_split_modules = list(dict.fromkeys(
            name for model in (policy, value_model) if model is not None
            for name in (getattr(model, "_no_split_modules", None) or [])))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_ids: torch.Tensor,
                temperature: float, value_rows: int | None = None, entropy: bool = True, logits: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """log π of each response token, the entropy at each response position, the logits (with `logits`) and the
        critic's value before each response token (None without a critic).

        input_ids: (B, P + R) prompt then response, response_ids (B, R) -> log-probs (B, R), entropy (B, R),
        logits (B, R, V), values (value_rows or B, R). Rows past `value_rows` (rollout memory entries) need no
        value: the critic skips them. Under sharded weights the training forward neither shares prompts nor
        computes log-probs in chunks (both would read weights outside their layers' calls).
        """
        training_sharded = self.sharded_weights and torch.is_grad_enabled()
        share = self.share_prompts and not training_sharded
        logprobs, every_entropy, every_logit = response_logprobs_and_entropy(
            self.policy, input_ids, attention_mask, response_ids, temperature, share,
            None if training_sharded else self.logprob_chunk_size, entropy, logits)
        if self.value_model is None:
            return logprobs, every_entropy, every_logit, None
        rows = slice(None) if value_rows is None else slice(0, value_rows)
        values = token_scalars(self.value_model, input_ids[rows], attention_mask[rows], response_ids.shape[1], share)
        return logprobs, every_entropy, every_logit, values


def policy_response_logits(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_length: int, share_prompts: bool = False) -> torch.Tensor:
    """Logits at the positions that predict the last `response_length` tokens: (B, R, V).

    Only those R positions go through the output layer (`logits_to_keep`), not the prompt's.
    """
    return response_forward(policy, input_ids, attention_mask, response_length, share_prompts, causal_lm=True)
