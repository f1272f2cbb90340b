"""The policy-loss options of docs/algorithm.md §10 in runs: each learns on the tiny stream, under CPPO's weights and
KR with a critic-free estimator; the options that change which tokens train do what they say."""

import pytest
import torch
from conftest import CONTINUAL, ROOT, TWO_PROCESSES, read_metrics, run_cppo, run_in_process, tiny_continual

RLOO_TINY = str(ROOT / "configs" / "cppo_rloo_tiny.yaml")
SHORT = ["ppo.steps=14", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.ppo_epochs=2",
         "ppo.learning_rate=1e-3", "generation.max_new_tokens=8"]
OPTIONS = {
    "clip_higher": ["ppo.clip_high=0.28"],
    "gspo": ["ppo.ratio_level=sequence", "ppo.clip=0.05"],
    # DAPO's pair: truncated responses leave the loss, the penalty teaches the policy to stop before the limit
    "mask_truncated": ["ppo.mask_truncated=true", "ppo.overlong_penalty={buffer: 4, factor: 0.5}"],
    "overlong_penalty": ["ppo.overlong_penalty={buffer: 4, factor: 0.5}"],
    "entropy_bonus": ["ppo.entropy_coef=0.01"],
    "dr_grpo": ["ppo.advantage=grpo", "ppo.scale_rewards=none"],
    "gdpo": ["ppo.advantage=grpo", "tasks.0.reward={function: cppo.toy:vowel_fraction, normalize: group}"],
    "dynamic_sampling": ["ppo.advantage=grpo", "generation.dynamic_sampling=true"],
}


@pytest.mark.parametrize("option", OPTIONS)
def test_a_tiny_run_with_each_option_learns(tmp_path, capsys, option):
    code, err = run_in_process(["train", RLOO_TINY, f"output_dir={tmp_path / 'run'}", *SHORT, *OPTIONS[option]], capsys)
    assert code == 0, err[-2000:]
    rows = read_metrics(tmp_path / "run")
    # The raw reward; with the overlong penalty, the score it is part of (what the policy is trained on)
    key = "reward/score_mean" if any("overlong" in a for a in OPTIONS[option]) else "reward/mean"
    first, last = (sum(r[key] for r in part) / len(part) for part in (rows[:4], rows[-4:]))
    assert last > first + 0.1, (first, last)
    if option == "entropy_bonus":
        assert all(r["loss/entropy"] > 0 for r in rows)
    if option == "mask_truncated":  # a step whose every response ran out of tokens trains the policy on nothing
        assert all(r["loss/policy"] == 0 for r in rows if r["response/stopped_frac"] == 0)
        assert rows[-1]["response/stopped_frac"] > rows[0]["response/stopped_frac"]


# ------------------------------------------------------------------------------------------ dynamic sampling


def test_choose_groups_takes_the_informative_ones_in_order_then_fills():
    from cppo.dynamic_sampling import choose_groups

    assert choose_groups([False, True, True, False, True, True], 3) == ([1, 2, 4], 0)
    assert choose_groups([False, True, False, False], 3) == ([0, 1, 2], 2)  # short: the first filtered ones fill


# Which groups are informative depends on their prompt alone (one response in G rewarded, for a third of the
# prompts), so the groups a step keeps are the same however the responses were sampled: on 1 or 2 processes.
BY_PROMPT = """
import zlib

def one_in_group(prompts, completions):
    return [float(zlib.crc32(p.encode()) % 3 == 0 and i % 4 == 0) for i, p in enumerate(prompts)]
"""
DYNAMIC = ["generation.dynamic_sampling=true", "generation.num_generations=4", "ppo.advantage=grpo",
           "ppo.steps=3", "ppo.rollout_batch_size=16", "ppo.mini_batch_size=8", "ppo.ppo_epochs=1",
           "generation.max_new_tokens=6"]


def test_dynamic_sampling_keeps_the_batch_size_with_informative_groups_only(tmp_path, capsys, monkeypatch):
    from cppo.engine import HFEngine
    from cppo.trainer import PPOTrainer

    path = tmp_path / "by_prompt.py"
    path.write_text(BY_PROMPT)
    sizes, loads = [], []
    optimise, load = PPOTrainer.optimise, HFEngine.load
    monkeypatch.setattr(PPOTrainer, "optimise", lambda self, batch: sizes.append(batch.response_ids.shape[0])
                        or optimise(self, batch))
    monkeypatch.setattr(HFEngine, "load", lambda self, policy: loads.append(1) or load(self, policy))
    code, err = run_in_process(["train", RLOO_TINY, f"output_dir={tmp_path / 'run'}", *DYNAMIC,
                                f"tasks.0.reward.function={path}:one_in_group"], capsys)
    assert code == 0, err[-2000:]
    rows = read_metrics(tmp_path / "run")
    assert sizes == [16, 16, 16]
    assert len(loads) == 3  # the weights go to the engine once a step, however many rounds it samples
    for row in rows:
        assert row["dynamic_sampling/filtered"] > 0 and row["dynamic_sampling/rounds"] >= 2
        kept = 4 - row["dynamic_sampling/filled"]  # of the 4 groups; each informative group has one reward of 1
        assert row["reward/mean"] == pytest.approx(kept / 16)


@pytest.mark.slow
def test_dynamic_sampling_keeps_the_same_groups_on_one_or_two_processes(tmp_path):
    path = tmp_path / "by_prompt.py"
    path.write_text(BY_PROMPT)
    picked = {}
    for processes, launcher in ((1, ()), (2, TWO_PROCESSES)):
        out = tmp_path / f"p{processes}"
        run_cppo("train", RLOO_TINY, f"output_dir={out}", *DYNAMIC, f"tasks.0.reward.function={path}:one_in_group",
                 launcher=launcher)
        picked[processes] = [{k: v for k, v in row.items() if k.startswith("dynamic_sampling/") or k == "reward/mean"}
                             for row in read_metrics(out)]
    assert picked[1] == picked[2] and len(picked[1]) == 3
    assert sum(row["dynamic_sampling/filtered"] for row in picked[1]) > 0


def test_the_rollout_memory_scores_its_entries_with_the_overlong_penalty_as_the_rollouts(tmp_path):
    """R of a memory entry is what it was for a rollout (docs/algorithm.md §10: the penalty is part of R)."""
    from cppo import memory
    from cppo.config import OverlongPenaltyConfig
    from cppo.config_loading import load_config
    from cppo.continual import build_trainer
    from cppo.core import overlong_penalty

    config = load_config(CONTINUAL, tiny_continual(tmp_path / "run", steps=1, **{
        "algo": "cppo", "cppo.kr_source": "memory", "memory.build_prompts": 4, "memory.select": "all",
        "generation.max_new_tokens": 8}))
    trainer = build_trainer(config)
    plain, _ = memory.build(trainer, 0, config.memory, config.cppo, config.seed)
    config.ppo.overlong_penalty = OverlongPenaltyConfig(buffer=4, factor=0.5)
    penalised, _ = memory.build(trainer, 0, config.memory, config.cppo, config.seed)
    assert [e.response_ids for e in penalised] == [e.response_ids for e in plain] and plain
    lengths = torch.tensor([len(e.response_ids) for e in plain])
    expected = torch.tensor([e.reward for e in plain]) + overlong_penalty(lengths, 8, 4, 0.5)
    assert [e.reward for e in penalised] == pytest.approx(expected.tolist(), abs=1e-6)
    assert (overlong_penalty(lengths, 8, 4, 0.5) < 0).any()  # some entries did come near the limit
