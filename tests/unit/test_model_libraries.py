"""examples/flax_task.py and examples/equinox_task.py: tasks written with Flax and Equinox
load as MODULE:ATTRIBUTE from their folder, name their params on the wire by key path, come
back onto their own trees, and train (flax and equinox are in the test extra)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmq.schemas.messages import TrainingPlan
from fedmq.tasks.builtin_data import builtin_data
from fedmq.tasks.layout import layout_of
from fedmq.tasks.naming import flatten_params, tensor_specs, unflatten_params
from fedmq.tasks.registry import load_task
from fedmq.tasks.seeds import seed_key
from fedmq.tasks.training import train_local

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
PLAN = TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=2, seed=0)


@pytest.fixture
def examples_dir(monkeypatch):
    """Run from examples/ as its docstrings say; sys.path and sys.modules as they were."""
    monkeypatch.chdir(EXAMPLES)
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield EXAMPLES
    for name in set(sys.modules) - before:
        if name in {"flax_task", "equinox_task"}:
            del sys.modules[name]


CASES = {
    "flax_task:task": (
        "digits-cnn",
        {
            "Conv_0.bias": (8,),
            "Conv_0.kernel": (3, 3, 1, 8),
            "Conv_1.bias": (16,),
            "Conv_1.kernel": (3, 3, 8, 16),
            "Dense_0.bias": (10,),
            "Dense_0.kernel": (256, 10),
        },
    ),
    "equinox_task:task": (
        "activity-cnn",
        {
            "convs.0.weight": (16, 6, 5),
            "convs.0.bias": (16, 1),
            "convs.1.weight": (32, 16, 5),
            "convs.1.bias": (32, 1),
            "head.weight": (6, 32),
            "head.bias": (6,),
        },
    ),
}


@pytest.mark.parametrize("spec", sorted(CASES))
def test_params_are_named_by_key_path_and_come_back_onto_the_tree(examples_dir, spec):
    task = load_task(spec)
    _, shapes = CASES[spec]
    params = task.init(seed_key(0))
    named = flatten_params(params)
    assert {name: array.shape for name, array in named.items()} == shapes
    assert list(named) == list(shapes)  # the wire order: jax's flattening order
    template = jax.eval_shape(task.init, seed_key(1))
    assert [spec[0] for spec in tensor_specs(template)] == list(shapes)
    back = unflatten_params(template, named)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    for leaf, original in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert np.asarray(leaf).tobytes() == np.asarray(original).tobytes()
    # another seed: other numbers, the same layout
    again = flatten_params(task.init(seed_key(1)))
    assert layout_of(task.name, None, again) == layout_of(task.name, None, named)
    assert any(not np.array_equal(again[name], named[name]) for name in shapes)


def test_the_flax_params_are_the_nested_dict_flax_gives(examples_dir):
    params = load_task("flax_task:task").init(seed_key(0))
    assert isinstance(params, dict) and isinstance(params["Conv_0"], dict)


def test_the_equinox_params_are_the_module_filtered_to_arrays(examples_dir):
    import equinox as eqx

    params = load_task("equinox_task:task").init(seed_key(0))
    equinox_task = sys.modules["equinox_task"]
    assert isinstance(params, equinox_task.ActivityCNN)
    assert params.activation is None  # filtered out; apply combines it back
    model = eqx.combine(params, equinox_task.STATIC)
    assert model.activation is jax.nn.relu


@pytest.mark.parametrize("spec", sorted(CASES))
def test_the_examples_train_and_improve(examples_dir, spec):
    task = load_task(spec)
    assert task.metrics is not None
    train, test = builtin_data(CASES[spec][0]) or (None, None)
    assert train is not None and test is not None
    batch = (jnp.asarray(test.x), jnp.asarray(test.y))
    params = task.init(seed_key(0))
    before = float(task.metrics(params, batch)["accuracy"])
    trained, _ = train_local(
        task, params, train.x[::3], train.y[::3], PLAN, node_id="n", round_number=1
    )
    after = float(task.metrics(trained, batch)["accuracy"])
    assert after > before + 0.2, (before, after)
