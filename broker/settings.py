"""``fedmq broker``'s settings, declared once (``fedmq.settings``): its options, its keys
in ``[broker]`` and its ``FEDMQ_BROKER_*`` variables. (``fedmq broker init|add-node|
revoke-node`` are one-off actions on a deployment directory, not settings.)"""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fedmq.logs import LogSettings
from fedmq.settings import setting


def listen_port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port number (0-65535, 0 = any free port)"
        )
    return int(text)


@dataclass(frozen=True, kw_only=True)
class BrokerSettings(LogSettings):
    SECTION: ClassVar[str] = "broker"

    port: int = setting(1883, parse=listen_port, help="listener port (default 1883, 0 = any free)")
    mosquitto_conf: Path | None = setting(
        None, parse=Path, metavar="PATH", help="mosquitto.conf to use (default: the project's)"
    )
