"""Run configuration: typed dataclasses, one per concern, loaded from YAML with `key=value` overrides.

Every field has a docstring (the string right under it) and is validated before any model loads; a
bad value stops the run with one line naming the field, the value and what is allowed.

Batch sizes are **global** (summed over all processes), so a config means the same training whatever
the number of processes it is launched on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import UserError


@dataclass
class ModelConfig:
    policy: str = "builtin:tiny-gpt2"
    """Policy to start from: a local HF model directory, a hub name, or a builtin built offline:
    `builtin:tiny-gpt2` (0.1 M parameters) or `builtin:smollm2-135m` (SmolLM2-135M-Instruct)."""
    tokenizer: str | None = None
    """Tokenizer source; defaults to `policy`."""
    value_init: Literal["policy", "reward_model"] = "policy"
    """Backbone of the critic: a copy of the policy, or of `reward.model` (its score head included). The critic
    exists with `ppo.advantage: gae` only; the critic-free estimators ignore the critic's fields."""
    value_model: str | None = None
    """Explicit critic to start from (a sequence-classification dir); overrides `value_init`."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights' dtype when loading (use `mixed_precision` for autocast on top of float32 weights)."""
    trust_remote_code: bool = False
    """Allow model code from the hub (passed to `from_pretrained`)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass of policy and critic: less memory, more time."""
    lora_r: int = 0
    """LoRA rank for the policy; 0 trains all weights. With LoRA the reference is the base with adapters off."""
    value_lora_r: int = 0
    """LoRA rank for the critic's backbone (its scalar head trains whole); 0 trains all of the critic's weights.
    A 7-8B critic then needs no gradients or AdamW state for its backbone. Same alpha and target modules."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA path: must be 0. Every dropout in every model is off, because PPO's ratio
    compares the update's log-probs with the rollout's for the same weights (dropout would make them differ)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get adapters (peft names; `all-linear` for every linear layer but the output head)."""

    def validate(self) -> None:
        _check(self.lora_r >= 0, "model.lora_r", self.lora_r, ">= 0")
        _check(self.value_lora_r >= 0, "model.value_lora_r", self.value_lora_r, ">= 0")
        _check(self.lora_alpha > 0, "model.lora_alpha", self.lora_alpha, "> 0")
        _check(self.lora_dropout == 0, "model.lora_dropout", self.lora_dropout,
               "0 (dropout would make the update's log-probs differ from the rollout's for the same weights)")


def in_memory(rows: Any) -> bool:
    """Rows given through the Python API: a `datasets.Dataset` or a list of dicts."""
    if isinstance(rows, list):
        return all(isinstance(r, dict) for r in rows)
    return hasattr(rows, "column_names") and hasattr(rows, "select")


# Statistics logged under reward/ that a reward source's name would collide with.
RESERVED_REWARD_NAMES = ("mean", "std", "score_mean", "shaped_mean")


@dataclass
class RewardConfig:
    model: str | None = None
    """Sequence-classification reward model (local dir or hub name); its first logit is the score."""
    function: str | None = None
    """Python reward `module:function` or `path/to/file.py:function`: called with the prompts and completions and,
    by keyword, `completion_ids` and the prompts' dataset columns it names (docs/guides/data-and-rewards.md);
    an `async def` function is called on `rows_per_call` rows at a time, concurrently."""
    name: str | None = None
    """The source's name in the logs (`reward/<name>`) and errors; null: the function's name or the model's
    directory name. Unique within a task."""
    weight: float = 1.0
    """Weight of this source in the task's reward, the weighted sum of its sources' processed scores."""
    normalize: Literal["none", "batch", "running", "group"] = "none"
    """Standardise raw scores over the global rollout batch, with running moments over all steps, or within each
    prompt's group of `generation.num_generations` responses (GDPO: each source before the sum)."""
    clip: float | None = None
    """Clamp scores to [-clip, clip] after normalisation and the EOS penalty."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that ends without the stop token."""
    batch_size: int = 32
    """Sequences per forward pass of the reward model."""
    rows_per_call: int = 1
    """An `async def` reward function: rows (prompt and completion) each call scores."""
    max_concurrency: int = 16
    """An `async def` reward function: calls in flight at once, per process."""
    timeout: float | None = None
    """An `async def` reward function: seconds one call may take before the run stops with one line naming it
    (null: no limit). A plain function runs to its end."""

    @property
    def label(self) -> str:
        """`name`, else the function's name or the model's last path part."""
        if self.name is not None:
            return self.name
        source = self.function.rpartition(":")[2] if self.function is not None else str(self.model)
        return source.rstrip("/").rpartition("/")[2] or source

    def validate(self, name: str = "reward") -> None:
        if (self.model is None) == (self.function is None):
            raise UserError(
                f"{name}: set exactly one of {name}.model (a reward-model dir or hub name) or {name}.function "
                f"(module:function), got model={self.model!r}, function={self.function!r}"
            )
        if self.function is not None:
            _check(":" in self.function, f"{name}.function", self.function, "of the form module:function")
        _check(self.name is None or (bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name)),
               f"{name}.name", self.name, "a non-empty name of letters, digits, '-', '_' or '.', or null")
        _check(self.label not in RESERVED_REWARD_NAMES, f"{name}.name", self.label,
               f"not one of {', '.join(RESERVED_REWARD_NAMES)} (statistics logged under reward/)")
        _check(self.clip is None or self.clip > 0, f"{name}.clip", self.clip, "> 0 or null")
        _check(self.missing_eos_penalty is None or self.missing_eos_penalty >= 0,
               f"{name}.missing_eos_penalty", self.missing_eos_penalty, ">= 0 or null")
        _check(self.batch_size > 0, f"{name}.batch_size", self.batch_size, "> 0")
        _check(self.rows_per_call > 0, f"{name}.rows_per_call", self.rows_per_call, "> 0")
        _check(self.max_concurrency > 0, f"{name}.max_concurrency", self.max_concurrency, "> 0")
        _check(self.timeout is None or self.timeout > 0, f"{name}.timeout", self.timeout, "> 0 or null")


def reward_sources(reward: RewardConfig | list[RewardConfig], name: str) -> list[RewardConfig]:
    """A reward field (one source or a list of them) as a checked list of sources."""
    sources = reward if isinstance(reward, list) else [reward]
    _check(len(sources) > 0, name, sources, "a reward source or a non-empty list of them")
    labels = set()
    for index, source in enumerate(sources):
        where = f"{name}[{index}]" if isinstance(reward, list) else name
        source.validate(where)
        _check(source.label not in labels, f"{where}.name", source.label, "unique among the task's reward sources")
        labels.add(source.label)
    return sources


# The keyword arguments every reward function may take besides the dataset's columns (which do not override them).
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids")


@dataclass
class DataConfig:
    path: Any = "builtin:toy-prompts"
    """Prompts: a local .jsonl/.json/.csv/.parquet file, a directory written by `Dataset.save_to_disk`, a hub
    dataset name (or a `datasets` builder such as `json` with `data_files`), or `builtin:toy-prompts`. Through the
    Python API also the rows themselves: a `datasets.Dataset` or a list of dicts (config.yaml then records their
    number and content hash)."""
    name: str | None = None
    """Hub datasets: the subset (configuration) to read, e.g. `main` of `openai/gsm8k`."""
    revision: str | None = None
    """Hub datasets: the branch, tag or commit to read."""
    data_files: str | list[str] | None = None
    """Hub datasets and builders: the files to read (`datasets.load_dataset`'s `data_files`)."""
    split: str = "train"
    """Split to read, or a split expression (`train[:500]`, `train[10%:]+test`): of a hub dataset, of a
    save_to_disk directory, or of a local file (whose one split is `train`)."""
    prompt_field: str = "prompt"
    """Column holding the prompt: a string, or a list of chat messages ({role, content})."""
    reference_field: str | None = None
    """Column holding a reference response (evaluation sets: ROUGE-L against it)."""
    columns: dict[str, str] = field(default_factory=dict)
    """More keyword arguments for the reward functions: keyword → column (`{answer: solution}`). Every column
    reaches them under its own name anyway."""
    filter_field: str | None = None
    """Keep only rows whose `filter_field` equals `filter_value` (compared as text)."""
    filter_value: str | None = None
    """Value that `filter_field` must have."""
    max_samples: int | None = None
    """Use at most this many rows (the first ones, after filtering)."""
    max_prompt_length: int = 64
    """Longest prompt in tokens; longer ones are handled by `long_prompts`."""
    long_prompts: Literal["truncate", "drop"] = "truncate"
    """Keep the last `max_prompt_length` tokens of a long prompt, or drop it (counted in the log)."""
    chat_template: Literal["auto", "always", "never"] = "auto"
    """Apply the tokenizer's chat template: to conversational prompts (auto), to every prompt as a user
    turn (always), or never (conversational prompts are then an error)."""

    def validate(self, name: str = "data") -> None:
        _check(self.max_prompt_length > 0, f"{name}.max_prompt_length", self.max_prompt_length, "> 0")
        _check(bool(self.prompt_field), f"{name}.prompt_field", self.prompt_field, "a column name")
        _check(isinstance(self.path, str) and bool(self.path) or in_memory(self.path), f"{name}.path",
               self.path if isinstance(self.path, str) else type(self.path).__name__,
               "a file, a save_to_disk directory, a hub dataset, builtin:toy-prompts, or (Python API) a "
               "datasets.Dataset or a list of dicts")
        for keyword, column in self.columns.items():
            _check(keyword.isidentifier() and keyword not in REWARD_ARGUMENTS, f"{name}.columns", keyword,
                   f"keyed by Python names other than {', '.join(REWARD_ARGUMENTS)}")
            _check(bool(column), f"{name}.columns.{keyword}", column, "a column name")
        _check((self.filter_field is None) == (self.filter_value is None), f"{name}.filter_value",
               self.filter_value, "set together with filter_field")
        _check(self.max_samples is None or self.max_samples > 0, f"{name}.max_samples", self.max_samples,
               "> 0 or null")


@dataclass
class TaskConfig:
    name: str = "toy"
    """Unique task name (used in output paths and the evaluation matrix)."""
    prompts: DataConfig = field(default_factory=DataConfig)
    """Training prompts of the task."""
    eval_prompts: DataConfig | None = None
    """Evaluation prompts (optionally with `reference_field`); null leaves the task out of the matrix."""
    reward: RewardConfig | list[RewardConfig] = field(
        default_factory=lambda: RewardConfig(function="cppo.toy:vowel_fraction"))
    """The task's reward: a reward model trained on its preferences, or a callable; or a list of such sources,
    whose weighted sum is the reward (each logged as `reward/<name>`)."""
    steps: int | None = None
    """Budget in PPO steps; null uses `ppo.steps` (unless `episodes` is set)."""
    episodes: int | None = None
    """Budget in rollouts instead of steps: ceil(episodes / ppo.rollout_batch_size) steps."""

    def validate(self, index: int) -> None:
        name = f"tasks[{index}]"
        _check(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), f"{name}.name",
               self.name, "a non-empty name of letters, digits, '-', '_' or '.'")
        self.prompts.validate(f"{name}.prompts")
        if self.eval_prompts is not None:
            self.eval_prompts.validate(f"{name}.eval_prompts")
        reward_sources(self.reward, f"{name}.reward")
        _check(self.steps is None or self.steps > 0, f"{name}.steps", self.steps, "> 0 or null")
        _check(self.episodes is None or self.episodes > 0, f"{name}.episodes", self.episodes, "> 0 or null")
        _check(self.steps is None or self.episodes is None, f"{name}.episodes", self.episodes,
               "null when steps is set (one budget per task)")

    @property
    def rewards(self) -> list[RewardConfig]:
        """The task's reward sources."""
        return self.reward if isinstance(self.reward, list) else [self.reward]

    def budget(self, ppo: PPOConfig) -> int:
        """PPO steps this task trains for."""
        if self.episodes is not None:
            return -(-self.episodes // ppo.rollout_batch_size)
        return self.steps if self.steps is not None else ppo.steps


@dataclass
class EvalConfig:
    greedy: bool = True
    """Greedy decoding for evaluation; false samples at `temperature` with the fixed `seed`."""
    temperature: float = 1.0
    """Sampling temperature when not greedy."""
    max_new_tokens: int | None = None
    """Longest evaluated response; null uses `generation.max_new_tokens`."""
    batch_size: int = 64
    """Prompts per `generate` call on each process."""
    max_prompts: int | None = None
    """Evaluate at most this many prompts per task (the first ones)."""
    seed: int = 1234
    """Seed of sampled evaluation (the same prompts get the same samples for every row of the matrix)."""
    checkpoint_generation_config: bool = False
    """Decode with the initial checkpoint's own generation_config.json (its sampling, temperature, top-p,
    repetition penalty, ...), keeping `max_new_tokens` and the stop token; `greedy` and `temperature`
    are then unused. Off: evaluation decodes exactly as configured here, nothing from the checkpoint."""
    engine: Literal["hf", "vllm"] = "hf"
    """What decodes the evaluation prompts: transformers' `generate`, or the run's vLLM engine (the `vllm`
    section). Greedy decoding gives the same answers with both, up to ties and float rounding."""

    def validate(self) -> None:
        _check(self.temperature > 0, "eval.temperature", self.temperature, "> 0")
        _check(self.max_new_tokens is None or self.max_new_tokens > 0, "eval.max_new_tokens", self.max_new_tokens,
               "> 0 or null")
        _check(self.batch_size > 0, "eval.batch_size", self.batch_size, "> 0")
        _check(self.max_prompts is None or self.max_prompts > 0, "eval.max_prompts", self.max_prompts,
               "> 0 or null")


@dataclass
class ContinualConfig:
    schedule: Literal["sequential", "joint"] = "sequential"
    """Tasks in order (continual), or one multi-task run on their union (the upper reference)."""
    regularizer: Literal["none", "l2", "ewc", "mas", "lwf"] = "none"
    """Continual-learning baseline added to the loss: none, L2 to θ_{t−1}, online EWC, MAS, or LwF."""
    reg_coef: float = 1.0
    """Coefficient of the regulariser's penalty."""
    importance_decay: float = 0.9
    """Online EWC / MAS: the accumulated importance is multiplied by this at each task end before the
    new task's (normalised to mean 1) is added."""
    importance_samples: int = 32
    """EWC / MAS: responses sampled from the task-end policy to estimate parameter importance."""
    lwf_temperature: float = 2.0
    """LwF: temperature T of the distillation KL to π_{t−1} (scaled by T²)."""

    def validate(self) -> None:
        _check(self.reg_coef >= 0, "continual.reg_coef", self.reg_coef, ">= 0")
        _check(0 <= self.importance_decay <= 1, "continual.importance_decay", self.importance_decay, "in [0, 1]")
        _check(self.importance_samples > 0, "continual.importance_samples", self.importance_samples, "> 0")
        _check(self.lwf_temperature > 0, "continual.lwf_temperature", self.lwf_temperature, "> 0")
        _check(self.schedule == "sequential" or self.regularizer == "none", "continual.regularizer",
               self.regularizer, "none with schedule: joint (nothing to retain in one multi-task run)")


@dataclass
class GenerationConfig:
    max_new_tokens: int = 16
    """Longest response in tokens."""
    temperature: float = 1.0
    """Sampling temperature; log-probabilities in training use the same temperature."""
    top_k: int = 0
    """Sample among the k most likely tokens; 0 disables."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables."""
    stop_token: str | None = "eos"
    """Response ends at this token (kept, masked after): `eos` (every end-of-sequence id the checkpoint
    declares: the tokenizer's EOS and generation_config.json's eos_token_id list), a literal token, or null."""
    batch_size: int | None = None
    """Responses per `generate` call on each process, a multiple of `num_generations` (a prompt's group is
    sampled in one call); null generates the whole local batch at once."""
    num_generations: int = 1
    """G: responses sampled per prompt, in one group (≥ 2 for `ppo.advantage: rloo | grpo`, whose baselines
    are the other responses of the group). Each process holds whole groups."""
    dynamic_sampling: bool = False
    """DAPO's dynamic sampling: a prompt group whose G responses all got the same raw reward (no signal for a group
    estimator) is dropped and more prompts are sampled until the batch is full of informative groups; the
    number filtered is logged (`dynamic_sampling/filtered`)."""
    dynamic_sampling_max_rounds: int = 4
    """With `dynamic_sampling`: rounds of sampling at most per step (the first included); a batch still short of
    informative groups after them is filled with filtered ones (`dynamic_sampling/filled`)."""
    engine: Literal["hf", "vllm"] = "hf"
    """What samples the rollouts: transformers' `generate`, or a vLLM engine colocated in each process (the
    `vllm` section; weights synchronised from the policy after every step). The log-probs of the PPO ratio
    come from cppo's own forward pass with either (`vllm.logprobs`)."""

    def validate(self) -> None:
        _check(self.max_new_tokens > 0, "generation.max_new_tokens", self.max_new_tokens, "> 0")
        _check(self.temperature > 0, "generation.temperature", self.temperature, "> 0")
        _check(self.top_k >= 0, "generation.top_k", self.top_k, ">= 0")
        _check(0 < self.top_p <= 1, "generation.top_p", self.top_p, "in (0, 1]")
        _check(self.num_generations > 0, "generation.num_generations", self.num_generations, "> 0")
        _check(not self.dynamic_sampling or self.num_generations >= 2, "generation.dynamic_sampling",
               self.dynamic_sampling, f"false with num_generations {self.num_generations} (it filters groups of G >= 2 "
               "responses to one prompt)")
        _check(self.dynamic_sampling_max_rounds > 0, "generation.dynamic_sampling_max_rounds",
               self.dynamic_sampling_max_rounds, "> 0")
        _check(self.batch_size is None or (self.batch_size > 0 and self.batch_size % self.num_generations == 0),
               "generation.batch_size", self.batch_size,
               f"> 0 and a multiple of generation.num_generations ({self.num_generations}), or null")


@dataclass
class PPOConfig:
    steps: int = 40
    """PPO steps (rollout batch, then `ppo_epochs` of updates) per task, unless the task sets its budget."""
    rollout_batch_size: int = 32
    """Responses per step, over all processes: rollout_batch_size / generation.num_generations prompts, each
    answered G times (with G = 1, the default, as many prompts as responses)."""
    mini_batch_size: int = 8
    """Rollouts per optimiser step, over all processes."""
    gradient_accumulation_steps: int = 1
    """Micro-batches each process splits its share of a mini-batch into (memory, not maths: same result)."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    learning_rate: float = 1e-5
    """AdamW learning rate of the policy."""
    value_learning_rate: float | None = None
    """AdamW learning rate of the critic; null uses `learning_rate`."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule over all optimiser steps of the run (after warm-up)."""
    warmup_steps: int = 0
    """Optimiser steps of linear warm-up."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm (policy and critic together); null disables."""
    advantage: Literal["gae", "rloo", "grpo", "reinforce_pp"] = "gae"
    """Advantage estimator (docs/algorithm.md §9): `gae` with a critic (§2); critic-free `rloo` (leave-one-out baseline
    over the prompt's group), `grpo` (group-normalised reward) or `reinforce_pp` (returns-to-go whitened
    over the batch). Without a critic no value model is built, trained or saved, and VF leaves the loss."""
    scale_rewards: Literal["group", "none"] = "group"
    """`advantage: grpo`: divide by the group's reward std (`group`) or not (`none`, Dr. GRPO)."""
    kl_in: Literal["reward", "loss"] = "reward"
    """Where the KL to the reference acts: shaped into the reward (§2; every estimator) or, with `advantage:
    grpo` only, as a loss term kl_coef · mean k3(π_θ ‖ π_ref) over response tokens."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """λ of GAE."""
    clip: float = 0.2
    """ε of the clipped policy ratio (both sides, unless `clip_low` or `clip_high` is set)."""
    clip_low: float | None = None
    """ε_low: the ratio is clipped below at 1 − ε_low; null: `clip`."""
    clip_high: float | None = None
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO's clip-higher, e.g. 0.28 with 0.2 below); null: `clip`."""
    ratio_level: Literal["token", "sequence"] = "token"
    """The importance ratio of the clipped objective: per token, or GSPO's per sequence (the geometric mean of the
    token ratios of a response, the same for its every token; GSPO clips it at ε ≈ 3e-4 / 4e-4)."""
    mask_truncated: bool = False
    """Leave responses that ended without the stop token out of the policy loss (DAPO's overlong filtering); their
    tokens still train the critic and count in the KL."""
    overlong_penalty: OverlongPenaltyConfig | None = None
    """DAPO's soft overlong punishment added to the score: 0 up to `length − buffer` tokens, then linearly down to
    −factor at `length`; null: none."""
    entropy_coef: float = 0.0
    """Coefficient of the entropy bonus: −entropy_coef × the token mean of the policy's entropy joins the loss."""
    value_clip: float = 0.2
    """ε_v: new values are clipped to old values ± this."""
    vf_coef: float = 0.1
    """Weight of the value loss in the total loss."""
    kl_coef: float = 0.05
    """Initial coefficient of the per-token KL penalty to the reference."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """KL estimator in the reward: k1 = log π − log π_ref; k3 = r − 1 − log r with r = π_ref/π (≥ 0)."""
    target_kl: float | None = None
    """Adaptive KL: target sequence KL; null keeps `kl_coef` fixed."""
    kl_horizon: int = 10000
    """Adaptive KL: horizon in rollouts of the proportional controller."""
    whiten_advantages: bool = True
    """Standardise GAE's advantages over the global rollout batch (response tokens only). `reinforce_pp` is
    always whitened (its definition); `rloo` and `grpo` never are (their baselines are the group's)."""
    forward_batch_size: int | None = None
    """Sequences per no-grad forward pass at rollout time (log-probs, values); null = the local batch."""
    share_prompts: bool = True
    """A prompt that several rows of one forward repeat (the G responses of `generation.num_generations`) goes
    through each model once, its keys and values reused by every response to it: policy, critic, reference,
    anchor and the reward model where it reads the policy's tokens, at rollout time and in training (the
    gradient sums over the responses). Same arithmetic, other rounding: |Δ log π| ≈ 1e-5 in fp32
    (docs/results/shared_prompts.md). `false`: every row's whole sequence, the exact reference."""
    logprob_chunk_size: int | None = 1024
    """Response positions whose logits over the vocabulary are held at once when computing log-probs and
    entropies, in training and at rollout time: the output layer runs on `logprob_chunk_size` hidden states at a
    time, forward and backward, so no (rows × positions × vocabulary) tensor is ever held (a 152k vocabulary at
    512 rows × 256 positions is 80 GB of float32 logits). For the families whose logits are the plain output
    layer (cppo.modules.PLAIN_OUTPUT_LAYER), except where the logits themselves are read (continual.regularizer
    lwf) and in ZeRO-3 / FSDP2 training; null: the model's own logits, all at once (docs/results/memory.md)."""
    on_nonfinite: Literal["stop", "skip"] = "stop"
    """A non-finite reward, log-prob, value estimate, loss term or gradient norm never reaches the weights:
    `stop` ends the run before the optimiser step, with one line naming the step and the quantity (the
    last checkpoint is intact); `skip` drops that step's rollout, or that one update, and counts it
    (`nonfinite/skipped_step`, `nonfinite/skipped_updates`). Under fp16 the loss scaler handles
    non-finite gradients itself."""
    max_nonfinite_skips: int = 10
    """With `on_nonfinite: skip`: stop anyway when one more would be skipped after this many in a task."""

    @property
    def epsilon_low(self) -> float:
        return self.clip if self.clip_low is None else self.clip_low

    @property
    def epsilon_high(self) -> float:
        return self.clip if self.clip_high is None else self.clip_high

    def validate(self, num_processes: int = 1) -> None:
        for name in ("steps", "rollout_batch_size", "mini_batch_size", "gradient_accumulation_steps", "ppo_epochs"):
            _check(getattr(self, name) > 0, f"ppo.{name}", getattr(self, name), "> 0")
        _check(self.learning_rate > 0, "ppo.learning_rate", self.learning_rate, "> 0")
        _check(self.value_learning_rate is None or self.value_learning_rate > 0, "ppo.value_learning_rate",
               self.value_learning_rate, "> 0 or null")
        _check(self.weight_decay >= 0, "ppo.weight_decay", self.weight_decay, ">= 0")
        _check(self.warmup_steps >= 0, "ppo.warmup_steps", self.warmup_steps, ">= 0")
        _check(self.max_grad_norm is None or self.max_grad_norm > 0, "ppo.max_grad_norm", self.max_grad_norm,
               "> 0 or null")
        _check(0 <= self.gamma <= 1, "ppo.gamma", self.gamma, "in [0, 1]")
        _check(0 <= self.lam <= 1, "ppo.lam", self.lam, "in [0, 1]")
        _check(self.clip > 0, "ppo.clip", self.clip, "> 0")
        _check(self.clip_low is None or 0 < self.clip_low < 1, "ppo.clip_low", self.clip_low, "in (0, 1) or null")
        _check(self.clip_high is None or self.clip_high > 0, "ppo.clip_high", self.clip_high, "> 0 or null")
        _check(self.entropy_coef >= 0, "ppo.entropy_coef", self.entropy_coef, ">= 0")
        _check(self.value_clip > 0, "ppo.value_clip", self.value_clip, "> 0")
        _check(self.vf_coef >= 0, "ppo.vf_coef", self.vf_coef, ">= 0")
        _check(self.kl_coef >= 0, "ppo.kl_coef", self.kl_coef, ">= 0")
        _check(self.target_kl is None or self.target_kl > 0, "ppo.target_kl", self.target_kl, "> 0 or null")
        _check(self.kl_horizon > 0, "ppo.kl_horizon", self.kl_horizon, "> 0")
        _check(self.forward_batch_size is None or self.forward_batch_size > 0, "ppo.forward_batch_size",
               self.forward_batch_size, "> 0 or null")
        _check(self.logprob_chunk_size is None or self.logprob_chunk_size > 0, "ppo.logprob_chunk_size",
               self.logprob_chunk_size, "> 0 or null")
        _check(self.max_nonfinite_skips >= 0, "ppo.max_nonfinite_skips", self.max_nonfinite_skips, ">= 0")
        _check(self.rollout_batch_size % self.mini_batch_size == 0, "ppo.rollout_batch_size",
               self.rollout_batch_size, f"a multiple of ppo.mini_batch_size ({self.mini_batch_size})")
        per_step = num_processes * self.gradient_accumulation_steps
        _check(self.mini_batch_size % per_step == 0, "ppo.mini_batch_size", self.mini_batch_size,
               f"a multiple of processes × gradient_accumulation_steps ({num_processes} × "
               f"{self.gradient_accumulation_steps})")


@dataclass
class OverlongPenaltyConfig:
    buffer: int = 4
    """L_buffer: the last tokens before `length` over which the penalty grows from 0 to −factor."""
    length: int | None = None
    """L_max: the length at which the penalty reaches −factor; null: `generation.max_new_tokens`."""
    factor: float = 1.0
    """The largest penalty."""

    def validate(self, max_new_tokens: int) -> None:
        length = self.length or max_new_tokens
        _check(self.length is None or self.length > 0, "ppo.overlong_penalty.length", self.length, "> 0 or null")
        _check(0 < self.buffer <= length, "ppo.overlong_penalty.buffer", self.buffer, f"in [1, length {length}]")
        _check(self.factor > 0, "ppo.overlong_penalty.factor", self.factor, "> 0")


_ABLATIONS = ("none", "alpha_one", "beta_one", "beta_zero")


@dataclass
class CPPOConfig:
    k: float = 0.85
    """Zone threshold in standard deviations: high ℓ ⇔ ℓ ≥ μ + kσ, low ℓ ⇔ ℓ ≤ μ − kσ (same for R)."""
    lb: float = 0.2
    """Lower bound of α and β (0 < lb ≤ 1)."""
    ub: float = 2.0
    """Upper bound of α and β (ub ≥ 1)."""
    weighting: Literal["heuristic", "balance", "learned"] = "heuristic"
    """α/β per type: the paper's continuous Table 2, the step constants of the authors' code, or L_coef."""
    kr_coef: float = 0.01
    """Coefficient c_kr of the knowledge-retention term KR in the loss. The default is the largest value with which
    CPPO still learns as PPO does with every advantage estimator (docs/results/kr_coef_defaults.md); a longer
    stream that must retain more takes a larger one (the benchmark chose 0.03 on the demo stream)."""
    kr_source: Literal["rollouts", "memory", "both"] = "rollouts"
    """Where KR acts (docs/algorithm.md §8): on the current rollouts (§5), on the entries of the rollout memory of
    earlier tasks (the `memory` section; D2 of the continual objective), or both."""
    kr_anchor: Literal["previous_task", "rollout"] = "previous_task"
    """Policy KR pulls toward: π_{t−1} frozen at the task's start (paper), or the rollout policy (authors' code)."""
    kl_reference: Literal["previous_task", "initial"] = "previous_task"
    """Reference of the KL penalty in the reward: π_{t−1}, or the initial (SFT) policy."""
    alpha_weights_value_loss: bool = False
    """Weight the value loss by α too (authors' code); by default the value loss is unweighted."""
    ablation: str = "none"
    """`none`, `alpha_one` (α ≡ 1), `beta_one` (β ≡ 1), `beta_zero` (β ≡ 0), or several joined by `+`."""
    stats_reward: Literal["score", "shaped"] = "score"
    """R used for the five types: the processed score, or score − c_kl·Σ kl (shaped)."""
    tau: float = 0.05
    """Learned weighting: weight τ of the order constraints in L_coef."""
    coef_lr: float = 0.05
    """Learned weighting: Adam step size on the weight parameters."""
    coef_steps: int = 1000
    """Learned weighting: most Adam steps per rollout batch."""
    coef_tol: float = 1e-5
    """Learned weighting: stop once no α or β moves more than this in a step."""

    def validate(self) -> None:
        _check(self.k > 0, "cppo.k", self.k, "> 0")
        _check(0 < self.lb <= 1, "cppo.lb", self.lb, "in (0, 1]")
        _check(self.ub >= 1, "cppo.ub", self.ub, ">= 1")
        _check(self.kr_coef >= 0, "cppo.kr_coef", self.kr_coef, ">= 0")
        _check(self.tau >= 0, "cppo.tau", self.tau, ">= 0")
        _check(self.coef_lr > 0, "cppo.coef_lr", self.coef_lr, "> 0")
        _check(self.coef_steps > 0, "cppo.coef_steps", self.coef_steps, "> 0")
        _check(self.coef_tol >= 0, "cppo.coef_tol", self.coef_tol, ">= 0")
        parts = self.ablation.split("+")
        _check(all(p in _ABLATIONS for p in parts) and len(set(parts)) == len(parts)
               and not ("none" in parts and len(parts) > 1) and not {"beta_one", "beta_zero"} <= set(parts),
               "cppo.ablation", self.ablation, f"one of {', '.join(_ABLATIONS)} or several joined by '+'")


@dataclass
class MemoryConfig:
    """The rollout memory (docs/algorithm.md §8), used with `algo: cppo` and `cppo.kr_source: memory | both`."""

    capacity: int = 256
    """Most entries (responses) held over all earlier tasks."""
    build_prompts: int = 64
    """Prompts of a task sampled at its end to build its entries (all of them if it has fewer)."""
    build_samples: int = 4
    """Responses sampled per build prompt from the task-end policy (rollout sampling settings)."""
    select: Literal["all", "high_reward", "r1"] = "all"
    """Which built responses are kept: all, R ≥ μ_R + kσ_R of the build batch (D2), or type r1 (high ℓ and high R).
    A task-end policy's rewards crowd below their maximum, so μ_R + kσ_R can lie above every one of them."""
    update: Literal["balanced", "fifo"] = "balanced"
    """When full: evict at random from the tasks holding more than an equal share, or the oldest entries first."""
    batch_size: int = 8
    """Entries retrieved each step; they enter every update's loss (split across processes and micro-batches)."""
    retrieve: Literal["random", "similar"] = "random"
    """Seeded random entries, or those whose prompts are nearest (TF-IDF over prompt tokens) to the batch's."""
    weighting: Literal["uniform", "heuristic"] = "heuristic"
    """β of an entry: 1, or CPPO's heuristic β of its type in its build batch."""
    loss: Literal["kr", "sft"] = "kr"
    """KR to the stored log-probs, or replay: maximise log π_θ of the stored responses (behaviour cloning)."""
    kr_coef: float = 1.0
    """Coefficient c_mem of the memory term in the loss."""

    def validate(self) -> None:
        for name in ("capacity", "build_prompts", "build_samples", "batch_size"):
            _check(getattr(self, name) > 0, f"memory.{name}", getattr(self, name), "> 0")
        _check(self.kr_coef >= 0, "memory.kr_coef", self.kr_coef, ">= 0")


@dataclass
class VLLMConfig:
    """The colocated vLLM engine of `generation.engine: vllm` / `eval.engine: vllm`: one per process, built
    once per run from the initial policy, its weights loaded from the trained policy before it samples."""

    gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory vLLM may take (weights and KV cache); the rest is training's. On vLLM's CPU
    build: the share of the machine's memory it reserves (weights and KV cache)."""
    kv_cache_memory_bytes: int | None = None
    """A fixed KV-cache size in bytes instead of `gpu_memory_utilization` (the simplest choice on vLLM's CPU
    build, where memory is shared with everything else)."""
    max_model_len: int | None = None
    """Longest prompt + response vLLM plans for; null: the tasks' longest prompt + the longest response."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """vLLM's weights; auto: bfloat16 / float16 under that mixed precision, else float32."""
    sleep: bool = True
    """On GPUs, offload vLLM's weights and drop its KV cache while training (vLLM's sleep mode, level 1); woken
    before it samples. Ignored where vLLM has no sleep mode (CPU)."""
    enforce_eager: bool = False
    """No CUDA graphs (less memory and start-up time, slower decoding)."""
    logprobs: Literal["recompute", "engine"] = "recompute"
    """π_old of the PPO ratio (and ℓ of CPPO's types): cppo's own forward pass over the sampled tokens (exact,
    as with `hf`), or vLLM's sampling log-probs (one forward pass less per step; the ratio then also carries
    the mismatch between vLLM's numerics and the trainer's, and entropies are not logged)."""
    importance_sampling_cap: float | None = None
    """With `recompute`: weight each token's policy-gradient term by min(π_old/π_vllm, cap), the truncated
    importance-sampling correction for tokens drawn by vLLM rather than by π_old (TRL's
    `vllm_importance_sampling_correction`); null: no correction."""

    def validate(self) -> None:
        _check(0 < self.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization", self.gpu_memory_utilization,
               "in (0, 1]")
        _check(self.kv_cache_memory_bytes is None or self.kv_cache_memory_bytes > 0, "vllm.kv_cache_memory_bytes",
               self.kv_cache_memory_bytes, "> 0 or null")
        _check(self.max_model_len is None or self.max_model_len > 0, "vllm.max_model_len", self.max_model_len,
               "> 0 or null")
        _check(self.importance_sampling_cap is None or self.importance_sampling_cap >= 1,
               "vllm.importance_sampling_cap", self.importance_sampling_cap, ">= 1 or null")
        _check(self.importance_sampling_cap is None or self.logprobs == "recompute", "vllm.importance_sampling_cap",
               self.importance_sampling_cap, "null with vllm.logprobs: engine (π_old is then vLLM's own)")


@dataclass
class Config:
    algo: Literal["ppo", "cppo"] = "ppo"
    """Training algorithm: plain PPO, or CPPO (the `cppo` section applies)."""
    seed: int = 0
    """Seed of every random number generator (python, numpy, torch, data order, sampling)."""
    output_dir: str = "runs/ppo"
    """Where metrics, the resolved config and the final models are written. `{dotted.key}` is replaced by that
    field's value (`runs/kr{cppo.kr_coef}-seed{seed}`), as in `run_name` and `run_group`: how sweeps name trials."""
    report_to: list[str] = field(default_factory=list)
    """Trackers fed the same metrics as metrics.jsonl: any of `wandb`, `tensorboard`."""
    project: str = "cppo"
    """Tracker project name."""
    run_name: str | None = None
    """Tracker run name; defaults to the output directory's name."""
    run_group: str | None = None
    """Tracker group (wandb `group`): the trials of one sweep share it."""
    logging_steps: int = 1
    """Print a plain progress line every this many steps when stderr is not a terminal."""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """Autocast precision under accelerate; null follows the accelerate config (its file or `accelerate launch
    --mixed_precision`), which is `no` without one. The effective value is printed and saved in backend.json."""
    save_steps: int = 0
    """Write a checkpoint every this many steps (0: only at task ends and on SIGTERM/SIGINT)."""
    save_total_limit: int | None = 3
    """Keep the newest this many checkpoints (null keeps all; task-end policies are always kept)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy, its critic and tokenizer, their dtype, LoRA."""
    tasks: list[TaskConfig] = field(default_factory=lambda: [TaskConfig()])
    """The task stream, in training order: each task's prompts, evaluation prompts, reward and budget."""
    eval_reward: RewardConfig | list[RewardConfig] | None = None
    """Evaluation reward for every task (the paper's reference PM), one source or a weighted list; null: each
    task's own reward."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """How the evaluation matrix is decoded and scored after each task."""
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    """The schedule over the tasks and the continual-learning baselines (L2, EWC, MAS, LwF)."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """How rollouts are sampled: the engine, length, temperature, stop token, responses per prompt."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """The PPO update: batch sizes, epochs, optimiser, advantage estimator, clipping, KL."""
    cppo: CPPOConfig = field(default_factory=CPPOConfig)
    """CPPO's rollout types, weights and knowledge-retention term (with `algo: cppo`)."""
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    """The rollout memory of earlier tasks (with `cppo.kr_source: memory` or `both`)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vLLM engine (with `generation.engine` or `eval.engine` vllm)."""

    @property
    def eval_rewards(self) -> list[RewardConfig] | None:
        """The evaluation reward's sources (None: each task's own)."""
        if self.eval_reward is None:
            return None
        return self.eval_reward if isinstance(self.eval_reward, list) else [self.eval_reward]

    @property
    def uses_critic(self) -> bool:
        """Whether the run has a value model (GAE); the critic-free estimators of docs/algorithm.md §9 have none."""
        return self.ppo.advantage == "gae"

    @property
    def uses_vllm(self) -> bool:
        """Whether the run builds a vLLM engine (for its rollouts, its evaluations or both)."""
        return self.generation.engine == "vllm" or self.eval.engine == "vllm"

    @property
    def uses_memory(self) -> bool:
        """Whether the run builds and retrieves a rollout memory (docs/algorithm.md §8)."""
        return self.algo == "cppo" and self.cppo.kr_source != "rollouts"

    def validate(self, num_processes: int = 1) -> Config:
        for name in ("report_to",):
            for tracker in getattr(self, name):
                _check(tracker in ("wandb", "tensorboard"), "report_to", tracker, "wandb or tensorboard")
        _check(self.logging_steps > 0, "logging_steps", self.logging_steps, "> 0")
        _check(self.save_steps >= 0, "save_steps", self.save_steps, ">= 0")
        _check(self.save_total_limit is None or self.save_total_limit > 0, "save_total_limit",
               self.save_total_limit, "> 0 or null")
        _check(bool(self.output_dir), "output_dir", self.output_dir, "a directory path")
        self.model.validate()
        _check(len(self.tasks) > 0, "tasks", self.tasks, "a non-empty list")
        seen = set()
        for index, task in enumerate(self.tasks):
            task.validate(index)
            _check(task.name not in seen, f"tasks[{index}].name", task.name, "unique (another task has it)")
            seen.add(task.name)
        if self.eval_reward is not None:
            reward_sources(self.eval_reward, "eval_reward")
        self.eval.validate()
        self.continual.validate()
        _check(self.model.lora_r == 0 or self.continual.regularizer in ("none", "lwf"), "continual.regularizer",
               self.continual.regularizer, "none or lwf with LoRA (l2, ewc and mas act on full weights)")
        self.generation.validate()
        self.ppo.validate(num_processes)
        if self.ppo.overlong_penalty is not None:
            self.ppo.overlong_penalty.validate(self.generation.max_new_tokens)
        self.cppo.validate()
        self.memory.validate()
        self.vllm.validate()
        if self.cppo.kr_source != "rollouts":
            _check(self.algo == "cppo", "cppo.kr_source", self.cppo.kr_source,
                   "rollouts with algo: ppo (PPO with memory is algo: cppo with cppo.ablation: alpha_one)")
            _check(self.continual.schedule == "sequential", "cppo.kr_source", self.cppo.kr_source,
                   "rollouts with continual.schedule: joint (no earlier task to remember)")
        group, pcfg = self.generation.num_generations, self.ppo
        _check(pcfg.advantage not in ("rloo", "grpo") or group >= 2, "generation.num_generations", group,
               f">= 2 with ppo.advantage: {pcfg.advantage} (its baseline is the other responses to the prompt)")
        _check(pcfg.rollout_batch_size % (group * num_processes) == 0, "ppo.rollout_batch_size",
               pcfg.rollout_batch_size, f"a multiple of generation.num_generations × processes ({group} × "
               f"{num_processes}): each process answers whole prompts G times")
        _check(pcfg.kl_in == "reward" or pcfg.advantage == "grpo", "ppo.kl_in", pcfg.kl_in,
               "reward unless ppo.advantage is grpo")
        self._refuse_what_cannot_take_effect()
        if self.uses_critic and self.model.value_init == "reward_model" and self.model.value_model is None:
            first = self.tasks[0].rewards
            _check(len(first) == 1 and first[0].model is not None, "model.value_init", self.model.value_init,
                   "'policy' when the first task's reward is not one reward model")
        for index, task in enumerate(self.tasks):
            for k, source in enumerate(task.rewards):
                _check(source.normalize != "group" or group >= 2, f"tasks[{index}].reward"
                       + (f"[{k}]" if isinstance(task.reward, list) else "") + ".normalize", source.normalize,
                       f"none, batch or running with generation.num_generations {group} (a group is G >= 2 "
                       "responses to one prompt)")
                _check(source.normalize != "group" or not self.uses_memory or self.memory.build_samples >= 2,
                       "memory.build_samples", self.memory.build_samples,
                       ">= 2 with a reward normalized by group (the memory's answers are normalised per prompt)")
        return self

    def _refuse_what_cannot_take_effect(self) -> None:
        """A setting that would change nothing in this run is a mistake the user should hear of (docs/config.md)."""
        m, pcfg = self.model, self.ppo
        if not self.uses_critic:
            why = f"with ppo.advantage: {pcfg.advantage} (critic-free: no value model is built)"
            _check(m.value_model is None, "model.value_model", m.value_model, f"null {why}")
        _check(pcfg.scale_rewards == "group" or pcfg.advantage == "grpo", "ppo.scale_rewards", pcfg.scale_rewards,
               f"group (the default) with ppo.advantage: {pcfg.advantage} (it acts on grpo's advantages only)")
        if self.uses_memory:
            _check(len(self.tasks) > 1, "cppo.kr_source", self.cppo.kr_source,
                   "rollouts on a one-task run (the memory holds earlier tasks' responses: there are none)")
            _check(self.memory.batch_size <= self.memory.capacity, "memory.batch_size", self.memory.batch_size,
                   f"<= memory.capacity ({self.memory.capacity}): a step cannot retrieve more entries than "
                   "the memory holds")
        _check(self.vllm.importance_sampling_cap is None or self.generation.engine == "vllm",
               "vllm.importance_sampling_cap", self.vllm.importance_sampling_cap,
               f"null with generation.engine: {self.generation.engine} (it corrects for tokens vLLM sampled)")

    def ignored(self) -> list[str]:
        """Settings this run ignores that a shared base config reasonably holds (the critic's initialisation,
        learning rate and LoRA rank, under a critic-free estimator that an override or a sweep variant chose):
        one `cppo: warning:` line each. An explicit critic (`model.value_model`) is an error instead."""
        if self.uses_critic:
            return []
        found = [("model.value_init", self.model.value_init, "policy"),
                 ("ppo.value_learning_rate", self.ppo.value_learning_rate, None),
                 ("model.value_lora_r", self.model.value_lora_r, 0)]
        return [f"{name}: {value!r} is ignored with ppo.advantage: {self.ppo.advantage} (critic-free: no value "
                "model is built)" for name, value, unset in found if value != unset]

    def inputs(self) -> list[tuple[str, str]]:
        """(field, value) of every model, data file and reward source the run reads (paths or names)."""
        m = self.model
        found = [(f"model.{name}", getattr(m, name))
                 for name in ("policy", "tokenizer", *(("value_model",) if self.uses_critic else ()))]
        rewards = [(f"tasks[{i}].reward", r) for i, t in enumerate(self.tasks) for r in t.rewards]
        rewards += [("eval_reward", r) for r in self.eval_rewards or []]
        for name, reward in rewards:
            found.append((f"{name}.model", reward.model) if reward.model is not None else
                         (f"{name}.function", reward.function.rpartition(":")[0]))
        for i, task in enumerate(self.tasks):
            found.append((f"tasks[{i}].prompts.path", task.prompts.path))
            if task.eval_prompts is not None:
                found.append((f"tasks[{i}].eval_prompts.path", task.eval_prompts.path))
        return [(name, value) for name, value in found if value]

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (config.yaml): rows given in memory as their count and content hash."""
        described = []
        for task in self.tasks:
            for data in (task.prompts, task.eval_prompts):
                if data is not None and in_memory(data.path):
                    described.append((data, data.path))
                    data.path = describe_rows(data.path)
        try:
            return dataclasses.asdict(self)
        finally:
            for data, rows in described:
                data.path = rows


def describe_rows(rows: Any) -> str:
    """Rows held in memory, as config.yaml records them: `in memory: N rows, sha256 <first 16 hex digits>`."""
    listed = rows if isinstance(rows, list) else rows.to_list()
    digest = hashlib.sha256(json.dumps(listed, sort_keys=True, default=str).encode()).hexdigest()
    return f"in memory: {len(listed)} rows, sha256 {digest[:16]}"


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise UserError(f"{name} must be {allowed}, got {value!r}")
