"""What a run shares across its tasks (`Session`) and what one training phase needs (`Stage`).

A run opens one session: the accelerator, the tracker, the tokenizer, the reward sources. Every task
of a continual run is then a stage: its prompts, its rewards, its budget, and where its models come
from (π_{t−1} for the policy and the KL reference, the previous critic). Splitting the two keeps the
trainer ignorant of task sequences: it trains one stage.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator

from .config import Config, DataConfig
from .data import PromptSet, build_prompt_set, check_data_source
from .distributed import Backend, make_accelerator, tell_deepspeed_the_device
from .engine import Engine, HFEngine
from .errors import UserError
from .models import (
    checkpoint_generation_config,
    context_length,
    is_causal_type,
    load_tokenizer,
    model_type_of,
    resolve_model_source,
    same_tokenizer,
)
from .outputs import OutputDir
from .rewards import RewardBank, import_reward_function
from .tracking import Tracker
from .vllm_engine import VLLMEngine, check_vllm_installed


def check_sources(config: Config) -> None:
    """Every path and import the run needs, checked before any model loads."""
    resolve_model_source(config.model.policy, "model.policy")
    for name in ("tokenizer", "value_model") if config.uses_critic else ("tokenizer",):
        if getattr(config.model, name) is not None:
            resolve_model_source(getattr(config.model, name), f"model.{name}")
    rewards = [(f"tasks[{i}].reward", r) for i, t in enumerate(config.tasks) for r in t.rewards]
    rewards += [("eval_reward", r) for r in config.eval_rewards or []]
    for name, reward in rewards:
        if reward.model is not None:
            resolve_model_source(reward.model, f"{name}.model")
        else:
            import_reward_function(reward.function)
    for i, task in enumerate(config.tasks):
        check_data_source(task.prompts, f"tasks[{i}].prompts")
        if task.eval_prompts is not None:
            check_data_source(task.eval_prompts, f"tasks[{i}].eval_prompts")


@dataclass
class Session:
    config: Config
    accelerator: Accelerator
    tracker: Tracker
    tokenizer: object
    initial_policy: str  # resolved source of π_0
    rewards: RewardBank
    stop_token_ids: list[int]  # a response ends at the first of these (empty: runs to max_new_tokens)
    output: OutputDir  # every write into output_dir claims it first
    backend: Backend  # DDP / DeepSpeed / FSDP: every difference between them (cppo.distributed)
    engines: dict[str, Engine] = field(default_factory=dict)  # by purpose, built on first use (`engine`)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def engine(self, purpose: str) -> Engine:
        """The engine that samples for `purpose`: `generation` (rollouts, the memory build, importance
        estimates) or `eval` (the evaluation matrix), as the config's `generation.engine` / `eval.engine` say.
        Built the first time it is asked for; the one vLLM engine of this process serves both purposes (it gets
        the policy's weights before each use)."""
        if purpose not in self.engines:
            config, acc = self.config, self.accelerator
            name = config.generation.engine if purpose == "generation" else config.eval.engine
            if name == "vllm":
                built = next((e for e in self.engines.values() if isinstance(e, VLLMEngine)), None)
                if built is None:
                    built = VLLMEngine(config, self.initial_policy, acc.device, acc.num_processes, acc.process_index,
                                       longest_sequence(config), self.backend.precision, self.stop_token_ids,
                                       self.tokenizer.pad_token_id)
                    if acc.is_main_process:
                        print(f"cppo: vLLM engine built in {built.build_s:.1f} s ({built.dtype})", file=sys.stderr,
                              flush=True)
            else:  # rollouts in chunks of generation.batch_size; evaluation in its own chunks (eval.batch_size)
                built = HFEngine(acc.device, acc.autocast,
                                 config.generation.batch_size if purpose == "generation" else None,
                                 self.stop_token_ids, self.tokenizer.pad_token_id, config.ppo.share_prompts)
            self.engines[purpose] = built
        return self.engines[purpose]

    def close(self) -> None:
        """The run is over: every process stops its engines (a vLLM engine takes the process group down with it,
        so before the trackers close it), then the trackers and the process group close."""
        self.accelerator.wait_for_everyone()
        for engine in {id(e): e for e in self.engines.values()}.values():
            engine.shutdown()
        self.engines.clear()
        self.tracker.finish()

    def fail_together(self, error: UserError | None) -> None:
        """Each process runs the user's reward code on its own share of a batch, so one may fail alone;
        the others would then wait for it in the next collective. All stop here together: the failing
        ones report their error, the rest exit quietly with the same code."""
        acc = self.accelerator
        if acc.num_processes > 1:
            failed = acc.reduce(torch.tensor([float(error is not None)], device=acc.device), reduction="max")
            if not failed.item():
                return
            if error is None:
                error = UserError("another process failed (its error is reported by that process)", quiet=True)
            else:
                error.own = True
        if error is not None:
            raise error


def reset_accelerate_state() -> None:
    """Forget the Accelerator a previous run in this process made (accelerate keeps its state in
    process-wide singletons): for several runs in one process (the demo, tests)."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def open_session(config: Config, output: OutputDir | None = None) -> Session:
    """`output`: the run's checked output directory (cppo.continual.run); library callers that pass
    none write into `config.output_dir` as it is."""
    tell_deepspeed_the_device()  # before a builtin model is built and saved
    check_sources(config)
    check_vllm_installed(config)
    accelerator = make_accelerator(config)
    config.validate(accelerator.num_processes)
    backend = Backend(accelerator)
    mcfg = config.model
    initial = resolve_model_source(mcfg.policy, "model.policy")
    tokenizer = load_tokenizer(resolve_model_source(mcfg.tokenizer, "model.tokenizer") if mcfg.tokenizer else initial,
                               mcfg.trust_remote_code)
    if config.uses_critic:
        check_critic(config, initial, tokenizer)
    check_context(config, initial)
    output = output or OutputDir(config.output_dir, resume=False, overwrite=False)
    output.is_main_process = accelerator.is_main_process
    session = Session(config=config, accelerator=accelerator, tracker=Tracker(accelerator, config, output),
                      tokenizer=tokenizer, initial_policy=initial,
                      rewards=RewardBank(tokenizer, mcfg, accelerator.device, config.ppo.share_prompts),
                      stop_token_ids=_stop_token_ids(config, tokenizer, initial), output=output, backend=backend)
    announce_backend(session)
    return session


def announce_backend(session: Session) -> None:
    """The effective back end, precision, processes and per-process batch sizes: printed at start, and
    saved with the run (backend.json beside config.yaml, and in the trackers' config)."""
    described = session.backend.describe(session.config)
    session.tracker.backend = described
    if session.accelerator.is_main_process:
        print("cppo: " + ", ".join(f"{k} {v}" for k, v in described.items()), file=sys.stderr, flush=True)


def longest_sequence(config: Config) -> int:
    """The longest prompt of any task plus the longest response (rollout or evaluation)."""
    new_tokens = max(config.generation.max_new_tokens, config.eval.max_new_tokens or 0)
    prompts = [d.max_prompt_length for t in config.tasks for d in (t.prompts, t.eval_prompts) if d is not None]
    return max(prompts) + new_tokens


def check_context(config: Config, policy_source: str) -> None:
    """The longest sequence a task can make (its longest prompt plus the response) fits the policy's
    context; else one line before any weights load (a model fed positions past its context fails deep
    inside its forward, or silently degrades)."""
    limit = context_length(policy_source, config.model.trust_remote_code)
    if limit is None:
        return
    gen, ecfg = config.generation.max_new_tokens, config.eval.max_new_tokens or config.generation.max_new_tokens
    for index, task in enumerate(config.tasks):
        for kind, data, new_tokens, new_field in (("prompts", task.prompts, gen, "generation.max_new_tokens"),
                                                  ("eval_prompts", task.eval_prompts, ecfg, "eval.max_new_tokens")):
            if data is not None and data.max_prompt_length + new_tokens > limit:
                raise UserError(f"tasks[{index}].{kind}.max_prompt_length + {new_field} = {data.max_prompt_length} "
                                f"+ {new_tokens} exceeds the {limit}-token context of model.policy "
                                f"{config.model.policy!r}; lower one of them")


def critic_source(config: Config) -> tuple[str, str]:
    """(config field, model source) of the critic of the first task."""
    mcfg = config.model
    if mcfg.value_model is not None:
        return "model.value_model", mcfg.value_model
    if mcfg.value_init == "reward_model":
        return "model.value_init", config.tasks[0].rewards[0].model
    return "model.policy", mcfg.policy


def check_critic(config: Config, policy_source: str, tokenizer) -> None:
    """The critic reads the policy's token ids left to right, at every response position: it must be a
    causal decoder with the policy's tokenizer (re-tokenising cannot give a value per policy token)."""
    field, source = critic_source(config)
    resolved = resolve_model_source(source, field)
    if resolved == policy_source:
        return
    model_type = model_type_of(resolved, config.model.trust_remote_code)
    if not is_causal_type(model_type):
        raise UserError(f"{field}: the critic {source!r} is a {model_type} model, not a causal decoder (the critic "
                        "values each response token from the tokens before it); use value_init: policy or a "
                        "causal critic")
    if not same_tokenizer(load_tokenizer(resolved, config.model.trust_remote_code), tokenizer):
        raise UserError(f"{field}: the critic {source!r} has another tokenizer than the policy (the critic reads "
                        "the policy's token ids); use value_init: policy or a critic with the policy's tokenizer")


def _stop_token_ids(config: Config, tokenizer, policy_source: str) -> list[int]:
    """`eos`: every end-of-sequence id the checkpoint declares, the tokenizer's EOS and the ids of its
    generation_config.json (chat models end a turn with a token the tokenizer may not call EOS: Llama 3
    lists <|eot_id|> and <|end_of_text|>, Qwen2.5 <|im_end|> and <|endoftext|>)."""
    stop = config.generation.stop_token
    if stop is None:
        return []
    if stop == "eos":
        declared = getattr(checkpoint_generation_config(policy_source), "eos_token_id", None)
        declared = declared if isinstance(declared, list) else [declared]
        ids = [i for i in [tokenizer.eos_token_id, *declared] if i is not None]
        if not ids:
            raise UserError("generation.stop_token is 'eos' but neither the tokenizer nor the model declares one")
        return list(dict.fromkeys(ids))
    token_id = tokenizer.convert_tokens_to_ids(stop)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UserError(f"generation.stop_token must be 'eos', null or a single token, got {stop!r}")
    return [token_id]


@dataclass
class Stage:
    """One training phase: one task of the sequence, or the union of all tasks (`schedule: joint`)."""

    name: str
    prompts: PromptSet
    reward_configs: list  # each task's reward sources (RewardConfig list) by task index (PromptSet.task)
    steps: int
    policy: str  # where the policy starts: π_{t−1}
    value_model: str | None  # where the critic starts (None: critic-free, docs/algorithm.md §9)
    reference: str  # reference of the reward's KL penalty
    anchor: str | None  # π_{t−1} for KR / LwF when it is not the reference (then a second frozen model)
    output_dir: Path
    step_offset: int = 0  # global steps done before this stage


def task_prompts(session: Session, index: int) -> PromptSet:
    task = session.config.tasks[index]
    prompts = build_prompt_set(task.prompts, session.tokenizer, index, f"tasks[{index}].prompts")
    announce_long_prompts(session, prompts, task.prompts, f"tasks[{index}].prompts")
    return prompts


def announce_long_prompts(session: Session, prompts: PromptSet, data: DataConfig, field_name: str) -> None:
    """How many prompts of a set `max_prompt_length` changed (truncated or dropped), printed once at start."""
    changed = {k: n for k, n in prompts.counts.items() if n}
    if not changed or not session.accelerator.is_main_process:
        return
    total = len(prompts) + prompts.counts.get("dropped", 0)
    what = ", ".join(f"{n} {kind}" for kind, n in changed.items())
    print(f"cppo: {field_name}: {what} of {total} prompts longer than max_prompt_length {data.max_prompt_length} "
          f"tokens (long_prompts: {data.long_prompts})", file=sys.stderr, flush=True)


def first_stage(session: Session, output_dir: Path | None = None, prompts: PromptSet | None = None) -> Stage:
    """The stage of the first task, starting from the configured models: a single-task run."""
    config = session.config
    field, value = critic_source(config)
    critic = resolve_model_source(value, field) if config.uses_critic else None
    return Stage(name=config.tasks[0].name, prompts=prompts or task_prompts(session, 0),
                 reward_configs=[t.rewards for t in config.tasks], steps=config.tasks[0].budget(config.ppo),
                 policy=session.initial_policy, value_model=critic,
                 reference=session.initial_policy, anchor=None,
                 output_dir=output_dir or Path(config.output_dir))
