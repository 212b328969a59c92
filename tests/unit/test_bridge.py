"""A site broker's bridge to the root (broker.bridge) and ``fedmq broker init --site``;
the one-line refusals of ``fedmq aggregator --site/--sites``."""

from pathlib import Path

import pytest

from fedmq import cli
from fedmq.broker.bridge import Bridge, render_bridge


def test_the_bridge_takes_the_roots_models_and_status_in_and_sends_nothing_out() -> None:
    text = render_bridge(Bridge(federation="f1", site="north", host="root.example", port=8883))
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "connection fedmq-north"
    assert "address root.example:8883" in lines
    assert {
        "try_private true",
        "cleansession false",
        "remote_clientid fedmq-bridge.f1.north",
    } <= set(lines)
    topics = [line for line in lines if line.startswith("topic ")]
    assert topics == [
        "topic fedmq/f1/global in 1",
        "topic fedmq/f1/global/delta in 1",
        "topic fedmq/f1/server in 1",
    ]
    assert not any(" out " in line or " both " in line for line in topics)
    assert "remote_username" not in text and "bridge_cafile" not in text


def test_a_bridge_over_tls_with_an_account() -> None:
    bridge = Bridge(federation="f1", site="north", host="root", port=8883,
                    ca_file=Path("/etc/fedmq/root-ca.crt"), username="north-bridge",
                    password="s3cret")  # fmt: skip
    text = render_bridge(bridge)
    for line in ("bridge_cafile /etc/fedmq/root-ca.crt", "bridge_insecure false",
                 "remote_username north-bridge", "remote_password s3cret"):  # fmt: skip
        assert line in text.splitlines()


@pytest.mark.parametrize(
    "changes",
    [{"site": "a/b"}, {"port": 0}, {"host": "root host"}, {"password": "x"}],
)
def test_a_bridge_that_cannot_work_is_refused(changes: dict[str, object]) -> None:
    fields: dict[str, object] = {"federation": "f1", "site": "north", "host": "root", "port": 1}
    with pytest.raises(ValueError):
        Bridge(**{**fields, **changes})  # type: ignore[arg-type]


def test_broker_init_site_writes_the_bridge_and_lets_the_site_aggregator_read_the_model(
    tmp_path: Path,
) -> None:
    password = tmp_path / "bridge.password"
    password.write_text("s3cret\n")
    target = tmp_path / "north"
    code = cli.main(["broker", "init", str(target), "--nodes", "n1,n2", "--federation", "f1",
                     "--hostname", "north.local", "--site", "north", "--upstream", "root:8883",
                     "--upstream-username", "north-bridge", "--upstream-password-file",
                     str(password)])  # fmt: skip
    assert code == 0
    config = (target / "mosquitto.conf").read_text()
    assert config.rstrip().endswith("topic fedmq/f1/server in 1")
    assert "remote_password s3cret" in config.splitlines()
    assert (target / "mosquitto.conf").stat().st_mode & 0o777 == 0o600  # it holds a password
    acl = next(target.rglob("acl")).read_text()
    aggregator = acl[acl.index("user aggregator") :].split("\n\n")[0]
    assert "topic read fedmq/f1/global" in aggregator.splitlines()


def test_broker_init_upstream_without_site_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["broker", "init", str(tmp_path / "d"), "--nodes", "n1",
                     "--upstream", "root:8883"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "add --site" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--site", "north", "--upstream", "127.0.0.1:1"], "cannot be split over sites"),
        (["--sites", "--aggregation", "median"], "cannot be split over sites"),
        (["--sites", "--aggregation", "fedavg+clip-norm:1"], "would clip whole sites"),
        (["--site", "north"], "come together"),
        (["--sites", "--aggregation", "fedavg", "--mode", "async"], "--mode sync"),
    ],
)
def test_the_aggregator_refuses_what_a_hierarchy_cannot_do_in_one_line(
    argv: list[str], says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["aggregator", "--broker", "127.0.0.1:1", "--state-dir",
                     str(tmp_path / "s"), *argv])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert says in err and len(err.splitlines()) == 1, err
