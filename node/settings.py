"""The node's settings, declared once (``fedmq.settings``): its options, its keys in
``[connection]`` and ``[node]``, its ``FEDMQ_NODE_*`` variables and the command line the
demo starts it with."""

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fedmq.logs import LogSettings
from fedmq.mqtt import ConnectionSettings
from fedmq.settings import (
    TASK_HELP,
    TRAIN_DELAY_HELP,
    Exclusive,
    dp_delta,
    max_epsilon,
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
    max_epsilon: float | None = setting(  # None: no limit
        None,
        parse=max_epsilon,
        metavar="E",
        help="DP-SGD: this node's privacy budget; it does not train a round that would take "
        "its ledger's epsilon past E, and says so in its status (default: no limit)",
    )
    dp_delta: float | None = setting(  # None: the ledger's, 1 / n^1.1
        None,
        parse=dp_delta,
        metavar="D",
        help="DP-SGD: the delta this node reports (and limits) its epsilon at (default: "
        "1/n^1.1 of its training examples when its ledger was made)",
    )

    @property
    def state_path(self) -> Path:
        """``state_dir``, or the default per federation and node id (``default_state_dir``)."""
        if self.state_dir is not None:
            return self.state_dir
        return default_state_dir(self.federation, self.node_id)


# Time between two nodes' first connects in one ``fedmq node-group`` process: 1,000 nodes
# connecting at once would hit the broker with 1,000 CONNECTs and subscriptions together.
DEFAULT_STAGGER = 0.02


@dataclass(frozen=True, kw_only=True)
class NodeGroup:
    """``fedmq node-group FILE``: several nodes in one process, each as ``fedmq node``
    would run it (``fedmq.node.group``). ``stagger``: seconds between two first connects."""

    nodes: tuple[NodeSettings, ...]
    stagger: float = DEFAULT_STAGGER

    def __post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("a node group needs at least one node")
        problem = group_problem(self.nodes)
        if problem is not None:
            raise ValueError(problem)


def group_problem(
    nodes: tuple[NodeSettings, ...], lines: tuple[int, ...] | None = None
) -> str | None:
    """Why these nodes cannot run in one process, or None: two with the same federation and
    node id (one MQTT client id: the broker would throw one out each time the other
    connects) or the same state directory (locked by the first). ``lines``: each node's
    line in the group file, for the message."""
    where = lines or tuple(range(1, len(nodes) + 1))
    word = "line" if lines is not None else "node"
    ids: dict[tuple[str, str], int] = {}
    dirs: dict[Path, int] = {}
    for at, node in zip(where, nodes, strict=True):
        key = (node.federation, node.node_id)
        if key in ids:
            return (
                f"{word} {at}: node id {node.node_id!r} of federation {node.federation!r} is "
                f"already {word} {ids[key]}'s (one MQTT client id each): give every node its "
                "own --node-id"
            )
        ids[key] = at
        state = node.state_path.absolute()
        if state in dirs:
            return (
                f"{word} {at}: state directory {node.state_path} is already {word} "
                f"{dirs[state]}'s: give every node its own --state-dir"
            )
        dirs[state] = at
    return None


def group_lines(text: str) -> list[tuple[int, list[str]]]:
    """The node command lines of a group file: (line number from 1, arguments of
    ``fedmq node``), shell-quoted as on a command line; blank lines and ``#`` comments are
    skipped, and a leading ``fedmq node`` (or ``node``) is optional. ValueError naming
    the line for a line that is not shell words."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as error:
            raise ValueError(f"line {number}: {error} (quote it as in a shell)") from None
        if not words:
            continue
        if words[:2] == ["fedmq", "node"]:
            words = words[2:]
        elif words[:1] == ["node"]:
            words = words[1:]
        elif words[:1] in (["fedmq"], ["node-group"]) or words[:2] == ["fedmq", "node-group"]:
            raise ValueError(
                f"line {number}: {' '.join(words[:2])!r}: a line holds one node's options "
                "(those of fedmq node), e.g. --node-id a --data a.npz"
            )
        found.append((number, words))
    return found
