"""The one error type every decoder raises."""


class SchemaError(ValueError):
    """A message that does not follow the protocol.

    ``reason`` is a short stable slug (counted in round metrics, e.g. ``bad_field``);
    ``str(error)`` says in words what was wrong and where.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
