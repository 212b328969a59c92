"""Site aggregators (aggregator.site): a root's FedAvg of site updates against flat FedAvg
of every node's update, through the wire, and the rules that cannot be split over sites."""

import numpy as np
import pytest

from fedmq.aggregator.combine import combine
from fedmq.aggregator.robust import DEFAULT, FEDAVG, parse_rule
from fedmq.aggregator.site import TOLERANCE, SiteRound, site_rng, site_update, split_problem
from fedmq.compression import parse_spec
from fedmq.schemas import NodeUpdate, decode_update, encode

LAYOUT = {"l0.w": (64, 32), "l0.b": (32,), "l1.w": (32, 10), "l1.b": (10,)}
FED = "hier"
M3 = "3" * 32


def node_update(rng: np.random.Generator, node: str, *, scale: float = 0.01) -> NodeUpdate:
    """A node's update as the aggregator holds it: encoded and decoded."""
    delta = {n: (scale * rng.standard_normal(s)).astype(np.float32) for n, s in LAYOUT.items()}
    update = NodeUpdate(
        federation=FED, node_id=node, round=3, base_model_id=M3,
        num_examples=int(rng.integers(1, 5000)), train_loss=float(rng.random()),
        train_seconds=float(rng.random()), delta=delta,
    )  # fmt: skip
    return decode_update(encode(update), layout=LAYOUT)


def sites_of(rng: np.random.Generator, sizes: list[int]) -> list[dict[str, NodeUpdate]]:
    sites = []
    for s, size in enumerate(sizes):
        nodes = [f"s{s}-n{i}" for i in range(size)]
        sites.append({node: node_update(rng, node) for node in nodes})
    return sites


def through_root(
    sites: list[dict[str, NodeUpdate]], spec: str = "dense", rule_text: str = "fedavg"
) -> dict[str, np.ndarray]:
    """Each site's update sent (encoded, decoded as the root would), then the root's FedAvg."""
    at_root = {}
    for s, held in enumerate(sites):
        at = SiteRound(FED, f"site-{s}", 3, M3, parse_spec(spec), seed=0)
        update, _ = site_update(
            at, held, LAYOUT, parse_rule(rule_text), site_rng(at), None, sent_at=1.0
        )
        at_root[at.site] = decode_update(encode(update), layout=LAYOUT)
    return combine(FEDAVG, at_root, LAYOUT).delta


def bound(nodes: dict[str, NodeUpdate]) -> dict[str, np.ndarray]:
    """TOLERANCE x sum_i n_i |d_i| / N, per coordinate."""
    total = sum(u.num_examples for u in nodes.values())
    return {
        name: TOLERANCE
        * sum(
            u.num_examples * np.abs(np.asarray(u.delta[name], np.float64)) for u in nodes.values()
        )
        / total
        for name in LAYOUT
    }


@pytest.mark.parametrize("sizes", [[3, 2], [1, 1], [5, 1, 4]])
def test_root_of_sites_equals_flat_fedavg_within_the_tolerance(sizes: list[int]) -> None:
    rng = np.random.default_rng(sum(sizes))
    sites = sites_of(rng, sizes)
    every = {node: update for held in sites for node, update in held.items()}
    flat = combine(FEDAVG, every, LAYOUT).delta
    root = through_root(sites)
    limit = bound(every)
    worst = 0.0
    for name in LAYOUT:
        error = np.abs(root[name] - flat[name])
        assert (error <= limit[name]).all(), name
        worst = max(worst, float((error / limit[name] * TOLERANCE).max()))
    if max(sizes) > 1:  # float32 on the wire rounds a mean of several: not vacuous
        assert worst > 0


def test_clip_norm_at_the_sites_equals_flat_clip_norm() -> None:
    rng = np.random.default_rng(7)
    sites = sites_of(rng, [3, 3])
    every = {node: update for held in sites for node, update in held.items()}
    rule = "fedavg+clip-norm:0.3"  # the deltas' norms are ~0.46: every one is clipped
    flat = combine(parse_rule(rule), every, LAYOUT).delta
    root = through_root(sites, rule_text=rule)
    limit = bound(every)
    for name in LAYOUT:
        assert (np.abs(root[name] - flat[name]) <= limit[name]).all()


def test_a_site_update_speaks_for_its_nodes() -> None:
    rng = np.random.default_rng(3)
    [held] = sites_of(rng, [4])
    at = SiteRound(FED, "north", 3, M3, parse_spec("dense"), seed=0)
    update, state = site_update(at, held, LAYOUT, FEDAVG, site_rng(at), None, sent_at=2.0)
    assert state is None
    assert (update.node_id, update.round, update.base_model_id) == ("north", 3, M3)
    assert update.num_examples == sum(u.num_examples for u in held.values())
    weighted = sum(u.train_loss * u.num_examples for u in held.values()) / update.num_examples
    assert update.train_loss == pytest.approx(weighted)
    assert all(np.asarray(t).dtype == np.float32 for t in update.delta.values())


def test_upstream_compression_with_error_feedback_keeps_the_residual() -> None:
    rng = np.random.default_rng(4)
    [held] = sites_of(rng, [3])
    at = SiteRound(FED, "north", 3, M3, parse_spec("topk:0.1+ef"), seed=0)
    first, state = site_update(at, held, LAYOUT, FEDAVG, site_rng(at), None, sent_at=0.0)
    again, same = site_update(at, held, LAYOUT, FEDAVG, site_rng(at), None, sent_at=0.0)
    assert encode(first) == encode(again)  # a restarted site makes the same update
    assert state is not None and same is not None
    assert first.compression == "topk:0.1+ef"
    mean = combine(FEDAVG, held, LAYOUT).delta
    for name in LAYOUT:  # what was sent + what is kept == the mean delta
        sent = decode_update(encode(first), layout=LAYOUT).delta[name]
        dense = np.zeros(LAYOUT[name], np.float32).reshape(-1)
        dense[sent.indices] = sent.values  # type: ignore[union-attr]
        np.testing.assert_allclose(
            dense.reshape(LAYOUT[name]) + state.residual[name], mean[name], atol=1e-7
        )


@pytest.mark.parametrize(
    ("text", "site_ok", "root_ok"),
    [
        ("fedavg", True, True),
        ("fedavg+clip-norm:1", True, False),
        ("median", False, False),
        ("trimmed-mean:0.2", False, False),
        ("fedavg+clip-median:2", False, False),
        ("fedavg+cap-examples:1.5", False, False),
        (str(DEFAULT), False, False),
    ],
)
def test_rules_that_cannot_be_split_over_sites_are_refused(
    text: str, site_ok: bool, root_ok: bool
) -> None:
    rule = parse_rule(text)
    assert (split_problem(rule, where="--site") is None) == site_ok
    problem = split_problem(rule, where="--sites")
    assert (problem is None) == root_ok
    if problem is not None:
        assert problem.startswith("--sites: aggregation") and "\n" not in problem


def test_a_site_too_large_for_one_update_is_refused() -> None:
    rng = np.random.default_rng(5)
    [held] = sites_of(rng, [2])
    held = {k: NodeUpdate(**{**vars(u), "num_examples": 2**24}) for k, u in held.items()}
    at = SiteRound(FED, "big", 3, M3, parse_spec("dense"), seed=0)
    with pytest.raises(ValueError, match="split the site"):
        site_update(at, held, LAYOUT, FEDAVG, site_rng(at), None, sent_at=0.0)


# ---------------------------------------------------------------- the site's round life

from pathlib import Path  # noqa: E402

from fedmq.aggregator.checkpoint import StateDir  # noqa: E402
from fedmq.aggregator.rounds import RoundPolicy  # noqa: E402
from fedmq.aggregator.site_server import SiteAggregator, SiteSettings  # noqa: E402
from fedmq.schemas import GlobalModel, Topics, TrainingPlan, decode_metrics, model_id_of  # noqa: E402

MODEL_LAYOUT = {"w": (8, 4), "b": (4,)}


def root_model(number: int, *, final: bool = False) -> tuple[GlobalModel, bytes]:
    params = {n: np.full(s, number, np.float32) for n, s in MODEL_LAYOUT.items()}
    model = GlobalModel(
        federation=FED, round=number, model="digits-mlp", model_id=model_id_of(params),
        params=params, plan=TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0),
        final=final,
    )  # fmt: skip
    return model, encode(model)


def node_payload(model: GlobalModel, node: str, examples: int, value: float) -> bytes:
    delta = {n: np.full(s, value, np.float32) for n, s in MODEL_LAYOUT.items()}
    return encode(
        NodeUpdate(
            federation=FED, node_id=node, round=model.round, base_model_id=model.model_id,
            num_examples=examples, train_loss=0.5, train_seconds=1.0, delta=delta,
        )
    )  # fmt: skip


class Recorder:
    def __init__(self) -> None:
        self.upstream: list[bytes] = []
        self.local: list[tuple[str, bytes]] = []

    def send(self, payload: bytes) -> None:
        self.upstream.append(payload)

    def publish(self, topic: str, payload: bytes, _retain: bool) -> None:
        self.local.append((topic, payload))


STORES: list[StateDir] = []


@pytest.fixture(autouse=True)
def _close_stores() -> object:
    yield
    while STORES:
        STORES.pop().close()


def make_site(
    tmp_path: Path, recorder: Recorder, nodes: int = 2, upstream: str = "dense"
) -> SiteAggregator:
    settings = SiteSettings(
        federation=FED,
        site="north",
        policy=RoundPolicy(expected_nodes=nodes, min_nodes=nodes),
        aggregation=FEDAVG,
        upstream=parse_spec(upstream),
    )
    store = StateDir(tmp_path)
    STORES.append(store)
    site = SiteAggregator(
        settings, publish=recorder.publish, send_upstream=recorder.send, store=store
    )
    checkpoint = store.load()
    if checkpoint is not None:
        store.open_journal(checkpoint.version)
        site.resume(checkpoint, store.journal_records(checkpoint.version))
    return site


def test_a_site_sends_one_update_per_root_round_and_resends_it_after_a_restart(
    tmp_path: Path,
) -> None:
    topics, recorder = Topics(FED), Recorder()
    site = make_site(tmp_path, recorder)
    model, payload = root_model(1)
    site.on_global(payload)
    site.on_global(payload)  # a retained copy: nothing new
    site.handle(topics.update("a"), node_payload(model, "a", 30, 1.0))
    assert not recorder.upstream
    site.handle(topics.update("b"), node_payload(model, "b", 10, 5.0))
    [sent] = recorder.upstream
    update = decode_update(sent, layout=MODEL_LAYOUT)
    assert (update.node_id, update.round, update.base_model_id) == ("north", 1, model.model_id)
    assert update.num_examples == 40
    np.testing.assert_array_equal(update.delta["w"], np.full((8, 4), 2.0, np.float32))
    [(topic, wire)] = recorder.local
    metrics = decode_metrics(wire)
    assert topic == topics.metrics and metrics.participants == ["a", "b"]
    assert metrics.extra["site"] == "north" and metrics.extra["upstream_bytes"] == len(sent)

    site.handle(topics.update("a"), node_payload(model, "a", 30, 1.0))  # resent: not held
    site.handle(topics.update("c"), node_payload(model, "c", 30, 1.0))  # late: not held
    assert len(recorder.upstream) == 1
    assert site._intake is not None
    assert dict(site._intake.rejected) == {"duplicate": 1, "wrong_round": 1}

    again = Recorder()  # SIGKILL, restart: the same update goes again
    store_site = make_site(tmp_path, again)
    store_site.republish()
    assert again.upstream == [sent]
    assert store_site.round == 1 and store_site.sent

    next_model, next_payload = root_model(2)
    store_site.on_global(next_payload)
    store_site.handle(topics.update("a"), node_payload(model, "a", 30, 1.0))  # a resend
    assert store_site.reported == 0
    store_site.handle(topics.update("a"), node_payload(next_model, "a", 30, 1.0))
    assert store_site.reported == 1

    _final, final_payload = root_model(3, final=True)
    store_site.on_global(final_payload)
    assert store_site.done


def test_a_restarted_site_replays_its_journal(tmp_path: Path) -> None:
    topics, recorder = Topics(FED), Recorder()
    site = make_site(tmp_path, recorder)
    model, payload = root_model(1)
    site.on_global(payload)
    site.handle(topics.update("a"), node_payload(model, "a", 30, 1.0))
    site.store.sync()  # type: ignore[union-attr]  # what the edge does before the PUBACK
    again = Recorder()
    restarted = make_site(tmp_path, again)
    assert restarted.reported == 1 and not restarted.sent
    restarted.handle(topics.update("b"), node_payload(model, "b", 10, 5.0))
    [sent] = again.upstream
    assert decode_update(sent, layout=MODEL_LAYOUT).num_examples == 40


def test_a_root_model_before_the_site_closed_opens_the_next_round(tmp_path: Path) -> None:
    topics, recorder = Topics(FED), Recorder()
    site = make_site(tmp_path, recorder)
    model, payload = root_model(1)
    site.on_global(payload)
    site.handle(topics.update("a"), node_payload(model, "a", 30, 1.0))
    site.on_global(root_model(2)[1])  # the root closed round 1 without this site
    assert site.round == 2 and site.reported == 0 and not recorder.upstream


def test_the_upstream_residual_survives_a_restart_and_feeds_the_next_round(
    tmp_path: Path,
) -> None:
    topics = Topics(FED)

    def site_with(recorder: Recorder) -> SiteAggregator:
        return make_site(tmp_path, recorder, upstream="topk:0.25+ef")

    first = Recorder()
    site = site_with(first)
    model, payload = root_model(1)
    site.on_global(payload)
    site.handle(topics.update("a"), node_payload(model, "a", 30, 1.0))
    site.handle(topics.update("b"), node_payload(model, "b", 10, 5.0))
    [sent_1] = first.upstream
    kept = StateDir(tmp_path).load()
    assert kept is not None and kept.upstream == sent_1 and kept.residual is not None
    residual_1 = kept.residual

    second = Recorder()  # restarted
    site = site_with(second)
    model, payload = root_model(2)
    site.on_global(payload)
    site.handle(topics.update("a"), node_payload(model, "a", 30, 2.0))
    site.handle(topics.update("b"), node_payload(model, "b", 10, 2.0))
    [sent_2] = second.upstream
    update = decode_update(sent_2, layout=MODEL_LAYOUT)
    assert update.compression == "topk:0.25+ef"
    kept = StateDir(tmp_path).load()
    assert kept is not None and kept.residual is not None
    for name in MODEL_LAYOUT:  # sent + new residual == this round's mean + old residual
        tensor = update.delta[name]
        dense = np.zeros(MODEL_LAYOUT[name], np.float32).reshape(-1)
        dense[tensor.indices] = tensor.values  # type: ignore[union-attr]
        np.testing.assert_allclose(
            dense.reshape(MODEL_LAYOUT[name]) + kept.residual[name],
            2.0 + residual_1[name],
            atol=1e-6,
        )
