"""``fedmq node-group FILE``: many nodes in one process, each the node ``fedmq node`` runs.

Every node is ``node.app``'s ``Node``, opened, fed and closed by the same functions as a
lone node (``open_node``, ``handle``, ``close_node``): its own MQTT client (client id,
persistent session, last will), its own locked state directory, its own retained status.
What the nodes of one process share is what one machine has once: one worker thread, so
they take turns training (the messages of all clients go into one queue, tagged with
their node); one task object per task name, so JAX compiles each step once per process;
one XLA compile cache (the first node's state directory's); one network thread, which
reads and writes every client's socket (``fedmq.netloop``: paho's own loop would be a
thread per client, and its ``select()`` cannot watch a socket numbered 1024 or more).

First connects are ``stagger`` seconds apart, so a thousand nodes do not hit the broker
with a thousand CONNECTs at once; after that each client reconnects with its own jittered
back-off (``fedmq.mqtt.make_client``). The process needs a few open files per node: its
soft limit is raised to what the group needs, or it refuses with the fix
(``fedmq.files.ensure_open_files``).
"""

import queue
import threading
import time
from collections import deque

import structlog

from fedmq import mqtt as edge
from fedmq.files import DirectoryLock, ensure_open_files
from fedmq.netloop import NetworkLoop
from fedmq.node.app import (
    Node,
    claim_state,
    close_node,
    enable_compile_cache,
    handle,
    load_local_data,
    open_node,
)
from fedmq.node.settings import NodeGroup
from fedmq.tasks.registry import load_task
from fedmq.tasks.task import Task

log = structlog.get_logger()

# Open files per node: its socket and its state directory's lock (the shared network
# loop needs no wake-up socket pair per client, as paho's own loop does), with room to
# spare (measured: /proc/PID/fd of a 250-node group, docs/scaling.md); plus what the
# interpreter, JAX and the log hold whatever the number of nodes.
FILES_PER_NODE = 4
FILES_BASE = 256
# A client that never connected is stopped without waiting for paho's thread longer than
# this in all (it may be in a connect attempt; the thread is a daemon).
STOP_WAIT_UNCONNECTED = 0.5


def open_files_needed(nodes: int) -> int:
    return FILES_BASE + FILES_PER_NODE * nodes


class Tagged:
    """One node's inbox: puts what its client receives into the group's queue, tagged."""

    def __init__(self, shared: "queue.Queue[tuple[int, edge.Received]]", index: int) -> None:
        self.shared = shared
        self.index = index

    def put(self, item: edge.Received, /) -> None:
        self.shared.put((self.index, item))


class TaskShelf:
    """One task object per task name for the whole process: the jitted steps are cached
    per task object (``fedmq.tasks.training``), so sharing it is compiling once."""

    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def load(self, spec: str) -> Task:
        if spec not in self._tasks:
            self._tasks[spec] = load_task(spec)
        return self._tasks[spec]


def run(group: NodeGroup, stop: threading.Event) -> int:
    """Run every node of ``group`` until each is done (those with ``exit_when_done``: exit
    0) or ``stop`` is set (130). A node that stops on an error stops the group: every node
    leaves (that one with the reason in its ``offline`` status), then the error is raised,
    as ``fedmq node`` raises it."""
    raised = ensure_open_files(open_files_needed(len(group.nodes)))
    if raised is not None:
        log.info("node_group.open_files_raised", soft_limit=raised)
    locks: list[DirectoryLock] = []
    try:
        for config in group.nodes:
            locks.append(claim_state(config))
        return _run(group, stop)
    finally:
        for lock in locks:
            lock.release()


def _run(group: NodeGroup, stop: threading.Event) -> int:
    network = NetworkLoop().start()
    try:
        return _run_nodes(group, stop, network)
    finally:
        network.close()


def _run_nodes(group: NodeGroup, stop: threading.Event, network: NetworkLoop) -> int:
    enable_compile_cache(group.nodes[0].state_path / "jax-cache")
    shelf = TaskShelf()
    shared: queue.Queue[tuple[int, edge.Received]] = queue.Queue()
    nodes: list[Node] = []
    for index, config in enumerate(group.nodes):  # unreadable data: one line, before connecting
        data = load_local_data(config)
        task = shelf.load(config.task) if config.task is not None else None
        node = open_node(config, data, Tagged(shared, index), task, stop=stop, load=shelf.load)
        nodes.append(node)
    log.info("node_group.started", nodes=len(nodes), stagger=group.stagger)
    waiting = deque(range(len(nodes)))  # clients not started yet, in line order
    live = set(range(len(nodes)))  # nodes not closed yet
    next_start = time.monotonic()
    current: int | None = None  # the node being handled
    try:
        while not stop.is_set() and live:
            now = time.monotonic()
            if waiting and now >= next_start:
                first = waiting.popleft()
                edge.start(nodes[first].client, nodes[first].config.broker, network=network)
                next_start = now + group.stagger
            for index in live:
                edge.check(nodes[index].client)
            wait = 0.2 if not waiting else max(0.0, min(0.2, next_start - time.monotonic()))
            try:
                batch = edge.drain(shared, shared.get(timeout=wait))
            except queue.Empty:
                continue
            by_node: dict[int, list[edge.Received]] = {}
            for index, received in batch:
                by_node.setdefault(index, []).append(received)
            for index in sorted(by_node.keys() & live):  # in line order: turns are fair
                current, node = index, nodes[index]
                with structlog.contextvars.bound_contextvars(
                    node=node.config.node_id, federation=node.config.federation
                ):
                    handle(node, by_node[index])
                    if node.finished and node.config.exit_when_done:
                        close_node(node)
                        live.discard(index)
            current = None
    except edge.LoginRefused:
        _stop([nodes[i] for i in live])
        raise
    except Exception as error:  # the CLI prints it: one line, exit 2
        _close(nodes, sorted(live), set(waiting), failed=current, error=error)
        raise
    _close(nodes, sorted(live), set(waiting))
    done = sum(node.finished for node in nodes)
    log.info("node_group.stopped", nodes=len(nodes), finished=done)
    return 0 if done == len(nodes) else 130


def _close(
    nodes: list[Node],
    open_ones: list[int],
    unstarted: set[int],
    *,
    failed: int | None = None,
    error: Exception | None = None,
) -> None:
    """Every node still open leaves as a lone node would (``close_node``): the one that
    failed with the reason in its ``offline`` status. A client that is not connected
    (never started, or its broker gone) has nothing to hand over: it is stopped at once,
    all of them together."""
    gone = []
    for index in open_ones:
        node = nodes[index]
        if index in unstarted or not node.client.is_connected():
            gone.append(node)
            continue
        with structlog.contextvars.bound_contextvars(
            node=node.config.node_id, federation=node.config.federation
        ):
            close_node(node, error=error if index == failed else None)
    _stop(gone)


def _stop(nodes: list[Node]) -> None:
    """Stop these clients without waiting for a connect attempt to end: at most
    STOP_WAIT_UNCONNECTED in all (the network loop lets go of each once its attempt ends)."""
    released = []
    for node in nodes:
        node.client.disconnect()
        network = node.client.network
        if network is not None:  # None: never started
            released.append(network.leave(node.client))
    deadline = time.monotonic() + STOP_WAIT_UNCONNECTED
    for gone in released:
        gone.wait(max(0.0, deadline - time.monotonic()))
