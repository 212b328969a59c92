"""The trained model out: ``fedmq export`` from a state directory, ``fedmq.load_params``
back onto a task's own pytree (.msgpack and .npz), refusals in one line, and the
aggregator's ``--save-model`` writer."""

import importlib.util
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedmq
from fedmq import cli
from fedmq.aggregator.app import saving_model
from fedmq.aggregator.checkpoint import Checkpoint, StateDir
from fedmq.export import export
from fedmq.files import lock_directory
from fedmq.model_file import ModelFileError, from_global, npz_bytes, read_model
from fedmq.schemas import GlobalModel, TrainingPlan, encode
from fedmq.schemas.messages import model_id_of
from fedmq.tasks.builtin import mlp_task
from fedmq.tasks.naming import flatten_params
from fedmq.tasks.personal import shared_layout
from fedmq.tasks.seeds import seed_key
from fedmq.tasks.training import train_local

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "custom_task.py"
PLAN = TrainingPlan(learning_rate=0.01, batch_size=16, local_epochs=1, seed=0)


def example_module():
    spec = importlib.util.spec_from_file_location("custom_task", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tuple_task() -> fedmq.Task:
    def init(key):
        return (jax.random.normal(key, (3, 2)), jnp.arange(2, dtype=jnp.float32))

    def loss(params, batch):
        x, y = batch
        return jnp.mean((x @ params[0] + params[1] - y) ** 2)

    return fedmq.Task(name="pair", init=init, loss=loss, optimizer=optax.sgd(0.1), version=2)


def global_payload(task: fedmq.Task, params, round_: int = 7) -> bytes:
    named = flatten_params(params)
    return encode(
        GlobalModel(
            federation="lab", round=round_, model=task.name, model_id=model_id_of(named),
            params=named, plan=PLAN, created_at=1.0,
        )
    )  # fmt: skip


def state_dir_with(path: Path, payload: bytes, version: int = 7) -> Path:
    store = StateDir(path, keep=3)
    store.save(Checkpoint(version, {"model": "x"}, payload, None, None, [], []))
    store.close()
    return path


def trained(task: fedmq.Task, seed: int = 1):
    """Params that are not init's: a round trip must carry these numbers exactly."""
    params = task.init(seed_key(seed))
    return jax.tree_util.tree_map(
        lambda a: np.asarray(a) * np.float32(1.5) + np.float32(0.25), params
    )


def assert_same_tree(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("suffix", [".msgpack", ".npz"])
@pytest.mark.parametrize("make_task", [lambda: example_module().task, tuple_task])
def test_export_then_load_params_gives_the_same_tree(tmp_path, suffix, make_task):
    task = make_task()
    params = trained(task)
    state = state_dir_with(tmp_path / "state", global_payload(task, params))
    out = tmp_path / f"model{suffix}"
    model = export(state, out)
    assert model.round == 7 and model.task == task.name
    assert_same_tree(fedmq.load_params(out, task), params)
    assert_same_tree(fedmq.load_params(str(out), task), params)


def test_the_msgpack_file_is_the_global_message_and_the_npz_names_its_tensors(tmp_path):
    task = example_module().task
    params = trained(task)
    payload = global_payload(task, params, round_=12)
    state = state_dir_with(tmp_path / "state", payload, version=12)
    export(state, tmp_path / "m.msgpack")
    assert (tmp_path / "m.msgpack").read_bytes() == payload
    assert fedmq.decode_global(payload).model_id == model_id_of(flatten_params(params))
    export(state, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz", allow_pickle=False) as archive:
        assert archive.files == [
            "conv.b", "conv.w", "head.b", "head.w",
            "fedmq:task", "fedmq:model_id", "fedmq:round",
        ]  # fmt: skip
        assert archive["fedmq:task"].item() == "sensor-cnn"
        assert int(archive["fedmq:round"]) == 12
        assert archive["fedmq:model_id"].item() == fedmq.decode_global(payload).model_id
        assert np.array_equal(archive["head.w"], params["head"]["w"])


def test_a_builtin_task_loads_onto_its_own_tree(tmp_path):
    task = mlp_task("mlp:4-3-2")
    params = trained(task)
    state = state_dir_with(tmp_path / "state", global_payload(task, params))
    export(state, tmp_path / "m.npz")
    assert_same_tree(fedmq.load_params(tmp_path / "m.npz", task), params)


def test_export_takes_no_lock_so_it_works_while_the_aggregator_runs(tmp_path):
    task = tuple_task()
    state = state_dir_with(tmp_path / "state", global_payload(task, trained(task)))
    lock = lock_directory(state)  # as a running aggregator holds it
    try:
        assert export(state, tmp_path / "m.msgpack").round == 7
    finally:
        lock.release()


def test_a_model_of_another_layout_is_refused_in_one_line(tmp_path):
    pair, other = tuple_task(), example_module().task
    state = state_dir_with(tmp_path / "state", global_payload(other, trained(other)))
    for suffix in (".msgpack", ".npz"):
        export(state, tmp_path / f"m{suffix}")
        with pytest.raises(ModelFileError) as error:
            fedmq.load_params(tmp_path / f"m{suffix}", pair)
        assert str(error.value) == (
            f"{tmp_path / f'm{suffix}'} is not a model of task 'pair': "
            "task 'sensor-cnn' where 'pair' was expected"
        )


def test_a_changed_shape_is_named(tmp_path):
    task = tuple_task()
    params = (np.zeros((4, 2), np.float32), np.zeros(2, np.float32))  # 4 rows, not 3
    state = state_dir_with(tmp_path / "state", global_payload(task, params))
    export(state, tmp_path / "m.npz")
    with pytest.raises(ModelFileError, match=r"tensor '0' has shape \[4, 2\] where \[3, 2\]"):
        fedmq.load_params(tmp_path / "m.npz", task)


def fingerprinted_npz(path: Path, task: fedmq.Task, params, fingerprint: str, version: str) -> Path:
    """An .npz as export writes it from a global model that carries the task fields."""
    model = from_global(global_payload(task, params))
    path.write_bytes(npz_bytes(replace(model, task_version=version, task_fingerprint=fingerprint)))
    return path


def test_the_task_fingerprint_decides_when_the_file_has_one(tmp_path):
    task = tuple_task()  # version 2
    params = trained(task)
    template = jax.eval_shape(task.init, seed_key(0))
    right = shared_layout(task, template)[0].fingerprint
    good = fingerprinted_npz(tmp_path / "good.npz", task, params, right, "2")
    assert_same_tree(fedmq.load_params(good, task), params)
    with np.load(good) as archive:
        assert archive["fedmq:task_fingerprint"].item() == right
    # same names and shapes, another declared version: only the fingerprint tells
    older = replace(task, version=1)
    other = shared_layout(older, template)[0].fingerprint
    wrong = fingerprinted_npz(tmp_path / "v1.npz", task, params, other, "1")
    with pytest.raises(ModelFileError) as error:
        fedmq.load_params(wrong, task)
    assert str(error.value) == (
        f"{wrong} is not a model of task 'pair': task 'pair' version '1' where '2' was expected"
    )
    # a fingerprint that matches nothing the file says: named as it is
    odd = fingerprinted_npz(tmp_path / "odd.npz", task, params, "0" * 32, "2")
    with pytest.raises(ModelFileError) as error:
        fedmq.load_params(odd, task)
    assert str(error.value) == (
        f"{odd} is not a model of task 'pair': task fingerprint {'0' * 32} where {right} was "
        "expected"
    )
    assert "\n" not in str(error.value)


def test_a_hand_written_npz_without_metadata_loads_by_name(tmp_path):
    task = tuple_task()
    w, b = trained(task)
    np.savez(tmp_path / "mine.npz", **{"1": b, "0": w})  # any order
    assert_same_tree(fedmq.load_params(tmp_path / "mine.npz", task), (w, b))
    np.savez(tmp_path / "short.npz", **{"0": w})
    with pytest.raises(ModelFileError, match=r"tensor '1' is missing \(1 tensors, 2 expected\)"):
        fedmq.load_params(tmp_path / "short.npz", task)


def test_an_npz_changed_after_export_is_refused(tmp_path):
    task = tuple_task()
    state = state_dir_with(tmp_path / "state", global_payload(task, trained(task)))
    export(state, tmp_path / "m.npz")
    with np.load(tmp_path / "m.npz") as archive:
        arrays = dict(archive)
    arrays["0"] = arrays["0"] + 1
    np.savez(tmp_path / "m.npz", **arrays)
    with pytest.raises(ModelFileError, match="do not hash to its fedmq:model_id"):
        fedmq.load_params(tmp_path / "m.npz", task)


def test_bad_paths_are_refused_with_the_fix(tmp_path):
    task = tuple_task()
    state = state_dir_with(tmp_path / "state", global_payload(task, trained(task)))
    with pytest.raises(
        ModelFileError, match=r"--out .*model.pt: the name must end in .msgpack or .npz"
    ):
        export(state, tmp_path / "model.pt")
    with pytest.raises(ModelFileError, match="does not exist: give the --state-dir"):
        export(tmp_path / "absent", tmp_path / "m.npz")
    assert not (tmp_path / "absent").exists()  # looked at, not created
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="holds no model"):
        export(tmp_path / "empty", tmp_path / "m.npz")
    with pytest.raises(ModelFileError, match=r"directory .*nowhere does not exist"):
        export(state, tmp_path / "nowhere" / "m.npz")
    with pytest.raises(ModelFileError, match=r"does not exist \(write one with fedmq export"):
        fedmq.load_params(tmp_path / "gone.npz", task)
    with pytest.raises(
        ModelFileError, match=r"cannot read .*m.json: the name must end in .msgpack or .npz"
    ):
        fedmq.load_params(tmp_path / "m.json", task)
    (tmp_path / "junk.msgpack").write_bytes(b"\x93not a model")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    for junk in ("junk.msgpack", "junk.npz"):
        with pytest.raises(ModelFileError, match=f"{junk} is not a fedmq model file"):
            read_model(tmp_path / junk)


def test_the_export_command(tmp_path, capsys):
    task = tuple_task()
    state = state_dir_with(tmp_path / "state", global_payload(task, trained(task)))
    out = tmp_path / "m.npz"
    assert cli.main(["export", "--state-dir", str(state), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("after 6 rounds, model ")
    assert printed.rstrip().endswith(f"written to {out}")
    assert "of task 'pair': 2 tensors, 8 parameters" in printed
    assert cli.main(["export", "--state-dir", str(tmp_path / "empty"), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedmq export: error: state directory") and error.count("\n") == 1
    with pytest.raises(SystemExit):
        cli.main(["export", "--state-dir", str(state), "--out", "m.h5"])
    assert "'m.h5' does not end in .msgpack or .npz" in capsys.readouterr().err
    assert "fedmq export" in cli.build_parser().format_help()


def test_save_model_writes_each_new_global_once_and_publishes_everything(tmp_path):
    task = tuple_task()
    sent: list[tuple[str, int]] = []
    path = tmp_path / "model.npz"
    publish = saving_model(lambda t, p, r: sent.append((t, len(p))), "fed/lab/global", path)
    first, second = (
        global_payload(task, trained(task, 1), 1),
        global_payload(task, trained(task, 2), 2),
    )
    publish("fed/lab/global", first, True)
    assert read_model(path).round == 1
    stamp = path.stat().st_mtime_ns
    publish("fed/lab/server", b"status", True)
    publish("fed/lab/global", first, True)  # republished after a reconnect: not rewritten
    assert path.stat().st_mtime_ns == stamp
    publish("fed/lab/global", second, True)
    assert_same_tree(fedmq.load_params(path, task), trained(task, 2))
    assert [topic for topic, _ in sent] == ["fed/lab/global", "fed/lab/server"] + [
        "fed/lab/global"
    ] * 2
    assert not list(tmp_path.glob("*.tmp"))


def test_the_custom_task_example_learns_and_round_trips(tmp_path):
    example = example_module()
    task = example.task
    x, y = example.windows(300, seed=1)
    x_test, y_test = example.windows(300, seed=0)
    params = task.init(seed_key(0))
    before = float(task.metrics(params, (x_test, y_test))["loss"])
    for round_number in range(1, 4):
        params, _ = train_local(task, params, x, y, PLAN, node_id="a", round_number=round_number)
    after = task.metrics(params, (x_test, y_test))
    assert float(after["loss"]) < 0.8 * before, (before, after)
    state = state_dir_with(tmp_path / "state", global_payload(task, params))
    export(state, tmp_path / "model.npz")
    loaded = fedmq.load_params(tmp_path / "model.npz", task)
    assert_same_tree(loaded, jax.tree_util.tree_map(np.asarray, params))
    assert np.array_equal(example.apply(loaded, x_test), example.apply(params, x_test))


def test_the_demo_hands_save_model_to_its_aggregator_as_an_absolute_path(tmp_path, monkeypatch):
    from fedmq.demo import DemoSettings, child_argv, config_problem
    from fedmq.mqtt import BrokerAddress

    monkeypatch.chdir(tmp_path)
    config = DemoSettings(nodes=1, save_model=Path("model.npz"))
    assert config_problem(config) is None
    argv = child_argv(config, BrokerAddress("127.0.0.1", 1883), tmp_path, tmp_path / "t.npz", [])
    flag = argv["aggregator"].index("--save-model")
    assert argv["aggregator"][flag + 1] == str(tmp_path / "model.npz")
    assert config_problem(DemoSettings(save_model=Path("model.pkl"))) == (
        "--save-model model.pkl: the name must end in .msgpack or .npz (the suffix chooses "
        "the format)"
    )


def test_an_aggregator_refuses_a_save_model_it_cannot_write_before_it_starts(tmp_path):
    for path, says in [
        (tmp_path / "model.pt", "the name must end in .msgpack or .npz"),
        (tmp_path / "absent" / "model.npz", "directory .*absent does not exist"),
    ]:
        settings = fedmq.AggregatorSettings(save_model=path, state_dir=tmp_path / "state")
        with pytest.raises(ValueError, match=f"^--save-model {tmp_path}.*: {says}"):
            fedmq.run(settings)
    assert not (tmp_path / "state").exists()  # refused before anything was touched


def test_the_guide_shows_the_example_file_as_it_is():
    guide = (EXAMPLE.parents[1] / "docs" / "python-api.md").read_text()
    section = guide.split("## Your own model: a custom task", 1)[1]
    block = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert block + "\n" == EXAMPLE.read_text()
