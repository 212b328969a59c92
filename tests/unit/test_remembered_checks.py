"""The intake's string checks remember their answers (schemas.topics.is_name, the model id,
SPEC and layout-name checks in schemas.messages): a value that is wrong is still refused,
with the same reason and detail, after a good one was remembered, and the memory stays
bounded whatever a node sends. Also the shortcuts beside them: ``Kind.make`` gives what
``cls(**values)`` gives, ``Held``'s ``in`` answers as Mapping's, and the training loss's
and SPEC's quick paths agree with the checks they skip."""

import math
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedmq.aggregator.combine import Held
from fedmq.aggregator.robust import Rule
from fedmq.schemas import NodeUpdate, SchemaError, decode_update, encode
from fedmq.schemas import messages as m
from fedmq.schemas import topics as t

MODEL_ID = "0123456789abcdef0123456789abcdef"
LAYOUT = {"w": (2, 3), "b": (3,)}


def update_wire(**changes: Any) -> dict[str, Any]:
    update = NodeUpdate(
        federation="fed",
        node_id="node-1",
        round=2,
        base_model_id=MODEL_ID,
        num_examples=100,
        train_loss=0.75,
        train_seconds=2.5,
        delta={
            "w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3),
            "b": np.array([0.0, 0.125, -0.125], np.float32),
        },
        compression="dense",
        sent_at=1_700_000_003.25,
    )
    obj = msgpack.unpackb(encode(update), raw=False)
    obj.update(changes)
    return obj


def payload(**changes: Any) -> bytes:
    return msgpack.packb(update_wire(**changes), use_bin_type=True)


def refusal(data: bytes, **options: Any) -> tuple[str, str]:
    with pytest.raises(SchemaError) as info:
        decode_update(data, **options)
    return info.value.reason, info.value.detail


def fresh_refusal(data: bytes, **options: Any) -> tuple[str, str]:
    """The refusal with every remembered answer forgotten first."""
    t._is_short_name.cache_clear()
    m._is_model_id.cache_clear()
    m._is_spec.cache_clear()
    m._layout_names_ok.cache_clear()
    return refusal(data, **options)


BAD = {
    "node_id slash": {"node_id": "node/1"},
    "node_id empty": {"node_id": ""},
    "node_id 65": {"node_id": "n" * 65},
    "node_id not str": {"node_id": 7},
    "federation plus": {"federation": "fed+"},
    "federation long": {"federation": "f" * 1000},
    "model id upper": {"base_model_id": MODEL_ID.upper()},
    "model id short": {"base_model_id": MODEL_ID[:31]},
    "model id long": {"base_model_id": MODEL_ID + "0"},
    "model id not str": {"base_model_id": b"0" * 32},
    "spec upper": {"compression": "Dense"},
    "spec long": {"compression": "a" * 65},
    "spec empty": {"compression": ""},
    "spec missing": {"compression": None},
    "loss nan": {"train_loss": math.nan},
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("layout", [None, LAYOUT])
def test_a_bad_value_is_refused_as_before_after_good_ones_were_remembered(case, layout):
    changes = dict(BAD[case])
    if changes.get("compression", "") is None:
        changes = {}
        obj = update_wire()
        del obj["compression"]
        bad = msgpack.packb(obj, use_bin_type=True)
    else:
        bad = payload(**changes)
    first = fresh_refusal(bad, layout=layout)
    decode_update(payload(), layout=layout)  # remembers the good answers
    assert refusal(bad, layout=layout) == first
    assert refusal(bad, layout=layout) == first  # and the bad one, if remembered


def test_a_longer_id_of_good_characters_is_refused_and_not_remembered():
    before = t._is_short_name.cache_info().currsize
    assert not t.is_name("a" * 65)
    assert t._is_short_name.cache_info().currsize == before
    assert t.is_name("a" * 64)


def test_names_that_are_not_the_layout_are_checked_and_refused_as_before():
    decode_update(payload(), layout=LAYOUT)  # the layout's names remembered as good
    wire = update_wire()
    bad_name = dict(wire, delta={"w": wire["delta"]["w"], "b/..": wire["delta"]["b"]})
    reordered = dict(wire, delta={"b": wire["delta"]["b"], "w": wire["delta"]["w"]})
    assert refusal(msgpack.packb(reordered), layout=LAYOUT)[0] == "layout_mismatch"
    bad = msgpack.packb(dict(bad_name, delta={"w": wire["delta"]["w"], "b*": wire["delta"]["b"]}))
    assert refusal(bad, layout=LAYOUT) == fresh_refusal(bad, layout=LAYOUT)
    assert refusal(bad, layout=LAYOUT)[0] == "bad_field"


def test_a_layout_whose_own_names_fail_the_check_is_checked_every_time():
    layout = {"w*": (2, 3), "b": (3,)}
    wire = update_wire()
    data = msgpack.packb(dict(wire, delta={"w*": wire["delta"]["w"], "b": wire["delta"]["b"]}))
    assert refusal(data, layout=layout)[0] == "bad_field"
    assert refusal(data, layout=layout)[0] == "bad_field"


def test_the_memory_is_bounded_whatever_ids_come():
    t._is_short_name.cache_clear()
    for i in range(t.NAMES_REMEMBERED + 500):
        t.is_name(f"node-{i}")
        t.is_name(f"bad/{i}")
    info = t._is_short_name.cache_info()
    assert info.maxsize == t.NAMES_REMEMBERED
    assert info.currsize == t.NAMES_REMEMBERED
    for check in (m._is_model_id, m._is_spec, m._layout_names_ok):
        assert check.cache_info().maxsize is not None


@given(st.text(max_size=70))
def test_is_name_answers_as_the_regex(value):
    assert t.is_name(value) == (t._NAME.fullmatch(value) is not None)


def test_validate_name_still_words_its_error():
    with pytest.raises(ValueError, match="node id 'a/b' is not valid"):
        t.validate_name("node id", "a/b")
    with pytest.raises(ValueError, match="is not valid"):
        t.validate_name("node id", 3)  # type: ignore[arg-type]


def test_make_is_the_dataclass_built_with_its_init():
    decoded = decode_update(payload(), layout=LAYOUT)
    fields = {f: getattr(decoded, f) for f in m.UPDATE.keys}
    built = NodeUpdate(**fields)
    assert type(decoded) is NodeUpdate
    assert decoded == built
    assert repr(decoded) == repr(built)
    with pytest.raises(AttributeError):
        decoded.round = 3  # type: ignore[misc]
    assert m.UPDATE._direct
    assert not m.METRICS._direct  # has extra: built by its __init__


@given(
    st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from([m.MAX_LOSS, -m.MAX_LOSS, 0.0, -0.0, 1e300, -1e300]),
        st.integers(min_value=-(10**15), max_value=10**15),
    )
)
def test_the_training_loss_saturates_as_before(value):
    def before(obj: dict[str, Any], key: str, limit: float = m.MAX_LOSS) -> float:
        v = m._float(obj, key)
        return max(-limit, min(limit, v))

    obj = {"train_loss": value}
    try:
        expected: Any = before(obj, "train_loss")
    except SchemaError as error:
        expected = (error.reason, error.detail)
    try:
        got: Any = m._saturated(obj, "train_loss")
    except SchemaError as error:
        got = (error.reason, error.detail)
    assert got == expected
    if isinstance(got, float):
        assert math.copysign(1, got) == math.copysign(1, expected)


@pytest.mark.parametrize(
    "obj", [{}, {"compression": None}, {"compression": "topk:0.01"}, {"compression": "X"}]
)
def test_a_plan_spec_with_its_default_reads_as_before(obj):
    def outcome(default: str | None) -> Any:
        try:
            return m._spec(obj, "compression", default)
        except SchemaError as error:
            return (error.reason, error.detail)

    m._is_spec.cache_clear()
    first = outcome("dense"), outcome(None)
    assert (outcome("dense"), outcome(None)) == first
    if "compression" not in obj:
        assert first == ("dense", ("bad_field", "compression is missing"))


def test_held_answers_in_as_a_mapping_does():
    held = Held(Rule(), {"w": (2,)})
    update = NodeUpdate(
        federation="fed",
        node_id="a",
        round=1,
        base_model_id=MODEL_ID,
        num_examples=1,
        train_loss=0.0,
        train_seconds=0.0,
        delta={"w": np.zeros(2, np.float32)},
    )
    held.add("a", update)
    assert "a" in held
    assert "b" not in held
    assert 3 not in held
    assert list(held) == ["a"]
