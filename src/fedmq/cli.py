"""The ``fedmq`` command: the only place that parses arguments, reads the environment,
configures logging and installs signal handlers."""

import argparse
import contextlib
import dataclasses
import functools
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from fedmq import config, logs
from fedmq.mqtt import BrokerAddress, Credentials

T = TypeVar("T")

DESCRIPTION = """\
Federated learning for fleets of small devices over MQTT.

  fedmq demo        a whole federation on this machine (broker, aggregator, nodes)
  fedmq broker      run mosquitto with the project's mosquitto.conf
  fedmq aggregator  average the nodes' updates each round and publish the global model
  fedmq node        train on local data and publish updates (one per device)
  fedmq monitor     watch node status and round metrics live
  fedmq report      summarise a report.json; --plot draws it as a PNG or SVG chart

node, aggregator, broker and monitor also read a TOML file (--config PATH or
$FEDMQ_CONFIG) and FEDMQ_<SECTION>_<KEY> variables: see deploy/config/.
Topics and messages are documented in docs/PROTOCOL.md.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (the cause, and where the options are
    listed) instead of the whole usage text before it."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _usage_errors(check: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse type from a parser of ours: its ValueError becomes the one-line usage
    error (parsers are imported inside ``check``, so ``--help`` loads no JAX)."""

    @functools.wraps(check)
    def convert(text: str) -> T:
        try:
            return check(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


@_usage_errors
def _broker(text: str) -> BrokerAddress:
    return BrokerAddress.parse(text)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


@_usage_errors
def _node_ids(text: str) -> tuple[str, ...]:
    from fedmq.schemas.topics import validate_name

    return tuple(sorted({validate_name("node id", i.strip()) for i in text.split(",")}))


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1]")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0")
    return value


def _deadline(text: str) -> float | None:
    """``--round-timeout``: seconds, or ``none`` (no deadline)."""
    if text.strip().lower() == "none":
        return None
    try:
        return _positive_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number > 0 or none") from None


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise argparse.ArgumentTypeError(f"{text!r} is not INDEX/COUNT with 1 <= INDEX <= COUNT")
    return int(index) - 1, int(count)


@_usage_errors
def _partition(text: str) -> str:
    from fedmq.datasets import parse_partition

    parse_partition(text)
    return text


@_usage_errors
def _model(text: str) -> str:
    from fedmq.models import get_model

    get_model(text)
    return text


@_usage_errors
def _compression(text: str) -> str:
    from fedmq.compression import parse_spec

    return str(parse_spec(text))


def _plot_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".png", ".svg"):
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .png or .svg")
    return path


@_usage_errors
def _aggregation(text: str) -> str:
    from fedmq.aggregator.robust import parse_rule

    return str(parse_rule(text))


COMPRESSION_HELP = (
    "how nodes compress their deltas: dense (default), fp16, int8, int4, sign, topk:F, joined "
    "with + and optionally ef (error feedback), flat (one Elias-Fano coded run for the whole "
    "sparse delta; needs topk) and zlib, e.g. topk:0.035+sign+ef+flat (100x fewer bytes)"
)


def _add_common(parser: argparse.ArgumentParser, *, broker_required: bool = True) -> None:
    if broker_required:
        parser.add_argument(
            "--broker",
            type=_broker,
            default=BrokerAddress(),
            metavar="HOST:PORT",
            help="MQTT broker (default 127.0.0.1:1883)",
        )
        parser.add_argument(
            "--federation",
            default="default",
            metavar="ID",
            help="federation id, the second topic level (default 'default')",
        )
        _add_credentials(parser)
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=None,
        help="JSON log lines even on a terminal (default: JSON unless a TTY)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def _add_credentials(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "broker credentials", "for a broker with passwords and TLS (see docs/security.md)"
    )
    group.add_argument("--username", default=None, help="MQTT username")
    group.add_argument(
        "--password-file", type=Path, default=None, metavar="PATH", help="first line: password"
    )
    group.add_argument(
        "--tls-ca", type=Path, default=None, metavar="PATH", help="CA certificate: use TLS"
    )
    group.add_argument(
        "--tls-cert", type=Path, default=None, metavar="PATH", help="client certificate (mTLS)"
    )
    group.add_argument(
        "--tls-key", type=Path, default=None, metavar="PATH", help="client key (mTLS)"
    )


def _with_credentials(args: argparse.Namespace) -> None:
    """Fold the credential options into ``args.broker``; exit with the reason if they
    cannot work (a missing file, a certificate without its key)."""
    if getattr(args, "broker", None) is None or not hasattr(args, "username"):
        return
    credentials = Credentials(
        username=args.username,
        password_file=args.password_file,
        ca_file=args.tls_ca,
        cert_file=args.tls_cert,
        key_file=args.tls_key,
    )
    problem = credentials.problem()
    if problem is not None:
        raise ValueError(f"broker credentials: {problem}")
    args.broker = dataclasses.replace(args.broker, credentials=credentials)


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
    return int(text)


def _listen_port(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a port number (0-65535, 0 = any free port)"
        )
    return int(text)


def _add_broker_admin(broker: argparse.ArgumentParser) -> None:
    """``fedmq broker init|add-node|revoke-node``: credentials for a deployment
    (docs/security.md); ``fedmq broker`` alone runs mosquitto."""
    sub = broker.add_subparsers(dest="broker_command", metavar="ACTION")
    p = sub.add_parser(
        "init",
        help="generate CA, certificates, passwords, ACLs and per-node bundles",
        description="Write a deployment into DIR: a CA and the broker's TLS certificate, "
        "mosquitto's password and ACL files, DIR/mosquitto.conf (the project's settings "
        "with the TLS listener enabled), and one bundle per node in DIR/nodes/ID plus "
        "DIR/aggregator and DIR/monitor, ready to copy to each machine.",
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="deployment directory (e.g. /etc/fedmq)")
    p.add_argument("--nodes", type=_node_ids, required=True, metavar="ID,ID,...", help="node ids")
    p.add_argument("--federation", default="default", metavar="ID", help="(default 'default')")
    p.add_argument(
        "--hostname",
        action="append",
        dest="hostnames",
        metavar="NAME",
        help="name or IP address devices use to reach the broker, put in its certificate; "
        "repeat for several, the first goes in the bundles (default: this host's name, "
        "localhost, 127.0.0.1)",
    )
    p.add_argument("--tls-port", type=_port, default=8883, help="TLS listener port (default 8883)")
    p.add_argument(
        "--listen",
        default=None,
        metavar="ADDRESS",
        help="bind the TLS listener to one address (default: every interface)",
    )
    p.add_argument(
        "--mtls", action="store_true", help="require client certificates too (mutual TLS)"
    )
    p.add_argument(
        "--model",
        type=_model,
        default="digits-mlp",
        help="the federation's model: the broker's max_packet_size is derived from its size "
        "(default digits-mlp)",
    )
    for name, text in (
        ("add-node", "give a new node an account and a bundle"),
        ("revoke-node", "remove a node's account (then reload the broker)"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("dir", type=Path, metavar="DIR", help="deployment directory")
        p.add_argument("node_id", metavar="ID", help="node id")


def _broker_admin(args: argparse.Namespace) -> int:
    import socket

    from fedmq.broker import credentials

    if args.broker_command == "init":
        hostnames = args.hostnames or [socket.gethostname(), "localhost", "127.0.0.1"]
        deployment = credentials.init_deployment(
            args.dir, nodes=list(args.nodes), federation=args.federation, hostnames=hostnames,
            tls_port=args.tls_port, listen=args.listen, mtls=args.mtls, model=args.model,
        )  # fmt: skip
        print(
            f"deployment for federation {deployment.federation!r} in {args.dir}: "
            f"{len(args.nodes)} node bundles in {args.dir / 'nodes'}, aggregator and monitor "
            f"bundles; start the broker with: mosquitto -c {args.dir / 'mosquitto.conf'}"
        )
    elif args.broker_command == "add-node":
        target = credentials.add_node(args.dir, args.node_id)
        print(
            f"node {args.node_id!r} added, bundle in {target}; {credentials.reload_hint(args.dir)}"
        )
    else:
        credentials.revoke_node(args.dir, args.node_id)
        print(f"node {args.node_id!r} revoked; {credentials.reload_hint(args.dir)}")
    if args.broker_command != "init":
        fleet = credentials.nodes_of(args.dir)
        print(
            f"{args.dir / 'aggregator' / 'fedmq.toml'} now expects {len(fleet)} nodes: copy it "
            "to the aggregator and restart it"
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedmq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "broker",
        help="run mosquitto with the project's config",
        description="Run mosquitto with the project's mosquitto.conf (loopback "
        "listener), wait until it accepts connections, stop it on Ctrl-C.",
    )
    p.add_argument(
        "--port", type=_listen_port, default=1883, help="listener port (default 1883, 0 = any free)"
    )
    p.add_argument(
        "--mosquitto-conf",
        type=Path,
        default=None,
        metavar="PATH",
        help="mosquitto.conf to use (default: the project's)",
    )
    _add_common(p, broker_required=False)
    _add_broker_admin(p)

    p = sub.add_parser(
        "aggregator",
        help="average updates per round, publish the global model",
        description="Open rounds by publishing the global model (retained), "
        "accept each node's update once per round, close the round when every "
        "expected node has reported (or, once --round-timeout has passed, when "
        "--min-nodes have), apply FedAvg weighted by examples "
        "(each node's weight and update size bounded by the round's medians: --aggregation), "
        "publish metrics. Exits after --rounds rounds.",
        epilog="Exit status: 0 when the last round has closed; 130 when stopped (Ctrl-C, "
        "SIGTERM) before; 2 on a configuration error: bad settings, a refused login, a "
        "state directory in use or holding another run.",
    )
    _add_common(p)
    p.add_argument(
        "--model", type=_model, default="digits-mlp", help="architecture (default digits-mlp)"
    )
    p.add_argument(
        "--nodes", type=_positive_int, default=10, help="nodes expected each round (default 10)"
    )
    p.add_argument(
        "--min-nodes",
        type=_positive_int,
        default=None,
        help="quorum at the deadline (default: more than half of --nodes)",
    )
    p.add_argument(
        "--round-timeout",
        type=_deadline,
        default=300.0,
        metavar="SECONDS",
        help="deadline of a round: past it, the round closes with the updates it has once "
        "--min-nodes have reported (default 300; none: wait for every expected node)",
    )
    p.add_argument("--rounds", type=_positive_int, default=30, help="rounds to run (default 30)")
    p.add_argument(
        "--learning-rate", type=_positive_float, default=0.1, help="nodes' SGD rate (default 0.1)"
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=16, help="nodes' batch size (default 16)"
    )
    p.add_argument(
        "--local-epochs", type=_positive_int, default=1, help="epochs per round (default 1)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="initial model and shuffling seed (default 0)"
    )
    p.add_argument(
        "--compression", type=_compression, default="dense", metavar="SPEC", help=COMPRESSION_HELP
    )
    p.add_argument(
        "--test-data",
        default="digits",
        metavar="digits|PATH.npz|none",
        help="evaluation set for test accuracy (default: the digits test split)",
    )
    p.add_argument(
        "--max-update-bytes",
        type=_positive_int,
        default=None,
        help="reject larger updates unread (default: dense model size + 64 KiB)",
    )
    p.add_argument("--report", type=Path, default=None, help="write report.json here at the end")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".fedmq-aggregator"),
        help="checkpoint and journal of the run, resumed after a crash or restart; "
        "locked while the aggregator runs (default ./.fedmq-aggregator)",
    )
    restart = p.add_mutually_exclusive_group()
    restart.add_argument(
        "--fresh",
        action="store_true",
        help="discard the run kept in --state-dir and start a new one",
    )
    restart.add_argument(
        "--rollback-to",
        type=_positive_int,
        default=None,
        metavar="ROUND",
        help="continue the run kept in --state-dir from the model that opened ROUND (one "
        "of the last 30 opened), forgetting the rounds after it; may come with another "
        "--aggregation, e.g. to leave a poisoned run. Give it once: every start with it "
        "rolls back again",
    )
    p.add_argument(
        "--node-ids",
        type=_node_ids,
        default=None,
        metavar="ID,ID,...",
        help="the fleet's node ids: updates from any other id are rejected (unknown_node), "
        "and --sample-fraction draws from them (default: any id; sampling draws from the "
        "nodes online)",
    )
    p.add_argument(
        "--sample-fraction",
        type=_fraction,
        default=1.0,
        metavar="F",
        help="ask a seeded random fraction F of the nodes to train each round, announced "
        "in the global model (default 1: every node)",
    )
    p.add_argument(
        "--aggregation",
        type=_aggregation,
        default="fedavg+clip-median:2+cap-examples:1.25",
        metavar="RULE",
        help="how a round's updates are combined: fedavg (weighted by examples), median or "
        "trimmed-mean:BETA (coordinate-wise, one vote per node, BETA < 0.5 cut from each "
        "side; they hold the round's updates in memory), optionally with +clip-norm:X or "
        "+clip-median:F (clip each update's L2 norm to X, or to F x the round's median "
        "norm) and, for fedavg, +cap-examples:C (count no node for more than C x the "
        "round's median num_examples). Default fedavg+clip-median:2+cap-examples:1.25: no "
        "single node can outweigh the fleet; plain fedavg trusts every claim "
        "(docs/aggregation.md)",
    )
    p.add_argument(
        "--clip-norm",
        type=_positive_float,
        default=None,
        metavar="X",
        help="clip each update's delta to L2 norm X before aggregating "
        "(the same as adding +clip-norm:X to --aggregation; replaces the default's "
        "clip-median:2)",
    )

    p = sub.add_parser(
        "node",
        help="train on local data and publish updates",
        description="Wait for the retained global model, train it on local data "
        "with JAX, publish the parameter delta (QoS 1), report status. Reconnects "
        "with back-off when the broker goes away.",
        epilog="Exit status: 0 when the run is over (with --exit-when-done); 130 when "
        "stopped (Ctrl-C, SIGTERM) before; 2 on a configuration error: bad settings, a "
        "refused login, a state directory in use, data that cannot train the model.",
    )
    _add_common(p)
    p.add_argument("--node-id", required=True, metavar="ID", help="this device's id (topic level)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data",
        type=Path,
        metavar="PATH.npz",
        help="local data: arrays x (n, features) and y (n,)",
    )
    data.add_argument(
        "--demo-shard",
        type=_shard,
        metavar="INDEX/COUNT",
        help="built-in digits data: shard INDEX of COUNT (needs scikit-learn)",
    )
    p.add_argument(
        "--partition",
        type=_partition,
        default="iid",
        help="for --demo-shard: iid or dirichlet:ALPHA",
    )
    p.add_argument("--partition-seed", type=int, default=0, help="for --demo-shard (default 0)")
    p.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="node state incl. the JAX compile cache, locked while the node runs "
        "(default ./.fedmq-node/FEDERATION/NODE_ID)",
    )
    p.add_argument(
        "--exit-when-done", action="store_true", help="exit when the federation finishes"
    )

    p = sub.add_parser(
        "monitor",
        help="watch node status and round metrics live",
        description="Subscribe to a federation's status, server and metrics topics "
        "and show them: a live view on a terminal, or one JSON object per line.",
    )
    _add_common(p)
    p.add_argument("--json", action="store_true", help="one JSON object per message, for scripts")
    p.add_argument(
        "--until-done", action="store_true", help="exit after the federation's last round"
    )
    p.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="give up (exit 1) after this long",
    )

    p = sub.add_parser(
        "report",
        help="summarise a report.json, and chart it with --plot",
        description="Print a short summary of a report.json (from fedmq aggregator --report "
        "or fedmq demo --report): accuracy, loss, bytes and rejections. With --plot, also "
        "draw test accuracy, loss and bytes per round (uplink and downlink) as a picture: "
        "PNG, or SVG if the file name ends in .svg. --plot needs matplotlib: "
        "pip install 'fedmq[plot]'.",
    )
    p.add_argument("report_path", type=Path, metavar="REPORT.json", help="the report to read")
    p.add_argument(
        "--plot",
        type=_plot_path,
        default=None,
        metavar="FILE.png|FILE.svg",
        help="write the chart here",
    )
    _add_common(p, broker_required=False)

    p = sub.add_parser(
        "demo",
        help="run a whole federation on this machine",
        description="Start mosquitto on a free loopback port (or use --broker), an "
        "aggregator and N node processes, run the digits-mlp reference task, show "
        "progress, print a summary and write a JSON report. A child that dies before "
        "the run is over is restarted with the same arguments (see --max-restarts).",
    )
    p.add_argument("--nodes", type=_positive_int, default=10, help="node processes (default 10)")
    p.add_argument("--rounds", type=_positive_int, default=30, help="rounds (default 30)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed for init, split and shuffles (default 0)"
    )
    p.add_argument(
        "--compression", type=_compression, default="dense", metavar="SPEC", help=COMPRESSION_HELP
    )
    p.add_argument(
        "--model", type=_model, default="digits-mlp", help="architecture (default digits-mlp)"
    )
    p.add_argument(
        "--partition", type=_partition, default="iid", help="iid (default) or dirichlet:ALPHA"
    )
    p.add_argument(
        "--report", type=Path, default=None, metavar="PATH", help="write report.json here"
    )
    p.add_argument(
        "--broker",
        type=_broker,
        default=None,
        metavar="HOST:PORT",
        help="use this broker instead of starting one",
    )
    p.add_argument(
        "--federation", default="demo", metavar="ID", help="federation id (default demo)"
    )
    p.add_argument(
        "--round-timeout",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help="close rounds at this deadline with whoever reported, if more than half of "
        "the nodes have (default: the aggregator's, 300)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep data and logs here (default: temp, removed)",
    )
    p.add_argument(
        "--max-restarts",
        type=_count,
        default=3,
        metavar="N",
        help="restart a child that dies before the run is over up to N times, after a short "
        "back-off (default 3 per child; 0 = fail at once)",
    )
    _add_common(p, broker_required=False)
    for command in config.COMMANDS:  # --config PATH: settings from a TOML file
        config.add_option(sub.choices[command])
    return parser


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    return stop


def entry() -> None:
    """The ``fedmq`` command (and ``python -m fedmq``): ``main``, then exit. With JAX loaded
    (a node) the interpreter's own teardown of JAX and XLA takes 1-2 s, after every clean-up
    of ours is done: skip it, so Ctrl-C ends a node within a second."""
    code = main()
    if "jax" in sys.modules:
        import logging

        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):  # a reader gone away: nothing to keep
                stream.flush()
        os._exit(code)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> int:
    try:
        args = config.parse_args(build_parser(), argv, os.environ)
    except config.ConfigError as error:
        command = next((a for a in argv or sys.argv[1:] if not a.startswith("-")), "")
        print(f"fedmq {command}: error: {error}", file=sys.stderr)
        return 2
    logs.configure(json=args.log_json, level=args.log_level)
    stop = _stop_on_signals()
    try:
        _with_credentials(args)
        return dispatch(args, stop)
    except BrokenPipeError:
        # The reader went away (`fedmq report r.json | head`): stop quietly, with the status
        # a shell shows for a tool ended by SIGPIPE. Python's last flush goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except (ValueError, RuntimeError, OSError) as error:
        print(f"fedmq {args.command}: error: {error}", file=sys.stderr)
        return 2


def dispatch(args: argparse.Namespace, stop: threading.Event) -> int:
    if args.command == "broker" and args.broker_command is not None:
        return _broker_admin(args)
    if args.command == "broker":
        from fedmq.broker.process import PROJECT_CONF, Mosquitto

        conf = args.mosquitto_conf or PROJECT_CONF
        with Mosquitto(port=args.port or None, config=conf, die_with_parent=True) as broker:
            print(
                f"mosquitto listening on {broker.address} (pid {broker.pid}); Ctrl-C stops it",
                flush=True,
            )
            while not stop.wait(0.5):
                if broker.process is None or broker.process.poll() is not None:
                    print(
                        f"fedmq broker: error: mosquitto exited: {broker.failure()}",
                        file=sys.stderr,
                    )
                    return 1
        return 0
    if args.command == "aggregator":
        from fedmq.aggregator.app import AggregatorConfig, run

        return run(
            AggregatorConfig(
                broker=args.broker,
                federation=args.federation,
                model=args.model,
                rounds=args.rounds,
                nodes=args.nodes,
                min_nodes=args.min_nodes,
                round_timeout=args.round_timeout,
                learning_rate=args.learning_rate,
                batch_size=args.batch_size,
                local_epochs=args.local_epochs,
                seed=args.seed,
                compression=args.compression,
                test_data=None if args.test_data == "none" else args.test_data,
                max_update_bytes=args.max_update_bytes,
                report=args.report,
                state_dir=args.state_dir,
                fresh=args.fresh,
                rollback_to=args.rollback_to,
                node_ids=args.node_ids,
                sample_fraction=args.sample_fraction,
                aggregation=args.aggregation,
                clip_norm=args.clip_norm,
            ),
            stop,
        )
    if args.command == "node":
        # One XLA thread per node: a device trains one tiny model, and on a shared machine
        # ten nodes must not each spawn a thread pool per core. Set before JAX is imported.
        os.environ.setdefault(
            "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        from fedmq.node.app import NodeConfig, default_state_dir
        from fedmq.node.app import run as run_node

        return run_node(
            NodeConfig(
                broker=args.broker,
                federation=args.federation,
                node_id=args.node_id,
                state_dir=args.state_dir or default_state_dir(args.federation, args.node_id),
                data=args.data,
                demo_shard=args.demo_shard,
                partition=args.partition,
                partition_seed=args.partition_seed,
                exit_when_done=args.exit_when_done,
            ),
            stop,
        )
    if args.command == "monitor":
        from fedmq.monitor import run as run_monitor

        return run_monitor(
            args.broker,
            args.federation,
            stop,
            as_json=args.json,
            until_done=args.until_done,
            timeout=args.timeout,
        )
    if args.command == "report":
        from fedmq.report import read_report, summary_lines

        report = read_report(args.report_path)
        print("\n".join(summary_lines(report)))
        if args.plot is not None:
            from fedmq.plot import save_plot

            save_plot(report, args.plot)
            print(f"chart written to {args.plot}")
        return 0
    if args.command == "demo":
        # The demo configures its children itself: they must not pick up the settings
        # (FEDMQ_CONFIG, FEDMQ_<SECTION>_<KEY>) of a deployment on this machine.
        for name in [name for name in os.environ if name.startswith("FEDMQ_")]:
            del os.environ[name]
        from fedmq.demo import DemoConfig
        from fedmq.demo import run as run_demo

        return run_demo(
            DemoConfig(
                nodes=args.nodes,
                rounds=args.rounds,
                seed=args.seed,
                compression=args.compression,
                model=args.model,
                partition=args.partition,
                report=args.report,
                broker=args.broker,
                federation=args.federation,
                workdir=args.workdir,
                round_timeout=args.round_timeout,
                max_restarts=args.max_restarts,
            ),
            stop,
        )
    raise AssertionError(args.command)
