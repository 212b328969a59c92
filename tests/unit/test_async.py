"""Asynchronous buffered aggregation (``--mode async``, aggregator.buffer): the staleness
weight, which updates the buffer takes and refuses, and a resumed run that makes bitwise
the versions an uninterrupted one makes."""

import random
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedmq import cli, config
from fedmq.aggregator.app import resume_or_start
from fedmq.aggregator.buffer import BufferPolicy, staleness_weight, update_key
from fedmq.aggregator.checkpoint import Checkpoint, StateDir, from_bytes, to_bytes
from fedmq.aggregator.fedavg import apply_mean_delta
from fedmq.aggregator.policy import Opened
from fedmq.node.residual import SavedResidual
from fedmq.schemas import decode_global, model_id_of
from fedmq.settings import staleness_exponent
from tests.unit.test_aggregator_server import MODEL, PLAN, Harness

ASYNC = replace(PLAN, mode="async")
NODES = [f"node-{i}" for i in range(6)]


def harness(policy: BufferPolicy, *, rounds: int = 5, tmp_path: Path | None = None) -> Harness:
    store = StateDir(tmp_path) if tmp_path is not None else None
    return Harness(policy=policy, rounds=rounds, plan=ASYNC, store=store)


def model_of(h: Harness, version: int) -> str:
    """The model id of ``version``'s global, as published."""
    return next(g.model_id for g in h.globals() if g.round == version)


def send(h: Harness, node: str, version: int, *, seed: int = 0, examples: int = 10) -> dict:
    """``node``'s update trained on ``version``; returns its delta."""
    payload, delta = h.update(
        node, round=version, base_model_id=model_of(h, version), seed=seed, num_examples=examples
    )
    h.send(node, payload)
    return delta


# ------------------------------------------------------------------------ the weight


def test_the_staleness_weight_is_polynomial_and_exactly_1_when_fresh() -> None:
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(1, 1.0) == 0.5
    assert staleness_weight(7, 0.0) == 1.0
    with pytest.raises(ValueError):
        staleness_weight(-1, 0.5)


def test_a_stale_delta_is_scaled_by_its_weight_and_a_fresh_one_used_as_sent() -> None:
    h = harness(BufferPolicy(buffer=2, exponent=0.5))
    h.agg.start()
    send(h, "a", 1, seed=1)
    send(h, "b", 1, seed=2)  # version 2 is made
    before = {name: array.copy() for name, array in h.agg.params.items()}
    stale = send(h, "c", 1, seed=3, examples=30)  # trained on 1, arrives at 2
    fresh = send(h, "d", 2, seed=4, examples=10)  # version 3
    factor = 2**-0.5
    expected_mean = {
        name: (30 * (stale[name] * np.float32(factor)).astype(np.float64) + 10 * fresh[name]) / 40
        for name in before
    }
    expected = apply_mean_delta(before, expected_mean)
    for name, array in expected.items():
        np.testing.assert_allclose(h.agg.params[name], array, rtol=0, atol=1e-6)
    unweighted = apply_mean_delta(
        before, {name: (30.0 * stale[name] + 10 * fresh[name]) / 40 for name in before}
    )
    assert not np.allclose(h.agg.params["l0.w"], unweighted["l0.w"], rtol=0, atol=1e-6)
    second = h.metrics()[1]
    assert (second.closed_by, second.participants) == ("buffer_full", ["c", "d"])
    assert (second.extra["staleness_max"], second.extra["staleness_mean"]) == (1, 0.5)
    assert second.elapsed is not None and second.elapsed >= 0


def test_a_node_may_have_several_updates_in_one_buffer() -> None:
    h = harness(BufferPolicy(buffer=3))
    h.agg.start()
    send(h, "a", 1)
    send(h, "b", 1)
    send(h, "c", 1)  # version 2
    send(h, "a", 2, seed=5)
    send(h, "b", 2, seed=6)
    assert h.agg.version == 2
    assert sorted(h.agg.held) == [update_key("a", 2), update_key("b", 2)]
    # a late update of c's from version 1 is a duplicate: version 2 already holds it
    send(h, "c", 1, seed=9)
    send(h, "c", 2, seed=7)  # version 3 from a@2, b@2, c@2
    assert h.metrics()[-1].rejected == {"duplicate": 1}
    assert h.agg.version == 3


def test_arrival_order_within_a_buffer_does_not_change_the_version() -> None:
    ids = []
    for order in (["a", "b", "c"], ["c", "a", "b"]):
        h = harness(BufferPolicy(buffer=3))
        h.agg.start()
        send(h, "x", 1, seed=11)
        send(h, "y", 1, seed=12)
        send(h, "z", 1, seed=13)  # version 2: the three below are one stale, two fresh
        seeds = {"a": 1, "b": 2, "c": 3}
        for node in order:
            send(h, node, 1 if node == "a" else 2, seed=seeds[node])
        ids.append(h.agg.model_id)
    assert ids[0] == ids[1]


# ------------------------------------------------------------------------ what is refused


def test_updates_past_max_staleness_are_rejected_as_stale_and_counted() -> None:
    h = harness(BufferPolicy(buffer=1, max_staleness=1), rounds=6)
    h.agg.start()
    send(h, "a", 1)  # version 2
    send(h, "b", 2)  # version 3
    send(h, "c", 1)  # 2 behind: stale
    send(h, "c", 2)  # 1 behind: taken, version 4
    (*_, last) = h.metrics()
    assert last.rejected == {"stale": 1}
    assert last.participants == ["c"] and last.extra["staleness_max"] == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"round": 3}, "wrong_round"),  # a version not made yet
        ({"base_model_id": "0" * 32}, "wrong_base_model"),
        ({"round": 1, "base_model_id": "0" * 32}, "wrong_base_model"),
    ],
)
def test_an_update_that_is_not_of_a_made_version_is_refused(fields, reason) -> None:
    h = harness(BufferPolicy(buffer=1))
    h.agg.start()
    send(h, "a", 1)  # version 2 is open
    payload, _ = h.update("b", **fields)
    h.send("b", payload)
    send(h, "c", 2)
    assert h.metrics()[-1].rejected == {reason: 1}


def test_a_resent_copy_of_a_folded_update_is_a_duplicate_and_after_the_end_wrong_round() -> None:
    h = harness(BufferPolicy(buffer=2), rounds=2)
    h.agg.start()
    payload, _ = h.update("a", round=1, base_model_id=model_of(h, 1))
    h.send("a", payload)
    h.send("a", payload)  # a QoS 1 redelivery: in the buffer already
    send(h, "b", 1)  # version 2
    h.send("a", payload)  # a copy resent after a reconnect: folded into version 2
    send(h, "c", 2)
    send(h, "d", 2)  # version 3: the final model
    assert h.metrics()[-1].rejected == {"duplicate": 1}
    assert h.metrics()[0].rejected == {"duplicate": 1}
    assert h.agg.done
    before = len(h.published)
    h.send("e", h.update("e", round=2, base_model_id=model_of(h, 2))[0])
    assert h.agg.done and len(h.published) == before


def test_a_version_that_sampled_others_refuses_the_node() -> None:
    nodes = frozenset(NODES)
    h = Harness(
        policy=BufferPolicy(buffer=1, sample_fraction=0.5),
        rounds=3,
        plan=ASYNC,
        known_nodes=nodes,
    )
    h.agg.start()
    first = decode_global(h.on(h.agg.topics.global_model)[0][0])
    assert first.selected is not None and len(first.selected) == 3
    outsider = sorted(nodes - set(first.selected))[0]
    send(h, outsider, 1)
    send(h, first.selected[0], 1)
    assert h.metrics()[-1].rejected == {"not_selected": 1}


# ------------------------------------------------------------------------ crash and resume


def fleet(seed: int, steps: int) -> list[str]:
    """Which node finishes training next, ``steps`` times: node-4 and node-5 are slow."""
    rng = random.Random(seed)
    return rng.choices(NODES, weights=[4, 4, 4, 4, 1, 1], k=steps)


def run(h: Harness, schedule: list[str], holding: dict[str, int], start: int = 0) -> None:
    for index in range(start, len(schedule)):
        if h.agg.done:
            return
        node = schedule[index]
        version = holding.get(node, 1)
        if holding.get(f"{node}.sent") != version:
            seed = zlib.crc32(f"{node}/{version}".encode())
            send(h, node, version, seed=seed, examples=10 + NODES.index(node))
            holding[f"{node}.sent"] = version
        holding[node] = h.agg.version


def models_by_version(h: Harness) -> dict[int, str]:
    return {g.round: g.model_id for g in h.globals()}


@pytest.mark.parametrize("crash_at", [7, 23, 41])
def test_a_resumed_async_run_makes_bitwise_the_same_versions(tmp_path: Path, crash_at) -> None:
    policy = BufferPolicy(buffer=3, exponent=0.5, max_staleness=3)
    schedule = fleet(seed=crash_at, steps=400)
    reference = harness(policy, rounds=12)
    reference.agg.start()
    run(reference, schedule, {})
    assert reference.agg.done
    assert any(m.extra["staleness_max"] > 0 for m in reference.agg.history)

    h = harness(policy, rounds=12, tmp_path=tmp_path)
    h.agg.start()
    holding: dict[str, int] = {}
    run(h, schedule[:crash_at], holding)
    seen = models_by_version(h)
    h.agg.store.close()  # type: ignore[union-attr]  # the process dies; the files stay

    again = harness(policy, rounds=12, tmp_path=tmp_path)
    assert resume_or_start(again.agg, again.agg.store)  # type: ignore[arg-type]
    again.agg.republish()
    again.agg.tick()
    again.published[:0] = [p for p in h.published if p[0] == h.agg.topics.global_model]
    run(again, schedule, holding, start=crash_at)
    again.agg.store.close()  # type: ignore[union-attr]
    assert again.agg.done
    assert {**seen, **models_by_version(again)} == models_by_version(reference)
    assert [m.model_id for m in again.agg.history] == [m.model_id for m in reference.agg.history]
    for name, array in reference.agg.params.items():
        assert again.agg.params[name].tobytes() == array.tobytes()


def test_the_checkpoint_keeps_the_buffers_memory(tmp_path: Path) -> None:
    h = harness(BufferPolicy(buffer=1, max_staleness=2), rounds=6, tmp_path=tmp_path)
    h.agg.start()
    send(h, "a", 1)
    send(h, "b", 2)
    send(h, "a", 3)  # version 4 open
    saved = h.agg.store.load()  # type: ignore[union-attr]
    h.agg.store.close()  # type: ignore[union-attr]
    assert saved is not None and saved.version == 4
    assert sorted(saved.recent or {}) == [2, 3, 4]  # the open version and 2 before
    assert saved.latest == {"a": 3, "b": 2}
    assert saved.started_at == 1.7e9
    again = from_bytes(to_bytes(saved))
    assert again == saved


def test_a_sync_checkpoint_writes_no_buffer_keys() -> None:
    checkpoint = Checkpoint(
        version=1,
        fingerprint={},
        global_payload=b"",
        delta_payload=None,
        delta_bytes=None,
        history=[],
        previous_reporters=[],
    )
    assert b"recent" not in to_bytes(checkpoint) and b"latest" not in to_bytes(checkpoint)
    kept = replace(checkpoint, recent={3: Opened("f" * 32, ("a",))}, latest={"a": 2})
    assert from_bytes(to_bytes(kept)) == kept


# ------------------------------------------------------------------------ the node side


def test_an_async_residual_carries_over_skipped_versions_and_a_sync_one_does_not() -> None:
    saved = SavedResidual(4, "topk:0.1+ef", {"l0.w": np.zeros((2, 2), np.float32)})
    layout = {"l0.w": (2, 2)}
    assert saved.usable_for(5, "topk:0.1+ef", layout) is None
    assert "round 4" in (saved.usable_for(7, "topk:0.1+ef", layout) or "")
    assert saved.usable_for(7, "topk:0.1+ef", layout, skips=True) is None
    assert "new run" in (saved.usable_for(4, "topk:0.1+ef", layout, skips=True) or "")
    assert saved.usable_for(7, "int8+ef", layout, skips=True) is not None


# ------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--buffer", "3"], "--buffer 3 is for --mode async: add --mode async"),
        (["--mode", "async", "--nodes", "4", "--buffer", "5"],
         "--buffer 5 is more updates than --nodes 4 can send on one version"),
        (["--mode", "async", "--sample-fraction", "0.2", "--buffer", "3"],
         "the 2 nodes --sample-fraction 0.2 asks of --nodes 10 can send on one version, so no "
         "version would ever be made: give --buffer 2 or less"),
    ],
)  # fmt: skip
def test_a_buffer_that_cannot_fill_is_refused_with_the_fix(argv, message, capsys) -> None:
    assert cli.main(["aggregator", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--mode", "fast", "'fast' is not sync or async"),
        ("--staleness", "exp:1", "'exp:1' is not poly:A with A a number >= 0"),
        ("--staleness", "poly:-1", "'poly:-1' is not poly:A"),
        ("--staleness", "poly:nan", "'poly:nan' is not poly:A"),
        ("--max-staleness", "-1", "'-1' is not a whole number >= 0"),
        ("--buffer", "0", "'0' is not a whole number >= 1"),
    ],
)
def test_a_malformed_async_option_is_refused_in_one_line(option, value, message, capsys) -> None:
    for command in ("aggregator", "demo"):
        with pytest.raises(SystemExit) as stopped:
            config.parse_args(cli.build_parser(), [command, option, value], {})
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_the_staleness_spec_has_a_canonical_text() -> None:
    assert staleness_exponent("POLY:1") == 1.0
    parsed = config.parse_args(cli.build_parser(), ["aggregator", "--staleness", "poly:1"], {})
    assert parsed.staleness == "poly:1.0"


def test_the_async_plan_and_model_ids_are_what_the_nodes_see() -> None:
    h = harness(BufferPolicy(buffer=1))
    h.agg.start()
    (first,) = h.globals()
    assert first.plan.mode == "async" and first.model_id == model_id_of(MODEL.init(0))


def test_a_robust_rule_takes_the_buffer_with_its_stale_deltas_scaled() -> None:
    from fedmq.aggregator.robust import parse_rule

    h = Harness(
        policy=BufferPolicy(buffer=3), rounds=4, plan=ASYNC, aggregation=parse_rule("median")
    )
    h.agg.start()
    for node in ("x", "y", "z"):
        send(h, node, 1, seed=ord(node))  # version 2
    before = {name: array.copy() for name, array in h.agg.params.items()}
    stale = send(h, "a", 1, seed=1)
    fresh = [send(h, node, 2, seed=seed) for node, seed in (("b", 2), ("c", 3))]
    factor = np.float32(2**-0.5)
    for name, array in before.items():
        stack = np.stack([stale[name] * factor, fresh[0][name], fresh[1][name]])
        expected = array.astype(np.float64) + np.median(stack.astype(np.float64), axis=0)
        np.testing.assert_allclose(h.agg.params[name], expected, rtol=0, atol=1e-6)
    assert h.metrics()[-1].extra["aggregation"] == "median"
