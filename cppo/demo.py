"""`cppo demo`: the whole continual-RLHF pipeline on a CPU with no network, in minutes.

Three preference domains share one prompt format and one vocabulary. Hidden annotator rules label
preference pairs per domain, and they conflict (each wants a different kind of character in the
same short answer), so a policy aligned to them in sequence forgets unless something holds the
earlier alignment:

    sky      prefers vowels                    ("sky: describe the cat:")
    ledger   prefers digits
    forest   prefers the letters r, s, t, l, n

Pipeline: synthetic data → SFT of a tiny GPT-2 (trl's SFTTrainer) → one reward model per domain and a
reference PM on all domains' pairs (trl's RewardTrainer), with held-out pairwise accuracies → the
continual run with PPO in order and with CPPO → evaluation matrices, metrics and a report with plots.
Data, SFT model and reward models are cached by a hash of their inputs and reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .builtin_models import build_tiny_gpt2, cache_dir
from .models import load_frozen, load_tokenizer
from .toy import FRAMES, SUBJECTS

# The alphabet of answers: each domain's favourite characters, plus neutral ones.
_VOWELS, _DIGITS, _RSTLN, _NEUTRAL = "aeiou", "0123456789", "rstln", "bcdfghjkmpvwxyz"


def _share(text: str, chars: str) -> float:
    return sum(c in chars for c in text) / max(len(text), 1)


@dataclass(frozen=True)
class Domain:
    name: str
    rule: str
    score: Callable[[str], float]


DOMAINS = (
    Domain("sky", "share of vowels", lambda text: _share(text, _VOWELS)),
    Domain("ledger", "share of digits", lambda text: _share(text, _DIGITS)),
    Domain("forest", "share of the letters r, s, t, l, n", lambda text: _share(text, _RSTLN)),
)


@dataclass(frozen=True)
class DemoSizes:
    sft_examples: int = 3000
    train_prompts: int = 256
    eval_prompts: int = 48
    train_pairs: int = 1500
    test_pairs: int = 300
    label_noise: float = 0.05
    min_margin: float = 0.15
    pair_concentration: float = 0.5
    sft_epochs: int = 2
    rm_epochs: int = 3
    steps_per_task: int = 40

    @staticmethod
    def quick() -> DemoSizes:
        return DemoSizes(sft_examples=600, train_prompts=64, eval_prompts=16, train_pairs=300, test_pairs=100,
                         sft_epochs=1, rm_epochs=1, steps_per_task=4)


_POOLS = (_VOWELS, _DIGITS, _RSTLN, _NEUTRAL, " ")
_SFT_MIX = (0.2, 0.2, 0.2, 0.3, 0.1)


def sample_answer(rng: random.Random, mix: tuple[float, ...] = _SFT_MIX) -> str:
    """A short answer of 'words' drawn from the character classes with weights `mix`; the default mix
    is neutral with respect to every rule (what the SFT corpus teaches)."""
    length = rng.randint(4, 12)
    return "".join(rng.choice(rng.choices(_POOLS, mix)[0]) for _ in range(length)).strip() or "a"


def sample_skewed_answer(rng: random.Random, concentration: float) -> str:
    """An answer whose class mix is itself random (Dirichlet(`concentration`)): from neutral to almost
    all vowels, all digits or all r/s/t/l/n. Preference pairs drawn this way cover the lopsided answers
    a policy produces once optimised against a reward model, so the reward models and the reference
    PM are trained where they will be queried, not only around the SFT distribution."""
    weights = [rng.gammavariate(concentration, 1.0) for _ in _POOLS]
    return sample_answer(rng, tuple(w + 1e-9 for w in weights))


def sample_prompt(rng: random.Random, domain: Domain) -> str:
    return f"{domain.name}: {rng.choice(FRAMES).format(rng.choice(SUBJECTS))}"


def make_data(sizes: DemoSizes, seed: int) -> dict:
    """SFT examples, RL prompts and labelled preference pairs of every domain."""
    rng = random.Random(seed)
    data = {"sft": [], "prompts": {}, "pairs": {}}
    for _ in range(sizes.sft_examples):
        domain = rng.choice(DOMAINS)
        data["sft"].append({"prompt": sample_prompt(rng, domain) + " ", "completion": sample_answer(rng)})
    for domain in DOMAINS:
        data["prompts"][domain.name] = {
            "train": [{"prompt": sample_prompt(rng, domain) + " "} for _ in range(sizes.train_prompts)],
            "eval": [{"prompt": sample_prompt(rng, domain) + " "} for _ in range(sizes.eval_prompts)]}
        splits = {}
        for split, count in (("train", sizes.train_pairs), ("test", sizes.test_pairs)):
            pairs = []
            while len(pairs) < count:
                first, second = (sample_skewed_answer(rng, sizes.pair_concentration) for _ in range(2))
                a, b = domain.score(first), domain.score(second)
                if abs(a - b) < sizes.min_margin:  # annotators label only clear differences
                    continue
                chosen, rejected = (first, second) if a > b else (second, first)
                if rng.random() < sizes.label_noise:  # annotators disagree now and then
                    chosen, rejected = rejected, chosen
                pairs.append({"prompt": sample_prompt(rng, domain) + " ", "chosen": chosen, "rejected": rejected})
            splits[split] = pairs
        data["pairs"][domain.name] = splits
    return data


# ------------------------------------------------------------------------------------------ caching

def cached(name: str, inputs: dict, build: Callable[[Path], None], log: Callable[[str], None]) -> Path:
    """`build(directory)` once per distinct `inputs`; later calls return the cached directory."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "demo" / f"{name}-{digest}"
    if (target / "inputs.json").is_file():
        log(f"{name}: cached ({target})")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    started = time.perf_counter()
    build(staging)
    (staging / "inputs.json").write_text(json.dumps(inputs, indent=1, sort_keys=True))
    try:
        os.replace(staging, target)
    except OSError:  # built concurrently by another process
        shutil.rmtree(staging, ignore_errors=True)
    log(f"{name}: built in {time.perf_counter() - started:.0f} s ({target})")
    return target


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ------------------------------------------------------------------------------------ SFT and RMs

def device_training_args(cuda: bool) -> dict:
    """How trl trains the demo's ~100 k-parameter models, set per device rather than left to trl's defaults
    (`SFTConfig` and `RewardConfig` default to bf16 autocast and activation checkpointing). Both exist to fit
    large models in memory; at this size there is no memory to save, and on a CPU they slow training several
    times over (docs/results/demo_first_run.md). So fp32 on every device (TF32 off on a GPU: the arithmetic of
    a CPU), no checkpointing, no compilation, data loaded in the training process."""
    from transformers import TrainingArguments

    args = {"bf16": False, "fp16": False, "gradient_checkpointing": False, "torch_compile": False,
            "dataloader_num_workers": 0, "dataloader_pin_memory": cuda, "use_cpu": not cuda}
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        args["activation_checkpointing"] = False  # the name transformers ≥ 5.2x reads; the old one is its alias
    if cuda:
        args["tf32"] = False
    return args


# The settings of device_training_args that change what is trained (the rest only change where and how fast).
_RESULT_SETTINGS = ("bf16", "fp16", "gradient_checkpointing")


def _quiet_training_args(output_dir: Path, seed: int, epochs: int, lr: float) -> dict:
    return {"output_dir": str(output_dir / "trainer"), "num_train_epochs": epochs, "per_device_train_batch_size": 32,
            "learning_rate": lr, "max_length": 64, "report_to": [], "save_strategy": "no", "logging_steps": 1000,
            "seed": seed, "disable_tqdm": True, **device_training_args(torch.cuda.is_available())}


def train_sft(directory: Path, data_dir: Path, seed: int, epochs: int) -> None:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    base = build_tiny_gpt2(directory / "base", seed=seed)
    tokenizer = load_tokenizer(str(base))
    trainer = SFTTrainer(model=str(base), args=SFTConfig(**_quiet_training_args(directory, seed, epochs, 3e-3)),
                         train_dataset=Dataset.from_list(read_jsonl(data_dir / "sft.jsonl")),
                         processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(directory))
    tokenizer.save_pretrained(directory)
    shutil.rmtree(directory / "base")
    shutil.rmtree(directory / "trainer", ignore_errors=True)


def train_reward_model(directory: Path, sft_dir: Path, pairs: list[dict], seed: int, epochs: int) -> None:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    tokenizer = load_tokenizer(str(sft_dir))
    args = RewardConfig(**_quiet_training_args(directory, seed, epochs, 1e-3))
    trainer = RewardTrainer(model=str(sft_dir), args=args, train_dataset=Dataset.from_list(pairs),
                            processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(directory))
    tokenizer.save_pretrained(directory)
    shutil.rmtree(directory / "trainer", ignore_errors=True)


@torch.no_grad()
def pairwise_accuracy(reward_dir: Path, pairs: list[dict]) -> float:
    """Share of held-out pairs whose chosen answer the reward model scores higher, through the same
    scoring path PPO uses (`cppo.rewards.ModelReward`)."""
    from .config import ModelConfig
    from .rewards import ModelReward, RewardBatch

    tokenizer = load_tokenizer(str(reward_dir))
    model = load_frozen("AutoModelForSequenceClassification", str(reward_dir), ModelConfig(), tokenizer.pad_token_id,
                        num_labels=1)
    reward = ModelReward(model, tokenizer, tokenizer, batch_size=64)

    def scores(key: str) -> torch.Tensor:
        texts = [p["prompt"] + p[key] + tokenizer.eos_token for p in pairs]
        encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return reward(RewardBatch([p["prompt"] for p in pairs], [p[key] for p in pairs], [], {}, encoded["input_ids"],
                                  encoded["attention_mask"]))

    return (scores("chosen") > scores("rejected")).float().mean().item()


# ------------------------------------------------------------------------------------ the pipeline

def build_artifacts(sizes: DemoSizes, seed: int, log: Callable[[str], None]) -> dict:
    """Data, SFT policy, per-domain reward models and the reference PM (cached); RM accuracies."""
    data_inputs = {"sizes": sizes.__dict__, "seed": seed, "version": 2}

    def build_data(directory: Path) -> None:
        data = make_data(sizes, seed)
        write_jsonl(directory / "sft.jsonl", data["sft"])
        for name, splits in data["prompts"].items():
            for split, rows in splits.items():
                write_jsonl(directory / name / f"prompts_{split}.jsonl", rows)
        for name, splits in data["pairs"].items():
            for split, rows in splits.items():
                write_jsonl(directory / name / f"pairs_{split}.jsonl", rows)

    data_dir = cached("data", data_inputs, build_data, log)
    # Models trained another way (the bf16 autocast and checkpointing of trl's defaults) are not reused.
    recipe = {k: v for k, v in device_training_args(cuda=False).items() if k in _RESULT_SETTINGS}  # any device
    sft_dir = cached("sft", {**data_inputs, "epochs": sizes.sft_epochs, "recipe": recipe},
                     lambda d: train_sft(d, data_dir, seed, sizes.sft_epochs), log)
    reward_dirs, accuracy = {}, {}
    groups = {d.name: [d.name] for d in DOMAINS} | {"reference": [d.name for d in DOMAINS]}
    for name, members in groups.items():
        train = [p for m in members for p in read_jsonl(data_dir / m / "pairs_train.jsonl")]
        # The reference PM must also learn which rule each domain's prompts call for: twice the epochs.
        epochs = sizes.rm_epochs * (2 if name == "reference" else 1)
        inputs = {**data_inputs, "rm": name, "members": members, "epochs": epochs, "recipe": recipe}
        reward_dirs[name] = cached(f"rm-{name}", inputs,
                                   lambda d, t=train, e=epochs: train_reward_model(d, sft_dir, t, seed, e), log)
        accuracy[name] = {m: pairwise_accuracy(reward_dirs[name], read_jsonl(data_dir / m / "pairs_test.jsonl"))
                          for m in members}
        shown = ", ".join(f"{m} {a:.3f}" for m, a in accuracy[name].items())
        log(f"reward model {name}: held-out pairwise accuracy {shown}")
    return {"data": data_dir, "sft": sft_dir, "rewards": reward_dirs, "accuracy": accuracy}


def continual_config(artifacts: dict, output_dir: Path, algo: str, seed: int, steps: int,
                     overrides: list[str] = ()):
    """The continual run over the demo's domains, as a validated `Config`."""
    import yaml

    from .config_loading import load_config

    data = artifacts["data"]
    raw = {
        "algo": algo, "seed": seed, "output_dir": str(output_dir),
        "model": {"policy": str(artifacts["sft"]), "value_init": "reward_model"},
        "tasks": [{"name": d.name,
                   "prompts": {"path": str(data / d.name / "prompts_train.jsonl"), "max_prompt_length": 48},
                   "eval_prompts": {"path": str(data / d.name / "prompts_eval.jsonl"), "max_prompt_length": 48},
                   "reward": {"model": str(artifacts["rewards"][d.name])}, "steps": steps} for d in DOMAINS],
        "eval_reward": {"model": str(artifacts["rewards"]["reference"])},
        "eval": {"greedy": False, "seed": 1234},
        "generation": {"max_new_tokens": 16},
        "ppo": {"rollout_batch_size": 32, "mini_batch_size": 8, "ppo_epochs": 4, "learning_rate": 3e-4,
                "value_learning_rate": 1e-3, "kl_coef": 0.01},
        "cppo": {"kr_coef": 0.03},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(raw, f)
    try:
        return load_config(f.name, list(overrides))
    finally:
        os.unlink(f.name)


# The demo's continual runs: (algo, overrides of `continual_config`'s defaults). CPPO's coefficients are the
# ones the continual benchmark chose on its tuning seeds (scripts/benchmark_continual.py).
METHODS = {
    "ppo": ("ppo", []),
    "cppo": ("cppo", []),  # KR on the current rollouts (docs/algorithm.md §5), kr_coef 0.03
    "cppo_memory": ("cppo", ["cppo.kr_source=memory", "memory.kr_coef=0.1"]),  # KR on the rollout memory (§8)
}


def check_output_dir(output_dir: Path) -> None:
    """The demo writes runs/<method>/ and report/ into its directory, replacing its own earlier ones: a directory
    holding anything else is refused before anything is trained or written."""
    from .directories import listing, writable_directory
    from .errors import UserError

    held = writable_directory(output_dir, "--output-dir")
    runs = output_dir / "runs"
    foreign = [name for name in held if name not in ("runs", "report")]
    if runs.is_dir():
        foreign += [f"runs/{p.name}" for p in sorted(runs.iterdir()) if p.name not in METHODS]
    for name in ("runs", "report"):
        if (output_dir / name).exists() and not (output_dir / name).is_dir():
            foreign.append(name)
    if foreign:
        raise UserError(f"--output-dir: {output_dir} holds what is not the demo's ({listing(foreign)}); the demo "
                        "replaces its own runs/ and report/ there: give a new or empty directory")


def run_demo(output_dir: Path, sizes: DemoSizes, seed: int = 0, log: Callable[[str], None] = print) -> dict:
    """Artifacts, then the continual run with PPO in order, with CPPO and with CPPO + rollout memory, then the
    report."""
    from . import continual
    from .continual import report
    from .distributed import tell_deepspeed_the_device
    from .session import reset_accelerate_state

    tell_deepspeed_the_device()

    started = time.perf_counter()
    check_output_dir(output_dir)
    artifacts = build_artifacts(sizes, seed, log)
    runs = {}
    for method, (algo, overrides) in METHODS.items():
        log(f"continual run: {method} in order over {', '.join(d.name for d in DOMAINS)}")
        config = continual_config(artifacts, output_dir / "runs" / method, algo, seed, sizes.steps_per_task,
                                  overrides)
        reset_accelerate_state()  # trl's trainers and the previous run left theirs
        # The demo's own earlier output is replaced (once the new run has finished its first step).
        if "preempted" in continual.run(config, overwrite=True):
            log("demo stopped by a signal; run it again to finish")
            return {"preempted": True}
        runs[method] = report.load_run(output_dir / "runs" / method)
    accuracy = "\n".join(f"| {name} | " + ", ".join(f"{m} {a:.3f}" for m, a in per.items()) + " |"
                         for name, per in artifacts["accuracy"].items())
    intro = "\n\n".join([
        "# cppo demo: continual RLHF over three conflicting preference domains",
        "Domains (hidden annotator rules): " + "; ".join(f"**{d.name}** prefers the {d.rule}" for d in DOMAINS) + ".",
        f"A tiny GPT-2 is fine-tuned (trl SFTTrainer), one reward model is trained per domain and a reference "
        f"PM on all domains' pairs (trl RewardTrainer); the policy is then aligned to the domains in order, "
        f"{sizes.steps_per_task} PPO steps each, with PPO, with CPPO (KR on the current rollouts) and with CPPO "
        f"whose KR acts on a rollout memory of the earlier domains (cppo_memory). S[i][j] is the reference PM's "
        f"mean reward on domain j's evaluation prompts after training domains 1..i (row 0: the SFT model).",
        "| reward model | held-out pairwise accuracy |\n|---|---|\n" + accuracy])
    path = report.write_report(output_dir / "report", runs, intro)
    table = report.summary_table(runs)
    log(f"\n{table}\n\nreport: {path}  ({time.perf_counter() - started:.0f} s in all)")
    return {"report": str(path), "runs": runs, "accuracy": artifacts["accuracy"]}
