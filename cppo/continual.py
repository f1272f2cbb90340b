"""The task-sequence runner and the evaluation matrix (SPEC §1, §7).

For each task in order: a trainer starts from the previous task's policy and critic, with π_{t−1}
frozen as KL reference (and CPPO's KR anchor); it trains, saves `task_<i>_<name>/`, and then every
task's evaluation set is scored, appending a row to S. Row 0 is the initial model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import gather_object

from .checkpoint import (
    STATE,
    CheckpointWriter,
    checkpoints,
    failpoint,
    first_changed,
    prune,
    read_state,
    resolve_resume,
    tree_hashes,
    verify,
)
from .config import Config
from .config_loading import config_differences
from .cppo_trainer import trainer_class
from .data import PromptSet, build_prompt_set, left_pad
from .engine import request_seed
from .errors import UserError
from .memory import RolloutMemory
from .memory import build as build_memory
from .metrics import summarize
from .models import checkpoint_generation_config, load_frozen
from .outputs import OutputDir, replace_text, writing
from .regularizers import build_regularizer
from .rollout import generate, make_generation_config
from .session import Session, Stage, first_stage, open_session, task_prompts
from .trainer import PPOTrainer


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
        if ecfg.checkpoint_generation_config:
            sampling = _checkpoint_sampling(session.initial_policy)
        elif ecfg.greedy:
            sampling = {"do_sample": False}
        else:
            sampling = {"do_sample": True, "temperature": ecfg.temperature, "top_k": gcfg.top_k, "top_p": gcfg.top_p}
        self.generation_config = make_generation_config(
            session.stop_token_ids, session.tokenizer.pad_token_id,
            max_new_tokens=ecfg.max_new_tokens or gcfg.max_new_tokens, **sampling)
        self.engine_sampling = _engine_sampling(sampling) if ecfg.engine == "vllm" else None

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.session.config.tasks]

    @torch.no_grad()
    def evaluate(self, policy) -> dict[str, dict[str, float | None]]:
        """{task name: {"reward": mean score, "rouge_l": mean F1 or None}}; tasks without an
        evaluation set are left out. With `eval.engine: vllm`, `policy` None evaluates the engine's weights as
        built (π_0)."""
        acc, ecfg = self.session.accelerator, self.session.config.eval
        was_training = policy is not None and policy.training
        if policy is not None:
            policy.eval()
        results = {}
        if self.engine_sampling is not None:
            engine = self.session.vllm_engine()
            if policy is not None:
                engine.load(policy)
            else:
                engine.wake()
        for name, prompts in self.sets.items():
            mine = list(range(acc.process_index, len(prompts), acc.num_processes))
            rows, failure = [], None
            # The same seed for every row of the matrix: sampled evaluation compares like with like.
            with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
                torch.manual_seed(ecfg.seed + acc.process_index)
                try:
                    self._score_share(policy, name, prompts, mine, rows)
                except UserError as e:  # the user's reward code failed on this process's share
                    failure = e
            self.session.fail_together(failure)
            everything = sorted(gather_object(rows) if acc.num_processes > 1 else rows)
            scores = [score for _, score, _ in everything]
            bad = sum(not math.isfinite(score) for score in scores)
            if bad:
                raise UserError(f"evaluation of task {name!r}: {self.rewards[name]} returned a non-finite score "
                                f"for {bad} of {len(scores)} prompts")
            result = {"reward": sum(scores) / len(scores), "rouge_l": None}
            references = prompts.references
            if all(r is not None for r in references):
                result["rouge_l"] = rouge_l([c for _, _, c in everything], [references[i] for i, _, _ in everything])
            results[name] = result
        if self.engine_sampling is not None:
            self.session.vllm_engine().sleep()
        if policy is not None:
            policy.train(was_training)
        return results

    def _score_share(self, policy, name: str, prompts: PromptSet, mine: list[int], rows: list) -> None:
        """Generate for and score this process's evaluation prompts `mine`, appending (index, score,
        completion) to `rows`."""
        acc, tokenizer, ecfg = self.session.accelerator, self.session.tokenizer, self.session.config.eval
        for start in range(0, len(mine), ecfg.batch_size):
            chunk = mine[start:start + ecfg.batch_size]
            ids, mask = left_pad([prompts.ids[i] for i in chunk], tokenizer.pad_token_id)
            ids, mask = ids.to(acc.device), mask.to(acc.device)
            if self.engine_sampling is not None:
                # Greedy needs no seed; sampled evaluation seeds each prompt alike for every row of the matrix.
                seeds = None if self.engine_sampling["greedy"] else [
                    request_seed(ecfg.seed, f"eval/{name}", 0, i) for i in chunk]
                responses, response_mask, _, _ = self.session.vllm_engine().generate(
                    [prompts.ids[i] for i in chunk], seeds, max_new_tokens=self.generation_config.max_new_tokens,
                    stop_token_ids=self.session.stop_token_ids, pad_token_id=tokenizer.pad_token_id,
                    device=acc.device, **self.engine_sampling)
            else:
                with acc.autocast():
                    responses, response_mask, _ = generate(policy, ids, mask, self.generation_config,
                                                           self.session.stop_token_ids, tokenizer.pad_token_id,
                                                           len(chunk))
            completions = tokenizer.batch_decode(responses, skip_special_tokens=True)
            scores = self.rewards[name]([prompts.texts[i] for i in chunk], completions,
                                        torch.cat([ids, responses], 1), torch.cat([mask, response_mask], 1))
            rows.extend(zip(chunk, scores.tolist(), completions, strict=True))


def _engine_sampling(sampling: dict) -> dict:
    """transformers' decoding settings (ours, or a checkpoint's) as the vLLM engine's; one line for a
    checkpoint setting it cannot apply."""
    supported = {"do_sample", "temperature", "top_k", "top_p", "repetition_penalty"}
    unsupported = sorted(set(sampling) - supported)
    if unsupported:
        raise UserError(f"eval.engine: vllm cannot decode with the checkpoint's generation setting(s) "
                        f"{', '.join(unsupported)} (eval.checkpoint_generation_config: true); use eval.engine: hf")
    return {"greedy": not sampling.get("do_sample", False), "temperature": sampling.get("temperature", 1.0),
            "top_k": sampling.get("top_k", 0) or 0, "top_p": sampling.get("top_p", 1.0),
            "repetition_penalty": sampling.get("repetition_penalty", 1.0)}


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

    def write(self, session: Session) -> None:
        session.output.claim()
        if session.accelerator.is_main_process:
            with writing(self.path, "the evaluation matrix"):
                _write_json(self.path, self.to_dict())


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    replace_text(path, json.dumps(payload, indent=2) + "\n")


class Preempted(Exception):
    """SIGTERM or SIGINT arrived: the run saved a checkpoint and stops."""

    def __init__(self, checkpoint: Path):
        super().__init__(str(checkpoint))
        self.checkpoint = checkpoint


class Checkpointer:
    """Saves the run state every `save_steps`, at each task end, and when a stop signal arrives (the
    current step finishes first). Holds what the trainer does not: the evaluation matrix, the
    regulariser, the position in the task sequence."""

    def __init__(self, session: Session, matrix: EvalMatrix, regularizer, run_id: str,
                 memory: RolloutMemory | None = None):
        self.session, self.matrix, self.regularizer, self.run_id = session, matrix, regularizer, run_id
        self.memory = memory
        self.stage_index = 0
        self.final_stats: dict = {}
        self.stop_requested = False  # set by SIGTERM / SIGINT
        self.task_outputs: dict[str, str] = {}  # sha256 of each finished task's saved files (the main process's)

    @contextlib.contextmanager
    def signal_handlers(self):
        """SIGTERM and SIGINT ask for a stop at the end of the current step, while the run lasts."""
        def request_stop(signum, frame):
            if self.stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C stops at once
            self.stop_requested = True

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _stop_everywhere(self) -> bool:
        """Whether any process was asked to stop (all processes must save and leave together)."""
        acc = self.session.accelerator
        flag = torch.tensor([float(self.stop_requested)], device=acc.device)
        return bool(acc.reduce(flag, reduction="max").item()) if acc.num_processes > 1 else self.stop_requested

    def after_step(self, trainer: PPOTrainer) -> None:
        config = self.session.config
        stop = self._stop_everywhere()
        if stop or (config.save_steps > 0 and trainer.global_step % config.save_steps == 0):
            path = self.save(trainer.global_step, trainer=trainer)
            if stop:
                raise Preempted(path)

    def save(self, global_step: int, trainer: PPOTrainer | None = None, finished: Path | None = None) -> Path:
        """A checkpoint; `finished`: the directory of the task that has just ended, whose saved files (which
        the next task starts from) are hashed into it."""
        acc = self.session.accelerator
        config = self.session.config
        self.session.output.claim()
        if finished is not None and acc.is_main_process:
            self.task_outputs.update(tree_hashes(finished, Path(config.output_dir)))
        writer = CheckpointWriter(acc, config.output_dir, global_step)
        with writing(writer.final, "checkpoint"), writer as directory:
            state = {"global_step": global_step, "stage_index": self.stage_index,
                     "stage_complete": finished is not None,
                     "matrix": {"row_names": self.matrix.row_names, "rows": self.matrix.rows},
                     "run_id": self.run_id, "final_stats": self.final_stats, "config": config.to_dict(),
                     "task_outputs": self.task_outputs}
            if trainer is not None:
                state["trainer"] = trainer.save_state(directory)
            if acc.is_main_process:
                if self.regularizer is not None:
                    torch.save(self.regularizer.state_dict(), directory / "regularizer.pt")
                if self.memory is not None:  # its entries, and its generator's place (it moves every step)
                    torch.save(self.memory.state_dict(), directory / "memory.pt")
                (directory / STATE).write_text(json.dumps(state, indent=1))
        if acc.is_main_process:
            prune(config.output_dir, config.save_total_limit)
        acc.wait_for_everyone()
        return writer.final


def run(config: Config, resume: str | None = None, force: bool = False, overwrite: bool = False) -> dict:
    """Train the configured task stream and evaluate after each task; returns the summary.

    `resume`: "auto" (the newest valid checkpoint in output_dir) or a checkpoint directory. Without it,
    a non-empty output_dir is refused unless `overwrite` (cppo.outputs).
    """
    output = OutputDir(config.output_dir, resume is not None, overwrite)
    output.check(config.inputs())
    try:
        return _run(config, output, resume, force)
    except UserError as e:
        e.output_dir = output.path if output.claimed else None  # where the error log goes (cli)
        raise


def _run(config: Config, output: OutputDir, resume: str | None, force: bool) -> dict:
    session = open_session(config, output)
    acc, out = session.accelerator, Path(config.output_dir)
    checkpoint = resolve_resume(resume, out) if resume else None
    state = read_state(checkpoint) if checkpoint else None
    if state is not None:
        _check_resumable(state, config, checkpoint, force)
        _check_task_outputs(state, out, checkpoint)
    # Every data file is read and tokenised before any model loads: bad data fails in seconds.
    prompt_sets = [task_prompts(session, i) for i in range(len(config.tasks))]
    evaluator = Evaluator(session)
    matrix = EvalMatrix(evaluator.task_names, out / "eval_matrix.json",
                        config.eval_reward.model or config.eval_reward.function if config.eval_reward else None)
    regularizer = build_regularizer(config)
    # A run started by `wandb agent` must log under the id the sweep gave it, or the sweep never sees it.
    run_id = state["run_id"] if state else os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12]
    session.tracker.resume(run_id, state["global_step"] if state else None)
    memory = RolloutMemory(config.memory, config.seed) if config.uses_memory else None
    checkpointer = Checkpointer(session, matrix, regularizer, run_id, memory)
    if state is not None:
        matrix.row_names, matrix.rows = state["matrix"]["row_names"], state["matrix"]["rows"]
        checkpointer.final_stats = state["final_stats"]
        checkpointer.task_outputs = dict(state.get("task_outputs", {}))
        if regularizer is not None and (checkpoint / "regularizer.pt").is_file():
            regularizer.load_state_dict(torch.load(checkpoint / "regularizer.pt", weights_only=False))
        if memory is not None:
            memory.load_state_dict(torch.load(checkpoint / "memory.pt", weights_only=False))
    elif evaluator.sets and config.eval.engine == "vllm":
        matrix.append("initial", evaluator.evaluate(None))  # the engine is built from π_0: nothing to load
    elif evaluator.sets:
        initial = load_frozen("AutoModelForCausalLM", session.initial_policy, config.model,
                              session.tokenizer.pad_token_id)
        initial = session.backend.place_frozen(initial)
        matrix.append("initial", evaluator.evaluate(initial))
        del initial
    last_dir = None
    with checkpointer.signal_handlers():
        try:
            for index, stage in enumerate(stages(session, prompt_sets)):
                checkpointer.stage_index, last_dir = index, stage.output_dir
                if state is not None and (index < state["stage_index"] or
                                          (index == state["stage_index"] and state["stage_complete"])):
                    continue  # trained before the checkpoint
                trainer = trainer_class(config)(session, stage, regularizer, memory)
                if state is not None and index == state["stage_index"]:
                    trainer.load_state(checkpoint, state["trainer"], force)
                checkpointer.final_stats = trainer.train(checkpointer.after_step)
                if regularizer is not None:
                    regularizer.task_end(trainer)
                if memory is not None and index + 1 < len(config.tasks):
                    remember(trainer, memory, index)
                if evaluator.sets:
                    with session.backend.whole(trainer.model) as model:
                        matrix.append(f"after {stage.name}", evaluator.evaluate(model.policy))
                    matrix.write(session)
                    session.tracker.log_evaluation(matrix.rows[-1], trainer.global_step)
                failpoint(f"task_end:{stage.name}")
                checkpointer.save(trainer.global_step, finished=stage.output_dir)
                trainer.close()
                del trainer
        except Preempted as stop:
            if acc.is_main_process:
                print(f"stopped by a signal; checkpoint {stop.checkpoint}. Resume with: "
                      f"cppo train <config> --resume", file=sys.stderr, flush=True)
            session.tracker.finish(session.engine)
            return {"preempted": str(stop.checkpoint), "final_stats": checkpointer.final_stats}
    summary = {"final_stats": checkpointer.final_stats, **matrix.summary()}
    output.claim()
    if acc.is_main_process:
        with writing(out, "the final models' links and summary.json in"):
            _link_final(out, last_dir)
            _write_json(out / "summary.json", summary)
        if evaluator.sets:
            print(format_table(matrix), flush=True)
    session.tracker.log_summary(summary)
    acc.wait_for_everyone()
    session.tracker.finish(session.engine)
    return summary


def remember(trainer: PPOTrainer, memory: RolloutMemory, task_index: int) -> None:
    """SPEC §8 build and update at the end of a task that another follows; the memory is written beside the
    task's models (memory.jsonl) and its sizes go to the trackers."""
    session, config = trainer.session, trainer.config
    entries, stats = build_memory(trainer, task_index, config.memory, config.cppo, config.seed)
    stats["memory/evicted"] = float(memory.add(entries))
    names = [t.name for t in config.tasks]
    stats["memory/size"] = float(len(memory))
    stats.update({f"memory/size/{names[task]}": float(n) for task, n in memory.task_counts().items()})
    session.output.claim()
    if session.accelerator.is_main_process:
        path = trainer.stage.output_dir / "memory.jsonl"
        with writing(path, "the rollout memory"):
            memory.write_jsonl(path, session.tokenizer, names)
        print(f"cppo: memory after {trainer.stage.name!r}: kept {stats['memory/kept']:.0f} of "
              f"{stats['memory/built']:.0f} responses in {stats['memory/build_s']:.1f} s; holds "
              + ", ".join(f"{names[t]} {n}" for t, n in memory.task_counts().items()), file=sys.stderr, flush=True)
        if not entries:
            print(f"cppo: warning: the memory keeps nothing of task {trainer.stage.name!r}: no response passed "
                  f"memory.select: {config.memory.select} (mean reward {stats['memory/build_reward_mean']:.4g}; "
                  "rewards near their maximum leave nothing above μ_R + kσ_R); select: all keeps every response",
                  file=sys.stderr, flush=True)
    session.tracker.log_extra(stats, trainer.global_step)


def _check_task_outputs(state: dict, out: Path, checkpoint: Path) -> None:
    """The finished tasks' saved files the resumed run reads (π_{t−1}, the critic it starts from, the memory)
    are those they saved: a changed one is refused, naming it and any older checkpoint that does not need it."""
    problem = first_changed(state.get("task_outputs", {}), out)
    if problem is None:
        return
    older = [c for c in checkpoints(out) if c.name < checkpoint.name and verify(c) is None
             and first_changed(read_state(c).get("task_outputs", {}), out) is None]
    fallback = (f"; the newest checkpoint that does not read it is {older[-1]} (`--resume {older[-1]}` continues "
                "from there)") if older else "; no older checkpoint does without it"
    raise UserError(f"{out}: {problem} (checkpoint {checkpoint.name} resumes from that task's saved files); "
                    f"restore it{fallback}")


def _check_resumable(state: dict, config: Config, checkpoint: Path, force: bool) -> None:
    differing = config_differences(state["config"], config.to_dict())
    if not differing:
        return
    message = f"the config differs from the one of {checkpoint} in: {', '.join(differing)}"
    if not force:
        raise UserError(f"{message}; resuming would not continue the same run (--force resumes anyway)")
    warnings.warn(f"{message}; resuming anyway (--force)", stacklevel=2)


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
            needs_anchor = (config.algo == "cppo" and config.cppo.kr_anchor == "previous_task"
                            and config.cppo.kr_source != "memory") or \
                config.continual.regularizer == "lwf"
            stage = Stage(name=task.name, prompts=prompt_sets[index],
                          reward_configs=[t.reward for t in tasks], steps=task.budget(config.ppo), policy=policy,
                          value_model=str(previous / "value_model") if config.uses_critic else None,
                          reference=reference,
                          anchor=policy if needs_anchor and reference != policy else None,
                          output_dir=out / f"task_{index + 1}_{task.name}",
                          step_offset=stage.step_offset + stage.steps)
        yield stage


def _link_final(out: Path, last_dir: Path) -> None:
    """`output_dir/policy` and `output_dir/value_model` (with a critic): the final models, as links into the last
    stage."""
    for name in ("policy", "value_model"):
        link = out / name
        if link.is_symlink():
            link.unlink()
        elif link.exists():  # a real directory, saved there directly: leave it
            continue
        if (last_dir / name).is_dir():
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
