"""Time cost of CPPO and of the rollout memory over PPO per training step, on the same config.

PPO, CPPO with heuristic weighting, CPPO with learned weighting, and PPO and CPPO with KR on a rollout
memory (docs/algorithm.md §8; as the continual benchmark's ppo_memory and cppo_memory) are built side by side from one
config and stepped in turns (the order rotates every round), so machine noise hits all of them
alike; the figure is the median over rounds of each method's step time divided by PPO's in the same
round. Responses are sampled to full length (no stop token) so that every method does the same
amount of generation and training work at each step index. The memory methods' memory is built
once before the rounds, from their own policy on the config's task (the build is timed apart); each step
then retrieves `memory.batch_size` entries and trains on them with every mini-batch, as in a later task.

    python scripts/benchmark_overhead.py                      # tiny model, as configs/ppo_tiny.yaml
    python scripts/benchmark_overhead.py --preset small       # 4 layers × 256 wide, 64 new tokens
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cppo.builtin_models import build_tiny_gpt2  # noqa: E402
from cppo.config_loading import load_config, read_yaml_mapping  # noqa: E402
from cppo.continual import build_trainer  # noqa: E402
from cppo.memory import RolloutMemory  # noqa: E402
from cppo.memory import build as build_memory  # noqa: E402

METHODS = {
    "ppo": ["algo=ppo"],
    "cppo_heuristic": ["algo=cppo", "cppo.weighting=heuristic"],
    "cppo_learned": ["algo=cppo", "cppo.weighting=learned"],
    "ppo_memory": ["algo=cppo", "cppo.ablation=alpha_one", "cppo.kr_source=memory", "memory.weighting=uniform"],
    "cppo_memory": ["algo=cppo", "cppo.weighting=heuristic", "cppo.kr_source=memory"],
}


def later_task(config_path: str) -> str:
    """An override that adds a task after the config's first: a rollout memory holds an earlier task's responses,
    so a memory method needs one (the steps timed are the first task's, as for the other methods)."""
    first = read_yaml_mapping(config_path, "config file").get("tasks", [{}])[0]
    return "tasks=" + json.dumps([first, {**first, "name": "later"}])


def preset_overrides(preset: str, workdir: Path) -> list[str]:
    common = ["generation.stop_token=null", f"output_dir={workdir / 'unused'}"]
    if preset == "tiny":
        return common
    model_dir = workdir / "small-gpt2"
    if not (model_dir / "config.json").is_file():
        build_tiny_gpt2(model_dir, n_layer=4, n_embd=256, n_head=4, n_positions=256)
    return [*common, f"model.policy={model_dir}", "generation.max_new_tokens=64", "ppo.rollout_batch_size=32",
            "ppo.mini_batch_size=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "ppo_tiny.yaml"))
    parser.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/cppo-benchmark")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    workdir = Path(args.workdir)
    base = preset_overrides(args.preset, workdir)
    trainers, weighting_s, build_s = {}, {name: [] for name in METHODS}, {}
    for name, extra in METHODS.items():
        memory = "cppo.kr_source=memory" in extra
        config = load_config(args.config, [*base, *extra, *([later_task(args.config)] if memory else []),
                                           f"ppo.steps={args.rounds + args.warmup}"])
        trainer = build_trainer(config)
        if config.uses_memory:
            start = time.perf_counter()
            trainer.memory = RolloutMemory(config.memory, config.seed)
            trainer.memory.add(build_memory(trainer, 0, config.memory, config.cppo, config.seed)[0])
            build_s[name] = time.perf_counter() - start
        prepare = trainer.prepare_losses

        def timed_prepare(batch, kl, _prepare=prepare, _name=name):
            start = time.perf_counter()
            out = _prepare(batch, kl)
            weighting_s[_name].append(time.perf_counter() - start)
            return out

        trainer.prepare_losses = timed_prepare
        trainers[name] = trainer

    names = list(METHODS)
    times = {name: [] for name in names}
    for round_index in range(args.warmup + args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            trainers[name].step()
            elapsed = time.perf_counter() - start
            if round_index >= args.warmup:
                times[name].append(elapsed)

    result = {"preset": args.preset, "rounds": args.rounds, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "methods": {}, "memory_build_s": build_s}
    print(f"{'method':<16} {'median step s':>14} {'vs PPO (median of ratios)':>27} {'prepare_losses ms':>18}")
    for name in names:
        ratios = [t / p for t, p in zip(times[name], times["ppo"], strict=True)]
        figures = {
            "median_step_s": statistics.median(times[name]),
            "median_ratio_to_ppo": statistics.median(ratios),
            "prepare_losses_ms": 1000 * statistics.median(weighting_s[name][args.warmup:]),
        }
        figures["step_s"] = times[name]
        result["methods"][name] = figures
        print(f"{name:<16} {figures['median_step_s']:>14.4f} {figures['median_ratio_to_ppo'] - 1:>+26.1%} "
              f"{figures['prepare_losses_ms']:>18.2f}")
    for name, seconds in build_s.items():
        print(f"{name}: memory of {len(trainers[name].memory)} entries built in {seconds:.2f} s")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
