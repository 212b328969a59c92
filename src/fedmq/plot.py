"""Charts of a report.json as PNG or SVG, drawn with matplotlib (the ``plot`` extra).

Two parts: ``report_figure(report)`` says what to draw (panels of series over rounds),
pure and without matplotlib; ``render(figure, fmt)`` draws it. matplotlib is imported
only there, so ``fedmq report`` without ``--plot``, and every node, run without it.
"""

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmq.files import write_output

NEEDS_MATPLOTLIB = "drawing a chart needs matplotlib: pip install 'fedmq[plot]'"
WIDTH, HEIGHT, DPI = 9.6, 8.4, 125  # inches, and pixels per inch in the PNG: 1200 x 1050
BLUE, RED, ORANGE, GREEN, PURPLE = "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd"
INK, GRID, FRAME, MUTED = "#222222", "#e6e6e6", "#b0b0b0", "#666666"
MARKERS_UP_TO = 40  # rounds; beyond, a dot on every round hides the line


@dataclass(frozen=True)
class Series:
    label: str
    values: tuple[float | None, ...]
    color: str


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    ceiling: float | None = None  # the y axis, from 0, ends at most here (accuracy: 1)


@dataclass(frozen=True)
class Figure:
    title: str
    subtitles: tuple[str, ...]
    rounds: tuple[int, ...]
    panels: tuple[Panel, ...]


# ------------------------------------------------------------------ what to draw


def _unit(largest: float) -> tuple[str, float]:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if largest >= size:
            return unit, float(size)
    return "B", 1.0


def report_figure(report: dict[str, Any]) -> Figure:
    """Accuracy, loss and bytes per round (up and down) of a report.json."""
    rows = report.get("rounds", [])
    rounds = tuple(int(r["round"]) for r in rows)

    def col(key: str, scale: float = 1.0) -> tuple[float | None, ...]:
        return tuple(None if r.get(key) is None else float(r[key]) / scale for r in rows)

    unit, size = _unit(max([r.get("uplink_bytes") or 0 for r in rows] + [0]))
    panels = [
        Panel("Test accuracy", (Series("accuracy", col("accuracy"), BLUE),), ceiling=1.0),
        Panel(
            "Loss",
            (
                Series("test loss", col("loss"), RED),
                Series("train loss", col("train_loss"), ORANGE),
            ),
        ),
        Panel(
            f"Bytes per round ({unit})",
            (
                Series("uplink", col("uplink_bytes", size), GREEN),
                Series("downlink", col("downlink_bytes", size), PURPLE),
            ),
        ),
    ]
    accuracies = [(r["accuracy"], r["round"]) for r in rows if r.get("accuracy") is not None]
    bits = []
    if accuracies:
        best, best_round = max(accuracies)
        bits.append(f"final accuracy {accuracies[-1][0]:.4f}, best {best:.4f} (round {best_round})")
    rejected = sum(sum((r.get("rejected") or {}).values()) for r in rows)
    dropped = sum(r.get("broker_dropped") or 0 for r in rows)
    problems = [f"{rejected} update{'' if rejected == 1 else 's'} rejected"]
    if dropped:
        problems.append(f"{dropped} messages dropped by the broker")
    title = f"fedmq federation {report.get('federation') or '?'}"
    setup = [f"{key} {report[key]}" for key in ("model", "compression", "nodes") if report.get(key)]
    setup.append(f"{len(rows)} rounds")
    lines = (" · ".join(setup), " · ".join(bits), " · ".join(problems))
    panels_with_data = tuple(p for p in panels if _has_data(p))
    return Figure(title, tuple(line for line in lines if line), rounds, panels_with_data)


def _has_data(panel: Panel) -> bool:
    return any(v is not None for s in panel.series for v in s.values)


# ------------------------------------------------------------------ drawing it


def _lonely(values: tuple[float | None, ...]) -> list[bool]:
    """Values with no known neighbour: a line through them draws nothing."""
    known = [v is not None for v in values]
    padded = [False, *known, False]
    return [k and not padded[i] and not padded[i + 2] for i, k in enumerate(known)]


def render(figure: Figure, fmt: str) -> bytes:
    """``figure`` as the bytes of a ``png`` or ``svg`` file. RuntimeError naming the
    extra to install when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError(NEEDS_MATPLOTLIB) from None
    # A Figure with its own Agg canvas, not pyplot: no GUI backend, no global figure list.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as Chart
    from matplotlib.ticker import MaxNLocator

    chart = Chart(figsize=(WIDTH, HEIGHT), dpi=DPI, facecolor="white")
    FigureCanvasAgg(chart)
    header = 0.5 + 0.27 * len(figure.subtitles)  # inches above the first panel's title
    chart.text(0.35 / WIDTH, 1 - 0.4 / HEIGHT, figure.title, fontsize=15, color=INK, weight="bold")
    for line, text in enumerate(figure.subtitles):
        y = 1 - (0.7 + 0.27 * line) / HEIGHT
        chart.text(0.35 / WIDTH, y, text, fontsize=10, color=MUTED)
    chart.subplots_adjust(
        left=0.9 / WIDTH,
        right=1 - 0.3 / WIDTH,
        bottom=0.7 / HEIGHT,
        top=1 - (header + 0.45) / HEIGHT,
        hspace=0.5,
    )
    axes = chart.subplots(len(figure.panels), 1, sharex=True, squeeze=False)[:, 0]
    rounds = figure.rounds
    for ax, panel in zip(axes, figure.panels, strict=True):
        for series in panel.series:
            if all(v is None for v in series.values):
                continue
            ys = [math.nan if v is None else v for v in series.values]
            marker = "o" if len(rounds) <= MARKERS_UP_TO else None
            ax.plot(
                rounds,
                ys,
                color=series.color,
                linewidth=2,
                marker=marker,
                markersize=4,
                label=series.label,
            )
            alone = _lonely(series.values)
            if marker is None and any(alone):
                ax.plot(
                    [r for r, a in zip(rounds, alone, strict=True) if a],
                    [v for v, a in zip(series.values, alone, strict=True) if a],
                    linestyle="none",
                    marker="o",
                    markersize=4,
                    color=series.color,
                )
        # from 0 to the first round tick at or above the highest value (at most the
        # ceiling), and a little room so a line along the top is not cut in half
        high = max(v for line in panel.series for v in line.values if v is not None)
        top = next(t for t in MaxNLocator(nbins=5).tick_values(0, high or 1.0) if t >= high)
        if panel.ceiling is not None:
            top = min(top, max(panel.ceiling, high))
        ax.set_ylim(0, top * 1.02 or 1.0)
        ax.set_title(panel.title, loc="left", fontsize=11, color=INK)
        # the legend on the title's line, right-aligned, so it never hides a line
        ax.legend(
            loc="lower right",
            bbox_to_anchor=(1, 1),
            ncols=len(panel.series),
            frameon=False,
            fontsize=10,
            borderaxespad=0.2,
        )
        ax.grid(color=GRID, linewidth=0.8)
        ax.set_axisbelow(True)
        ax.tick_params(colors=MUTED, labelcolor=INK, labelsize=9)
        for spine in ax.spines.values():
            spine.set_color(FRAME)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=10, integer=True))
    axes[-1].set_xlabel("Round", fontsize=10, color=INK)
    out = io.BytesIO()
    # SVG text as <text> in the viewer's font (not outlines), no date: the same report
    # gives the same file.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "fedmq"}):
        chart.savefig(out, format=fmt, metadata={"Date": None} if fmt == "svg" else None)
    return out.getvalue()


def save_plot(report: dict[str, Any], path: Path) -> None:
    """Write the report's charts to ``path``: SVG if it ends in .svg, else PNG. The file
    appears whole or not at all (files.write_output)."""
    figure = report_figure(report)
    if not figure.panels:
        raise ValueError("the report has no rounds to plot")
    write_output(path, render(figure, "svg" if path.suffix.lower() == ".svg" else "png"))
