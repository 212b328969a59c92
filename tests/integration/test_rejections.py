"""Garbage and spoofed updates from a raw paho client: rejected, counted, nothing lost."""

from collections import Counter

import msgpack
import numpy as np
import pytest

from fedmq.models import get_model
from fedmq.schemas import NodeUpdate, Topics, decode_global, decode_metrics, encode, model_id_of

from ..conftest import through, wait_until

pytestmark = pytest.mark.integration


def _update(federation: str, node_id: str, **overrides) -> bytes:  # type: ignore[no-untyped-def]
    params = get_model("digits-mlp").init(0)
    fields = dict(
        federation=federation, node_id=node_id, round=1, base_model_id=model_id_of(params),
        num_examples=10, train_loss=1.0, train_seconds=0.1,
        delta={k: np.zeros_like(v) for k, v in params.items()},
    )  # fmt: skip
    fields.update(overrides)
    return encode(NodeUpdate(**fields))


def test_bad_updates_are_rejected_with_reasons(
    mosquitto, federation, spawn, node_data, collect, tmp_path
):
    topics = Topics(federation)
    watcher = collect([topics.metrics, topics.global_model])
    common = ["--broker", mosquitto.address, "--federation", federation, "--log-json"]
    aggregator = spawn("aggregator", "aggregator", *common, "--nodes", "1", "--rounds", "2")
    wait_until(lambda: watcher.on(topics.global_model), 60, "the initial global model")
    assert decode_global(watcher.on(topics.global_model)[0]).round == 1

    params = get_model("digits-mlp").init(0)
    nan_delta = {k: np.zeros_like(v) for k, v in params.items()}
    nan_delta["l0.b"][3] = np.nan
    bad = [
        (topics.update("mallory"), b"\xc1 not msgpack", "malformed"),
        (topics.update("mallory"), msgpack.packb({"v": 99, "type": "update"}), "unsupported_version"),
        (topics.update("mallory"), _update(federation, "pi-0"), "node_id_mismatch"),
        (topics.update("mallory"), _update(federation, "mallory", round=7), "wrong_round"),
        (topics.update("mallory"), _update(federation, "mallory", base_model_id="0" * 32), "wrong_base_model"),
        (topics.update("mallory"), _update(federation, "mallory", delta=nan_delta), "non_finite"),
        (topics.update("mallory"), b"\x00" * (4 * 2410 + 64 * 1024 + 1), "oversized"),
        (topics.update("mallory"), _update(federation, "mallory", delta={"l0.w": params["l0.w"]}), "layout_mismatch"),
        (topics.update("mallory"), _update("other-fed", "mallory"), "wrong_federation"),
        (topics.update("eve"), _update(federation, "eve"), None),  # accepted: closes round 1
        (topics.update("eve"), _update(federation, "eve"), "duplicate"),  # a copy, once round 2 is open
    ]  # fmt: skip
    for topic, payload, _ in bad:
        watcher.client.publish(topic, payload, qos=1).wait_for_publish(5)
    expected = Counter(reason for _, _, reason in bad if reason)

    # A real node finishes the federation; the garbage must not have disturbed it.
    node = spawn("node", "node", *common, "--node-id", "pi-0", "--data", str(node_data(1)[0]),
                 "--state-dir", str(tmp_path / "s"), "--exit-when-done")  # fmt: skip
    assert aggregator.wait(120) == 0, aggregator.log()
    assert node.wait(60) == 0, node.log()

    # the aggregator's exit says the broker has its metrics, not that our copy has come
    metrics = [decode_metrics(p) for p in watcher.wait_on(topics.metrics, through(2), "metrics")]
    assert [m.participants for m in metrics] == [["eve"], ["pi-0"]]
    counted = Counter()
    for m in metrics:
        counted.update(m.rejected)
    assert counted == expected
    # Each rejection was logged with its reason.
    log = aggregator.log()
    for reason in expected:
        assert f'"reason": "{reason}"' in log
    assert aggregator.proc.returncode == 0
