"""Topic layout: building, parsing (node_of) and id validation."""

import dataclasses

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedmq.schemas import Topics, validate_name

VALID_NAME = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
BAD_NAMES = [
    "",
    "a/b",
    "+",
    "#",
    "node+",
    "node#",
    "/",
    "x" * 65,
    "a b",
    "tab\t",
    "fed\n",  # a trailing newline would slip past re.match(...$)
    "héllo",
    "ｆｕｌｌ",  # noqa: RUF001 - full-width letters are not ASCII letters
    "nul\0",
]


def test_topic_names_of_a_federation():
    topics = Topics("fed-1")
    assert topics.prefix == "fedmq/fed-1"
    assert topics.global_model == "fedmq/fed-1/global"
    assert topics.metrics == "fedmq/fed-1/metrics"
    assert topics.server == "fedmq/fed-1/server"
    assert topics.update("node.7") == "fedmq/fed-1/updates/node.7"
    assert topics.status("node_7") == "fedmq/fed-1/status/node_7"
    assert topics.all_updates == "fedmq/fed-1/updates/+"
    assert topics.all_status == "fedmq/fed-1/status/+"


def test_topics_is_frozen():
    topics = Topics("fed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        topics.federation = "other"  # type: ignore[misc]


@pytest.mark.parametrize("federation", BAD_NAMES)
def test_invalid_federation_id_is_refused(federation):
    with pytest.raises(ValueError, match="federation id"):
        Topics(federation)


@pytest.mark.parametrize("federation", [None, 5, b"fed"])
def test_non_string_federation_id_is_refused(federation):
    with pytest.raises(ValueError, match="federation id"):
        Topics(federation)  # type: ignore[arg-type]


@pytest.mark.parametrize("node_id", BAD_NAMES)
@pytest.mark.parametrize("build", ["update", "status"])
def test_invalid_node_id_is_refused_when_building_a_topic(build, node_id):
    with pytest.raises(ValueError, match="node id"):
        getattr(Topics("fed"), build)(node_id)


@pytest.mark.parametrize("name", ["a", "A-z_0.9", "x" * 64, "-", ".", "node-01"])
def test_validate_name_returns_a_valid_name(name):
    assert validate_name("node id", name) is name


@pytest.mark.parametrize("name", BAD_NAMES)
def test_validate_name_error_names_the_kind_and_the_value(name):
    with pytest.raises(ValueError) as info:
        validate_name("node id", name)
    assert "node id" in str(info.value)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("kind", ["updates", "status"])
def test_node_of_reads_the_node_id(kind):
    assert Topics("fed").node_of(f"fedmq/fed/{kind}/node-01") == "node-01"
    assert Topics("fed").node_of(f"fedmq/fed/{kind}/{'n' * 64}") == "n" * 64


@pytest.mark.parametrize(
    "topic",
    [
        "fedmq/fed/global",
        "fedmq/fed/metrics",
        "fedmq/fed/server",
        "fedmq/fed/metrics/node-01",  # right shape, wrong kind
        "fedmq/fed/update/node-01",  # singular
        "fedmq/other/updates/node-01",  # another federation
        "fedmq/fed2/updates/node-01",  # a federation whose name starts like ours
        "fedmq/fe/updates/node-01",
        "other/fed/updates/node-01",  # another root
        "FEDMQ/fed/updates/node-01",
        "/fedmq/fed/updates/node-01",  # leading slash adds an empty level
        "fedmq/fed/updates/node-01/",  # trailing slash too
        "fedmq/fed/updates/node-01/extra",
        "fedmq/fed/updates",
        "fedmq/fed/updates/",
        "fedmq/fed/updates/+",
        "fedmq/fed/updates/#",
        "fedmq/fed/status/" + "n" * 65,
        "fedmq/fed/status/a b",
        "fedmq/fed/status/node\n",
        "fedmq//updates/node-01",
        "",
    ],
)
def test_node_of_refuses_other_topics(topic):
    assert Topics("fed").node_of(topic) is None


@given(federation=VALID_NAME, node_id=VALID_NAME)
@settings(max_examples=200, deadline=None)
def test_node_of_inverts_update_and_status(federation, node_id):
    topics = Topics(federation)
    assert topics.node_of(topics.update(node_id)) == node_id
    assert topics.node_of(topics.status(node_id)) == node_id
    assert topics.node_of(topics.global_model) is None


@given(federation=VALID_NAME, node_id=VALID_NAME, other=VALID_NAME)
@settings(max_examples=200, deadline=None)
def test_node_of_ignores_topics_of_another_federation(federation, node_id, other):
    assume(other != federation)
    assert Topics(federation).node_of(Topics(other).update(node_id)) is None


@given(text=st.text(max_size=80))
@settings(max_examples=500, deadline=None)
def test_validate_name_accepts_exactly_safe_topic_levels(text):
    try:
        assert validate_name("node id", text) == text
    except ValueError:
        accepted = False
    else:
        accepted = True
    safe = 1 <= len(text) <= 64 and text.isascii() and all(c.isalnum() or c in "_.-" for c in text)
    assert accepted == safe


LEVEL = st.sampled_from(["fedmq", "fed", "updates", "status", "n-1", "+", "#", "", "x" * 65])
TOPIC = st.lists(LEVEL | st.text(max_size=6), max_size=6).map("/".join)


@given(topic=TOPIC)
@settings(max_examples=500, deadline=None)
def test_node_of_never_raises_and_only_returns_valid_ids(topic):
    node = Topics("fed").node_of(topic)
    if node is not None:
        assert validate_name("node id", node) == node
        assert topic in (f"fedmq/fed/updates/{node}", f"fedmq/fed/status/{node}")
