"""The compressed downlink (--downlink-compression, docs/PROTOCOL.md 12.10): the aggregator
publishes what the nodes rebuild, every node rebuilds it bitwise, a node that missed an
update catches up from the retained full model, and hostile compact updates are refused."""

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.aggregator.app import resume_or_start
from fedmq.aggregator.checkpoint import StateDir
from fedmq.aggregator.downlink import compress_global, downlink_pipeline, initial_residual
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.compression import parse_spec
from fedmq.datasets import Dataset
from fedmq.mqtt import CONNECTED, SETTLED, BrokerAddress, Received
from fedmq.node.app import Node, handle
from fedmq.node.settings import NodeSettings
from fedmq.report import final_delivery_entry, summary_lines
from fedmq.schemas import (
    GlobalModel,
    NodeStatus,
    SchemaError,
    ServerStatus,
    apply_global_delta,
    decode_global,
    decode_global_delta,
    decode_server_status,
    decode_status,
    encode,
    make_compressed_global_delta,
    make_init_global_delta,
    model_id_of,
)
from fedmq.settings import downlink_spec, final_downlink_spec

from .node_doubles import RecordingOutbox
from .test_aggregator_server import FEDERATION, MODEL, PLAN, TOPICS, Harness

SPECS = [
    "topk:0.035+sign+ef+flat",
    "gtopk:0.02+sign+ef+flat",
    "gtopk:0.015+int4+ef",
    "topk:0.1+int8+ef",
    "topk:0.05+int4+ef+flat+zlib",
    "fp16",
    "int8+ef+zlib",
    "dense",
]
NODES = ["pi-a", "pi-b", "pi-c"]


def run(spec: str | None, rounds: int = 4, final: str | None = None) -> Harness:
    """A run of ``rounds`` rounds, every node reporting each round, with the downlink
    ``spec`` (and the final model's ``final``)."""
    h = Harness(rounds=rounds, downlink_compression=spec, final_downlink_compression=final)
    h.agg.start()
    while not h.agg.done:
        for index, node in enumerate(NODES):
            h.report(node, seed=100 * h.agg.round + index, num_examples=10 + index)
    return h


def compact_payloads(h: Harness) -> list[bytes]:
    """What went out on global/delta: round 1 in full, then the compact forms."""
    return [payload for payload, _ in h.on(TOPICS.global_delta)]


def bits(params: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    return [(name, np.asarray(array).tobytes()) for name, array in params.items()]


# ------------------------------------------------------------------ the codec


@settings(max_examples=30, deadline=None)
@given(
    spec=st.sampled_from(SPECS),
    seed=st.integers(0, 2**32 - 1),
    scale=st.sampled_from([1e-4, 1e-2, 1.0]),
)
def test_a_compressed_global_delta_round_trips_to_the_model_the_aggregator_made(
    spec: str, seed: int, scale: float
) -> None:
    rng = np.random.default_rng(seed)
    base = {n: rng.normal(0, 1, s).astype(np.float32) for n, s in MODEL.layout.items()}
    target = {n: (a + rng.normal(0, scale, a.shape)).astype(np.float32) for n, a in base.items()}
    pipeline = parse_spec(spec)
    residual = initial_residual(pipeline, MODEL.layout)
    made = compress_global(pipeline, base, target, residual, seed=seed, version=2)
    model = GlobalModel(
        federation=FEDERATION, round=2, model="digits-mlp", model_id=model_id_of(made.params),
        params=made.params, plan=PLAN,
    )  # fmt: skip
    wire = encode(make_compressed_global_delta(model, model_id_of(base), spec, made.wire))
    rebuilt = apply_global_delta(base, decode_global_delta(wire))
    assert bits(rebuilt.params) == bits(made.params)
    assert rebuilt.model_id == model.model_id
    if pipeline.error_feedback:  # what was not sent is carried: sent + residual = delta
        assert made.residual is not None
        for name, array in base.items():
            carried = (made.params[name] - array) + made.residual[name]
            np.testing.assert_allclose(carried, target[name] - array, atol=1e-5 * max(scale, 1))
    else:
        assert made.residual is None


def test_none_is_the_xor_form_byte_for_byte() -> None:
    """The default leaves the published bytes as they were (the reference run's)."""
    plain, explicit = run(None), run("none")
    assert plain.published == explicit.published
    for payload in compact_payloads(plain)[1:]:
        message = msgpack.unpackb(payload)
        assert "delta" not in message and "compression" not in message
        assert message["xor"]
    assert downlink_pipeline("none") is None


# ------------------------------------------------------------------ the aggregator


@pytest.mark.parametrize(
    "spec", ["topk:0.035+sign+ef+flat", "topk:0.1+int8+ef", "gtopk:0.015+int4+ef+flat"]
)
def test_every_node_rebuilds_bitwise_the_published_global(spec: str, tmp_path: Path) -> None:
    h = run(spec)
    fulls = h.globals()
    payloads = compact_payloads(h)
    assert decode_global(payloads[0]).model_id == fulls[0].model_id  # round 1 in full
    for payload, full in zip(payloads[1:], fulls[1:], strict=True):
        compact = decode_global_delta(payload)
        assert (compact.compression, compact.xor) == (spec, b"")
        assert len(payload) < len(encode(full)) / 3
    followers = [Following(tmp_path / node, node) for node in NODES]
    for follower in followers:  # real nodes, each rebuilding from the bytes it received
        for payload, full in zip(payloads, fulls, strict=True):
            follower.node.on_global_delta(payload)
            assert follower.held is not None
            assert follower.held.model_id == full.model_id
            assert bits(follower.held.params) == bits(full.params)
        assert [m.round for m in follower.trained] == [1, 2, 3, 4]
        assert follower.fetched == []  # never needed the full model
    # the aggregator's own model (evaluated, the next base) is what the nodes hold
    assert bits(h.agg.params) == bits(fulls[-1].params)
    assert [m.global_delta_bytes for m in h.metrics()][1:] == [len(p) for p in payloads[1:-1]]


def test_the_residual_carries_what_the_downlink_did_not_send() -> None:
    """With ef the models follow the uncompressed run: the gap does not grow round on
    round as it would if the residual were dropped."""
    exact = run(None, rounds=6).agg.params
    with_ef = run("topk:0.1+sign+ef", rounds=6).agg.params
    without = run("topk:0.1+sign", rounds=6).agg.params

    def gap(params: dict[str, np.ndarray]) -> float:
        return float(sum(np.abs(params[n] - exact[n]).sum() for n in exact))

    assert gap(with_ef) < gap(without)


@pytest.mark.parametrize("final", [None, "same"])
def test_without_a_final_spec_the_final_model_goes_as_every_other(final: str | None) -> None:
    plain, same = run("gtopk:0.05+sign+ef+flat"), run("gtopk:0.05+sign+ef+flat", final=final)
    assert plain.published == same.published


def test_the_final_model_sends_more_of_what_error_feedback_held_back(tmp_path: Path) -> None:
    """--final-downlink-compression: only the final model goes in its SPEC, from the same
    residual; it lands nearer the uncompressed run, and every node rebuilds it bitwise."""
    spec, final = "gtopk:0.02+sign+ef+flat", "gtopk:0.2+sign+ef+flat"
    exact, usual, flushed = run(None), run(spec), run(spec, final=final)
    payloads, fulls = compact_payloads(flushed), flushed.globals()
    kinds = [decode_global_delta(p).compression for p in payloads[1:]]
    assert kinds == [spec, spec, spec, final]  # rounds 2-4, then the final model
    assert fulls[-1].final and not fulls[-2].final
    # up to the final model, the same run byte for byte
    assert compact_payloads(usual)[:-1] == payloads[:-1]
    assert len(payloads[-1]) > len(compact_payloads(usual)[-1])  # k ten times larger

    def gap(params: dict[str, np.ndarray]) -> float:
        return float(sum(np.abs(params[n] - exact.agg.params[n]).sum() for n in params))

    assert gap(flushed.agg.params) < gap(usual.agg.params)
    follower = Following(tmp_path)
    for payload in payloads:
        follower.node.on_global_delta(payload)
    assert follower.held is not None and follower.fetched == []
    assert bits(follower.held.params) == bits(fulls[-1].params)


def test_the_final_spec_needs_a_compressed_downlink_and_keeps_its_ef() -> None:
    assert final_downlink_spec("SAME") == "same"
    assert final_downlink_spec("flat+ef+sign+gtopk:0.10") == "gtopk:0.1+sign+ef+flat"
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown stage 'bogus'.*or same"):
        final_downlink_spec("bogus")
    made = AggregatorSettings(
        downlink_compression="gtopk:0.03+sign+ef+flat",
        final_downlink_compression="gtopk:0.1+sign+ef+flat",
    )
    assert made.final_downlink_compression == "gtopk:0.1+sign+ef+flat"
    assert AggregatorSettings().final_downlink_compression == "same"
    with pytest.raises(ValueError, match="needs --downlink-compression"):
        AggregatorSettings(final_downlink_compression="gtopk:0.1+sign+ef+flat")
    with pytest.raises(ValueError, match="add ef"):
        AggregatorSettings(
            downlink_compression="gtopk:0.03+sign+ef+flat",
            final_downlink_compression="gtopk:0.1+sign+flat",
        )


# ------------------------------------------------------------------ nodes


class Following:
    """A real ``Node`` fed the aggregator's messages, whose training is recorded, not run."""

    def __init__(self, tmp_path: Path, node_id: str = "pi-a") -> None:
        config = NodeSettings(
            broker=BrokerAddress(), federation=FEDERATION, node_id=node_id, state_dir=tmp_path
        )
        data = Dataset(np.zeros((4, 64), np.float32), np.zeros(4, np.int64))
        self.outbox = RecordingOutbox()
        self.node = Node(config, data, self.outbox)  # type: ignore[arg-type]
        self.fetched: list[str] = []  # fetches of the retained full model (their topic)
        self.node._fetch = lambda topic: self.fetched.append(topic) is None
        self.trained: list[GlobalModel] = []
        self.node.train_and_publish = self.trained.append  # type: ignore[method-assign]

    @property
    def held(self) -> GlobalModel | None:
        return self.node._held


def test_a_node_follows_the_compact_forms_and_catches_up_after_missing_one(
    tmp_path: Path,
) -> None:
    h = run("topk:0.035+sign+ef+flat", rounds=5)
    payloads, fulls = compact_payloads(h), h.globals()
    follower = Following(tmp_path)
    with structlog.testing.capture_logs() as logs:
        follower.node.on_global_delta(payloads[0])  # round 1, in full
        follower.node.on_global_delta(payloads[1])  # round 2, compact
        assert follower.held is not None and follower.held.model_id == fulls[1].model_id
        # round 3's compact form is lost; round 4's has no base here
        follower.node.on_global_delta(payloads[3])
        assert follower.held.model_id == fulls[1].model_id
        assert follower.fetched == [TOPICS.global_model]  # it fetches the retained full model
        follower.node.on_global(encode(fulls[3]), retained=True)
        follower.node.on_settled(b"fetch")
        assert follower.held.model_id == fulls[3].model_id
        follower.node.on_global_delta(payloads[4])  # round 5, compact again
    assert any(e["event"] == "global_delta.no_base" for e in logs)
    assert follower.held.model_id == fulls[4].model_id
    assert bits(follower.held.params) == bits(fulls[4].params)
    assert [m.round for m in follower.trained] == [1, 2, 4, 5]


def test_a_compact_form_that_comes_during_a_fetch_is_not_lost(tmp_path: Path) -> None:
    """A slow node (async mode) misses round 3, fetches, and round 4's compact form (the
    final model, say) comes before the fetch is answered: the fetch may bring round 3
    (the broker took the subscribe before round 4's full model), so the node fetches
    again until it holds round 4, or it would wait for a model that was already sent."""
    h = run("topk:0.035+sign+ef+flat", rounds=5)
    payloads, fulls = compact_payloads(h), h.globals()
    follower = Following(tmp_path)
    follower.node.on_global_delta(payloads[0])  # round 1, in full
    follower.node.on_global_delta(payloads[2])  # round 3: no base, a fetch
    follower.node.on_global_delta(payloads[3])  # round 4 while fetching: no base either
    assert follower.fetched == [TOPICS.global_model]  # one fetch at a time
    follower.node.on_global(encode(fulls[2]), retained=True)  # the fetch brings round 3
    follower.node.on_settled(b"fetch")
    assert follower.fetched == [TOPICS.global_model] * 2  # round 4 was seen: again
    follower.node.on_global(encode(fulls[3]), retained=True)
    follower.node.on_settled(b"fetch")
    assert follower.fetched == [TOPICS.global_model] * 2  # it holds round 4: done
    assert follower.held is not None and follower.held.model_id == fulls[3].model_id
    assert [m.round for m in follower.trained] == [1, 3, 4]


def test_fetching_again_for_a_model_the_broker_never_retains_stops(tmp_path: Path) -> None:
    """An aggregator that died between a compact form and its full model: the node gives
    up after a few fetches instead of asking the broker in a loop."""
    h = run("topk:0.035+sign+ef+flat", rounds=4)
    payloads, fulls = compact_payloads(h), h.globals()
    follower = Following(tmp_path)
    follower.node.on_global_delta(payloads[0])
    follower.node.on_global_delta(payloads[2])
    follower.node.on_global_delta(payloads[3])
    for _ in range(10):
        follower.node.on_global(encode(fulls[2]), retained=True)
        follower.node.on_settled(b"fetch")
    assert 2 <= len(follower.fetched) <= 5


def test_a_fetch_that_brings_a_new_run_is_not_fetched_again(tmp_path: Path) -> None:
    """The node wanted round 4 of a run that then ended, and a new run (round 1, published
    later) is what the broker retains: that model is newer, not older, so the node takes
    it without fetching again or saying the round was not retained."""
    h = run("topk:0.035+sign+ef+flat", rounds=5)
    payloads, fulls = compact_payloads(h), h.globals()
    new_run = dataclasses.replace(run(None, rounds=2).globals()[0],
                                  created_at=fulls[3].created_at + 60.0)  # fmt: skip
    follower = Following(tmp_path)
    with structlog.testing.capture_logs() as logs:
        follower.node.on_global_delta(payloads[0])
        follower.node.on_global_delta(payloads[3])  # round 4: no base, a fetch
        follower.node.on_global(encode(new_run), retained=True)  # the next run's round 1
        follower.node.on_settled(b"fetch")
    assert follower.fetched == [TOPICS.global_model]
    assert not [e for e in logs if e["event"] in ("global.fetching_again", "global.not_retained")]
    assert [(m.round, m.created_at) for m in follower.trained][-1] == (1, new_run.created_at)


def test_a_fetch_begun_before_training_brings_no_resend(tmp_path: Path) -> None:
    """A node that connects before the run's first model fetches (nothing came), then
    trains on round 1's compact form while the fetch is under way; the fetch then brings
    round 1's retained full form. Its update went out on this connection, after the fetch
    began: sending it again would be a duplicate (seen in CI, test_downlink). A model
    trained before the fetch began (a reconnect) is still sent again."""
    h = run("topk:0.035+sign+ef+flat", rounds=3)
    payloads, fulls = compact_payloads(h), h.globals()
    follower = Following(tmp_path)
    node = follower.node

    def train(model: GlobalModel) -> None:  # what train_and_publish leaves behind
        follower.trained.append(model)
        node.last_trained, node._last_update = (model.round, model.model_id), b"update"

    node.train_and_publish = train  # type: ignore[method-assign]
    resent = lambda: follower.outbox.on(TOPICS.update("pi-a"))  # noqa: E731
    node.on_settled(b"connect")  # nothing since the connect: a fetch
    node.on_global_delta(payloads[0])  # round 1 comes live; the node trains on it
    node.on_global(encode(fulls[0]), retained=True)  # the fetch brings round 1
    node.on_settled(b"fetch")
    assert [m.round for m in follower.trained] == [1] and resent() == []
    node.on_connected()  # a reconnect: the update may have been lost with it
    node.on_settled(b"connect")
    node.on_global(encode(fulls[0]), retained=True)
    assert resent() == [b"update"]


def forged(payload: bytes, change: Any) -> bytes:
    message = msgpack.unpackb(payload)
    change(message)
    return msgpack.packb(message, use_bin_type=True)


def _codes_flipped(m: dict[str, Any]) -> None:
    data = bytearray(m["delta"]["data"])
    data[0] ^= 0xFF
    m["delta"]["data"] = bytes(data)


def _size_changed(m: dict[str, Any]) -> None:
    m["delta"]["size"] -= 1


def _other_model_id(m: dict[str, Any]) -> None:
    m["model_id"] = "0" * 32


def _not_a_delta(m: dict[str, Any]) -> None:
    m["delta"] = b"junk"


def _no_compression(m: dict[str, Any]) -> None:
    del m["compression"]


def _count_beyond_size(m: dict[str, Any]) -> None:
    m["delta"]["count"] = m["delta"]["size"] + 1


def _huge_scales(m: dict[str, Any]) -> None:
    m["delta"]["scales"] = np.full(len(m["delta"]["scales"]) // 4, 3e38, np.float32).tobytes()


HOSTILE = {
    "flipped_codes": (_codes_flipped, {"bad_model_id"}),
    "wrong_size": (_size_changed, {"layout_mismatch"}),
    "model_id_mismatch": (_other_model_id, {"bad_model_id"}),
    "count_beyond_size": (_count_beyond_size, {"bad_index"}),
    "huge_scales": (_huge_scales, {"non_finite", "bad_field", "out_of_range"}),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_compact_update_is_refused_with_a_reason_and_the_model_kept(
    tmp_path: Path, name: str
) -> None:
    change, reasons = HOSTILE[name]
    h = run("topk:0.035+sign+ef+flat", rounds=2)
    payloads = compact_payloads(h)
    follower = Following(tmp_path)
    with structlog.testing.capture_logs() as logs:
        follower.node.on_global_delta(payloads[0])
        before = follower.held
        follower.node.on_global_delta(forged(payloads[1], change))
    refused = [e for e in logs if e["event"] == "global_delta.rejected"]
    assert len(refused) == 1 and refused[0]["reason"] in reasons, refused
    assert follower.held is before  # kept its model
    assert follower.fetched == [TOPICS.global_model]  # and fetches the full one
    assert [m.round for m in follower.trained] == [1]


@pytest.mark.parametrize("change", [_not_a_delta, _no_compression])
def test_an_unreadable_compact_update_is_ignored_with_a_reason(tmp_path: Path, change: Any) -> None:
    h = run("topk:0.035+sign+ef+flat", rounds=2)
    payloads = compact_payloads(h)
    with pytest.raises(SchemaError) as error:
        decode_global_delta(forged(payloads[1], change))
    assert error.value.reason == "bad_field"
    follower = Following(tmp_path)
    with structlog.testing.capture_logs() as logs:
        follower.node.on_global_delta(payloads[0])
        before = follower.held
        follower.node.on_global_delta(forged(payloads[1], change))
    assert [e["reason"] for e in logs if e["event"] == "global_delta.rejected"] == ["bad_field"]
    assert follower.held is before


def test_an_older_node_fetches_the_full_model_instead(tmp_path: Path) -> None:
    """A reader that knows only the xor form finds it empty and fetches the full model."""
    h = run("topk:0.035+sign+ef+flat", rounds=2)
    compact = decode_global_delta(compact_payloads(h)[1])
    older = dataclasses.replace(compact, compression=None, delta=None)
    with pytest.raises(SchemaError) as error:
        apply_global_delta(h.globals()[0].params, older)
    assert error.value.reason == "bad_shape"


# ------------------------------------------------------------------ delivered bytes


def test_a_node_counts_every_model_delivered_and_reports_it(tmp_path: Path) -> None:
    h = run("topk:0.035+sign+ef+flat", rounds=3)
    payloads, fulls = compact_payloads(h), h.globals()
    follower = Following(tmp_path)
    retained_full = encode(fulls[0])
    batch = [  # the connect: the retained full model and round 1 on global/delta
        Received(TOPICS.global_model, retained_full, True),
        Received(TOPICS.global_delta, payloads[0], False),
    ]
    handle(follower.node, batch)
    handle(follower.node, [Received(TOPICS.global_delta, payloads[1], False)])
    # two compact forms in one batch: the older is skipped, but was delivered
    handle(
        follower.node,
        [Received(TOPICS.global_delta, p, False) for p in (payloads[2], payloads[3])],
    )
    expected = len(retained_full) + sum(len(p) for p in payloads)
    assert follower.node.received_bytes == expected
    follower.node.status("idle")
    status = decode_status(follower.outbox.on(TOPICS.status("pi-a"))[-1])
    assert status.received_bytes == expected


def test_the_aggregator_adds_up_what_nodes_report_per_round() -> None:
    h = Harness(rounds=3)
    h.agg.start()
    h.agg.note_received("pi-a", 10_000)  # first reports: baselines
    h.agg.note_received("pi-b", 20_000)
    h.agg.note_received("pi-a", 11_000)  # +1,000
    h.agg.note_received("pi-b", 20_500)  # +500
    for index, node in enumerate(NODES):
        h.report(node, seed=index)
    h.agg.note_received("pi-b", 300)  # restarted: counts in full
    for index, node in enumerate(NODES):
        h.report(node, seed=10 + index)
    for index, node in enumerate(NODES):  # nobody reports
        h.report(node, seed=20 + index)
    assert [m.downlink_delivered for m in h.metrics()] == [1_500, 300, None]


def test_the_option_takes_none_or_a_spec_in_canonical_form() -> None:
    assert downlink_spec("none") == downlink_spec("NONE") == "none"
    assert downlink_spec("flat+sign+ef+topk:0.0350") == "topk:0.035+sign+ef+flat"
    with pytest.raises(argparse.ArgumentTypeError, match=r"unknown stage 'bogus'.*or none"):
        downlink_spec("bogus")
    settings_ = AggregatorSettings(downlink_compression="topk:0.035+sign+ef+flat")
    assert settings_.downlink_compression == "topk:0.035+sign+ef+flat"
    assert AggregatorSettings().downlink_compression == "none"


# ------------------------------------------------------------------ round 1 from a seed


def seeded_run(rounds: int = 3, init_seed: int = 0) -> Harness:
    """``run`` with the aggregator told its initial model is the task's from ``init_seed``."""
    h = Harness(rounds=rounds, downlink_compression="topk:0.035+sign+ef+flat", init_seed=init_seed)
    h.agg.start()
    while not h.agg.done:
        for index, node in enumerate(NODES):
            h.report(node, seed=100 * h.agg.round + index, num_examples=10 + index)
    return h


def test_round_one_travels_as_its_seed_and_every_compact_form_is_retained() -> None:
    h = seeded_run()
    sent = h.on(TOPICS.global_delta)
    first = decode_global_delta(sent[0][0])
    full = h.globals()[0]
    assert (first.init_seed, first.round, first.model_id) == (0, 1, full.model_id)
    assert (first.base_model_id, first.xor, first.delta) == (full.model_id, b"", None)
    assert len(sent[0][0]) < 400 < len(encode(full))
    assert all(retain for _, retain in sent)  # a (re)connecting node gets the newest
    assert h.metrics()[0].global_delta_bytes == len(sent[0][0])
    with pytest.raises(SchemaError) as error:  # not a difference: nothing to apply
        apply_global_delta(full.params, first)
    assert error.value.reason == "bad_field"


def test_without_a_compressed_downlink_round_one_is_the_full_model_and_not_retained() -> None:
    h = Harness(rounds=2, init_seed=0)
    h.agg.start()
    payload, retain = h.on(TOPICS.global_delta)[0]
    assert payload == encode(h.globals()[0]) and not retain


def test_a_node_builds_round_one_from_the_seed_bitwise_and_needs_no_full_model(
    tmp_path: Path,
) -> None:
    h = seeded_run()
    payloads, fulls = compact_payloads(h), h.globals()
    follower = Following(tmp_path)
    handle(follower.node, [Received(CONNECTED, b"", False)])
    for payload, full in zip(payloads, fulls, strict=True):
        handle(follower.node, [Received(TOPICS.global_delta, payload, True)])
        assert follower.held is not None and follower.held.model_id == full.model_id
        assert bits(follower.held.params) == bits(full.params)
        handle(follower.node, [Received(SETTLED, b"connect", False)])  # harmless after one
    assert [m.round for m in follower.trained] == [1, 2, 3]
    assert follower.fetched == []
    assert follower.node.received_bytes == sum(len(p) for p in payloads)


def test_a_node_whose_initial_model_differs_fetches_the_full_one_and_says_why(
    tmp_path: Path,
) -> None:
    """Another seed stands for another numpy/JAX/CPU: the bits differ, the hash says so."""
    h = seeded_run(init_seed=1)  # the aggregator's initial model is MODEL.init(0)
    payloads, fulls = compact_payloads(h), h.globals()
    follower = Following(tmp_path)
    with structlog.testing.capture_logs() as logs:
        follower.node.on_global_delta(payloads[0])
    unbuilt = [e for e in logs if e["event"] == "global_delta.init_unbuilt"]
    assert len(unbuilt) == 1 and "bad_model_id" in unbuilt[0]["reason"], unbuilt
    assert follower.held is None and follower.trained == []
    assert follower.fetched == [TOPICS.global_model]
    follower.node.on_global(encode(fulls[0]), retained=True)  # the fetch brings it
    follower.node.on_settled(b"fetch")
    follower.node.on_global_delta(payloads[1])
    assert follower.held is not None and follower.held.model_id == fulls[1].model_id
    assert [m.round for m in follower.trained] == [1, 2]
    assert follower.fetched == [TOPICS.global_model]


def test_a_connect_fetches_the_full_model_only_without_a_usable_compact_form(
    tmp_path: Path,
) -> None:
    h = seeded_run()
    payloads = compact_payloads(h)
    plain = Following(tmp_path / "plain")  # nothing retained on global/delta
    handle(plain.node, [Received(CONNECTED, b"", False), Received(SETTLED, b"connect", False)])
    assert plain.fetched == [TOPICS.global_model]
    handle(plain.node, [Received(SETTLED, b"connect", False)])  # one fetch at a time
    assert plain.fetched == [TOPICS.global_model]
    late = Following(tmp_path / "late")  # joins at round 2: no base for its compact form
    handle(
        late.node,
        [
            Received(CONNECTED, b"", False),
            Received(TOPICS.global_delta, payloads[1], True),
            Received(SETTLED, b"connect", False),
        ],
    )
    assert late.fetched == [TOPICS.global_model]
    back = Following(tmp_path / "back")  # holds round 1, reconnects during round 2
    handle(back.node, [Received(TOPICS.global_delta, payloads[0], False)])
    handle(
        back.node,
        [
            Received(CONNECTED, b"", False),
            Received(TOPICS.global_delta, payloads[1], True),
            Received(SETTLED, b"connect", False),
        ],
    )
    assert back.fetched == [] and [m.round for m in back.trained] == [1, 2]


@pytest.mark.slow  # JAX compiles the task's init
def test_a_node_with_a_jax_task_builds_the_aggregators_initial_model_bitwise(
    tmp_path: Path,
) -> None:
    """Not a built-in MLP: the node's --task init under JAX, the aggregator's function."""
    from fedmq.aggregator.app import run_task
    from fedmq.tasks.registry import load_task

    made = run_task("digits-cnn", seed=3)
    model = GlobalModel(
        federation=FEDERATION, round=1, model=made.name, model_id=model_id_of(made.params),
        params=made.params, plan=PLAN, task_version=made.version,
    )  # fmt: skip
    follower = Following(tmp_path)
    follower.node.task = load_task("digits-cnn")
    follower.node.on_global_delta(encode(make_init_global_delta(model, 3)))
    assert follower.fetched == []
    assert follower.held is not None and bits(follower.held.params) == bits(made.params)
    other = Following(tmp_path / "other")  # no --task: a task it cannot build
    with structlog.testing.capture_logs() as logs:
        other.node.on_global_delta(encode(make_init_global_delta(model, 3)))
    assert [e["event"] for e in logs if "init" in e["event"]] == ["global_delta.init_unbuilt"]
    assert other.fetched == [TOPICS.global_model]


# ------------------------------------------------------------------ the final model's delivery


def server_statuses(h: Harness) -> list[ServerStatus]:
    return [decode_server_status(payload) for payload, _ in h.on(TOPICS.server)]


def counting(wait: float = 5.0, store: StateDir | None = None) -> Harness:
    """A 2-round run counting the final model's delivery: every node present, its first
    report a baseline, 1,000 bytes more in each round's report (1,000 x node number)."""
    h = Harness(rounds=2, final_delivery_wait=wait, store=store)
    h.agg.start()
    for index, node in enumerate(NODES):
        h.agg.note_presence(node, True)
        h.agg.note_received(node, 50_000 + index)
    while not h.agg.done:
        for index, node in enumerate(NODES):
            h.agg.note_received(node, h.agg._received[node] + 1_000 * (index + 1))
            h.report(node, seed=100 * h.agg.round + index)
    return h


def test_done_waits_for_every_node_to_report_the_final_model_and_carries_their_count() -> None:
    h = counting()
    assert h.agg.done and not h.agg.finished
    assert [m.downlink_delivered for m in h.metrics()] == [6_000, 6_000]
    assert server_statuses(h)[-1].state == "waiting"  # no done yet: the count comes with it
    assert h.agg.awaited() == NODES
    assert h.agg.timeout() == 5.0
    h.agg.note_received("pi-a", h.agg._received["pi-a"] + 700, final=True)
    h.agg.note_received("pi-b", h.agg._received["pi-b"] + 0)  # a late submitted: not done
    h.agg.tick()
    assert h.agg.awaited() == ["pi-b", "pi-c"] and not h.agg.finished
    h.agg.note_received("pi-b", h.agg._received["pi-b"] + 700, final=True)
    h.agg.note_received("pi-c", h.agg._received["pi-c"] + 700, final=True)
    h.clock.now += 0.01
    h.agg.tick()  # every node present has reported: done at once, not at the wait's end
    assert h.agg.finished and h.agg.final_count == (2_100, 3)
    done = server_statuses(h)[-1]
    assert (done.state, done.round) == ("done", 3)
    assert (done.final_downlink_delivered, done.final_downlink_nodes) == (2_100, 3)
    assert decode_server_status(encode(done)) == done
    assert [m.downlink_delivered for m in h.metrics()] == [6_000, 6_000]  # rounds unchanged
    h.agg.tick()
    assert len([s for s in server_statuses(h) if s.state == "done"]) == 1


def test_a_node_that_never_reports_holds_done_back_only_until_the_wait_ends() -> None:
    h = counting(wait=5.0)
    h.agg.note_presence("pi-c", False)  # its will: offline, not waited for
    h.agg.note_received("pi-a", h.agg._received["pi-a"] + 900, final=True)
    h.clock.now += 4.0
    h.agg.tick()
    assert h.agg.awaited() == ["pi-b"] and not h.agg.finished
    assert h.agg.timeout() == pytest.approx(1.0)
    h.clock.now += 1.0
    with structlog.testing.capture_logs() as logs:
        h.agg.tick()
    assert h.agg.finished and h.agg.final_count == (900, 1)
    assert {"event": "final.unreported", "nodes": ["pi-b"], "log_level": "warning"} in logs
    done = server_statuses(h)[-1]
    assert (done.final_downlink_delivered, done.final_downlink_nodes) == (900, 1)


def test_a_node_whose_first_report_is_done_is_not_counted_and_finish_cuts_the_wait() -> None:
    h = counting()
    h.agg.note_received("pi-new", 123_456, final=True)  # no earlier count: a baseline only
    h.agg.note_presence("pi-new", True)
    assert "pi-new" not in h.agg.awaited()
    h.agg.finish()  # a stop: what it has so far
    assert h.agg.finished and h.agg.final_count == (None, 0)
    done = server_statuses(h)[-1]
    assert (done.final_downlink_delivered, done.final_downlink_nodes) == (None, 0)
    assert "final_downlink_delivered" not in msgpack.unpackb(encode(done))


def test_without_a_wait_done_comes_with_the_final_model_and_no_count() -> None:
    h = counting(wait=0.0)
    assert h.agg.finished and h.agg.final_count is None and h.agg.awaited() == []
    done = server_statuses(h)[-1]
    assert (done.state, done.final_downlink_nodes) == ("done", None)
    assert set(msgpack.unpackb(encode(done))) == {
        "v", "type", "federation", "state", "round", "expected_nodes", "min_nodes",
        "reported", "deadline_seconds", "at",
    }  # fmt: skip


def test_a_restarted_finished_run_republishes_the_count_it_kept(tmp_path: Path) -> None:
    h = counting(store=StateDir(tmp_path))
    for node in NODES:
        h.agg.note_received(node, h.agg._received[node] + 1_234, final=True)
    h.agg.tick()
    assert h.agg.final_count == (3 * 1_234, 3)
    assert isinstance(h.agg.store, StateDir)
    h.agg.store.close()
    again = Harness(rounds=2, final_delivery_wait=5.0, store=StateDir(tmp_path))
    assert isinstance(again.agg.store, StateDir)
    assert resume_or_start(again.agg, again.agg.store)
    assert again.agg.finished  # no second count: the one kept is the final model's
    again.agg.republish()
    done = server_statuses(again)[-1]
    assert (done.state, done.final_downlink_delivered, done.final_downlink_nodes) == (
        "done", 3 * 1_234, 3,
    )  # fmt: skip
    again.agg.store.close()  # its journal file, else a ResourceWarning in a later test


@pytest.mark.parametrize(
    ("state", "round_", "through"),
    [("done", 2, True), ("error", 3, True), ("idle", None, True), ("idle", 2, False),
     ("submitted", 2, False), ("training", 2, False)],
)  # fmt: skip
def test_which_statuses_say_a_node_is_through_with_the_final_model(
    state: str, round_: int | None, through: bool
) -> None:
    status = NodeStatus(federation=FEDERATION, node_id="pi-a", state=state, round=round_)
    assert status.through_with_final is through


def test_the_report_adds_the_final_model_to_what_was_delivered() -> None:
    rows = [{"round": r, "downlink_delivered": 1_000, "uplink_bytes": 10, "downlink_bytes": 5,
             "seconds": 0.1} for r in (1, 2)]  # fmt: skip
    report = {"rounds": rows, **final_delivery_entry((300, 3))}
    assert (report["final_downlink_delivered"], report["final_downlink_nodes"]) == (300, 3)
    line = next(x for x in summary_lines(report) if x.startswith("downlink delivered"))
    assert line == (
        "downlink delivered (nodes' counts): 2,000 B in 2 rounds"
        " + 300 B of the final model (3 nodes' counts) = 2,300 B"
    )
    assert final_delivery_entry(None) == {}
    plain = next(x for x in summary_lines({"rounds": rows}) if x.startswith("downlink delivered"))
    assert plain == "downlink delivered (nodes' counts): 2,000 B in 2 rounds"
