"""Throughput and model-FLOPs utilisation of a step (docs/algorithm.md is the maths; this is accounting).

`perf/throughput` is the tokens of the step's sequences, prompt and response, over every process, per second of
the step and per process (verl's definition). `perf/mfu` is the model FLOPs of the training update over its time
and the device's peak, where the device's peak is known (`PEAK_TFLOPS`):

    forward FLOPs of one token at context c = 2·N + 4·L·d·c
    update FLOPs = 3 · Σ over the updated tokens of the forward FLOPs (the backward is twice the forward)

with N the parameters of the decoder's matrix products (every parameter but the input embeddings, the output
layer counted even where it shares the embeddings' weights), L the layers, d the attention width (heads ×
head size), c the token's position in its sequence (the tokens it attends to). The FLOPs are those of whole
sequences: with shared prompts (ppo.share_prompts) the device computes fewer, so the figure is the plain
computation's rate, the one to compare across trainers.
"""

from __future__ import annotations

import torch
from torch import nn

# Dense peak TFLOP/s by device name and precision (the vendors' data sheets, SXM parts; no sparsity).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "no": 66.9},
    "H100": {"bf16": 989.4, "fp16": 989.4, "no": 66.9},
    "A100": {"bf16": 312.0, "fp16": 312.0, "no": 19.5},
    "L40S": {"bf16": 362.05, "fp16": 362.05, "no": 91.6},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak in FLOP/s at `precision` (`bf16`, `fp16` or `no`), or None where not known."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for part, peaks in PEAK_TFLOPS.items():
        if part in name:
            return peaks[precision] * 1e12
    return None


def _numel(p: torch.Tensor) -> int:
    return getattr(p, "ds_numel", None) or p.numel()  # ZeRO-3 keeps an empty placeholder and the true count


def matmul_parameters(model: nn.Module) -> int:
    """N: the parameters of a decoder's matrix products, its output layer included, its input embeddings not."""
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = model.get_input_embeddings().weight
    total = sum(_numel(p) for p in model.parameters())
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is embeddings
    return total - _numel(embeddings) + (_numel(embeddings) if tied else 0)


def forward_flops(config, matmuls: int, lengths: torch.Tensor) -> float:
    """Forward FLOPs of whole sequences of the given lengths (tokens), at 2·N + 4·L·d·c per token."""
    text = config.get_text_config()
    width = text.num_attention_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    tokens = lengths.sum().item()
    attended = (lengths * (lengths + 1) / 2).sum().item()  # Σ over tokens of their context
    return 2 * matmuls * tokens + 4 * text.num_hidden_layers * width * attended


def step_stats(trainer, batch, step_s: float, train_s: float) -> dict[str, float]:
    """`perf/throughput` and, where the device's peak is known, `perf/mfu` of a trainer's step on `batch` (every
    process calls it: the sequence lengths are gathered)."""
    lengths = trainer.backend.gather_rows((batch.prompt_mask.sum(-1) + batch.response_mask.sum(-1)).float())
    processes = trainer.accelerator.num_processes
    stats = {"perf/throughput": lengths.sum().item() / step_s / processes}
    peak = peak_flops(trainer.device, trainer.backend.precision)
    if peak is not None and train_s > 0:
        models = [m for m in (trainer.unwrapped.policy, trainer.unwrapped.value_model) if m is not None]
        update = 3 * trainer.config.ppo.ppo_epochs * sum(
            forward_flops(m.config, matmul_parameters(m), lengths) for m in models)
        stats["perf/mfu"] = update / train_s / processes / peak
    return stats
