"""Round sampling: who is asked to train, how it is announced, and what the aggregator
does with updates from nodes outside the sample or the fleet."""

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.aggregator.rounds import RoundPolicy, close_reason, select_nodes
from fedmq.schemas import (
    SchemaError,
    apply_global_delta,
    decode_global,
    decode_global_delta,
    decode_server_status,
    encode,
    make_global_delta,
)
from tests.unit.test_aggregator_server import TOPICS, Harness

FLEET = frozenset(f"pi-{i:02d}" for i in range(10))

ids = st.lists(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), max_size=40, unique=True)


@given(ids, st.floats(0.01, 0.99), st.integers(0, 2**32), st.integers(1, 99))
def test_a_sample_is_a_sorted_seeded_subset_of_the_right_size(
    population: list[str], fraction: float, seed: int, round: int
) -> None:
    chosen = select_nodes(population, fraction=fraction, seed=seed, round=round)
    if not population:
        assert chosen is None
        return
    assert chosen is not None
    assert list(chosen) == sorted(set(chosen)) and set(chosen) <= set(population)
    assert len(chosen) == max(1, math.ceil(fraction * len(population)))
    again = select_nodes(list(reversed(population)), fraction=fraction, seed=seed, round=round)
    assert again == chosen  # the order candidates were learnt in does not matter


def test_fraction_one_or_nobody_known_asks_everyone() -> None:
    assert select_nodes(FLEET, fraction=1.0, seed=0, round=1) is None
    assert select_nodes([], fraction=0.5, seed=0, round=1) is None


def test_rounds_draw_different_samples() -> None:
    samples = {select_nodes(FLEET, fraction=0.3, seed=0, round=r) for r in range(1, 21)}
    assert len(samples) > 5
    assert all(s is not None and len(s) == 3 for s in samples)


def test_a_sampled_round_expects_the_sample() -> None:
    policy = RoundPolicy(expected_nodes=10, min_nodes=5, deadline_seconds=1.0, sample_fraction=0.3)
    assert close_reason(policy, reported=3, opened_at=0, now=0, selected=3) == "all_reported"
    assert close_reason(policy, reported=2, opened_at=0, now=0.5, selected=3) is None
    # min_nodes is capped at the sample's size: 2 of 3 is not the quorum of 5, but 3 is
    assert close_reason(policy, reported=2, opened_at=0, now=2, selected=3) is None
    with pytest.raises(ValueError, match="sample_fraction"):
        RoundPolicy(expected_nodes=3, min_nodes=1, sample_fraction=0.0)


def test_selected_is_on_the_wire_and_checked() -> None:
    h = Harness()
    h.agg.start()
    model = decode_global(h.on(TOPICS.global_model)[0][0])
    assert model.selected is None
    assert b"selected" not in h.on(TOPICS.global_model)[0][0]  # unchanged bytes without it
    sampled = replace(model, selected=("pi-01", "pi-07"))
    assert decode_global(encode(sampled)).selected == ("pi-01", "pi-07")
    for bad in (("pi-07", "pi-01"), ("pi-01", "pi-01"), ("no/slash",), ()):
        with pytest.raises(SchemaError, match="selected"):
            decode_global(encode(replace(model, selected=bad)))
    compact = make_global_delta(model.params, sampled, model.model_id)
    rebuilt = apply_global_delta(model.params, decode_global_delta(encode(compact)))
    assert rebuilt.selected == ("pi-01", "pi-07")


def sampled_harness(**kwargs: object) -> Harness:
    return Harness(
        policy=RoundPolicy(expected_nodes=10, min_nodes=2, sample_fraction=0.3),
        rounds=3,
        known_nodes=FLEET,
    )


def test_the_aggregator_announces_a_sample_and_closes_when_it_has_reported() -> None:
    h = sampled_harness()
    h.agg.start()
    first = decode_global(h.on(TOPICS.global_model)[-1][0])
    assert first.selected is not None and len(first.selected) == 3
    assert set(first.selected) <= FLEET
    assert decode_server_status(h.on(TOPICS.server)[-1][0]).expected_nodes == 3
    left_out = sorted(FLEET - set(first.selected))[0]
    h.report(left_out)
    for node in first.selected:
        h.report(node)
    (metrics,) = h.metrics()
    assert metrics.participants == list(first.selected)
    assert metrics.rejected == {"not_selected": 1}
    assert metrics.closed_by == "all_reported"
    second = decode_global(h.on(TOPICS.global_model)[-1][0])
    assert second.round == 2 and second.selected != first.selected


def test_an_unknown_node_is_rejected() -> None:
    h = sampled_harness()
    h.agg.start()
    h.report("stranger")
    assert h.agg.reported == 0
    for node in decode_global(h.on(TOPICS.global_model)[-1][0]).selected or ():
        h.report(node)
    assert h.metrics()[0].rejected == {"unknown_node": 1}


def test_without_a_fleet_list_the_sample_is_drawn_from_nodes_online() -> None:
    h = Harness(policy=RoundPolicy(expected_nodes=4, min_nodes=1, sample_fraction=0.5))
    for node in ("pi-a", "pi-b", "pi-c", "pi-d"):
        h.agg.note_presence(node, True)
    h.agg.note_presence("pi-d", False)  # its last will: offline
    h.agg.start()
    selected = decode_global(h.on(TOPICS.global_model)[-1][0]).selected
    assert selected is not None and len(selected) == 2
    assert set(selected) <= {"pi-a", "pi-b", "pi-c"}


def test_sampling_alone_does_not_need_a_lower_quorum() -> None:
    """--sample-fraction with the default quorum (every expected node) still samples."""
    h = Harness(
        policy=RoundPolicy(expected_nodes=10, min_nodes=10, sample_fraction=0.2),
        known_nodes=FLEET,
    )
    h.agg.start()
    selected = decode_global(h.on(TOPICS.global_model)[-1][0]).selected
    assert selected is not None and len(selected) == 2
    status = decode_server_status(h.on(TOPICS.server)[-1][0])
    assert (status.expected_nodes, status.min_nodes) == (2, 2)


def test_the_demo_hands_sample_fraction_to_its_aggregator(tmp_path):  # type: ignore[no-untyped-def]
    from fedmq.demo import child_argv
    from fedmq.demo_settings import DemoSettings
    from fedmq.mqtt import BrokerAddress

    address = BrokerAddress.parse("127.0.0.1:1883")
    default = child_argv(DemoSettings(), address, tmp_path, tmp_path / "t.npz", [])
    assert all("--sample-fraction" not in argv for argv in default.values())
    chosen = child_argv(DemoSettings(sample_fraction=0.3), address, tmp_path, tmp_path / "t", [])
    argv = chosen["aggregator"]
    assert argv[argv.index("--sample-fraction") + 1] == "0.3"
