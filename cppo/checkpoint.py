"""Atomic save and verified load of the whole run state.

A checkpoint is a directory `output_dir/checkpoints/step_<global step>/`:

  trainable.safetensors   the trainable weights: policy (or its LoRA adapters) and critic
  optimizer.pt            AdamW state;  scheduler.pt: the LR schedule
  rng_<rank>.pt           python / numpy / torch (and CUDA) RNG states and the shuffle generator, per process
  regularizer.pt          the continual baseline's state (EWC/MAS importance, ...)
  state.json              steps, task position, data position and fingerprint, KL coefficient, score
                          moments, the evaluation matrix so far, the tracker's run id, the resolved config
  deepspeed/, fsdp/       instead of the first two under DeepSpeed / FSDP2: every process's shard
  manifest.json           sha256 of every other file (subdirectories included), written last

It is written into a temporary directory, fsynced, and renamed into place, so a kill leaves either
the whole checkpoint or none. Loading verifies every hash; the newest checkpoint that verifies wins.
The frozen π_{t−1} is not stored: `state.json` names the previous task's saved policy directory and holds the
sha256 of every file each finished task saved (its policy, critic and memory), verified before a resume reads them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

MANIFEST = "manifest.json"
STATE = "state.json"
_PREFIX = "step_"


def failpoint(name: str) -> None:
    """Testing aid: SIGKILL this process at the point named by $CPPO_FAILPOINT (e.g. `step:5:mid`),
    to check that a run killed there resumes exactly. A no-op unless the variable names this point."""
    if os.environ.get("CPPO_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state(shuffle_generator: torch.Generator) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "shuffle": shuffle_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, shuffle_generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    shuffle_generator.set_state(state["shuffle"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriter:
    """Writes one checkpoint from every process: the main process writes the shared files, each
    process its RNG state; the main process then hashes, fsyncs and renames."""

    def __init__(self, accelerator, output_dir: str | Path, step: int):
        self.accelerator = accelerator
        self.root = checkpoint_root(output_dir)
        self.final = self.root / f"{_PREFIX}{step:08d}"
        # Every process must agree on the staging directory: its name depends on the step only.
        self.staging = self.root / f".staging-{_PREFIX}{step:08d}"

    def __enter__(self) -> Path:
        if self.accelerator.is_main_process:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        return self.staging

    def __exit__(self, kind, value, traceback) -> None:
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            try:
                if kind is None:
                    self._publish()
            finally:
                shutil.rmtree(self.staging, ignore_errors=True)  # after a failed write: no half checkpoint left
        self.accelerator.wait_for_everyone()

    def _publish(self) -> None:
        # Sharded back ends write each process's shard into a subdirectory (deepspeed/, fsdp/): hashed too.
        files = sorted(p for p in self.staging.rglob("*") if p.is_file())
        for path in files:
            _fsync(path)
        for folder in sorted(p for p in self.staging.rglob("*") if p.is_dir()):
            _fsync(folder)
        manifest = {p.relative_to(self.staging).as_posix(): _sha256(p) for p in files}
        (self.staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync(self.staging / MANIFEST)
        failpoint(f"checkpoint:{self.final.name}:before_rename")
        if self.final.exists():  # a resumed run writing the same step again
            shutil.rmtree(self.final)
        os.replace(self.staging, self.final)
        _fsync(self.root)


def verify(directory: Path) -> str | None:
    """None when every file matches the manifest, else what is wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest"
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return "unreadable manifest"
    return first_changed(manifest, directory)


def tree_hashes(directory: Path, root: Path) -> dict[str, str]:
    """sha256 of every file under `directory`, by path relative to `root`."""
    return {p.relative_to(root).as_posix(): _sha256(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def first_changed(hashes: dict[str, str], root: Path) -> str | None:
    """What is wrong with the first file under `root` that no longer matches `hashes`, or None."""
    for name, digest in hashes.items():
        path = root / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match the sha256 it was saved with"
    return None


def checkpoints(output_dir: str | Path) -> list[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX))


def newest_valid(output_dir: str | Path) -> Path:
    """The newest checkpoint whose files all verify; corrupt newer ones are skipped with a warning."""
    found = checkpoints(output_dir)
    for candidate in reversed(found):
        problem = verify(candidate)
        if problem is None:
            return candidate
        warnings.warn(f"skipping corrupt checkpoint {candidate} ({problem})", stacklevel=2)
    if found:
        raise UserError(f"no valid checkpoint in {checkpoint_root(output_dir)}: all {len(found)} fail verification")
    raise UserError(f"no checkpoint to resume from in {checkpoint_root(output_dir)}")


def resolve_resume(resume: str, output_dir: str | Path) -> Path:
    """`--resume` (newest valid in output_dir) or `--resume PATH` (that checkpoint, verified)."""
    if resume == "auto":
        return newest_valid(output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise UserError(f"--resume: checkpoint directory not found: {resume}")
    problem = verify(path)
    if problem is not None:
        raise UserError(f"--resume: checkpoint {resume} is corrupt ({problem})")
    return path


def prune(output_dir: str | Path, keep: int | None) -> None:
    """Keep the newest `keep` step checkpoints (task-end policies live elsewhere and are kept)."""
    if keep is None:
        return
    for old in checkpoints(output_dir)[:-keep] if keep > 0 else checkpoints(output_dir):
        shutil.rmtree(old, ignore_errors=True)


def read_state(directory: Path) -> dict:
    return json.loads((directory / STATE).read_text())


def check_stage_state(directory: Path, state: dict, task: str, fingerprint: str, processes: int, force: bool) -> None:
    """A mid-task checkpoint's trainer `state` (its `save_state`) continues this stage: the same task on the same
    prompts (`--force` resumes on changed ones), the saved models it starts from still there, the same number of
    processes; else one line."""
    stream = state["prompt_stream"]
    if stream["task"] != task:
        raise UserError(f"checkpoint {directory} is of task {stream['task']!r}, not {task!r}")
    if stream["fingerprint"] != fingerprint:
        if not force:
            raise UserError(f"the prompts of task {task!r} changed since {directory} was written "
                            "(resuming would skip or repeat samples); --force resumes anyway")
        warnings.warn(f"resuming task {task!r} on changed prompts (--force)", stacklevel=3)
    for name in ("start_policy", "reference"):
        if Path(state[name]).is_absolute() and not Path(state[name]).exists():
            raise UserError(f"checkpoint {directory} needs {state[name]} ({name}), which no longer exists")
    if state["processes"] != processes:
        raise UserError(f"checkpoint {directory} was written by {state['processes']} processes; resume with "
                        f"the same number (got {processes})")
