"""fedmq.Task and its pure machinery: naming pytrees as wire tensors, layout fingerprints,
resolving --task, the built-in tasks, and local training through a task."""

import dataclasses
import re
import subprocess
import sys
import textwrap
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedmq
from fedmq.datasets import digits, partition
from fedmq.models import get_model
from fedmq.schemas.messages import GlobalModel, TrainingPlan, decode_global, encode, model_id_of
from fedmq.tasks import Task
from fedmq.tasks.builtin import mlp_params, mlp_task
from fedmq.tasks.layout import TaskLayout, TensorSpec, layout_difference, layout_of
from fedmq.tasks.naming import NamingError, flatten_params, tensor_specs, unflatten_params
from fedmq.tasks.registry import TaskError, load_task
from fedmq.tasks.seeds import seed_key, seed_of_key
from fedmq.tasks.training import make_epoch, train_local
from tests.unit.test_training import sgd_reference

WIRE_NAME = r"[A-Za-z0-9_./-]{1,64}"  # docs/PROTOCOL.md, section 6


def linear_task(**changes: Any) -> Task:
    """A small regression task of our own: nested-dict params, mean squared error, Adam."""

    def init(key: jax.Array) -> dict[str, Any]:
        return {"dense": {"w": jax.random.normal(key, (3, 1)) * 0.1, "b": jnp.zeros(1)}}

    def loss(params: dict[str, Any], batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        prediction = (x @ params["dense"]["w"] + params["dense"]["b"])[:, 0]
        return jnp.mean((prediction - y) ** 2)

    fields: dict[str, Any] = {
        "name": "linear",
        "init": init,
        "loss": loss,
        "optimizer": optax.adam(0.05),
    }
    return Task(**(fields | changes))


# --------------------------------------------------------------------------- Task


def test_task_is_fedmq_task():
    assert fedmq.Task is Task
    task = linear_task(version=2)
    assert task.version_text == "2"
    assert linear_task(version="2").version_text == "2"
    assert linear_task().version_text is None


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": ""}, "task name ''"),
        ({"name": "sensor cnn"}, "task name 'sensor cnn'"),
        ({"loss": 3}, "task 'linear': loss must be a function"),
        ({"init": None}, "task 'linear': init must be a function"),
        (
            {"optimizer": optax.sgd},
            "task 'linear': optimizer must be an optax.GradientTransformation (e.g. optax.sgd(0.1)), not function",
        ),
        ({"metrics": "accuracy"}, "task 'linear': metrics must be a function or None"),
        ({"personal": ["head"]}, "task 'linear': personal must be a function or None"),
        ({"version": True}, "task 'linear': version must be a str or an int"),
        ({"version": 1.5}, "task 'linear': version must be a str or an int"),
    ],
)
def test_a_task_that_cannot_work_is_refused_when_made(changes, message):
    with pytest.raises((TypeError, ValueError)) as error:
        linear_task(**changes)
    assert str(error.value).startswith(message)


def test_import_fedmq_and_every_help_stay_free_of_jax_and_optax():
    """`fedmq --help` answers in a blink on a Pi: it must not import JAX (nor optax) on its way
    to fedmq.Task, nor for resolving tasks by name."""
    code = textwrap.dedent(
        """
        import sys
        import fedmq
        from fedmq import Task
        import fedmq.tasks.registry, fedmq.tasks.layout
        from fedmq.cli import main
        for argv in (["--help"], ["node", "--help"], ["aggregator", "--help"], ["demo", "--help"]):
            try:
                main(argv)
            except SystemExit:
                pass
        heavy = sorted({m.split(".")[0] for m in sys.modules} & {"jax", "jaxlib", "optax"})
        print("HEAVY", heavy, file=sys.stderr)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "usage: fedmq node" in result.stdout
    assert "HEAVY []" in result.stderr


def test_the_help_test_sees_jax_when_it_is_imported():
    """The check above can fail: importing the built-in tasks does load JAX and optax."""
    code = (
        "import sys, fedmq.tasks.builtin; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'optax'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "['jax', 'optax']"


# --------------------------------------------------------------------------- naming


class Pair(NamedTuple):
    kernel: Any
    bias: Any


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Module:
    """Like an Equinox module: a dataclass registered as a pytree, fields as attributes."""

    encoder: Any
    layers: list[Any]
    activation_scale: Any


def f32(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def test_leaves_are_named_by_their_key_paths_in_flattening_order():
    params = {
        "params": {
            "Dense_0": {"kernel": f32(4, 3), "bias": f32(3)},
            "Dense_1": {"kernel": f32(3, 2)},
        },
        "layers": [Pair(f32(2, 2), f32(2)), (f32(1),)],
        "skipped": None,
    }
    assert list(flatten_params(params)) == [
        "layers.0.kernel",
        "layers.0.bias",
        "layers.1.0",
        "params.Dense_0.bias",
        "params.Dense_0.kernel",
        "params.Dense_1.kernel",
    ]


def test_dataclass_modules_are_named_by_their_fields():
    module = Module(encoder={"w": f32(2, 2)}, layers=[f32(3), f32(4)], activation_scale=f32())
    flat = flatten_params(module)
    assert list(flat) == ["encoder.w", "layers.0", "layers.1", "activation_scale"]
    assert flat["activation_scale"].shape == ()


def test_one_array_is_named_params_and_int_dict_keys_in_decimal():
    assert list(flatten_params(f32(3))) == ["params"]
    assert list(flatten_params({0: f32(1), 7: f32(1)})) == ["0", "7"]


def test_names_are_numpy_copies_of_jax_arrays_with_their_bits():
    params = {"w": jnp.asarray([1.5, -0.0, 3.25], dtype=jnp.float32), "h": jnp.ones(2, jnp.float16)}
    flat = flatten_params(params)
    assert all(type(a) is np.ndarray for a in flat.values())
    assert flat["w"].tobytes() == np.asarray(params["w"]).tobytes()
    assert flat["h"].dtype == np.float16


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"dense.0": f32(1)}, "params at ['dense.0']: key 'dense.0' cannot name a tensor"),
        ({"a": {"b c": f32(1)}}, "params at ['a']['b c']: key 'b c' cannot name a tensor"),
        ({"a": {"": f32(1)}}, "params at ['a']['']: key '' cannot name a tensor"),
        ({"x" * 40: {"y" * 30: f32(1)}}, "is longer than 64 characters"),
        ({"w": np.ones(2, np.int32)}, "params leaf 'w' is int32; params must be float32"),
        ({"w": np.ones(2)}, "params leaf 'w' is float64; params must be float32"),
        ({"w": f32(2), "act": lambda x: x}, "params leaf 'act' is a function, not an array"),
        ({"w": f32(2), "n": 3.0}, "params leaf 'n' is a float, not an array"),
        ({}, "params has no arrays"),
        ({"a": None}, "params has no arrays"),
    ],
)
def test_leaves_that_cannot_travel_are_refused_by_name(params, message):
    with pytest.raises(NamingError) as error:
        flatten_params(params)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_two_leaves_with_one_name_are_refused():
    # a register_dataclass field and a dict cannot collide; a custom node with keys can
    class Twice:
        pass

    jax.tree_util.register_pytree_with_keys(
        Twice,
        lambda t: (
            [(jax.tree_util.GetAttrKey("w"), f32(1)), (jax.tree_util.DictKey("w"), f32(1))],
            None,
        ),
        lambda _, children: Twice(),
    )
    with pytest.raises(NamingError, match="two leaves are named 'w'"):
        flatten_params(Twice())


def test_unflatten_puts_named_tensors_back_onto_the_tasks_tree():
    task = linear_task()
    params = task.init(jax.random.key(0))
    template = jax.eval_shape(task.init, jax.random.key(1))  # shapes only, no arrays
    flat = flatten_params(params)
    back = unflatten_params(template, flat)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    np.testing.assert_array_equal(back["dense"]["w"], params["dense"]["w"])
    assert tensor_specs(template) == [
        ("dense.b", (1,), np.dtype("float32")),
        ("dense.w", (3, 1), np.dtype("float32")),
    ]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda flat: {k: v for k, v in flat.items() if k != "dense.w"},
            "tensor 'dense.w' is missing (the task's params have it)",
        ),
        (lambda flat: flat | {"dense.v": f32(1)}, "tensor 'dense.v' is not in the task's params"),
        (
            lambda flat: flat | {"dense.w": f32(3)},
            "tensor 'dense.w' has shape (3,); the task's params have (3, 1)",
        ),
        (
            lambda flat: flat | {"dense.w": f32(3, 1).astype(np.float16)},
            "tensor 'dense.w' is float16; the task's params are float32",
        ),
    ],
)
def test_unflatten_names_the_tensor_that_does_not_fit(change, message):
    task = linear_task()
    template = jax.eval_shape(task.init, jax.random.key(0))
    flat = flatten_params(task.init(jax.random.key(0)))
    with pytest.raises(NamingError) as error:
        unflatten_params(template, change(flat))
    assert str(error.value) == message


KEYS = st.text(alphabet="abcXYZ019_-/", min_size=1, max_size=6)
LEAVES = st.builds(
    lambda shape, dtype, seed: np.random.default_rng(seed).normal(size=shape).astype(dtype),
    st.lists(st.integers(1, 3), max_size=3).map(tuple),
    st.sampled_from([np.float32, np.float16]),
    st.integers(0, 2**32 - 1),
)
TREES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.dictionaries(KEYS, children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.builds(Pair, children, children),
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(TREES)
def test_any_pytree_round_trips_through_named_wire_tensors(tree):
    flat = flatten_params(tree)
    assert len(flat) == len(jax.tree.leaves(tree))
    assert all(re.fullmatch(WIRE_NAME, name) for name in flat)
    # through the wire itself: a global model carrying these tensors, encoded and decoded
    plan = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0)
    wire = {n: a.astype(np.float32) if a.dtype == np.float16 else a for n, a in flat.items()}
    message = GlobalModel("f", 1, "t", model_id_of(wire), wire, plan)
    decoded = decode_global(encode(message)).params
    assert list(decoded) == list(flat)
    back = unflatten_params(
        tree, {n: np.asarray(a, dtype=flat[n].dtype) for n, a in decoded.items()}
    )
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for got, want in zip(jax.tree.leaves(back), jax.tree.leaves(tree), strict=True):
        assert got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


# --------------------------------------------------------------------------- layout


def layout(task: str = "t", version: str | None = None, *tensors: TensorSpec) -> TaskLayout:
    return TaskLayout(
        task, version, tensors or (TensorSpec("w", (2, 3), "<f4"), TensorSpec("b", (3,), "<f4"))
    )


def test_the_fingerprint_is_a_pinned_hash_of_the_layout():
    # sha256(b'{"task":"t","tensors":[["w","<f4",[2,3]],["b","<f4",[3]]],"version":null}')
    assert layout().fingerprint == "509053a4e21b97b7fff4df28e3395425"
    assert len(layout().fingerprint) == 32


@pytest.mark.parametrize(
    ("other", "difference"),
    [
        (layout("u"), "task 'u' where 't' was expected"),
        (layout("t", "2"), "task 't' version '2' where (none) was expected"),
        (
            layout("t", None, TensorSpec("b", (3,), "<f4"), TensorSpec("w", (2, 3), "<f4")),
            "tensor 1 is 'b' where 'w' was expected (2 tensors, 2 expected)",
        ),
        (
            layout("t", None, TensorSpec("w", (3, 2), "<f4"), TensorSpec("b", (3,), "<f4")),
            "tensor 'w' has shape [3, 2] where [2, 3] was expected",
        ),
        (
            layout("t", None, TensorSpec("w", (2, 3), "<f2"), TensorSpec("b", (3,), "<f4")),
            "tensor 'w' is float16 where float32 was expected",
        ),
        (
            layout("t", None, TensorSpec("w", (2, 3), "<f4")),
            "tensor 'b' is missing (1 tensors, 2 expected)",
        ),
        (
            layout(
                "t",
                None,
                TensorSpec("w", (2, 3), "<f4"),
                TensorSpec("b", (3,), "<f4"),
                TensorSpec("c", (1,), "<f4"),
            ),
            "tensor 'c' is not expected (3 tensors, 2 expected)",
        ),
    ],
)
def test_each_difference_changes_the_fingerprint_and_is_named_in_one_line(other, difference):
    assert other.fingerprint != layout().fingerprint
    assert layout_difference(layout(), other) == difference


def test_equal_layouts_have_no_difference_and_one_fingerprint():
    assert layout_difference(layout(), layout()) is None
    task = linear_task(version=3)
    params = flatten_params(task.init(jax.random.key(0)))
    mine = layout_of(task.name, task.version_text, params)
    template = jax.eval_shape(task.init, seed_key(9))  # shapes and dtypes, no arrays
    specs = {n: jax.ShapeDtypeStruct(shape, dtype) for n, shape, dtype in tensor_specs(template)}
    assert layout_of("linear", "3", specs) == mine
    assert mine.fingerprint == layout_of("linear", "3", params).fingerprint
    assert layout_of("linear", "4", params).fingerprint != mine.fingerprint


def test_a_fingerprint_is_the_same_in_another_process():
    code = (
        "from fedmq.tasks.layout import TaskLayout, TensorSpec\n"
        "print(TaskLayout('t', None, (TensorSpec('w', (2, 3), '<f4'), TensorSpec('b', (3,), '<f4'))).fingerprint)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.stdout.strip() == layout().fingerprint


# --------------------------------------------------------------------------- load_task


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory for task modules, and sys.path / sys.modules as they were."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("fedmqtest_"):
            del sys.modules[name]


TASK_MODULE = """
import jax.numpy as jnp
import optax
from fedmq import Task

def init(key):
    return {"w": jnp.zeros(2)}

def loss(params, batch):
    return jnp.mean((batch[0] @ params["w"] - batch[1]) ** 2)

task = Task(name="mine", init=init, loss=loss, optimizer=optax.sgd(0.1))
other = Task(name="other", init=init, loss=loss, optimizer=optax.sgd(0.1))

def make():
    return task

def make_number():
    return 3

def needs_an_argument(x):
    return task

number = 3
"""


def test_a_task_from_a_file_in_the_working_directory(workdir):
    (workdir / "fedmqtest_a.py").write_text(TASK_MODULE)
    assert load_task("fedmqtest_a:task").name == "mine"
    assert load_task("fedmqtest_a:make").name == "mine"  # a function returning a Task


def test_builtin_names_resolve_to_their_tasks():
    assert load_task("digits-mlp").name == "digits-mlp"
    assert load_task("digits-mlp-large").name == "digits-mlp-large"
    assert load_task("mlp:8-32-3").name == "mlp:8-32-3"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "fedmqtest_b:nothing",
            "task 'fedmqtest_b:nothing': module 'fedmqtest_b' ({dir}/fedmqtest_b.py) has no attribute 'nothing'; it has the tasks other, task",
        ),
        (
            "fedmqtest_b:number",
            "task 'fedmqtest_b:number': fedmqtest_b:number is a int, not a fedmq.Task nor a function returning one",
        ),
        (
            "fedmqtest_b:Task",
            "task 'fedmqtest_b:Task': fedmqtest_b:Task is a type, not a fedmq.Task",
        ),
        (
            "fedmqtest_b:make_number",
            "task 'fedmqtest_b:make_number': fedmqtest_b:make_number() returned a int, not a fedmq.Task",
        ),
        (
            "fedmqtest_b:needs_an_argument",
            "task 'fedmqtest_b:needs_an_argument': calling fedmqtest_b:needs_an_argument() failed: TypeError:",
        ),
        (
            "fedmqtest_nowhere:task",
            "task 'fedmqtest_nowhere:task': no module 'fedmqtest_nowhere': neither installed nor fedmqtest_nowhere.py in {dir}; install it, or run from the folder that holds it",
        ),
        (
            "fedmqtest_broken:task",
            "task 'fedmqtest_broken:task': importing module 'fedmqtest_broken' failed: ZeroDivisionError: division by zero; fix the module",
        ),
        (
            "fedmqtest_needy:task",
            "task 'fedmqtest_needy:task': module 'fedmqtest_needy' in {dir} needs 'fedmqtest_absent_dependency', which is not installed",
        ),
        (
            "fedmqtest_b.py:task",
            "task 'fedmqtest_b.py:task': give a module name, not a file: run from the folder holding fedmqtest_b.py and use fedmqtest_b:task",
        ),
        ("fedmqtest_b:1task", "task 'fedmqtest_b:1task' is not MODULE:ATTRIBUTE"),
        (
            "no-such-task",
            "unknown task 'no-such-task'; known: digits-mlp, digits-mlp-large, digits-cnn, activity-cnn, diabetes-mlp, mlp:IN-...-CLASSES",
        ),
        ("mlp:8-0-3", "model 'mlp:8-0-3': after 'mlp:' give layer sizes >= 1"),
    ],
)
def test_a_task_that_cannot_be_found_fails_in_one_line_with_the_fix(workdir, spec, message):
    (workdir / "fedmqtest_b.py").write_text(TASK_MODULE)
    (workdir / "fedmqtest_broken.py").write_text("x = 1 / 0\n")
    (workdir / "fedmqtest_needy.py").write_text("import fedmqtest_absent_dependency\n")
    with pytest.raises(TaskError) as error:
        load_task(spec)
    text = str(error.value)
    assert text.startswith(message.format(dir=workdir)), text
    assert "\n" not in text


def test_a_task_registered_under_the_entry_point_group(workdir, monkeypatch):
    """A real distribution on sys.path whose entry_points.txt registers a task name."""
    (workdir / "fedmqtest_plugin.py").write_text(TASK_MODULE)
    info = workdir / "fedmqtest_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedmqtest-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[fedmq.tasks]\nplugged-task = fedmqtest_plugin:make\nbroken-task = fedmqtest_plugin:gone\n"
    )
    monkeypatch.syspath_prepend(str(workdir))
    assert load_task("plugged-task").name == "mine"
    with pytest.raises(
        TaskError,
        match=r"^task 'broken-task': its entry point 'fedmqtest_plugin:gone' \(group 'fedmq.tasks'\) failed to load: AttributeError",
    ):
        load_task("broken-task")
    with pytest.raises(
        TaskError,
        match=r"known: digits-mlp, digits-mlp-large, digits-cnn, activity-cnn, diabetes-mlp, mlp:IN-...-CLASSES, broken-task, plugged-task; or your own as MODULE:ATTRIBUTE",
    ):
        load_task("unplugged")


# --------------------------------------------------------------------------- built-in tasks


def test_seed_key_is_jax_random_key_below_2_to_32_and_keeps_64_bits():
    for seed in (0, 1, 12345, 2**32 - 1):
        assert np.array_equal(
            jax.random.key_data(seed_key(seed)), jax.random.key_data(jax.random.key(seed))
        )
        assert seed_of_key(seed_key(seed)) == seed
        assert seed_of_key(jax.random.PRNGKey(seed)) == seed
    assert seed_of_key(seed_key(2**40 + 3)) == 2**40 + 3
    assert seed_of_key(seed_key(2**64 - 1)) == 2**64 - 1
    with pytest.raises(ValueError, match="between 0 and 2"):
        seed_key(-1)


@pytest.mark.parametrize(
    "name", ["digits-mlp", "digits-mlp-large", "mlp:4-3-3-3-3-3-3-3-3-3-3-3-2"]
)
@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
def test_builtin_init_is_the_models_init_bitwise_with_its_wire_names_in_order(name, seed):
    model = get_model(name)
    task = mlp_task(name)
    flat = flatten_params(task.init(seed_key(seed)))
    expected = model.init(seed)
    assert list(flat) == list(model.layout)  # l0.w, l0.b, ..., l9.*, l10.* (not l10 before l2)
    for tensor, array in expected.items():
        assert flat[tensor].dtype == array.dtype
        assert flat[tensor].tobytes() == array.tobytes()
    assert model_id_of(flat) == model_id_of(expected)
    shapes = jax.eval_shape(task.init, seed_key(seed))  # traceable: a host callback
    assert [(n, s) for n, s, _ in tensor_specs(shapes)] == list(model.layout.items())


def test_builtin_metrics_and_per_example_loss():
    task = load_task("mlp:2-2")
    params = mlp_params(
        get_model("mlp:2-2"), {"l0.w": np.eye(2, dtype=np.float32), "l0.b": np.zeros(2, np.float32)}
    )
    x = jnp.asarray([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    y = jnp.asarray([0, 1, 1])
    assert task.loss(params, (x, y)).shape == (3,)
    metrics = task.metrics(params, (x, y))
    assert float(metrics["accuracy"]) == pytest.approx(2 / 3)
    assert float(metrics["loss"]) == pytest.approx(float(jnp.mean(task.loss(params, (x, y)))))


@pytest.fixture(scope="module")
def reference_digits():
    train, _ = digits()
    return train


@pytest.mark.parametrize(
    ("name", "nodes", "split", "plan"),
    [
        # the reference demo: 10 IID shards of 150, batch 16 (9 batches and one of 6)
        ("digits-mlp", 10, "iid", TrainingPlan(0.1, 16, 1, 0)),
        ("digits-mlp-large", 10, "iid", TrainingPlan(0.1, 16, 1, 0)),
        ("digits-mlp", 10, "dirichlet:0.1", TrainingPlan(0.05, 32, 2, 3)),
        ("digits-mlp-large", 7, "iid", TrainingPlan(0.3, 500, 1, 1)),  # one padded batch
    ],
)
def test_training_through_the_task_is_node_training_bitwise(
    reference_digits, name, nodes, split, plan
):
    """optax.sgd + optax.apply_updates in a jitted scan over the task's per-example loss give
    exactly node/training.py's parameters and loss (frozen in test_training.sgd_reference),
    round after round of FedAvg."""
    train = reference_digits
    model, task = get_model(name), load_task(name)
    shards = partition(train.y, nodes, split, 0)
    current = model.init(plan.seed)
    for round_number in (1, 2):
        trained = []
        for i, shard in enumerate(shards[:3]):
            x, y = train.x[shard], train.y[shard]
            theirs, their_loss = sgd_reference(
                model, current, x, y, plan, node_id=f"node-{i}", round_number=round_number
            )
            mine, my_loss = train_local(
                task,
                mlp_params(model, current),
                x,
                y,
                plan,
                node_id=f"node-{i}",
                round_number=round_number,
            )
            mine = flatten_params(mine)
            assert sorted(mine) == sorted(theirs)  # (the node's jitted dict comes back key-sorted)
            for tensor in theirs:
                assert mine[tensor].tobytes() == theirs[tensor].tobytes(), (round_number, i, tensor)
            assert my_loss == their_loss
            trained.append(theirs)
        current = {k: np.mean([t[k] for t in trained], axis=0).astype(np.float32) for k in current}


# --------------------------------------------------------------------------- any task


def regression_data(n: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 0.3).astype(np.float32)
    return x, y


def test_a_custom_task_with_adam_learns_and_replays_exactly():
    task = linear_task()
    x, y = regression_data()
    params = task.init(seed_key(0))
    plan = TrainingPlan(learning_rate=0.1, batch_size=8, local_epochs=5, seed=1)
    trained, loss = train_local(task, params, x, y, plan, node_id="n", round_number=1)
    again, loss_again = train_local(task, params, x, y, plan, node_id="n", round_number=1)
    before = float(task.loss(params, (x, y)))
    assert float(task.loss(trained, (x, y))) < before / 4
    assert loss == loss_again  # the optimizer state starts anew: same inputs, same result
    assert all(
        a.tobytes() == b.tobytes()
        for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(again), strict=True)
    )


def test_a_scalar_loss_on_a_padded_batch_counts_only_the_real_examples():
    """50 examples in one batch of 64: one SGD step on the mean over the 50, computed here
    directly (another summation order, hence a float32 tolerance of a few ulps)."""
    task = linear_task(optimizer=optax.sgd(0.1))
    x, y = regression_data(50)
    params = task.init(seed_key(0))
    trained, loss = train_local(
        task, params, x, y, TrainingPlan(0.1, 64, 1, 0), node_id="n", round_number=1
    )
    value, grads = jax.value_and_grad(task.loss)(params, (x, y))
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    for got, want in zip(jax.tree.leaves(trained), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert loss == pytest.approx(float(value), rel=1e-6)


def test_the_plans_learning_rate_drives_only_an_injected_one():
    x, y = regression_data()
    params = linear_task().init(seed_key(0))

    def trained(optimizer: Any, rate: float) -> np.ndarray:
        task = linear_task(optimizer=optimizer)
        out, _ = train_local(
            task, params, x, y, TrainingPlan(rate, 8, 1, 0), node_id="n", round_number=1
        )
        return np.asarray(out["dense"]["w"])

    injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
    assert not np.array_equal(trained(injected, 0.1), trained(injected, 0.01))
    np.testing.assert_array_equal(trained(injected, 0.01), trained(optax.sgd(0.01), 123.0))
    plain = optax.sgd(0.05)
    np.testing.assert_array_equal(trained(plain, 0.1), trained(plain, 0.01))


def test_a_loss_that_is_not_a_scalar_is_refused_by_name():
    task = linear_task(loss=lambda params, batch: params["dense"]["w"] * 2.0)
    x, y = regression_data()
    with pytest.raises(
        ValueError,
        match=r"^task 'linear': loss must return a scalar \(or one value per example\), it returned shape \(3, 1\) for 8 examples",
    ):
        train_local(
            task,
            task.init(seed_key(0)),
            x,
            y,
            TrainingPlan(0.1, 8, 1, 0),
            node_id="n",
            round_number=1,
        )


def test_one_compilation_per_batch_size_serves_every_round():
    task = linear_task(name="linear-compile")
    x, y = regression_data()
    params = task.init(seed_key(0))
    for round_number in range(1, 6):
        train_local(
            task, params, x, y, TrainingPlan(0.1, 8, 2, 0), node_id="n", round_number=round_number
        )
    epoch = make_epoch(task, 8)
    assert epoch._cache_size() == 1
    train_local(task, params, x, y, TrainingPlan(0.1, 16, 1, 0), node_id="n", round_number=1)
    assert epoch._cache_size() == 1
    assert make_epoch(task, 16)._cache_size() == 1
