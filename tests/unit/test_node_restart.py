"""A restarted node resends the update it kept on disk instead of training the round
again, however the model reaches it (a retained copy, or live from a new aggregator)."""

from pathlib import Path

import numpy as np
import pytest
import structlog

from fedmq.datasets import Dataset
from fedmq.models import get_model
from fedmq.mqtt import BrokerAddress
from fedmq.node import last_update, residual
from fedmq.node.app import Node
from fedmq.node.settings import NodeSettings
from fedmq.schemas import GlobalModel, Topics, TrainingPlan, encode, model_id_of

from .node_doubles import RecordingOutbox

FEDERATION = "unit-node"
TOPICS = Topics(FEDERATION)


def global_model(round: int) -> GlobalModel:
    params = get_model("digits-mlp").init(0)
    return GlobalModel(
        federation=FEDERATION, round=round, model="digits-mlp", model_id=model_id_of(params),
        params=params, plan=TrainingPlan(learning_rate=0.1, batch_size=16, local_epochs=1, seed=0),
    )  # fmt: skip


def restarted_node(tmp_path: Path, saved_round: int) -> tuple[Node, RecordingOutbox]:
    model = global_model(saved_round)
    last_update.save(
        tmp_path / "last_update.msgpack",
        last_update.LastUpdate(saved_round, model.model_id, b"the saved update"),
    )
    config = NodeSettings(
        broker=BrokerAddress(), federation=FEDERATION, node_id="pi-1", state_dir=tmp_path
    )
    data = Dataset(np.zeros((4, 64), np.float32), np.zeros(4, np.int64))
    outbox = RecordingOutbox()
    return Node(config, data, outbox), outbox  # type: ignore[arg-type]


@pytest.mark.parametrize("retained", [True, False])
def test_the_saved_update_is_resent_on_first_sight(tmp_path: Path, retained: bool) -> None:
    node, outbox = restarted_node(tmp_path, saved_round=3)
    with structlog.testing.capture_logs():
        node.on_global(encode(global_model(3)), retained=retained)
    updates = [p for t, p in outbox.sent if t == TOPICS.update("pi-1")]
    assert updates == [b"the saved update"]
    assert node.last_trained == (3, global_model(3).model_id)


def residual_of(round: int) -> residual.SavedResidual:
    return residual.SavedResidual(round, "topk:0.1+ef", {"w": np.full(3, round, np.float32)})


@pytest.mark.parametrize(
    ("on_record", "pending", "kept"),
    [
        (2, 2, 2),  # stopped between recording the update and promoting its residual
        (1, 2, 1),  # stopped before round 2's update went on record: round 2 again
        (None, 1, 0),  # nothing on record: nothing pending survives
    ],
)
def test_settle_keeps_the_residual_that_goes_with_the_update_on_record(
    tmp_path: Path, on_record: int | None, pending: int, kept: int
) -> None:
    current, waiting = tmp_path / "residual.npz", tmp_path / "residual.next.npz"
    residual.save(
        current, residual_of(0 if on_record is None else on_record - (pending == on_record))
    )
    residual.save(waiting, residual_of(pending))
    residual.settle(waiting, current, on_record)
    assert not waiting.exists()
    loaded = residual.load(current)
    assert loaded is not None and loaded.round == kept
