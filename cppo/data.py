"""Prompt data: loading (local files, hub datasets, the builtin toy set), tokenisation, and the
resumable stream of prompt batches shared out across processes."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import REWARD_ARGUMENTS, DataConfig, in_memory
from .errors import UserError, exception_line

# Builtin prompt sets: name → (number of prompts, seed)
BUILTIN_PROMPTS = {"builtin:toy-prompts": (512, 0), "builtin:toy-prompts-eval": (64, 1)}
_LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def check_data_source(cfg: DataConfig, name: str = "data") -> None:
    """Fail fast (before any model loads) on a local prompt file that is missing or of unknown type."""
    if in_memory(cfg.path) or _saved_to_disk(Path(cfg.path).expanduser()):
        return
    if cfg.path.startswith("builtin:"):
        if cfg.path not in BUILTIN_PROMPTS:
            raise UserError(f"{name}.path must name a builtin prompt set ({', '.join(BUILTIN_PROMPTS)}), "
                            f"got {cfg.path!r}")
        return
    path = Path(cfg.path).expanduser()
    if path.suffix in _LOCAL_FORMATS or path.exists():
        if not path.is_file():
            raise UserError(f"{name}.path: file not found: {cfg.path}")
        if path.suffix not in _LOCAL_FORMATS:
            raise UserError(f"{name}.path must be a {'/'.join(_LOCAL_FORMATS)} file, got {cfg.path!r}")


def _saved_to_disk(path: Path) -> bool:
    """A directory written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    return path.is_dir() and any((path / name).is_file() for name in ("state.json", "dataset_dict.json"))


def load_rows(cfg: DataConfig, name: str = "data") -> list[dict]:
    """The configured rows (filtered, capped), every column of each; the `columns` mapping's keywords added."""
    check_data_source(cfg, name)
    if isinstance(cfg.path, str) and cfg.path in BUILTIN_PROMPTS:
        from .toy import toy_prompts

        rows = [{cfg.prompt_field: p} for p in toy_prompts(*BUILTIN_PROMPTS[cfg.path])]
    else:
        import datasets

        verbosity = datasets.logging.get_verbosity()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its error log would repeat our one line
        try:
            dataset = _load_dataset(cfg, name)
            wanted = {"prompt_field": cfg.prompt_field, "reference_field": cfg.reference_field,
                      "filter_field": cfg.filter_field, **{f"columns.{k}": v for k, v in cfg.columns.items()}}
            for what, column in wanted.items():
                if column is not None and column not in dataset.column_names:
                    raise UserError(f"{name}.{what}: column {column!r} not in {_described(cfg.path)} "
                                    f"(columns: {', '.join(dataset.column_names)})")
            _check_field_types(dataset, cfg, name)
            if cfg.filter_field is not None:
                dataset = dataset.filter(lambda row: str(row[cfg.filter_field]) == cfg.filter_value)
            rows = [{**row, **{k: row[v] for k, v in cfg.columns.items()}} for row in dataset]
        except UserError:
            raise
        except Exception as e:  # datasets and pyarrow raise many types for unreadable or unreachable data
            root = e  # datasets wraps the parser's error ("JSON parse error: ... in row 3") in a generic one
            while (root.__cause__ or root.__context__) is not None:
                root = root.__cause__ or root.__context__
            raise UserError(f"{name}.path: cannot load {_described(cfg.path)!r}: {exception_line(root)}") from e
        finally:
            datasets.logging.set_verbosity(verbosity)
    if cfg.max_samples is not None:
        rows = rows[:cfg.max_samples]
    rows = [r for r in rows if _non_empty(r[cfg.prompt_field])]
    if not rows:
        raise UserError(f"{name}.path: {_described(cfg.path)} has no non-empty prompts in column "
                        f"{cfg.prompt_field!r}" + (f" with {cfg.filter_field} = {cfg.filter_value!r}"
                                                   if cfg.filter_field else ""))
    return rows


def _load_dataset(cfg: DataConfig, name: str):
    """The `datasets.Dataset` of the configured split: rows in memory, a save_to_disk directory, a local file, or
    a hub dataset (its subset, revision and data files)."""
    import datasets

    if in_memory(cfg.path):
        return cfg.path if not isinstance(cfg.path, list) else datasets.Dataset.from_list(cfg.path)
    path = Path(cfg.path).expanduser()
    if _saved_to_disk(path):
        saved = datasets.load_from_disk(str(path))
        splits = {"train": saved} if isinstance(saved, datasets.Dataset) else dict(saved)
        try:
            parts = datasets.ReadInstruction.from_spec(cfg.split).to_absolute({k: len(v) for k, v in splits.items()})
        except (ValueError, KeyError) as e:
            raise UserError(f"{name}.split: {cfg.split!r} does not select from {cfg.path} (splits: "
                            f"{', '.join(splits)}): {exception_line(e)}") from None
        return datasets.concatenate_datasets([splits[p.splitname].select(range(p.from_, p.to)) for p in parts])
    if path.is_file():
        if path.suffix != ".parquet":
            _check_text_file(path, name)
        return datasets.load_dataset(_LOCAL_FORMATS[path.suffix], data_files=str(path), split=cfg.split)
    return datasets.load_dataset(cfg.path, cfg.name, revision=cfg.revision, data_files=cfg.data_files,
                                 split=cfg.split)


def _described(path) -> str:
    """A data source as the one-line errors name it."""
    if in_memory(path):
        return f"the {len(path)} rows given in memory"
    return str(path)


def _check_text_file(path: Path, name: str) -> None:
    """A local text file that is empty or not UTF-8, reported before `datasets` fails on it obscurely."""
    data = path.read_bytes()
    if not data.strip():
        raise UserError(f"{name}.path: {path} is empty")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UserError(f"{name}.path: {path} is not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); "
                        "save it as UTF-8") from None


def _is_message_list(value) -> bool:
    return isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value)


def _check_field_types(dataset, cfg: DataConfig, name: str) -> None:
    """Every prompt is text or a list of chat messages, every reference text: else one line naming the
    row (counted from 1 in the file) and what it holds."""
    checks = [("prompt_field", cfg.prompt_field, lambda v: v is None or isinstance(v, str) or _is_message_list(v),
               "text or a list of chat messages {role, content}")]
    if cfg.reference_field is not None:
        checks.append(("reference_field", cfg.reference_field, lambda v: v is None or isinstance(v, str), "text"))
    for what, column, allowed, description in checks:
        for row, value in enumerate(dataset[column], start=1):
            if not allowed(value):
                raise UserError(f"{name}.{what}: row {row} of {_described(cfg.path)}: {column!r} is {_short(value)} "
                                f"({type(value).__name__}); it must be {description}")


def _non_empty(prompt) -> bool:
    if isinstance(prompt, str):
        return bool(prompt.strip())
    return isinstance(prompt, list) and len(prompt) > 0


def uses_chat_template(prompt, mode: str) -> bool:
    return mode == "always" or (mode == "auto" and isinstance(prompt, list))


def format_prompt(prompt, tokenizer, mode: str, name: str) -> str:
    """Prompt text as the model sees it: chat-templated when conversational (or `always`)."""
    conversational = isinstance(prompt, list)
    if not uses_chat_template(prompt, mode):
        if conversational:
            raise UserError(f"{name}.chat_template is 'never' but the prompts are chat messages")
        return prompt
    if tokenizer.chat_template is None:
        raise UserError(f"{name}: the prompts need a chat template and the tokenizer has none "
                        f"(set {name}.chat_template: never for plain-text prompts)")
    messages = prompt if conversational else [{"role": "user", "content": prompt}]
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a checkpoint's own (Jinja) template may raise on what it does not accept
        raise UserError(f"{name}: the tokenizer's chat template raised {exception_line(e)} on the prompt "
                        f"{_short(messages)}") from e


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class PromptSet:
    """Tokenised prompts of one or more tasks: `task[i]` is the index (in the run's task list) of prompt i,
    `columns[i]` its dataset row (every column, and the `columns` mapping's keywords: what reward functions read)."""

    ids: list[list[int]]
    texts: list[str]
    task: list[int]
    references: list[str | None]
    counts: dict[str, int] = field(default_factory=dict)  # truncated / dropped long prompts
    columns: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def column_names(self, task: int) -> set[str]:
        """The columns the rows of task `task` carry (the keywords its reward functions can be given)."""
        return set().union(*(c for c, t in zip(self.columns, self.task, strict=True) if t == task))

    def head(self, n: int | None) -> PromptSet:
        """The first `n` prompts (all with None)."""
        return PromptSet(self.ids[:n], self.texts[:n], self.task[:n], self.references[:n], self.counts,
                         self.columns[:n])

    def fingerprint(self) -> str:
        """sha256 of the tokenised prompts and their tasks: a resumed run must see the same data."""
        digest = hashlib.sha256()
        for ids, task in zip(self.ids, self.task, strict=True):
            digest.update(f"{task}:{','.join(map(str, ids))};".encode())
        return digest.hexdigest()

    @staticmethod
    def concat(sets: list[PromptSet]) -> PromptSet:
        counts = {k: sum(s.counts.get(k, 0) for s in sets) for k in ("truncated", "dropped")}
        return PromptSet([i for s in sets for i in s.ids], [t for s in sets for t in s.texts],
                         [k for s in sets for k in s.task], [r for s in sets for r in s.references], counts,
                         [c for s in sets for c in s.columns])


def leading_special_tokens(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text of its own accord (BOS for Llama-, Gemma- or
    Mistral-style tokenizers, nothing for GPT-2 or Qwen). What it would put after the text (an EOS) is
    left out: a prompt is not a finished sequence."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def build_prompt_set(cfg: DataConfig, tokenizer, task_index: int, name: str) -> PromptSet:
    """Load, format and tokenise; long prompts keep their last `max_prompt_length` tokens or are dropped.

    A chat-templated prompt holds the special tokens it needs in its text (templates write the BOS
    themselves) and is tokenised without adding any; a plain-text prompt gets the tokenizer's leading
    special tokens, as the model saw them in training. Truncation keeps the template whole (it cuts
    the start of the last message's content) and a plain prompt's leading special tokens; a chat
    prompt whose template alone is too long is dropped (counted).
    """
    rows = load_rows(cfg, name)
    prompts = [r[cfg.prompt_field] for r in rows]
    texts = [format_prompt(p, tokenizer, cfg.chat_template, name) for p in prompts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    plain_prefix = leading_special_tokens(tokenizer)
    limit = cfg.max_prompt_length
    kept = PromptSet([], [], [], [], {"truncated": 0, "dropped": 0}, [])
    for row, prompt, text, ids in zip(rows, prompts, texts, encoded, strict=True):
        templated = uses_chat_template(prompt, cfg.chat_template)
        prefix = [] if templated else plain_prefix
        if len(prefix) + len(ids) > limit:
            fitted = None
            if cfg.long_prompts == "truncate" and templated:
                fitted = _truncate_last_message(prompt, tokenizer, name, limit)
            elif cfg.long_prompts == "truncate":
                body = ids[len(ids) - (limit - len(prefix)):]
                fitted = tokenizer.decode(body), body
            if fitted is None:
                kept.counts["dropped"] += 1
                continue
            kept.counts["truncated"] += 1
            text, ids = fitted
        kept.ids.append(prefix + ids)
        kept.texts.append(text)
        kept.task.append(task_index)
        kept.references.append(row.get(cfg.reference_field) if cfg.reference_field else None)
        kept.columns.append({k: v for k, v in row.items() if k not in REWARD_ARGUMENTS})
    if not kept.ids:
        raise UserError(f"{name}: every prompt is longer than max_prompt_length={cfg.max_prompt_length} "
                        "and was dropped")
    return kept


def _truncate_last_message(prompt, tokenizer, name: str, limit: int) -> tuple[str, list[int]] | None:
    """A chat prompt cut to `limit` tokens by dropping the start of its last message's content, so that
    the template (system turn, role headers, generation prompt) stays whole; None if it cannot fit."""
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    content = tokenizer(messages[-1]["content"], add_special_tokens=False)["input_ids"]
    keep = len(content)
    while keep > 0:
        shortened = [*messages[:-1], {**messages[-1], "content": tokenizer.decode(content[len(content) - keep:])}]
        text = format_prompt(shortened, tokenizer, "auto", name)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text, ids
        keep -= len(ids) - limit  # re-tokenising at the cut can differ by a token: loop until it fits
    return None


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
