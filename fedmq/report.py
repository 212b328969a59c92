"""report.json: what a federation did, round by round, built from the metrics messages."""

import json
from pathlib import Path
from typing import Any

from schemas import RoundMetrics


def round_row(metrics: RoundMetrics) -> dict[str, Any]:
    return {
        "round": metrics.round,
        "accuracy": metrics.accuracy,
        "loss": metrics.loss,
        "train_loss": metrics.train_loss,
        "participants": len(metrics.participants),
        "participant_ids": metrics.participants,
        "num_examples": metrics.num_examples,
        "uplink_bytes": metrics.uplink_bytes,
        "downlink_bytes": metrics.downlink_bytes,
        "global_bytes": metrics.global_bytes,
        "global_delta_bytes": metrics.global_delta_bytes,
        "seconds": metrics.seconds,
        "aggregate_seconds": metrics.aggregate_seconds,
        "train_seconds_median": metrics.train_seconds_median,
        "closed_by": metrics.closed_by,
        "at": metrics.at,
        "rejected": metrics.rejected,
        "broker_dropped": metrics.broker_dropped,
        "model_id": metrics.model_id,
    }


def build_report(rounds: list[RoundMetrics], **run: Any) -> dict[str, Any]:
    """Top level: ``final_accuracy``, the run's settings, and ``rounds`` in order."""
    # a round's metrics may arrive twice (after an aggregator restart): keep the last
    ordered = sorted({m.round: m for m in rounds}.values(), key=lambda m: m.round)
    return {
        "final_accuracy": ordered[-1].accuracy if ordered else None,
        **run,
        "rounds": [round_row(m) for m in ordered],
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)
