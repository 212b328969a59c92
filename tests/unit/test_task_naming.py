"""Pytree naming beyond test_tasks.py: Equinox modules as eqx.nn builds them, None leaves
kept through a round trip, names that would collide or would hold the wire's separator
``.``, and leaves that cannot travel refused in one line that says what to do."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedmq.tasks.naming import NamingError, flatten_params, tensor_specs, unflatten_params


def f32(*shape: int) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)


def one_line_refusal(call: Any) -> str:
    with pytest.raises(NamingError) as error:
        call()
    text = str(error.value)
    assert "\n" not in text
    return text


def test_an_equinox_mlp_filtered_to_arrays_round_trips_by_its_fields():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    flat = flatten_params(params)
    assert {name: a.shape for name, a in flat.items()} == {
        "layers.0.weight": (8, 4),
        "layers.0.bias": (8,),
        "layers.1.weight": (2, 8),
        "layers.1.bias": (2,),
    }
    back = unflatten_params(params, {name: a + 1 for name, a in flat.items()})
    rebuilt = eqx.combine(back, static)
    np.testing.assert_array_equal(rebuilt.layers[1].bias, np.asarray(model.layers[1].bias) + 1)
    assert rebuilt(jnp.ones(4)).shape == (2,)


def test_an_unfiltered_equinox_module_is_refused_with_the_filter_to_use():
    eqx = pytest.importorskip("equinox")
    model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
    text = one_line_refusal(lambda: flatten_params(model))
    assert text.startswith("params leaf 'activation' is a ")
    assert "eqx.filter(m, eqx.is_array)" in text


def test_none_leaves_are_not_tensors_and_come_back_as_none():
    tree = {"a": None, "layers": [f32(2), None, (None, f32(1))], "w": f32(2, 2)}
    flat = flatten_params(tree)
    assert list(flat) == ["layers.0", "layers.2.1", "w"]
    back = unflatten_params(tree, {name: a * 2 for name, a in flat.items()})
    assert back["a"] is None and back["layers"][1] is None and back["layers"][2][0] is None
    np.testing.assert_array_equal(back["layers"][2][1], f32(1) * 2)


def test_nested_dicts_tuples_and_lists_keep_their_containers():
    tree = {"enc": ({"k": f32(2)}, [f32(3), f32(1)]), "dec": {"0": f32(1), "1": {"w": f32(2)}}}
    flat = flatten_params(tree)
    assert list(flat) == ["dec.0", "dec.1.w", "enc.0.k", "enc.1.0", "enc.1.1"]
    back = unflatten_params(tree, flat)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    assert isinstance(back["enc"], tuple) and isinstance(back["enc"][1], list)


@pytest.mark.parametrize(
    ("tree", "message"),
    [
        # the separator inside a key would make 'a.b' two parts of another leaf's name
        ({"a.b": f32(1), "a": {"b": f32(1)}}, "params at ['a.b']: key 'a.b' cannot name a tensor"),
        ({"w.": f32(1)}, "key 'w.' cannot name a tensor"),
        ({".w": f32(1)}, "key '.w' cannot name a tensor"),
        ({"layer 1": f32(1)}, "key 'layer 1' cannot name a tensor"),
        ({"é": f32(1)}, "key 'é' cannot name a tensor"),
        ({(1, 2): f32(1)}, "has a dict key (1, 2) of type tuple: use str keys (or ints)"),
        ({1.5: f32(1)}, "has a dict key 1.5 of type float: use str keys (or ints)"),
        ({True: f32(1)}, "has a dict key True of type bool: use str keys (or ints)"),
    ],
)
def test_keys_that_would_break_or_collide_on_the_wire_are_refused(tree, message):
    assert message in one_line_refusal(lambda: flatten_params(tree))


def test_an_int_key_and_its_str_spelling_in_one_dict_are_refused_in_one_line():
    """Both would be named '0'; jax cannot even sort them. The line says what to change."""
    text = one_line_refusal(lambda: flatten_params({"layers": {0: f32(1), "0": f32(1)}}))
    assert "str and int" in text


def test_an_attribute_holding_the_separator_is_refused():
    class Node:
        pass

    jax.tree_util.register_pytree_with_keys(
        Node,
        lambda _: ([(jax.tree_util.GetAttrKey("kernel.T"), f32(2))], None),
        lambda _, children: Node(),
    )
    text = one_line_refusal(lambda: flatten_params({"dense": Node()}))
    assert "params at ['dense']['kernel.T']: key 'kernel.T' cannot name a tensor" in text


@pytest.mark.parametrize(
    ("leaf", "dtype"),
    [
        (np.ones(2, np.int32), "int32"),
        (jnp.ones(2, jnp.int32), "int32"),
        (np.ones(2, np.int64), "int64"),
        (np.ones(2, bool), "bool"),
        (np.ones(2, np.float64), "float64"),
        (jnp.ones(2, jnp.bfloat16), "bfloat16"),
        (np.ones(2, np.complex64), "complex64"),
        (np.ones((), np.uint8), "uint8"),
    ],
)
def test_non_float_leaves_are_refused_in_one_line_with_the_cast(leaf, dtype):
    text = one_line_refusal(lambda: flatten_params({"w": f32(2), "step": leaf}))
    assert text == (
        f"params leaf 'step' is {dtype}; params must be float32 (or float16) arrays: cast it, "
        "e.g. .astype(jnp.float32)"
    )
    # the node's layout comes from jax.eval_shape: the same refusal without data
    shapes = {"w": jax.ShapeDtypeStruct((2,), jnp.float32), "step": jax.ShapeDtypeStruct(
        leaf.shape, leaf.dtype)}  # fmt: skip
    assert one_line_refusal(lambda: tensor_specs(shapes)) == text


@pytest.mark.parametrize(
    ("leaf", "kind"), [(3, "an int"), (3.0, "a float"), ("w", "a str"), (jnp.tanh, "a ")]
)
def test_python_values_are_not_arrays(leaf, kind):
    text = one_line_refusal(lambda: flatten_params({"w": f32(2), "x": leaf}))
    assert text.startswith(f"params leaf 'x' is {kind}")
    assert text.endswith("(filter an Equinox module with eqx.filter(m, eqx.is_array))")


def test_float16_leaves_keep_their_dtype_both_ways():
    tree = {"w": np.ones(3, np.float16), "b": f32(1)}
    assert tensor_specs(tree) == [
        ("b", (1,), np.dtype("float32")),
        ("w", (3,), np.dtype("float16")),
    ]
    back = unflatten_params(tree, flatten_params(tree))
    assert back["w"].dtype == np.float16
