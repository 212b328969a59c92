"""Messages the broker dropped during each model version, from its ``$SYS`` counter.

The MQTT edge (``aggregator.app``) feeds the readings in; the aggregator ``take``s the
count when it makes a version (``metrics.broker_dropped``). Pure: no MQTT, no clock.
"""


class BrokerDrops:
    """The broker's ``$SYS/.../messages/dropped`` counter, turned into counts per version."""

    def __init__(self) -> None:
        self._reading: int | None = None  # latest counter seen
        self._count: int | None = None  # since the last take; None until the broker told us
        self._still = False  # no reading, but the counter has not moved for 60 s

    def note(self, count: int) -> None:
        """A reading of the counter, whenever the broker publishes it.

        The counter starts again from 0 when the broker restarts: a reading below the
        last one counts in full. The first reading after ``note_unchanged`` is a change
        from a value we never saw: it counts as 1 (at least one dropped)."""
        last, self._reading = self._reading, count
        if last is None:  # first reading: count from here
            self._count = (self._count or 0) + int(self._still)
            self._still = False
            return
        self._count = (self._count or 0) + (count - last if count >= last else count)

    def note_unchanged(self) -> None:
        """The broker publishes $SYS, yet sent no dropped counter with our subscription.

        mosquitto publishes the counter retained with a 60 s expiry, and only when it
        changes (schemas.sys_topics): it has not changed for a minute, so nothing was
        dropped since and the versions count 0 from here. A no-op once a reading is known."""
        if self._reading is None:
            self._still = True
            self._count = self._count or 0

    def take(self) -> int | None:
        """Messages dropped since the last call (None: the broker has not told us), and
        start counting again."""
        count = self._count
        known = self._reading is not None or self._still
        self._count = 0 if known else None
        return count
