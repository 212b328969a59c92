"""``fedmq demo``'s settings, declared once (``fedmq.settings``), apart from the demo
itself so that reading them (``fedmq --help``) loads no numpy."""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from fedmq import mqtt as edge
from fedmq.logs import LogSettings
from fedmq.settings import (
    BUFFER_HELP,
    COMPRESSION_HELP,
    DEFAULT_MAX_STALENESS,
    DEFAULT_STALENESS,
    DOWNLINK_HELP,
    DP_SGD_HELP,
    EVAL_FRACTION_HELP,
    FINAL_DOWNLINK_HELP,
    MAX_STALENESS_HELP,
    MODE_HELP,
    MODEL_HELP,
    PROXIMAL_MU_HELP,
    SERVER_OPTIMIZER_HELP,
    STALENESS_HELP,
    TASK_HELP,
    check_buffer,
    check_final_downlink,
    chosen_task,
    compression_spec,
    count,
    downlink_spec,
    dp_fedavg_spec,
    dp_sgd_spec,
    eval_fraction,
    final_downlink_spec,
    fraction,
    max_epsilon,
    mode_name,
    model_name,
    partition_spec,
    positive_float,
    positive_int,
    proximal_mu,
    server_optimizer_spec,
    setting,
    show_auto,
    staleness_spec,
    task_spec,
    usage_errors,
)

DEFAULT_NODES = 10
SLOW_NODES_FORM = "N:SECONDS (N nodes >= 0, SECONDS >= 0), e.g. 3:0.5"


def slow_nodes_spec(text: str) -> tuple[int, float]:
    """``--slow-nodes N:SECONDS``: (N, SECONDS); whether N fits ``--nodes`` is checked with
    the rest of the demo's configuration (``fedmq.demo.config_problem``)."""
    count, colon, seconds = text.strip().partition(":")
    try:
        delay = float(seconds)
    except ValueError:
        delay = -1.0
    if not (colon and count.strip().isdigit() and math.isfinite(delay) and delay >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not {SLOW_NODES_FORM}")
    return int(count), delay


def _show_slow_nodes(value: tuple[int, float]) -> str:
    return f"{value[0]}:{value[1]!r}"


@usage_errors
def _broker(text: str) -> edge.BrokerAddress:
    return edge.BrokerAddress.parse(text)


@dataclass(frozen=True, kw_only=True)
class DemoSettings(LogSettings):
    """``fedmq demo``'s settings, declared once (``fedmq.settings``). The demo reads no
    config file or variables: it configures its children itself (``child_argv``)."""

    SECTION: ClassVar[str] = "demo"

    nodes: int | None = setting(  # None: DEFAULT_NODES, or one per --data-dir node file
        None,
        parse=positive_int,
        help=f"nodes (default {DEFAULT_NODES}; with --data-dir one per node file)",
    )
    nodes_per_process: int = setting(
        1,
        parse=positive_int,
        metavar="K",
        help="run K nodes in each node process (fedmq node-group): each still its own MQTT "
        "client, state and status, taking turns to train; for fleets of hundreds or "
        "thousands on one machine (default 1: a process per node)",
    )
    rounds: int = setting(30, parse=positive_int, help="rounds (default 30)")
    seed: int = setting(0, parse=int, help="seed for init, split and shuffles (default 0)")
    compression: str = setting(
        "dense", parse=compression_spec, metavar="SPEC", help=COMPRESSION_HELP
    )
    downlink_compression: str = setting(
        "none", parse=downlink_spec, metavar="SPEC|none", help=DOWNLINK_HELP
    )
    final_downlink_compression: str = setting(
        "same", parse=final_downlink_spec, metavar="SPEC|same", help=FINAL_DOWNLINK_HELP
    )
    task: str | None = setting(  # None: --model, or digits-mlp
        None,
        parse=task_spec,
        metavar="SPEC",
        help=TASK_HELP + "; the demo's nodes train it on its built-in data (the built-in "
        "tasks), or on --data-dir's files (default digits-mlp)",
    )
    data_dir: Path | None = setting(
        None,
        parse=Path,
        metavar="DIR",
        help="the nodes' own data: one node per DIR/node-*.npz (sorted by name; arrays x "
        "(n, ...) and y (n, ...): class ids or float targets), and DIR/test.npz, if there, "
        "for the aggregator's central evaluation (default: the task's built-in data, "
        "split per --partition)",
    )
    model: str | None = setting(None, parse=model_name, help=MODEL_HELP)
    partition: str = setting(
        "iid",
        parse=partition_spec,
        help="how the built-in data is split over the nodes: iid (default) or dirichlet:ALPHA",
    )
    eval_fraction: float | None = setting(  # None: auto, the aggregator's default
        None, parse=eval_fraction, show=show_auto, metavar="F|auto", help=EVAL_FRACTION_HELP
    )
    proximal_mu: float = setting(
        0.0, parse=proximal_mu, metavar="MU", help=PROXIMAL_MU_HELP + "; handed to the aggregator"
    )
    dp_sgd: str | None = setting(
        None,
        parse=dp_sgd_spec,
        metavar="noise=Z,clip=C",
        help=DP_SGD_HELP + "; handed to the aggregator",
    )
    dp_fedavg: str | None = setting(
        None,
        parse=dp_fedavg_spec,
        metavar="noise=Z,clip=C|adaptive",
        help="user-level differential privacy at the aggregator (DP-FedAvg, docs/privacy.md);"
        " handed to the aggregator",
    )
    max_epsilon: float | None = setting(
        None,
        parse=max_epsilon,
        metavar="E",
        help="DP-SGD: every node's privacy budget (fedmq node --max-epsilon; default: none)",
    )
    server_optimizer: str = setting(
        "fedavg",
        parse=server_optimizer_spec,
        metavar="SPEC",
        help=SERVER_OPTIMIZER_HELP + "; handed to the demo's aggregator",
    )
    mode: str = setting(
        "sync", parse=mode_name, metavar="sync|async", help=MODE_HELP + "; handed to the aggregator"
    )
    buffer: int | None = setting(None, parse=positive_int, metavar="K", help=BUFFER_HELP)
    staleness: str = setting(
        DEFAULT_STALENESS, parse=staleness_spec, metavar="poly:A", help=STALENESS_HELP
    )
    max_staleness: int = setting(
        DEFAULT_MAX_STALENESS, parse=count, metavar="S", help=MAX_STALENESS_HELP
    )
    report: Path | None = setting(None, parse=Path, metavar="PATH", help="write report.json here")
    save_model: Path | None = setting(
        None,
        parse=Path,
        metavar="PATH.msgpack|PATH.npz",
        help="keep the newest global model here, for fedmq.load_params (the aggregator's "
        "--save-model)",
    )
    broker: edge.BrokerAddress | None = setting(
        None,
        parse=_broker,
        metavar="HOST:PORT",
        help="use this broker instead of starting one",
    )
    federation: str = setting("demo", metavar="ID", help="federation id (default demo)")
    round_timeout: float | None = setting(
        None,
        parse=positive_float,
        metavar="SECONDS",
        help="close rounds at this deadline with whoever reported, if --min-nodes have "
        "(default: the aggregator's, 300)",
    )
    min_nodes: int | None = setting(  # None: the aggregator's default, more than half
        None,
        parse=positive_int,
        metavar="N",
        help="quorum at the --round-timeout deadline, handed to the demo's aggregator "
        "(default: the aggregator's, more than half of --nodes)",
    )
    sample_fraction: float | None = setting(  # None: the aggregator's default, 1
        None,
        parse=fraction,
        metavar="F",
        help="ask a seeded random fraction F of the nodes to train each round, handed to the "
        "demo's aggregator (default: the aggregator's, 1: every node)",
    )
    local_epochs: int | None = setting(  # None: the aggregator's default, 1
        None,
        parse=positive_int,
        metavar="N",
        help="the nodes' epochs of local training per round, handed to the demo's aggregator "
        "(default: the aggregator's, 1)",
    )
    slow_nodes: tuple[int, float] | None = setting(  # (count, seconds); None: none slow
        None,
        parse=slow_nodes_spec,
        show=_show_slow_nodes,
        metavar="N:SECONDS",
        help="SIMULATION of a heterogeneous fleet: the last N nodes (node-08 to node-10 of 10 "
        "for 3:0.5) get fedmq node --train-delay SECONDS, so each of their local trainings "
        "takes SECONDS longer (default: none)",
    )
    workdir: Path | None = setting(
        None, parse=Path, help="keep data and logs here (default: temp, removed)"
    )
    max_restarts: int = setting(
        3,
        parse=count,
        metavar="N",
        help="restart a child that dies before the run is over up to N times, after a short "
        "back-off (default 3 per child; 0 = fail at once)",
    )
    start_timeout: float | None = setting(  # None: first_round_timeout's default
        None,
        parse=positive_float,
        metavar="SECONDS",
        help="fail the demo if no round has finished SECONDS after it started (default 120, "
        "or 0.25 s a node from 480 nodes on); raise it for a big model or slow machines, "
        "where every node compiles before round 1 closes",
    )

    def __post_init__(self) -> None:
        chosen_task(self.task, self.model)  # both given and different: ValueError
        check_final_downlink(self.downlink_compression, self.final_downlink_compression)
        # with --data-dir the node count is known once the files are listed: the
        # aggregator's settings check it then
        known = self.nodes or (None if self.data_dir is not None else DEFAULT_NODES)
        check_buffer(self.mode, self.buffer, known)

    @property
    def first_round_timeout(self) -> float:
        """How long the demo waits for the first round: ``start_timeout``, else 120 s, or
        0.25 s a node if that is more (from 480 nodes on: 250 s for 1,000, which start,
        compile and train once in well under a minute on 2 cores, docs/scaling.md)."""
        if self.start_timeout is not None:
            return self.start_timeout
        return max(120.0, 0.25 * self.node_count)

    @property
    def node_count(self) -> int:
        """``--nodes``, or its default (``fedmq demo`` sets it from --data-dir's files)."""
        return self.nodes if self.nodes is not None else DEFAULT_NODES

    @property
    def task_spec(self) -> str:
        """``--task``, or its old spelling ``--model``, or digits-mlp."""
        return chosen_task(self.task, self.model)
