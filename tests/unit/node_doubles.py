"""Stand-ins for a node's MQTT edge in pure unit tests of ``fedmq.node.app.Node``: a client
that takes (un)subscriptions and an outbox that records what the node publishes."""


class FakeClient:
    def subscribe(self, *_args: object, **_kwargs: object) -> None: ...

    def unsubscribe(self, *_args: object) -> None: ...


class RecordingOutbox:
    def __init__(self) -> None:
        self.client = FakeClient()
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.sent.append((topic, payload))

    def on(self, topic: str) -> list[bytes]:
        """The payloads published on ``topic``, in order."""
        return [payload for sent_to, payload in self.sent if sent_to == topic]
