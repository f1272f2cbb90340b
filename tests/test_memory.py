"""The rollout memory (docs/algorithm.md §8): select, update, retrieve, the memory term by hand, and in real runs: the
build's stored log-probs, exact resume across a task boundary, and 2 processes against 1."""

import json
import math
import signal

import pytest
import torch
from conftest import CONTINUAL, ROOT, TWO_PROCESSES, assert_same_run, read_metrics, run_cppo

from cppo.config import MemoryConfig
from cppo.config_loading import load_config
from cppo.errors import UserError
from cppo.memory import (
    Entry,
    MemoryBatch,
    RolloutMemory,
    balanced_targets,
    keep_mask,
    memory_denominator,
    retention_loss,
    similarity,
)
from cppo.weighting import classify_rollouts


def entry(task, prompt=(1, 2), response=(3,), logprobs=(-1.0,), beta=1.0):
    return Entry(task=task, prompt_ids=list(prompt), response_ids=list(response), logprobs=list(logprobs),
                 logprob_mean=sum(logprobs) / len(logprobs), reward=0.0, type=5, beta=beta)


# --- build: which responses are kept ----------------------------------------------------------------------


def test_select_keeps_all_high_reward_or_r1_by_hand():
    # R: mean 0.5, unbiased σ = 0.2582 (values 0.2, 0.4, 0.6, 0.8); k = 0.85 → high R ⇔ R ≥ 0.7195
    reward = torch.tensor([0.2, 0.4, 0.6, 0.8])
    logprob = torch.tensor([-1.0, -3.0, -2.0, -1.2])  # mean −1.8, σ 0.9092 → high ℓ ⇔ ℓ ≥ −1.027
    types = classify_rollouts(logprob, reward, 0.85)
    assert keep_mask(logprob, reward, 0.85, "all", types).tolist() == [True] * 4
    assert keep_mask(logprob, reward, 0.85, "high_reward", types).tolist() == [False, False, False, True]
    assert keep_mask(logprob, reward, 0.85, "r1", types).tolist() == [False] * 4  # R high but ℓ = −1.2 not
    logprob = torch.tensor([-1.0, -3.0, -2.0, -0.5])  # mean −1.625, σ 1.1087 → high ℓ ⇔ ℓ ≥ −0.683
    assert keep_mask(logprob, reward, 0.85, "r1", classify_rollouts(logprob, reward, 0.85)).tolist() == [
        False, False, False, True]
    same = torch.full((4,), 0.5)  # σ_R = 0: every response is at the top (R ≥ μ + kσ = μ), none is r1
    assert keep_mask(logprob, same, 0.85, "high_reward", classify_rollouts(logprob, same, 0.85)).all()
    assert not keep_mask(logprob, same, 0.85, "r1", classify_rollouts(logprob, same, 0.85)).any()


# --- update ------------------------------------------------------------------------------------------------


def test_balanced_targets_give_each_task_an_equal_share_and_leave_small_tasks_whole():
    assert balanced_targets({0: 5, 1: 3}, 10) == {0: 5, 1: 3}  # under capacity: nothing goes
    assert balanced_targets({0: 30, 1: 30, 2: 30}, 50) == {0: 17, 1: 17, 2: 16}  # spare slots to the earliest
    assert balanced_targets({0: 100, 1: 10}, 50) == {0: 40, 1: 10}
    assert balanced_targets({0: 4, 1: 40, 2: 40}, 30) == {0: 4, 1: 13, 2: 13}


@pytest.mark.parametrize("update", ["balanced", "fifo"])
def test_update_keeps_capacity_by_its_policy_and_is_seeded(update):
    def fill(seed):
        memory = RolloutMemory(MemoryConfig(capacity=6, update=update), seed)
        evicted = [memory.add([entry(0, prompt=(i,)) for i in range(5)]),
                   memory.add([entry(1, prompt=(10 + i,)) for i in range(4)])]
        return memory, evicted

    memory, evicted = fill(3)
    assert len(memory) == 6 and evicted == [0, 3]
    if update == "fifo":  # the three oldest of task 0 went
        assert [e.prompt_ids[0] for e in memory.entries] == [3, 4, 10, 11, 12, 13]
    else:  # 3 + 3: task 0 lost two at random, task 1 one
        assert memory.task_counts() == {0: 3, 1: 3}
        assert fill(3)[0].entries == memory.entries  # the same seed, the same survivors
        assert any(fill(seed)[0].entries != memory.entries for seed in range(4, 10))
    assert [e.order for e in memory.entries] == sorted(e.order for e in memory.entries)  # order is kept


# --- retrieve ----------------------------------------------------------------------------------------------


def test_random_retrieval_is_reproducible_and_without_replacement():
    def draws(seed):
        memory = RolloutMemory(MemoryConfig(capacity=50), seed)
        memory.add([entry(0, prompt=(i,)) for i in range(20)])
        return [memory.retrieve(8) for _ in range(3)]

    first = draws(0)
    assert first == draws(0) and first != draws(1)
    assert all(len(set(d)) == 8 for d in first) and first[0] != first[1]  # the generator moves on each step
    memory = RolloutMemory(MemoryConfig(capacity=50), 0)
    memory.add([entry(0, prompt=(i,)) for i in range(3)])
    assert sorted(memory.retrieve(8)) == [0, 1, 2]  # fewer than asked: all of them


def test_similar_retrieval_picks_the_entries_nearest_to_the_batch_prompts():
    # TF-IDF over prompt tokens; token 1 is in every prompt (idf lowest), so the distinct words decide.
    prompts = [(1, 10, 11), (1, 20, 21), (1, 30, 31), (1, 20, 22), (1, 40, 41)]
    scores = similarity([list(p) for p in prompts], [[1, 20, 21, 99], [1, 40]])
    assert int(scores.argmax()) == 1 and scores[1] == pytest.approx(scores.max())
    assert scores[4] > scores[3] > scores[0] and scores[0] == pytest.approx(scores[2])
    memory = RolloutMemory(MemoryConfig(capacity=50, retrieve="similar"), 0)
    memory.add([entry(0, prompt=p) for p in prompts])
    assert sorted(memory.retrieve(2, [[1, 20, 21, 99], [1, 40]])) == [1, 4]
    assert sorted(memory.retrieve(3, [[1, 20, 21, 99], [1, 40]])) == [1, 3, 4]


# --- the memory term ---------------------------------------------------------------------------------------


def hand_batch(weighting="heuristic"):
    memory = RolloutMemory(MemoryConfig(capacity=10, weighting=weighting), 0)
    memory.add([entry(0, response=(5, 6), logprobs=(-1.5, -1.0), beta=2.0),
                entry(1, prompt=(7,), response=(8, 9, 4), logprobs=(-2.0, -0.5, -3.0), beta=0.5)])
    return memory.batch([0, 1], pad_token_id=0, device=torch.device("cpu"))


def test_memory_kr_value_and_gradient_by_hand():
    batch = hand_batch()
    assert batch.response_mask.tolist() == [[1, 1, 0], [1, 1, 1]] and batch.beta.tolist() == [2.0, 0.5]
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-2.0, -1.5, -2.0]], requires_grad=True)  # 9.0 is padding
    denominator = memory_denominator(batch, "kr")
    assert denominator == 2 * 2 + 0.5 * 3  # Σ β m = 5.5
    loss = retention_loss(logprobs, batch.logprobs, batch.response_mask, batch.beta, denominator, "kr")
    # β (Δ²): 2 (0.5² + 1²) + 0.5 (0 + 1² + 1²) = 2.5 + 1 = 3.5 → 3.5 / 5.5
    assert loss.item() == pytest.approx(3.5 / 5.5)
    loss.backward()
    # ∂/∂ log π = 2 β m (log π − λ) / Σ β m
    expected = torch.tensor([[2 * 2 * 0.5, 2 * 2 * -1.0, 0.0], [0.0, 2 * 0.5 * -1.0, 2 * 0.5 * 1.0]]) / 5.5
    torch.testing.assert_close(logprobs.grad, expected)

    uniform = hand_batch("uniform")
    assert uniform.beta.tolist() == [1.0, 1.0] and memory_denominator(uniform, "kr") == 5.0
    value = retention_loss(logprobs.detach(), uniform.logprobs, uniform.response_mask, uniform.beta, 5.0, "kr")
    assert value.item() == pytest.approx((0.25 + 1 + 0 + 1 + 1) / 5)


def test_replay_term_is_the_mean_negative_log_likelihood():
    batch = hand_batch()
    logprobs = torch.tensor([[-1.0, -2.0, 9.0], [-2.0, -1.5, -2.0]], requires_grad=True)
    denominator = memory_denominator(batch, "sft")
    loss = retention_loss(logprobs, batch.logprobs, batch.response_mask, batch.beta, denominator, "sft")
    assert denominator == 5 and loss.item() == pytest.approx((1 + 2 + 2 + 1.5 + 2) / 5)
    loss.backward()
    torch.testing.assert_close(logprobs.grad, -batch.response_mask.float() / 5)


def test_parts_with_the_whole_batch_denominator_add_up_to_the_whole():
    generator = torch.Generator().manual_seed(0)
    memory = RolloutMemory(MemoryConfig(capacity=10), 0)
    memory.add([entry(0, prompt=range(1 + i % 3), response=range(1 + (2 * i) % 5),
                      logprobs=(-torch.rand(1 + (2 * i) % 5, generator=generator)).tolist(), beta=0.3 + 0.2 * i)
                for i in range(5)])
    batch = memory.batch(list(range(5)), 0, torch.device("cpu"))
    current = -torch.rand(batch.response_ids.shape, generator=generator)
    denominator = memory_denominator(batch, "kr")
    whole = retention_loss(current, batch.logprobs, batch.response_mask, batch.beta, denominator, "kr")
    for count in (2, 3, 7):  # 7 parts of 5 rows: two are empty
        parts = batch.parts(count)
        assert sum(len(p) for p in parts) == 5
        starts = [0, *torch.tensor([len(p) for p in parts]).cumsum(0).tolist()]
        total = sum(retention_loss(current[a:b, :p.response_ids.shape[1]], p.logprobs, p.response_mask, p.beta,
                                   denominator, "kr") for p, a, b in zip(parts, starts[:-1], starts[1:], strict=True))
        assert total.item() == pytest.approx(whole.item(), rel=1e-6)
    assert isinstance(batch.parts(2)[0], MemoryBatch) and batch.parts(2)[0].prompt_ids.shape[1] <= 3


def test_state_round_trips_with_the_generator():
    memory = RolloutMemory(MemoryConfig(capacity=10), 0)
    memory.add([entry(0, prompt=(i,)) for i in range(8)])
    memory.retrieve(3)
    copy = RolloutMemory(MemoryConfig(capacity=10), 99)
    copy.load_state_dict(memory.state_dict())
    assert copy.entries == memory.entries and copy.retrieve(4) == memory.retrieve(4)


# --- configuration ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["algo=ppo", "cppo.kr_source=memory"], "cppo.kr_source must be rollouts with algo: ppo"),
    (["continual.schedule=joint", "cppo.kr_source=both"], "rollouts with continual.schedule: joint"),
    (["memory.capacity=0"], "memory.capacity must be > 0, got 0"),
    (["memory.select=best"], "memory.select must be one of"),
])
def test_bad_memory_settings_are_one_line(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(CONTINUAL, overrides)


# --- real runs ----------------------------------------------------------------------------------------------

MEMORY = ["cppo.kr_source=both", "memory.build_prompts=6", "memory.build_samples=2", "memory.capacity=8",
          "memory.batch_size=3", "memory.select=all"]


def train(out, *extra, failpoint=None, check=True):
    settings = ["tasks.0.steps=4", "tasks.1.steps=4", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=4",
                "ppo.ppo_epochs=1", "generation.max_new_tokens=8", "eval.max_prompts=8", "save_steps=3",
                "save_total_limit=null", *MEMORY]
    return run_cppo("train", CONTINUAL, f"output_dir={out}", *settings, *extra, failpoint=failpoint, check=check)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("memory") / "straight"
    train(out)
    return out


@pytest.mark.slow
def test_a_run_stores_the_task_end_policys_logprobs_and_trains_on_them(straight):
    from cppo.models import load_frozen, load_tokenizer
    from cppo.rollout import response_logprobs

    entries = [json.loads(line) for line in (straight / "task_1_vowels" / "memory.jsonl").read_text().splitlines()]
    assert len(entries) == 8 and {e["task"] for e in entries} == {"vowels"}  # 12 built, capacity 8
    path = str(straight / "task_1_vowels" / "policy")
    policy, tokenizer = load_frozen("AutoModelForCausalLM", path, load_config(CONTINUAL).model, 0), load_tokenizer(path)
    for e in entries[:3]:
        ids = torch.tensor([e["prompt_ids"] + e["response_ids"]])
        response = torch.tensor([e["response_ids"]])
        logprobs, _ = response_logprobs(policy, ids, torch.ones_like(ids), response, 1.0, 1)
        torch.testing.assert_close(logprobs[0], torch.tensor(e["logprobs"]), atol=1e-5, rtol=1e-5)
        assert e["logprob_mean"] == pytest.approx(sum(e["logprobs"]) / len(e["logprobs"]))
        assert e["response"] == tokenizer.decode(e["response_ids"], skip_special_tokens=True)
    rows = read_metrics(straight)
    assert all(r["loss/memory"] == 0 and "memory/retrieved/vowels" not in r for r in rows[:4])
    assert all(r["loss/memory"] > 0 and r["memory/retrieved/vowels"] == 3 and r["memory/size/vowels"] == 8
               for r in rows[4:])
    assert not (straight / "task_2_digits" / "memory.jsonl").exists()  # no task follows the last


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", [
    "task_end:vowels",  # memory built; the task-end checkpoint not written: resumed from step 3, built again
    "step:6:mid",  # in task 2, retrieving from the memory the task-end checkpoint holds
])
def test_sigkill_and_resume_with_memory_across_a_task_boundary_is_bit_identical(tmp_path, straight, failpoint):
    out = tmp_path / "run"
    killed = train(out, failpoint=failpoint, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    train(out, "--resume")
    assert_same_run(straight, out)
    assert (out / "task_1_vowels" / "memory.jsonl").read_text() == (
        straight / "task_1_vowels" / "memory.jsonl").read_text()


@pytest.mark.slow
def test_two_processes_give_the_losses_and_gradient_of_one_on_the_same_rollouts(tmp_path):
    """tests/fixed_batch_step_script.py: 5 memory entries split 3 + 2 over processes and again over micro-batches;
    the memory term's denominator is the whole memory batch's, so the split changes nothing but rounding."""
    settings = ["algo=cppo", "cppo.kr_source=both", "ppo.rollout_batch_size=8", "ppo.mini_batch_size=8",
                "ppo.ppo_epochs=1", "memory.batch_size=5", "ppo.max_grad_norm=null", f"output_dir={tmp_path / 'o'}"]
    script = (str(ROOT / "tests" / "fixed_batch_step_script.py"),)
    results = []
    for launcher, extra in (((), []), (TWO_PROCESSES, ["ppo.gradient_accumulation_steps=2"])):
        out = tmp_path / f"{len(results)}.json"
        run_cppo(str(out), CONTINUAL, *settings, *extra, launcher=launcher, program=script)
        results.append(json.loads(out.read_text()))
    one, two = results
    assert two["processes"] == 2 and one["retrieved"] == two["retrieved"] == 5
    assert one["losses"]["loss/memory"] > 0 and one["losses"].keys() == two["losses"].keys()
    for name, value in one["losses"].items():
        assert two["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    gradient_one, gradient_two = torch.tensor(one["gradient"]), torch.tensor(two["gradient"])
    assert gradient_one.abs().max() > 0
    torch.testing.assert_close(gradient_two, gradient_one, atol=1e-5, rtol=1e-4)
    assert math.isfinite(one["losses"]["loss/total"])
