"""Ready reward functions, for `tasks[i].reward.function` (`cppo.reward_functions:<name>`). Each takes the batch's
completions and, by keyword, the dataset columns it names (docs/guides/data-and-rewards.md), and returns one
float per completion."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> float | None:
    """The last number written in digits in `text` (`1,234` is 1234, `-3.5` is -3.5), or None."""
    found = _NUMBER.findall(text)
    return None if not found else float(found[-1].replace(",", "").rstrip(","))


def number_matches(completions: list[str], answer: list, **kwargs) -> list[float]:
    """A verifiable reward: 1.0 where the completion's last number equals the row's `answer` column, else 0.0. As
    numbers (`42`, `42.0` and `+42` all match 42), and the last one, as GSM8K's answers are read ("17 + 27 = 44").
    Map a column of another name with the data section's `columns: {answer: <column>}`."""
    scores = []
    for completion, expected in zip(completions, answer, strict=True):
        given, wanted = last_number(completion), last_number(str(expected))
        scores.append(float(given is not None and wanted is not None and given == wanted))
    return scores
