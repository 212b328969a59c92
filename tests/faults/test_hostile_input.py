"""A raw paho client floods a real federation with malformed and spoofed updates: the run
must end exactly as a clean one (same model every round, same accuracy), with the
aggregator alive to the end and every bad message counted in the metrics by its reason.

Determinism: the federation expects four nodes, and the fourth (pi-3) is started only once
the aggregator has logged a rejection for every bad message, so all of them land in
round 1 (which cannot close before pi-3 reports), and their counts are exact.
"""

import json
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedmq.schemas import (
    NodeStatus,
    NodeUpdate,
    Topics,
    decode_global,
    decode_metrics,
    decode_update,
    encode,
)

from ..conftest import through, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 4
ROUNDS = 5
# Real dense updates of digits-mlp are about 10 KB; anything above this is refused unread.
MAX_UPDATE_BYTES = 16_384


def start_aggregator(spawn, mosquitto, federation: str, tmp_path: Path):
    return spawn(
        f"{federation}-aggregator", "aggregator", "--broker", mosquitto.address,
        "--federation", federation, "--log-json", "--nodes", str(NODES),
        "--rounds", str(ROUNDS), "--max-update-bytes", str(MAX_UPDATE_BYTES),
        "--state-dir", str(tmp_path / f"{federation}-aggregator"),
    )  # fmt: skip


def start_node(spawn, mosquitto, federation: str, index: int, data: Path, tmp_path: Path):
    return spawn(
        f"{federation}-node-{index}", "node", "--broker", mosquitto.address,
        "--federation", federation, "--log-json", "--node-id", f"pi-{index}",
        "--data", str(data), "--state-dir", str(tmp_path / f"{federation}-state-{index}"),
        "--exit-when-done",
    )  # fmt: skip


def per_round(watcher, topics: Topics):
    """The last metrics message of each round (metrics are at least once), in order."""
    payloads = watcher.wait_on(topics.metrics, through(ROUNDS), f"metrics of rounds 1-{ROUNDS}")
    metrics = {m.round: m for m in map(decode_metrics, payloads)}
    assert sorted(metrics) == list(range(1, ROUNDS + 1))
    return [metrics[r] for r in sorted(metrics)]


def log_events(child) -> list[dict]:
    events = []
    for line in child.log().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # not a log line (there should be none: checked below)
    return events


def bad_messages(topics: Topics, opened, real_copy: bytes) -> list[tuple[str, bytes, str]]:
    """(topic, payload, reason the aggregator must give) for each hostile message.

    ``opened`` is round 1's global model; ``real_copy`` a real node's (pi-0's) update."""
    federation = topics.federation

    def update(node_id: str, **overrides) -> bytes:
        fields = dict(
            federation=federation, node_id=node_id, round=opened.round,
            base_model_id=opened.model_id, num_examples=50, train_loss=1.0, train_seconds=0.1,
            delta={name: np.full(a.shape, 0.5, np.float32) for name, a in opened.params.items()},
        )  # fmt: skip
        fields.update(overrides)
        return encode(NodeUpdate(**fields))

    def delta_with(name: str, index: tuple[int, ...], value: float) -> dict[str, np.ndarray]:
        delta = {n: np.zeros(a.shape, np.float32) for n, a in opened.params.items()}
        delta[name][index] = value
        return delta

    wrong_shape = {n: np.zeros(a.shape, np.float32) for n, a in opened.params.items()}
    wrong_shape["l0.w"] = np.zeros((32, 64), np.float32)  # same size, transposed
    version_2 = msgpack.unpackb(update("mallory"), raw=False)
    version_2["v"] = 2
    padded = msgpack.unpackb(update("mallory"), raw=False)
    padded["padding"] = b"\x00" * MAX_UPDATE_BYTES  # unknown keys are ignored, not their size
    status = NodeStatus(federation=federation, node_id="mallory", state="online")
    mallory = topics.update("mallory")
    # Built by hand on purpose: Topics refuses a node id with a space in it.
    bad_topic = topics.update("mallory").rsplit("/", 1)[0] + "/mallory here"
    return [
        (mallory, b"\x00\xff\xc1 garbage, not msgpack", "malformed"),
        (mallory, b"", "malformed"),
        (mallory, update("mallory")[:4000], "malformed"),  # truncated msgpack
        (mallory, msgpack.packb(version_2), "unsupported_version"),
        (mallory, encode(status), "wrong_type"),
        (mallory, update("mallory", federation="another-fed"), "wrong_federation"),
        # spoofed on real nodes' topics: rejected, and those nodes' own updates still count
        (topics.update("pi-1"), update("mallory"), "node_id_mismatch"),
        (topics.update("pi-3"), update("pi-0"), "node_id_mismatch"),
        (topics.update("pi-2"), update("pi-2", federation="another-fed"), "wrong_federation"),
        (topics.update("pi-3"), update("pi-3", round=opened.round + 1), "wrong_round"),
        (topics.update("pi-3"), update("pi-3", delta=delta_with("l1.w", (3, 4), np.nan)), "non_finite"),
        (mallory, update("mallory", delta=delta_with("l0.b", (0,), -np.inf)), "non_finite"),
        (mallory, update("mallory", delta=delta_with("l0.w", (1, 2), 1e20)), "out_of_range"),
        (mallory, update("mallory", delta=wrong_shape), "layout_mismatch"),
        (mallory, update("mallory", round=0), "bad_field"),
        (mallory, update("mallory", base_model_id="0" * 32), "wrong_base_model"),
        (mallory, update("mallory", compression="lz4"), "wrong_compression"),
        (mallory, msgpack.packb(padded), "oversized"),
        (mallory, b"\x80" * (MAX_UPDATE_BYTES + 1), "oversized"),
        (bad_topic, update("mallory"), "bad_topic"),
        (topics.update("pi-0"), real_copy, "duplicate"),  # a real update, replayed
    ]  # fmt: skip


def test_hostile_stream_leaves_the_run_as_a_clean_one(
    mosquitto, spawn, collect, node_data, tmp_path
):
    paths = node_data(NODES)

    # the clean run goes alongside the attacked one (another federation, same broker)
    clean = Topics("hostile-clean")
    clean_watcher = collect([clean.metrics])
    clean_aggregator = start_aggregator(spawn, mosquitto, clean.federation, tmp_path)
    clean_nodes = [start_node(spawn, mosquitto, clean.federation, i, p, tmp_path)
                   for i, p in enumerate(paths)]  # fmt: skip

    topics = Topics("hostile-attacked")
    watcher = collect([topics.metrics, topics.global_model, topics.all_updates])
    aggregator = start_aggregator(spawn, mosquitto, topics.federation, tmp_path)
    nodes = [start_node(spawn, mosquitto, topics.federation, i, p, tmp_path)
             for i, p in enumerate(paths[:-1])]  # fmt: skip
    wait_until(lambda: watcher.on(topics.update("pi-0")), 120, "pi-0's round 1 update")
    real_copy = watcher.on(topics.update("pi-0"))[0]
    opened = decode_global(watcher.on(topics.global_model)[0])
    assert opened.round == 1 and decode_update(real_copy).round == 1

    bad = bad_messages(topics, opened, real_copy)
    for topic, payload, _ in bad:
        watcher.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def rejections() -> list[dict]:
        return [e for e in log_events(aggregator) if e.get("event") == "update.rejected"]

    wait_until(lambda: len(rejections()) >= len(bad), 60, "every bad message to be rejected")
    # round 1 waits for pi-3, so every rejection so far was in round 1
    assert {e["round"] for e in rejections()} == {1}
    nodes.append(start_node(spawn, mosquitto, topics.federation, 3, paths[-1], tmp_path))
    for child in [clean_aggregator, aggregator]:
        assert child.wait(120) == 0, child.log()[-3000:]
    for child in [*clean_nodes, *nodes]:
        assert child.wait(60) == 0, child.log()[-3000:]
    reference = per_round(clean_watcher, clean)
    attacked = per_round(watcher, topics)

    assert all(m.rejected == {} for m in reference)
    assert [m.model_id for m in attacked] == [m.model_id for m in reference]
    assert [m.accuracy for m in attacked] == [m.accuracy for m in reference]
    assert attacked[-1].accuracy == reference[-1].accuracy
    everyone = [f"pi-{i}" for i in range(NODES)]
    assert [m.participants for m in attacked] == [everyone] * ROUNDS
    expected = Counter(reason for _, _, reason in bad)
    counted: Counter[str] = Counter()
    for m in attacked:
        counted.update(m.rejected)
    assert counted == expected
    assert attacked[0].rejected == dict(expected)
    # one structured log line per bad message, naming its reason; no crash, no traceback
    assert Counter(e["reason"] for e in rejections()) == expected
    assert "Traceback" not in aggregator.log()
    assert aggregator.proc.returncode == 0
