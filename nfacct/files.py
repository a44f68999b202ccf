"""Directories the daemon creates, so that a failed start can take them back."""

from __future__ import annotations

import contextlib
import os


def make_dirs(path: str, mode: int) -> list[str]:
    """`os.makedirs(path, mode, exist_ok=True)`, returning the directories it created, outermost first."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    created = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory, mode)
        except FileExistsError:  # another process made it meanwhile: not ours to remove
            continue
        os.chmod(directory, mode)  # mkdir's mode passes through the umask
        created.append(directory)
    return created


def remove_dirs(created: list[str]) -> None:
    """Remove directories `make_dirs` created, innermost first, where they are still empty."""
    for directory in reversed(created):
        with contextlib.suppress(OSError):  # not empty: someone else uses it now
            os.rmdir(directory)
