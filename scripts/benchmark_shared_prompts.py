"""What sharing a repeated prompt saves (`ppo.share_prompts`), and what it changes, on realistic shapes.

For each (prompt length P, response length R): one prompt batch of G responses to each of `--prompts` prompts
through the policy, the full forward (every row's whole sequence) against the shared one (each prompt once,
cppo.modules.response_forward), no-grad (the rollout passes: reference, π_roll, anchor, critic values) and
forward + backward (the training pass). Reported: medians of `--repeats` timings after one warm-up, the share
of the full forward's tokens that are prompt tokens, and the numerical difference of the shared forward —
largest |Δ log π| over response tokens, largest |π_shared / π_full − 1| (to compare with the ratio's clip range
ε = 0.2) and the gradient's relative difference.

    python scripts/benchmark_shared_prompts.py --out docs/results/shared_prompts_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(model, prompt_length: int, response_length: int, prompts: int, group: int, repeats: int) -> dict:
    import torch

    from cppo.core import logprobs_from_logits
    from cppo.modules import policy_response_logits

    g = torch.Generator().manual_seed(prompt_length * 1000 + response_length)
    vocab = model.config.vocab_size
    prompt_ids = torch.randint(0, vocab, (prompts, prompt_length), generator=g).repeat_interleave(group, 0)
    ids = torch.cat([prompt_ids, torch.randint(0, vocab, (prompts * group, response_length), generator=g)], 1)
    mask = torch.ones_like(ids)
    responses = ids[:, prompt_length:]

    def logprobs(share: bool):
        return logprobs_from_logits(policy_response_logits(model, ids, mask, response_length, share), responses)

    def no_grad(share: bool):
        with torch.no_grad():
            return logprobs(share)

    def train(share: bool):
        model.zero_grad(set_to_none=True)
        logprobs(share).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    model.eval()
    full, shared = no_grad(False), no_grad(True)
    row = {"prompt_length": prompt_length, "response_length": response_length, "rows": ids.shape[0],
           "prompt_token_share": prompt_length / (prompt_length + response_length),
           "max_abs_logprob_diff": (full - shared).abs().max().item(),
           "max_abs_ratio_minus_1": (torch.exp(shared - full) - 1).abs().max().item()}
    row["no_grad_full_s"] = timed(lambda: no_grad(False), repeats)
    row["no_grad_shared_s"] = timed(lambda: no_grad(True), repeats)
    model.train()
    full_grad, shared_grad = train(False), train(True)
    row["grad_relative_diff"] = ((full_grad - shared_grad).norm() / full_grad.norm()).item()
    row["train_full_s"] = timed(lambda: train(False), repeats)
    row["train_shared_s"] = timed(lambda: train(True), repeats)
    model.zero_grad(set_to_none=True)
    return row


def markdown(result: dict) -> str:
    lines = ["| P | R | prompt tokens | no-grad full → shared (s) | saved | train full → shared (s) | saved | "
             "max abs Δ log π | max abs ratio − 1 | grad rel. diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['prompt_length']} | {r['response_length']} | {r['prompt_token_share']:.0%} | "
            f"{r['no_grad_full_s']:.2f} → {r['no_grad_shared_s']:.2f} | "
            f"{1 - r['no_grad_shared_s'] / r['no_grad_full_s']:.0%} | "
            f"{r['train_full_s']:.2f} → {r['train_shared_s']:.2f} | "
            f"{1 - r['train_shared_s'] / r['train_full_s']:.0%} | "
            f"{r['max_abs_logprob_diff']:.1e} | {r['max_abs_ratio_minus_1']:.1e} | {r['grad_relative_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin:smollm2-135m")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--response-lengths", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--prompts", type=int, default=1, help="distinct prompts per batch")
    parser.add_argument("--generations", type=int, default=4, help="responses per prompt (G)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from cppo.models import resolve_model_source

    if args.threads:
        torch.set_num_threads(args.threads)
    source = resolve_model_source(args.model, "--model")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    result = {"model": args.model, "prompts": args.prompts, "generations": args.generations,
              "repeats": args.repeats, "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d"), "versions": {"torch": torch.__version__,
                                                              "transformers": __import__("transformers").__version__},
              "rows": []}
    for prompt_length in args.prompt_lengths:
        for response_length in args.response_lengths:
            row = measure(model, prompt_length, response_length, args.prompts, args.generations, args.repeats)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:  # after every shape: a stopped run keeps what it measured
                args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
