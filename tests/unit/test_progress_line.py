"""The terminal progress line: drawn in place on a TTY, throttled, silent elsewhere."""

import io

from fedmq.progress_line import ProgressLine


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_line_redrawn_in_place_and_throttled() -> None:
    now = [0.0]
    out = FakeTerminal()
    line = ProgressLine(out, interval=0.1, clock=lambda: now[0])
    line.show("round 1/3: 0/2 reported")
    line.show("round 1/3: 1/2 reported")  # too soon: skipped
    now[0] = 0.2
    line.show("round 1/3: 1/2 reported")
    line.show("round 1/3: 1/2 reported")  # unchanged: skipped
    line.show("round 2/3: 0/2 reported", force=True)
    line.close()
    assert out.getvalue() == (
        "\rround 1/3: 0/2 reported\x1b[K"
        "\rround 1/3: 1/2 reported\x1b[K"
        "\rround 2/3: 0/2 reported\x1b[K\n"
    )


def test_nothing_is_written_when_not_on_a_terminal() -> None:
    out = io.StringIO()  # systemd's journal, a pipe, a file
    line = ProgressLine(out)
    line.show("round 1/3: 0/2 reported", force=True)
    line.close()
    assert out.getvalue() == ""


def test_the_aggregators_line_says_round_reports_and_quorum() -> None:
    from fedmq.aggregator.app import progress_text
    from fedmq.aggregator.rounds import RoundPolicy
    from tests.unit.test_aggregator_server import Harness

    h = Harness(policy=RoundPolicy(expected_nodes=3, min_nodes=2, deadline_seconds=5), rounds=4)
    h.agg.start()
    h.report("pi-a")
    h.clock.now += 2.5
    assert progress_text(h.agg) == "round 1/4: 1/3 reported (min 2), open 2.5 s"


def test_after_the_final_model_the_aggregators_line_counts_the_nodes_to_report_it() -> None:
    from fedmq.aggregator.app import progress_text
    from tests.unit.test_aggregator_server import Harness

    h = Harness(rounds=1, final_delivery_wait=5.0)
    h.agg.start()
    for node in ("pi-a", "pi-b", "pi-c"):
        h.agg.note_presence(node, True)
        h.agg.note_received(node, 100)
        h.report(node)
    h.clock.now += 0.25
    assert progress_text(h.agg) == "final model out after 1: 3 nodes still to report it, 0.2 s"
