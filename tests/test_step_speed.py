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
        # every token of the 8 sequences (32-token prompts, 16-token responses) per second; no MFU on a CPU
        assert figures["throughput_tokens_per_s"] == pytest.approx(8 * (32 + 16) / figures["median_step_s"])
        assert figures["mfu"] is None
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


# ------------------------------------------------------------------------- only what the step reads

def two_steps(tmp_path, name, overrides, monkeypatch, force=None):
    """Two steps of a fresh trainer; `force` names hooks made to answer True (the pass they skip is run); returns
    the stats, the final weights and the number of rollout-time log-prob passes."""
    import cppo.rollout
    import cppo.trainer

    trainer = build_trainer(load_config(CPPO_CONFIG if overrides.get("algo") == "cppo" else ROOT / "configs" /
                                        "ppo_tiny.yaml", quick_overrides(tmp_path / name, **overrides)))
    for hook in force or ():
        monkeypatch.setattr(trainer, hook, lambda: True)
    passes = []
    real = cppo.rollout.response_logprobs
    for module in (cppo.trainer, cppo.rollout):  # the policy's own pass, and the reference's and the anchor's
        monkeypatch.setattr(module, "response_logprobs", lambda *a, **k: passes.append(1) or real(*a, **k))
    stats = [trainer.step() for _ in range(2)]
    weights = torch.cat([p.detach().flatten() for p in trainer.unwrapped.parameters()])
    monkeypatch.undo()
    return stats, weights, len(passes)


CPPO_CONFIG = ROOT / "configs" / "cppo_tiny.yaml"
SINGLE = {"ppo.mini_batch_size": 8, "ppo.ppo_epochs": 1}  # quick_overrides' 8 rollouts in one update


def untimed(stats):
    return {k: v for k, v in stats.items() if not k.startswith(("time/", "perf/")) and k != "tokens_per_s"}


def test_without_a_kl_the_reference_pass_is_skipped_and_nothing_else_changes(tmp_path, monkeypatch):
    settings = {"ppo.kl_coef": 0.0}
    skipped, weights, passes = two_steps(tmp_path, "skip", settings, monkeypatch)
    run, run_weights, run_passes = two_steps(tmp_path, "run", settings, monkeypatch, force=["reads_reference"])
    assert (passes, run_passes) == (2 * 1, 2 * 2)  # per step: π_roll's pass, and the reference's when forced
    assert torch.equal(weights, run_weights)
    assert run[1]["kl/mean"] > 0  # the first step's policy is the reference
    for mine, theirs in zip(skipped, run, strict=True):
        assert "kl/mean" not in mine
        assert untimed(mine) == {k: v for k, v in untimed(theirs).items() if k != "kl/mean"}


def test_cppo_anchored_to_the_reference_keeps_its_pass(tmp_path, monkeypatch):
    _, _, passes = two_steps(tmp_path, "cppo", {"algo": "cppo", "ppo.kl_coef": 0.0}, monkeypatch)
    assert passes == 2 * 2  # π_roll's (ℓ) and the reference's: KR reads the reference's log-probs


@pytest.mark.parametrize("kl", ["loss", "none"])
def test_one_update_on_the_rollouts_takes_their_logprobs_from_the_training_forward(tmp_path, monkeypatch, kl):
    """On-policy (one epoch, one mini-batch) and nothing reading π_roll before the update: no rollout log-prob
    pass. On the tiny model in fp32 the pass gives the training forward's log-probs bit for bit, so the weights are
    identical; the entropy statistic, from another pass, differs in its last bits."""
    settings = {**SINGLE, **({"ppo.advantage": "grpo", "ppo.kl_in": "loss", "generation.num_generations": 2}
                             if kl == "loss" else {"ppo.kl_coef": 0.0})}
    skipped, weights, passes = two_steps(tmp_path, "skip", settings, monkeypatch)
    run, run_weights, run_passes = two_steps(tmp_path, "run", settings, monkeypatch,
                                             force=["reads_rollout_logprobs"])
    reference_passes = 1 if kl == "loss" else 0
    assert passes == 2 * reference_passes and run_passes == 2 * (1 + reference_passes)
    assert all(s["policy/clipfrac"] == 0 and s["policy/approx_kl"] == 0 for s in skipped)
    for mine, theirs in zip(skipped, run, strict=True):
        for key in ("loss/policy", "reward/mean", *(["loss/value"] if kl == "none" else ["loss/kl"])):
            assert mine[key] == theirs[key], key
        assert mine["policy/entropy"] == pytest.approx(theirs["policy/entropy"], abs=1e-5)
    assert torch.equal(weights, run_weights)
