"""Charts of a report.json as PNG or SVG, with numpy and zlib only (no plotting library).

Why not matplotlib: it would be a dependency of ~40 MB with its own wheels (freetype,
pillow, kiwisolver...) for one picture; a node or a monitoring Pi should not need it.
Three small parts:

- ``report_figure(report)``: what to draw (panels of series over rounds), pure;
- ``layout(figure)``: where, as a list of drawing operations in pixels, pure;
- ``to_svg(ops)`` / ``to_png(ops)``: the two back ends. SVG is vector text with the
  viewer's own font; PNG is rasterised here: anti-aliased lines from a distance field,
  and text from a small 5x7 bitmap font (below).
"""

import itertools
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import numpy as np

from fedmq.files import write_output

WIDTH, HEIGHT = 960, 840
BLUE, RED, ORANGE, GREEN, PURPLE = "#1f77b4", "#d62728", "#ff7f0e", "#2ca02c", "#9467bd"
INK, GRID, FRAME, MUTED = "#222222", "#e6e6e6", "#b0b0b0", "#666666"


@dataclass(frozen=True)
class Series:
    label: str
    values: tuple[float | None, ...]
    color: str


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]
    floor_zero: bool = True  # the y axis starts at 0
    ceiling: float | None = None  # and ends at most here (accuracy: 1)
    decimals: int | None = None  # of the y tick labels; None: as the step needs


@dataclass(frozen=True)
class Figure:
    title: str
    subtitles: tuple[str, ...]
    rounds: tuple[int, ...]
    panels: tuple[Panel, ...]


# ------------------------------------------------------------------ 5x7 font

# Each glyph: 7 rows of 5 pixels, top to bottom, and 2 more for a descender. Characters
# not here draw as a box.
_FONT_ROWS = """
0 01110 10001 10011 10101 11001 10001 01110
1 00100 01100 00100 00100 00100 00100 01110
2 01110 10001 00001 00010 00100 01000 11111
3 11111 00010 00100 00010 00001 10001 01110
4 00010 00110 01010 10010 11111 00010 00010
5 11111 10000 11110 00001 00001 10001 01110
6 00110 01000 10000 11110 10001 10001 01110
7 11111 00001 00010 00100 01000 01000 01000
8 01110 10001 10001 01110 10001 10001 01110
9 01110 10001 10001 01111 00001 00010 01100
A 01110 10001 10001 11111 10001 10001 10001
B 11110 10001 10001 11110 10001 10001 11110
C 01110 10001 10000 10000 10000 10001 01110
D 11100 10010 10001 10001 10001 10010 11100
E 11111 10000 10000 11110 10000 10000 11111
F 11111 10000 10000 11110 10000 10000 10000
G 01110 10001 10000 10111 10001 10001 01111
H 10001 10001 10001 11111 10001 10001 10001
I 01110 00100 00100 00100 00100 00100 01110
J 00111 00010 00010 00010 00010 10010 01100
K 10001 10010 10100 11000 10100 10010 10001
L 10000 10000 10000 10000 10000 10000 11111
M 10001 11011 10101 10101 10001 10001 10001
N 10001 10001 11001 10101 10011 10001 10001
O 01110 10001 10001 10001 10001 10001 01110
P 11110 10001 10001 11110 10000 10000 10000
Q 01110 10001 10001 10001 10101 10010 01101
R 11110 10001 10001 11110 10100 10010 10001
S 01111 10000 10000 01110 00001 00001 11110
T 11111 00100 00100 00100 00100 00100 00100
U 10001 10001 10001 10001 10001 10001 01110
V 10001 10001 10001 10001 10001 01010 00100
W 10001 10001 10001 10101 10101 10101 01010
X 10001 10001 01010 00100 01010 10001 10001
Y 10001 10001 10001 01010 00100 00100 00100
Z 11111 00001 00010 00100 01000 10000 11111
a 00000 00000 01110 00001 01111 10001 01111
b 10000 10000 10110 11001 10001 10001 11110
c 00000 00000 01110 10000 10000 10001 01110
d 00001 00001 01101 10011 10001 10001 01111
e 00000 00000 01110 10001 11111 10000 01110
f 00110 01001 01000 11100 01000 01000 01000
g 00000 00000 01111 10001 10001 10001 01111 00001 01110
h 10000 10000 10110 11001 10001 10001 10001
i 00100 00000 01100 00100 00100 00100 01110
j 00010 00000 00110 00010 00010 00010 00010 10010 01100
k 10000 10000 10010 10100 11000 10100 10010
l 01100 00100 00100 00100 00100 00100 01110
m 00000 00000 11010 10101 10101 10001 10001
n 00000 00000 10110 11001 10001 10001 10001
o 00000 00000 01110 10001 10001 10001 01110
p 00000 00000 11110 10001 10001 10001 11110 10000 10000
q 00000 00000 01111 10001 10001 10001 01111 00001 00001
r 00000 00000 10110 11001 10000 10000 10000
s 00000 00000 01110 10000 01110 00001 11110
t 01000 01000 11100 01000 01000 01001 00110
u 00000 00000 10001 10001 10001 10011 01101
v 00000 00000 10001 10001 10001 01010 00100
w 00000 00000 10001 10001 10101 10101 01010
x 00000 00000 10001 01010 00100 01010 10001
y 00000 00000 10001 10001 10001 10001 01111 00001 01110
z 00000 00000 11111 00010 00100 01000 11111
. 00000 00000 00000 00000 00000 01100 01100
, 00000 00000 00000 00000 00000 01100 01100 00100 01000
: 00000 01100 01100 00000 01100 01100 00000
- 00000 00000 00000 11111 00000 00000 00000
+ 00000 00100 00100 11111 00100 00100 00000
/ 00000 00001 00010 00100 01000 10000 00000
( 00010 00100 01000 01000 01000 00100 00010
) 01000 00100 00010 00010 00010 00100 01000
% 11000 11001 00010 00100 01000 10011 00011
_ 00000 00000 00000 00000 00000 00000 11111
' 00100 00100 01000 00000 00000 00000 00000
= 00000 00000 11111 00000 11111 00000 00000
· 00000 00000 00000 00100 00000 00000 00000
? 01110 10001 00001 00010 00100 00000 00100
[ 01110 01000 01000 01000 01000 01000 01110
] 01110 00010 00010 00010 00010 00010 01110
"""
_FONT = {
    line[0]: np.array(
        [[float(c) for c in row] for row in (line[2:].split() + ["00000"] * 2)[:9]], np.float32
    )
    for line in _FONT_ROWS.strip("\n").splitlines()
}
_FONT[" "] = np.zeros((9, 5), np.float32)
_BOX = np.pad(np.pad(np.zeros((5, 3), np.float32), 1, constant_values=1.0), ((0, 2), (0, 0)))


def glyph(char: str) -> np.ndarray:
    """The 9x5 bitmap of ``char`` (1 = ink): 7 rows down to the baseline, 2 below it for
    descenders (g, j, p, q, y and the comma)."""
    return _FONT.get(char, _BOX)


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


# ------------------------------------------------------------------ where to draw it


@dataclass(frozen=True)
class Op:
    """One drawing operation: ``kind`` is rect, line (a polyline), dot or text."""

    kind: str
    color: str
    points: tuple[tuple[float, float], ...] = ()
    width: float = 1.0  # line width; dot radius; text scale (1 = 5x7 pixels)
    text: str = ""
    anchor: str = "start"  # text: start, middle, end


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round numbers (1, 2, 2.5 or 5 times a power of ten) covering
    low..high; the first <= low and the last >= high."""
    if not high > low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(low / step + 1e-9) * step
    ticks = [first]
    while ticks[-1] < high - 1e-9 * step:
        ticks.append(first + len(ticks) * step)
    return [round(t, 10) for t in ticks]


def _label(value: float, step: float, decimals: int | None) -> str:
    if decimals is None:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
        if step * 10**decimals % 1 > 1e-6:  # 2.5, 0.25...
            decimals += 1
    return f"{value:.{decimals}f}"


def _fit(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(0, chars - 3)] + "..."


def layout(figure: Figure, width: int = WIDTH, height: int = HEIGHT) -> list[Op]:
    ops = [Op("rect", "#ffffff", ((0, 0), (width, height)))]
    ops.append(Op("text", INK, ((40, 38),), 3, _fit(figure.title, (width - 80) // 18)))
    for line, text in enumerate(figure.subtitles):
        ops.append(Op("text", MUTED, ((40, 66 + 24 * line),), 2, _fit(text, (width - 80) // 12)))
    left, right, bottom, gap = 96, width - 40, height - 60, 66
    top = 66 + 24 * len(figure.subtitles) + 28
    count = max(1, len(figure.panels))
    panel_height = (bottom - top - gap * (count - 1)) / count
    rounds = figure.rounds or (1,)
    x_ticks = [t for t in nice_ticks(min(rounds), max(rounds), 10) if t == int(t)]
    x_low, x_high = min(min(rounds), x_ticks[0]), max(max(rounds), x_ticks[-1])
    x_span = (x_high - x_low) or 1

    def x_at(value: float) -> float:
        return left + (value - x_low) / x_span * (right - left)

    for index, panel in enumerate(figure.panels):
        y0 = top + index * (panel_height + gap)
        y1 = y0 + panel_height
        known = [v for s in panel.series for v in s.values if v is not None]
        low = 0.0 if panel.floor_zero else min(known)
        high = max(known)
        if panel.ceiling is not None:
            high = min(panel.ceiling, high)
        y_ticks = nice_ticks(low, high, 5)
        if panel.ceiling is not None and y_ticks[-1] > panel.ceiling:
            y_ticks = [t for t in y_ticks if t <= panel.ceiling] or [panel.ceiling]
            if y_ticks[-1] < high:
                y_ticks.append(panel.ceiling)
        y_low, y_high = y_ticks[0], y_ticks[-1]
        y_span = (y_high - y_low) or 1.0

        def y_at(value: float, y0: float = y0, y1: float = y1) -> float:
            return y1 - (value - y_low) / y_span * (y1 - y0)  # noqa: B023 (bound above)

        ops.append(Op("text", INK, ((left, y0 - 10),), 2, panel.title))
        step = y_ticks[1] - y_ticks[0] if len(y_ticks) > 1 else 1.0
        for tick in y_ticks:
            y = y_at(tick)
            ops.append(Op("line", GRID, ((left, y), (right, y)), 1))
            text = _label(tick, step, panel.decimals)
            ops.append(Op("text", MUTED, ((left - 8, y + 7),), 2, text, "end"))
        for tick in x_ticks:
            x = x_at(tick)
            ops.append(Op("line", GRID, ((x, y0), (x, y1)), 1))
            ops.append(Op("line", FRAME, ((x, y1), (x, y1 + 5)), 1))
            ops.append(Op("text", MUTED, ((x, y1 + 22),), 2, f"{int(tick)}", "middle"))
        ops.append(
            Op("line", FRAME, ((left, y0), (right, y0), (right, y1), (left, y1), (left, y0)), 1)
        )
        for series in panel.series:
            run: list[tuple[float, float]] = []
            points = [
                None if v is None else (x_at(r), y_at(v))
                for r, v in zip(rounds, series.values, strict=False)
            ]
            for point in [*points, None]:
                if point is not None:
                    run.append(point)
                    continue
                if len(run) > 1:
                    ops.append(Op("line", series.color, tuple(run), 2.5))
                if len(run) == 1 or (run and len(points) <= 40):
                    ops.extend(Op("dot", series.color, (p,), 3.5) for p in run)
                run = []
        # legend: on the panel's title line, right-aligned, so it never hides a line
        lx = right
        for series in reversed([s for s in panel.series if any(v is not None for v in s.values)]):
            lx -= 12 * len(series.label)
            ops.append(Op("text", INK, ((lx, y0 - 10),), 2, series.label))
            ops.append(Op("line", series.color, ((lx - 34, y0 - 17), (lx - 8, y0 - 17)), 2.5))
            ops.append(Op("dot", series.color, ((lx - 21, y0 - 17),), 3.5))
            lx -= 34 + 28
    ops.append(Op("text", INK, (((left + right) / 2, height - 14),), 2, "Round", "middle"))
    return ops


# ------------------------------------------------------------------ SVG


def to_svg(ops: list[Op], width: int = WIDTH, height: int = HEIGHT) -> str:
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">'
    ]
    for op in ops:
        if op.kind == "rect":
            (x0, y0), (x1, y1) = op.points
            out.append(
                f'<rect x="{x0:.1f}" y="{y0:.1f}" width="{x1 - x0:.1f}" height="{y1 - y0:.1f}" '
                f'fill="{op.color}"/>'
            )
        elif op.kind == "line":
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in op.points)
            out.append(
                f'<polyline points="{points}" fill="none" stroke="{op.color}" '
                f'stroke-width="{op.width}" stroke-linejoin="round" stroke-linecap="round"/>'
            )
        elif op.kind == "dot":
            (x, y), r = op.points[0], op.width
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{r}" fill="{op.color}"/>')
        elif op.kind == "text":
            (x, y), size = op.points[0], 7 * op.width * 1.45
            out.append(
                f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:.1f}" fill="{op.color}" '
                f'text-anchor="{op.anchor}">{escape(op.text)}</text>'
            )
    out.append("</svg>")
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------ PNG


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], dtype=np.float32)


def _blend(canvas: np.ndarray, x0: int, y0: int, cover: np.ndarray, color: str) -> None:
    h, w = cover.shape
    region = canvas[y0 : y0 + h, x0 : x0 + w]
    alpha = cover[: region.shape[0], : region.shape[1], None]
    region[...] = region * (1 - alpha) + _rgb(color) * alpha


def _coverage_box(
    points: np.ndarray, pad: float, shape: tuple[int, int]
) -> tuple[int, int, np.ndarray, np.ndarray] | None:
    x0 = max(0, int(points[:, 0].min() - pad))
    y0 = max(0, int(points[:, 1].min() - pad))
    x1 = min(shape[1], int(points[:, 0].max() + pad) + 2)
    y1 = min(shape[0], int(points[:, 1].max() + pad) + 2)
    if x1 <= x0 or y1 <= y0:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5
    return x0, y0, xs, ys


def _polyline(canvas: np.ndarray, op: Op) -> None:
    points = np.asarray(op.points, dtype=np.float32)
    half = op.width / 2
    box = _coverage_box(points, half + 2, canvas.shape[:2])
    if box is None:
        return
    x0, y0, xs, ys = box
    if len(points) == 2 and op.width <= 1 and (points[0] == points[1]).any():
        # axis-aligned hairline (grid, frame): crisp, one pixel
        cover = np.zeros(xs.shape, np.float32)
        (ax, ay), (bx, by) = points
        if ay == by:
            cover[
                (np.abs(ys - 0.5 - np.floor(ay)) < 0.5)
                & (xs >= min(ax, bx))
                & (xs <= max(ax, bx) + 1)
            ] = 1
        else:
            cover[
                (np.abs(xs - 0.5 - np.floor(ax)) < 0.5)
                & (ys >= min(ay, by))
                & (ys <= max(ay, by) + 1)
            ] = 1
        _blend(canvas, x0, y0, cover, op.color)
        return
    # coverage of the whole polyline (max over its segments, so joints are not inked
    # twice), each segment computed only over its own bounding box
    cover = np.zeros(xs.shape, np.float32)
    pad = int(half + 2)
    for (ax, ay), (bx, by) in itertools.pairwise(points.tolist()):
        r0 = max(0, int(min(ay, by)) - pad - y0)
        r1 = max(r0, int(max(ay, by)) + pad + 2 - y0)
        c0 = max(0, int(min(ax, bx)) - pad - x0)
        c1 = max(c0, int(max(ax, bx)) + pad + 2 - x0)
        sx, sy = xs[r0:r1, c0:c1], ys[r0:r1, c0:c1]
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = np.zeros_like(sx) if length2 == 0 else ((sx - ax) * dx + (sy - ay) * dy) / length2
        t = np.clip(t, 0, 1)
        distance = np.hypot(sx - (ax + t * dx), sy - (ay + t * dy))
        part = cover[r0:r1, c0:c1]
        np.maximum(part, np.clip(half + 0.5 - distance, 0, 1), out=part)
    _blend(canvas, x0, y0, cover, op.color)


def _dot(canvas: np.ndarray, op: Op) -> None:
    points = np.asarray(op.points, dtype=np.float32)
    box = _coverage_box(points, op.width + 2, canvas.shape[:2])
    if box is None:
        return
    x0, y0, xs, ys = box
    (cx, cy) = points[0]
    cover = np.clip(op.width + 0.5 - np.hypot(xs - cx, ys - cy), 0, 1)
    _blend(canvas, x0, y0, cover, op.color)


def _text(canvas: np.ndarray, op: Op) -> None:
    scale = int(op.width)
    advance = 6 * scale
    total = len(op.text) * advance - scale
    (x, y) = op.points[0]
    if op.anchor == "middle":
        x -= total / 2
    elif op.anchor == "end":
        x -= total
    left, top = round(x), round(y) - 7 * scale  # y is the baseline
    color = _rgb(op.color)
    for i, char in enumerate(op.text):
        bitmap = glyph(char)
        big = np.kron(bitmap, np.ones((scale, scale), np.float32))
        gx = left + i * advance
        if gx < 0 or top < 0 or gx + big.shape[1] > canvas.shape[1]:
            continue
        region = canvas[top : top + big.shape[0], gx : gx + big.shape[1]]
        alpha = big[: region.shape[0], :, None]
        region[...] = region * (1 - alpha) + color * alpha


def to_png(ops: list[Op], width: int = WIDTH, height: int = HEIGHT) -> bytes:
    canvas = np.full((height, width, 3), 255, dtype=np.float32)
    for op in ops:
        if op.kind == "rect":
            (x0, y0), (x1, y1) = op.points
            canvas[max(0, round(y0)) : round(y1), max(0, round(x0)) : round(x1)] = _rgb(op.color)
        elif op.kind == "line":
            _polyline(canvas, op)
        elif op.kind == "dot":
            _dot(canvas, op)
        elif op.kind == "text":
            _text(canvas, op)
    return png_bytes(np.clip(np.rint(canvas), 0, 255).astype(np.uint8))


def png_bytes(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (height, width, 3) uint8 array (filter 0 on every row)."""
    height, width, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, -1)], axis=1)
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def save_plot(report: dict[str, Any], path: Path) -> None:
    """Write the report's charts to ``path``: SVG if it ends in .svg, else PNG."""
    figure = report_figure(report)
    if not figure.panels:
        raise ValueError("the report has no rounds to plot")
    ops = layout(figure)
    write_output(path, to_svg(ops).encode() if path.suffix.lower() == ".svg" else to_png(ops))
