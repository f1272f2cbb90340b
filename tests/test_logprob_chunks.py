"""Log-probs over the vocabulary in chunks (`ppo.logprob_chunk_size`, core.head_logprobs_and_entropy): the output
layer runs on a chunk of hidden states at a time, forward and backward, and never makes the (rows × positions ×
vocabulary) logits; the log-probs, entropies and gradients are the full logits' up to rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, quick_overrides

from cppo import core
from cppo.config_loading import load_config
from cppo.continual import build_trainer
from cppo.modules import response_logprobs_and_entropy

PROMPT, RESPONSE, ROWS, VOCAB = 6, 7, 5, 97


def llama(model_type: str = "llama"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                         max_position_embeddings=64))
    model.config.model_type = model_type
    return model


def batch():
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (ROWS, PROMPT + RESPONSE), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[3, -3:] = 0
    return ids, mask


def test_chunked_head_logprobs_differentiate_under_bf16_autocast_as_the_full_logits():
    """Mixed precision: the forward's matrix product runs in bf16 (autocast) on float32 hidden states or on bf16 ones;
    the backward recomputes the chunk under the same autocast, as the full logits' backward differentiates them."""
    torch.manual_seed(0)
    for hidden_dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(2, 6, 8).to(hidden_dtype).requires_grad_()
        weight = torch.randn(11, 8, requires_grad=True)
        tokens = torch.randint(0, 11, (2, 6))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ours, _ = core.head_logprobs_and_entropy(hidden, weight, tokens, 1.0, chunk=5)
            theirs, _ = core.logprobs_and_entropy(hidden @ weight.T, tokens)
        assert torch.equal(ours, theirs)
        our_grads = torch.autograd.grad(ours.sum(), (hidden, weight))
        their_grads = torch.autograd.grad(theirs.sum(), (hidden, weight))
        for a, b in zip(our_grads, their_grads, strict=True):
            assert a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_logprobs_entropy_and_gradients_are_the_full_logits(temperature):
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    tokens, upstream = torch.randint(0, 11, (3, 5)), torch.randn(3, 5)
    ours, our_entropy = core.head_logprobs_and_entropy(hidden, weight, tokens, temperature, chunk=4)  # 15 = 4+4+4+3
    our_grads = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
    theirs, their_entropy = core.logprobs_and_entropy(hidden @ weight.T, tokens, temperature)
    their_grads = torch.autograd.grad((theirs * upstream).sum(), (hidden, weight))
    assert (ours - theirs).abs().max() < 1e-5 and (our_entropy - their_entropy).abs().max() < 1e-5
    for a, b in zip(our_grads, their_grads, strict=True):
        assert (a - b).abs().max() < 1e-5
    # The entropy bonus (ppo.entropy_coef) differentiates the entropy too, alone or with the log-probs.
    ours, our_entropy = core.head_logprobs_and_entropy(hidden, weight, tokens, temperature, chunk=4)
    theirs, their_entropy = core.logprobs_and_entropy(hidden @ weight.T, tokens, temperature)
    for loss_of in (lambda lp, h: (h * upstream).sum(), lambda lp, h: (lp * upstream).sum() - 0.3 * h.sum()):
        mine = torch.autograd.grad(loss_of(ours, our_entropy), (hidden, weight), retain_graph=True)
        full = torch.autograd.grad(loss_of(theirs, their_entropy), (hidden, weight), retain_graph=True)
        for a, b in zip(mine, full, strict=True):  # float32 rounding of a longer chain, on gradients of size ~1
            assert (a - b).abs().max() < 1e-4


def head_calls(model) -> list[int]:
    calls = []
    model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("share", [False, True])
def test_the_policy_never_makes_the_vocabulary_logits_in_chunks(share):
    ids, mask = batch()
    ids[1, :PROMPT], mask[1, :PROMPT] = ids[2, :PROMPT], mask[2, :PROMPT]  # a repeated prompt
    responses = ids[:, PROMPT:]
    model = llama()
    calls = head_calls(model)
    results = {}
    for chunk in (None, 8):
        model.zero_grad()
        calls.clear()
        logprobs, entropy, _ = response_logprobs_and_entropy(model, ids, mask, responses, 0.9, share, chunk)
        (logprobs * mask[:, PROMPT:]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[chunk] = logprobs.detach(), entropy, grads, len(calls)
    (full, full_entropy, full_grads, full_calls), (ours, our_entropy, our_grads, our_calls) = results[None], results[8]
    assert full_calls >= 1 and our_calls == 0  # the output layer's own forward never runs: no (B, R, V) logits
    assert (full - ours).abs().max() < 1e-5 and (full_entropy - our_entropy).abs().max() < 1e-5
    for name, grad in full_grads.items():
        assert (grad - our_grads[name]).abs().max() <= 1e-5 * grad.abs().max() + 1e-7, name


def test_other_families_and_logit_readers_get_the_output_layers_own_logits():
    ids, mask = batch()
    gemma_like = llama("gemma2")  # a family whose logits are soft-capped after the output layer
    calls = head_calls(gemma_like)
    response_logprobs_and_entropy(gemma_like, ids, mask, ids[:, PROMPT:], 1.0, chunk=8)
    assert len(calls) == 1
    model = llama()
    calls = head_calls(model)
    *_, logits = response_logprobs_and_entropy(model, ids, mask, ids[:, PROMPT:], 1.0, chunk=8, logits=True)
    assert len(calls) == 1 and logits.shape == (ROWS, RESPONSE, VOCAB)


def two_steps(tmp_path, chunk):
    overrides = quick_overrides(tmp_path / str(chunk), **{"ppo.logprob_chunk_size": chunk})
    trainer = build_trainer(load_config(ROOT / "configs" / "ppo_tiny.yaml", overrides))
    calls = []  # the output layer's calls outside generation (which makes one position's logits at a time)
    trainer.unwrapped.policy.get_output_embeddings().register_forward_hook(
        lambda _m, args, _o: calls.append(1) if args[0].shape[1] > 1 else None)
    stats = [trainer.step() for _ in range(2)]
    return stats, torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()]), len(calls)


def test_a_run_in_chunks_trains_as_one_on_the_whole_logits(tmp_path):
    (chunked, chunked_weights, chunked_calls), (whole, whole_weights, whole_calls) = (
        two_steps(tmp_path, chunk) for chunk in (5, "null"))
    assert chunked_calls == 0 and whole_calls > 0
    for mine, theirs in zip(chunked, whole, strict=True):
        assert mine["reward/mean"] == theirs["reward/mean"]
        for key in ("loss/policy", "loss/value", "kl/mean", "policy/entropy", "policy/grad_norm"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-6), key
    assert (chunked_weights - whole_weights).abs().max() < 1e-5
