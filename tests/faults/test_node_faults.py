"""SIGKILL real node processes: a node restarted from its state directory rejoins within a
round or two without training a round twice, and a node that never comes back makes the
rounds close at their deadline with the others."""

import json
import signal
from pathlib import Path

import pytest

from fedmq.node import last_update, residual
from fedmq.schemas import Topics, decode_metrics, decode_status, decode_update

from ..conftest import through, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 3
EVERYONE = [f"pi-{i}" for i in range(NODES)]
SURVIVORS = EVERYONE[:-1]


def aggregator_args(mosquitto, federation: str, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "aggregator", "--broker", mosquitto.address, "--federation", federation, "--log-json",
        "--nodes", str(NODES), "--min-nodes", str(NODES - 1),
        "--state-dir", str(tmp_path / "aggregator"), *extra,
    ]  # fmt: skip


def node_args(mosquitto, federation: str, index: int, data: Path, tmp_path: Path) -> list[str]:
    return [
        "node", "--broker", mosquitto.address, "--federation", federation, "--log-json",
        "--log-level", "debug",  # update.published is a debug line
        "--node-id", f"pi-{index}", "--data", str(data),
        "--state-dir", str(tmp_path / f"state-{index}"), "--exit-when-done",
    ]  # fmt: skip


def per_round(watcher, topics: Topics, rounds: int):
    """The last metrics message of each round (metrics are at least once), in order."""
    payloads = watcher.wait_on(topics.metrics, through(rounds), f"metrics of rounds 1-{rounds}")
    metrics = {m.round: m for m in map(decode_metrics, payloads)}
    assert sorted(metrics) == list(range(1, rounds + 1))
    return [metrics[r] for r in sorted(metrics)]


def kill_on(watcher, topic: str, predicate, child) -> list[bytes]:
    """SIGKILL ``child`` from the collector's network thread as soon as a message on
    ``topic`` satisfies ``predicate`` (milliseconds, where polling would take tens).
    Returns the list the triggering payload is appended to."""
    fired: list[bytes] = []

    def on_message(_client, _userdata, message) -> None:
        if not fired and message.payload and predicate(bytes(message.payload)):
            child.proc.send_signal(signal.SIGKILL)
            fired.append(bytes(message.payload))

    watcher.client.message_callback_add(topic, on_message)
    return fired


def events(child, name: str) -> list[dict]:
    found = []
    for line in child.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") == name:
            found.append(entry)
    return found


def test_a_node_killed_mid_round_restarts_and_rejoins_with_its_state(
    mosquitto, federation, spawn, collect, node_data, tmp_path
):
    rounds, killed_in = 5, 2
    paths = node_data(NODES)
    topics = Topics(federation)
    watcher = collect([topics.metrics, topics.status("pi-2")])
    aggregator = spawn(
        "aggregator",
        *aggregator_args(
            mosquitto, federation, tmp_path, "--rounds", str(rounds),
            # generous: a restarted node (JAX import, compile cache) usually makes it back
            # inside the round it was killed in, but the test holds either way
            "--round-timeout", "10", "--compression", "topk:0.1+ef",
        ),
    )  # fmt: skip
    nodes = [spawn(f"node-{i}", *node_args(mosquitto, federation, i, p, tmp_path))
             for i, p in enumerate(paths)]  # fmt: skip
    victim = nodes[-1]

    def training_in_round(payload: bytes) -> bool:
        status = decode_status(payload)
        return status.state == "training" and status.round == killed_in

    fired = kill_on(watcher, topics.status("pi-2"), training_in_round, victim)
    wait_until(lambda: bool(fired), 120, f"pi-2 to start training round {killed_in}")
    assert victim.proc.wait(10) == -signal.SIGKILL

    # What the node had on disk when it died: its update and residual of the round before
    # (or of this one, had it published before the signal landed).
    state = tmp_path / "state-2"
    saved_update = last_update.load(state / "last_update.msgpack")
    saved_residual = residual.load(state / "residual.npz")
    assert saved_update is not None and saved_residual is not None
    assert saved_update.round in (killed_in - 1, killed_in)
    # One round ahead when the signal landed between the residual's write and the
    # update's: the known bug test_residual_survives_a_crash_between_its_two_files shows.
    assert saved_residual.round in (saved_update.round, saved_update.round + 1)
    assert decode_update(saved_update.payload).compression == "topk:0.1+ef"

    restarted = spawn("node-2-restarted", *node_args(mosquitto, federation, 2, paths[2], tmp_path))
    assert aggregator.wait(180) == 0, aggregator.log()[-3000:]
    for node in [*nodes[:-1], restarted]:
        assert node.wait(60) == 0, node.log()[-3000:]
    metrics = per_round(watcher, topics, rounds)

    # It rejoins within the round it was killed in or the next two, and stays. (Round 1
    # is not checked: a node still compiling JAX may miss its deadline.)
    back = next(m.round for m in metrics[killed_in - 1 :] if "pi-2" in m.participants)
    assert back <= killed_in + 2, [m.participants for m in metrics]
    for m in metrics[killed_in - 1 :]:
        if m.round < back:  # the round went on without it, closed at its deadline
            assert (m.participants, m.closed_by) == (SURVIVORS, "deadline")
        else:
            assert m.participants == EVERYONE, m
    # The restarted node never trained again a round it had on record: it resent that
    # update (if its round was still open) or trained the newer rounds only.
    published = [e["round"] for e in events(restarted, "update.published")]
    resent = [e["round"] for e in events(restarted, "update.resent")]
    assert published or resent
    assert all(r > saved_update.round for r in published), published
    assert all(r == saved_update.round for r in resent), resent
    assert published == list(range(published[0], rounds + 1))
    # Its error-feedback residual carried over when the next round it trained followed
    # the residual's round, and was discarded as stale otherwise.
    discarded = events(restarted, "residual.discarded")
    if saved_residual.round == saved_update.round:  # consistent state on disk
        if published[0] == saved_residual.round + 1:
            assert not discarded, discarded
        else:
            assert discarded
    # Its state kept going: last update and residual are of the final round.
    final_update = last_update.load(state / "last_update.msgpack")
    final_residual = residual.load(state / "residual.npz")
    assert final_update is not None and final_update.round == rounds
    assert final_residual is not None and final_residual.round == rounds


def test_a_node_that_never_comes_back_rounds_close_at_the_deadline(
    mosquitto, federation, spawn, collect, node_data, tmp_path
):
    rounds = 4
    paths = node_data(NODES)
    topics = Topics(federation)
    watcher = collect([topics.metrics, topics.update("pi-2")])
    aggregator = spawn(
        "aggregator",
        *aggregator_args(mosquitto, federation, tmp_path, "--rounds", str(rounds),
                         "--round-timeout", "3"),
    )  # fmt: skip
    nodes = [spawn(f"node-{i}", *node_args(mosquitto, federation, i, p, tmp_path))
             for i, p in enumerate(paths)]  # fmt: skip
    victim = nodes[-1]
    # Killed the moment its first update is on the broker (round 1, unless it was so slow
    # that round 1 closed without it): the next global comes only after that, so no later
    # round can have heard from it.
    fired = kill_on(watcher, topics.update("pi-2"), lambda p: True, victim)
    wait_until(lambda: bool(fired), 120, "pi-2's first update")
    assert victim.proc.wait(10) == -signal.SIGKILL
    last = decode_update(fired[0]).round

    assert aggregator.wait(120) == 0, aggregator.log()[-3000:]
    for node in nodes[:-1]:
        assert node.wait(60) == 0, node.log()[-3000:]
    metrics = per_round(watcher, topics, rounds)
    assert last < rounds
    for m in metrics[last:]:
        # the round waited for the quorum and its deadline, then went on without pi-2
        assert (m.participants, m.closed_by) == (SURVIVORS, "deadline"), m
        # at most a survivor's (or pi-2's own) round 1 update arriving late, when round 1
        # closed at its deadline without it: JAX compiling on a busy machine
        assert set(m.rejected) <= {"wrong_round"}, m.rejected


def test_residual_survives_a_crash_between_its_two_files(
    mosquitto, spawn, collect, node_data, tmp_path
):
    """A node that dies after writing round 2's residual but before round 2's update is on
    record must, once restarted, send the round 2 update an uninterrupted node sends: the
    run ends with the same models as an uninterrupted one (run alongside).

    The death is made exact, not timed: a directory where write_atomically puts its
    temporary file makes saving last_update.msgpack fail, and the node exits at that very
    point (the state a SIGKILL landing there leaves; the SIGKILL test above hits it now
    and then)."""
    rounds = 3
    paths = node_data(2)

    def start(federation: str):
        (tmp_path / federation).mkdir()
        topics = Topics(federation)
        watcher = collect([topics.metrics, topics.update("pi-0")])
        aggregator = spawn(
            f"{federation}-aggregator", "aggregator", "--broker", mosquitto.address,
            "--federation", federation, "--log-json", "--nodes", "2", "--rounds", str(rounds),
            "--compression", "topk:0.1+ef", "--state-dir", str(tmp_path / federation / "agg"),
        )  # fmt: skip
        return topics, watcher, aggregator

    def node(federation: str, index: int, name: str = ""):
        args = node_args(mosquitto, federation, index, paths[index], tmp_path / federation)
        return spawn(f"{federation}-node-{index}{name}", *args)

    def finish(topics, watcher, aggregator, nodes):
        assert aggregator.wait(120) == 0, aggregator.log()[-3000:]
        for child in nodes:
            assert child.wait(60) == 0, child.log()[-3000:]
        return per_round(watcher, topics, rounds)

    reference_topics, reference_watcher, reference_aggregator = start("reference")
    reference_nodes = [node("reference", 0), node("reference", 1)]
    topics, watcher, aggregator = start("crashed")
    first = node("crashed", 0)
    state = tmp_path / "crashed" / "state-0"
    # round 1 cannot close before pi-1 starts: the trap is set between pi-0's round 1 and
    # round 2 updates
    wait_until(lambda: watcher.on(topics.update("pi-0")), 120, "pi-0's round 1 update")
    (state / "last_update.msgpack.tmp").mkdir()
    second = node("crashed", 1)
    assert first.wait(120) == 2, first.log()[-3000:]  # died saving round 2's update
    on_record = last_update.load(state / "last_update.msgpack")
    saved_residual = residual.load(state / "residual.npz")
    pending = residual.load(state / "residual.next.npz")
    assert on_record is not None and on_record.round == 1
    # round 2's residual waits beside round 1's until round 2's update is on record
    assert saved_residual is not None and saved_residual.round == 1
    assert pending is not None and pending.round == 2
    (state / "last_update.msgpack.tmp").rmdir()
    restarted = node("crashed", 0, "-restarted")
    crashed = finish(topics, watcher, aggregator, [restarted, second])
    uninterrupted = finish(
        reference_topics, reference_watcher, reference_aggregator, reference_nodes
    )

    assert [m.participants for m in crashed] == [["pi-0", "pi-1"]] * rounds
    assert not events(restarted, "residual.discarded"), events(restarted, "residual.discarded")
    assert [m.model_id for m in crashed] == [m.model_id for m in uninterrupted]
