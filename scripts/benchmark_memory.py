"""Peak memory of the training pass with the vocabulary's logits whole or in chunks (`ppo.logprob_chunk_size`).

Each measurement runs in a process of its own: build the model, then one training forward and backward of the
response tokens' log-probs and entropies (cppo.modules.response_logprobs_and_entropy, as the trainer computes
them), and report the process's peak resident memory during that pass against its resident memory before it.
Models: SmolLM2-135M-Instruct (49 152-token vocabulary, the offline builtin) and a random-weight model with
Qwen2.5-0.5B's vocabulary (151 936), hidden size and heads, but 2 layers (so that the vocabulary dominates; no
download).

    python scripts/benchmark_memory.py --out docs/results/memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Qwen2.5-0.5B's published architecture (config.json of Qwen/Qwen2.5-0.5B), with 2 of its 24 layers.
QWEN_152K = {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 2,
             "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
             "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def build(name: str):
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from cppo.models import resolve_model_source

    if name == "smollm2-135m":
        return AutoModelForCausalLM.from_pretrained(resolve_model_source("builtin:smollm2-135m", "--model"),
                                                    dtype=torch.float32)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(**QWEN_152K)).float()


def measure(name: str, chunk: int | None, rows: int, prompt: int, response: int) -> dict:
    import torch

    from cppo.modules import response_logprobs_and_entropy

    model = build(name).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (rows, prompt + response), generator=g)
    mask = torch.ones_like(ids)
    before = rss_mib()
    started = time.perf_counter()
    logprobs, _, _ = response_logprobs_and_entropy(model, ids, mask, ids[:, prompt:], 1.0, chunk=chunk)
    logprobs.sum().backward()
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"model": name, "vocab": model.config.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()), "logprob_chunk_size": chunk, "rows": rows,
            "prompt_length": prompt, "response_length": response, "rss_before_mib": before, "peak_rss_mib": peak,
            "peak_over_before_mib": peak - before, "seconds": seconds,
            "one_logits_tensor_mib": rows * response * model.config.vocab_size * 4 / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m", "qwen-152k-2-layers"])
    parser.add_argument("--chunks", nargs="+", default=["null", "1024"])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--response-length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "CHUNK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a measurement in this process (the parent starts one per model and chunk)
        model, chunk = args.one
        print(json.dumps(measure(model, None if chunk == "null" else int(chunk), args.rows, args.prompt_length,
                                 args.response_length)))
        return
    import torch
    import transformers

    result = {"date": time.strftime("%Y-%m-%d"), "device": "cpu", "dtype": "float32",
              "versions": {"torch": torch.__version__, "transformers": transformers.__version__}, "rows": []}
    for model in args.models:
        for chunk in args.chunks:
            out = subprocess.run([sys.executable, __file__, "--one", model, chunk, "--rows", str(args.rows),
                                  "--prompt-length", str(args.prompt_length),
                                  "--response-length", str(args.response_length)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
