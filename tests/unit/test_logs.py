"""The logging set-up of the entry points (fedmq.logs)."""

import json
import warnings
from collections.abc import Iterator

import pytest
import structlog

from fedmq import logs


@pytest.fixture(autouse=True)
def reset_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()


def log_a_failure() -> None:
    try:
        raise ValueError("the cause")
    except ValueError:
        structlog.get_logger().exception("thing.failed", node="pi-01")


def test_the_console_renders_an_exception_itself(capsys: pytest.CaptureFixture[str]):
    # structlog's ConsoleRenderer formats exc_info itself (since 21.2, with rich or
    # better-exceptions when installed): format_exc_info before it must not be in the chain.
    logs.configure(json=False)
    assert structlog.processors.format_exc_info not in structlog.get_config()["processors"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        log_a_failure()
    text = capsys.readouterr().err
    assert "thing.failed" in text and "ValueError: the cause" in text
    assert "Traceback" in text


def test_json_lines_carry_the_traceback_as_a_string(capsys: pytest.CaptureFixture[str]):
    logs.configure(json=True)
    log_a_failure()
    [line] = capsys.readouterr().err.splitlines()
    event = json.loads(line)
    assert event["event"] == "thing.failed" and event["node"] == "pi-01"
    assert "ValueError: the cause" in event["exception"]
