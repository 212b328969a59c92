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
