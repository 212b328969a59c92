"""The decoding code printed in docs/PROTOCOL.md (sections 12.8 and 12.9) is run here
against the reference decoder, so a third party copying it gets the same numbers."""

import math
import re
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from fedmq.compression import parse_spec
from fedmq.compression.transforms import error_feedback_init
from fedmq.schemas import decode_update, encode
from fedmq.schemas.encodings import to_dense
from tests.unit.test_compression import make_update

PROTOCOL = Path(__file__).resolve().parents[2] / "docs" / "PROTOCOL.md"
LAYOUT = {"l0.w": (7, 40), "l0.b": (40,), "l1.w": (40, 3), "l1.b": (3,), "one": ()}


def section(number: str) -> str:
    text = PROTOCOL.read_text()
    start = text.index(f"\n### {number} ")
    end = min(text.find(mark, start + 1) % (len(text) + 1) for mark in ("\n### ", "\n## "))
    return text[start:end]


def documented_decoder() -> dict[str, Any]:
    """The Python blocks of 12.8 and 12.9, executed in one namespace, as a reader would."""
    namespace: dict[str, Any] = {}
    for number in ("12.8", "12.9"):
        blocks = re.findall(r"```python\n(.*?)```", section(number), flags=re.S)
        assert blocks, f"section {number} has no Python block"
        for block in blocks:
            exec(compile(block, f"PROTOCOL.md {number}", "exec"), namespace)
    return namespace


DOC = documented_decoder()
SPECS = [
    "dense", "fp16", "int8+zlib", "int4+ef", "sign", "topk:0.1", "topk:0.05+int8+ef",
    "topk:0.2+sign+ef+zlib", "topk:0.1+flat", "topk:0.1+fp16+flat", "topk:0.05+int8+ef+flat",
    "topk:0.3+int4+ef+flat", "topk:0.035+sign+ef+flat", "topk:0.035+sign+ef+flat+zlib",
    "topk:1+sign+flat", "topk:0.000001+int4+flat",
]  # fmt: skip


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_documented_decoder_gives_the_reference_arrays_bit_for_bit(spec, seed):
    rng = np.random.default_rng(seed)
    delta = {
        name: np.asarray(rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 1), np.float32)
        for name, shape in LAYOUT.items()
    }
    pipeline = parse_spec(spec)
    encoded, _ = pipeline.compress(delta, rng, error_feedback_init(LAYOUT))
    payload = encode(make_update(encoded, str(pipeline)))
    reference = decode_update(payload, layout=LAYOUT).delta

    update = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    wire = DOC["delta_of"](update)
    if pipeline.framing.flat:
        layout = {name: list(shape) for name, shape in LAYOUT.items()}
        arrays = DOC["flat_of"](wire, layout)
    else:
        arrays = {name: DOC["dense_of"](t) for name, t in wire.items()}

    assert list(arrays) == list(LAYOUT)
    for name in LAYOUT:
        want = to_dense(reference[name])
        assert arrays[name].dtype == np.float32 and arrays[name].shape == LAYOUT[name]
        assert np.array_equal(arrays[name].view(np.uint32), want.view(np.uint32)), name


def test_the_documented_flat_decoder_reads_the_golden_sample():
    golden = PROTOCOL.parent.parent / "tests" / "golden" / "update_flat_sign.msgpack"
    update = msgpack.unpackb(golden.read_bytes(), raw=False, strict_map_key=True)
    layout = {"l0.w": [4, 3], "l0.b": [3], "l1.w": [3, 2], "l1.b": [2]}
    arrays = DOC["flat_of"](DOC["delta_of"](update), layout)
    s = np.float32(0.1875)
    assert arrays["l0.w"].reshape(-1).tolist() == [s] + [0] * 10 + [-s]
    assert arrays["l0.b"].tolist() == [0, s, 0]
    assert arrays["l1.w"].reshape(-1).tolist() == [0, 0, 0, 0, 0, -s]
    assert arrays["l1.b"].tolist() == [s, 0]


def test_the_documented_elias_fano_example():
    """12.9: positions 3, 9, 10, 30 of 40 with L = 2 are upper 19 04, lower a7."""
    from fedmq.schemas.eliasfano import EliasFano, decode_positions, encode_positions

    assert encode_positions(np.array([3, 9, 10, 30]), 40) == EliasFano(2, b"\x19\x04", b"\xa7")
    assert decode_positions(EliasFano(2, b"\x19\x04", b"\xa7"), 4, 40, "d").tolist() == [
        3,
        9,
        10,
        30,
    ]
    assert "`19 04`" in section("12.9") and "the byte `a7`" in section("12.9")


def test_the_flat_worked_example_prints_the_golden_samples_delta():
    """12.9's hex dump is the golden sample's `delta` map, and keeps what its SPEC keeps."""
    golden = PROTOCOL.parent.parent / "tests" / "golden" / "update_flat_sign.msgpack"
    update = msgpack.unpackb(golden.read_bytes(), raw=False, strict_map_key=True)
    assert update["compression"] == "topk:0.1+sign+ef+flat"
    packed = msgpack.packb(update["delta"], use_bin_type=True).hex(" ")
    blocks = [" ".join(block.split()) for block in section("12.9").split("```")[1::2]]
    assert packed in blocks
    sizes = [int(np.prod(shape)) for shape in ([4, 3], [3], [3, 2], [2])]
    assert update["delta"]["count"] == sum(math.ceil(0.1 * n) for n in sizes)


def field_table(number: str) -> list[tuple[str, str]]:
    """(field, nullable) of the first table of a section 8 subsection, in its order."""
    rows = []
    for line in section(number).split("\n\n| Field |", 1)[1].split("\n\n", 1)[0].splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[0].startswith("`"):
            rows.append((cells[0].strip("`"), cells[2]))
    return rows


KINDS = {"8.1": "GLOBAL", "8.2": "UPDATE", "8.3": "STATUS", "8.4": "SERVER", "8.5": "METRICS"}
KINDS["8.6"] = "GLOBAL_DELTA"


@pytest.mark.parametrize("number", sorted(KINDS))
def test_the_message_tables_are_the_declarations(number):
    """Section 8's tables list each message's fields in the declared (wire) order, with
    the declared nullability, and `plan.<key>` rows are the plan's: a field added to one
    side only fails here."""
    from fedmq.schemas import messages

    kind = getattr(messages, KINDS[number])
    assert section(number).startswith(f"\n### {number} `{kind.type}` ")
    rows = [(field, nullable.startswith("yes")) for field, nullable in field_table(number)]
    assert [row for row in rows if "." not in row[0]] == [(f.key, f.nullable) for f in kind.fields]
    plan = [(field.removeprefix("plan."), nullable) for field, nullable in rows if "." in field]
    if number == "8.1":  # the plan's keys; 8.6 refers to 8.1 for them
        assert plan == [(f.key, f.nullable) for f in messages.PLAN.fields]


def test_the_documented_check_order_of_an_update_is_the_declared_one():
    from fedmq.schemas.messages import UPDATE

    assert "then\n`compression` and `train_seconds`, then the other fields" in section("8.2")
    assert UPDATE.check_order[:2] == ("compression", "train_seconds")
    assert UPDATE.check_order[-1] == "delta"


def test_a_declaration_must_name_every_field_of_its_dataclass():
    from fedmq.schemas.messages import PLAN, Field, Kind, TrainingPlan

    with pytest.raises(TypeError, match="TrainingPlan"):
        Kind(None, TrainingPlan, PLAN.fields[:-1])
    with pytest.raises(TypeError, match="TrainingPlan"):
        Kind(None, TrainingPlan, (*PLAN.fields, Field("momentum", None)))
