"""Reward sources and a task's reward: the keywords a function is given (completion ids, the dataset's columns),
the two-argument form, async functions (concurrent, with a limit and a timeout), several weighted sources and their
logs; and the prompt data they read (subsets, split expressions, save_to_disk, rows in memory, column mappings)."""

import json
import textwrap
import time

import pytest
import torch
from conftest import CONTINUAL, TINY, one_error_line, quick_overrides, read_metrics, run_in_process, tiny_continual

from cppo.config import RewardConfig
from cppo.data import build_prompt_set, load_rows
from cppo.errors import UserError
from cppo.rewards import CallableReward, RewardBatch, RunningMoments, TaskReward, process_scores


def reward_file(tmp_path, body: str, name: str = "rewards_under_test.py") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body))
    return str(path)


def batch(n: int = 3, **columns) -> RewardBatch:
    ids = torch.arange(n * 4).view(n, 4)
    return RewardBatch([f"p{i}" for i in range(n)], [f"c{i}" for i in range(n)], [[i, i + 1] for i in range(n)],
                       columns, ids, torch.ones_like(ids), 2)


# ------------------------------------------------------------------------------------------ the keywords


def test_a_function_gets_the_completion_ids_and_the_columns_it_names(tmp_path):
    spec = reward_file(tmp_path, """
        def exact(prompts, completions, answer, completion_ids):
            return [float(c == a) + len(i) / 10 for c, a, i in zip(completions, answer, completion_ids)]

        def everything(completions, **kwargs):  # TRL's form: by keyword, the rest in **kwargs
            return [float(sorted(kwargs) == ["answer", "completion_ids", "level", "prompts"])] * len(completions)

        def positional(p, c):  # the two-argument form, any names
            return [float(len(x + y)) for x, y in zip(p, c)]
    """)
    rows = batch(answer=["c0", "x", "c2"], level=[1, 2, 3])
    assert CallableReward(RewardConfig(function=f"{spec}:exact"))(rows).tolist() == pytest.approx([1.2, 0.2, 1.2])
    assert CallableReward(RewardConfig(function=f"{spec}:everything"))(rows).tolist() == [1.0, 1.0, 1.0]
    assert CallableReward(RewardConfig(function=f"{spec}:positional"))(rows).tolist() == [4.0, 4.0, 4.0]


def test_a_function_that_requires_a_column_the_prompts_lack_is_one_line(tmp_path):
    spec = reward_file(tmp_path, """
        def exact(prompts, completions, answer):
            return [0.0] * len(completions)
    """)
    reward = CallableReward(RewardConfig(function=f"{spec}:exact"))
    reward.check_arguments({"answer", "prompt"}, "tasks[0].reward", "tasks[0].prompts")
    with pytest.raises(UserError, match=r"tasks\[0\].reward: reward function .*:exact requires 'answer', which is "
                                        r"not a column of the prompts \(columns: prompt; map one with "
                                        r"tasks\[0\].eval_prompts.columns"):
        reward.check_arguments({"prompt"}, "tasks[0].reward", "tasks[0].eval_prompts")


def test_a_verifiable_reward_reads_the_answer_column_in_a_run(tmp_path, capsys):
    """A prompt file with an answer column and a mapped keyword: every call gets each prompt's own answer (the
    function checks that the prompt it is given asks for that answer) and the run learns nothing wrong."""
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a} plus {a} is", "solution": str(2 * a)}) + "\n"
                            for a in range(16)))
    seen = tmp_path / "seen.jsonl"
    spec = reward_file(tmp_path, f"""
        import json

        def correct(prompts, completions, expected, solution, completion_ids):
            with open({str(seen)!r}, "a") as log:
                for prompt, answer, original, ids in zip(prompts, expected, solution, completion_ids):
                    a = int(prompt.split()[0])
                    log.write(json.dumps({{"mine": answer == original == str(2 * a), "ids": len(ids)}}) + "\\n")
            return [float(answer in c) for c, answer in zip(completions, expected)]
    """)
    code, err = run_in_process(["train", TINY, *quick_overrides(tmp_path / "run"), f"tasks.0.prompts.path={data}",
                                "tasks.0.prompts.columns={expected: solution}",
                                f"tasks.0.reward.function={spec}:correct"], capsys)
    assert code == 0, err[-2000:]
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(calls) == 2 * 8 and all(c["mine"] for c in calls) and all(1 <= c["ids"] <= 8 for c in calls)
    assert "reward/correct" in read_metrics(tmp_path / "run")[0]
    code, err = run_in_process(["train", TINY, *quick_overrides(tmp_path / "missing"), f"tasks.0.prompts.path={data}",
                                f"tasks.0.reward.function={spec}:correct"], capsys)
    one_error_line(code, err, "requires 'expected', which is not a column of the prompts")
    assert not (tmp_path / "missing").exists()


# ------------------------------------------------------------------------------------------ async


ASYNC = """
    import asyncio

    async def slow(prompts, completions):
        await asyncio.sleep(0.4)
        if any(c == "fail" for c in completions):
            raise ConnectionError("judge unreachable")
        return [float(len(c)) for c in completions]

    async def sizes(prompts, completions):  # each row scored with the size of the call it came in
        return [float(len(completions))] * len(completions)

    async def stuck(prompts, completions):
        await asyncio.sleep(30)
        return [0.0] * len(completions)
"""


def test_async_functions_run_concurrently_up_to_the_limit(tmp_path):
    spec = reward_file(tmp_path, ASYNC)
    rows = batch(6)
    timings = {}
    for limit in (6, 1):
        reward = CallableReward(RewardConfig(function=f"{spec}:slow", max_concurrency=limit))
        started = time.perf_counter()
        assert reward(rows).tolist() == [2.0] * 6
        timings[limit] = time.perf_counter() - started
    # Six sleeping calls at once take about one call's time; one at a time, at least six (their sleeps).
    assert timings[1] >= 6 * 0.4 and timings[6] < timings[1] / 3, timings
    chunked = CallableReward(RewardConfig(function=f"{spec}:sizes", rows_per_call=4, max_concurrency=1))
    assert chunked(rows).tolist() == [4.0, 4.0, 4.0, 4.0, 2.0, 2.0]  # two calls: rows 1-4, then 5-6


def test_an_async_function_that_fails_or_times_out_is_one_line(tmp_path):
    spec = reward_file(tmp_path, ASYNC)
    rows = batch(3)
    rows.completions[1] = "fail"
    with pytest.raises(UserError, match=r"^reward function .*:slow raised ConnectionError: judge unreachable$"):
        CallableReward(RewardConfig(function=f"{spec}:slow"))(rows)
    started = time.perf_counter()
    with pytest.raises(UserError, match=r"^reward function .*:stuck timed out after 0.2 s \(reward.timeout\) on rows "
                                        r"1-1 of 3$"):
        CallableReward(RewardConfig(function=f"{spec}:stuck", timeout=0.2))(rows)
    assert time.perf_counter() - started < 5  # the other calls were cancelled, not awaited


# ------------------------------------------------------------------------------------------ several sources


class Fixed:
    def __init__(self, scores):
        self.scores = torch.tensor(scores)

    def __call__(self, batch):
        return self.scores

    def __str__(self):
        return "fixed"


def test_several_sources_sum_their_processed_scores_by_weight():
    a = RewardConfig(function="m:a", weight=2.0)
    b = RewardConfig(function="m:b", weight=0.5, normalize="group", clip=0.6)
    reward = TaskReward([a, b], [Fixed([1.0, 0.0, 3.0, 3.0]), Fixed([1.0, 3.0, 0.0, 2.0])])
    raw = reward(batch(4))
    assert raw.tolist() == [[1.0, 1.0], [0.0, 3.0], [3.0, 0.0], [3.0, 2.0]]
    assert reward.total(raw).tolist() == [2.5, 1.5, 6.0, 7.0]
    # b within each group of 2: (1, 3) -> (-0.7071, 0.7071), (0, 2) -> (-0.7071, 0.7071), clipped to ±0.6
    combined = reward.combine(raw, torch.ones(4, dtype=torch.bool), True, group_size=2)
    assert combined.tolist() == pytest.approx([2 - 0.3, 0 + 0.3, 6 - 0.3, 6 + 0.3], abs=1e-6)
    one = TaskReward([RewardConfig(function="m:a")], [Fixed([1.0, 2.0])])
    raw = one(batch(2))
    stopped = torch.tensor([True, False])
    assert torch.equal(one.combine(raw, stopped, True), process_scores(raw[:, 0], stopped, one.configs[0],
                                                                       RunningMoments(), True))


def test_weighted_sources_are_logged_each_and_summed(tmp_path, capsys):
    overrides = quick_overrides(tmp_path / "run", steps=2)
    sources = ("[{function: cppo.toy:vowel_fraction, weight: 2}, "
               "{function: cppo.toy:digit_fraction, name: digits, weight: -1}]")
    code, err = run_in_process(["train", TINY, *overrides, f"tasks.0.reward={sources}"], capsys)
    assert code == 0, err[-2000:]
    for row in read_metrics(tmp_path / "run"):
        assert row["reward/mean"] == pytest.approx(2 * row["reward/vowel_fraction"] - row["reward/digits"], abs=1e-6)
    code, err = run_in_process(["train", TINY, *quick_overrides(tmp_path / "bad"),
                                "tasks.0.reward=[{function: cppo.toy:vowel_fraction}, "
                                "{function: cppo.toy:vowel_fraction}]"], capsys)
    one_error_line(code, err, "tasks[0].reward[1].name must be unique among the task's reward sources, got "
                              "'vowel_fraction'")


def test_the_evaluation_scores_each_source_beside_their_weighted_sum(tmp_path, capsys):
    sources = "[{function: cppo.toy:vowel_fraction, weight: 2}, {function: cppo.toy:digit_fraction, name: digits}]"
    out = tmp_path / "run"
    code, err = run_in_process(["train", CONTINUAL, *tiny_continual(out, steps=1), f"eval_reward={sources}"], capsys)
    assert code == 0, err[-2000:]
    matrix = json.loads((out / "eval_matrix.json").read_text())["scores"]
    assert {"reward", "reward/vowel_fraction", "reward/digits"} <= set(matrix)
    for row, vowels, digits in zip(matrix["reward"], matrix["reward/vowel_fraction"], matrix["reward/digits"],
                                   strict=True):
        assert row == pytest.approx([2 * v + d for v, d in zip(vowels, digits, strict=True)], abs=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reward/digits"]["final_average"] == pytest.approx(sum(matrix["reward/digits"][-1]) / 2)


# ------------------------------------------------------------------------------------------ data


def test_prompts_from_a_save_to_disk_directory_rows_in_memory_and_split_expressions(tmp_path):
    import datasets

    from cppo.config import DataConfig, describe_rows
    from cppo.models import load_tokenizer, resolve_model_source

    rows = [{"prompt": f"question {i}", "answer": str(i)} for i in range(10)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:6]),
                          "test": datasets.Dataset.from_list(rows[6:])}).save_to_disk(str(tmp_path / "saved"))
    picked = load_rows(DataConfig(path=str(tmp_path / "saved"), split="train[:2]+test[-1:]"))
    assert [r["answer"] for r in picked] == ["0", "1", "9"]
    local = tmp_path / "rows.jsonl"
    local.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["answer"] for r in load_rows(DataConfig(path=str(local), split="train[80%:]"))] == ["8", "9"]
    in_memory = load_rows(DataConfig(path=datasets.Dataset.from_list(rows), columns={"gold": "answer"},
                                     max_samples=3))
    assert in_memory == [{**r, "gold": r["answer"]} for r in rows[:3]]
    assert load_rows(DataConfig(path=rows[:2])) == rows[:2]
    assert describe_rows(rows) == describe_rows(datasets.Dataset.from_list(rows)) != describe_rows(rows[:2])
    tokenizer = load_tokenizer(resolve_model_source("builtin:tiny-gpt2", "model.policy"))
    prompts = build_prompt_set(DataConfig(path=rows, columns={"gold": "answer"}), tokenizer, 0, "prompts")
    assert prompts.columns[4] == {"prompt": "question 4", "answer": "4", "gold": "4"}
    assert prompts.column_names(0) == {"prompt", "answer", "gold"}
    with pytest.raises(UserError, match=r"^prompts.columns.gold: column 'solution' not in the 10 rows given in "
                                        r"memory \(columns: prompt, answer\)$"):
        load_rows(DataConfig(path=rows, columns={"gold": "solution"}), "prompts")
    with pytest.raises(UserError, match=r"^prompts.split: 'validation' does not select from"):
        load_rows(DataConfig(path=str(tmp_path / "saved"), split="validation"), "prompts")


def test_a_hub_dataset_is_read_with_its_subset_revision_and_files(monkeypatch):
    import datasets

    from cppo.config import DataConfig

    asked = {}

    def load_dataset(path, name=None, **kwargs):
        asked.update(path=path, name=name, **kwargs)
        return datasets.Dataset.from_list([{"question": "2 + 2?", "answer": "4"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows = load_rows(DataConfig(path="openai/gsm8k", name="main", revision="e53f048", split="test[:10]",
                                prompt_field="question"))
    assert rows == [{"question": "2 + 2?", "answer": "4"}]
    assert asked == {"path": "openai/gsm8k", "name": "main", "revision": "e53f048", "data_files": None,
                     "split": "test[:10]"}


def test_the_python_api_takes_rows_in_memory_and_records_them_in_config_yaml(tmp_path):
    import datasets
    import yaml

    import cppo

    rows = datasets.Dataset.from_list([{"prompt": f"say {w}", "word": w} for w in ("sun", "moon", "star", "sky")])
    raw = {"output_dir": str(tmp_path / "run"), "model": {"policy": "builtin:tiny-gpt2"}, "save_steps": 1,
           "ppo": {"steps": 2, "rollout_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1},
           "generation": {"max_new_tokens": 4},
           "tasks": [{"name": "words", "prompts": {"path": rows}, "reward": {"function": "cppo.toy:vowel_fraction"}}]}
    config = cppo.load_config(raw)
    cppo.run(config)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["tasks"][0]["prompts"]["path"].startswith("in memory: 4 rows, sha256 ")
    assert config.tasks[0].prompts.path is rows  # the config itself keeps the rows
    other = datasets.Dataset.from_list([{"prompt": f"say {w}", "word": w} for w in ("sea", "moon", "star", "sky")])
    raw["tasks"][0]["prompts"]["path"] = other
    with pytest.raises(UserError, match=r"tasks\[0\]\.prompts\.path") as refused:  # resumed with other rows
        cppo.run(cppo.load_config(raw), resume="auto")
    assert "ppo." not in str(refused.value)
