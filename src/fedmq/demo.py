"""``fedmq demo``: a real federation on one machine.

Its own mosquitto (or ``--broker``), one aggregator process and N node processes, each its
own MQTT client as on separate devices, all on loopback. The demo watches the public
metrics topic like any monitoring script, shows progress, and writes report.json. Every
child runs in its own session and is ended by PID on exit, Ctrl-C or the demo's failure;
if the demo itself is killed (SIGKILL, nothing to catch), the kernel ends them
(``fedmq.lifeline``: every child is started from the main thread for that).

Children are supervised like systemd's ``Restart=on-failure`` on a device: one that dies
before the run is over is started again with the same arguments after a short back-off,
up to ``RestartPolicy.max_restarts`` times per child; past that the demo fails. A child
that exits 2, fedmq's exit status for a configuration error, is not restarted (it would
fail again): the demo stops at once with that child's one-line error.
"""

import os
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TextIO

import numpy as np
import structlog

from fedmq import mqtt as edge
from fedmq.aggregator.settings import DEFAULT_ROUND_TIMEOUT, AggregatorSettings
from fedmq.broker.process import Mosquitto
from fedmq.datasets import (
    DIGITS_CLASSES,
    DIGITS_FEATURES,
    DIGITS_TRAIN,
    NODE_FILES,
    TEST_FILE,
    Dataset,
    data_dir_files,
    digits,
    load_npz,
    partition,
    save_node_files,
)
from fedmq.demo_settings import DemoSettings
from fedmq.files import output_problem
from fedmq.lifeline import tied
from fedmq.model_file import save_problem
from fedmq.models import get_model
from fedmq.node.settings import NodeSettings
from fedmq.report import (
    build_report,
    downlink_entry,
    dp_sgd_entry,
    final_delivery_entry,
    mode_entry,
    proximal_mu_entry,
    slow_nodes_entry,
    write_report,
)
from fedmq.schemas import (
    RoundMetrics,
    SchemaError,
    Topics,
    decode_metrics,
    decode_server_status,
)
from fedmq.settings import buffer_size, to_argv
from fedmq.tasks.builtin_data import DIGITS_TASKS, node_limit, split_builtin
from fedmq.tasks.registry import EXAMPLES, TaskError, is_builtin, load_task

log = structlog.get_logger()


def child_argv(
    config: DemoSettings, address: edge.BrokerAddress, workdir: Path, test_path: Path | None,
    node_paths: list[Path],
) -> dict[str, list[str]]:  # fmt: skip
    """The command line of each child (``aggregator``, ``node-01``, ...), made from their
    settings objects. The aggregator keeps its checkpoint and journal in the workdir, so a
    restarted aggregator resumes this run; without a test set (``test_path`` None) it
    evaluates federated (``--test-data none``: its --eval-fraction auto is then > 0)."""
    aggregator = AggregatorSettings(
        broker=address,
        federation=config.federation,
        task=config.task_spec,
        nodes=config.node_count,
        rounds=config.rounds,
        seed=config.seed,
        test_data=None if test_path is None else str(test_path),
        compression=config.compression,
        downlink_compression=config.downlink_compression,
        final_downlink_compression=config.final_downlink_compression,
        eval_fraction=config.eval_fraction,
        proximal_mu=config.proximal_mu,
        dp_sgd=config.dp_sgd,
        dp_fedavg=config.dp_fedavg,
        server_optimizer=config.server_optimizer,
        mode=config.mode,
        buffer=config.buffer,
        staleness=config.staleness,
        max_staleness=config.max_staleness,
        log_json=True,
        state_dir=workdir / "aggregator",
    )
    if config.save_model is not None:  # absolute: the file is the caller's, not the child's
        aggregator = replace(aggregator, save_model=config.save_model.absolute())
    if config.round_timeout is not None:  # else the aggregator's default, or more
        aggregator = replace(aggregator, round_timeout=config.round_timeout)
    elif round_deadline(config.node_count) > DEFAULT_ROUND_TIMEOUT:
        aggregator = replace(aggregator, round_timeout=round_deadline(config.node_count))
    if config.min_nodes is not None:  # the same
        aggregator = replace(aggregator, min_nodes=config.min_nodes)
    if config.local_epochs is not None:  # the same
        aggregator = replace(aggregator, local_epochs=config.local_epochs)
    if config.sample_fraction is not None:  # the same
        aggregator = replace(aggregator, sample_fraction=config.sample_fraction)
    argv = {"aggregator": ["aggregator", *to_argv(aggregator)]}
    slow = slow_node_ids(config, len(node_paths))
    for index, path in enumerate(node_paths):
        node_id = node_name(index)
        node = NodeSettings(
            broker=address,
            federation=config.federation,
            node_id=node_id,
            task=config.task_spec,
            data=path,
            state_dir=workdir / node_id,
            exit_when_done=True,
            log_json=True,
            max_epsilon=config.max_epsilon,
        )
        if node_id in slow and config.slow_nodes is not None:
            node = replace(node, train_delay=config.slow_nodes[1])
        argv[node_id] = ["node", *to_argv(node)]
    return argv


# A round's deadline grows by this much per node past the aggregator's default (300 s):
# one machine trains its nodes in turn, ~3 ms each on a core for digits-mlp, so this
# leaves a hundredfold margin and changes nothing below 1,000 nodes.
DEADLINE_PER_NODE = 0.3


def round_deadline(nodes: int) -> float:
    """The demo's --round-timeout when none is given: the aggregator's default (300 s), or
    DEADLINE_PER_NODE a node if that is more."""
    return max(DEFAULT_ROUND_TIMEOUT, DEADLINE_PER_NODE * nodes)


def group_children(
    argv: dict[str, list[str]], per_process: int, directory: Path
) -> dict[str, list[str]]:
    """``argv`` (from ``child_argv``) with the nodes run ``per_process`` to a process: each
    ``group-NN`` a ``fedmq node-group`` of a file in ``directory`` listing its nodes'
    command lines, the lines exactly the ``fedmq node`` ones (one per process: unchanged)."""
    if per_process <= 1:
        return argv
    nodes = [name for name in argv if name != "aggregator"]
    groups = [nodes[start : start + per_process] for start in range(0, len(nodes), per_process)]
    width = max(2, len(str(len(groups))))
    directory.mkdir(parents=True, exist_ok=True)
    grouped = {name: args for name, args in argv.items() if name == "aggregator"}
    for number, members in enumerate(groups, start=1):
        name = f"group-{number:0{width}d}"
        path = directory / f"{name}.txt"
        path.write_text("".join(shlex.join(argv[node][1:]) + "\n" for node in members))
        grouped[name] = ["node-group", str(path), "--log-json"]
    return grouped


def node_name(index: int) -> str:
    """The demo's id of its node ``index`` (from 0): node-01, node-02, ..."""
    return f"node-{index + 1:02d}"


def slow_node_ids(config: DemoSettings, nodes: int) -> tuple[str, ...]:
    """The nodes ``--slow-nodes N:SECONDS`` slows down: the last N of ``nodes``."""
    count = 0 if config.slow_nodes is None else config.slow_nodes[0]
    return tuple(node_name(index) for index in range(nodes - count, nodes))


def quorum_problem(config: DemoSettings, nodes: int) -> str | None:
    """Why ``--slow-nodes`` or ``--min-nodes`` does not fit ``nodes`` nodes, or None."""
    if config.slow_nodes is not None and config.slow_nodes[0] > nodes:
        count, seconds = config.slow_nodes
        return (
            f"--slow-nodes {count}:{seconds:g}: the demo has only {nodes} nodes: slow down "
            f"at most {nodes}"
        )
    if config.min_nodes is not None and config.min_nodes > nodes:
        return (
            f"--min-nodes {config.min_nodes}: more than the demo's {nodes} nodes: give at "
            f"most {nodes}"
        )
    return None


def config_problem(config: DemoSettings) -> str | None:
    """What makes ``config`` unworkable, with the fix, or None: found before anything starts
    rather than by every child failing, or by a report that cannot be written at the end."""
    problem = task_problem(config.task_spec) or (
        data_dir_problem(config) if config.data_dir is not None else builtin_data_problem(config)
    )
    if problem is not None:
        return problem
    nodes = config.node_count
    if config.data_dir is not None:  # one node per node file
        nodes = len(data_dir_files(config.data_dir)[0])
    problem = quorum_problem(config, nodes)
    if problem is not None:
        return problem
    if config.report is not None:
        problem = output_problem(config.report)
        if problem is not None:
            return f"--report {config.report}: {problem}"
    if config.save_model is not None:
        problem = save_problem(config.save_model)
        if problem is not None:
            return f"--save-model {config.save_model}: {problem}"
    return None


def task_problem(spec: str) -> str | None:
    """Why the task ``spec`` names cannot be loaded here (a typo in the module or the
    attribute, a missing package, not a Task), or None: the children would fail alike, after
    the broker had started. The built-in tasks need no check (and no JAX here)."""
    if is_builtin(spec) or spec in EXAMPLES:
        return None
    try:
        load_task(spec)
    except TaskError as error:
        return str(error)
    return None


def builtin_data_problem(config: DemoSettings) -> str | None:
    """Why the task's built-in data cannot serve ``config`` (no --data-dir), or None."""
    spec = config.task_spec
    if not is_builtin(spec) and spec not in EXAMPLES:
        return (
            f"task {spec} has no built-in data: give --data-dir DIR holding one {NODE_FILES} "
            f"per node (node-01.npz, node-02.npz, ...: arrays x and y) and, for central "
            f"evaluation, {TEST_FILE} (docs/tasks.md)"
        )
    model = get_model(spec) if is_builtin(spec) else None
    if model is not None and (model.sizes[0], model.sizes[-1]) != (
        DIGITS_FEATURES,
        DIGITS_CLASSES,
    ):
        features, classes = model.sizes[0], model.sizes[-1]
        return (
            f"task {spec} takes {features} features and {classes} classes; the demo's "
            f"digits data has {DIGITS_FEATURES} features and {DIGITS_CLASSES} classes: use "
            f"--task digits-mlp, or mlp:{DIGITS_FEATURES}-...-{DIGITS_CLASSES} "
            f"(e.g. mlp:{DIGITS_FEATURES}-32-{DIGITS_CLASSES})"
        )
    limit = DIGITS_TRAIN if model is not None else node_limit(spec)
    if limit is not None and config.node_count > limit:
        if model is not None or spec in DIGITS_TASKS:
            data = f"the digits data has {DIGITS_TRAIN} training samples to split"
        else:
            data = f"the built-in data of task {spec} is for at most {limit} nodes"
        return f"--nodes {config.node_count}: {data}: use at most {limit}"
    return None


def data_dir_problem(config: DemoSettings) -> str | None:
    """Why ``--data-dir`` cannot serve ``config``, or None: a directory with node files, as
    many as ``--nodes`` if given, each a valid .npz of the same shapes as the first."""
    directory = config.data_dir
    assert directory is not None
    if not directory.is_dir():
        what = "is not a directory" if directory.exists() else "does not exist"
        return f"--data-dir {directory}: it {what}: give the directory holding the nodes' .npz"
    node_files, test_file = data_dir_files(directory)
    if not node_files:
        return (
            f"--data-dir {directory}: no {NODE_FILES} files in it: write one per node "
            f"(node-01.npz, node-02.npz, ...: numpy.savez(PATH, x=x, y=y)) and, for central "
            f"evaluation, {TEST_FILE}"
        )
    if config.nodes is not None and config.nodes != len(node_files):
        return (
            f"--nodes {config.nodes}: --data-dir {directory} has {len(node_files)} node files "
            f"({NODE_FILES}), one per node: leave --nodes out, or add or remove node files"
        )
    if config.partition != "iid":
        return (
            f"--partition {config.partition}: with --data-dir the node files are the split: "
            "leave --partition out"
        )
    first: tuple[Path, str] | None = None
    for path in [*node_files, *([test_file] if test_file is not None else [])]:
        try:
            data = load_npz(path)
        except ValueError as error:
            return f"--data-dir {directory}: {error}"
        shapes = f"x (n, {', '.join(map(str, data.x.shape[1:]))}) and y {_y_kind(data.y)}"
        if first is None:
            first = (path, shapes)
        elif shapes != first[1]:
            return (
                f"--data-dir {directory}: {path.name} holds {shapes} where {first[0].name} "
                f"holds {first[1]}: one task trains them all, so every file needs the same "
                "shapes and kind of y"
            )
    return None


def _y_kind(y: np.ndarray) -> str:
    shape = "(n" + "".join(f", {size}" for size in y.shape[1:]) + ")"
    kind = "class ids" if np.issubdtype(y.dtype, np.integer) else "float targets"
    return f"{shape} of {kind}"


def child_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """A child's environment: ours without FEDMQ_CONFIG and FEDMQ_<SECTION>_<KEY>. The
    demo configures its children itself; they must not pick up the settings of a
    deployment on this machine."""
    return {name: value for name, value in environ.items() if not name.startswith("FEDMQ_")}


class ChildFailed(RuntimeError):
    """The demo cannot go on; ``exit_status`` is what ``fedmq demo`` exits with."""

    exit_status = 1


class ChildMisconfigured(ChildFailed):
    """A child exited with CONFIGURATION_ERROR: the run's settings cannot work."""

    exit_status = 2


CONFIGURATION_ERROR = 2  # what `fedmq <command>` exits with for a bad setting (cli.main)


@dataclass(frozen=True, kw_only=True)
class RestartPolicy:
    """systemd's ``Restart=on-failure`` for the demo's children.

    A child that ends before the run is over (non-zero exit, killed by a signal, or exit 0
    with rounds still to come) is started again after ``delay(n)`` seconds; the back-off
    doubles per restart of that child. An exit 0 is given ``clean_exit_grace`` seconds for
    the run's last metrics to arrive before it counts as premature: a node exits as soon as
    it sees the final model, which may be just before the demo sees the last round.
    """

    max_restarts: int = 3
    backoff: float = 0.5
    max_backoff: float = 4.0
    clean_exit_grace: float = 3.0

    def delay(self, restarts: int) -> float:
        return min(self.max_backoff, self.backoff * 2**restarts)


Verdict = Literal["running", "done", "undecided", "failed"]


def exit_verdict(
    code: int | None, *, exited_for: float, run_done: bool, policy: RestartPolicy
) -> Verdict:
    """What a child's state means: "undecided" is a clean exit still in its grace period;
    "failed" means restart it (or give up, past the cap)."""
    if code is None:
        return "running"
    if code != 0:
        return "failed"
    if run_done:
        return "done"
    return "undecided" if exited_for < policy.clean_exit_grace else "failed"


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"exited with {code} ({signal.Signals(-code).name})"
        except ValueError:
            pass
    return f"exited with {code}"


@dataclass
class Child:
    args: list[str]
    proc: subprocess.Popen[bytes]
    restarts: int = 0
    exited_at: float | None = None  # when the supervisor first saw the current process gone
    restart_at: float | None = None  # a restart is due then (back-off)


class Children:
    """Child processes started by the demo, each logging to its own file (appended to
    when it is restarted, so nothing a crashed process wrote is lost)."""

    def __init__(self, logs: Path, policy: RestartPolicy) -> None:
        self.logs = logs
        self.policy = policy
        self.children: dict[str, Child] = {}

    @property
    def procs(self) -> dict[str, subprocess.Popen[bytes]]:
        return {name: child.proc for name, child in self.children.items()}

    def log_path(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def _popen(self, name: str, args: list[str], mode: str) -> subprocess.Popen[bytes]:
        with self.log_path(name).open(mode) as log_file:
            return subprocess.Popen(
                tied([sys.executable, "-m", "fedmq", *args]),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env=child_environment(os.environ),
            )

    def spawn(self, name: str, args: list[str]) -> None:
        self.children[name] = Child(args=args, proc=self._popen(name, args, "wb"))

    def restarts(self) -> dict[str, int]:
        """Restarts so far of each child that had any."""
        return {name: c.restarts for name, c in sorted(self.children.items()) if c.restarts}

    def tail(self, name: str) -> str:
        return self.log_path(name).read_text(errors="replace")[-1500:]

    def _error_line(self, name: str) -> str | None:
        """The one-line error (``fedmq node: error: ...``) the child's current process
        printed last, if any."""
        text = self.log_path(name).read_text(errors="replace")
        last_life = text.rpartition("--- fedmq demo: restart ")[2]
        errors = [
            line.strip()
            for line in last_life.splitlines()
            if line.startswith("fedmq ") and ": error: " in line
        ]
        return errors[-1] if errors else None

    def supervise(self, now: float, *, run_done: bool) -> list[str]:
        """Restart children that died before their job was done; return what was done, one
        line each. Raises ``ChildFailed`` for a child past the cap, or one that failed
        after the run was over (there is nothing left to restart it for)."""
        events = []
        for name, child in self.children.items():
            if child.restart_at is not None:
                if run_done:  # the run finished without it: nothing left to do
                    child.restart_at = None
                elif now >= child.restart_at:
                    child.restarts += 1
                    child.restart_at = child.exited_at = None
                    with self.log_path(name).open("ab") as log_file:
                        log_file.write(
                            f"\n--- fedmq demo: restart {child.restarts} of {name} ---\n".encode()
                        )
                    child.proc = self._popen(name, child.args, "ab")
                    events.append(f"{name} restarted (pid {child.proc.pid})")
                continue
            code = child.proc.poll()
            if code is None:
                continue
            if child.exited_at is None:
                child.exited_at = now
            verdict = exit_verdict(
                code, exited_for=now - child.exited_at, run_done=run_done, policy=self.policy
            )
            if verdict != "failed":
                continue
            what = f"{name} (pid {child.proc.pid}) {describe_exit(code)}"
            if code == CONFIGURATION_ERROR:
                line = self._error_line(name)
                if line is not None:
                    raise ChildMisconfigured(
                        f"{what}, a configuration error (not restarted): {line}"
                    )
                raise ChildMisconfigured(
                    f"{what}, a configuration error (not restarted):\n{self.tail(name)}"
                )
            if code == 0:
                what += " before the run was over"
            if run_done:
                raise ChildFailed(f"{what}:\n{self.tail(name)}")
            if child.restarts >= self.policy.max_restarts:
                raise ChildFailed(
                    f"{what}; giving up after {child.restarts} restarts"
                    f" (--max-restarts {self.policy.max_restarts}):\n{self.tail(name)}"
                )
            delay = self.policy.delay(child.restarts)
            child.restart_at = now + delay
            events.append(
                f"{what}; restarting in {delay:.1f} s"
                f" ({child.restarts + 1} of {self.policy.max_restarts})"
            )
        return events

    def wait_all(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` for every child to exit; the names of those still running."""
        deadline = time.monotonic() + timeout
        running = []
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                running.append(name)
        return running

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_node_data(config: DemoSettings, directory: Path) -> tuple[list[Path], Path | None]:
    """The node files and the test set (None: no central evaluation) of ``config``: those
    of --data-dir as they are, else the task's built-in data split per --partition into
    ``directory``: the digits MLPs' exactly as always (the reference run), the built-in
    examples' through ``split_builtin``."""
    if config.data_dir is not None:
        return data_dir_files(config.data_dir)
    nodes, spec = config.node_count, config.task_spec
    if not is_builtin(spec):
        split = split_builtin(spec, nodes, config.partition, config.seed)
        if split is None:  # config_problem refuses it first
            raise ValueError(f"task {spec} has no built-in data: give --data-dir")
        shards, test = split
        return save_node_files(shards, test, directory), directory / TEST_FILE
    train, test = digits()
    paths = []
    for index, shard in enumerate(partition(train.y, nodes, config.partition, config.seed)):
        path = directory / f"{node_name(index)}.npz"
        Dataset(train.x[shard], train.y[shard]).save(path)
        paths.append(path)
    test_path = directory / "test.npz"
    test.save(test_path)
    return paths, test_path


def headline(m: RoundMetrics) -> str:
    """The round's figure on a progress line: its test accuracy, else the task's own first
    test metric (a regression's ``mse``, say), else its test loss; without a test set the
    same from the federated metrics (of the round's starting model)."""
    central = (m.metrics.central if m.metrics else None) or {}
    federated = (m.metrics.federated if m.metrics else None) or {}
    if m.accuracy is not None:
        return f"accuracy {m.accuracy:.4f}"
    for metrics, prefix in ((central, ""), (federated, "federated ")):
        name = lead_metric(metrics)
        if name is not None:
            return f"{prefix}{name} {metrics[name]:.4f}"
    return "accuracy -"


def lead_metric(metrics: Mapping[str, float]) -> str | None:
    """``accuracy`` if measured, else the first of the task's own metrics by name, else
    ``loss``; None if there are none."""
    if "accuracy" in metrics:
        return "accuracy"
    own = sorted(name for name in metrics if name != "loss")
    return own[0] if own else ("loss" if "loss" in metrics else None)


class Progress:
    """One line per round; rewritten in place on a terminal. Restarts get a line of their own."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total = total
        self.out = out
        self.tty = out.isatty()
        self.restarts = 0  # shown on round lines once there are any
        self._line = ""  # the round line shown in place (terminal only)

    def round(self, m: RoundMetrics) -> None:
        line = (
            f"round {m.round:>3}/{self.total}  {headline(m)}  nodes {len(m.participants):>3}"
            f"  up {m.uplink_bytes:>8} B  down {m.downlink_bytes:>8} B  {m.seconds * 1000:8.1f} ms"
        )
        if self.restarts:
            line += f"  restarts {self.restarts}"
        if self.tty:
            last = m.round == self.total
            self.out.write("\r" + line + ("\n" if last else ""))
            self._line = "" if last else line
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def note(self, text: str) -> None:
        if self.tty:  # above the round line, which stays at the bottom
            self.out.write(f"\r\x1b[K{text}\n{self._line}")
        else:
            self.out.write(text + "\n")
        self.out.flush()


def run(config: DemoSettings, stop: threading.Event, out: TextIO = sys.stdout) -> int:
    problem = config_problem(config)
    if problem is not None:
        raise ValueError(problem)
    if config.data_dir is not None:  # one node per node file
        config = replace(config, nodes=len(data_dir_files(config.data_dir)[0]))
    workdir = config.workdir or Path(tempfile.mkdtemp(prefix="fedmq-demo-"))
    try:
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        (workdir / "logs").mkdir(exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"--workdir {workdir}: cannot use it ({error.strerror or error}): choose a "
            "directory you can write"
        ) from None
    broker = None if config.broker else Mosquitto(die_with_parent=True)
    children = Children(workdir / "logs", RestartPolicy(max_restarts=config.max_restarts))
    client = None
    started = time.monotonic()
    try:
        node_paths, test_path = write_node_data(config, workdir / "data")
        if broker is not None:
            broker.start()
        address = config.broker or edge.BrokerAddress(broker.host, broker.port)  # type: ignore[union-attr]
        topics = Topics(config.federation)
        inbox: queue.Queue[edge.Received] = queue.Queue()
        ready = threading.Event()
        client = edge.make_client(
            edge.make_client_id(config.federation, "demo", edge.unique_suffix()),
            # metrics, and the server's done with the final model's delivery (its count)
            subscriptions=[(topics.metrics, 1), (topics.server, 1)],
            inbox=inbox,
            ready=ready,
        )
        edge.start(client, address)
        if not ready.wait(10):
            if config.broker is not None:  # the user's broker: a configuration error
                raise ValueError(
                    f"no MQTT broker answered at {address} within 10 s: check --broker, or "
                    "leave it out and the demo starts its own"
                )
            raise ChildFailed(f"could not subscribe at the broker {address}")
        split = (
            f"partition {config.partition}"
            if config.data_dir is None
            else f"data {config.data_dir} ({'with' if test_path else 'no'} {TEST_FILE})"
        )
        out.write(
            f"fedmq demo: {config.node_count} nodes, {config.rounds} rounds, task "
            f"{config.task_spec}, {split}, compression {config.compression},\n"
            f"broker {address}, logs in {workdir / 'logs'}\n"
        )
        # Each demo is a new run: a run kept in the same --workdir by an earlier demo is
        # discarded.
        shutil.rmtree(workdir / "aggregator", ignore_errors=True)
        argv = child_argv(config, address, workdir, test_path, node_paths)
        argv = group_children(argv, config.nodes_per_process, workdir / "groups")
        if config.nodes_per_process > 1:
            out.write(
                f"{len(argv) - 1} node processes of up to {config.nodes_per_process} nodes "
                f"(fedmq node-group {workdir / 'groups'}/group-*.txt)\n"
            )
        for name, args in argv.items():
            children.spawn(name, args)
        progress = Progress(config.rounds, out)
        rounds: dict[int, RoundMetrics] = {}
        final_count: tuple[int | None, int] | None = None  # from the server's done
        while True:
            if stop.is_set():
                out.write("\ninterrupted; stopping every process the demo started\n")
                return 130
            run_done = len(rounds) >= config.rounds
            for event in children.supervise(time.monotonic(), run_done=run_done):
                progress.restarts = sum(children.restarts().values())
                progress.note(event)
            if run_done:
                break
            if not rounds and time.monotonic() - started > config.first_round_timeout:
                raise ChildFailed(
                    f"no round finished within {config.first_round_timeout:.0f} s "
                    "(the node logs say why; if they are still compiling or training, "
                    "give them longer with --start-timeout SECONDS)"
                )
            try:
                received = inbox.get(timeout=0.2)
            except queue.Empty:
                continue
            if received.topic == edge.CONNECTED:
                continue
            if received.topic == topics.server:
                final_count = final_count_of(received) or final_count
                continue
            try:
                metrics = decode_metrics(received.payload)
            except SchemaError as error:
                log.warning("demo.bad_metrics", reason=str(error))
                continue
            new = metrics.round not in rounds
            rounds[metrics.round] = metrics  # a repeat (aggregator restart) supersedes
            if new:
                progress.round(metrics)
        running = children.wait_all(timeout=30 + 0.05 * config.node_count)
        if running:
            raise ChildFailed(
                f"processes did not exit after the last round: {', '.join(running)};"
                f" the end of {running[0]}'s log:\n{children.tail(running[0])}"
            )
        children.supervise(time.monotonic(), run_done=True)
        if final_count is None:  # the aggregator sent it before it left: on its way here
            final_count = await_final_count(inbox, topics, FINAL_COUNT_SECONDS)
        total = time.monotonic() - started
        report = build_report(
            list(rounds.values()),
            federation=config.federation,
            model=config.task_spec,
            nodes=config.node_count,
            rounds_requested=config.rounds,
            partition=config.partition if config.data_dir is None else None,
            **({} if config.data_dir is None else {"data_dir": str(config.data_dir)}),
            compression=config.compression,
            **downlink_entry(config.downlink_compression, config.final_downlink_compression),
            **proximal_mu_entry(config.proximal_mu),
            **dp_sgd_entry(config.dp_sgd, config.max_epsilon),
            **({} if config.dp_fedavg is None else {"dp_fedavg": config.dp_fedavg}),
            server_optimizer=config.server_optimizer,
            local_epochs=config.local_epochs or AggregatorSettings.local_epochs,
            **run_policy_entries(config),
            **mode_entry(
                config.mode,
                buffer_size(config.buffer, config.node_count),
                config.staleness,
                config.max_staleness,
            ),
            **final_delivery_entry(final_count),
            seed=config.seed,
            total_seconds=total,
            restarts=restart_counts(children.restarts()),
        )
        print_summary(report, out)
        if config.report is not None:
            write_report(config.report, report)
            out.write(f"report written to {config.report}\n")
        if config.save_model is not None:
            out.write(f"model written to {config.save_model} (fedmq.load_params reads it)\n")
        return 0
    except ChildFailed as error:
        out.write(f"\nfedmq demo failed: {error}\n")
        return error.exit_status
    finally:
        children.stop_all()
        if client is not None:
            edge.stop(client)
        if broker is not None:
            broker.stop()
        if config.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


# The most the demo waits, once the aggregator has left, for its server ``done`` (the
# final model's delivery count) to reach it.
FINAL_COUNT_SECONDS = 3.0


def final_count_of(received: edge.Received) -> tuple[int | None, int] | None:
    """The final model's delivery (bytes, nodes) from a server ``done`` that carries it,
    published live: a retained one is an earlier run's (docs/PROTOCOL.md 8.4)."""
    if received.retain:
        return None
    try:
        status = decode_server_status(received.payload)
    except SchemaError:
        return None
    return status.final_count


def await_final_count(
    inbox: queue.Queue[edge.Received], topics: Topics, seconds: float
) -> tuple[int | None, int] | None:
    """The final model's delivery from the server ``done`` still in ``inbox`` or arriving
    within ``seconds``; None if none comes (the aggregator counted none)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            received = inbox.get(timeout=min(left, 0.2))
        except queue.Empty:
            continue
        if received.topic == topics.server:
            count = final_count_of(received)
            if count is not None:
                return count
    return None


def run_policy_entries(config: DemoSettings) -> dict[str, Any]:
    """report.json's ``min_nodes``, ``round_timeout`` and ``slow_nodes``, each only when
    given (``round_timeout`` also when the demo lengthened it for a large fleet): a run
    without them reports what it did before."""
    entries: dict[str, Any] = {}
    if config.min_nodes is not None:
        entries["min_nodes"] = config.min_nodes
    if config.round_timeout is not None:
        entries["round_timeout"] = config.round_timeout
    elif round_deadline(config.node_count) > DEFAULT_ROUND_TIMEOUT:  # what the demo handed on
        entries["round_timeout"] = round_deadline(config.node_count)
    if config.slow_nodes is not None:
        slow = slow_node_ids(config, config.node_count)
        entries.update(slow_nodes_entry(slow, config.slow_nodes[1]))
    return entries


def restart_counts(by_child: dict[str, int]) -> dict[str, Any]:
    """report.json's ``restarts``: the total and each restarted child's count."""
    return {"total": sum(by_child.values()), "by_child": by_child}


def print_summary(report: dict[str, Any], out: TextIO) -> None:
    rows = report["rounds"]
    seconds = [r["seconds"] for r in rows]
    warm = seconds[1:] or seconds
    central = report["final_metrics"]["central"] or {}
    if "accuracy" in central:
        accuracy = f"final test accuracy {central['accuracy']:.4f} "
    elif central:  # a task without accuracy (a regression): all it measured
        accuracy = "final test " + ", ".join(f"{n} {v:.4f}" for n, v in central.items()) + " "
    else:
        accuracy = ""
    unit = "version" if report.get("mode") == "async" else "round"
    out.write(
        f"{accuracy}after {len(rows)} {unit}s in {report['total_seconds']:.1f} s\n"
        f"median {unit} {statistics.median(warm) * 1000:.1f} ms (after {unit} 1),"
        f" uplink {statistics.mean(r['uplink_bytes'] for r in rows):.0f} B/{unit},"
        f" downlink {statistics.mean(r['downlink_bytes'] for r in rows):.0f} B/{unit}\n"
    )
    federated = report["final_metrics"]["federated"]
    if federated:  # measured on the model the last round started from
        each = ", ".join(f"{name} {value:.4f}" for name, value in federated.items())
        out.write(f"federated metrics (nodes' held-out examples, last round): {each}\n")
    restarts = report["restarts"]
    if restarts["total"]:
        each = ", ".join(f"{name} {count}" for name, count in restarts["by_child"].items())
        out.write(f"restarts {restarts['total']} ({each})\n")
