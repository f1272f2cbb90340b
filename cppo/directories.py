"""Directories a user names for cppo to write into (a run's, a sweep's, a built model's): checked before
anything is written, with one line naming what is wrong. Imports nothing heavy (`cppo sweep` uses it)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UserError


def writable_directory(path: Path, field: str) -> list[str]:
    """The names `path` holds (none if it does not exist yet), once it is known that it is, or can be made,
    a directory this user can write: else a UserError naming `field`."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{field}: {path} is a file, not a directory")
    ancestor = path
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{field}: {path} cannot be made: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{field}: {path} is not writable ({ancestor} is read-only for this user)")
    return sorted(p.name for p in path.iterdir()) if path.is_dir() else []


def listing(names: list[str], most: int = 3) -> str:
    """`a, b, c, ...`: what a directory holds, in a one-line error."""
    return ", ".join(names[:most]) + (", ..." if len(names) > most else "")
