"""The node's settings, declared once (``fedmq.settings``): its options, its keys in
``[connection]`` and ``[node]``, its ``FEDMQ_NODE_*`` variables and the command line the
demo starts it with."""

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fedmq.logs import LogSettings
from fedmq.mqtt import ConnectionSettings
from fedmq.settings import (
    TASK_HELP,
    TRAIN_DELAY_HELP,
    Exclusive,
    non_negative_float,
    partition_spec,
    setting,
    task_spec,
)

# Where a node keeps its state unless told (--state-dir): one directory per federation
# and node id under the working directory, so nodes started side by side never share one.
STATE_ROOT = Path(".fedmq-node")


def default_state_dir(federation: str, node_id: str) -> Path:
    """``.fedmq-node/<federation>/<node_id>``; ValueError for an id that is no directory."""
    for kind, name in (("federation id", federation), ("node id", node_id)):
        if name in (".", ".."):
            raise ValueError(f"{kind} {name!r} cannot name a directory: give --state-dir")
    return STATE_ROOT / federation / node_id


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise argparse.ArgumentTypeError(f"{text!r} is not INDEX/COUNT with 1 <= INDEX <= COUNT")
    return int(index) - 1, int(count)


def _show_shard(shard: tuple[int, int]) -> str:
    return f"{shard[0] + 1}/{shard[1]}"


_DATA = Exclusive("data", required=True)


@dataclass(frozen=True, kw_only=True)
class NodeSettings(LogSettings, ConnectionSettings):
    """``fedmq node``'s settings: exactly one of ``data`` and ``demo_shard``."""

    SECTION: ClassVar[str] = "node"

    node_id: str = setting(required=True, metavar="ID", help="this device's id (topic level)")
    task: str | None = setting(  # None: the global model's, if it is built in
        None,
        parse=task_spec,
        metavar="SPEC",
        help=TASK_HELP + "; the same the aggregator runs (default: the global model's task, "
        "if it is built in)",
    )
    data: Path | None = setting(
        None,
        parse=Path,
        exclusive=_DATA,
        metavar="PATH.npz",
        help="local data: arrays x (n, ...) and y (n,) or (n, ...): class ids or float targets",
    )
    demo_shard: tuple[int, int] | None = setting(  # (index, count) of the digits training split
        None,
        parse=_shard,
        show=_show_shard,
        exclusive=_DATA,
        metavar="INDEX/COUNT",
        help="built-in digits data: shard INDEX of COUNT (needs scikit-learn)",
    )
    partition: str = setting(
        "iid", parse=partition_spec, help="for --demo-shard: iid or dirichlet:ALPHA"
    )
    partition_seed: int = setting(0, parse=int, help="for --demo-shard (default 0)")
    state_dir: Path | None = setting(
        None,
        parse=Path,
        help="node state incl. the JAX compile cache, locked while the node runs "
        "(default ./.fedmq-node/FEDERATION/NODE_ID)",
    )
    exit_when_done: bool = setting(False, switch=True, help="exit when the federation finishes")
    train_delay: float = setting(
        0.0, parse=non_negative_float, metavar="SECONDS", help=TRAIN_DELAY_HELP
    )

    @property
    def state_path(self) -> Path:
        """``state_dir``, or the default per federation and node id (``default_state_dir``)."""
        if self.state_dir is not None:
            return self.state_dir
        return default_state_dir(self.federation, self.node_id)
