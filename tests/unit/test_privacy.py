"""DP-SGD (issue 17): per-example clipping, Poisson sampling, noise, the accountant, the
node's ledger across restarts and its budget, and the wire fields."""

import argparse
import itertools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import structlog

from fedmq.datasets import Dataset, digits
from fedmq.models import get_model
from fedmq.mqtt import BrokerAddress
from fedmq.node import last_update, ledger
from fedmq.node.app import Node
from fedmq.node.settings import NodeSettings
from fedmq.privacy import Spend, default_delta, epsilon, sampling_rate, steps_per_round
from fedmq.schemas import (
    DpSgd,
    GlobalModel,
    SchemaError,
    Topics,
    TrainingPlan,
    decode_global,
    decode_status,
    decode_update,
    encode,
    model_id_of,
)
from fedmq.tasks.private_training import clipped_sum as eager_clipped_sum
from fedmq.tasks.private_training import noised_mean, poisson_batches
from fedmq.tasks.registry import load_task
from fedmq.tasks.seeds import seed_key

from .node_doubles import RecordingOutbox

FEDERATION = "unit-dp"
TOPICS = Topics(FEDERATION)
TASK = load_task("digits-mlp")


# jitted once (the task is static): 30 eager calls of a vmapped gradient take a minute
clipped_sum = jax.jit(eager_clipped_sum, static_argnums=0)


def norm(tree) -> float:
    return math.sqrt(sum(float(jnp.sum(jnp.square(leaf))) for leaf in jax.tree.leaves(tree)))


def difference(a, b):
    return jax.tree.map(lambda x, y: x - y, a, b)


# ---------------------------------------------------------------- clipping, sampling, noise


@pytest.mark.parametrize("clip", [0.05, 1.0])
def test_one_example_moves_the_clipped_sum_by_at_most_clip(clip):
    """Add/remove adjacency, the one the accountant assumes: adding or removing any one
    example (here: a real one, and a wild one in a padding slot) moves the noiseless
    clipped sum by at most C. Replacing one is a removal and an addition: at most 2 C."""
    params = TASK.init(seed_key(0))
    train, _ = digits()
    x, y = jnp.asarray(train.x[:32]), jnp.asarray(train.y[:32])
    x = x.at[31].set(x[5] * 40.0)  # slot 31: a wild example, a padding slot at first
    y = y.at[31].set((y[5] + 3) % 10)
    mask = jnp.ones(32, jnp.float32).at[31].set(0.0)
    before, _ = clipped_sum(TASK, params, x, y, mask, clip)
    for index in range(32):
        toggled = mask.at[index].set(1.0 - mask[index])  # remove it, or add the wild one
        after, _ = clipped_sum(TASK, params, x, y, toggled, clip)
        assert norm(difference(after, before)) <= clip * (1 + 1e-5), index
    replaced, _ = clipped_sum(TASK, params, x.at[0].set(-x[9]), y.at[0].set(y[3]), mask, clip)
    assert norm(difference(replaced, before)) <= 2 * clip * (1 + 1e-5)


def test_clipping_bites_and_padding_adds_nothing():
    params = TASK.init(seed_key(0))
    train, _ = digits()
    x, y = jnp.asarray(train.x[:8]), jnp.asarray(train.y[:8])
    one, _ = clipped_sum(TASK, params, x[:1], y[:1], jnp.ones(1), 1e6)  # no clipping
    assert norm(one) > 0.01
    clipped, _ = clipped_sum(TASK, params, x[:1], y[:1], jnp.ones(1), 0.01)
    assert norm(clipped) == pytest.approx(0.01, rel=1e-4)  # scaled onto the bound
    padded, _ = clipped_sum(TASK, params, x, y, jnp.array([1.0] + [0.0] * 7), 1e6)
    assert norm(difference(padded, one)) < 1e-6


def test_poisson_batches_are_independent_draws_at_rate_q_never_cut():
    rng = np.random.default_rng(0)
    indices, mask = poisson_batches(rng, 200, 0.1, 2_000)
    assert indices.shape[1] % 16 == 0 and indices.shape == mask.shape
    sizes = mask.sum(axis=1)
    assert sizes.max() <= indices.shape[1]
    # each example's inclusion count is Binomial(2000, 0.1): mean 200, sd ~13.4
    counts = np.zeros(200)
    for row, weights in zip(indices, mask, strict=True):
        np.add.at(counts, row[weights == 1], 1)
    assert abs(counts.mean() - 200) < 3 and counts.min() > 140 and counts.max() < 260
    assert abs(sizes.mean() - 20) < 0.5 and sizes.std() == pytest.approx(math.sqrt(18), rel=0.1)
    for row, weights in zip(indices[:50], mask[:50], strict=True):  # sorted, no repeats
        chosen = row[weights == 1]
        assert list(chosen) == sorted(set(chosen.tolist()))


def test_the_noise_has_standard_deviation_z_times_c_over_the_expected_batch():
    summed = {"a": jnp.zeros((100, 100)), "b": jnp.zeros((1000,))}
    noisy = noised_mean(summed, jax.random.key(3), (jnp.float32(1.5), jnp.float32(0.4)), 8.0)
    values = np.concatenate([np.ravel(noisy["a"]), np.ravel(noisy["b"])])
    assert np.std(values) == pytest.approx(1.5 * 0.4 / 8.0, rel=0.03)
    assert abs(np.mean(values)) < 0.003
    assert not np.allclose(np.ravel(noisy["a"])[:1000], np.ravel(noisy["b"]))  # own keys


# ---------------------------------------------------------------- the accountant


def test_epsilon_of_the_gaussian_mechanism_matches_the_hand_computed_rdp_bound():
    """q = 1 (every example every step): T steps of the Gaussian mechanism with noise
    multiplier Z have RDP T a / (2 Z^2) at order a (Mironov 2017, Prop. 7), and
    dp_accounting turns RDP into (epsilon, delta) by
    eps = rdp - (log delta + log a) / (a - 1) + log((a - 1) / a)  (Balle et al. 2020),
    the minimum over the orders fedmq uses."""
    from fedmq.privacy import RDP_ORDERS

    steps, noise, delta = 40, 8.0, 1e-5
    by_hand = min(
        steps * a / (2 * noise**2) - (math.log(delta) + math.log(a)) / (a - 1)
        + math.log((a - 1) / a)
        for a in RDP_ORDERS
    )  # fmt: skip
    assert epsilon([Spend(1.0, noise, steps)], delta) == pytest.approx(by_hand, rel=1e-9)
    assert 3.0 < by_hand < 4.0  # the figure itself, for a reader checking it


def test_epsilon_is_dp_accountings_for_the_poisson_sampled_gaussian():
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    q, noise, delta = sampling_rate(150, 32), 1.1, default_delta(150)
    steps = steps_per_round(150, 32, 2) * 30  # 30 rounds of 2 epochs
    accountant = RdpAccountant([*range(2, 33), 40, 48, 56, 64, 80, 96, 128, 192, 256])
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise))
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    expected = accountant.get_epsilon(delta)
    # the ledger composes round by round; that is the same as all steps at once
    rounds = [Spend(q, noise, steps // 30)] * 30
    assert epsilon(rounds, delta) == pytest.approx(expected, rel=1e-12)
    assert (q, steps, round(delta, 8)) == (32 / 150, 300, round(150**-1.1, 8))
    assert 5 < expected < 30  # small data, many steps: a large epsilon, as it should be


def test_epsilon_grows_with_every_round():
    spent = [epsilon([Spend(0.2, 1.0, 10)] * rounds, 1e-5) for rounds in range(6)]
    assert spent[0] == 0.0 and all(b > a for a, b in itertools.pairwise(spent))


# ---------------------------------------------------------------- the wire


def plan(**changes) -> TrainingPlan:
    fields = {"learning_rate": 0.1, "batch_size": 16, "local_epochs": 1, "seed": 0}
    return TrainingPlan(**(fields | changes))


DP = DpSgd(noise=1.0, clip=1.0)


def global_model(round: int, *, dp: DpSgd | None = DP, seed: int = 0, **plan_changes):
    params = get_model("digits-mlp").init(seed)
    return GlobalModel(
        federation=FEDERATION, round=round, model="digits-mlp", model_id=model_id_of(params),
        params=params, plan=plan(dp_sgd=dp, **plan_changes),
    )  # fmt: skip


def test_dp_sgd_round_trips_and_an_unknown_key_in_it_is_refused():
    payload = encode(global_model(1))
    assert decode_global(payload).plan.dp_sgd == DpSgd(1.0, 1.0)
    wire = msgpack.unpackb(payload, raw=False)
    wire["plan"]["dp_sgd"]["sampling"] = "shuffle"  # a later requirement this node lacks
    with pytest.raises(SchemaError) as caught:
        decode_global(msgpack.packb(wire))
    assert caught.value.reason == "bad_field" and "sampling" in str(caught.value)
    for bad in ({"noise": 0.0, "clip": 1.0}, {"noise": 1.0}, {"noise": 1.0, "clip": -2.0}):
        wire["plan"]["dp_sgd"] = bad
        with pytest.raises(SchemaError):
            decode_global(msgpack.packb(wire))
    del wire["plan"]["dp_sgd"]
    assert decode_global(msgpack.packb(wire)).plan.dp_sgd is None
    # without DP the plan is byte for byte what it was
    assert "dp_sgd" not in msgpack.unpackb(encode(global_model(1, dp=None)), raw=False)["plan"]


# ---------------------------------------------------------------- the node and its ledger


def make_node(state: Path, **settings) -> tuple[Node, RecordingOutbox]:
    state.mkdir(parents=True, exist_ok=True)  # fedmq node makes it when it takes the lock
    config = NodeSettings(
        broker=BrokerAddress(), federation=FEDERATION, node_id="pi-1", state_dir=state, **settings
    )
    train, _ = digits()
    outbox = RecordingOutbox()
    data = Dataset(train.x[:96], train.y[:96])
    return Node(config, data, outbox, TASK), outbox  # type: ignore[arg-type]  # one compile


def updates(outbox: RecordingOutbox):
    return [decode_update(p) for p in outbox.on(TOPICS.update("pi-1"))]


def statuses(outbox: RecordingOutbox):
    return [decode_status(p) for p in outbox.on(TOPICS.status("pi-1"))]


def train(node: Node, model: GlobalModel) -> None:
    with structlog.testing.capture_logs():
        node.on_global(encode(model))


def test_a_node_trains_with_dp_reports_epsilon_and_keeps_its_ledger_across_restarts(tmp_path):
    node, outbox = make_node(tmp_path)
    train(node, global_model(1))
    [first] = updates(outbox)
    q, steps = sampling_rate(96, 16), steps_per_round(96, 16, 1)
    delta = default_delta(96)
    assert first.dp_delta == pytest.approx(delta)
    assert first.dp_epsilon == pytest.approx(epsilon([Spend(q, 1.0, steps)], delta))
    assert first.train_loss == 0.0  # the raw loss is not private: not sent
    assert statuses(outbox)[-1].dp_epsilon == first.dp_epsilon
    saved = json.loads((tmp_path / ledger.FILE).read_text())
    assert [(e["round"], e["steps"]) for e in saved["spent"]] == [(1, steps)]
    assert not (tmp_path / ledger.PENDING).exists()

    # restarted: the ledger is read back, the next round adds to it
    node, outbox = make_node(tmp_path)
    node.on_connected()
    assert statuses(outbox)[-1].dp_epsilon == pytest.approx(first.dp_epsilon)
    train(node, global_model(2))
    [second] = updates(outbox)
    assert second.dp_epsilon == pytest.approx(epsilon([Spend(q, 1.0, steps)] * 2, delta))
    # a new run (round 1 again, another model): the aggregator cannot reset the ledger
    node, outbox = make_node(tmp_path)
    train(node, global_model(1, seed=5))
    [third] = updates(outbox)
    assert third.dp_epsilon > second.dp_epsilon > first.dp_epsilon
    assert len(ledger.load(tmp_path / ledger.FILE).spent) == 3


def test_no_two_rounds_share_noise_and_the_plan_seed_does_not_set_it(tmp_path):
    """Two nodes with the same data and plan draw different samples and noise (each its
    own secret): the aggregator, which knows the plan's seed, cannot reproduce them."""
    a, out_a = make_node(tmp_path / "a")
    b, out_b = make_node(tmp_path / "b")
    train(a, global_model(1))
    train(b, global_model(1))
    [ua], [ub] = updates(out_a), updates(out_b)
    assert not np.array_equal(ua.delta["l0.w"], ub.delta["l0.w"])


@pytest.mark.parametrize("crash", ["before_record", "after_record"])
def test_a_crash_never_loses_a_published_round_from_the_ledger(tmp_path, crash):
    node, _ = make_node(tmp_path)
    train(node, global_model(1))
    book = ledger.load(tmp_path / ledger.FILE)
    model = global_model(2)
    entry = ledger.Entry(2, model.model_id, 1 / 6, 1.0, 6)
    ledger.save(tmp_path / ledger.PENDING, book.with_entry(entry))
    if crash == "after_record":  # on record = it may have been published
        last_update.save(
            tmp_path / "last_update.msgpack", last_update.LastUpdate(2, model.model_id, b"u")
        )
    make_node(tmp_path)  # start-up settles the pending ledger
    assert not (tmp_path / ledger.PENDING).exists()
    kept = ledger.load(tmp_path / ledger.FILE)
    assert len(kept.spent) == (2 if crash == "after_record" else 1)
    assert kept.secret == book.secret


def test_an_unreadable_ledger_stops_dp_training_instead_of_starting_again(tmp_path):
    (tmp_path / ledger.FILE).write_text('{"v": 1, "secret": "zz"}')
    node, outbox = make_node(tmp_path)
    train(node, global_model(1))
    assert updates(outbox) == []
    last = statuses(outbox)[-1]
    assert last.state == "error" and "privacy ledger" in last.detail
    assert (tmp_path / ledger.FILE).read_text() == '{"v": 1, "secret": "zz"}'


def test_a_node_stops_at_its_budget_and_says_so(tmp_path):
    q, steps, delta = sampling_rate(96, 16), steps_per_round(96, 16, 1), default_delta(96)
    per_round = [epsilon([Spend(q, 1.0, steps)] * k, delta) for k in range(1, 6)]
    limit = (per_round[2] + per_round[3]) / 2  # room for three rounds, not four
    node, outbox = make_node(tmp_path, max_epsilon=limit)
    for number in range(1, 6):
        train(node, global_model(number))
    sent = updates(outbox)
    assert [u.round for u in sent] == [1, 2, 3]
    assert [u.dp_epsilon for u in sent] == pytest.approx(per_round[:3])
    last = statuses(outbox)[-1]
    assert last.state == "idle" and last.round == 5
    assert last.detail.startswith("privacy budget spent:") and "--max-epsilon" in last.detail
    assert last.dp_epsilon == pytest.approx(per_round[2]) and last.dp_epsilon <= limit
    # restarted with the same budget, it still refuses: the ledger remembers
    node, outbox = make_node(tmp_path, max_epsilon=limit)
    train(node, global_model(6))
    assert updates(outbox) == [] and statuses(outbox)[-1].state == "idle"


def test_a_dp_node_refuses_to_send_held_out_metrics(tmp_path):
    node, outbox = make_node(tmp_path)
    train(node, global_model(1, eval_fraction=0.2))
    assert updates(outbox) == []
    last = statuses(outbox)[-1]
    assert last.state == "error" and "eval_fraction" in last.detail
    assert not (tmp_path / ledger.FILE).exists()


# ---------------------------------------------------------------- the aggregator


def test_the_aggregator_takes_only_private_updates_and_reports_the_most_spent():
    from fedmq.aggregator.rounds import RoundPolicy
    from fedmq.aggregator.server import Aggregator, RoundSettings, dense_update_bound
    from fedmq.schemas import NodeUpdate, decode_metrics

    model = get_model("digits-mlp")
    settings = RoundSettings(
        federation=FEDERATION, model_name="digits-mlp", model=model, rounds=2,
        policy=RoundPolicy(expected_nodes=3, min_nodes=3), plan=plan(dp_sgd=DP),
        max_update_bytes=dense_update_bound(model),
    )  # fmt: skip
    published: list[tuple[str, bytes]] = []
    agg = Aggregator(
        settings, model.init(0), publish=lambda topic, payload, _retain: published.append(
            (topic, payload)), test=None, clock=lambda: 100.0, wall_clock=lambda: 1.7e9,
    )  # fmt: skip
    agg.start()
    announced = decode_global(next(p for t, p in published if t == TOPICS.global_model))
    assert announced.plan.dp_sgd == DP

    def send(node: str, spent: float | None) -> None:
        update = NodeUpdate(
            federation=FEDERATION, node_id=node, round=agg.round, base_model_id=agg.model_id,
            num_examples=10, train_loss=0.0, train_seconds=0.1, compression="dense",
            delta={n: np.zeros(s, np.float32) for n, s in model.layout.items()},
            dp_epsilon=spent, dp_delta=None if spent is None else 1e-3,
        )  # fmt: skip
        agg.handle(TOPICS.update(node), encode(update))

    with structlog.testing.capture_logs() as logs:
        send("old-node", None)  # a node from before DP-SGD ignores the plan's dp_sgd
    [event] = [e for e in logs if e["event"] == "update.rejected"]
    assert event["reason"] == "not_private"
    for i, spent in enumerate([1.5, 4.25, 2.0]):
        send(f"pi-{i}", spent)
    [metrics] = [decode_metrics(p) for t, p in published if t == TOPICS.metrics]
    assert metrics.rejected == {"not_private": 1}
    assert metrics.extra["dp_epsilon_max"] == 4.25 and metrics.train_loss is None


# ---------------------------------------------------------------- DP-FedAvg at the aggregator


def fedavg_update(node: str, delta: dict, round: int = 1, base: str = "0" * 32):
    from fedmq.schemas import NodeUpdate

    return NodeUpdate(
        federation=FEDERATION, node_id=node, round=round, base_model_id=base, num_examples=10,
        train_loss=0.5, train_seconds=0.1, compression="dense", delta=delta,
    )  # fmt: skip


def test_dp_fedavg_bounds_each_node_and_noises_with_z_times_c():
    from fedmq.aggregator.dp_fedavg import DpFedAvg, private_mean

    layout = {"w": (30, 40), "b": (40,)}
    rng = np.random.default_rng(0)
    updates = {
        f"n{i}": fedavg_update(f"n{i}", {k: (rng.normal(0, 1, s) * 3).astype(np.float32)
                                         for k, s in layout.items()})
        for i in range(5)
    }  # fmt: skip
    dp = DpFedAvg(noise=0.0001, clip=0.5)  # noise ~0: the clipped mean shows
    mean, clipped, _ = private_mean(updates, layout, dp, 5, np.random.default_rng(1))
    without, *_ = private_mean(
        {k: u for k, u in updates.items() if k != "n3"}, layout, dp, 5, np.random.default_rng(1)
    )
    moved = math.sqrt(sum(float(np.sum(np.square((mean[k] - without[k]) * 5))) for k in layout))
    assert clipped == 5 and moved <= 0.5 * (1 + 1e-3)  # removing one node: at most C
    noisy, *_ = private_mean(
        updates, layout, DpFedAvg(noise=2.0, clip=0.5), 5, np.random.default_rng(2)
    )
    residual = np.concatenate([np.ravel((noisy[k] - mean[k]) * 5) for k in layout])
    assert np.std(residual) == pytest.approx(2.0 * 0.5, rel=0.05)


def test_dp_fedavg_clips_compressed_updates_as_decoded_whatever_error_feedback_carried():
    """The 100x pipeline under DP-FedAvg: the aggregator clips what it decodes (top-k,
    sign, flat), so a node's error-feedback residual, which it adds to later deltas and
    never sends, still moves the noised sum by at most C a round."""
    from fedmq.aggregator.dp_fedavg import DpFedAvg, private_mean
    from fedmq.compression.spec import parse_spec
    from fedmq.compression.transforms import error_feedback_init
    from fedmq.schemas.encodings import to_dense
    from fedmq.schemas.messages import delta_from_wire, delta_to_wire

    spec = "topk:0.035+sign+ef+flat"
    pipeline = parse_spec(spec)
    layout = {"w": (64, 32), "b": (32,)}
    rng = np.random.default_rng(0)
    states = {f"n{i}": error_feedback_init(layout) for i in range(4)}
    dp = DpFedAvg(noise=0.0001, clip=0.05)  # noise ~0: the clipped sum shows
    for _ in range(3):  # the residual grows what later rounds send
        updates = {}
        for node, state in states.items():
            delta = {k: (rng.normal(0, 1, s)).astype(np.float32) for k, s in layout.items()}
            sent, states[node] = pipeline.compress(delta, rng, state)
            wire = delta_to_wire(sent, spec)
            updates[node] = fedavg_update(node, delta_from_wire(wire, spec, layout))
        decoded = {
            node: fedavg_update(node, {k: to_dense(u.delta[k]) for k in layout})
            for node, u in updates.items()
        }
        mean, clipped, _ = private_mean(updates, layout, dp, 4, np.random.default_rng(1))
        same, *_ = private_mean(decoded, layout, dp, 4, np.random.default_rng(1))
        assert clipped == 4 and all(np.array_equal(mean[k], same[k]) for k in layout)
        without, *_ = private_mean(
            {k: u for k, u in updates.items() if k != "n2"}, layout, dp, 4,
            np.random.default_rng(1),
        )  # fmt: skip
        moved = math.sqrt(sum(float(np.sum(np.square((mean[k] - without[k]) * 4))) for k in layout))
        assert moved <= 0.05 * (1 + 1e-3)
    assert any(np.any(r != 0) for r in states["n2"].residual.values())  # kept, never sent


def test_dp_fedavg_rounds_report_the_runs_growing_epsilon():
    from fedmq.aggregator.dp_fedavg import DpFedAvg, fleet_delta
    from fedmq.aggregator.rounds import RoundPolicy
    from fedmq.aggregator.server import Aggregator, RoundSettings, dense_update_bound
    from fedmq.schemas import decode_metrics

    model = get_model("digits-mlp")
    dp = DpFedAvg(noise=1.5, clip=0.1)
    settings = RoundSettings(
        federation=FEDERATION, model_name="digits-mlp", model=model, rounds=3,
        policy=RoundPolicy(expected_nodes=3, min_nodes=3), plan=plan(),
        max_update_bytes=dense_update_bound(model), dp_fedavg=dp,
    )  # fmt: skip
    published: list[tuple[str, bytes]] = []
    agg = Aggregator(
        settings, model.init(0), publish=lambda topic, payload, _retain: published.append(
            (topic, payload)), test=None, clock=lambda: 100.0, wall_clock=lambda: 1.7e9,
    )  # fmt: skip
    agg.start()
    rng = np.random.default_rng(0)
    for _ in range(3):
        for i in range(3):
            delta = {n: rng.normal(0, 0.01, s).astype(np.float32) for n, s in model.layout.items()}
            update = fedavg_update(f"pi-{i}", delta, round=agg.round, base=agg.model_id)
            agg.handle(TOPICS.update(f"pi-{i}"), encode(update))
    rows = [decode_metrics(p) for t, p in published if t == TOPICS.metrics]
    spent = [m.extra["dp_fedavg_epsilon"] for m in rows]
    delta = fleet_delta(3)
    assert spent == pytest.approx([epsilon([Spend(1.0, 1.5, v)], delta) for v in (1, 2, 3)])
    assert all(b > a for a, b in itertools.pairwise(spent))
    assert all(m.extra["dp_fedavg_delta"] == delta for m in rows)
    assert all(m.train_loss is None for m in rows)  # the nodes' mean loss has no noise


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--mode", "async", "--buffer", "2"], "--mode async"),
        (["--aggregation", "median"], "--aggregation median"),
        (["--clip-norm", "2"], "--clip-norm"),
    ],
)
def test_dp_fedavg_refuses_what_it_cannot_argue(extra, named, tmp_path):
    from fedmq import cli, config
    from fedmq.aggregator.app import dp_fedavg_of

    settings = config.parse_args(
        cli.build_parser(), ["aggregator", "--dp-fedavg", "noise=1,clip=1", *extra], {}
    )
    with pytest.raises(ValueError, match=named):
        dp_fedavg_of(settings)


def test_adaptive_clipping_follows_the_median_of_synthetic_norms():
    """Andrew et al. 2021's geometric update, noised count and all: from 0.1 the clip
    climbs to the median update norm (2.0 here) and stays near it."""
    from fedmq.aggregator.dp_fedavg import ADAPTIVE_START, next_clip

    rng = np.random.default_rng(0)
    clip, seen = ADAPTIVE_START, []
    for _ in range(300):
        norms = rng.lognormal(math.log(2.0), 0.5, 100)
        clip = next_clip(clip, int(np.sum(norms <= clip)), 100, 100, rng)
        seen.append(clip)
    assert seen[0] > ADAPTIVE_START  # everything was clipped: the clip grows
    late = np.array(seen[150:])
    assert float(np.median(late)) == pytest.approx(2.0, rel=0.1)
    fractions = [np.mean(rng.lognormal(math.log(2.0), 0.5, 10_000) <= c) for c in late[::10]]
    assert all(0.35 < f < 0.65 for f in fractions)


def test_adaptive_clipping_spends_what_one_gaussian_mechanism_of_z_does():
    """The sum's noise is z_delta C with z_delta = (Z^-2 - (2 sigma_b)^-2)^-1/2, and the
    sum (z_delta, sensitivity 1) with the centred count (sigma_b, sensitivity 1/2)
    composed cost exactly the epsilon the run reports (Gaussian at Z)."""
    import dp_accounting
    from dp_accounting.rdp import RdpAccountant

    from fedmq.aggregator.dp_fedavg import (
        DpFedAvg,
        count_noise,
        delta_noise,
        private_mean,
        run_epsilon,
    )

    dp = DpFedAvg(noise=2.0, clip=0.1, adaptive=True)
    sigma_b = count_noise(100)
    z_delta = delta_noise(dp, 100)
    assert sigma_b == 5.0 and z_delta == pytest.approx((2.0**-2 - 10.0**-2) ** -0.5)
    assert delta_noise(DpFedAvg(noise=2.0, clip=0.1), 100) == 2.0  # fixed clipping: Z

    accountant = RdpAccountant(list(range(2, 257)))
    for _ in range(30):
        accountant.compose(dp_accounting.GaussianDpEvent(z_delta))
        accountant.compose(dp_accounting.GaussianDpEvent(2 * sigma_b))
    assert run_epsilon(dp, 30, 1e-3) == pytest.approx(accountant.get_epsilon(1e-3), rel=1e-3)

    layout = {"w": (60, 50)}
    zero = {"n0": fedavg_update("n0", {"w": np.zeros((60, 50), np.float32)})}
    noisy = private_mean(zero, layout, dp, 100, np.random.default_rng(3), clip=0.3)
    assert np.std(noisy.mean["w"] * 100) == pytest.approx(z_delta * 0.3, rel=0.05)
    with pytest.raises(ValueError, match=r"adaptive clipping needs noise below 1\.0"):
        delta_noise(DpFedAvg(noise=1.0, clip=0.1, adaptive=True), 10)


def test_dp_fedavg_spec_takes_clip_adaptive():
    from fedmq.aggregator.dp_fedavg import ADAPTIVE_START, parse_dp_fedavg, spec_of
    from fedmq.settings import dp_fedavg_spec

    assert dp_fedavg_spec("clip=adaptive, noise=2") == "noise=2.0,clip=adaptive"
    dp = parse_dp_fedavg("noise=2.0,clip=adaptive")
    assert dp.adaptive and dp.clip == ADAPTIVE_START and spec_of(dp) == "noise=2.0,clip=adaptive"
    assert spec_of(parse_dp_fedavg("noise=1.5,clip=0.5")) == "noise=1.5,clip=0.5"
    with pytest.raises(argparse.ArgumentTypeError, match="noise=Z,clip=adaptive"):
        dp_fedavg_spec("noise=2,clip=sometimes")


def test_a_resumed_adaptive_run_keeps_its_clip(tmp_path: Path):
    from fedmq.aggregator.app import resume_or_start
    from fedmq.aggregator.checkpoint import StateDir
    from fedmq.aggregator.dp_fedavg import ADAPTIVE_START, DpFedAvg
    from fedmq.aggregator.rounds import RoundPolicy
    from fedmq.aggregator.server import Aggregator, RoundSettings, dense_update_bound
    from fedmq.schemas import decode_metrics

    model = get_model("digits-mlp")
    settings = RoundSettings(
        federation=FEDERATION, model_name="digits-mlp", model=model, rounds=4,
        policy=RoundPolicy(expected_nodes=30, min_nodes=30), plan=plan(),
        max_update_bytes=dense_update_bound(model),
        dp_fedavg=DpFedAvg(noise=1.0, clip=ADAPTIVE_START, adaptive=True),
    )  # fmt: skip
    published: list[tuple[str, bytes]] = []

    def aggregator() -> Aggregator:
        return Aggregator(
            settings, model.init(0), publish=lambda t, p, _r: published.append((t, p)),
            test=None, clock=lambda: 100.0, wall_clock=lambda: 1.7e9, store=StateDir(tmp_path),
        )  # fmt: skip

    def one_round(agg: Aggregator, rng: np.random.Generator) -> None:
        for i in range(30):
            delta = {n: rng.normal(0, 0.05, s).astype(np.float32) for n, s in model.layout.items()}
            update = fedavg_update(f"pi-{i}", delta, round=agg.round, base=agg.model_id)
            agg.handle(TOPICS.update(f"pi-{i}"), encode(update))

    agg, rng = aggregator(), np.random.default_rng(0)
    agg.start()
    one_round(agg, rng)
    one_round(agg, rng)
    moved = agg._dp_clip
    assert moved is not None and moved > ADAPTIVE_START  # norms ~2.3 > 0.1: it grew
    agg.store.close()  # type: ignore[union-attr]
    again = aggregator()
    assert again._dp_clip == ADAPTIVE_START and resume_or_start(again, again.store)
    assert again._dp_clip == moved
    one_round(again, rng)
    rows = [decode_metrics(p) for t, p in published if t == TOPICS.metrics]
    used = [m.extra["dp_fedavg_clip"] for m in rows]
    assert used[0] == ADAPTIVE_START and used[1] > used[0] and used[2] == moved
    again.store.close()  # type: ignore[union-attr]
