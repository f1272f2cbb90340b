"""The one kind of error a user sees: `UserError`, reported as one line and exit code 2 (cppo.cli)."""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake in what the user gave us (config, files, callables): reported as one line, exit code 2.
    Raised `from` the exception it reports (the user's code raised), it keeps that traceback for the log.

    In a multi-process launch one process may fail alone (its share of a batch made the user's code fail):
    `own` marks that process's error, which it reports itself with its rank; `quiet` marks the error the
    other processes stop with, which they do not report. `output_dir` is where the traceback log of an
    error that wraps an exception goes (None: nowhere has been claimed for the run yet).
    """

    def __init__(self, message: str, *, own: bool = False, quiet: bool = False, output_dir: Path | None = None):
        super().__init__(message)
        self.own, self.quiet, self.output_dir = own, quiet, output_dir

    @property
    def wraps(self) -> bool:
        """Whether it reports an exception of the user's code (whose traceback is worth a log)."""
        return self.__cause__ is not None

    def line(self, rank: int | None = None) -> str:
        """The line the user sees; `rank` names the process of a multi-process launch that reports it."""
        return f"cppo: error: {'' if rank is None else f'[rank {rank}] '}{self}"


def exception_line(error: BaseException) -> str:
    """'RuntimeError: reward server down': an exception as one line (its message's first line)."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
