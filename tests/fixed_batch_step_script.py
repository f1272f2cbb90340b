"""Run under `accelerate launch` (or plain python): one step on a fixed rollout batch (and, when the config uses
one, a fixed rollout memory), through the trainer's real `step` (the rollout is replaced by the fixed batch's
share). Without a critic (docs/algorithm.md §9) the batch has no values; its 8 rows are 4 prompts' groups of 2 (G = 2),
or 2 groups of 4, each process holding whole groups.

Rank 0 writes the step's loss terms and the gradient of its one update (rollout_batch_size = mini_batch_size)
to the JSON file named on the command line: the same on any number of processes and micro-batches.
"""

import json
import os
import sys

import torch

from cppo.config_loading import load_config
from cppo.continual import build_trainer
from cppo.memory import Entry, RolloutMemory
from cppo.rollout import Rollout

out_path, config_path, *overrides = sys.argv[1:]
trainer = build_trainer(load_config(config_path, overrides, num_processes=int(os.environ.get("WORLD_SIZE", "1"))))
acc = trainer.accelerator
generator = torch.Generator().manual_seed(1234)


def tokens(n: int) -> torch.Tensor:
    return torch.randint(3, 40, (n,), generator=generator)


# Eight rollouts with prompts and responses of different lengths (each process trims its share to its own).
total, prompt_width, width = 8, 6, 7
prompt_lengths = torch.tensor([6, 3, 5, 4, 2, 6, 5, 3])
lengths = torch.tensor([3, 7, 5, 2, 7, 4, 1, 6])
prompt_mask = (torch.arange(prompt_width).flip(0) < prompt_lengths.unsqueeze(1)).long()
prompt_ids = torch.stack([tokens(prompt_width) for _ in range(total)]) * prompt_mask
response_mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
response_ids = torch.stack([tokens(width) for _ in range(total)]) * response_mask
old_logprobs = (-3.0 + 0.5 * torch.randn(total, width, generator=generator)) * response_mask
ref_logprobs = (-3.0 + 0.5 * torch.randn(total, width, generator=generator)) * response_mask
old_values = 0.1 * torch.randn(total, width, generator=generator) * response_mask
scores = torch.tensor([0.9, 0.1, 0.5, 0.4, 0.6, 0.2, 0.8, 0.3])

share = total // acc.num_processes
rows = slice(acc.process_index * share, (acc.process_index + 1) * share)
local_width = int(lengths[rows].max())


def local(x: torch.Tensor) -> torch.Tensor:
    x = x[rows]
    return (x[:, :local_width] if x.dim() == 2 else x).to(acc.device)


critic = trainer.unwrapped.value_model is not None
batch = Rollout(prompt_ids=local(prompt_ids), prompt_mask=local(prompt_mask), response_ids=local(response_ids),
                response_mask=local(response_mask), stopped=local(torch.ones(total, dtype=torch.bool)),
                old_logprobs=local(old_logprobs), ref_logprobs=local(ref_logprobs),
                old_values=local(old_values) if critic else None,
                entropy=local(torch.zeros(total, width)), raw_scores=local(scores),
                task=local(torch.zeros(total, dtype=torch.long)))
trainer.make_rollout = lambda: (batch, 0.0)

# Six remembered responses of an earlier task (the same on every process, as after a gathered build).
if trainer.config.uses_memory:
    memory = RolloutMemory(trainer.config.memory, trainer.config.seed)
    memory.add([Entry(task=0, prompt_ids=tokens(2 + i).tolist(), response_ids=tokens(1 + (3 * i) % 7).tolist(),
                      logprobs=(-2.5 + 0.3 * torch.randn(1 + (3 * i) % 7, generator=generator)).tolist(),
                      logprob_mean=-2.5, reward=0.5, type=1 + i % 5, beta=0.5 + 0.25 * i) for i in range(6)])
    trainer.memory = memory

gradients = []
optimizer_step = trainer.backend.optimizer_step


def record_then_step(optimizer):
    gradients.append(torch.cat([p.grad.flatten() for p in trainer.unwrapped.parameters() if p.grad is not None]))
    optimizer_step(optimizer)


trainer.backend.optimizer_step = record_then_step
stats = trainer.step()
if acc.is_main_process:
    with open(out_path, "w") as f:
        json.dump({"losses": {k: v for k, v in stats.items() if k.startswith("loss/")},
                   "retrieved": stats.get("memory/retrieved/vowels"), "gradient": gradients[0].tolist(),
                   "parameters": sum(p.numel() for p in trainer.unwrapped.parameters()),
                   "processes": acc.num_processes}, f)
acc.wait_for_everyone()
acc.end_training()
# The results are written and the process group is closed: leave without the interpreter's finalisation, where a
# gloo worker thread still alive was once seen to abort the process ("terminate called without an active
# exception", SIGABRT) after everything had succeeded.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
