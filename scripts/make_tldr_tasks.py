"""Split the Reddit TL;DR summarisation data into the paper's two continual tasks, by subreddit.

Task 1 is r/relationships, task 2 every other subreddit. Both sources are split: the TL;DR prompts
(for PPO; the human summary is kept as the reference for ROUGE-L) and the human preference pairs
(for the task's reward model). Each source is a hub dataset (all its splits), a local
.jsonl/.json/.parquet file (one split, named by --local-split), or a directory of such files named
after their splits.

    python scripts/make_tldr_tasks.py --out data/tldr                      # from the hub
    python scripts/make_tldr_tasks.py --prompts tldr.jsonl --comparisons pairs.jsonl --out data/tldr

Writes out/<task>/prompts_<split>.jsonl (prompt, reference), out/<task>/pairs_<split>.jsonl (prompt,
chosen, rejected) and out/counts.json.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

TASKS = ("relationships", "other")
_SUBREDDIT = re.compile(r"^\s*SUBREDDIT:\s*r/(\S+)", re.MULTILINE)
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def subreddit(prompt: str) -> str | None:
    found = _SUBREDDIT.search(prompt)
    return found.group(1).lower() if found else None


def task_of(prompt: str) -> str | None:
    """'relationships' for r/relationships, 'other' for any other subreddit, None without one."""
    name = subreddit(prompt)
    if name is None:
        return None
    return "relationships" if name == "relationships" else "other"


def load_splits(source: str, local_split: str) -> dict[str, list[dict]]:
    import datasets

    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in _FORMATS)
        if not files:
            raise SystemExit(f"error: {source} holds no .jsonl/.json/.parquet files")
        return {p.stem: list(datasets.load_dataset(_FORMATS[p.suffix], data_files=str(p), split="train"))
                for p in files}
    if path.suffix in _FORMATS:
        if not path.is_file():
            raise SystemExit(f"error: file not found: {source}")
        return {local_split: list(datasets.load_dataset(_FORMATS[path.suffix], data_files=str(path),
                                                        split="train"))}
    return {split: list(rows) for split, rows in datasets.load_dataset(source).items()}


def split_rows(rows: list[dict], fields: dict[str, str]) -> tuple[dict[str, list[dict]], int]:
    """Rows per task with their fields renamed (source name → output name); and the unassigned count."""
    by_task: dict[str, list[dict]] = {task: [] for task in TASKS}
    skipped = 0
    for row in rows:
        missing = [name for name in fields if name not in row]
        if missing:
            raise SystemExit(f"error: a row lacks the field(s) {', '.join(missing)}; fields: {', '.join(row)}")
        task = task_of(row["prompt"])
        if task is None:
            skipped += 1
            continue
        by_task[task].append({new: row[old] for old, new in fields.items()})
    return by_task, skipped


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", default="CarperAI/openai_summarize_tldr",
                        help="TL;DR posts with human summaries (fields: prompt, label)")
    parser.add_argument("--comparisons", default="CarperAI/openai_summarize_comparisons",
                        help="human preference pairs (fields: prompt, chosen, rejected)")
    parser.add_argument("--local-split", default="train", help="split name of a single local file")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    out = Path(args.out)

    counts: dict[str, dict[str, dict[str, int]]] = {"prompts": {}, "pairs": {}}
    sources = {"prompts": (args.prompts, {"prompt": "prompt", "label": "reference"}),
               "pairs": (args.comparisons, {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"})}
    subreddits = Counter()
    for kind, (source, fields) in sources.items():
        for split, rows in load_splits(source, args.local_split).items():
            if kind == "prompts":
                subreddits.update(subreddit(r["prompt"]) or "?" for r in rows)
            by_task, skipped = split_rows(rows, fields)
            for task, task_rows in by_task.items():
                write_jsonl(out / task / f"{kind}_{split}.jsonl", task_rows)
            counts[kind][split] = {**{task: len(by_task[task]) for task in TASKS}, "no_subreddit": skipped}
    counts["prompt_subreddits"] = dict(subreddits.most_common())
    out.mkdir(parents=True, exist_ok=True)
    (out / "counts.json").write_text(json.dumps(counts, indent=2) + "\n")
    for kind in ("prompts", "pairs"):
        for split, numbers in counts[kind].items():
            print(f"{kind:<8} {split:<8} " + "  ".join(f"{k} {v}" for k, v in numbers.items()))
    return counts


if __name__ == "__main__":
    main()
