"""Time of one PPO step: `cppo` against trl 1.12's PPOTrainer and against the compute floor.

One workload for all three: 8 prompts of the same length per step, 16 sampled tokens each (no stop
token, so every response is full length and every step does the same work), a policy with a frozen
reference, a critic and a reward model all from one checkpoint, 1 epoch of 2 mini-batches of 4.

  floor  the work itself in plain torch: generate; the policy's, reference's, critic's and reward
         model's forward passes without gradients; per mini-batch the policy and critic forward
         passes, the clipped PPO losses (cppo.core's functions), backward and an AdamW step with the
         fastest kernel this torch has on the device (fused); nothing else.
  trl    trl 1.12's `trl.experimental.ppo.PPOTrainer` (the last PPO trainer trl shipped), installed by
         pip into its own directory (--trl-dir): the project's own trl is not touched.
  cppo   `CPPOTrainer.step()` on the equivalent config (algo: cppo, heuristic weighting).
  cppo-rloo, cppo-grpo, cppo-reinforce_pp
         the same with a critic-free estimator (`ppo.advantage`, docs/algorithm.md §9): no critic is built, run or
         trained. Compare them with `cppo` (GAE) at the same `--generations` G (responses per prompt;
         the responses per step and their lengths do not change, so neither does the sampling work).
  trl-grpo
         TRL's `GRPOTrainer` (the trl this project installs), the trainer users pick for critic-free RL today:
         with `--beta B` it and `cppo-grpo` run GRPO alike, one update per generation batch of --batch
         responses (--generations per prompt), the KL to the reference as a k3 loss term of weight B (B = 0,
         TRL's default: no KL, no reference), the same reward model, prompts and sampling.
  cppo-vllm
         `cppo` with `generation.engine: vllm`: the rollouts sampled by a colocated vLLM engine, which is
         given the policy's weights before each rollout (phase weight_sync). Needs vLLM (.venv-vllm:
         run the benchmark with that environment's Python so that both sides use the same torch and
         transformers). The engine's build time is reported apart, not in any step.

Each runs in its own process, loaded once; the coordinator asks them for one step in turn (the order
rotates each round), so one computes at a time and machine noise hits all alike. Timing wrappers
around the same calls in each split a step into phases: generate; rollout forwards (log-probs of the
policy and the reference, the critic's values, the reward model); train forward+backward; the
optimiser step; and the rest (the step's time minus those). Reported: per implementation the median
step and phase times over the measured rounds, the median of the per-round ratios to trl and to the
floor, and the peak memory of its process (resident set on CPU, allocated tensors on CUDA).

    python scripts/benchmark_step.py                                  # all three models, on CPU
    python scripts/benchmark_step.py --models smollm2-135m --rounds 8
    python scripts/benchmark_step.py --precision bf16 --out docs/results/step_cuda.json   # on a GPU
    python scripts/benchmark_step.py --impls cppo cppo-rloo cppo-grpo --generations 4 --models tiny-gpt2 \
        smollm2-135m --out docs/results/estimators_cpu.json           # GAE against the critic-free estimators
    .venv-vllm/bin/python scripts/benchmark_step.py --impls cppo cppo-vllm --batch 32 --new-tokens 64 \
        --out docs/results/vllm_cpu.json                               # transformers' generate against vLLM
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRL_VERSION = "1.12.0"
ESTIMATORS = ("cppo-rloo", "cppo-grpo", "cppo-reinforce_pp")
IMPLS = ("cppo", "trl", "floor", "cppo-rloo", "cppo-grpo", "cppo-reinforce_pp", "cppo-vllm", "trl-grpo")
PHASES = ("generate", "weight_sync", "rollout_forward", "train_forward_backward", "optimizer")
LEARNING_RATE = 1e-5
BATCH, MINI_BATCH, NEW_TOKENS = 8, 4, 16  # the defaults of --batch and --new-tokens (set by main())
# model name -> (policy source, prompt length in tokens)
MODELS = {"tiny-gpt2": ("builtin:tiny-gpt2", 32), "gpt2-14m": ("gpt2-14m", 32),
          "smollm2-135m": ("builtin:smollm2-135m", 32),
          # Random weights in real architectures' shapes, with a character tokenizer: nothing to download
          # (cppo.builtin_models.RANDOM_ARCHITECTURES; the GPU benchmark, scripts/benchmark_gpu.sh).
          **{f"random-{name}": (f"builtin:random-{name}", 32) for name in ("smollm2-135m", "qwen2.5-0.5b",
                                                                         "llama-3.2-1b")}}


# ------------------------------------------------------------------------------------ the workers

class Phases:
    """Seconds spent in named phases since the last `take()`; waits for the device around each."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start

    def wrap(self, name, function):
        @functools.wraps(function)
        def timed(*args, **kwargs):
            with self(name):
                return function(*args, **kwargs)
        return timed

    def take(self) -> dict[str, float]:
        out = dict(self.seconds)
        self.seconds.clear()
        return out


class Channel:
    """Commands from the coordinator on stdin; JSON answers on the process's original stdout, which
    is moved aside first, so that whatever the libraries print goes to stderr instead."""

    def __init__(self):
        self.out = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)

    def send(self, **message) -> None:
        self.out.write(json.dumps(message) + "\n")
        self.out.flush()

    def receive(self) -> str:
        return sys.stdin.readline().strip() or "quit"


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark_prompts(tokenizer, source: str, prompt_length: int, workdir: Path):
    """cppo's own tokenised prompts of `prompt_length` tokens each (longer texts, cut to their last
    tokens): the three implementations read the same ids."""
    from cppo.config import DataConfig
    from cppo.data import build_prompt_set

    path = workdir / f"prompts-{Path(source).name}.jsonl"
    words = "the a river model answer question light small quickly seven over under because often".split()
    with path.open("w") as f:
        for i in range(64):
            text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6 * prompt_length))
            f.write(json.dumps({"prompt": f"Prompt {i}: {text}"}) + "\n")
    cfg = DataConfig(path=str(path), max_prompt_length=prompt_length, long_prompts="truncate")
    prompts = build_prompt_set(cfg, tokenizer, 0, "benchmark prompts")
    assert {len(ids) for ids in prompts.ids} == {prompt_length}, "benchmark prompts must all have the same length"
    return path, prompts


def cppo_worker(args, phases_for):
    import yaml

    import cppo.trainer as trainer_module
    from cppo.config_loading import load_config
    from cppo.continual import build_trainer
    from cppo.models import load_tokenizer, resolve_model_source

    source = resolve_model_source(args.policy, "policy")
    workdir = Path(args.workdir)
    prompts_path, _ = benchmark_prompts(load_tokenizer(source), source, args.prompt_length, workdir)
    config = {
        "algo": "cppo", "seed": 0, "output_dir": str(workdir / "cppo-run"), "report_to": [],
        "mixed_precision": "bf16" if args.precision == "bf16" else "no",
        "model": {"policy": source, "value_init": "policy"},
        "tasks": [{"name": "bench", "reward": {"model": source},
                   "prompts": {"path": str(prompts_path), "max_prompt_length": args.prompt_length,
                               "long_prompts": "truncate"}}],
        "generation": {"max_new_tokens": NEW_TOKENS, "stop_token": None, "num_generations": args.generations,
                       "engine": "vllm" if args.worker == "cppo-vllm" else "hf"},
        # vLLM's CPU build needs a fixed KV-cache size; on a GPU it takes a share of the memory.
        "vllm": {"kv_cache_memory_bytes": 512 << 20} if args.device == "cpu" else {"gpu_memory_utilization": 0.3},
        "ppo": {"advantage": args.worker.removeprefix("cppo-") if args.worker in ESTIMATORS else "gae",
                "steps": 100000, "rollout_batch_size": BATCH, "mini_batch_size": MINI_BATCH, "ppo_epochs": 1,
                "learning_rate": LEARNING_RATE, "value_learning_rate": LEARNING_RATE, "max_grad_norm": None},
    }
    if args.beta is not None:  # GRPO as trl-grpo runs it: plain PPO's loop, one update, the KL as a k3 loss term
        config["algo"] = "ppo"
        config["ppo"].update({"mini_batch_size": BATCH, "kl_in": "loss", "kl_coef": args.beta})
    path = workdir / f"{args.worker}-{Path(source).name}.yaml"
    path.write_text(yaml.safe_dump(config))
    trainer = build_trainer(load_config(str(path)))
    phases = phases_for(trainer.device)
    trainer.engine.generate = phases.wrap("generate", trainer.engine.generate)
    for name in ("response_logprobs", "rollout_passes"):  # the policy's pass; the reference's, critic's, anchor's
        setattr(trainer_module, name, phases.wrap("rollout_forward", getattr(trainer_module, name)))
    for reward in trainer.rewards:
        reward.sources = [TimedReward(source, phases) for source in reward.sources]
    trainer.model.forward = phases.wrap("train_forward_backward", trainer.model.forward)
    trainer.accelerator.backward = phases.wrap("train_forward_backward", trainer.accelerator.backward)
    trainer.optimizer.step = phases.wrap("optimizer", trainer.optimizer.step)
    info = {"optimizer": optimizer_name(trainer.optimizer)}
    if args.worker == "cppo-vllm":
        engine = trainer.engine  # built with the trainer, outside the timed steps
        engine.load = phases.wrap("weight_sync", engine.load)
        info["engine_build_s"] = engine.build_s

    def step() -> int:
        stats = trainer.step()
        trainer.step_in_stage += 1
        return int(stats["response/tokens"])

    return step, phases, trainer.device, info


class TimedReward:
    """A reward source whose calls count as rollout forwards (it keeps its name for messages)."""

    def __init__(self, reward, phases):
        self.reward, self.phases = reward, phases

    def __call__(self, batch):
        with self.phases("rollout_forward"):
            return self.reward(batch)

    def __str__(self) -> str:
        return str(self.reward)


def optimizer_name(optimizer) -> str:
    optimizer = getattr(optimizer, "optimizer", optimizer)
    defaults = optimizer.defaults
    kind = "fused" if defaults.get("fused") else "foreach" if defaults.get("foreach") else "default"
    return f"{type(optimizer).__name__} ({kind})"


def load_models(source: str, device):
    """Policy, reference, critic and reward model from one checkpoint, dropout off."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the scalar heads are new: expected
    models = [AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32) for _ in range(2)]
    models += [AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32, num_labels=1)
               for _ in range(2)]
    for model in models:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return [model.to(device) for model in models]


def floor_worker(args, phases_for):
    import torch
    from transformers import GenerationConfig

    from cppo import core
    from cppo.engine import make_generation_config
    from cppo.models import load_tokenizer, resolve_model_source

    torch.manual_seed(0)
    device = torch.device(args.device)
    source = resolve_model_source(args.policy, "policy")
    tokenizer = load_tokenizer(source)
    _, prompts = benchmark_prompts(tokenizer, source, args.prompt_length, Path(args.workdir))
    policy, reference, critic, reward = load_models(source, device)
    for model in (policy, critic):
        model.config.pad_token_id = tokenizer.pad_token_id
        model.train()
    for model in (reference, reward):
        model.config.pad_token_id = tokenizer.pad_token_id
        model.eval().requires_grad_(False)
    policy.generation_config = GenerationConfig(pad_token_id=tokenizer.pad_token_id)
    sampling = {"do_sample": True, "max_new_tokens": NEW_TOKENS, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    generation = make_generation_config([], tokenizer.pad_token_id, **sampling)
    fused = {"fused": True} if device.type in ("cpu", "cuda") else {}
    optimizer = torch.optim.AdamW([{"params": list(policy.parameters())}, {"params": list(critic.parameters())}],
                                  lr=LEARNING_RATE, weight_decay=0.0, **fused)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else \
        contextlib.nullcontext
    phases = phases_for(device)
    position = [0]

    def response_logprobs(model, sequences, responses):
        logits = model(input_ids=sequences, logits_to_keep=responses.shape[1] + 1).logits[:, :-1]
        return core.logprobs_from_logits(logits, responses)

    def critic_values(sequences, length):
        hidden = critic.base_model(input_ids=sequences).last_hidden_state[:, -length - 1:-1]
        return critic.score(hidden).squeeze(-1).float()

    def step() -> int:
        rows = [(position[0] + i) % len(prompts.ids) for i in range(BATCH)]
        position[0] += BATCH
        prompt_ids = torch.tensor([prompts.ids[i] for i in rows], device=device)
        with torch.no_grad(), autocast():
            with phases("generate"):
                sequences = policy.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                            generation_config=generation)
            responses = sequences[:, prompt_ids.shape[1]:]
            length = responses.shape[1]
            with phases("rollout_forward"):
                old_logprobs = response_logprobs(policy, sequences, responses)
                ref_logprobs = response_logprobs(reference, sequences, responses)
                old_values = critic_values(sequences, length)
                scores = reward(input_ids=sequences).logits[:, 0].float()
        mask = torch.ones_like(responses)
        rewards = core.shaped_rewards(scores, old_logprobs - ref_logprobs, mask, 0.05)
        advantages, returns = core.gae(rewards, old_values, mask, 1.0, 0.95)
        advantages = core.masked_whiten(advantages, mask)
        for mini in torch.randperm(BATCH).split(MINI_BATCH):
            with phases("train_forward_backward"):
                with autocast():
                    logprobs = response_logprobs(policy, sequences[mini], responses[mini])
                    values = critic_values(sequences[mini], length)
                pg, _ = core.policy_loss(logprobs, old_logprobs[mini], advantages[mini], mask[mini], 0.2)
                vf, _ = core.value_loss(values, old_values[mini], returns[mini], mask[mini], 0.2)
                (pg + 0.1 * vf).backward()
            with phases("optimizer"):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return int(mask.sum())

    def generation_logprob_gap() -> float:
        """Largest |log π(token)| difference between generation's own logits (what trl uses for the
        rollout log-probs, saving the policy's rollout forward pass) and a forward pass over the
        whole sequence (what the training forward computes): 0 would make trl's shortcut exact."""
        prompt_ids = torch.tensor(prompts.ids[:BATCH], device=device)
        with torch.no_grad(), autocast():
            with_logits = make_generation_config([], tokenizer.pad_token_id, **sampling, output_logits=True,
                                                 return_dict_in_generate=True)
            out = policy.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                  generation_config=with_logits)
            responses = out.sequences[:, prompt_ids.shape[1]:]
            from_generation = core.logprobs_from_logits(torch.stack(out.logits, 1), responses)
            return (from_generation - response_logprobs(policy, out.sequences, responses)).abs().max().item()

    info = {"optimizer": optimizer_name(optimizer), "generation_logprob_gap": generation_logprob_gap()}
    return step, phases, device, info


def train_step_by_step(trainer, phases: Phases, channel: Channel, optimizer: str):
    """A transformers Trainer's train() is one loop: a callback at the end of each of its steps reports the step
    and waits for the coordinator's next command. Returns the device it trained on."""
    from transformers import TrainerCallback

    class Done(Exception):
        pass

    class Report(TrainerCallback):
        started = 0.0

        def on_step_end(self, *_, **__):
            channel.send(step_s=time.perf_counter() - self.started, phases=phases.take(), tokens=BATCH * NEW_TOKENS)
            if channel.receive() != "step":
                raise Done
            phases.take()
            self.started = time.perf_counter()

    report = Report()
    trainer.add_callback(report)
    channel.send(ready=True, device=str(trainer.accelerator.device), optimizer=optimizer)
    if channel.receive() == "step":
        report.started = time.perf_counter()
        with contextlib.suppress(Done):
            trainer.train()
    return trainer.accelerator.device


def trl_worker(args, phases_for, channel):
    """trl 1.12's PPOTrainer, driven a step at a time (train_step_by_step)."""
    import torch
    import trl
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_module

    from cppo.models import load_tokenizer, resolve_model_source

    assert trl.__version__ == TRL_VERSION, f"trl {trl.__version__} imported, not {TRL_VERSION}"
    device = torch.device(args.device)
    source = resolve_model_source(args.policy, "policy")
    tokenizer = load_tokenizer(source)
    _, prompts = benchmark_prompts(tokenizer, source, args.prompt_length, Path(args.workdir))
    policy, reference, critic, reward = load_models(source, torch.device("cpu"))  # trl places them
    dataset = Dataset.from_dict({"input_ids": prompts.ids})
    config = PPOConfig(
        output_dir=str(Path(args.workdir) / "trl-run"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, num_mini_batches=BATCH // MINI_BATCH, num_ppo_epochs=1,
        local_rollout_forward_batch_size=BATCH,
        response_length=NEW_TOKENS, temperature=1.0, stop_token=None, total_episodes=BATCH * 100000,
        num_sample_generations=0, learning_rate=LEARNING_RATE, kl_coef=0.05, vf_coef=0.1, report_to=[],
        save_strategy="no", logging_steps=10**9, disable_tqdm=True, seed=0, bf16=args.precision == "bf16",
        use_cpu=device.type == "cpu")
    trainer = PPOTrainer(args=config, processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, value_model=critic, train_dataset=dataset, eval_dataset=dataset)
    phases = phases_for(trainer.accelerator.device)
    trl_module.batch_generation = phases.wrap("generate", trl_module.batch_generation)
    trl_module.get_reward = phases.wrap("rollout_forward", trl_module.get_reward)
    forward = trl_module.forward

    def timed_forward(*a, **k):
        with phases("train_forward_backward" if torch.is_grad_enabled() else "rollout_forward"):
            return forward(*a, **k)

    trl_module.forward = timed_forward
    trainer.accelerator.backward = phases.wrap("train_forward_backward", trainer.accelerator.backward)
    trainer.optimizer.step = phases.wrap("optimizer", trainer.optimizer.step)

    return train_step_by_step(trainer, phases, channel, optimizer_name(trainer.optimizer))


def trl_grpo_worker(args, phases_for, channel):
    """TRL's GRPOTrainer, driven a step at a time (train_step_by_step). Every setting that decides the work is
    set, not left to TRL's defaults. Its optimiser is built inside train(), out of reach of the timing wrappers:
    its step counts in "rest"."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from cppo.models import load_tokenizer, resolve_model_source

    device = torch.device(args.device)
    source = resolve_model_source(args.policy, "policy")
    tokenizer = load_tokenizer(source)
    _, prompts = benchmark_prompts(tokenizer, source, args.prompt_length, Path(args.workdir))
    policy, _, _, reward = load_models(source, torch.device("cpu"))  # trl places them
    dataset = Dataset.from_dict({"prompt": [tokenizer.decode(ids) for ids in prompts.ids] * 1000})
    config = GRPOConfig(
        output_dir=str(Path(args.workdir) / "trl-grpo-run"), per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1, num_generations=args.generations,
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=0, beta=args.beta or 0.0,
        loss_type="grpo", scale_rewards="group", learning_rate=LEARNING_RATE, max_grad_norm=1e9,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, report_to=[], save_strategy="no",
        logging_steps=10**9, disable_tqdm=True, seed=0, bf16=args.precision == "bf16", fp16=False,
        gradient_checkpointing=False, use_cpu=device.type == "cpu", use_vllm=False, max_steps=100000,
        dataloader_num_workers=0, log_completions=False, mask_truncated_completions=False,
        generation_kwargs={"min_new_tokens": NEW_TOKENS})  # full-length responses, as cppo's (no stop token)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, reward_processing_classes=tokenizer)
    phases = phases_for(trainer.accelerator.device)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.generate = phases.wrap("generate", unwrapped.generate)
    logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(*a, **k):
        with phases("train_forward_backward" if torch.is_grad_enabled() else "rollout_forward"):
            return logps(*a, **k)

    trainer._get_per_token_logps_and_entropies = timed_logps
    trainer._calculate_rewards = phases.wrap("rollout_forward", trainer._calculate_rewards)
    trainer.accelerator.backward = phases.wrap("train_forward_backward", trainer.accelerator.backward)

    return train_step_by_step(trainer, phases, channel, "trl's (AdamW)")  # built inside train()


def worker(args) -> None:
    channel = Channel()
    if args.worker == "trl-grpo":
        device = trl_grpo_worker(args, Phases, channel)
    elif args.worker == "trl":
        device = trl_worker(args, Phases, channel)
    else:
        step, phases, device, info = (cppo_worker if args.worker.startswith("cppo") else floor_worker)(args, Phases)
        channel.send(ready=True, device=str(device), **info)
        while channel.receive() == "step":
            phases.take()
            start = time.perf_counter()
            tokens = step()
            elapsed = time.perf_counter() - start
            channel.send(step_s=elapsed, phases=phases.take(), tokens=tokens)
    channel.send(peak_mib=peak_memory_mib(device))


# ------------------------------------------------------------------------------------ the coordinator

class Worker:
    def __init__(self, impl: str, args, policy: str, prompt_length: int, env: dict):
        command = [sys.executable, __file__, "--worker", impl, "--policy", policy,
                   "--prompt-length", str(prompt_length), "--workdir", args.workdir, "--device", args.device,
                   "--precision", args.precision, "--generations", str(args.generations),
                   "--batch", str(args.batch), "--new-tokens", str(args.new_tokens),
                   *(["--beta", str(args.beta)] if args.beta is not None else [])]
        self.impl = impl
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                        stderr=None if args.verbose else subprocess.DEVNULL)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.answer()

    def answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark_step: the {self.impl} worker died (run with --verbose to see why)")
        return json.loads(line)

    def close(self) -> dict:
        out = self.ask("quit")
        self.process.wait(timeout=60)
        return out


def ensure_trl(trl_dir: Path) -> None:
    """trl 1.12 in a directory of its own (without its dependencies, which the project has)."""
    if (trl_dir / "trl" / "__init__.py").is_file():
        return
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(trl_dir),
                    f"trl=={TRL_VERSION}"], check=True)


def model_parameters(source: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source))
    return sum(p.numel() for p in model.parameters())


def benchmark_model(name: str, args, trl_dir: Path) -> dict:
    from cppo.builtin_models import build_tiny_gpt2
    from cppo.models import resolve_model_source

    policy, prompt_length = MODELS[name]
    if policy == "gpt2-14m":  # a random GPT-2 of 8 layers × 384
        policy = str(Path(args.workdir) / "gpt2-14m")
        if not (Path(policy) / "config.json").is_file():
            build_tiny_gpt2(policy, n_layer=8, n_embd=384, n_head=6, n_positions=256)
    source = resolve_model_source(policy, "policy")
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled"}
    workers = {}
    for impl in args.impls:
        worker_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(trl_dir), env.get("PYTHONPATH")]))} \
            if impl == "trl" else env
        workers[impl] = Worker(impl, args, policy, prompt_length, worker_env)
    ready = {impl: w.answer() for impl, w in workers.items()}  # loading runs in parallel; steps never do
    times = {impl: [] for impl in workers}
    phases = {impl: [] for impl in workers}
    for round_index in range(args.warmup + args.rounds):
        order = list(workers)[round_index % len(workers):] + list(workers)[:round_index % len(workers)]
        for impl in order:
            result = workers[impl].ask("step")
            assert result["tokens"] == BATCH * NEW_TOKENS, f"{impl} sampled {result['tokens']} tokens"
            if round_index >= args.warmup:
                times[impl].append(result["step_s"])
                phases[impl].append(result["phases"])
        print(f"  {name} round {round_index + 1}/{args.warmup + args.rounds}: "
              + "  ".join(f"{impl} {times[impl][-1] if times[impl] else float('nan'):.3f} s" for impl in workers),
              flush=True)
    peaks = {impl: w.close()["peak_mib"] for impl, w in workers.items()}
    out = {"policy": MODELS[name][0], "parameters": model_parameters(source), "prompt_length": prompt_length,
           "implementations": {}}
    update_flops = training_flops(source, prompt_length)
    for impl in workers:
        split = {p: statistics.median(s.get(p, 0.0) for s in phases[impl]) for p in PHASES}
        split["rest"] = statistics.median(t - sum(s.get(p, 0.0) for p in PHASES)
                                          for t, s in zip(times[impl], phases[impl], strict=True))
        figures = {"median_step_s": statistics.median(times[impl]), "phases_median_s": split,
                   "peak_memory_mib": peaks[impl], "optimizer": ready[impl].get("optimizer"),
                   "generation_tokens_per_s": BATCH * NEW_TOKENS / split["generate"],
                   # verl's perf/throughput: every token of the step's sequences per second (one process)
                   "throughput_tokens_per_s": BATCH * (prompt_length + NEW_TOKENS) / statistics.median(times[impl]),
                   "mfu": mfu(update_flops[impl in CRITIC_IMPLS], split["train_forward_backward"],
                              ready[impl]["device"], args.precision),
                   **{key: ready[impl][key] for key in ("generation_logprob_gap", "engine_build_s")
                      if key in ready[impl]},
                   "device": ready[impl]["device"], "step_s": times[impl], "phases_s": phases[impl]}
        for other in ("trl", "floor", "cppo", "trl-grpo"):
            if other in workers and other != impl:
                figures[f"ratio_to_{other}"] = statistics.median(
                    a / b for a, b in zip(times[impl], times[other], strict=True))
        out["implementations"][impl] = figures
    return out


CRITIC_IMPLS = ("cppo", "trl", "floor")  # the PPO workload: a critic trained beside the policy


def training_flops(source: str, prompt_length: int) -> tuple[float, float]:
    """Model FLOPs of one update on the workload's sequences (cppo.perf's model: 3 × forward FLOPs of every
    token, one epoch), without and with a critic of the policy's architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cppo import perf

    config = AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        policy = AutoModelForCausalLM.from_config(config)
    lengths = torch.full((BATCH,), float(prompt_length + NEW_TOKENS))
    policy_flops = 3 * perf.forward_flops(config, perf.matmul_parameters(policy), lengths)
    critic_matmuls = perf.matmul_parameters(policy) - policy.get_output_embeddings().weight.numel()
    return policy_flops, policy_flops + 3 * perf.forward_flops(config, critic_matmuls, lengths)


def mfu(update_flops: float, train_s: float, device: str, precision: str) -> float | None:
    """Model FLOPs utilisation of the update phase where the device's peak is known (cppo.perf.PEAK_TFLOPS)."""
    import torch

    from cppo import perf

    peak = perf.peak_flops(torch.device(device), "bf16" if precision == "bf16" else "no")
    return None if peak is None or train_s <= 0 else update_flops / train_s / peak


def markdown(result: dict) -> str:
    lines = ["| model | implementation | step (median) | vs trl 1.12 | vs floor | vs cppo (GAE) | vs TRL GRPO | "
             "generate | generated tokens/s | weight sync | rollout fwd | train fwd+bwd | optimiser | rest | "
             "peak memory | tokens/s (all) | MFU of the update |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, model in result["models"].items():
        for impl, f in model["implementations"].items():
            p = f["phases_median_s"]
            ratio = {k: f"{f[k]:.2f}×" if k in f else "" for k in ("ratio_to_trl", "ratio_to_floor", "ratio_to_cppo",
                                                                   "ratio_to_trl-grpo")}
            lines.append(f"| {name} ({model['parameters'] / 1e6:.2f} M) | {impl} | {f['median_step_s']:.3f} s | "
                         f"{ratio['ratio_to_trl']} | {ratio['ratio_to_floor']} | {ratio['ratio_to_cppo']} | "
                         f"{ratio['ratio_to_trl-grpo']} | "
                         f"{p['generate']:.3f} | {f['generation_tokens_per_s']:.0f} | {p['weight_sync']:.3f} | "
                         f"{p['rollout_forward']:.3f} | {p['train_forward_backward']:.3f} | {p['optimizer']:.3f} | "
                         f"{p['rest']:.3f} | {f['peak_memory_mib']:.0f} MiB | "
                         f"{f.get('throughput_tokens_per_s', float('nan')):.0f} | "
                         f"{'' if f.get('mfu') is None else format(f['mfu'], '.1%')} |")
    return "\n".join(lines)


def versions() -> dict:
    import accelerate
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        # A tree with uncommitted changes to the project's code is not that commit.
        changed = subprocess.run(["git", "status", "--porcelain", "--", "cppo", "scripts"], cwd=ROOT,
                                 capture_output=True, text=True, check=True).stdout.strip()
        commit += "+uncommitted" if changed else ""
    except (OSError, subprocess.CalledProcessError):
        commit = None
    vllm = None
    for distribution in ("vllm", "vllm-cpu"):  # the CUDA build and the CPU build
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            vllm = f"{distribution} {importlib.metadata.version(distribution)}"
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "vllm": vllm, "trl_peer": TRL_VERSION,
            "trl": importlib.metadata.version("trl"), "cppo_commit": commit}  # trl: trl-grpo's, the project's own


def machine(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main() -> None:
    global BATCH, MINI_BATCH, NEW_TOKENS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS),
                        default=[name for name in MODELS if not name.startswith("random-")])
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=["cppo", "trl", "floor"])
    parser.add_argument("--rounds", type=int, default=6, help="measured steps of each implementation")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each before measuring")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if there is one)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: autocast with fp32 weights, in all three")
    parser.add_argument("--workdir", default="/tmp/cppo-benchmark-step")
    parser.add_argument("--trl-dir", default=None, help=f"where trl {TRL_VERSION} is installed (default: the cache)")
    parser.add_argument("--generations", type=int, default=1,
                        help="G responses per prompt for cppo's workers (prompts per step: --batch / G)")
    parser.add_argument("--batch", type=int, default=BATCH, help="responses per step (2 mini-batches of half)")
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="tokens sampled per response")
    parser.add_argument("--beta", type=float, default=None,
                        help="GRPO as trl-grpo runs it, for cppo-grpo and trl-grpo: one update per step, the KL as a "
                             "k3 loss term of this weight (0: none)")
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--verbose", action="store_true", help="show the workers' own output")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    parser.add_argument("--policy", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch < 2 or args.batch % 2 or args.new_tokens < 1:
        parser.error(f"--batch must be even and >= 2 (got {args.batch}) and --new-tokens >= 1 (got {args.new_tokens})")
    BATCH, MINI_BATCH, NEW_TOKENS = args.batch, args.batch // 2, args.new_tokens
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.worker:
        worker(args)
        return
    if {"cppo-rloo", "cppo-grpo", "trl-grpo"} & set(args.impls) and args.generations < 2:
        parser.error(f"--generations must be >= 2 for cppo-rloo and cppo-grpo (their baseline is the prompt's "
                     f"other responses), got {args.generations}")

    from cppo.builtin_models import cache_dir

    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    trl_dir = Path(args.trl_dir) if args.trl_dir else cache_dir() / f"trl-{TRL_VERSION}"
    if "trl" in args.impls:
        ensure_trl(trl_dir)
    result = {"date": datetime.date.today().isoformat(), "machine": machine(args.device), "versions": versions(),
              "precision": args.precision, "rounds": args.rounds, "warmup": args.warmup,
              "workload": {"responses_per_step": BATCH, "generations_per_prompt": args.generations,
                           "new_tokens": NEW_TOKENS, "ppo_epochs": 1,
                           "mini_batches": 1 if args.beta is not None else BATCH // MINI_BATCH,
                           "grpo_beta": args.beta, "models": "policy, reference, critic and reward "
                           "model from one checkpoint"},
              "models": {}}
    for name in args.models:
        result["models"][name] = benchmark_model(name, args, trl_dir)
        if args.out:  # after every model: a long run keeps what it measured
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
