"""The output directory: which run it belongs to, when a run may write into it, and one-line errors for
writes that fail.

A run writes nothing before its first step has finished (the metrics line of that step is the first
write). Until then the directory is exactly as the run found it, so a run that fails on its inputs, its
reward function or its first step costs the user nothing. A fresh run refuses a directory that holds
anything (an earlier run, or files of the user's) unless told `--overwrite`; the earlier contents are
then removed at the first write, once the new run has loaded every input and finished a step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

from .checkpoint import checkpoints
from .directories import writable_directory
from .errors import UserError


class OutputDir:
    """`output_dir` of one run: checked before any model loads, claimed at the run's first write."""

    def __init__(self, path: str | Path, resume: bool, overwrite: bool):
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.is_main_process = True  # set by the session, once the accelerator knows
        self.replaced: list[Path] = []  # what --overwrite removes at the first write
        self.claimed = False

    def check(self, inputs: list[tuple[str, str]] = ()) -> None:
        """Whether this run may use the directory: one line and exit 2 if not; nothing is touched.
        `inputs`: (field, path) the run reads, which --overwrite must not remove."""
        out = self.path
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in output_dir and --overwrite replaces it: give one")
        writable_directory(out, "output_dir")
        if self.resume or not out.is_dir():
            return
        entries = sorted(out.iterdir())
        if not entries:
            return
        if not self.overwrite:
            raise UserError(f"output_dir: {out} {describe(out, entries)}; continue that run with --resume, or "
                            "replace it with --overwrite (removed once the new run has finished its first step)")
        inside = out.resolve()
        for field, value in inputs:
            path = Path(value).expanduser()
            if path.exists() and path.resolve().is_relative_to(inside):
                raise UserError(f"{field}: {value} lies inside output_dir {out}, which --overwrite would remove; "
                                "move it out, or write this run elsewhere")
        self.replaced = entries

    def claim(self) -> None:
        """Called before every write (only the first does anything): removes what --overwrite replaces."""
        if self.claimed:
            return
        self.claimed = True
        if not self.is_main_process:
            return
        with writing(self.path, "output_dir"):
            for entry in self.replaced:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
        if self.replaced:
            print(f"cppo: replaced the earlier contents of {self.path} (--overwrite)", file=sys.stderr, flush=True)


def replace_text(path: Path, text: str) -> None:
    """Write `path` whole or not at all: a temporary file renamed over it (removed if the write fails)."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def describe(out: Path, entries: list[Path]) -> str:
    """What a directory holds, in a few words: 'holds an earlier run (2 checkpoints, newest step_…, …)'."""
    found = checkpoints(out)
    names = [p.name + ("/" if p.is_dir() else "") for p in entries if p.name != "checkpoints"]
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    if found or (out / "metrics.jsonl").is_file():
        parts = [f"{len(found)} checkpoint(s), newest {found[-1].name}"] if found else []
        return f"holds an earlier run ({', '.join(parts + ([shown] if shown else []))})"
    return f"is not empty ({shown})"


@contextlib.contextmanager
def writing(path: str | Path, what: str):
    """Turn a failed write (full disk, lost permission, read-only file system) into one line naming
    what was being written; the cause's traceback is kept for the error log."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:  # OSError, safetensors' and torch's writer errors: each wraps the OS's reason
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [""])[0]
        raise UserError(f"cannot write {what} {path}: {reason or type(e).__name__}") from e


def write_error_log(error: BaseException, directory: Path | None) -> Path | None:
    """The whole traceback of `error` (with its cause) appended to `directory/error.log`, or to
    `$CPPO_CACHE/errors/` when the run had not written into its output directory; None if neither can
    be written."""
    from .builtin_models import cache_dir

    text = "".join(traceback.format_exception(error))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rank = os.environ.get("RANK", "0")
    candidates = [directory / "error.log"] if directory is not None else []
    candidates.append(cache_dir() / "errors" / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    for path in candidates:
        size = path.stat().st_size if path.is_file() else None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"--- {stamp} rank {rank}: {' '.join(sys.argv)}\n{text}\n")
            return path
        except OSError:  # a full disk, most likely: leave the file as it was and try the next place
            with contextlib.suppress(OSError):
                if size is None:
                    path.unlink(missing_ok=True)
                else:
                    os.truncate(path, size)
    return None
