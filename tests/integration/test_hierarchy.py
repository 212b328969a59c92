"""Site aggregators over bridged brokers (docs/hierarchy.md): a root mosquitto, two site
mosquittos bridged to it by the config ``fedmq broker init --site`` writes, a root
aggregator, two site aggregators and two nodes per site, all real processes on loopback.
The root's models are checked against flat FedAvg of the very node updates the sites
took (captured on the site brokers), within aggregator.site.TOLERANCE."""

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedmq.aggregator.fedavg import fedavg
from fedmq.aggregator.site import TOLERANCE
from fedmq.broker.bridge import Bridge, render_bridge
from fedmq.broker.process import PROJECT_CONF, Mosquitto
from fedmq.schemas import (
    GlobalModel,
    NodeUpdate,
    Topics,
    decode_global,
    decode_metrics,
    decode_update,
)

from ..conftest import Collector, has_final, through, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SITES = ("site-a", "site-b")
ROUNDS = 3


@pytest.fixture
def brokers(tmp_path: Path, federation: str) -> Iterator[dict[str, Mosquitto]]:
    """The root broker and one site broker per site, bridged to it."""
    started: dict[str, Mosquitto] = {}
    try:
        started["root"] = Mosquitto().start()
        for site in SITES:
            config = tmp_path / f"{site}-mosquitto.conf"
            bridge = Bridge(federation=federation, site=site, host="127.0.0.1",
                            port=started["root"].port)  # fmt: skip
            config.write_text(PROJECT_CONF.read_text() + render_bridge(bridge))
            started[site] = Mosquitto(config=config).start()
        yield started
    finally:
        for broker in started.values():
            broker.stop()


def collector(broker: Mosquitto, topics: list[str]) -> Collector:
    return Collector((broker.host, broker.port), topics)


def models_by_round(payloads: list[bytes]) -> dict[int, GlobalModel]:
    return {model.round: model for model in map(decode_global, payloads)}


@pytest.mark.parametrize("upstream", ["dense", "zlib"])  # zlib: lossless, the bound holds
def test_root_of_two_sites_equals_flat_fedavg_and_survives_a_site_sigkill(
    upstream, brokers, federation, spawn, node_data, tmp_path
):
    topics = Topics(federation)
    watchers = {name: collector(b, [topics.all_updates, topics.global_model, topics.metrics])
                for name, b in brokers.items()}  # fmt: skip
    common = ["--federation", federation, "--log-json"]
    report = tmp_path / "root-report.json"
    root = spawn(
        "root", "aggregator", *common, "--broker", brokers["root"].address, "--sites",
        "--nodes", "2", "--rounds", str(ROUNDS), "--aggregation", "fedavg",
        "--upstream-compression", upstream,
        "--state-dir", str(tmp_path / "root-state"), "--report", str(report),
    )  # fmt: skip

    def site_aggregator(site: str, name: str | None = None):  # type: ignore[no-untyped-def]
        return spawn(
            name or site, "aggregator", *common, "--broker", brokers[site].address, "--site", site,
            "--upstream", brokers["root"].address, "--nodes", "2", "--aggregation", "fedavg",
            "--upstream-compression", upstream,
            "--state-dir", str(tmp_path / f"{site}-state"),
            "--report", str(tmp_path / f"{site}-report.json"),
        )  # fmt: skip

    sites = {site: site_aggregator(site) for site in SITES}
    shards = node_data(4)
    nodes = [
        spawn(f"node-{i}", "node", *common, "--broker", brokers[SITES[i // 2]].address,
              "--node-id", f"{SITES[i // 2]}-n{i % 2}", "--data", str(path),
              "--state-dir", str(tmp_path / f"node-{i}"), "--exit-when-done")
        for i, path in enumerate(shards)
    ]  # fmt: skip

    # SIGKILL site-a once it has sent its round-1 update, and start it again: it resends
    # that update (the root keeps one) and carries on from its state directory.
    wait_until(
        lambda: any(decode_update(p).round == 1 for p in watchers["root"].on(topics.update("site-a"))),
        60, "site-a's round-1 update at the root",
    )  # fmt: skip
    sites["site-a"].proc.send_signal(signal.SIGKILL)
    sites["site-a"].proc.wait(10)
    sites["site-a"] = site_aggregator("site-a", "site-a-restarted")

    assert root.wait(90) == 0, root.log()
    events = [json.loads(line) for line in sites["site-a"].log().splitlines()
              if line.startswith("{")]  # fmt: skip
    [resumed] = [e for e in events if e["event"] == "site.resumed"]
    if resumed["sent"]:  # killed after sending its update: it sends the same one again
        assert any(e["event"] == "site.update_resent" for e in events)
    for name, site in sites.items():
        assert site.wait(30) == 0, f"{name}:\n{site.log()[-3000:]}"
    for node in nodes:
        assert node.wait(30) == 0, node.log()[-3000:]

    # those exits say each broker had every message; the watchers' copies may still be on
    # their way (mosquitto delivers to each subscriber on its own)
    for watcher in watchers.values():
        watcher.wait_on(topics.metrics, through(ROUNDS), "metrics")
        watcher.wait_on(topics.global_model, has_final, "the final model")
    metrics = {m.round: m for m in map(decode_metrics, watchers["root"].on(topics.metrics))}
    assert sorted(metrics) == list(range(1, ROUNDS + 1))
    for payload in watchers["root"].on(topics.update("site-b")):
        assert decode_update(payload).compression == upstream
    for m in metrics.values():  # every round has both sites, nothing but a resend refused
        assert m.participants == list(SITES) and m.num_examples == 4 * 375
        assert m.rejected in ({}, {"duplicate": 1}), m.rejected  # a resent site update
    assert len(json.loads(report.read_text())["rounds"]) == ROUNDS
    for site in SITES:  # each site's own metrics, on its broker: its two nodes, each round
        rows = {m.round: m for m in map(decode_metrics, watchers[site].on(topics.metrics))}
        assert sorted(rows) == list(range(1, ROUNDS + 1))
        assert all(m.participants == [f"{site}-n0", f"{site}-n1"] for m in rows.values())

    # The root's models, and flat FedAvg of the nodes' updates each was made from.
    models = models_by_round(watchers["root"].on(topics.global_model))
    assert sorted(models) == list(range(1, ROUNDS + 2)) and models[ROUNDS + 1].final
    for site in SITES:  # the bridge delivered the root's models to the site brokers
        seen = models_by_round(watchers[site].on(topics.global_model))
        assert {r: m.model_id for r, m in seen.items()} == {
            r: m.model_id for r, m in models.items()
        }
    updates: dict[tuple[int, str], NodeUpdate] = {}
    for site in SITES:
        for topic, payload, _ in list(watchers[site].messages):
            if topic.startswith(topics.prefix + "/updates/"):
                update = decode_update(payload)
                updates.setdefault((update.round, update.node_id), update)
    worst, differing, compared, most_ulps = 0.0, 0, 0, 0.0
    for number in range(1, ROUNDS + 1):
        base, made = models[number], models[number + 1]
        held = [u for (r, _), u in sorted(updates.items()) if r == number]
        assert len(held) == 4 and all(u.base_model_id == base.model_id for u in held)
        flat = fedavg(base.params, [(dict(u.delta), u.num_examples) for u in held])  # type: ignore[misc]
        total = sum(u.num_examples for u in held)
        for name, expected in flat.items():
            scale = sum(
                u.num_examples * np.abs(np.asarray(u.delta[name], np.float64)) for u in held
            )
            # the means differ by at most TOLERANCE x sum n|d| / N, and the float32 model
            # parameter each is added into by one rounding more (np.spacing)
            limit = TOLERANCE * scale / total + np.spacing(np.abs(expected))
            error = np.abs(made.params[name].astype(np.float64) - expected)
            assert (error <= limit).all(), (number, name, float((error - limit).max()))
            worst = max(worst, float((error / limit).max()))
            differing += int((made.params[name] != expected.astype(np.float32)).sum())
            compared += expected.size
            most_ulps = max(most_ulps, float((error / np.spacing(np.abs(expected))).max()))
    print(
        f"root of sites against flat FedAvg: worst error {worst:.3f} of the bound; "
        f"{differing} of {compared} parameters differ, by at most {most_ulps:.2f} ulp"
    )
    for close in watchers.values():
        close.close()


def test_a_broker_init_site_deployment_bridges_the_retained_model_to_its_aggregator(
    mosquitto, federation, tmp_path
):
    """The production config of ``fedmq broker init --site`` (passwords, ACLs, TLS
    listener) with its bridge to a root broker: a retained global model published at the
    root reaches the site aggregator's account on the site broker, retained."""
    import paho.mqtt.client as mqtt

    from fedmq import cli
    from fedmq.broker.process import free_port

    site_dir = tmp_path / "north"
    code = cli.main(["broker", "init", str(site_dir), "--nodes", "n1", "--federation", federation,
                     "--hostname", "localhost", "--tls-port", str(free_port()), "--listen",
                     "127.0.0.1", "--site", "north", "--upstream", mosquitto.address])  # fmt: skip
    assert code == 0
    topics = Topics(federation)
    root = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-root-{federation}")
    root.connect(mosquitto.host, mosquitto.port)
    root.loop_start()
    root.publish(topics.global_model, b"the root's model", qos=1, retain=True).wait_for_publish(5)
    site = Mosquitto(config=site_dir / "mosquitto.conf").start()
    got: list[tuple[bytes, bool]] = []
    reader = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="aggregator")
    try:
        password = (site_dir / "aggregator" / "password").read_text().splitlines()[0]
        reader.username_pw_set("aggregator", password)
        reader.on_message = lambda _c, _u, m: got.append((bytes(m.payload), bool(m.retain)))

        reader.on_connect = lambda c, _u, _f, _r, _p: c.subscribe(topics.global_model, qos=1)
        reader.connect(site.host, site.port)
        reader.loop_start()
        wait_until(lambda: bool(got), 30, "the bridged global model at the site")
        # live (if the bridge connected after we subscribed) or retained; the site broker
        # keeps it retained either way: a new subscription gets it with the retain flag
        reader.subscribe(topics.global_model, qos=1)
        wait_until(lambda: any(retained for _, retained in got), 10, "the retained copy")
        assert {payload for payload, _ in got} == {b"the root's model"}
    finally:
        reader.disconnect()
        reader.loop_stop()
        root.publish(topics.global_model, b"", retain=True).wait_for_publish(5)
        root.disconnect()
        root.loop_stop()
        site.stop()
