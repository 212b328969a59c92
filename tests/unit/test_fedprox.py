"""FedProx (issue 14): the proximal term against a hand-computed gradient and hand-run SGD,
mu 0 bit for bit as before, personal leaves left free, plan.proximal_mu on the wire,
--proximal-mu (options, file, fingerprint, the demo's aggregator, report.json)."""

import argparse
import dataclasses
import math

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import optax
import pytest

from fedmq.aggregator.settings import AggregatorSettings, fingerprint_mismatch, run_fingerprint
from fedmq.report import build_report
from fedmq.schemas import SchemaError, TrainingPlan, decode_global, encode
from fedmq.schemas.messages import PLAN
from fedmq.settings import proximal_mu
from fedmq.tasks import Task
from fedmq.tasks.builtin import mlp_params
from fedmq.tasks.seeds import epoch_order
from fedmq.tasks.training import (
    anchored_leaves,
    make_epoch,
    proximal_objective,
    proximal_term,
    train_local,
)
from tests.unit.test_aggregator_server import Harness
from tests.unit.test_training import MODEL, TASK, sgd_reference

BASE_PLAN = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0)

# ------------------------------------------------------------ a least-squares task by hand


def squared_errors(params, batch):
    """One value per example: half the squared error of a linear map (3 -> 2)."""
    x, y = batch
    return 0.5 * jnp.sum((x @ params["w"] + params["b"] - y) ** 2, axis=1)


def linear_task(**changes) -> Task:
    fields = {
        "name": "lstsq",
        "init": lambda key: {"b": jnp.zeros(2), "w": jnp.zeros((3, 2))},
        "loss": squared_errors,
        "optimizer": optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
    }
    return Task(**(fields | changes))


def f32(values) -> np.ndarray:
    return np.asarray(values, np.float32)


RNG = np.random.default_rng(14)
X = f32(RNG.standard_normal((5, 3)))
Y = f32(RNG.standard_normal((5, 2)))
W = {"b": f32(RNG.standard_normal(2)), "w": f32(RNG.standard_normal((3, 2)))}
ANCHOR = {"b": f32(RNG.standard_normal(2)), "w": f32(RNG.standard_normal((3, 2)))}


def task_gradient(params, x, y, mask):
    """d/dparams of the mean over the real rows (mask 1) of 0.5 * |x w + b - y|^2."""
    residual = (x @ params["w"] + params["b"] - y) * mask[:, None]
    real = mask.sum()
    return {"b": residual.sum(axis=0) / real, "w": x.T @ residual / real}


@pytest.mark.parametrize("mask", [[1, 1, 1, 1, 1], [1, 1, 0, 1, 0]])
@pytest.mark.parametrize("mu", [0.0, 0.01, 1.0])
def test_the_objectives_gradient_is_the_tasks_plus_mu_times_the_distance(mask, mu):
    """Once per batch: the term's gradient is mu * (w - w_global) whatever the number of
    real examples in the batch (the padding rows of mask 0 weigh nothing)."""
    mask = f32(mask)
    batch = (jnp.asarray(X), jnp.asarray(Y), jnp.asarray(mask))

    def objective(params):
        return proximal_objective(linear_task(), params, batch, ANCHOR, mu)

    (total, loss), grads = jax.value_and_grad(objective, has_aux=True)(W)

    by_hand = task_gradient(W, X, Y, mask)
    for name in W:
        want = by_hand[name] + mu * (W[name] - ANCHOR[name])
        np.testing.assert_allclose(grads[name], want, rtol=1e-5, atol=1e-6)
    errors = 0.5 * ((X @ W["w"] + W["b"] - Y) ** 2).sum(axis=1)
    distance = sum(float(((W[n] - ANCHOR[n]) ** 2).sum()) for n in W)
    assert float(loss) == pytest.approx((errors * mask).sum() / mask.sum(), rel=1e-5)
    assert float(total) == pytest.approx(float(loss) + mu / 2 * distance, rel=1e-5)


def test_personal_leaves_are_not_held_to_the_global_model():
    personal = linear_task(personal=lambda path: path[0] == "b")
    assert anchored_leaves(personal, W) == (False, True)  # flattening order: b, w
    assert anchored_leaves(linear_task(), W) == (True, True)
    batch = (jnp.asarray(X), jnp.asarray(Y), jnp.ones(5))
    grads = jax.grad(lambda p: proximal_objective(personal, p, batch, ANCHOR, 0.5)[0])(W)
    by_hand = task_gradient(W, X, Y, np.ones(5, np.float32))
    np.testing.assert_allclose(grads["b"], by_hand["b"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        grads["w"], by_hand["w"] + 0.5 * (W["w"] - ANCHOR["w"]), rtol=1e-5, atol=1e-6
    )
    only_w = float(((W["w"] - ANCHOR["w"]) ** 2).sum())
    term = proximal_term(W, ANCHOR, 0.5, (False, True))
    assert float(term) == pytest.approx(0.25 * only_w, rel=1e-6)


def test_local_training_with_mu_is_sgd_on_the_objective_by_hand():
    """Five examples in batches of 3: two SGD steps, the second padded. Step 1 starts at
    the global model (the term's gradient is 0), step 2 is pulled back towards it."""
    mu, rate = 0.5, 0.1
    plan = dataclasses.replace(BASE_PLAN, batch_size=3, learning_rate=rate, proximal_mu=mu)
    trained, loss = train_local(linear_task(), W, X, Y, plan, node_id="n1", round_number=2)

    order, mask = epoch_order(5, 3, seed=0, node_id="n1", round_number=2, epoch=0)
    order, mask = order.reshape(2, 3), f32(mask).reshape(2, 3)
    params, weighted = {n: v.copy() for n, v in W.items()}, 0.0
    for rows, real in zip(order, mask, strict=True):
        x, y = X[rows], Y[rows]
        errors = 0.5 * ((x @ params["w"] + params["b"] - y) ** 2).sum(axis=1)
        weighted += float((errors * real).sum())
        grads = task_gradient(params, x, y, real)
        params = {n: params[n] - rate * (grads[n] + mu * (params[n] - W[n])) for n in W}
    for name in W:
        np.testing.assert_allclose(trained[name], params[name], rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(weighted / 5, rel=1e-5)  # the task's loss, no term
    plain = dataclasses.replace(plan, proximal_mu=0.0)
    untethered, _ = train_local(linear_task(), W, X, Y, plan=plain, node_id="n1", round_number=2)
    assert not np.allclose(untethered["w"], trained["w"], rtol=1e-6, atol=0)


def test_mu_0_trains_bit_for_bit_as_before():
    """With mu 0 the node runs the epoch of every run before FedProx: the built-in MLP gives
    node/training.py's parameters and loss bit for bit (tests/unit/test_training.py)."""
    rng = np.random.default_rng(3)
    x = f32(rng.standard_normal((37, 64)))
    y = rng.integers(0, 10, 37).astype(np.int32)
    initial = MODEL.init(5)
    plan = TrainingPlan(0.1, 8, 2, 5, proximal_mu=0.0)
    trained, loss = train_local(
        TASK, mlp_params(MODEL, initial), x, y, plan, node_id="n", round_number=4
    )
    want, want_loss = sgd_reference(MODEL, initial, x, y, plan, node_id="n", round_number=4)
    for index, layer in enumerate(trained.layers):
        for part in ("w", "b"):
            got = np.asarray(getattr(layer, part))
            assert got.tobytes() == np.asarray(want[f"l{index}.{part}"]).tobytes()
    assert loss == want_loss


def test_one_compile_serves_every_mu():
    task = linear_task(name="lstsq-compiles")
    for mu in (0.1, 0.2, 3.0):
        plan = dataclasses.replace(BASE_PLAN, batch_size=2, proximal_mu=mu)
        train_local(task, W, X, Y, plan, node_id="n", round_number=1)
    assert make_epoch(task, 2, True)._cache_size() == 1
    train_local(task, W, X, Y, dataclasses.replace(BASE_PLAN, batch_size=2), node_id="n",
                round_number=1)  # fmt: skip
    assert make_epoch(task, 2, False)._cache_size() == 1


# --------------------------------------------------------------------------- the wire


def test_the_plan_writes_proximal_mu_only_when_not_0():
    assert PLAN.to_wire(dataclasses.replace(BASE_PLAN, proximal_mu=0.0)) == PLAN.to_wire(BASE_PLAN)
    assert "proximal_mu" not in PLAN.to_wire(BASE_PLAN)
    wire = PLAN.to_wire(dataclasses.replace(BASE_PLAN, eval_fraction=0.2, proximal_mu=0.01))
    assert list(wire)[-2:] == ["eval_fraction", "proximal_mu"] and wire["proximal_mu"] == 0.01
    assert TrainingPlan(**PLAN.decode(wire)).proximal_mu == 0.01
    assert TrainingPlan(**PLAN.decode(PLAN.to_wire(BASE_PLAN))).proximal_mu == 0.0
    as_int = PLAN.to_wire(BASE_PLAN) | {"proximal_mu": 1}  # msgpack int: another encoder's
    assert TrainingPlan(**PLAN.decode(as_int)).proximal_mu == 1.0


def test_a_decoder_reads_only_the_plan_keys_it_knows():
    """How a node from before FedProx reads a plan with proximal_mu: a key it does not
    know is ignored (PROTOCOL section 4), the rest decodes as it did."""
    harness = Harness(plan=dataclasses.replace(BASE_PLAN, proximal_mu=0.05))
    harness.agg.start()
    [payload] = [p for topic, p, _ in harness.published if topic.endswith("/global")]
    wire = msgpack.unpackb(payload, raw=False)
    assert wire["plan"]["proximal_mu"] == 0.05
    wire["plan"]["a_later_knob"] = 3  # as proximal_mu was to an older decoder
    assert decode_global(msgpack.packb(wire)).plan == dataclasses.replace(
        BASE_PLAN, proximal_mu=0.05
    )
    del wire["plan"]["proximal_mu"]  # what an aggregator before FedProx sends
    assert decode_global(msgpack.packb(wire)).plan == BASE_PLAN


@pytest.mark.parametrize("bad", [None, -0.01, -math.inf, math.inf, math.nan, "0.1", True])
def test_the_plan_rejects_a_bad_proximal_mu(bad):
    wire = PLAN.to_wire(BASE_PLAN) | {"proximal_mu": bad}
    with pytest.raises(SchemaError) as error:
        PLAN.decode(wire)
    assert error.value.reason in ("bad_field", "non_finite")
    assert "proximal_mu" in str(error.value)


def test_the_global_model_announces_the_plans_proximal_mu():
    harness = Harness(plan=dataclasses.replace(BASE_PLAN, proximal_mu=0.1))
    harness.agg.start()
    assert harness.globals()[0].plan.proximal_mu == 0.1
    assert harness.agg.settings.fingerprint["proximal_mu"] == 0.1
    plain = Harness(plan=BASE_PLAN)
    plain.agg.start()
    assert "proximal_mu" not in plain.agg.settings.fingerprint
    [payload] = [p for topic, p, _ in plain.published if topic.endswith("/global")]
    assert "proximal_mu" not in msgpack.unpackb(payload, raw=False)["plan"]
    assert encode(plain.globals()[0]) == payload


# --------------------------------------------------------------------------- settings


def test_proximal_mu_option():
    assert proximal_mu("0") == 0.0 and proximal_mu("0.01") == 0.01 and proximal_mu("1e-3") == 0.001
    assert proximal_mu("5") == 5.0
    for bad in ("-0.1", "-0", "nan", "inf", "-inf", "x", "", "0.1,0.2"):
        if bad == "-0":  # -0.0 >= 0: taken, as 0
            assert proximal_mu(bad) == 0.0
            continue
        with pytest.raises(argparse.ArgumentTypeError, match=r"is not a number >= 0"):
            proximal_mu(bad)


@pytest.mark.parametrize("command", ["aggregator", "demo"])
@pytest.mark.parametrize("bad", ["-1", "nan", "inf", "lots"])
def test_a_malformed_proximal_mu_is_one_line_and_exit_2(command, bad, capsys):
    from fedmq.cli import build_parser

    with pytest.raises(SystemExit) as stopped:
        build_parser().parse_args([command, f"--proximal-mu={bad}"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedmq {command}: error: argument --proximal-mu: '{bad}' is not a number >= 0 "
        f"(see fedmq {command} --help)\n"
    )


def test_proximal_mu_from_a_file_and_its_refusal(tmp_path):
    from fedmq import cli, config

    good = tmp_path / "good.toml"
    good.write_text("[aggregator]\nproximal_mu = 0.05\n")
    assert config.read_file(cli.build_parser(), good)["aggregator"]["proximal_mu"] == 0.05
    bad = tmp_path / "bad.toml"
    bad.write_text("[aggregator]\nproximal_mu = -1\n")
    with pytest.raises(ValueError, match=r"proximal_mu.*is not a number >= 0"):
        config.read_file(cli.build_parser(), bad)


def test_proximal_mu_is_in_the_fingerprint_only_when_not_0():
    values = dataclasses.asdict(AggregatorSettings(test_data=None))
    values["task"] = "digits-mlp"
    old = run_fingerprint(values)
    assert "proximal_mu" not in old  # as a run kept before FedProx
    new = run_fingerprint(values | {"proximal_mu": 0.01})
    assert new["proximal_mu"] == 0.01
    assert fingerprint_mismatch(old, old) is None and fingerprint_mismatch(new, new) is None
    assert fingerprint_mismatch(old, new) == ("--proximal-mu", 0.0, 0.01)
    assert fingerprint_mismatch(new, old) == ("--proximal-mu", 0.01, 0.0)


def test_a_run_kept_before_fedprox_resumes_and_another_mu_is_refused(tmp_path):
    from fedmq.aggregator.app import build_aggregator, resume_or_start
    from fedmq.aggregator.checkpoint import CheckpointError, StateDir

    first = AggregatorSettings(test_data=None, eval_fraction=0.0)
    store = StateDir(tmp_path)
    build_aggregator(first, lambda *_: None, store).start()
    store.close()
    saved = StateDir(tmp_path).load()
    assert saved is not None and "proximal_mu" not in saved.fingerprint
    store = StateDir(tmp_path)
    assert resume_or_start(build_aggregator(first, lambda *_: None), store)
    store.close()
    prox = build_aggregator(dataclasses.replace(first, proximal_mu=0.1), lambda *_: None)
    with pytest.raises(CheckpointError, match=r"--proximal-mu 0\.1 does not match"):
        resume_or_start(prox, StateDir(tmp_path))


def test_the_demo_hands_proximal_mu_to_its_aggregator(tmp_path):
    from fedmq.demo import child_argv
    from fedmq.demo_settings import DemoSettings
    from fedmq.mqtt import BrokerAddress

    address = BrokerAddress.parse("127.0.0.1:1883")
    default = child_argv(DemoSettings(), address, tmp_path, tmp_path / "t.npz", [])
    assert all("--proximal-mu" not in argv for argv in default.values())
    chosen = child_argv(DemoSettings(proximal_mu=0.01), address, tmp_path, tmp_path / "t", [])
    argv = chosen["aggregator"]
    assert argv[argv.index("--proximal-mu") + 1] == "0.01"


def test_report_json_names_mu_only_when_not_0():
    from fedmq.report import proximal_mu_entry

    assert "proximal_mu" not in build_report([], **proximal_mu_entry(0.0))
    assert build_report([], **proximal_mu_entry(0.01))["proximal_mu"] == 0.01
