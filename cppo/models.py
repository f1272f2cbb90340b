"""Loading the policy, critic, reference and reward models: tokenizers, configs, LoRA, frozen copies.

A model source is a local HF directory, a hub name, or a builtin model (`builtin:...`, cppo.builtin_models)
built once into the cache so that everything runs with no network.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from .builtin_models import BUILTIN_PREFIX, builtin_model
from .config import ModelConfig
from .distributed import whole_on_every_process
from .errors import UserError


def resolve_model_source(source: str, field: str) -> str:
    """Turn a config value into what `from_pretrained` takes, building builtin models on first use.

    A value that names an existing directory, or looks like a filesystem path, must be a directory
    with a config.json; anything else is treated as a hub name and fails at load time if unreachable.
    """
    if source.startswith(BUILTIN_PREFIX):
        return str(builtin_model(source, field))
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith(("/", "./", "../", "~")) or source.count("/") > 1
    if looks_local:
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "does not exist"
            raise UserError(f"{field}: model directory {source!r} {what}")
        return str(path)
    return source


def load_tokenizer(source: str, trust_remote_code: bool = False):
    """Tokenizer with left padding (for batched generation) and a pad token (eos if it had none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load tokenizer {source!r}: {str(e).splitlines()[0]}") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn text into the same ids (same vocabulary and special tokens), so
    that one model can read token ids made for the other."""
    specials = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    return a.get_vocab() == b.get_vocab() and all(getattr(a, n) == getattr(b, n) for n in specials)


def is_causal_type(model_type: str) -> bool:
    """A decoder-only (causal) architecture: position t sees tokens ≤ t only. Encoders such as BERT
    also have a causal-LM head class in transformers, so masked-LM architectures are excluded."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def model_config(source: str, trust_remote_code: bool = False):
    """A model's config (config.json) alone, without its weights."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model config {source!r}: {str(e).splitlines()[0]}") from None


def model_type_of(source: str, trust_remote_code: bool = False) -> str:
    return model_config(source, trust_remote_code).model_type


def context_length(source: str, trust_remote_code: bool = False) -> int | None:
    """Positions the model was built for (`max_position_embeddings`, GPT-2's `n_positions`), if it says."""
    config = model_config(source, trust_remote_code)
    config = getattr(config, "get_text_config", lambda: config)()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _from_pretrained(auto_cls, source: str, cfg: ModelConfig, **kwargs):
    dtype = getattr(torch, cfg.dtype)
    try:
        model = auto_cls.from_pretrained(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model {source!r}: {str(e).splitlines()[0]}") from None
    disable_dropout(model)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config = neutral_generation_config(model.generation_config)
    return model


def neutral_generation_config(checkpoint_config):
    """A generation config with the checkpoint's token ids and nothing else.

    transformers fills every generation field a caller leaves unset from the model's own
    generation_config.json: a checkpoint's repetition_penalty, min_p, no_repeat_ngram_size,
    suppress_tokens, min_new_tokens, ... would then reshape the distribution we sample from while the
    log-probs of PPO's ratio, KL and CPPO's ℓ describe softmax(z/T). With this as the model's own
    config, only the settings we pass take effect. The checkpoint's file is read again where it is
    wanted: saved with the trained policy, and for `eval.checkpoint_generation_config`.
    """
    from transformers import GenerationConfig

    ids = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return GenerationConfig(**{name: getattr(checkpoint_config, name, None) for name in ids})


def checkpoint_generation_config(source: str):
    """The generation_config.json a model source ships (None if it has none)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(source)
    except (OSError, ValueError):
        return None


def disable_dropout(model: nn.Module) -> None:
    """PPO's first-epoch ratio must be exactly 1: no dropout anywhere in the models it compares."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_policy(source: str, cfg: ModelConfig, pad_token_id: int):
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, source, cfg)
    model.config.pad_token_id = pad_token_id
    model.generation_config.pad_token_id = pad_token_id
    if cfg.lora_r > 0:
        model = with_lora(model, cfg, cfg.lora_r, "CAUSAL_LM")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def with_lora(model, cfg: ModelConfig, rank: int, task_type: str):
    """`model` with LoRA adapters of rank `rank` on `cfg.lora_target_modules` (peft); for a critic
    (SEQ_CLS) peft trains its scalar head whole."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_target_modules
    lora = LoraConfig(task_type=task_type, r=rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets)
    model = get_peft_model(model, lora)
    disable_dropout(model)  # the adapters' own dropout modules (model.lora_dropout must be 0 anyway)
    return model


def load_frozen(auto_name: str, source: str, cfg: ModelConfig, pad_token_id: int, **kwargs):
    """A model in eval mode with gradients off: the reference policy or a reward model, whole on every
    process under every back end (cppo.distributed)."""
    import transformers

    with whole_on_every_process():
        model = _from_pretrained(getattr(transformers, auto_name), source, cfg, **kwargs)
    model.config.pad_token_id = pad_token_id
    return model.eval().requires_grad_(False)


def load_value_model(source: str, cfg: ModelConfig, pad_token_id: int):
    """The critic: a causal-LM backbone with a scalar head (`AutoModelForSequenceClassification`).

    From a policy checkpoint the head is new (initialised by transformers); from a reward model the
    reward head is kept, which starts the critic near the final score.
    """
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    # From a causal LM the missing head is expected: keep transformers' load report for real surprises.
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = _from_pretrained(AutoModelForSequenceClassification, source, cfg, num_labels=1)
    finally:
        hf_logging.set_verbosity(previous)
    model.config.pad_token_id = pad_token_id
    if cfg.value_lora_r > 0:
        model = with_lora(model, cfg, cfg.value_lora_r, "SEQ_CLS")
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def save_models(model, directory: Path, cfg: ModelConfig, tokenizer, policy_source: str) -> None:
    """The policy (merged if LoRA, its adapter beside it) and the critic (if any) of an `ActorCritic` as
    standard HF directories under `directory`, each with the tokenizer; the policy keeps the generation
    settings its source checkpoint (`policy_source`) ships (rollouts never use them)."""
    policy = model.policy
    if cfg.lora_r > 0:
        policy.save_pretrained(directory / "policy_adapter")
        policy = copy.deepcopy(policy).merge_and_unload()
    policy.save_pretrained(directory / "policy")
    original = checkpoint_generation_config(policy_source)
    if original is not None:
        original.save_pretrained(directory / "policy")
    tokenizer.save_pretrained(directory / "policy")
    value_model = model.value_model
    if value_model is None:  # critic-free (docs/algorithm.md §9)
        return
    if cfg.value_lora_r > 0:  # the next task's critic loads from a plain directory
        value_model = copy.deepcopy(value_model).merge_and_unload()
    value_model.save_pretrained(directory / "value_model")
    tokenizer.save_pretrained(directory / "value_model")
