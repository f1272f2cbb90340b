"""Prompt data: loading (local files, hub datasets, the builtin toy set), tokenisation, and the
resumable stream of prompt batches shared out across processes."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import DataConfig, UserError

BUILTIN_TOY_PROMPTS = "builtin:toy-prompts"
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_data_source(cfg: DataConfig) -> None:
    """Fail fast (before any model loads) on a local prompt file that is missing or of unknown type."""
    if cfg.path == BUILTIN_TOY_PROMPTS:
        return
    path = Path(cfg.path).expanduser()
    if path.suffix in _LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise UserError(f"data.path: file not found: {cfg.path}")
        if path.suffix not in _LOCAL_FORMATS:
            raise UserError(f"data.path must be a {'/'.join(_LOCAL_FORMATS)} file, got {cfg.path!r}")


def load_prompts(cfg: DataConfig) -> list[str]:
    """The prompt column of the configured dataset, as a list of strings."""
    if cfg.path == BUILTIN_TOY_PROMPTS:
        from .toy import toy_prompts

        return toy_prompts()
    check_data_source(cfg)
    import datasets

    path = Path(cfg.path).expanduser()
    try:
        if path.is_file():
            dataset = datasets.load_dataset(_LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        else:
            dataset = datasets.load_dataset(cfg.path, split=cfg.split)
    except Exception as e:  # datasets raises many types for unreadable or unreachable data
        raise UserError(f"data.path: cannot load {cfg.path!r}: {str(e).splitlines()[0]}") from None
    if cfg.prompt_field not in dataset.column_names:
        raise UserError(f"data.prompt_field: column {cfg.prompt_field!r} not in {cfg.path} "
                        f"(columns: {', '.join(dataset.column_names)})")
    prompts = [p for p in dataset[cfg.prompt_field] if isinstance(p, str) and p.strip()]
    if not prompts:
        raise UserError(f"data.path: {cfg.path} has no non-empty prompts in column {cfg.prompt_field!r}")
    return prompts


def tokenize_prompts(prompts: list[str], tokenizer, max_length: int,
                     long_prompts: str) -> tuple[list[list[int]], list[str], dict[str, int]]:
    """Token ids of each prompt (no padding); long prompts keep their last `max_length` tokens or are
    dropped. Returns (ids, the kept prompts' texts, counts of truncated/dropped prompts)."""
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    kept_ids, kept_texts, counts = [], [], {"truncated": 0, "dropped": 0}
    for text, ids in zip(prompts, encoded, strict=True):
        if len(ids) > max_length:
            if long_prompts == "drop":
                counts["dropped"] += 1
                continue
            counts["truncated"] += 1
            ids = ids[-max_length:]
            text = tokenizer.decode(ids)
        kept_ids.append(ids)
        kept_texts.append(text)
    if not kept_ids:
        raise UserError(f"data: every prompt is longer than data.max_prompt_length={max_length} and was dropped")
    return kept_ids, kept_texts, counts


def left_pad(sequences: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into (input_ids, attention_mask), both (B, max_len)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


class PromptStream:
    """Endless shuffled passes over the prompts; each step takes the next global batch and each
    process its contiguous share. The order depends only on (seed, epoch), so the position
    (epoch, offset) is the whole state: saving and restoring it resumes the exact same order."""

    def __init__(self, num_prompts: int, seed: int):
        self.num_prompts, self.seed = num_prompts, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.num_prompts, generator=generator)

    def next_indices(self, global_batch: int, rank: int, world_size: int) -> list[int]:
        picked = []
        while len(picked) < global_batch:
            if self.offset == self.num_prompts:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation()
            take = min(global_batch - len(picked), self.num_prompts - self.offset)
            picked.extend(self._order[self.offset:self.offset + take].tolist())
            self.offset += take
        share = global_batch // world_size
        return picked[rank * share:(rank + 1) * share]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset, "num_prompts": self.num_prompts, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._permutation()
