"""Dynamic sampling (DAPO; `generation.dynamic_sampling`, docs/algorithm.md §10): a prompt group whose G responses all
got the same raw reward carries no signal for a group estimator (its advantages are 0), so it is filtered out and
more prompts are sampled until the step's batch holds `rollout_batch_size / G` informative groups, for at most
`generation.dynamic_sampling_max_rounds` rounds; a batch still short then is filled with filtered groups, in the
order they were drawn.

Every process draws its share of each round; the groups of all processes are gathered in the global batch's order,
chosen there, and each process takes its contiguous share of the chosen groups, so the choice is the same on any
number of processes. The engine takes the policy's weights once for all rounds; only the chosen responses go through
the policy's forward (the rollout's log-probs) and the other no-grad passes; every drawn response is scored once.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from accelerate.utils import gather_object

from .data import left_pad
from .engine import Generated, SeedKey


def choose_groups(informative: list[bool], wanted: int) -> tuple[list[int], int]:
    """The `wanted` groups a batch takes from the groups drawn (`informative[g]`: group g's rewards differ), as
    positions among them: the informative ones in the order drawn, then, if they are too few, the first filtered
    ones. Also returns how many filtered groups fill the batch."""
    chosen = [g for g, ok in enumerate(informative) if ok][:wanted]
    filling = [g for g, ok in enumerate(informative) if not ok][:wanted - len(chosen)]
    return sorted(chosen + filling), len(filling)


def informative_groups(trainer, policy) -> tuple[list[int], object, torch.Tensor]:
    """This process's share of the step's chosen groups, from `policy` (in eval mode, inside `backend.whole`): the
    prompt indices, the `Sampled` responses (their log-probs as `PPOTrainer.sample` gives them) and their raw scores
    (B, K). The rounds' counts go to the step's stats through `Sampled.engine_stats`."""
    config, acc = trainer.config, trainer.accelerator
    group, rounds = config.generation.num_generations, config.generation.dynamic_sampling_max_rounds
    wanted = config.ppo.rollout_batch_size // group  # groups over all processes
    drawn: list[dict] = []  # every group drawn so far, in the global batch's order, round after round
    started, stats = time.perf_counter(), {}
    trainer.engine.load(policy)  # once for every round (the weights do not change between them): one weight sync
    generate_s = time.perf_counter() - started
    try:
        for round_index in range(rounds):
            prompts = trainer.prompt_stream.next_indices(wanted, acc.process_index, acc.num_processes)
            indices = [i for i in prompts for _ in range(group)]
            purpose = "rollout" if round_index == 0 else f"rollout/{round_index}"
            key = SeedKey.contiguous(config.seed, purpose, trainer.global_step, acc.process_index * len(indices),
                                     len(indices))
            started = time.perf_counter()
            generated = trainer.engine.generate([trainer.stage.prompts.ids[i] for i in indices], trainer.decoding, key)
            seconds = time.perf_counter() - started
            generate_s, stats = generate_s + seconds, generated.stats
            # scored without a forward pass: the rollout's log-probs are computed for the chosen responses only
            sampled = trainer.sampled_from(policy, indices, replace(generated, logprobs=None), seconds, False)
            raw = trainer.score(indices, sampled)
            totals = trainer.rewards.totals(raw, sampled.task).view(-1, group)
            mine = [_group_rows(generated, raw, indices, g * group, group) | {"informative": bool(r.max() > r.min())}
                    for g, r in enumerate(totals.cpu())]
            drawn.extend(gather_object(mine) if acc.num_processes > 1 else mine)
            if sum(g["informative"] for g in drawn) >= wanted:
                break
    finally:
        trainer.engine.release()
    chosen, filled = choose_groups([g["informative"] for g in drawn], wanted)
    share = wanted // acc.num_processes
    rows = [row for g in chosen[acc.process_index * share:(acc.process_index + 1) * share] for row in drawn[g]["rows"]]
    indices = [row["prompt"] for row in rows]
    sampled = trainer.sampled_from(policy, indices, _generated(rows, trainer.tokenizer.pad_token_id, trainer.device,
                                                               stats), generate_s, trainer.reads_rollout_logprobs())
    sampled.engine_stats = {**sampled.engine_stats, "dynamic_sampling/rounds": float(round_index + 1),
                            "dynamic_sampling/filtered": float(sum(not g["informative"] for g in drawn)),
                            "dynamic_sampling/filled": float(filled)}
    raw = torch.tensor([row["raw"] for row in rows], dtype=torch.float32, device=trainer.device)
    return indices, sampled, raw


def _group_rows(generated: Generated, raw: torch.Tensor, indices: list[int], start: int, size: int) -> dict:
    """Rows `start` ... `start + size` of a round, as plain data (gathered to every process)."""
    rows = []
    for row in range(start, start + size):
        n = int(generated.response_mask[row].sum())
        rows.append({"prompt": indices[row], "response": generated.response_ids[row, :n].tolist(),
                     "stopped": bool(generated.stopped[row]), "raw": raw[row].tolist(),
                     "logprobs": None if generated.logprobs is None else generated.logprobs[row, :n].tolist()})
    return {"rows": rows}


def _generated(rows: list[dict], pad_token_id: int, device, stats: dict) -> Generated:
    """The chosen rows as an engine's output: responses right-padded with the pad token."""
    responses, mask = left_pad([r["response"][::-1] for r in rows], pad_token_id)  # right-padded, once flipped back
    logprobs = None
    if rows[0]["logprobs"] is not None:
        width = responses.shape[1]
        logprobs = torch.tensor([r["logprobs"] + [0.0] * (width - len(r["logprobs"])) for r in rows])
        logprobs = logprobs.to(device)
    return Generated(responses.flip(1).to(device), mask.flip(1).to(device),
                     torch.tensor([r["stopped"] for r in rows], device=device), logprobs, stats)
