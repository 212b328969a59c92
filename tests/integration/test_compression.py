"""A compressed federation through a real mosquitto: top-k + int8 (or one-bit sign
values and zlib, or sign values in the flat form) + error feedback."""

import json
import math
import zlib

import msgpack
import pytest

from fedmq.models import get_model
from fedmq.node import residual
from fedmq.schemas import Topics, decode_global, decode_metrics, decode_update
from fedmq.schemas.encodings import Quantized, Sparse

from ..conftest import at_least, ends_final, through

pytestmark = [pytest.mark.integration]

DENSE_UPDATE_BYTES = 9_971  # one dense digits-mlp update (docs/PROTOCOL.md, section 10)


@pytest.mark.parametrize(
    ("spec", "bits"),
    [
        ("topk:0.1+int8+ef", 8),
        ("topk:0.1+sign+ef+zlib", 1),
        ("topk:0.1+sign+ef+flat", 1),
        ("gtopk:0.1+sign+ef+flat", 1),
    ],
)
def test_three_nodes_send_sparse_quantized_updates_with_error_feedback(
    mosquitto, federation, spawn, node_data, collect, tmp_path, spec, bits
):
    topics = Topics(federation)
    watcher = collect([topics.metrics, topics.global_model, topics.all_updates])
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    report = tmp_path / "report.json"
    aggregator = spawn(
        "aggregator", "aggregator", *common, "--compression", spec, "--nodes", "3",
        "--rounds", "4", "--report", str(report),
    )  # fmt: skip
    states = [tmp_path / f"state-{i}" for i in range(3)]
    nodes = [
        spawn(f"node-{i}", "node", *common, "--node-id", f"pi-{i}", "--data", str(path),
              "--state-dir", str(states[i]), "--exit-when-done")
        for i, path in enumerate(node_data(3))
    ]  # fmt: skip

    assert aggregator.wait(90) == 0, aggregator.log()
    for node in nodes:
        assert node.wait(60) == 0, node.log()

    # those exits say the broker had every message; the watcher's copies may still be on
    # their way (mosquitto delivers to each subscriber on its own)
    metrics = [decode_metrics(p) for p in watcher.wait_on(topics.metrics, through(4), "metrics")]
    assert [m.round for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert m.participants == ["pi-0", "pi-1", "pi-2"], m
        assert m.rejected == {}, m
        assert m.closed_by == "all_reported"
        assert 0 < m.uplink_bytes < 0.4 * 3 * DENSE_UPDATE_BYTES, m.uplink_bytes
    assert metrics[-1].accuracy > metrics[0].accuracy > 0.1

    # Every global, the final one included, announces the canonical SPEC.
    models = watcher.wait_on(topics.global_model, ends_final, "the final model")
    globals_ = [decode_global(p) for p in models if p]
    assert [g.round for g in globals_] == [1, 2, 3, 4, 5]
    assert {g.plan.compression for g in globals_} == {spec}

    # The updates on the wire: sparse tensors with quantized values, as the SPEC says.
    layout = get_model("digits-mlp").layout
    updates_of = [
        watcher.wait_on(topics.update(f"pi-{i}"), at_least(4), "updates") for i in range(3)
    ]
    payloads = [p for sent in updates_of for p in sent]
    updates = [decode_update(p, layout=layout) for p in payloads]
    for payload in payloads:  # with +flat one map for the whole delta, else one per tensor
        wire = msgpack.unpackb(payload, raw=False)["delta"]
        if spec.endswith("+zlib"):
            wire = msgpack.unpackb(zlib.decompress(wire), raw=False)
        assert (wire.get("enc") == "flat") == spec.endswith("+flat"), sorted(wire)
    assert sorted((u.round, u.node_id) for u in updates) == [
        (r, f"pi-{i}") for r in range(1, 5) for i in range(3)
    ]
    total = sum(math.prod(shape) for shape in layout.values())
    for update in updates:
        assert update.compression == spec
        for name, tensor in update.delta.items():
            assert isinstance(tensor, Sparse), name
            assert isinstance(tensor.values, Quantized) and tensor.values.bits == bits
            if not spec.startswith("gtopk"):  # per tensor
                size = math.prod(layout[name])
                assert tensor.indices.size == max(1, math.ceil(0.1 * size))
        if spec.startswith("gtopk"):  # over the whole delta
            kept = sum(t.indices.size for t in update.delta.values())
            assert kept == math.ceil(0.1 * total)
    assert sum(len(p) for p in payloads) == sum(m.uplink_bytes for m in metrics)

    # The report agrees with the wire.
    written = json.loads(report.read_text())
    assert [r["uplink_bytes"] for r in written["rounds"]] == [m.uplink_bytes for m in metrics]
    assert [r["accuracy"] for r in written["rounds"]] == [m.accuracy for m in metrics]

    # Each node kept its error-feedback residual of the last round on disk.
    for state in states:
        path = state / "residual.npz"
        assert path.is_file(), sorted(p.name for p in state.iterdir())
        saved = residual.load(path)
        assert saved is not None
        assert (saved.round, saved.spec) == (4, spec)
        assert {name: a.shape for name, a in saved.residual.items()} == layout
        assert any(a.any() for a in saved.residual.values())  # top-k left something behind
