"""The broker's side of the protocol: the project's mosquitto.conf (rendering and the
queue arithmetic it promises) and the $SYS counter parser."""

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.aggregator.server import dense_update_bound
from fedmq.broker.process import PROJECT_CONF, render_config
from fedmq.models import get_model
from fedmq.schemas.sys_topics import DROPPED, counts_drops, parse_counter


def settings_of(text: str) -> dict[str, list[str]]:
    """Option name -> values, as mosquitto reads them (comments and blanks skipped)."""
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.strip().partition(" ")
            found.setdefault(name, []).append(value.strip())
    return found


PROJECT = settings_of(PROJECT_CONF.read_text())


def one(name: str) -> str:
    [value] = PROJECT[name]
    return value


# ---- $SYS counters ----------------------------------------------------------------------


def test_dropped_topic_is_mosquittos():
    assert DROPPED == "$SYS/broker/publish/messages/dropped"


@pytest.mark.parametrize(
    ("payload", "value"),
    [(b"0", 0), (b"17", 17), (b"18446744073709551615", 2**64 - 1), (b" 42\n", 42), (b"007", 7)],
)
def test_counter_values(payload: bytes, value: int):
    assert parse_counter(payload) == value


@pytest.mark.parametrize(
    "payload",
    [b"", b" ", b"-1", b"+1", b"1.5", b"1e3", b"0x10", b"12 seconds", b"1_000",
     b"123456789012345678901", "٣".encode(), b"\xff", b"1\x002"],
)  # fmt: skip
def test_not_counters(payload: bytes):
    assert parse_counter(payload) is None


@given(st.integers(min_value=0, max_value=10**20 - 1))
def test_counters_round_trip(value: int):
    assert parse_counter(str(value).encode()) == value


@given(st.binary(max_size=30))
def test_any_bytes_give_an_int_or_none(payload: bytes):
    value = parse_counter(payload)
    assert value is None or (value >= 0 and payload.strip().isdigit() and int(payload) == value)


# ---- rendering the config ---------------------------------------------------------------


def test_render_moves_listener_and_persistence(tmp_path: Path):
    rendered = settings_of(render_config(PROJECT_CONF.read_text(), 4242, data_dir=tmp_path))
    assert rendered["listener"] == ["4242 127.0.0.1"]
    assert rendered["persistence_location"] == [f"{tmp_path.resolve()}/"]
    moved = ("listener", "persistence_location")
    assert {k: v for k, v in rendered.items() if k not in moved} == {
        k: v for k, v in PROJECT.items() if k not in moved
    }


def test_render_without_data_dir_keeps_the_template_location():
    assert settings_of(render_config(PROJECT_CONF.read_text(), 4242))["persistence_location"] == [
        one("persistence_location")
    ]


def test_render_adds_a_missing_location_and_a_user(tmp_path: Path):
    rendered = settings_of(
        render_config("listener 1883 127.0.0.1\n", 1, data_dir=tmp_path / "d", user="fed")
    )
    assert rendered == {
        "listener": ["1 127.0.0.1"],
        "persistence_location": [f"{(tmp_path / 'd').resolve()}/"],
        "user": ["fed"],
    }
    kept = render_config("listener 1883 127.0.0.1\nuser mosquitto\n", 1, user="fed")
    assert settings_of(kept)["user"] == ["mosquitto"]


@pytest.mark.parametrize(
    "template",
    ["", "listener 1883 0.0.0.0\n", "listener 1 127.0.0.1\nlistener 2 127.0.0.1\n",
     "listener 1 127.0.0.1\npersistence_location /a/\npersistence_location /b/\n"],
)  # fmt: skip
def test_render_refuses_ambiguous_templates(template: str, tmp_path: Path):
    with pytest.raises(ValueError):
        render_config(template, 1, data_dir=tmp_path)


# ---- what the project's config promises ----------------------------------------------


def test_every_setting_has_a_comment():
    lines = PROJECT_CONF.read_text().splitlines()
    for number, line in enumerate(lines):
        if line.strip() and not line.startswith("#"):
            assert lines[number - 1].startswith("#"), f"line {number + 1} has no comment: {line}"


def test_persistence_is_on_and_saved_by_the_clock():
    assert one("persistence") == "true"
    assert one("persistence_location").endswith("/")
    assert one("autosave_on_changes") == "false"
    assert 0 < int(one("autosave_interval")) <= 60
    assert re.fullmatch(r"\d+[hdwmy]", one("persistent_client_expiration"))


def test_sys_topics_are_fresh_every_round():
    assert 1 <= int(one("sys_interval")) <= 2


def test_queues_hold_the_worst_round_of_1000_nodes():
    """1,000 nodes x 2 copies (a resend after a reconnect) x the largest update the
    aggregator accepts for the largest reference model fit under both limits."""
    nodes, copies = 1000, 2
    largest = max(
        dense_update_bound(get_model(name)) for name in ("digits-mlp", "digits-mlp-large")
    )
    assert largest == 405_544
    inflight = int(one("max_inflight_messages"))
    assert nodes * copies <= int(one("max_queued_messages")) + inflight
    assert nodes * copies * largest <= int(one("max_queued_bytes"))
    assert "max_inflight_bytes" not in PROJECT  # else the byte limit excludes in-flight bytes
    # the count limit never binds first for the default model, even for 10,000 nodes
    assert 10_000 * copies <= int(one("max_queued_messages"))


@pytest.mark.parametrize("port", ["99999", "-5", "1.5"])
def test_a_port_out_of_range_is_a_usage_error(port: str, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedmq.cli import main

    with pytest.raises(SystemExit) as stopped:
        main(["broker", "--port", port])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedmq broker: error: argument --port: {port!r} is not a port number (0-65535, "
        "0 = any free port) (see fedmq broker --help)\n"
    )


@pytest.mark.parametrize(
    ("version", "counts"),
    [
        (b"mosquitto version 2.0.11", True),
        (b"mosquitto version 2.0.18\n", True),
        (b"aMQTT version 0.12.1", False),  # publishes $SYS, but no dropped counter at all
        (b"EMQX 5.8", False),
        (b"", False),
    ],
)
def test_only_mosquittos_version_says_a_missing_dropped_counter_is_unchanged(version, counts):
    # found running the federation on amqtt: its $SYS has a version and no dropped
    # counter, and broker_dropped said 0 (nothing lost) where it knew nothing
    assert counts_drops(version) is counts
