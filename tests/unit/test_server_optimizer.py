"""Server optimisers (aggregator.optimizer): the spec's grammar and its refusals, the maths
against FedAvg and a hand-computed Adam, and their state across a checkpoint and a restart."""

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fedmq import cli, config
from fedmq.aggregator.app import resume_or_start
from fedmq.aggregator.checkpoint import CheckpointError, StateDir, from_bytes, to_bytes
from fedmq.aggregator.optimizer import (
    BETA1,
    BETA2,
    TAU,
    server_optimizer,
    state_from_leaves,
    state_leaves,
)
from fedmq.aggregator.rounds import RoundPolicy
from fedmq.aggregator.settings import AggregatorSettings
from fedmq.demo import child_argv
from fedmq.demo_settings import DemoSettings
from fedmq.mqtt import BrokerAddress
from fedmq.settings import ServerOptimizerSpec, build, parse_server_optimizer
from tests.unit.test_aggregator_server import MODEL, Harness
from tests.unit.test_durability import NODES, crash, run_to_end, send_round

# ------------------------------------------------------------------------ the spec


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("fedavg", "fedavg"),
        (" FedAvg ", "fedavg"),
        ("fedavgm:1,0", "fedavgm:1.0,0.0"),
        ("fedavgm:0.5, 0.9", "fedavgm:0.5,0.9"),
        ("fedadam:1e-2", "fedadam:0.01"),
        ("fedyogi:0.01", "fedyogi:0.01"),
        ("fedadagrad:0.1", "fedadagrad:0.1"),
    ],
)
def test_a_spec_reads_as_its_canonical_text_and_back(text, canonical):
    spec = parse_server_optimizer(text)
    assert str(spec) == canonical
    assert parse_server_optimizer(canonical) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("adamw:0.1", "unknown server optimizer 'adamw:0.1': use fedavg, fedavgm:LR,MOMENTUM, "
         "fedadam:LR, fedyogi:LR or fedadagrad:LR"),
        ("fedadam", "fedadam: fedadam needs fedadam:LR, e.g. fedadam:0.01"),
        ("fedadam:", "fedadam:: fedadam needs fedadam:LR, e.g. fedadam:0.01"),
        ("fedadam:0.1,0.2", "fedadam:0.1,0.2: fedadam needs fedadam:LR, e.g. fedadam:0.01"),
        ("fedyogi:-1", "fedyogi:-1: the learning rate '-1' is not a finite number > 0"),
        ("fedadagrad:0", "fedadagrad:0: the learning rate '0' is not a finite number > 0"),
        ("fedadam:nan", "fedadam:nan: the learning rate 'nan' is not a finite number > 0"),
        ("fedadam:inf", "fedadam:inf: the learning rate 'inf' is not a finite number > 0"),
        ("fedadam:fast", "fedadam:fast: the learning rate 'fast' is not a finite number > 0"),
        ("fedavgm:1", "fedavgm:1: fedavgm needs fedavgm:LR,MOMENTUM, e.g. fedavgm:1,0.9"),
        ("fedavgm:1,1", "fedavgm:1,1: the momentum '1' is not a number in [0, 1), e.g. "
         "fedavgm:1,0.9"),
        ("fedavgm:1,-0.1", "fedavgm:1,-0.1: the momentum '-0.1' is not a number in [0, 1), "
         "e.g. fedavgm:1,0.9"),
        ("fedavgm:1,nan", "fedavgm:1,nan: the momentum 'nan' is not a number in [0, 1), e.g. "
         "fedavgm:1,0.9"),
        ("fedavgm:nan,0.9", "fedavgm:nan,0.9: the learning rate 'nan' is not a finite number > 0"),
        ("fedavg:1", "fedavg:1: fedavg takes no parameters (its server rate is 1)"),
    ],
)  # fmt: skip
def test_a_malformed_spec_is_refused_in_one_line(text, message, capsys):
    with pytest.raises(ValueError) as refused:
        parse_server_optimizer(text)
    assert str(refused.value) == message
    for command in ("aggregator", "demo"):  # the same line, as a usage error of both
        with pytest.raises(SystemExit) as stopped:
            config.parse_args(cli.build_parser(), [command, "--server-optimizer", text], {})
        assert stopped.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"argument --server-optimizer: {message} (see " in err


def test_the_option_gives_the_canonical_text_and_the_demo_hands_it_on(tmp_path):
    parsed = config.parse_args(
        cli.build_parser(), ["aggregator", "--server-optimizer", "fedadam:1e-2"], {}
    )
    assert build(AggregatorSettings, parsed).server_optimizer == "fedadam:0.01"
    demo = DemoSettings(server_optimizer="fedyogi:0.03")
    argv = child_argv(demo, BrokerAddress("127.0.0.1", 1), tmp_path, None, [])["aggregator"]
    child = build(AggregatorSettings, config.parse_args(cli.build_parser(), argv, {}))
    assert child.server_optimizer == "fedyogi:0.03"
    default = child_argv(DemoSettings(), BrokerAddress("127.0.0.1", 1), tmp_path, None, [])
    assert "--server-optimizer" not in default["aggregator"]


# ------------------------------------------------------------------------ the maths


def deltas(steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Mean deltas as combine() gives them: float64, one per model version."""
    rng = np.random.default_rng(seed)
    return [
        {name: rng.normal(0.0, 0.01, shape) for name, shape in MODEL.layout.items()}
        for _ in range(steps)
    ]


def test_fedavgm_at_rate_1_without_momentum_is_fedavg_of_the_float32_delta_bitwise():
    """Bitwise FedAvg of the mean delta rounded to float32, and so allclose, not bitwise, to
    FedAvg itself: FedAvg adds the float64 mean delta to the params in float64 and rounds
    once; the optax path (JAX without x64) rounds the delta to float32 first, then adds in
    float32. The two differ by at most the delta's rounding (half an ulp of the float32
    delta) plus one ulp of the result: most elements are equal."""
    optimizer = server_optimizer("fedavgm:1,0")
    fedavg = server_optimizer("fedavg")
    params = MODEL.init(0)
    state, empty = optimizer.init(params), fedavg.init(params)
    equal = total = 0
    for delta in deltas(5):
        ours, state = optimizer.update(params, delta, state)
        rounded = {name: array.astype(np.float32) for name, array in delta.items()}
        theirs, _ = fedavg.update(params, rounded, empty)
        exact, _ = fedavg.update(params, delta, empty)
        for name in theirs:
            assert ours[name].dtype == np.float32 and isinstance(ours[name], np.ndarray)
            assert ours[name].tobytes() == theirs[name].tobytes()
            bound = np.spacing(np.abs(rounded[name])) + np.spacing(np.abs(exact[name]))
            assert (np.abs(ours[name].astype(np.float64) - exact[name]) <= bound).all()
            equal += int((ours[name] == exact[name]).sum())
            total += exact[name].size
        params = exact
    assert equal / total > 0.9


def test_fedadam_two_steps_are_the_hand_computed_update():
    """optax.adam(lr, b1=0.9, b2=0.99, eps=1e-3) on g = -delta, with optax's bias correction:
    m_t = b1 m + (1 - b1) g, v_t = b2 v + (1 - b2) g^2, x -= lr (m_t / (1 - b1^t)) /
    (sqrt(v_t / (1 - b2^t)) + eps), in float64 here."""
    lr = 0.05
    optimizer = server_optimizer("fedadam:0.05")
    params = MODEL.init(3)
    state = optimizer.init(params)
    expected = {name: array.astype(np.float64) for name, array in params.items()}
    m = {name: np.zeros(array.shape) for name, array in params.items()}
    v = {name: np.zeros(array.shape) for name, array in params.items()}
    for t, delta in enumerate(deltas(2, seed=7), start=1):
        params, state = optimizer.update(params, delta, state)
        for name in expected:
            g = -delta[name].astype(np.float32).astype(np.float64)
            m[name] = BETA1 * m[name] + (1 - BETA1) * g
            v[name] = BETA2 * v[name] + (1 - BETA2) * g**2
            m_hat, v_hat = m[name] / (1 - BETA1**t), v[name] / (1 - BETA2**t)
            expected[name] = expected[name] - lr * m_hat / (np.sqrt(v_hat) + TAU)
    for name, array in params.items():
        np.testing.assert_allclose(array, expected[name], rtol=0, atol=2e-6)
    # the second step is not the first one again: the moments carried over
    assert int(state_leaves(state)[0]) == 2


@pytest.mark.parametrize(
    "spec", ["fedavgm:1,0.9", "fedadam:0.01", "fedyogi:0.01", "fedadagrad:0.1"]
)
def test_each_optimizer_moves_the_model_against_the_pseudo_gradient(spec):
    """A delta pointing one way moves every parameter that way (the sign of -g)."""
    optimizer = server_optimizer(spec)
    params = MODEL.init(0)
    delta = {name: np.full(shape, 0.01) for name, shape in MODEL.layout.items()}
    new, _ = optimizer.update(params, delta, optimizer.init(params))
    for name in params:
        assert (new[name] > params[name]).all(), name


# ------------------------------------------------------------------------ the state on disk


def test_the_state_survives_a_checkpoint_round_trip_bitwise(tmp_path: Path):
    optimizer = server_optimizer("fedyogi:0.01")
    params = MODEL.init(0)
    state = optimizer.init(params)
    for delta in deltas(2):
        params, state = optimizer.update(params, delta, state)
    h = Harness(server_optimizer="fedyogi:0.01")
    checkpoint = replace(h.agg._checkpoint(), optimizer_state=state_leaves(state))
    back = from_bytes(to_bytes(checkpoint)).optimizer_state
    assert back is not None
    leaves = state_leaves(state)
    assert leaves is not None and len(back) == len(leaves) > 0
    for read, written in zip(back, leaves, strict=True):
        assert (read.dtype, read.shape, read.tobytes()) == (
            written.dtype,
            written.shape,
            written.tobytes(),
        )
    rebuilt = state_from_leaves(optimizer, params, back)
    delta = deltas(1, seed=9)[0]
    a, _ = optimizer.update(params, delta, state)
    b, _ = optimizer.update(params, delta, rebuilt)
    assert all(a[name].tobytes() == b[name].tobytes() for name in a)


def test_fedavg_writes_no_state_key_and_an_old_checkpoint_resumes_as_fedavg():
    h = Harness()
    h.agg.start()
    checkpoint = h.agg._checkpoint()
    assert checkpoint.optimizer_state is None
    raw = msgpack.unpackb(to_bytes(checkpoint))
    assert "server_optimizer_state" not in raw and "server_optimizer" not in raw["fingerprint"]
    assert from_bytes(to_bytes(checkpoint)).optimizer_state is None


def test_state_that_does_not_fit_the_optimizer_is_refused():
    optimizer = server_optimizer("fedadam:0.01")
    params = MODEL.init(0)
    leaves = state_leaves(optimizer.init(params))
    assert leaves is not None
    with pytest.raises(ValueError, match="8 arrays of state, the optimizer keeps 9"):
        state_from_leaves(optimizer, params, leaves[:-1])
    wrong = [leaves[0], leaves[1].astype(np.float64), *leaves[2:]]
    with pytest.raises(ValueError, match="state array 1 is float64"):
        state_from_leaves(optimizer, params, wrong)
    with pytest.raises(ValueError, match="no state"):
        state_from_leaves(optimizer, params, None)
    with pytest.raises(ValueError, match="keeps none"):
        state_from_leaves(server_optimizer("fedavg"), params, leaves)


SPEC = "fedadam:0.01"


def harness(tmp_path: Path | None, spec: str = SPEC, rounds: int = 4) -> Harness:
    return Harness(
        policy=RoundPolicy(expected_nodes=len(NODES), min_nodes=len(NODES)),
        rounds=rounds,
        store=StateDir(tmp_path) if tmp_path is not None else None,
        server_optimizer=spec,
    )


def resumed(tmp_path: Path, spec: str = SPEC) -> Harness:
    h = harness(tmp_path, spec)
    assert isinstance(h.agg.store, StateDir)
    assert resume_or_start(h.agg, h.agg.store)
    h.agg.tick()
    return h


@pytest.mark.parametrize("spec", ["fedadam:0.01", "fedavgm:0.7,0.9"])
@pytest.mark.parametrize("crash_after_rounds", [1, 2])
def test_a_resumed_run_with_a_server_optimizer_ends_bitwise_equal(
    tmp_path: Path, spec: str, crash_after_rounds: int
):
    reference = harness(None, spec)
    reference.agg.start()
    run_to_end(reference)

    h = harness(tmp_path, spec)
    h.agg.start()
    for _ in range(crash_after_rounds):
        send_round(h, NODES)
    send_round(h, NODES[:2])  # part of the next round, in the journal
    saved = h.agg.store.load()  # type: ignore[union-attr]
    assert saved is not None and saved.optimizer_state is not None
    crash(h)
    h = resumed(tmp_path, spec)
    run_to_end(h)
    crash(h)  # closes the journal

    for name, array in reference.agg.params.items():
        assert h.agg.params[name].tobytes() == array.tobytes()
    assert [m.model_id for m in h.agg.history] == [m.model_id for m in reference.agg.history]


def test_a_resume_that_lost_the_state_would_make_another_model(tmp_path: Path):
    """The control: the state matters (a fresh state after the restart gives other bits)."""
    reference = harness(None)
    reference.agg.start()
    run_to_end(reference)
    h = harness(tmp_path)
    h.agg.start()
    send_round(h, NODES)
    crash(h)
    h = resumed(tmp_path)
    h.agg._optimizer_state = h.agg._optimizer.init(h.agg.params)  # as if not checkpointed
    run_to_end(h)
    crash(h)
    assert any(
        h.agg.params[name].tobytes() != array.tobytes()
        for name, array in reference.agg.params.items()
    )


@pytest.mark.parametrize(
    ("kept", "new"),
    [("fedadam:0.01", "fedyogi:0.01"), ("fedadam:0.01", "fedavg"), ("fedavg", "fedadam:0.01")],
)
def test_another_server_optimizer_refuses_the_resume_naming_the_option(tmp_path, kept, new):
    first = harness(tmp_path, kept)
    first.agg.start()
    crash(first)
    again = harness(tmp_path, new)
    with pytest.raises(CheckpointError) as refused:
        resume_or_start(again.agg, again.agg.store)  # type: ignore[arg-type]
    assert str(refused.value) == (
        f"--server-optimizer {new} does not match the run kept in {tmp_path}, which uses "
        f"--server-optimizer {kept}: start with --server-optimizer {kept} to continue it, "
        "add --fresh to discard it, or give another --state-dir to start a new run beside it"
    )


def test_the_fingerprint_holds_the_spec_only_when_not_fedavg():
    assert "server_optimizer" not in Harness().settings.fingerprint
    assert (
        Harness(server_optimizer="fedavgm:1.0,0.9").settings.fingerprint["server_optimizer"]
        == "fedavgm:1.0,0.9"
    )


def test_the_aggregator_with_fedavg_and_the_settings_load_no_jax():
    code = (
        "import sys\n"
        "from fedmq.aggregator.optimizer import server_optimizer\n"
        "from fedmq.settings import parse_server_optimizer\n"
        "parse_server_optimizer('fedadam:0.1')\n"
        "server_optimizer('fedavg')\n"
        "print(sorted(m for m in ('jax', 'optax') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
    assert ServerOptimizerSpec() == parse_server_optimizer("fedavg")
