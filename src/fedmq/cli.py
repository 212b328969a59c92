"""The ``fedmq`` command: the only place that parses arguments, reads the environment,
configures logging and installs signal handlers."""

import argparse
import contextlib
import io
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fedmq import config, launch, logs, settings
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.broker.settings import BrokerSettings
from fedmq.demo_settings import DemoSettings
from fedmq.monitor_settings import MonitorSettings
from fedmq.node.settings import (
    DEFAULT_STAGGER,
    NodeGroup,
    NodeSettings,
    group_lines,
    group_problem,
)

if TYPE_CHECKING:
    from fedmq.broker.bridge import Bridge

DESCRIPTION = """\
Federated learning for fleets of small devices over MQTT.

  fedmq demo        a whole federation on this machine (broker, aggregator, nodes)
  fedmq broker      run mosquitto with the project's mosquitto.conf
  fedmq aggregator  average the nodes' updates each round and publish the global model
  fedmq node        train on local data and publish updates (one per device)
  fedmq node-group  run many nodes in one process (simulation): FILE holds one
                    fedmq node command line per line
  fedmq monitor     watch node status and round metrics live
  fedmq report      summarise a report.json; --plot draws it as a PNG or SVG chart
  fedmq export      write the newest global model of an aggregator's state directory
                    to a file (.msgpack or .npz) for fedmq.load_params

node, aggregator, broker and monitor also read a TOML file (--config PATH or
$FEDMQ_CONFIG) and FEDMQ_<SECTION>_<KEY> variables: see deploy/config/.
Topics and messages are documented in docs/PROTOCOL.md.
"""


# Each command's settings, declared once: its options, TOML keys and variables come from it.
SETTINGS: dict[str, type] = {
    "broker": BrokerSettings,
    "aggregator": AggregatorSettings,
    "node": NodeSettings,
    "monitor": MonitorSettings,
    "demo": DemoSettings,
}


def _plot_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in (".png", ".svg"):
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .png or .svg")
    return path


def _model_path(text: str) -> Path:
    path = Path(text)
    if path.suffix not in (".msgpack", ".npz"):
        raise argparse.ArgumentTypeError(f"{text!r} does not end in .msgpack or .npz")
    return path


def _port(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1-65535)")
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
    p.add_argument(
        "--nodes", type=settings.node_id_list, required=True, metavar="ID,ID,...", help="node ids"
    )
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
        type=settings.model_name,
        default="digits-mlp",
        help="the federation's model: the broker's max_packet_size is derived from its size "
        "(default digits-mlp)",
    )
    site = p.add_argument_group(
        "site broker",
        "a site of a hierarchical federation (docs/hierarchy.md): the config also bridges "
        "the root broker's global model, its compact form and server status in",
    )
    site.add_argument("--site", metavar="NAME", help="the site's name (its aggregator's --site)")
    site.add_argument(
        "--upstream", metavar="HOST:PORT", help="the root broker (needed with --site)"
    )
    site.add_argument(
        "--upstream-ca", type=Path, metavar="PATH", help="the root broker's CA: bridge over TLS"
    )
    site.add_argument(
        "--upstream-username", metavar="NAME", help="the bridge's account at the root"
    )
    site.add_argument(
        "--upstream-password-file",
        type=Path,
        metavar="PATH",
        help="first line: the bridge's password at the root (copied into the config, "
        "which is then written mode 0600)",
    )
    for name, text in (
        ("add-node", "give a new node an account and a bundle"),
        ("revoke-node", "remove a node's account (then reload the broker)"),
    ):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("dir", type=Path, metavar="DIR", help="deployment directory")
        p.add_argument("node_id", metavar="ID", help="node id")


def _bridge(args: argparse.Namespace) -> "Bridge | None":
    """``broker init --site NAME --upstream HOST:PORT ...``'s bridge, or None without
    --site; ValueError (one line) if the options do not fit together."""
    from fedmq.broker.bridge import Bridge
    from fedmq.mqtt import BrokerAddress

    upstream_options = (args.upstream_ca, args.upstream_username, args.upstream_password_file)
    if args.site is None:
        if args.upstream is not None or any(o is not None for o in upstream_options):
            raise ValueError("--upstream and its credentials are for a site broker: add --site")
        return None
    if args.upstream is None:
        raise ValueError("--site needs --upstream HOST:PORT (the root broker)")
    root = BrokerAddress.parse(args.upstream)
    password = None
    if args.upstream_password_file is not None:
        lines = args.upstream_password_file.read_text().splitlines()
        password = lines[0] if lines else ""
    return Bridge(
        federation=args.federation, site=args.site, host=root.host, port=root.port,
        ca_file=args.upstream_ca.resolve() if args.upstream_ca else None,
        username=args.upstream_username, password=password,
    )  # fmt: skip


def _broker_admin(args: argparse.Namespace) -> int:
    import socket

    from fedmq.broker import credentials

    if args.broker_command == "init":
        hostnames = args.hostnames or [socket.gethostname(), "localhost", "127.0.0.1"]
        deployment = credentials.init_deployment(
            args.dir, nodes=list(args.nodes), federation=args.federation, hostnames=hostnames,
            tls_port=args.tls_port, listen=args.listen, mtls=args.mtls, model=args.model,
            bridge=_bridge(args),
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


def build_parser() -> settings.Parser:
    """The ``fedmq`` parser: each command's options come from its settings class."""
    parser = settings.Parser(
        prog="fedmq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = settings.add_command(
        parser,
        sub,
        "broker",
        SETTINGS["broker"],
        help="run mosquitto with the project's config",
        description="Run mosquitto with the project's mosquitto.conf (loopback "
        "listener), wait until it accepts connections, stop it on Ctrl-C.",
    )
    _add_broker_admin(p)
    settings.add_command(
        parser,
        sub,
        "aggregator",
        SETTINGS["aggregator"],
        help="average updates per round, publish the global model",
        description="Open rounds by publishing the global model (retained), "
        "accept each node's update once per round, close the round when every "
        "expected node has reported (or, once --round-timeout has passed, when "
        "--min-nodes have), apply FedAvg weighted by examples "
        "(each node's weight and update size bounded by the round's medians: --aggregation), "
        "add the mean delta to the model (or step a server optimiser with it: "
        "--server-optimizer), publish metrics. Exits after --rounds rounds.",
        epilog="Exit status: 0 when the last round has closed; 130 when stopped (Ctrl-C, "
        "SIGTERM) before; 2 on a configuration error: bad settings, a refused login, a "
        "state directory in use or holding another run.",
    )
    settings.add_command(
        parser,
        sub,
        "node",
        SETTINGS["node"],
        help="train on local data and publish updates",
        description="Wait for the retained global model, train it on local data "
        "with JAX, publish the parameter delta (QoS 1), report status. Reconnects "
        "with back-off when the broker goes away.",
        epilog="Exit status: 0 when the run is over (with --exit-when-done); 130 when "
        "stopped (Ctrl-C, SIGTERM) before; 2 on a configuration error: bad settings, a "
        "refused login, a state directory in use, data that cannot train the model.",
    )
    p = sub.add_parser(
        "node-group",
        help="run many nodes in one process (simulation)",
        description="Run the nodes listed in FILE in this one process, each exactly as "
        "fedmq node runs it: its own MQTT client (client id, persistent session, last will), "
        "state directory and status. FILE holds one node per line: the options of fedmq node "
        "(e.g. --node-id a --data a.npz --exit-when-done), shell-quoted; blank lines and # "
        "comments are skipped. The nodes take turns training on one thread and share one "
        "task object, so JAX compiles once per process; their first connects are --stagger "
        "apart. fedmq demo --nodes-per-process starts these.",
        epilog="Exit status: 0 when every node's run is over (with --exit-when-done); 130 "
        "when stopped (Ctrl-C, SIGTERM) before; 2 on a configuration error: a bad line "
        "(named by its number), too few open files allowed, or any node's error as fedmq "
        "node has it.",
    )
    p.add_argument("group_file", type=Path, metavar="FILE", help="the nodes, one per line")
    p.add_argument(
        "--stagger",
        type=settings.non_negative_float,
        default=DEFAULT_STAGGER,
        metavar="SECONDS",
        help=f"time between two nodes' first connects (default {DEFAULT_STAGGER:g})",
    )
    settings.add_options(p, logs.LogSettings)
    settings.add_command(
        parser,
        sub,
        "monitor",
        SETTINGS["monitor"],
        help="watch node status and round metrics live",
        description="Subscribe to a federation's status, server and metrics topics "
        "and show them: a live view on a terminal, or one JSON object per line.",
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
    settings.add_options(p, logs.LogSettings)

    p = sub.add_parser(
        "export",
        help="write the newest global model to a .msgpack or .npz file",
        description="Write the newest global model kept in an aggregator's state directory "
        "to a file: .msgpack is the global model message as published (docs/PROTOCOL.md), "
        ".npz one array per tensor plus fedmq:task, fedmq:model_id, fedmq:round... "
        "Safe while the aggregator runs (it takes no lock; the checkpoint is replaced "
        "atomically). Load it with fedmq.load_params(path, task) (docs/python-api.md).",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".fedmq-aggregator"),
        metavar="DIR",
        help="the aggregator's --state-dir (default ./.fedmq-aggregator)",
    )
    p.add_argument(
        "--out",
        type=_model_path,
        required=True,
        metavar="FILE.msgpack|FILE.npz",
        help="write the model here; the suffix chooses the format",
    )
    settings.add_options(p, logs.LogSettings)

    settings.add_command(
        parser,
        sub,
        "demo",
        SETTINGS["demo"],
        help="run a whole federation on this machine",
        description="Start mosquitto on a free loopback port (or use --broker), an "
        "aggregator and N node processes, run the digits-mlp reference task, show "
        "progress, print a summary and write a JSON report. A child that dies before "
        "the run is over is restarted with the same arguments (see --max-restarts).",
    )
    for command in config.COMMANDS:  # --config PATH: settings from a TOML file
        config.add_option(parser.commands[command])
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
    if args.command == "report":
        from fedmq.report import read_report, summary_lines

        report = read_report(args.report_path)
        print("\n".join(summary_lines(report)))
        if args.plot is not None:
            from fedmq.plot import save_plot

            save_plot(report, args.plot)
            print(f"chart written to {args.plot}")
        return 0
    if args.command == "node-group":
        return launch.run(read_node_group(args, os.environ), stop)
    if args.command == "export":
        from fedmq.export import export
        from fedmq.model_file import describe

        model = export(args.state_dir, args.out)
        print(f"{describe(model)}: written to {args.out}")
        return 0
    return launch.run(settings.build(SETTINGS[args.command], args), stop)


def read_node_group(args: argparse.Namespace, environ: Mapping[str, str]) -> NodeGroup:
    """The nodes of ``fedmq node-group FILE``: each line read as ``fedmq node`` reads its
    command line (with the environment and a line's --config); ValueError naming the file
    and the line for the first that cannot work."""
    path: Path = args.group_file
    try:
        text = path.read_text()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        lines = group_lines(text)
    except ValueError as error:
        raise ValueError(f"{path} {error}") from None
    if not lines:
        raise ValueError(f"{path} lists no node: write one fedmq node command line per line")
    parser = build_parser()
    nodes = []
    for number, words in lines:
        where = f"{path} line {number}"
        node = _node_of_line(parser, words, environ, where)
        for name, flag in (("log_json", "--log-json"), ("log_level", "--log-level")):
            given, default = getattr(node, name), getattr(NodeSettings, name)
            if given != default and given != getattr(args, name):
                raise ValueError(
                    f"{where}: {flag}: a node group logs one way: give it to fedmq node-group, "
                    "not on a line"
                )
        nodes.append(node)
    problem = group_problem(tuple(nodes), tuple(number for number, _ in lines))
    if problem is not None:
        raise ValueError(f"{path} {problem}")
    return NodeGroup(nodes=tuple(nodes), stagger=args.stagger)


def _node_of_line(
    parser: settings.Parser, words: list[str], environ: Mapping[str, str], where: str
) -> NodeSettings:
    """One line's node settings; ValueError ``<where>: <the error fedmq node would give>``."""
    said = io.StringIO()
    try:
        with contextlib.redirect_stderr(said), contextlib.redirect_stdout(said):
            parsed = config.parse_args(parser, ["node", *words], environ)
        if parsed.command != "node":  # a line cannot name another command
            raise ValueError("not the options of fedmq node")
        return settings.build(NodeSettings, parsed)
    except SystemExit:
        message = said.getvalue().strip().splitlines()
        error = next((line for line in message if ": error: " in line), None)
        if error is None:
            raise ValueError(f"{where}: --help is not a node's option") from None
        why = error.split(": error: ", 1)[1].rsplit(" (see fedmq", 1)[0]
        raise ValueError(f"{where}: {why} (see fedmq node --help)") from None
    except ValueError as error:  # ConfigError, or a settings check
        raise ValueError(f"{where}: {error}") from None
