"""The maths of PPO for language models: pure functions over tensors (docs/algorithm.md §2, §5, §9).

Shapes: B = rollouts, T = response tokens (right-padded), V = vocabulary. `mask` is the response
mask (B, T) with 1 on real response tokens (a prefix of each row); `weights` are per rollout (B,),
broadcast over its tokens. Nothing here knows about models, processes or configs: batch-global
statistics are taken by the caller on the gathered batch.
"""

from __future__ import annotations

import torch


def weighted_token_count(mask: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_i w_i Σ_t m_it: the denominator of a weighted masked mean. mask: (B, T); weights: (B,)."""
    tokens = mask.sum(-1).float()
    return tokens.sum() if weights is None else (tokens * weights.float()).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None,
                denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """Σ w m x / Σ w m over the whole batch (docs/algorithm.md §5); 0 when every weight or mask entry is 0.

    `denominator` replaces Σ w m: a caller that splits a batch into parts passes the whole batch's
    Σ w m, so that the parts' results add up to the whole batch's mean.
    """
    m = mask.to(x.dtype)
    if weights is not None:
        m = m * weights.to(x.dtype).unsqueeze(-1)
    if denominator is None:
        denominator = m.sum()
    # The numerator is 0 whenever the denominator is, so clamping only guards the division.
    return (x * m).sum() / torch.as_tensor(denominator, dtype=x.dtype).clamp_min(torch.finfo(x.dtype).tiny)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of x (B, T), with Bessel's correction by default."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over the masked entries (unbiased var); masked-out entries → 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(x.dtype)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return logits if temperature == 1.0 else logits / temperature  # x / 1 is x: no pass over B·T·V for it


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`. logits: (B, T, V), tokens: (B, T) -> (B, T), float32."""
    logits = _scaled(logits, temperature)
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def logprobs_and_entropy(logits: torch.Tensor, tokens: torch.Tensor,
                         temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_from_logits` (bit for bit) and the entropy of softmax(logits / temperature) per
    position, sharing one logsumexp: H = lse − Σ p·z. (B, T, V), (B, T) -> (B, T), (B, T)."""
    logits = _scaled(logits, temperature)
    lse = logits.logsumexp(-1)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
    entropy = lse - (torch.exp(logits - lse.unsqueeze(-1)) * logits).sum(-1)
    return logprobs, entropy


class _ChunkedHeadLogprobs(torch.autograd.Function):
    """log softmax(h·Wᵀ / t) at `tokens` and the entropy, `chunk` rows at a time, forward and backward: never more
    than (chunk, V) logits at once. The backward recomputes each chunk's logits under the forward's autocast (mixed
    precision), so that it differentiates the same logits; the entropy's gradient is computed only when the loss
    reads the entropy (`ppo.entropy_coef`)."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature: float, chunk: int):
        ctx.set_materialize_grads(False)  # an output the loss does not read gets no gradient, not zeros
        device = hidden.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        logprobs, entropies = [], []
        for start in range(0, hidden.shape[0], chunk):
            logits = _scaled(hidden[start:start + chunk] @ weight.T, temperature)
            logprob, entropy = logprobs_and_entropy(logits, tokens[start:start + chunk])
            logprobs.append(logprob)
            entropies.append(entropy)
        ctx.save_for_backward(hidden, weight, tokens)
        ctx.temperature, ctx.chunk = temperature, chunk
        return torch.cat(logprobs), torch.cat(entropies)

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, tokens = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h = hidden[rows]
            device, dtype, enabled = ctx.autocast
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                logits = _scaled(h @ weight.T, ctx.temperature)
            # d log p(y) / d z = onehot(y) − p and dH / dz = −p ⊙ (log p + H), through z = h·Wᵀ / t
            grad_logits = -torch.softmax(logits, -1)  # −p
            if grad_logprobs is None:
                grad_logits.zero_()
            else:
                grad_logits.scatter_add_(-1, tokens[rows].unsqueeze(-1), torch.ones_like(grad_logits[:, :1]))
                grad_logits *= grad_logprobs[rows].float().unsqueeze(-1) / ctx.temperature
            if grad_entropy is not None:
                log_p = torch.log_softmax(logits.float(), -1)
                entropy = -(log_p.exp() * log_p).sum(-1, keepdim=True)
                grad_logits -= (grad_entropy[rows].float().unsqueeze(-1) / ctx.temperature) * log_p.exp() * (
                    log_p + entropy)
            if grad_hidden is not None:
                grad_hidden[rows] = (grad_logits @ weight.float()).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += grad_logits.T @ h.float()
        return grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype), None, None, None


def head_logprobs_and_entropy(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor, temperature: float,
                              chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`logprobs_and_entropy` of the logits h·Wᵀ of an output layer without bias, computed `chunk` (row, position)
    pairs at a time: hidden (B, T, H), weight (V, H), tokens (B, T) -> (B, T), (B, T) float32. The (B, T, V)
    logits are never held, nor their gradient (the backward recomputes each chunk's)."""
    rows, positions = tokens.shape
    logprobs, entropy = _ChunkedHeadLogprobs.apply(hidden.reshape(rows * positions, -1), weight,
                                                   tokens.reshape(-1), temperature, chunk)
    return logprobs.view(rows, positions), entropy.view(rows, positions)


def response_mask_from_stop(responses: torch.Tensor,
                            stop_token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of each response up to and including its first stop token (any of `stop_token_ids`), and
    whether it stopped.

    responses: (B, T) token ids -> (mask (B, T) long, stopped (B,) bool). Without stop tokens (an
    empty list) every position is kept.
    """
    if not stop_token_ids:
        return torch.ones_like(responses), torch.zeros(responses.shape[0], dtype=torch.bool,
                                                        device=responses.device)
    is_stop = torch.isin(responses, torch.tensor(stop_token_ids, device=responses.device))
    stopped = is_stop.any(-1)
    # Count the stop tokens strictly before each position: a position is kept while that count is 0.
    before = torch.cumsum(is_stop.long(), -1) - is_stop.long()
    return (before == 0).long(), stopped


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(π ‖ π_ref) estimate from sampled tokens (docs/algorithm.md §2). (B, T) -> (B, T).

    k1 = log π − log π_ref (unbiased, can be negative); k3 = r − 1 − log r with r = π_ref/π
    (unbiased, never negative).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}")


def shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = −c_kl·kl_t + [t = last response token]·score (docs/algorithm.md §2).

    scores: (B,), kl and mask: (B, T) -> (B, T), zero outside the mask.
    """
    rewards = -kl_coef * kl * mask.to(kl.dtype)
    last = (mask.sum(-1) - 1).clamp_min(0)
    return rewards.scatter_add(-1, last.unsqueeze(-1), scores.to(kl.dtype).unsqueeze(-1))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised over batch and time.

    rewards, values, mask: (B, T), mask a prefix of each row. Returns (advantages, returns), both
    (B, T) and zero outside the mask; returns = advantages + values. The value after the last
    response token is 0 (the episode ends there).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = Σ_k (γλ)^k δ_{t+k}; the sum is one matrix product with
    D[s, t] = (γλ)^(s−t) for s ≥ t, instead of a Python loop over time.
    """
    m = mask.to(values.dtype)
    values = values * m
    next_values = torch.nn.functional.pad(values[:, 1:], (0, 1))
    deltas = (rewards * m + gamma * next_values - values) * m
    steps = torch.arange(values.shape[-1], device=values.device)
    lag = steps.unsqueeze(1) - steps.unsqueeze(0)  # lag[s, t] = s − t
    discount = torch.where(lag >= 0, (gamma * lam) ** lag.clamp_min(0).double(), 0.0)
    advantages = (deltas.double() @ discount).to(values.dtype) * m
    return advantages, (advantages + values) * m


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (docs/algorithm.md §9): A_i = R_i − mean of the other G − 1 rewards of i's group. rewards: (B,), B a
    multiple of G, each group's G responses contiguous -> (B,)."""
    r = rewards.view(-1, group_size)
    return (r - (r.sum(-1, keepdim=True) - r) / (group_size - 1)).flatten()


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (docs/algorithm.md §9): A_i = (R_i − mean_g R) / (std_g R + ε) with the unbiased std of i's group, or
    R_i − mean_g R without the division (`scale` False: Dr. GRPO). A group of equal rewards gives 0.
    rewards: (B,) in contiguous groups of G -> (B,)."""
    r = rewards.view(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    if scale:
        centred = centred / (r.std(-1, keepdim=True) + eps)
    return centred.flatten()


def returns_to_go(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """G_t = Σ_{t' ≥ t} r_t' over the response (γ = 1; REINFORCE++, docs/algorithm.md §9). (B, T) -> (B, T), 0 outside
    the mask."""
    r = rewards * mask.to(rewards.dtype)
    return (r.flip(-1).cumsum(-1).flip(-1)) * mask.to(rewards.dtype)


def advantages(estimator: str, rewards: torch.Tensor, mask: torch.Tensor, values: torch.Tensor | None = None,
               gamma: float = 1.0, lam: float = 0.95, group_size: int = 1,
               scale_rewards: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token advantages (B, T) of the shaped rewards `rewards` (B, T), and GAE's returns (None without a
    critic), by `ppo.advantage` (docs/algorithm.md §2, §9). The sequence estimators (`rloo`, `grpo`) take R_i = Σ_t r_it
    (the score less the KL shaping) and broadcast A_i to every response token of i. Whitening over the
    global batch (`whitens`) is the caller's: it needs every process's rows."""
    m = mask.to(rewards.dtype)
    if estimator == "gae":
        return gae(rewards, values, mask, gamma, lam)
    if estimator == "reinforce_pp":
        return returns_to_go(rewards, mask), None
    sequence = (rewards * m).sum(-1)
    if estimator == "rloo":
        per_response = rloo_advantages(sequence, group_size)
    elif estimator == "grpo":
        per_response = grpo_advantages(sequence, group_size, scale_rewards)
    else:
        raise ValueError(f"unknown advantage estimator {estimator!r}")
    return per_response.unsqueeze(-1) * m, None


def whitens(estimator: str, whiten_advantages: bool) -> bool:
    """Whether the advantages of `estimator` are whitened over the global batch: REINFORCE++'s by its
    definition, GAE's by choice (`ppo.whiten_advantages`); the group estimators normalise within each group."""
    return estimator == "reinforce_pp" or (estimator == "gae" and whiten_advantages)


def k3_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
            denominator: torch.Tensor | float | None = None) -> torch.Tensor:
    """GRPO's KL term with `kl_in: loss` (docs/algorithm.md §9): the masked token mean of k3(π_θ ‖ π_ref),
    differentiable in the policy's log-probs. (B, T) -> scalar."""
    return masked_mean(kl_penalty(logprobs, ref_logprobs, "k3"), mask, None, denominator)


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO's sequence-level log importance ratio (docs/algorithm.md §10): log s_i = (1/|y_i|) Σ_t m_it (log π_θ −
    log π_roll), the log of the length-normalised sequence ratio, broadcast to every token of i. (B, T) -> (B, T)."""
    m = mask.to(logprobs.dtype)
    per_sequence = ((logprobs - old_logprobs) * m).sum(-1) / m.sum(-1).clamp_min(1)
    return per_sequence.unsqueeze(-1).expand_as(logprobs)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float, weights: torch.Tensor | None = None, denominator: torch.Tensor | None = None,
                token_weights: torch.Tensor | None = None, clip_high: float | None = None,
                ratio_level: str = "token") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, a loss to minimise (docs/algorithm.md §2, §5 with weights = α; options §10).

    CLIP_t = max(−A_t ρ_t, −A_t clip(ρ_t, 1−ε_low, 1+ε_high)), ρ_t = exp(log π_θ − log π_roll), with ε_low = `clip`
    and ε_high = `clip_high` (DAPO's clip-higher; None: `clip`); with `ratio_level` "sequence" ρ_t is GSPO's
    sequence ratio s_i for every token of i (`sequence_log_ratio`). The loss is the weighted masked mean
    Σ α m CLIP / Σ α m (`denominator` as in `masked_mean`). All (B, T); weights (B,). Stats (unweighted):
    `clipfrac`, the share of tokens where the clipped branch is taken; `approx_kl`, the k3 estimate
    of KL(π_roll ‖ π_θ) per token. `token_weights` (B, T), constant: each token's CLIP is multiplied by its weight
    (the truncated importance weights of tokens sampled by another engine than π_roll); the mean's denominator
    stays the same.
    """
    token_log_ratio = logprobs - old_logprobs
    log_ratio = token_log_ratio if ratio_level == "token" else sequence_log_ratio(logprobs, old_logprobs, mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    per_token = torch.maximum(unclipped, clipped)
    if token_weights is not None:
        per_token = per_token * token_weights
    loss = masked_mean(per_token, mask, weights, denominator)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(token_log_ratio) - token_log_ratio, mask),
        }
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, denominator: torch.Tensor | float | None = None
                  ) -> torch.Tensor:
    """The masked token mean of the policy's entropy H_t (B, T), differentiable: −entropy_coef times it joins the
    loss (docs/algorithm.md §10). -> scalar."""
    return masked_mean(entropy, mask, None, denominator)


def overlong_penalty(lengths: torch.Tensor, max_length: int, buffer: int, factor: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (docs/algorithm.md §10), added to a response's score: 0 up to
    L_max − L_buffer tokens, then falling linearly to −factor at L_max, −factor beyond.
    lengths (B,) -> (B,) float32, ≤ 0."""
    over = (lengths.float() - (max_length - buffer)).clamp_min(0)
    return -factor * (over / buffer).clamp_max(1.0)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float, weights: torch.Tensor | None = None,
               denominator: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss VF_t = ½ max((V − G)², (clip(V, V_old ± ε_v) − G)²), weighted masked mean.

    All (B, T); weights (B,) (1 by default, α with `alpha_weights_value_loss`). Stat `clipfrac`: the
    share of tokens where the clipped branch is larger.
    """
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask, weights, denominator)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped_loss > unclipped_loss).to(values.dtype), mask)}
    return loss, stats


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: int, n_rollouts: int) -> float:
    """Proportional KL controller (Ziegler et al. 2019): move c_kl toward the target sequence KL.

    error = clip(kl / target − 1, −0.2, 0.2); c ← c · (1 + error · n / horizon).
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_rollouts / horizon)
