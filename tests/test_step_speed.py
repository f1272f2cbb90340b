"""The step's speed work: the fused optimiser, the gradient norm without a rescale, and the
side-by-side step benchmark (scripts/benchmark_step.py) against trl 1.12 and the compute floor."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, quick_overrides, run_cppo

from cppo.config_loading import load_config
from cppo.continual import build_trainer

BENCHMARK = (str(ROOT / "scripts" / "benchmark_step.py"),)
# trl 1.12, the peer the step benchmark measures, in a directory of its own: scripts/setup.sh fills it, so that no
# test installs anything.
PEER_TRL = Path(sys.prefix) / "peers" / "trl-1.12.0"


def test_adamw_runs_on_the_fused_kernel(tiny_config, tmp_path):
    trainer = build_trainer(load_config(tiny_config, quick_overrides(tmp_path / "out")))
    optimizer = trainer.optimizer.optimizer
    assert optimizer.defaults["fused"] is True
    # one parameter group per model, each with its own learning rate
    assert [len(g["params"]) for g in optimizer.param_groups] == [
        sum(p.requires_grad for p in m.parameters()) for m in (trainer.unwrapped.policy, trainer.unwrapped.value_model)]
    assert [g["lr"] for g in optimizer.param_groups] == [3.0e-4, 1.0e-3]


def test_adamw_falls_back_where_there_is_no_fused_kernel(tiny_config, tmp_path, monkeypatch):
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    trainer = build_trainer(load_config(tiny_config, quick_overrides(tmp_path / "out")))
    assert not trainer.optimizer.optimizer.defaults["fused"]


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_grad_norm_clips_only_when_asked(tiny_config, tmp_path, max_grad_norm):
    trainer = build_trainer(load_config(tiny_config, quick_overrides(
        tmp_path / "out", **{"ppo.max_grad_norm": "null" if max_grad_norm is None else max_grad_norm})))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.grad.clone() for p in params]
    expected = torch.nn.utils.get_total_norm(before)
    if max_grad_norm is None:  # unclipped: the norm alone, no pass that rescales every gradient
        def no_clipping(*_, **__):
            raise AssertionError("clip_grad_norm_ called without ppo.max_grad_norm")
        trainer.accelerator.clip_grad_norm_ = no_clipping
    norm = trainer.backend.grad_norm(trainer.model, max_grad_norm)
    assert torch.equal(norm, expected)  # the norm before clipping, as clip_grad_norm_ reports it
    if max_grad_norm is None:
        assert all(torch.equal(p.grad, b) for p, b in zip(params, before, strict=True))
    else:
        after = torch.nn.utils.get_total_norm([p.grad for p in params])
        assert after == pytest.approx(max_grad_norm, rel=1e-3)


@pytest.mark.slow
def test_step_benchmark_measures_all_three(tmp_path):
    """Two measured rounds of each implementation on the tiny GPT-2, trl 1.12 from the set-up's directory."""
    assert (PEER_TRL / "trl" / "__init__.py").is_file(), f"no trl 1.12 in {PEER_TRL}: run bash scripts/setup.sh"
    out = tmp_path / "step.json"
    run = run_cppo("--models", "tiny-gpt2", "--rounds", "2", "--warmup", "1", "--workdir", str(tmp_path / "work"),
                   "--trl-dir", str(PEER_TRL), "--out", str(out), program=BENCHMARK)
    import trl  # the project's own trl is untouched: the trl worker alone imports 1.12, from its own path

    assert trl.__version__ != "1.12.0"
    result = json.loads(out.read_text())
    model = result["models"]["tiny-gpt2"]
    assert model["prompt_length"] == 32 and model["parameters"] > 0
    impls = model["implementations"]
    assert set(impls) == {"cppo", "trl", "floor"}
    for name, figures in impls.items():
        assert len(figures["step_s"]) == 2
        phases = figures["phases_median_s"]
        assert set(phases) == {"generate", "weight_sync", "rollout_forward", "train_forward_backward", "optimizer",
                               "rest"}
        assert all(phases[p] > 0 for p in ("generate", "rollout_forward", "train_forward_backward", "optimizer"))
        assert phases["weight_sync"] == 0  # transformers' generate samples from the policy itself
        assert figures["generation_tokens_per_s"] == pytest.approx(8 * 16 / phases["generate"])
        assert figures["peak_memory_mib"] > 100
        others = {"cppo": ("trl", "floor"), "trl": ("floor",), "floor": ("trl",)}[name]
        assert all(figures[f"ratio_to_{o}"] > 0 for o in others)
    assert impls["cppo"]["optimizer"] == "AdamW (fused)" == impls["floor"]["optimizer"]
    assert 0 <= impls["floor"]["generation_logprob_gap"] < 1e-3
    assert "| tiny-gpt2 (0.12 M) | cppo |" in run.stdout


@pytest.mark.slow
def test_step_benchmark_compares_gae_with_the_critic_free_estimators(tmp_path):
    """GAE (`cppo`) against RLOO and GRPO at the same G = 4 responses per prompt: each worker its own process
    (its own peak memory), steps in turns, ratios to GAE's step in the same round."""
    out = tmp_path / "estimators.json"
    run = run_cppo("--models", "tiny-gpt2", "--impls", "cppo", "cppo-rloo", "cppo-grpo", "--generations", "4",
                   "--rounds", "2", "--warmup", "1", "--workdir", str(tmp_path / "work"), "--out", str(out),
                   program=BENCHMARK)
    result = json.loads(out.read_text())
    assert result["workload"]["generations_per_prompt"] == 4
    impls = result["models"]["tiny-gpt2"]["implementations"]
    assert set(impls) == {"cppo", "cppo-rloo", "cppo-grpo"}
    for name in ("cppo-rloo", "cppo-grpo"):
        assert impls[name]["ratio_to_cppo"] > 0 and impls[name]["peak_memory_mib"] > 100
    for name in ("cppo-rloo", "cppo-grpo"):  # the worker's config: no critic, G = 4
        config = next((tmp_path / "work").glob(f"{name}-tiny-gpt2*.yaml")).read_text()
        assert f"advantage: {name.removeprefix('cppo-')}" in config and "num_generations: 4" in config
    assert "| tiny-gpt2 (0.12 M) | cppo-rloo |" in run.stdout
