"""structlog set-up, called once by each entry point (never at import)."""

import logging
import sys
from dataclasses import dataclass

import structlog

from fedmq.settings import setting


@dataclass(frozen=True, kw_only=True)
class LogSettings:
    """How every command logs: keys of the command's own section."""

    log_json: bool | None = setting(
        None, switch=True, help="JSON log lines even on a terminal (default: JSON unless a TTY)"
    )
    log_level: str = setting("info", choices=("debug", "info", "warning", "error"), help=None)


class _CurrentStderr:
    """``sys.stderr`` as it is at each write, not as it was when logging was set up:
    whoever swaps the stream later (pytest's capture, an embedding program) still gets
    the lines, and a closed old stream is never written to."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure(*, json: bool | None = None, level: str = "info") -> None:
    """JSON lines when stderr is not a terminal (systemd, CI, demo children), console otherwise.

    The processors are the same either way; only the renderer differs. paho's stdlib
    logger is routed through the same chain.
    """
    if json is None:
        json = not sys.stderr.isatty()
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # A JSON line carries a traceback as a string; the console renderer formats exc_info
    # itself (structlog advises against format_exc_info in front of it).
    rendering: list[structlog.types.Processor] = (
        [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
        if json
        else [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]
    )
    renderer = rendering[-1]
    numeric = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*shared, *rendering],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(_CurrentStderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(_CurrentStderr())
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processor=renderer)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))
