"""scripts/make_tldr_tasks.py on a fixture with the schema of the public TL;DR data."""

import importlib.util
import json

from conftest import ROOT

FIXTURE = ROOT / "tests" / "fixtures" / "tldr"


def load_script():
    spec = importlib.util.spec_from_file_location("make_tldr_tasks", ROOT / "scripts" / "make_tldr_tasks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_by_subreddit_gives_the_expected_counts(tmp_path):
    script = load_script()
    counts = script.main(["--prompts", str(FIXTURE / "prompts.jsonl"), "--comparisons",
                          str(FIXTURE / "comparisons.jsonl"), "--out", str(tmp_path)])
    # prompts: r/relationships ×3; AskReddit, relationship_advice, tifu, personalfinance, dating_advice;
    # one post without a SUBREDDIT line. pairs: r/relationships ×5 and 7 from other subreddits.
    assert counts["prompts"]["train"] == {"relationships": 3, "other": 5, "no_subreddit": 1}
    assert counts["pairs"]["train"] == {"relationships": 5, "other": 7, "no_subreddit": 0}
    assert json.loads((tmp_path / "counts.json").read_text())["prompts"] == counts["prompts"]
    relationships = read(tmp_path / "relationships" / "prompts_train.jsonl")
    assert len(relationships) == 3 and all("r/relationships\n" in r["prompt"] for r in relationships)
    assert set(relationships[0]) == {"prompt", "reference"}
    other = read(tmp_path / "other" / "pairs_train.jsonl")
    assert len(other) == 7 and set(other[0]) == {"prompt", "chosen", "rejected"}
    assert not any("SUBREDDIT: r/relationships\n" in r["prompt"] for r in other)  # r/relationship_advice is other


def test_subreddit_parsing():
    script = load_script()
    assert script.task_of("SUBREDDIT: r/relationships\nTITLE: x\nPOST: y\nTL;DR:") == "relationships"
    assert script.task_of("SUBREDDIT: r/relationships TITLE: on one line") == "relationships"
    assert script.task_of("SUBREDDIT: r/Relationship_Advice\nTITLE: x") == "other"
    assert script.task_of("TITLE: no subreddit") is None


def test_the_split_files_load_as_task_prompts(tmp_path):
    load_script().main(["--prompts", str(FIXTURE / "prompts.jsonl"), "--comparisons",
                        str(FIXTURE / "comparisons.jsonl"), "--out", str(tmp_path)])
    from cppo.config import DataConfig
    from cppo.data import build_prompt_set
    from cppo.models import load_tokenizer, resolve_model_source

    tokenizer = load_tokenizer(resolve_model_source("builtin:tiny-gpt2", "p"))
    cfg = DataConfig(path=str(tmp_path / "relationships" / "prompts_train.jsonl"), reference_field="reference",
                     max_prompt_length=256)
    prompts = build_prompt_set(cfg, tokenizer, 0, "tasks[0].eval_prompts")
    assert len(prompts) == 3 and all(r.startswith(" made-up summary") for r in prompts.references)
