"""The task-sequence runner and the evaluation matrix (SPEC §1, §7).

For each task in order: a trainer starts from the previous task's policy and critic, with π_{t−1}
frozen as KL reference (and CPPO's KR anchor); it trains, saves `task_<i>_<name>/`, and then every
task's evaluation set is scored, appending a row to S. Row 0 is the initial model.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import gather_object

from .config import Config
from .data import PromptSet, build_prompt_set, left_pad
from .metrics import summarize
from .models import load_frozen
from .regularizers import build_regularizer
from .rollout import generate, make_generation_config
from .session import Session, Stage, first_stage, open_session, task_prompts
from .trainer import PPOTrainer, trainer_class


def build_trainer(config: Config) -> PPOTrainer:
    """A trainer for the first task alone, from the configured models (tests, benchmarks, notebooks)."""
    session = open_session(config)
    return trainer_class(config)(session, first_stage(session), build_regularizer(config))


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
            if config.eval.max_prompts is not None:
                prompts = PromptSet(*(getattr(prompts, f)[:config.eval.max_prompts]
                                      for f in ("ids", "texts", "task", "references")), prompts.counts)
            self.sets[task.name] = prompts
            self.rewards[task.name] = session.rewards.get(config.eval_reward or task.reward)
        ecfg, gcfg = config.eval, config.generation
        sampling = {} if ecfg.greedy else {"temperature": ecfg.temperature, "top_k": gcfg.top_k, "top_p": gcfg.top_p}
        self.generation_config = make_generation_config(
            session.stop_token_id, session.tokenizer.pad_token_id, do_sample=not ecfg.greedy,
            max_new_tokens=ecfg.max_new_tokens or gcfg.max_new_tokens, **sampling)

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.session.config.tasks]

    @torch.no_grad()
    def evaluate(self, policy) -> dict[str, dict[str, float | None]]:
        """{task name: {"reward": mean score, "rouge_l": mean F1 or None}}; tasks without an
        evaluation set are left out."""
        acc, tokenizer, ecfg = self.session.accelerator, self.session.tokenizer, self.session.config.eval
        was_training = policy.training
        policy.eval()
        results = {}
        for name, prompts in self.sets.items():
            mine = list(range(acc.process_index, len(prompts), acc.num_processes))
            rows = []
            # The same seed for every row of the matrix: sampled evaluation compares like with like.
            with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
                torch.manual_seed(ecfg.seed + acc.process_index)
                for start in range(0, len(mine), ecfg.batch_size):
                    chunk = mine[start:start + ecfg.batch_size]
                    ids, mask = left_pad([prompts.ids[i] for i in chunk], tokenizer.pad_token_id)
                    ids, mask = ids.to(acc.device), mask.to(acc.device)
                    with acc.autocast():
                        responses, response_mask, _ = generate(policy, ids, mask, self.generation_config,
                                                               self.session.stop_token_id, tokenizer.pad_token_id,
                                                               len(chunk))
                    completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
                    scores = self.rewards[name]([prompts.texts[i] for i in chunk], completions,
                                                torch.cat([ids, responses], 1), torch.cat([mask, response_mask], 1))
                    rows.extend(zip(chunk, scores.tolist(), completions, strict=True))
            everything = sorted(gather_object(rows) if acc.num_processes > 1 else rows)
            scores = [score for _, score, _ in everything]
            result = {"reward": sum(scores) / len(scores), "rouge_l": None}
            references = prompts.references
            if all(r is not None for r in references):
                result["rouge_l"] = rouge_l([c for _, _, c in everything], [references[i] for i, _, _ in everything])
            results[name] = result
        policy.train(was_training)
        return results


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
        return {"tasks": self.task_names, "rows": self.row_names, "eval_reward": self.eval_reward,
                "scores": {kind: self.scores(kind) for kind in kinds}}

    def summary(self) -> dict:
        """SPEC §7 metrics per score kind, over the tasks that have an evaluation set."""
        columns = self.evaluated_tasks()
        out = {}
        for kind, matrix in self.to_dict()["scores"].items():
            kept = [[row[j] for j in columns] for row in matrix]
            if columns and all(v is not None for row in kept for v in row):
                out[kind] = summarize(kept)
        return out

    def write(self, accelerator) -> None:
        if accelerator.is_main_process:
            _write_json(self.path, self.to_dict())


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(temporary, path)


def run(config: Config) -> dict:
    """Train the configured task stream and evaluate after each task; returns the summary."""
    session = open_session(config)
    acc, out = session.accelerator, Path(config.output_dir)
    # Every data file is read and tokenised before any model loads: bad data fails in seconds.
    prompt_sets = [task_prompts(session, i) for i in range(len(config.tasks))]
    evaluator = Evaluator(session)
    matrix = EvalMatrix(evaluator.task_names, out / "eval_matrix.json",
                        config.eval_reward.model or config.eval_reward.function if config.eval_reward else None)
    if evaluator.sets:
        initial = load_frozen("AutoModelForCausalLM", session.initial_policy, config.model,
                              session.tokenizer.pad_token_id).to(acc.device)
        matrix.append("initial", evaluator.evaluate(initial))
        del initial
    regularizer = build_regularizer(config)
    last_dir = None
    for stage in stages(session, prompt_sets):
        trainer = trainer_class(config)(session, stage, regularizer)
        final_stats = trainer.train()
        if regularizer is not None:
            regularizer.task_end(trainer)
        if evaluator.sets:
            matrix.append(f"after {stage.name}", evaluator.evaluate(trainer.unwrapped.policy))
            matrix.write(acc)
            session.tracker.log_evaluation(matrix.rows[-1], stage.step_offset + stage.steps)
        last_dir = stage.output_dir
        del trainer
    summary = {"final_stats": final_stats, **matrix.summary()}
    if acc.is_main_process:
        _link_final(out, last_dir)
        _write_json(out / "summary.json", summary)
        if evaluator.sets:
            print(format_table(matrix), flush=True)
    acc.wait_for_everyone()
    session.tracker.finish()
    return summary


def stages(session: Session, prompt_sets: list[PromptSet]):
    """The training stages, built one at a time (each starts from where the previous one saved)."""
    config = session.config
    out = Path(config.output_dir)
    tasks = config.tasks
    if config.continual.schedule == "joint":
        # Multi-task PPO on the union of the tasks, each prompt scored by its own task's reward.
        first = first_stage(session, prompts=prompt_sets[0])
        prompts = PromptSet.concat(prompt_sets)
        yield replace(first, name="joint", prompts=prompts, steps=sum(t.budget(config.ppo) for t in tasks),
                      output_dir=out / "joint")
        return
    stage = first_stage(session, out / f"task_1_{tasks[0].name}", prompt_sets[0])
    for index, task in enumerate(tasks):
        if index > 0:
            previous = stage.output_dir
            policy = str(previous / "policy")
            reference = session.initial_policy if config.algo == "cppo" and \
                config.cppo.kl_reference == "initial" else policy
            needs_anchor = (config.algo == "cppo" and config.cppo.kr_anchor == "previous_task") or \
                config.continual.regularizer == "lwf"
            stage = Stage(name=task.name, prompts=prompt_sets[index],
                          reward_configs=[t.reward for t in tasks], steps=task.budget(config.ppo), policy=policy,
                          value_model=str(previous / "value_model"), reference=reference,
                          anchor=policy if needs_anchor and reference != policy else None,
                          output_dir=out / f"task_{index + 1}_{task.name}",
                          step_offset=stage.step_offset + stage.steps)
        yield stage


def _link_final(out: Path, last_dir: Path) -> None:
    """`output_dir/policy` and `output_dir/value_model`: the final models, as links into the last stage."""
    for name in ("policy", "value_model"):
        link = out / name
        if link.is_symlink() or link.exists():
            if link.is_symlink():
                link.unlink()
            else:
                continue
        link.symlink_to(Path(last_dir.name) / name, target_is_directory=True)


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
