"""What the trainer and the back ends run: the `ActorCritic` module (policy and critic as one) and the
forward helpers that read logits and values at the response positions."""

from __future__ import annotations

import torch
from torch import nn

from .errors import UserError


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


def token_scalars(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  keep: int | None = None) -> torch.Tensor:
    """Scalar head applied at every position (or the last `keep`). (B, L) -> (B, L or keep), float32."""
    # A critic with LoRA (peft) wraps the sequence-classification model; the backbone is inside it.
    backbone = (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    if keep is not None:
        hidden = hidden[:, -keep:]
    return scalar_head(model)(hidden).squeeze(-1).float()


class ActorCritic(nn.Module):
    """Policy and critic as one module, so one optimiser and one `accelerator.prepare` cover both
    (DDP, DeepSpeed and FSDP each wrap a single module). `value_model` is None for the critic-free
    estimators (docs/algorithm.md §9): the module is then the policy alone."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        # The decoder-layer classes, which FSDP shards as units (accelerate reads this name).
        self._no_split_modules = list(dict.fromkeys(
            name for model in (policy, value_model) if model is not None
            for name in (getattr(model, "_no_split_modules", None) or [])))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                value_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits predicting each response token and the critic's value before it (None without a critic).

        input_ids: (B, P + R) prompt then response -> logits (B, R, V), values (value_rows or B, R). Rows past
        `value_rows` (rollout memory entries) need no value: the critic skips them.
        """
        logits = policy_response_logits(self.policy, input_ids, attention_mask, response_length)
        if self.value_model is None:
            return logits, None
        rows = slice(None) if value_rows is None else slice(0, value_rows)
        values = token_scalars(self.value_model, input_ids[rows], attention_mask[rows],
                               keep=response_length + 1)[:, :-1]
        return logits, values


def policy_response_logits(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_length: int) -> torch.Tensor:
    """Logits at the positions that predict the last `response_length` tokens: (B, R, V).

    Only those R + 1 positions go through the output layer (`logits_to_keep`), not the prompt's.
    """
    out = policy(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                 logits_to_keep=response_length + 1)
    return out.logits[:, :-1]
