"""Shared prompts (`ppo.share_prompts`, cppo.modules.response_forward): a prompt that several rows repeat goes
through each model once and its keys and values serve all its responses, forward and backward. The results are
those of the full forward up to rounding; `share_prompts: false` is the full forward itself."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, quick_overrides

from cppo.config_loading import load_config
from cppo.continual import build_trainer
from cppo.modules import policy_response_logits, prompt_sharing, response_forward, token_scalars
from cppo.rewards import ModelReward, RewardBatch

PAD = 0
GROUPS, RESPONSES, PROMPT, RESPONSE = 3, 3, 7, 5


def llama(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD,
                         num_labels=1, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = (LlamaForCausalLM if kind == "causal" else LlamaForSequenceClassification)(config)
    return model.float()


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=61, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                      pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))


def grouped_batch():
    """GROUPS prompts of different lengths (left-padded), each followed by RESPONSES responses of different
    lengths (right-padded), rows of a prompt contiguous except the last group's, which is spread out."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, 61, (GROUPS, PROMPT), generator=g)
    prompt_mask = torch.ones(GROUPS, PROMPT, dtype=torch.long)
    prompt_mask[0, :3] = 0
    prompt_mask[2, :1] = 0
    prompts = prompts.masked_fill(prompt_mask == 0, PAD)
    rows = GROUPS * RESPONSES
    responses = torch.randint(1, 61, (rows, RESPONSE), generator=g)
    response_mask = torch.ones(rows, RESPONSE, dtype=torch.long)
    response_mask[1, 2:] = 0
    response_mask[4, 4:] = 0
    responses = responses.masked_fill(response_mask == 0, PAD)
    order = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8])[torch.tensor([0, 6, 1, 2, 3, 4, 5, 7, 8])]
    ids = torch.cat([prompts.repeat_interleave(RESPONSES, 0), responses], 1)[order]
    mask = torch.cat([prompt_mask.repeat_interleave(RESPONSES, 0), response_mask], 1)[order]
    return ids, mask


def counting_tokens(model) -> list[int]:
    """Number of token positions each forward of `model` embeds."""
    counts = []
    model.get_input_embeddings().register_forward_hook(lambda _m, args, _o: counts.append(args[0].numel()))
    return counts


def test_prompt_sharing_finds_the_rows_of_each_prompt_wherever_they_are():
    ids, mask = grouped_batch()
    first, owner = prompt_sharing(ids, mask, PROMPT)
    assert first.tolist() == sorted(first.tolist()) and len(first) == GROUPS
    assert torch.equal(ids[first][owner, :PROMPT], ids[:, :PROMPT])
    distinct = torch.arange(4).unsqueeze(1).expand(4, PROMPT)
    assert prompt_sharing(distinct, torch.ones_like(distinct), PROMPT) is None
    # Same ids, another padding: not the same prompt.
    masks = torch.ones(2, PROMPT, dtype=torch.long)
    masks[1, 0] = 0
    assert prompt_sharing(torch.zeros(2, PROMPT, dtype=torch.long), masks, PROMPT) is None


@pytest.mark.parametrize("build", [lambda: llama("causal"), gpt2], ids=["llama", "gpt2"])
def test_shared_prompt_logits_and_gradients_are_the_full_forwards_up_to_rounding(build):
    ids, mask = grouped_batch()
    model = build()
    counts = counting_tokens(model)
    results = {}
    for share in (False, True):
        model.zero_grad()
        counts.clear()
        logits = policy_response_logits(model, ids, mask, RESPONSE, share)
        logprobs = logits.log_softmax(-1).gather(-1, ids[:, PROMPT:, None]).squeeze(-1)
        (logprobs * mask[:, PROMPT:]).sum().backward()
        results[share] = (logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, sum(counts))
    (full, full_grads, full_tokens), (shared, shared_grads, shared_tokens) = results[False], results[True]
    assert full.shape == shared.shape == (GROUPS * RESPONSES, RESPONSE, 61)
    real = mask[:, PROMPT:].bool()
    assert (full - shared)[real].abs().max() < 1e-5
    for name, grad in full_grads.items():
        assert (grad - shared_grads[name]).norm() <= 1e-5 * grad.norm() + 1e-7, name
    # Each prompt but its last token once, then each row's last prompt token and response but its last token
    # (nothing reads the output after it).
    assert full_tokens == GROUPS * RESPONSES * (PROMPT + RESPONSE)
    assert shared_tokens == GROUPS * (PROMPT - 1) + GROUPS * RESPONSES * RESPONSE


def test_shared_prompt_values_and_reward_scores_are_the_full_forwards_up_to_rounding():
    ids, mask = grouped_batch()
    critic = llama("classifier")
    full, shared = (token_scalars(critic, ids, mask, RESPONSE, share) for share in (False, True))
    assert (full - shared)[mask[:, PROMPT:].bool()].abs().max() < 1e-5

    class Tokenizer:  # what ModelReward reads of a tokenizer: the policy's own
        truncation_side, model_max_length = "right", 64
        bos_token_id = eos_token_id = unk_token_id = None
        pad_token_id = PAD

        def get_vocab(self):
            return {"x": 1}

    reward = ModelReward(critic, Tokenizer(), Tokenizer(), batch_size=4, share_prompts=True)
    assert reward.share_prompts
    counts = counting_tokens(critic)
    own = critic(input_ids=ids, attention_mask=mask).logits[:, 0]  # its own pooling (last non-pad token)
    counts.clear()
    scores = reward(RewardBatch([""] * len(ids), [""] * len(ids), [], {}, ids, mask, PROMPT))
    assert (scores - own).abs().max() < 1e-5
    assert sum(counts) < ids.numel()
    # A response whose last token is the pad token's id (pad = eos): pooled where the model's own forward pools.
    ids[2, -1] = PAD
    own = critic(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (reward(RewardBatch([""] * len(ids), [""] * len(ids), [], {}, ids, mask, PROMPT)) - own).abs().max() < 1e-5


def two_grpo_steps(tmp_path, share: bool):
    overrides = quick_overrides(tmp_path / str(share), **{
        "ppo.advantage": "grpo", "generation.num_generations": 4, "ppo.kl_in": "loss",
        "ppo.share_prompts": str(share).lower()})
    trainer = build_trainer(load_config(ROOT / "configs" / "ppo_tiny.yaml", overrides))
    counts = counting_tokens(trainer.unwrapped.policy)
    stats = [trainer.step() for _ in range(2)]
    weights = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
    return stats, weights, sum(counts)


def test_a_grpo_run_with_shared_prompts_trains_as_the_full_forward_does_with_fewer_tokens(tmp_path):
    (shared, shared_weights, shared_tokens), (full, full_weights, full_tokens) = (
        two_grpo_steps(tmp_path, share) for share in (True, False))
    assert shared_tokens < full_tokens
    for mine, theirs in zip(shared, full, strict=True):
        assert mine["reward/mean"] == theirs["reward/mean"]  # the same responses sampled
        for key in ("loss/policy", "loss/kl", "policy/grad_norm", "policy/entropy"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert (shared_weights - full_weights).abs().max() < 1e-5


@pytest.mark.parametrize("build", [lambda: llama("causal"), gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "temperature": 1.0, "top_k": 0,
                                                             "top_p": 1.0}], ids=["greedy", "sampled"])
def test_generation_reads_a_repeated_prompt_once_and_samples_the_same_responses(build, sampling):
    from cppo.engine import generate as engine_generate
    from cppo.engine import make_generation_config

    ids, mask = grouped_batch()
    prompt_ids, prompt_mask = ids[:, :PROMPT], mask[:, :PROMPT]
    model = build().eval()
    counts = counting_tokens(model)
    config = make_generation_config([60], PAD, max_new_tokens=6, **sampling)
    results = {}
    for share in (False, True):
        counts.clear()
        torch.manual_seed(3)
        results[share] = engine_generate(model, prompt_ids, prompt_mask, config, [60], PAD, len(ids), share), counts[0]
    (full, full_first), (shared, shared_first) = results[False], results[True]
    for a, b in zip(full, shared, strict=True):
        assert torch.equal(a, b)
    assert full_first == GROUPS * RESPONSES * PROMPT  # generate's own first forward: every row's whole prompt
    assert shared_first == GROUPS * (PROMPT - 1)  # the shared cache: each prompt once, but its last token


def test_one_token_prompts_and_responses_share_too():
    model = llama("causal")
    g = torch.Generator().manual_seed(2)
    for prompt, response in ((1, 1), (1, 3), (2, 1)):
        ids = torch.cat([torch.randint(1, 61, (2, prompt), generator=g).repeat_interleave(2, 0),
                         torch.randint(1, 61, (4, response), generator=g)], 1)
        mask = torch.ones_like(ids)
        for through_last in (False, True):
            full = response_forward(model, ids, mask, response, False, True, through_last)
            shared = response_forward(model, ids, mask, response, True, True, through_last)
            assert shared.shape == full.shape == (4, response + through_last, 61)
            assert (shared - full).abs().max() < 1e-5


def test_a_model_training_with_gradient_checkpointing_runs_the_full_forward():
    ids, mask = grouped_batch()
    model = llama("causal")
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    model.train()
    counts = counting_tokens(model)
    logits = policy_response_logits(model, ids, mask, RESPONSE, share_prompts=True)
    logits.sum().backward()
    assert counts[0] == ids.numel()
    with torch.no_grad():  # nothing recomputed without a backward: shared
        counts.clear()
        policy_response_logits(model, ids, mask, RESPONSE, share_prompts=True)
        assert sum(counts) < ids.numel()


def test_under_sharded_weights_the_training_forward_reads_whole_sequences():
    """ZeRO-3 and FSDP2 let a layer's gathered weights go after its backward; a shared prompt's keys and values
    reach the prompt's layers by another path than the layers' outputs, so those back ends train on whole
    sequences (tests/test_backends.py runs them)."""
    from cppo.modules import ActorCritic

    ids, mask = grouped_batch()
    model = ActorCritic(llama("causal"), None, share_prompts=True)
    counts = counting_tokens(model.policy)
    model.sharded_weights = True
    model(ids, mask, ids[:, PROMPT:], 1.0)
    with torch.no_grad():
        model(ids, mask, ids[:, PROMPT:], 1.0)
    assert counts[0] == ids.numel() and sum(counts[1:]) < ids.numel()
