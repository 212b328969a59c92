"""Child processes that end with the process that started them, even one SIGKILLed.

Linux's ``prctl(PR_SET_PDEATHSIG, sig)`` makes the kernel send ``sig`` to a process when
its parent goes; it is set in the child and kept across ``exec``. ``tied(argv)`` returns a
command line that runs this file as a small wrapper: it sets the signal, checks that the
parent is still there (it may have died before the wrapper ran), then execs ``argv`` in
the same process, so the PID the parent sees is the real child's. A ``preexec_fn`` could
set it too, but runs Python between fork and exec, which is unsafe with threads running
(the demo has paho's).

The signal fires when the *thread* that started the child ends, not the process: start
children from the main thread, or from a thread that lives as long as they should. Where
there is no ``prctl`` (not Linux) the wrapper only execs.

This file is run by path with ``python -I -S``: it imports nothing from fedmq.
"""

import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def tied(argv: list[str], *, sig: signal.Signals = signal.SIGKILL) -> list[str]:
    """``argv`` run so that it receives ``sig`` when this process (its parent) ends."""
    return [sys.executable, "-I", "-S", __file__, str(os.getpid()), str(int(sig)), "--", *argv]


def _die_with(parent: int, sig: int) -> None:
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"prctl(PR_SET_PDEATHSIG): {os.strerror(error)}")
    if os.getppid() != parent:  # the parent ended before prctl: nobody will signal us
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)


def main(args: list[str]) -> None:
    parent, sig, separator, *argv = args
    if separator != "--" or not argv:
        sys.exit("usage: lifeline.py PARENT_PID SIGNAL -- COMMAND [ARG...]")
    _die_with(int(parent), int(sig))
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        sys.stderr.write(f"cannot run {argv[0]}: {error.strerror or error}\n")
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
