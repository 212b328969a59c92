"""Crash-safe file writes shared by the aggregator's checkpoint and a node's state."""

import os
from pathlib import Path


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename, fsync the directory: after a crash ``path`` holds
    the old content or the new, never a mix, and a completed call survives power loss."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    tmp.replace(path)
    fsync_directory(path.parent)


def output_problem(path: Path) -> str | None:
    """Why a user's output file (report.json, a chart) cannot be written at ``path``, with
    what to do, or None. Checked before a long run, not only when its result is ready."""
    parent = path.parent
    if not parent.exists():
        return f"directory {parent} does not exist (create it or choose another path)"
    if not parent.is_dir():
        return f"{parent} is not a directory (choose another path)"
    if path.is_dir():
        return f"{path} is a directory (give a file name)"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"directory {parent} is not writable by this user (choose another path)"
    return None


def write_output(path: Path, data: bytes) -> None:
    """A user's output file, whole: written to a temporary file renamed over ``path``, so
    a reader never sees half of it. ValueError naming ``path`` (never the temporary file)."""
    problem = output_problem(path)
    if problem is not None:
        raise ValueError(f"cannot write {path}: {problem}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None
