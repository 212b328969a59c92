"""What the aggregator publishes: each model version's global model (retained, in full,
and its compact XOR form on ``global/delta``), the server status and the metrics.

Keeps the open version's model as published, for ``republish`` after a reconnect or a
restart and for the checkpoint. Publishes through the ``publish`` callable it is given
(the MQTT edge chooses each topic's QoS).
"""

from collections.abc import Callable
from typing import Any

from fedmq.schemas import (
    GlobalModel,
    ServerStatus,
    Topics,
    encode,
    make_compressed_global_delta,
    make_global_delta,
    make_init_global_delta,
)
from fedmq.schemas.tensors import Params

Publish = Callable[[str, bytes, bool], None]  # (topic, payload, retain), QoS 1
# Least time between two server status messages sent because updates arrived.
STATUS_INTERVAL = 0.25


class Publisher:
    def __init__(
        self,
        topics: Topics,
        publish: Publish,
        clock: Callable[[], float],
        *,
        retain_compact: bool = False,
    ) -> None:
        """``retain_compact``: the compact form is retained too (compressed downlink)."""
        self.topics = topics
        self._retain_compact = retain_compact
        self._publish = publish
        self._clock = clock
        self.global_payload = b""  # the open version's GlobalModel message
        self.delta_payload: bytes | None = None  # its form on global/delta
        self.delta_bytes: int | None = None  # size of the XOR form (None: no previous model)
        self._status_published_at = float("-inf")

    @property
    def global_bytes(self) -> int:
        return len(self.global_payload)

    def prepare_model(
        self,
        message: GlobalModel,
        previous: tuple[Params, str] | None,
        *,
        compressed: tuple[str | None, Any] = (None, None),
        init_seed: int | None = None,
    ) -> None:
        """Encode the model opening a version and, when the one before is known (its params,
        its id), its compact form for nodes that hold that one: the XOR form, or with
        ``compressed`` (SPEC, delta as it travels) the compressed one; nothing is sent yet
        (the checkpoint goes first). With no model before and ``init_seed`` (a run's
        first model, the task's initial parameters from that seed), the compact form
        carries the seed only; without it, the full message."""
        self.global_payload = encode(message)
        spec, wire = compressed
        if previous is not None and spec is not None:
            compact = encode(make_compressed_global_delta(message, previous[1], spec, wire))
            self.delta_bytes = len(compact)
        elif previous is not None:
            compact = encode(make_global_delta(previous[0], message, previous[1]))
            self.delta_bytes = len(compact)
        elif init_seed is not None:  # nodes build the initial model from the seed
            compact = encode(make_init_global_delta(message, init_seed))
            self.delta_bytes = len(compact)
        else:  # nothing to XOR against: nodes following compact forms get it whole
            compact = self.global_payload
            self.delta_bytes = None
        self.delta_payload = compact

    def restore(
        self, global_payload: bytes, delta_payload: bytes | None, delta_bytes: int | None
    ) -> None:
        """The open version's model as a checkpoint kept it."""
        self.global_payload = global_payload
        self.delta_payload = delta_payload
        self.delta_bytes = delta_bytes

    def model(self) -> None:
        """The open version's model: in full (retained), then its compact form. In this
        order a node never misses it: one whose fetch of the full model comes before the
        full one is published was already subscribed to the compact forms."""
        self._publish(self.topics.global_model, self.global_payload, True)
        if self.delta_payload is not None:  # nodes following compact forms see this
            self._publish(self.topics.global_delta, self.delta_payload, self._retain_compact)

    def status(self, status: ServerStatus) -> None:
        self._status_published_at = self._clock()
        self._publish(self.topics.server, encode(status), True)

    def status_due(self) -> bool:
        """Whether progress may be reported again (``STATUS_INTERVAL`` since the last)."""
        return self._clock() - self._status_published_at >= STATUS_INTERVAL

    def metrics(self, payload: bytes) -> None:
        self._publish(self.topics.metrics, payload, False)
