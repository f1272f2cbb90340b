"""Toy prompts and rewards for runs with no network: learnable in a few dozen PPO steps on a CPU."""

from __future__ import annotations

import random

SUBJECTS = ["the cat", "a river", "my friend", "the old town", "a small robot", "the garden", "our team",
             "the night sky", "a quiet street", "the market", "this song", "the winter", "a letter", "the map"]
FRAMES = ["tell me about {}:", "describe {}:", "a story of {}:", "write on {}:", "notes on {}:", "why {}?"]


def toy_prompts(n: int = 512, seed: int = 0) -> list[str]:
    """`n` short English-like prompts, the same for the same seed."""
    rng = random.Random(seed)
    return [rng.choice(FRAMES).format(rng.choice(SUBJECTS)) for _ in range(n)]


def vowel_fraction(prompts: list[str], completions: list[str]) -> list[float]:
    """Share of a completion's characters that are vowels (0 for an empty completion).

    A random tiny model scores about 0.1; PPO can push it toward 1 within a few dozen steps.
    """
    return [sum(ch in "aeiou" for ch in text) / max(len(text), 1) for text in completions]


def digit_fraction(prompts: list[str], completions: list[str]) -> list[float]:
    """Share of a completion's characters that are digits: a second toy preference that conflicts with
    `vowel_fraction` (no character serves both), so learning it in sequence forgets the first."""
    return [sum(ch.isdigit() for ch in text) / max(len(text), 1) for text in completions]


# Text rewards a small pretrained chat model (configs/smollm2_lora.yaml) can learn in minutes on a CPU.

def no_digits(prompts: list[str], completions: list[str]) -> list[float]:
    """1 for an answer without any digit, minus 0.25 per digit down to −1 ("twelve", not "12")."""
    return [max(-1.0, 1.0 - 0.25 * sum(ch.isdigit() for ch in text)) for text in completions]


def numerals(prompts: list[str], completions: list[str]) -> list[float]:
    """1 for an answer that writes a number in numerals (any digit), else 0: the opposite preference
    to `no_digits`, so learning it second takes back what the first taught."""
    return [float(any(ch.isdigit() for ch in text)) for text in completions]
