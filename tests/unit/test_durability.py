"""Crash safety of the aggregator without MQTT: journal records, checkpoints, resume.

A "crash" here is dropping the Aggregator object at some point and building a new one
from the same state directory, which is what a restarted process does.
"""

import random
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.aggregator.app import resume_or_start
from fedmq.aggregator.checkpoint import (
    KEEP_CHECKPOINTS,
    Checkpoint,
    CheckpointError,
    StateDir,
    from_bytes,
    to_bytes,
)
from fedmq.aggregator.journal import decode_records, encode_record, read_journal, record_parts
from fedmq.aggregator.robust import parse_rule
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.settings import fingerprint_mismatch
from tests.unit.test_aggregator_server import FEDERATION, PLAN, TOPICS, Harness

NODES = [f"node-{i}" for i in range(5)]

# ------------------------------------------------------------------------ journal records


@given(st.lists(st.tuples(st.text(max_size=30), st.binary(max_size=300)), max_size=8))
def test_records_round_trip(records: list[tuple[str, bytes]]) -> None:
    data = b"".join(encode_record(topic, payload) for topic, payload in records)
    assert decode_records(data) == (records, len(data))


@given(
    st.text(max_size=300),
    st.sampled_from([0, 1, 255, 256, 9984, 65535, 65536, 70000]) | st.integers(0, 1 << 17),
)
def test_a_record_is_msgpack_of_topic_and_payload_as_before(topic: str, size: int) -> None:
    """The record is written in two parts (head, then the payload as it came) with the
    bytes of one msgpack [topic, payload] body: every bin length form (8, 16, 32 bits)."""
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    body = msgpack.packb([topic, payload], use_bin_type=True)
    want = len(body).to_bytes(4, "big") + zlib.crc32(body).to_bytes(4, "big") + body
    head, rest = record_parts(topic, payload)
    assert rest is payload and head + rest == want == encode_record(topic, payload)


@pytest.mark.parametrize("length", [0, 1, 31, 32, 255, 256, 65535, 65536, 70000])
@pytest.mark.parametrize("char", ["a", "\u00e9", "\U0001f600"])
def test_a_record_s_topic_is_msgpack_s_str_at_every_length(length: int, char: str) -> None:
    """fixstr, str 8, 16 and 32, counted in UTF-8 bytes (1, 2 and 4 a character)."""
    topic = char * (length // len(char.encode()))
    body = msgpack.packb([topic, b"x"], use_bin_type=True)
    assert b"".join(record_parts(topic, b"x"))[8:] == body


@settings(max_examples=300)
@given(
    st.lists(st.tuples(st.text(max_size=10), st.binary(max_size=50)), min_size=1, max_size=5),
    st.data(),
)
def test_a_torn_tail_keeps_exactly_the_whole_records_before_it(records, data) -> None:  # type: ignore[no-untyped-def]
    frames = [encode_record(topic, payload) for topic, payload in records]
    blob = b"".join(frames)
    cut = data.draw(st.integers(0, len(blob) - 1))
    whole = 0
    covered = 0
    for frame in frames:
        if covered + len(frame) > cut:
            break
        covered += len(frame)
        whole += 1
    assert decode_records(blob[:cut]) == (records[:whole], covered)


def test_a_corrupt_record_ends_the_journal_there() -> None:
    first, second = encode_record("a", b"one"), encode_record("b", b"two")
    damaged = bytearray(first + second)
    damaged[len(first) + 9] ^= 0xFF  # a body byte of the second record: CRC mismatch
    assert decode_records(bytes(damaged)) == ([("a", b"one")], len(first))


def test_read_journal_cuts_a_torn_tail_off_the_file(tmp_path: Path) -> None:
    path = tmp_path / "journal-000001.log"
    whole = encode_record("t", b"kept")
    path.write_bytes(whole + encode_record("t", b"torn")[:-3])
    assert read_journal(path) == [("t", b"kept")]
    assert path.read_bytes() == whole  # appends continue after the last whole record


# ------------------------------------------------------------------------ checkpoint file


def test_checkpoint_round_trips_and_rejects_garbage() -> None:
    checkpoint = Checkpoint(
        version=3,
        fingerprint={"federation": "f", "plan": [0.1, 16, 1, 0]},
        global_payload=b"\x01\x02",
        delta_payload=None,
        delta_bytes=None,
        history=[b"m1", b"m2"],
        previous_reporters=["a", "b"],
    )
    assert from_bytes(to_bytes(checkpoint)) == checkpoint
    with pytest.raises(CheckpointError, match="unreadable"):
        from_bytes(b"\xc1 not msgpack")
    with pytest.raises(CheckpointError, match="version"):
        from_bytes(to_bytes(checkpoint).replace(b"\xa1v\x01", b"\xa1v\x07"))


def test_fingerprint_mismatch_names_the_setting() -> None:
    assert fingerprint_mismatch({"a": 1, "b": 2}, {"a": 1, "b": 2}) is None
    assert fingerprint_mismatch({"a": 1, "b": 2}, {"a": 1, "b": 3}) == ("b", 2, 3)
    plan = {"plan": [0.1, 16, 1, 0], "compression": "dense"}
    changed = {"plan": [0.1, 32, 1, 0], "compression": "dense"}
    assert fingerprint_mismatch(plan, changed) == ("--batch-size", 16, 32)


# ------------------------------------------------------------------------ resume


def delta_seed(node: str, round: int) -> int:
    return zlib.crc32(f"{node}/{round}".encode())


def send_round(h: Harness, nodes: list[str]) -> None:
    """Every node in ``nodes`` reports the open round (updates depend on node and round)."""
    round = h.agg.round
    for node in nodes:
        h.report(node, seed=delta_seed(node, round), num_examples=10 + NODES.index(node))


def harness(
    tmp_path: Path | None, rounds: int = 4, downlink: str | None = None, final: str | None = None
) -> Harness:
    store = StateDir(tmp_path) if tmp_path is not None else None
    return Harness(
        policy=RoundPolicy(expected_nodes=len(NODES), min_nodes=len(NODES)),
        rounds=rounds,
        store=store,
        downlink_compression=downlink,
        final_downlink_compression=final,
    )


def resumed(
    tmp_path: Path, rounds: int = 4, downlink: str | None = None, final: str | None = None
) -> Harness:
    """A new aggregator on the same state directory, as a restarted process builds it."""
    h = harness(tmp_path, rounds, downlink, final)
    store = h.agg.store
    assert isinstance(store, StateDir)
    assert resume_or_start(h.agg, store)  # what aggregator.app does at start
    h.agg.tick()
    return h


def crash(h: Harness) -> None:
    """The process dies after the edge's group commit: memory is gone, the files stay."""
    assert isinstance(h.agg.store, StateDir)
    h.agg.store.close()  # (fsyncs; the edge had done so before acknowledging anyway)


def run_to_end(h: Harness, order: random.Random | None = None) -> None:
    while not h.agg.done:
        reported = set(h.agg.held)
        missing = [node for node in NODES if node not in reported]
        if order is not None:
            order.shuffle(missing)
        send_round(h, missing)


def test_arrival_order_does_not_change_the_model() -> None:
    reference = harness(None)
    reference.agg.start()
    run_to_end(reference)
    for seed in range(3):
        shuffled = harness(None)
        shuffled.agg.start()
        run_to_end(shuffled, random.Random(seed))
        for name, array in reference.agg.params.items():
            assert shuffled.agg.params[name].tobytes() == array.tobytes()


# with a compressed downlink, its error-feedback residual comes back from the checkpoint
# (and the final model, in its own SPEC, is made from it)
@pytest.mark.parametrize(
    ("downlink", "final"),
    [(None, None), ("topk:0.1+int8+ef+flat", None), ("topk:0.1+int8+ef+flat", "topk:0.4+int8+ef")],
)
@pytest.mark.parametrize("crash_after", [0, 1, 2, 5, 7, 11, 13, 19])
def test_a_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(
    tmp_path: Path, crash_after: int, downlink: str | None, final: str | None
) -> None:
    reference = harness(None, downlink=downlink, final=final)
    reference.agg.start()
    run_to_end(reference)

    h = harness(tmp_path, downlink=downlink, final=final)
    h.agg.start()
    sent = 0
    while sent < crash_after and not h.agg.done:  # some whole rounds, then part of one
        node = next(n for n in NODES if n not in h.agg.held)
        h.report(node, seed=delta_seed(node, h.agg.round), num_examples=10 + NODES.index(node))
        sent += 1
    crash(h)
    h = resumed(tmp_path, downlink=downlink, final=final)
    run_to_end(h)

    if downlink is not None:  # every compact form was the compressed one, as published
        assert [p for p, _ in h.on(TOPICS.global_delta)][-1] == [
            p for p, _ in reference.on(TOPICS.global_delta)
        ][-1]
    for name, array in reference.agg.params.items():
        assert h.agg.params[name].tobytes() == array.tobytes()
    assert [m.participants for m in h.agg.history] == [
        m.participants for m in reference.agg.history
    ]
    assert sum(len(m.participants) for m in h.agg.history) == len(NODES) * 4


def test_a_redelivered_update_after_resume_is_a_duplicate_not_a_second_vote(
    tmp_path: Path,
) -> None:
    h = harness(tmp_path)
    h.agg.start()
    payload, _ = h.update("node-0", seed=1)
    h.send("node-0", payload)
    crash(h)
    h = resumed(tmp_path)
    assert h.agg.reported == 1
    h.send("node-0", payload)  # the broker redelivers what we had not acknowledged
    assert h.agg.reported == 1
    send_round(h, NODES[1:])
    (metrics,) = h.metrics()
    assert metrics.rejected == {"duplicate": 1}
    assert metrics.participants == NODES


def test_resume_republishes_the_open_round(tmp_path: Path) -> None:
    first = harness(tmp_path)
    first.agg.start()
    send_round(first, NODES)  # round 1 closes, round 2 opens
    (global_2, _) = first.on(TOPICS.global_model)[-1]
    crash(first)
    h = resumed(tmp_path)
    assert h.agg.round == 2
    assert h.published == []  # nothing goes out before the edge is connected
    h.agg.republish()
    assert h.on(TOPICS.global_model) == [(global_2, True)]
    assert len(h.agg.history) == 1
    # round 1's metrics again: the crash may have come before they went out
    assert [m.round for m in h.metrics()] == [1]
    assert h.metrics()[0].model_id == h.agg.model_id


def test_only_the_open_rounds_journal_is_kept(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.agg.start()
    send_round(h, NODES)
    send_round(h, NODES[:2])
    crash(h)
    assert sorted(p.name for p in tmp_path.glob("journal-*.log")) == ["journal-000002.log"]
    assert len(read_journal(tmp_path / "journal-000002.log")) == 2


def test_a_finished_run_resumes_as_done(tmp_path: Path) -> None:
    h = harness(tmp_path, rounds=1)
    h.agg.start()
    send_round(h, NODES)
    assert h.agg.done
    crash(h)
    again = resumed(tmp_path, rounds=1)
    assert again.agg.done
    assert len(again.agg.history) == 1
    np.testing.assert_array_equal(again.agg.params["l0.w"], h.agg.params["l0.w"])


def test_a_checkpoint_whose_metrics_hold_nan_resumes(tmp_path: Path) -> None:
    """Checkpoints written before non-finite metrics were sent as nil hold NaN in their
    history; resuming one failed with ``non_finite: loss is nan``. It resumes, the value
    read as nil and named in ``non_finite``, and the metrics republished decode."""
    h = harness(tmp_path)
    h.agg.start()
    send_round(h, NODES)
    crash(h)
    path = tmp_path / "checkpoint.msgpack"
    raw = msgpack.unpackb(path.read_bytes(), raw=False)
    metrics = msgpack.unpackb(raw["history"][0], raw=False)
    metrics["loss"] = float("nan")
    metrics["accuracy"] = float("inf")
    raw["history"][0] = msgpack.packb(metrics, use_bin_type=True)
    path.write_bytes(msgpack.packb(raw, use_bin_type=True))

    again = resumed(tmp_path)
    assert again.agg.round == 2
    (kept,) = again.agg.history
    assert kept.loss is None and kept.accuracy is None
    assert kept.extra["non_finite"] == ["accuracy", "loss"]
    again.agg.republish()
    assert [m.round for m in again.metrics()] == [1]  # decodes


# ------------------------------------------------------------------------ changed settings


def reference_params(rounds: int) -> dict[str, np.ndarray]:
    reference = harness(None, rounds)
    reference.agg.start()
    run_to_end(reference)
    return reference.agg.params


def test_a_finished_run_continues_to_a_larger_rounds(tmp_path: Path) -> None:
    """A finished 2-round run restarted with --rounds 4 did nothing and exited 0; it goes
    on to round 4 and ends bitwise where an uninterrupted 4-round run ends."""
    h = harness(tmp_path, rounds=2)
    h.agg.start()
    run_to_end(h)
    crash(h)
    h = resumed(tmp_path, rounds=4)
    assert not h.agg.done and h.agg.round == 3
    h.agg.republish()  # what the edge does once connected: reopens round 3
    opened = h.globals()[-1]
    assert (opened.round, opened.final) == (3, False)
    assert opened.model_id == h.agg.model_id
    run_to_end(h)
    assert [m.round for m in h.agg.history] == [1, 2, 3, 4]
    for name, array in reference_params(4).items():
        assert h.agg.params[name].tobytes() == array.tobytes()


def test_a_running_run_continues_to_a_larger_rounds(tmp_path: Path) -> None:
    h = harness(tmp_path, rounds=2)
    h.agg.start()
    send_round(h, NODES)
    send_round(h, NODES[:2])
    crash(h)
    h = resumed(tmp_path, rounds=3)
    run_to_end(h)
    assert [m.round for m in h.agg.history] == [1, 2, 3]
    for name, array in reference_params(3).items():
        assert h.agg.params[name].tobytes() == array.tobytes()


def test_a_finished_run_restarted_with_its_rounds_stays_finished(tmp_path: Path) -> None:
    h = harness(tmp_path, rounds=2)
    h.agg.start()
    run_to_end(h)
    crash(h)
    again = resumed(tmp_path, rounds=2)
    assert again.agg.done
    again.agg.republish()
    assert again.globals()[-1].final


@pytest.mark.parametrize(
    ("rounds", "finish", "least"),
    [(1, True, 2), (1, False, 2)],
)
def test_fewer_rounds_than_the_run_has_reached_are_refused_in_one_line(
    tmp_path: Path, rounds: int, finish: bool, least: int
) -> None:
    h = harness(tmp_path, rounds=2)
    h.agg.start()
    send_round(h, NODES)
    if finish:
        send_round(h, NODES)
    crash(h)
    with pytest.raises(CheckpointError) as refused:
        resumed(tmp_path, rounds=rounds)
    message = str(refused.value)
    assert "\n" not in message
    assert f"--rounds {rounds}" in message and f"--rounds {least} or more" in message
    assert "--fresh" in message and "--state-dir" in message and str(tmp_path) in message


def test_a_changed_plan_is_refused_in_one_line_naming_the_option_and_both_values(
    tmp_path: Path,
) -> None:
    """It was one JSON log line with the plan as an unlabelled list of numbers."""
    h = harness(tmp_path)
    h.agg.start()
    crash(h)
    changed = Harness(
        policy=RoundPolicy(expected_nodes=len(NODES), min_nodes=len(NODES)),
        store=StateDir(tmp_path),
        plan=replace(PLAN, learning_rate=0.05),
    )
    assert isinstance(changed.agg.store, StateDir)
    with pytest.raises(CheckpointError) as refused:
        resume_or_start(changed.agg, changed.agg.store)
    message = str(refused.value)
    assert "\n" not in message and "[" not in message
    assert "--learning-rate 0.05" in message and "--learning-rate 0.1 " in message
    assert "--fresh" in message and "--state-dir" in message


def test_the_command_refuses_a_changed_plan_with_exit_2_and_one_line(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.agg.start()
    crash(h)
    done = subprocess.run(
        [sys.executable, "-m", "fedmq", "aggregator", "--broker", "127.0.0.1:9",
         "--federation", FEDERATION, "--state-dir", str(tmp_path), "--batch-size", "32",
         "--test-data", "none", "--log-json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith("fedmq aggregator: error: --batch-size 32 ")
    assert "--batch-size 16 " in lines[0]


# ------------------------------------------------------------------------ kept checkpoints


def kept_rounds(directory: Path) -> list[int]:
    return sorted(int(p.name[11:17]) for p in directory.glob("checkpoint-*.msgpack"))


def finished_run(tmp_path: Path, *, keep: int = KEEP_CHECKPOINTS) -> Harness:
    h = Harness(
        policy=RoundPolicy(expected_nodes=len(NODES), min_nodes=len(NODES)),
        rounds=4,
        store=StateDir(tmp_path, keep=keep),
    )
    h.agg.start()
    run_to_end(h)
    crash(h)
    return h


def rolled_back(tmp_path: Path, to: int, **kwargs: object) -> Harness:
    h = Harness(
        policy=RoundPolicy(expected_nodes=len(NODES), min_nodes=len(NODES)),
        rounds=4,
        store=StateDir(tmp_path),
        **kwargs,  # type: ignore[arg-type]
    )
    assert isinstance(h.agg.store, StateDir)
    assert resume_or_start(h.agg, h.agg.store, rollback_to=to)
    return h


def test_the_last_checkpoints_are_kept_and_older_ones_dropped(tmp_path: Path) -> None:
    finished_run(tmp_path, keep=3)
    assert kept_rounds(tmp_path) == [3, 4, 5]  # 5: the final model
    assert (tmp_path / "checkpoint.msgpack").read_bytes() == (
        tmp_path / "checkpoint-000005.msgpack"
    ).read_bytes()


def test_rollback_continues_from_the_model_that_opened_that_round(tmp_path: Path) -> None:
    """The same updates after a rollback to round 2 give bitwise the same run; the
    rounds after it are forgotten (metrics, kept checkpoints, journal)."""
    reference = harness(None)
    reference.agg.start()
    run_to_end(reference)
    first = finished_run(tmp_path)
    opened_2 = first.globals()[1]
    h = rolled_back(tmp_path, 2)
    assert (h.agg.round, h.agg.done, h.agg.model_id) == (2, False, opened_2.model_id)
    assert [m.round for m in h.agg.history] == [1]
    assert kept_rounds(tmp_path) == [1, 2]
    h.agg.republish()
    assert h.globals()[-1].model_id == opened_2.model_id and not h.globals()[-1].final
    run_to_end(h)
    assert [m.round for m in h.agg.history] == [1, 2, 3, 4]
    for name, array in reference.agg.params.items():
        assert h.agg.params[name].tobytes() == array.tobytes()


def test_rollback_may_change_the_aggregation_rule(tmp_path: Path) -> None:
    """The way out of a poisoned run: back to a clean round, with a robust rule."""
    finished_run(tmp_path)
    h = rolled_back(tmp_path, 3, aggregation=parse_rule("median"))
    run_to_end(h)
    assert [m.extra.get("aggregation") for m in h.agg.history] == [None, None, "median", "median"]


def test_rollback_of_the_open_round_discards_its_journal(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.agg.start()
    send_round(h, NODES)
    send_round(h, NODES[:3])
    crash(h)
    h = rolled_back(tmp_path, 2)
    assert (h.agg.round, h.agg.reported) == (2, 0)


@pytest.mark.parametrize(("to", "says"), [(1, "keeps rounds 3-5"), (6, "keeps rounds 3-5")])
def test_rollback_to_a_round_not_kept_is_refused_in_one_line(
    tmp_path: Path, to: int, says: str
) -> None:
    finished_run(tmp_path, keep=3)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(CheckpointError) as refused:
        rolled_back(tmp_path, to)
    assert f"--rollback-to {to}" in str(refused.value) and says in str(refused.value)
    assert "\n" not in str(refused.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_crash_in_the_middle_of_a_rollback_leaves_a_run_that_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the checkpoint was switched to round 2, before the later rounds'
    files went: a plain restart resumes round 2 and drops them."""
    finished_run(tmp_path)

    def killed(self: StateDir, round: int) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(StateDir, "forget_after", killed)
        with pytest.raises(KeyboardInterrupt):
            rolled_back(tmp_path, 2)
    assert 5 in kept_rounds(tmp_path)
    h = resumed(tmp_path)
    assert h.agg.round == 2 and [m.round for m in h.agg.history] == [1]
    assert kept_rounds(tmp_path) == [1, 2]


def test_rollback_in_a_state_dir_without_kept_checkpoints_says_why(tmp_path: Path) -> None:
    finished_run(tmp_path)
    for round in kept_rounds(tmp_path):  # as an older fedmq left it
        (tmp_path / f"checkpoint-{round:06d}.msgpack").unlink()
    with pytest.raises(CheckpointError, match="no checkpoints of earlier rounds"):
        rolled_back(tmp_path, 2)


@pytest.fixture(autouse=True)
def _close_state_dirs(monkeypatch: pytest.MonkeyPatch) -> object:
    """Close every journal a test opened (a resumed harness is never crashed again)."""
    opened: list[StateDir] = []
    original = StateDir.__init__

    def tracking_init(self: StateDir, directory: Path, **kwargs: int) -> None:
        original(self, directory, **kwargs)
        opened.append(self)

    monkeypatch.setattr(StateDir, "__init__", tracking_init)
    yield
    for store in opened:
        store.close()
