"""Crash-safe file writes shared by the aggregator's checkpoint and a node's state, the
locks on state directories, and the process's limit of open files."""

import errno
import fcntl
import os
import resource
import socket
from collections.abc import Callable
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
    try:
        write_atomically(path, data)
    except OSError as error:
        path.with_name(path.name + ".tmp").unlink(missing_ok=True)
        raise ValueError(f"cannot write {path}: {error.strerror or error}") from None


LOCK_FILE = "lock"


class DirectoryLocked(RuntimeError):
    """Another process holds a state directory."""


class DirectoryLock:
    """An exclusive ``flock`` on ``<directory>/lock``, held while the file stays open: the
    kernel releases it when the process ends, however it ends, so a stale lock file never
    blocks a restart. The file names the holder (``pid N on HOST``) for the message a
    second process gets."""

    def __init__(self, directory: Path, fd: int) -> None:
        self.directory = directory
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the file drops the lock
            self._fd = None


def lock_directory(directory: Path) -> DirectoryLock:
    """Create ``directory`` if missing and lock it for this process; raise
    ``DirectoryLocked`` naming the holder if another process (or another lock of this
    one) has it."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(
            errno.ENOTDIR, "Not a directory, cannot keep state in it", str(directory)
        )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DirectoryLocked(
            f"state directory {directory} is in use by {holder} (see {path}): stop that "
            "process, or give this one its own --state-dir"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return DirectoryLock(directory, fd)


def open_files_plan(needed: int, soft: int, hard: int) -> tuple[int | None, str | None]:
    """(the soft limit of open files to set, or None to keep it; why ``needed`` cannot be
    had, or None). Never lower: a soft limit already at ``needed`` stays, and the soft limit
    is raised at most to the hard one, which only the administrator raises."""
    unlimited = resource.RLIM_INFINITY
    if soft == unlimited or soft >= needed:
        return None, None
    if hard == unlimited or hard >= needed:
        return needed, None
    return None, (
        f"{needed} open files are needed and the hard limit is {hard}: raise it (as root, "
        f"or in the service's LimitNOFILE) and run `ulimit -n {needed}` before starting, "
        "or put fewer nodes in one process"
    )


def ensure_open_files(
    needed: int,
    *,
    get: Callable[[int], tuple[int, int]] = resource.getrlimit,
    set_limit: Callable[[int, tuple[int, int]], None] = resource.setrlimit,
) -> int | None:
    """Raise this process's soft limit of open files (RLIMIT_NOFILE) to ``needed`` if it is
    lower and the hard limit allows; the new soft limit, or None if it was left as it was.
    ValueError with the fix if the hard limit is too low. ``get``/``set_limit``: the
    ``resource`` functions (tests pass their own)."""
    soft, hard = get(resource.RLIMIT_NOFILE)
    raised, problem = open_files_plan(needed, soft, hard)
    if problem is not None:
        raise ValueError(problem)
    if raised is not None:
        set_limit(resource.RLIMIT_NOFILE, (raised, hard))
    return raised
