"""The task-sequence runner (docs/algorithm.md §1, §7).

For each task in order: a trainer starts from the previous task's policy and critic, with π_{t−1}
frozen as KL reference (and CPPO's KR anchor); it trains, saves `task_<i>_<name>/`, and then every
task's evaluation set is scored, appending a row to S. Row 0 is the initial model.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import uuid
import warnings
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint import (
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
from ..config import Config
from ..config_loading import config_differences
from ..cppo_trainer import trainer_class
from ..data import PromptSet
from ..errors import UserError
from ..memory import RolloutMemory
from ..memory import build as build_memory
from ..outputs import OutputDir, writing
from ..session import Session, Stage, first_stage, open_session, task_prompts
from ..trainer import PPOTrainer
from .evaluation import EvalMatrix, Evaluator, format_table, write_json
from .regularizers import build_regularizer


def build_trainer(config: Config) -> PPOTrainer:
    """A trainer for the first task alone, from the configured models (tests, benchmarks, notebooks)."""
    session = open_session(config)
    return trainer_class(config)(session, first_stage(session), build_regularizer(config, session.backend))


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

    def restore(self, checkpoint: Path, state: dict) -> None:
        """What a resumed run takes back from `checkpoint`: the matrix so far, the last stats, the finished
        tasks' hashes, the regulariser's importance and the rollout memory."""
        self.matrix.row_names, self.matrix.rows = state["matrix"]["row_names"], state["matrix"]["rows"]
        self.final_stats = state["final_stats"]
        self.task_outputs = dict(state.get("task_outputs", {}))
        if self.regularizer is not None and (checkpoint / "regularizer.pt").is_file():
            self.regularizer.load_state_dict(torch.load(checkpoint / "regularizer.pt", weights_only=False))
        if self.memory is not None:
            self.memory.load_state_dict(torch.load(checkpoint / "memory.pt", weights_only=False))

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
    regularizer = build_regularizer(config, session.backend)
    out = Path(config.output_dir)
    checkpoint = resolve_resume(resume, out) if resume else None
    state = read_state(checkpoint) if checkpoint else None
    if state is not None:
        _check_resumable(state, config, checkpoint, force)
        _check_task_outputs(state, out, checkpoint)
    # Every data file is read and tokenised before any model loads: bad data fails in seconds.
    prompt_sets = [task_prompts(session, i) for i in range(len(config.tasks))]
    for i, (task, prompts) in enumerate(zip(config.tasks, prompt_sets, strict=True)):
        session.rewards.check_arguments(task.rewards, prompts.column_names(i), f"tasks[{i}].reward",
                                        f"tasks[{i}].prompts")
    evaluator = Evaluator(session)
    eval_reward = None if config.eval_rewards is None else " + ".join(
        r.model or r.function for r in config.eval_rewards)
    matrix = EvalMatrix(evaluator.task_names, out / "eval_matrix.json", eval_reward)
    # A run started by `wandb agent` must log under the id the sweep gave it, or the sweep never sees it.
    run_id = state["run_id"] if state else os.environ.get("WANDB_RUN_ID") or uuid.uuid4().hex[:12]
    session.tracker.resume(run_id, state["global_step"] if state else None)
    memory = RolloutMemory(config.memory, config.seed) if config.uses_memory else None
    checkpointer = Checkpointer(session, matrix, regularizer, run_id, memory)
    if state is not None:
        checkpointer.restore(checkpoint, state)
    elif evaluator.sets:
        matrix.append("initial", evaluator.evaluate_initial())
    with checkpointer.signal_handlers():
        try:
            last_dir = _train_stages(session, prompt_sets, evaluator, checkpointer, checkpoint, state, force)
        except Preempted as stop:
            if session.accelerator.is_main_process:
                print(f"stopped by a signal; checkpoint {stop.checkpoint}. Resume with: "
                      f"cppo train <config> --resume", file=sys.stderr, flush=True)
            session.close()
            return {"preempted": str(stop.checkpoint), "final_stats": checkpointer.final_stats}
    return _finish(session, output, checkpointer, evaluator, last_dir)


def _train_stages(session: Session, prompt_sets: list[PromptSet], evaluator: Evaluator, checkpointer: Checkpointer,
                  checkpoint: Path | None, state: dict | None, force: bool) -> Path:
    """Train, evaluate and checkpoint every stage the checkpoint (if any) has not finished; returns the last
    stage's directory."""
    config = session.config
    regularizer, memory, matrix = checkpointer.regularizer, checkpointer.memory, checkpointer.matrix
    extra = {"memory": memory} if memory is not None else {}  # only CPPO keeps a rollout memory
    last_dir = None
    for index, stage in enumerate(stages(session, prompt_sets)):
        checkpointer.stage_index, last_dir = index, stage.output_dir
        if state is not None and (index < state["stage_index"] or
                                  (index == state["stage_index"] and state["stage_complete"])):
            continue  # trained before the checkpoint
        trainer = trainer_class(config)(session, stage, regularizer, **extra)
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
    return last_dir


def _finish(session: Session, output: OutputDir, checkpointer: Checkpointer, evaluator: Evaluator,
            last_dir: Path) -> dict:
    """The run's summary.json, links to the final models and the matrix's table; then the session closes."""
    acc, out, matrix = session.accelerator, Path(session.config.output_dir), checkpointer.matrix
    summary = {"final_stats": checkpointer.final_stats, **matrix.summary()}
    output.claim()
    if acc.is_main_process:
        with writing(out, "the final models' links and summary.json in"):
            _link_final(out, last_dir)
            write_json(out / "summary.json", summary)
        if evaluator.sets:
            print(format_table(matrix), flush=True)
    session.tracker.log_summary(summary)
    session.close()
    return summary


def remember(trainer: PPOTrainer, memory: RolloutMemory, task_index: int) -> None:
    """docs/algorithm.md §8 build and update at the end of a task that another follows; the memory is written beside the
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
                          reward_configs=[t.rewards for t in tasks], steps=task.budget(config.ppo), policy=policy,
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


