"""Evaluation of a continual run (docs/algorithm.md §7): every task's evaluation set scored by a policy (`Evaluator`),
one row of the evaluation matrix S per evaluation (`EvalMatrix`), and S as a text table."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import gather_object

from ..data import PromptSet, build_prompt_set, left_pad
from ..engine import SeedKey
from ..errors import UserError
from ..models import checkpoint_generation_config, load_frozen
from ..outputs import replace_text, writing
from ..rewards import RewardBatch
from ..rollout import Sequences
from ..session import Session, announce_long_prompts
from .metrics import summarize


class Evaluator:
    """Scores a policy on every task's evaluation prompts: the mean raw score of the evaluation reward
    (`eval_reward`, else the task's own) and, where references exist, ROUGE-L F1."""

    def __init__(self, session: Session):
        self.session = session
        config = session.config
        self.sets: dict[str, PromptSet] = {}
        self.rewards = {}
        for index, task in enumerate(config.tasks):
            if task.eval_prompts is None:
                continue
            prompts = build_prompt_set(task.eval_prompts, session.tokenizer, index, f"tasks[{index}].eval_prompts")
            announce_long_prompts(session, prompts, task.eval_prompts, f"tasks[{index}].eval_prompts")
            prompts = prompts.head(config.eval.max_prompts)
            self.sets[task.name] = prompts
            sources = config.eval_rewards or task.rewards
            session.rewards.check_arguments(sources, prompts.column_names(index),
                                            "eval_reward" if config.eval_rewards else f"tasks[{index}].reward",
                                            f"tasks[{index}].eval_prompts")
            self.rewards[task.name] = session.rewards.task_reward(sources)
        ecfg, gcfg = config.eval, config.generation
        if ecfg.checkpoint_generation_config:
            sampling = _checkpoint_sampling(session.initial_policy)
        elif ecfg.greedy:
            sampling = {"do_sample": False}
        else:
            sampling = {"do_sample": True, "temperature": ecfg.temperature, "top_k": gcfg.top_k, "top_p": gcfg.top_p}
        self.engine = session.engine("eval")
        self.decoding = self.engine.decoding(sampling, ecfg.max_new_tokens or gcfg.max_new_tokens, "eval.engine")

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.session.config.tasks]

    def evaluate_initial(self) -> dict[str, dict[str, float | None]]:
        """The evaluation of π_0 (row 0 of S): the engine's own weights when it was built from π_0 (nothing to
        load), else a frozen copy of π_0 loaded for it."""
        session = self.session
        if self.engine.holds == session.initial_policy:
            return self.evaluate(None)
        initial = load_frozen("AutoModelForCausalLM", session.initial_policy, session.config.model,
                              session.tokenizer.pad_token_id)
        return self.evaluate(session.backend.place_frozen(initial))

    @torch.no_grad()
    def evaluate(self, policy) -> dict[str, dict[str, float | None]]:
        """{task name: {"reward": mean score, "rouge_l": mean F1 or None}}; tasks without an
        evaluation set are left out. `policy` None evaluates the engine's weights as built (`engine.holds`)."""
        was_training = policy is not None and policy.training
        results = {}
        if policy is not None:
            policy.eval()
            self.engine.load(policy)
        try:
            for name, prompts in self.sets.items():
                results[name] = self._evaluate_task(name, prompts)
        finally:
            self.engine.release()
        if policy is not None:
            policy.train(was_training)
        return results

    def _evaluate_task(self, name: str, prompts: PromptSet) -> dict[str, float | None]:
        acc, ecfg = self.session.accelerator, self.session.config.eval
        mine = list(range(acc.process_index, len(prompts), acc.num_processes))
        rows, failure = [], None
        # The same seed for every row of the matrix: sampled evaluation compares like with like.
        with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
            torch.manual_seed(ecfg.seed + acc.process_index)
            try:
                self._score_share(name, prompts, mine, rows)
            except UserError as e:  # the user's reward code failed on this process's share
                failure = e
        self.session.fail_together(failure)
        everything = sorted(gather_object(rows) if acc.num_processes > 1 else rows)
        reward = self.rewards[name]
        raw = torch.tensor([scores for _, scores, _ in everything], dtype=torch.float32)  # (prompts, sources)
        bad = int((~torch.isfinite(raw)).any(-1).sum())
        if bad:
            raise UserError(f"evaluation of task {name!r}: {reward} returned a non-finite score "
                            f"for {bad} of {len(raw)} prompts")
        result = {"reward": reward.total(raw).mean().item(), "rouge_l": None}
        if len(reward.sources) > 1:  # each source's mean raw score beside the weighted sum's
            result.update({f"reward/{n}": raw[:, k].mean().item() for k, n in enumerate(reward.names)})
        references = prompts.references
        if all(r is not None for r in references):
            result["rouge_l"] = rouge_l([c for _, _, c in everything], [references[i] for i, _, _ in everything])
        return result

    def _score_share(self, name: str, prompts: PromptSet, mine: list[int], rows: list) -> None:
        """Generate for and score this process's evaluation prompts `mine`, appending (index, score,
        completion) to `rows`. An engine that seeds each response seeds it by its prompt, alike for every row
        of the matrix."""
        acc, tokenizer, ecfg = self.session.accelerator, self.session.tokenizer, self.session.config.eval
        for start in range(0, len(mine), ecfg.batch_size):
            chunk = mine[start:start + ecfg.batch_size]
            generated = self.engine.generate([prompts.ids[i] for i in chunk], self.decoding,
                                             SeedKey(ecfg.seed, f"eval/{name}", 0, tuple(chunk)))
            ids, mask = left_pad([prompts.ids[i] for i in chunk], tokenizer.pad_token_id)
            sequences = Sequences(ids.to(acc.device), mask.to(acc.device), generated.response_ids,
                                generated.response_mask)
            batch = RewardBatch.of(prompts, chunk, tokenizer, sequences, ids.shape[1])
            scores = self.rewards[name](batch)
            rows.extend(zip(chunk, scores.tolist(), batch.completions, strict=True))


def _checkpoint_sampling(source: str) -> dict:
    """The decoding settings of a checkpoint's generation_config.json, without its token ids and lengths
    (the run's stop token and `max_new_tokens` apply)."""
    checkpoint = checkpoint_generation_config(source)
    if checkpoint is None:
        return {}
    # Token ids, lengths and the shape of generate's output stay ours; the rest is how to decode.
    ours = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "max_length", "max_new_tokens",
            "transformers_version", "return_dict_in_generate", "num_return_sequences"}
    return {k: v for k, v in checkpoint.to_diff_dict().items()
            if k not in ours and not k.startswith(("_", "output_"))}


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (Google's `rouge-score`, with stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references,
                                                                               strict=True)) / len(predictions)


class EvalMatrix:
    """S per score kind, one row per evaluation; written to eval_matrix.json after every row."""

    def __init__(self, task_names: list[str], path: Path, eval_reward: str | None):
        self.task_names, self.path, self.eval_reward = task_names, path, eval_reward
        self.row_names: list[str] = []
        self.rows: list[dict[str, dict]] = []

    def append(self, row_name: str, results: dict[str, dict]) -> None:
        self.row_names.append(row_name)
        self.rows.append(results)

    def scores(self, kind: str) -> list[list[float | None]]:
        return [[row.get(name, {}).get(kind) for name in self.task_names] for row in self.rows]

    def evaluated_tasks(self) -> list[int]:
        return [j for j, name in enumerate(self.task_names) if self.rows and name in self.rows[0]]

    def to_dict(self) -> dict:
        kinds = ["reward"] + (["rouge_l"] if any(r.get("rouge_l") is not None for row in self.rows
                                                 for r in row.values()) else [])
        kinds += sorted({k for row in self.rows for r in row.values() for k in r if k.startswith("reward/")})
        return {"tasks": self.task_names, "rows": self.row_names, "eval_reward": self.eval_reward,
                "scores": {kind: self.scores(kind) for kind in kinds}}

    def summary(self) -> dict:
        """docs/algorithm.md §7 metrics per score kind, over the tasks that have an evaluation set."""
        columns = self.evaluated_tasks()
        out = {}
        for kind, matrix in self.to_dict()["scores"].items():
            kept = [[row[j] for j in columns] for row in matrix]
            if columns and all(v is not None for row in kept for v in row):
                out[kind] = summarize(kept)
        return out

    def write(self, session: Session) -> None:
        session.output.claim()
        if session.accelerator.is_main_process:
            with writing(self.path, "the evaluation matrix"):
                write_json(self.path, self.to_dict())


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(payload, indent=2) + "\n")


def format_table(matrix: EvalMatrix) -> str:
    """S (reward) as a text table, then the summary metrics."""
    names = matrix.task_names
    width = max(12, *(len(n) for n in names))
    lines = ["evaluation matrix S (mean eval reward; rows: after training, columns: evaluated task)",
             f"{'':<{width + 8}}" + "".join(f"{n:>{width}}" for n in names)]
    for row_name, row in zip(matrix.row_names, matrix.scores("reward"), strict=True):
        cells = "".join(f"{'-':>{width}}" if v is None else f"{v:>{width}.4f}" for v in row)
        lines.append(f"{row_name:<{width + 8}}{cells}")
    for kind, metrics in matrix.summary().items():
        shown = ", ".join(f"{k} {v:+.4f}" if v is not None else f"{k} -" for k, v in metrics.items())
        lines.append(f"{kind}: {shown}")
    return "\n".join(lines)
