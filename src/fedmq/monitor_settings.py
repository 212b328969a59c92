"""``fedmq monitor``'s settings, declared once (``fedmq.settings``), apart from the
monitor itself so that reading them (``fedmq --help``) loads no numpy."""

from dataclasses import dataclass
from typing import ClassVar

from fedmq import mqtt as edge
from fedmq.logs import LogSettings
from fedmq.settings import positive_float, setting


@dataclass(frozen=True, kw_only=True)
class MonitorSettings(LogSettings, edge.ConnectionSettings):
    """``fedmq monitor``'s settings, declared once (``fedmq.settings``)."""

    SECTION: ClassVar[str] = "monitor"

    json: bool = setting(False, switch=True, help="one JSON object per message, for scripts")
    until_done: bool = setting(False, switch=True, help="exit after the federation's last round")
    timeout: float | None = setting(
        None, parse=positive_float, metavar="SECONDS", help="give up (exit 1) after this long"
    )
