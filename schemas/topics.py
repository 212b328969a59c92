"""The only place that builds and parses topic strings.

Layout (docs/PROTOCOL.md): every topic a node writes carries its node id, so broker ACLs
can authorise per node with ``%u`` pattern rules (username = node id).
"""

import functools
import re
from dataclasses import dataclass

ROOT = "fedmq"
MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Ids checked lately, whatever the answer: the same few (a federation's, its nodes') come
# back every round, and a look-up costs less than the regex. Bounded in entries and (ids
# are short: longer strings are answered without it) in bytes, so a node sending ever new
# ids cannot grow it; a string's answer never changes, so a hit is the regex's.
NAMES_REMEMBERED = 4096


def is_name(value: str) -> bool:
    """Whether the string ``value`` is a legal federation or node id (``validate_name``)."""
    return len(value) <= MAX_NAME and _is_short_name(value)


@functools.lru_cache(maxsize=NAMES_REMEMBERED)
def _is_short_name(value: str) -> bool:
    return _NAME.fullmatch(value) is not None


def validate_name(kind: str, value: str) -> str:
    """Return ``value`` if it is a legal federation or node id, else raise ValueError.

    Ids become topic levels, so MQTT's wildcards and separators are excluded.
    """
    if not isinstance(value, str) or not (
        is_name(value) if type(value) is str else _NAME.fullmatch(value)  # a subclass: as it is
    ):
        raise ValueError(
            f"{kind} {value!r} is not valid: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names of one federation."""

    federation: str

    def __post_init__(self) -> None:
        validate_name("federation id", self.federation)

    @property
    def prefix(self) -> str:
        return f"{ROOT}/{self.federation}"

    @property
    def global_model(self) -> str:
        return f"{self.prefix}/global"

    @property
    def global_delta(self) -> str:
        """Compact form of each new global model for nodes that hold the previous one."""
        return f"{self.prefix}/global/delta"

    @property
    def global_topics(self) -> tuple[str, str]:
        """Where a node receives models: the full form, then the compact one."""
        return (self.global_model, self.global_delta)

    @property
    def metrics(self) -> str:
        return f"{self.prefix}/metrics"

    @property
    def server(self) -> str:
        return f"{self.prefix}/server"

    def update(self, node_id: str) -> str:
        return f"{self.prefix}/updates/{validate_name('node id', node_id)}"

    def status(self, node_id: str) -> str:
        return f"{self.prefix}/status/{validate_name('node id', node_id)}"

    @property
    def all_updates(self) -> str:
        return f"{self.prefix}/updates/+"

    @property
    def all_status(self) -> str:
        return f"{self.prefix}/status/+"

    def node_of(self, topic: str) -> str | None:
        """The node id in an updates/ or status/ topic of this federation, else None."""
        parts = topic.split("/")
        if (
            len(parts) == 4
            and parts[0] == ROOT
            and parts[1] == self.federation
            and parts[2] in ("updates", "status")
            and is_name(parts[3])
        ):
            return parts[3]
        return None
