"""Throughput and MFU accounting (cppo.perf): the FLOP model against a count by hand, and the step's figures."""

from __future__ import annotations

import pytest
import torch
from conftest import ROOT, quick_overrides

from cppo import perf
from cppo.config_loading import load_config
from cppo.continual import build_trainer


def test_the_flop_model_counts_the_matrix_products_and_the_attention_by_hand():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    h, kv, inter, layers = 16, 8, 32, 2  # kv: 2 heads of 4
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * inter  # q, k and v, o, gate/up/down
    norms = (2 * layers + 1) * h  # counted too, as every parameter but the input embeddings is
    matmuls = layers * per_layer + 100 * h + norms  # the output layer shares the embeddings' weights, and computes
    assert perf.matmul_parameters(model) == matmuls
    lengths = torch.tensor([3.0, 5.0])
    attended = (1 + 2 + 3) + (1 + 2 + 3 + 4 + 5)
    assert perf.forward_flops(config, matmuls, lengths) == 2 * matmuls * 8 + 4 * layers * h * attended


def test_a_step_logs_its_throughput_and_its_mfu_where_the_peak_is_known(tmp_path, monkeypatch):
    trainer = build_trainer(load_config(ROOT / "configs" / "ppo_tiny.yaml", quick_overrides(tmp_path / "out")))
    stats = trainer.step()
    assert "perf/mfu" not in stats  # a CPU: no known peak
    monkeypatch.setattr(perf, "peak_flops", lambda device, precision: 1e12)
    seen = []
    real = perf.forward_flops
    monkeypatch.setattr(perf, "forward_flops", lambda *a: seen.append(a[2]) or real(*a))
    stats = trainer.step()
    lengths = seen[0]
    assert len(seen) == 2 and torch.equal(seen[1], lengths)  # policy and critic, on the same sequences
    assert len(lengths) == 8 and lengths.sum() > stats["response/tokens"]  # prompts and responses
    assert stats["perf/throughput"] == pytest.approx(lengths.sum().item() / stats["time/step_s"])
    policy, critic = trainer.unwrapped.policy, trainer.unwrapped.value_model
    update = 3 * sum(real(m.config, perf.matmul_parameters(m), lengths) for m in (policy, critic))  # one epoch
    assert stats["perf/mfu"] == pytest.approx(update / stats["time/train_s"] / 1e12)


@pytest.mark.parametrize(("architecture", "parameters"), [
    ("smollm2-135m", 134_515_008), ("qwen2.5-0.5b", 494_032_768), ("llama-3.2-1b", 1_235_814_400)])
def test_the_random_architectures_have_the_published_models_sizes(architecture, parameters):
    """builtin:random-<architecture> (built on meta here: no weights) has the parameter count of the model whose
    config it copies, so that speed measured on it is that model's."""
    from transformers import AutoModelForCausalLM

    from cppo.builtin_models import random_config

    config = random_config(architecture)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert config.pad_token_id is not None and config.eos_token_id is not None


@pytest.mark.slow
def test_a_random_architecture_builds_and_trains_a_step_offline(tmp_path):
    overrides = quick_overrides(tmp_path / "out", steps=1, **{"model.policy": "builtin:random-smollm2-135m",
                                                              "ppo.advantage": "grpo", "generation.num_generations": 4})
    trainer = build_trainer(load_config(ROOT / "configs" / "ppo_tiny.yaml", overrides))
    assert trainer.unwrapped.policy.config.vocab_size == 49152
    stats = trainer.step()
    assert stats["response/tokens"] > 0 and stats["perf/throughput"] > 0
