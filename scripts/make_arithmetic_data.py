"""Writes configs/data/arithmetic/{train,eval}.jsonl: chat prompts asking for the sum of two numbers, with the answer
in a column of its own (`answer`), the data of configs/arithmetic_smollm2.yaml. Deterministic: the same files every
time. `python scripts/make_arithmetic_data.py`"""

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "configs" / "data" / "arithmetic"
PHRASES = ["What is {a} + {b}? Reply with the number only.", "Add {a} and {b}. Give just the result.",
           "Compute {a} plus {b}. Answer with a number.", "{a} + {b} = ? Reply with the number only."]


def rows(pairs):
    return [{"messages": [{"role": "user", "content": PHRASES[(a * 7 + b) % len(PHRASES)].format(a=a, b=b)}],
             "answer": str(a + b)} for a, b in pairs]


def main() -> None:
    pairs = [(a, b) for a in range(2, 21) for b in range(2, 21)]
    random.Random(0).shuffle(pairs)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, chosen in (("train", pairs[:256]), ("eval", pairs[256:320])):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(chosen)))


if __name__ == "__main__":
    main()
