"""Run under `accelerate launch` (or plain python): CPPO weights of a fixed synthetic rollout batch.

Every process takes its share of the same 8 rollouts (response widths differ between the shares, so
the gather must pad), calls the trainer's real `prepare_losses`, and rank 0 writes the global
classification statistics and the gathered α and β to the JSON file named on the command line.
"""

import json
import os
import sys

import torch

from cppo.config_loading import load_config
from cppo.continual import build_trainer
from cppo.rollout import Rollout

out_path, config_path, *overrides = sys.argv[1:]
trainer = build_trainer(load_config(config_path, overrides, num_processes=int(os.environ.get("WORLD_SIZE", "1"))))
acc = trainer.accelerator

generator = torch.Generator().manual_seed(1234)
total, width = 8, 9
lengths = torch.tensor([3, 9, 5, 2, 7, 4, 1, 6])
response_mask = (torch.arange(width) < lengths.unsqueeze(1)).long()
# rows 0–3 are meant to be r1, r2, r3, r4 and rows 4–7 r5; token noise keeps the means inexact
targets = torch.tensor([-0.5, -0.5, -3.5, -3.5, -2.0, -2.0, -2.1, -1.9]).unsqueeze(1)
old_logprobs = (targets + 0.1 * torch.randn(total, width, generator=generator)) * response_mask
scores = torch.tensor([2.0, -2.0, 2.0, -2.0, 0.0, 0.1, -0.1, 0.0]) + 0.01 * torch.randn(total, generator=generator)

share = total // acc.num_processes
rows = slice(acc.process_index * share, (acc.process_index + 1) * share)
local_width = int(lengths[rows].max())  # each process trims to its own widest response
local = lambda x: x[rows, :local_width].to(acc.device)  # noqa: E731
zeros = torch.zeros(share, local_width, device=acc.device)
batch = Rollout(prompt_ids=torch.ones(share, 2, dtype=torch.long, device=acc.device),
                prompt_mask=torch.ones(share, 2, dtype=torch.long, device=acc.device),
                response_ids=torch.ones(share, local_width, dtype=torch.long, device=acc.device),
                response_mask=local(response_mask), stopped=torch.ones(share, dtype=torch.bool, device=acc.device),
                old_logprobs=local(old_logprobs), ref_logprobs=zeros, old_values=zeros, entropy=zeros,
                raw_scores=scores[rows].to(acc.device), scores=scores[rows].to(acc.device),
                task=torch.zeros(share, dtype=torch.long, device=acc.device))
stats = trainer.prepare_losses(batch, kl=zeros)
alpha = acc.gather(batch.loss_weights["policy"]).tolist()
beta = acc.gather(batch.loss_weights["kr"]).tolist()
if acc.is_main_process:
    with open(out_path, "w") as f:
        json.dump({"stats": stats, "alpha": alpha, "beta": beta, "processes": acc.num_processes}, f)
acc.wait_for_everyone()
acc.end_training()
# The results are written and the process group is closed: leave without the interpreter's finalisation, where a
# gloo worker thread still alive was once seen to abort the process ("terminate called without an active
# exception", SIGABRT) after everything had succeeded.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
