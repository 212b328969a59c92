"""report.json: what a federation did, round by round, built from the metrics messages."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmq.files import write_output
from fedmq.schemas import RoundMetrics


def round_metrics(metrics: RoundMetrics) -> dict[str, dict[str, float] | None]:
    """A round's ``{"central", "federated"}`` metrics (both None from an aggregator before
    federated evaluation). central: the round's new model on the aggregator's test set;
    federated: the model the round STARTED from, on the nodes' held-out examples."""
    parts = metrics.metrics
    return {
        "central": None if parts is None else parts.central,
        "federated": None if parts is None else parts.federated,
    }


# Extra metrics keys a row carries when the aggregator sent them (asynchronous mode;
# DP-SGD: the most epsilon any participant had spent; DP-FedAvg: the run's epsilon and
# the clip norm the round used).
ROW_EXTRAS = (
    "staleness_max",
    "staleness_mean",
    "dp_epsilon_max",
    "dp_fedavg_epsilon",
    "dp_fedavg_clip",
)


def round_row(metrics: RoundMetrics) -> dict[str, Any]:
    extras = {key: metrics.extra[key] for key in ROW_EXTRAS if key in metrics.extra}
    return {
        "round": metrics.round,
        "accuracy": metrics.accuracy,
        "loss": metrics.loss,
        "metrics": round_metrics(metrics),
        "train_loss": metrics.train_loss,
        "participants": len(metrics.participants),
        "participant_ids": metrics.participants,
        "num_examples": metrics.num_examples,
        "uplink_bytes": metrics.uplink_bytes,
        "downlink_bytes": metrics.downlink_bytes,
        "global_bytes": metrics.global_bytes,
        "global_delta_bytes": metrics.global_delta_bytes,
        "downlink_delivered": metrics.downlink_delivered,
        "seconds": metrics.seconds,
        "aggregate_seconds": metrics.aggregate_seconds,
        "train_seconds_median": metrics.train_seconds_median,
        "closed_by": metrics.closed_by,
        "at": metrics.at,
        "elapsed": metrics.elapsed,
        "rejected": metrics.rejected,
        "broker_dropped": metrics.broker_dropped,
        "model_id": metrics.model_id,
        **extras,
    }


def final_accuracy(final: dict[str, dict[str, float] | None]) -> float | None:
    """The last round's accuracy: central if measured, else federated, else None."""
    for part in ("central", "federated"):
        accuracy = (final[part] or {}).get("accuracy")
        if accuracy is not None:
            return accuracy
    return None


def downlink_entry(spec: str, final: str = "same") -> dict[str, str]:
    """The report's ``downlink_compression``, only when the downlink is compressed (a run
    without it reports what it did before), and ``final_downlink_compression`` when the
    final model went otherwise."""
    entry = {} if spec == "none" else {"downlink_compression": spec}
    return entry | ({} if final == "same" else {"final_downlink_compression": final})


def proximal_mu_entry(mu: float) -> dict[str, float]:
    """report.json's ``proximal_mu`` (FedProx's mu of the plan), only when it is not 0:
    a run without FedProx reports what it did before."""
    return {"proximal_mu": mu} if mu else {}


def dp_sgd_entry(dp_sgd: str | None, max_epsilon: float | None = None) -> dict[str, Any]:
    """report.json's ``dp_sgd`` (the plan's ``noise=Z,clip=C``) and the nodes'
    ``max_epsilon``, each only when set: a run without DP reports what it did before."""
    entry: dict[str, Any] = {} if dp_sgd is None else {"dp_sgd": dp_sgd}
    return entry | ({} if max_epsilon is None else {"max_epsilon": max_epsilon})


def mode_entry(mode: str, buffer: int, staleness: str, max_staleness: int) -> dict[str, Any]:
    """report.json's ``mode``, and for ``async`` its buffer and staleness settings (then
    ``rounds`` lists model versions)."""
    if mode != "async":
        return {"mode": mode}
    return {
        "mode": mode,
        "buffer": buffer,
        "staleness": staleness,
        "max_staleness": max_staleness,
    }


def final_delivery_entry(count: tuple[int | None, int] | None) -> dict[str, Any]:
    """report.json's ``final_downlink_delivered`` (bytes the nodes reported receiving after
    the final model was published, None if no node's count) and ``final_downlink_nodes``
    (how many nodes' reports that is), when the aggregator counted them (its ``done``
    status, docs/PROTOCOL.md 8.4): a run without the count reports what it did before.
    No round's ``downlink_delivered`` includes the final model."""
    if count is None:
        return {}
    delivered, nodes = count
    return {"final_downlink_delivered": delivered, "final_downlink_nodes": nodes}


def slow_nodes_entry(node_ids: Sequence[str], seconds: float) -> dict[str, Any]:
    """report.json's ``slow_nodes`` (``fedmq demo --slow-nodes``, a simulation): the nodes
    given ``--train-delay`` and its seconds."""
    return {"slow_nodes": {"node_ids": list(node_ids), "train_delay": seconds}}


def build_report(rounds: list[RoundMetrics], **run: Any) -> dict[str, Any]:
    """Top level: ``final_accuracy``, ``final_metrics`` (the last round's central and
    federated metrics), the run's settings, and ``rounds`` in order."""
    # a round's metrics may arrive twice (after an aggregator restart): keep the last
    ordered = sorted({m.round: m for m in rounds}.values(), key=lambda m: m.round)
    final: dict[str, dict[str, float] | None] = {"central": None, "federated": None}
    if ordered:
        final = round_metrics(ordered[-1])
    if ordered and ordered[-1].metrics is None:  # an older aggregator: accuracy as it was
        accuracy = ordered[-1].accuracy
    else:
        accuracy = final_accuracy(final)
    return {
        "final_accuracy": accuracy,
        "final_metrics": final,
        **run,
        "rounds": [round_row(m) for m in ordered],
    }


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write atomically, so a reader never sees half a report; ValueError naming ``path``."""
    write_output(path, (json.dumps(report, indent=2) + "\n").encode())


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A report in a few lines of text: setup, final and best accuracy, bytes, rejections."""
    rows = report.get("rounds", [])
    keys = ("federation", "model", "compression", "nodes", "mode")
    setup = [f"{key} {report[key]}" for key in keys if report.get(key) is not None]
    lines = [" · ".join(setup) or "fedmq report"]
    if not rows:
        return [*lines, "no rounds"]
    scored = [(r["accuracy"], r["round"]) for r in rows if r.get("accuracy") is not None]
    unit = "version" if report.get("mode") == "async" else "round"
    text = f"{len(rows)} {unit}s ({unit} {rows[0]['round']} to {rows[-1]['round']})"
    if scored:
        best, best_round = max(scored)
        text += f"; final accuracy {scored[-1][0]:.4f}, best {best:.4f} in {unit} {best_round}"
    if rows[-1].get("elapsed") is not None:
        text += f"; {rows[-1]['elapsed']:.1f} s"
    lines.append(text)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    if losses:
        lines.append(f"test loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    federated = [
        (r["round"], r["metrics"]["federated"])
        for r in rows
        if isinstance(r.get("metrics"), dict) and r["metrics"].get("federated")
    ]
    if federated:
        (first_round, first), (last_round, last) = federated[0], federated[-1]
        each = ", ".join(
            f"{name} {first[name]:.4f} -> {value:.4f}" if name in first else f"{name} {value:.4f}"
            for name, value in last.items()
        )
        lines.append(f"federated (rounds {first_round} to {last_round}): {each}")
    up = sum(r.get("uplink_bytes") or 0 for r in rows)
    down = sum(r.get("downlink_bytes") or 0 for r in rows)
    lines.append(
        f"bytes: uplink {up / len(rows):,.0f} B/round ({up:,} in all),"
        f" downlink {down / len(rows):,.0f} B/round ({down:,} in all)"
    )
    delivered = [r["downlink_delivered"] for r in rows if r.get("downlink_delivered") is not None]
    final = report.get("final_downlink_delivered")
    if delivered or "final_downlink_nodes" in report:
        text = f"downlink delivered (nodes' counts): {sum(delivered):,} B"
        text += f" in {len(delivered)} rounds"
        if "final_downlink_nodes" in report:
            nodes = report["final_downlink_nodes"]
            text += (
                f" + {final or 0:,} B of the final model ({nodes} nodes' counts)"
                f" = {sum(delivered) + (final or 0):,} B"
            )
        lines.append(text)
    seconds = sorted(r.get("seconds") or 0.0 for r in rows)
    lines.append(f"round time: median {seconds[len(seconds) // 2]:.2f} s, max {seconds[-1]:.2f} s")
    rejected: dict[str, int] = {}
    for r in rows:
        for reason, count in (r.get("rejected") or {}).items():
            rejected[reason] = rejected.get(reason, 0) + count
    if rejected:
        each = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items(), key=lambda kv: -kv[1]))
        lines.append(f"rejected {sum(rejected.values())}: {each}")
    else:
        lines.append("rejected: none")
    dropped = sum(r.get("broker_dropped") or 0 for r in rows)
    if dropped:
        lines.append(f"broker dropped {dropped} messages: its queues are too small")
    return lines


def read_report(path: Path) -> dict[str, Any]:
    """A report.json, or ValueError naming what is wrong with it."""
    try:
        report = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read a report ({error})") from None
    rows = report.get("rounds") if isinstance(report, dict) else None
    if not isinstance(rows, list) or not all(
        isinstance(r, dict) and isinstance(r.get("round"), int) for r in rows
    ):
        raise ValueError(f"{path}: not a fedmq report (no 'rounds' list of rounds)")
    return report
