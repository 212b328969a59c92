"""``fedmq report --plot``: charts written with numpy and zlib only, as valid PNG and SVG."""

import json
import os
import signal
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pytest

from fedmq.cli import main
from fedmq.plot import glyph, layout, nice_ticks, png_bytes, report_figure, save_plot
from fedmq.report import read_report, summary_lines


def make_report(rounds: int = 30, *, accuracy: bool = True) -> dict:
    rows = []
    for r in range(1, rounds + 1):
        rows.append(
            {
                "round": r,
                "accuracy": (0.95 - 0.6 / r) if accuracy else None,
                "loss": (2.0 / r) if accuracy else None,
                "train_loss": 2.2 / r,
                "uplink_bytes": 29_916,
                "downlink_bytes": 29_943 if r == 1 else 24_000 - 10 * r,
                "rejected": {"duplicate": 1} if r == 5 else {},
                "broker_dropped": 2 if r == 7 else 0,
                "seconds": 0.4,
            }
        )
    return {"final_accuracy": rows[-1]["accuracy"], "federation": "demo", "model": "digits-mlp",
            "rounds": rows}  # fmt: skip


def read_png(data: bytes) -> np.ndarray:
    """A minimal PNG reader for what png_bytes writes (8-bit RGB, filter 0): checks the
    signature, every chunk's CRC, and the pixel count."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, chunks = 8, {}
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        chunks[kind] = body
        offset += 12 + length
    kinds = list(chunks)
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    width, height, depth, color, _, _, _ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, color) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, -1)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(height, width, 3)


def test_png_chart_is_valid_and_drawn(tmp_path):
    path = tmp_path / "accuracy.png"
    save_plot(make_report(), path)
    pixels = read_png(path.read_bytes())
    height, width, _ = pixels.shape
    assert 400 <= width <= 4000 and 300 <= height <= 4000
    assert path.stat().st_size > 5_000
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7].tolist()}
    assert (255, 255, 255) in colours
    for series in ((0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28), (0x2C, 0xA0, 0x2C)):
        assert series in colours, series  # accuracy, loss and uplink lines are there
    assert not path.with_name("accuracy.png.tmp").exists()


def test_svg_chart_parses(tmp_path):
    path = tmp_path / "chart.svg"
    save_plot(make_report(200), path)
    root = ET.parse(path).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert 400 <= int(root.get("width")) <= 4000
    ns = {"s": "http://www.w3.org/2000/svg"}
    texts = [t.text for t in root.iterfind(".//s:text", ns)]
    for label in ("Test accuracy", "Loss", "uplink", "downlink", "Round"):
        assert label in texts
    assert len(root.findall(".//s:polyline", ns)) > 5


def test_a_report_without_test_set_still_plots_bytes():
    figure = report_figure(make_report(3, accuracy=False))
    assert [p.title.split(" (")[0] for p in figure.panels] == ["Loss", "Bytes per round"]
    assert layout(figure)


def test_a_single_round_and_an_empty_report(tmp_path):
    save_plot(make_report(1), tmp_path / "one.png")
    read_png((tmp_path / "one.png").read_bytes())
    with pytest.raises(ValueError, match="no rounds"):
        save_plot({"rounds": []}, tmp_path / "none.png")


def test_nice_ticks():
    assert nice_ticks(0, 1, 5) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(1, 30, 10) == [0, 5, 10, 15, 20, 25, 30]
    assert nice_ticks(0, 2.3, 5) == [0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert nice_ticks(3, 3) == [3, 4, 5, 6]  # a flat series gets a range


def test_png_bytes_round_trip_and_font():
    pixels = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert (read_png(png_bytes(pixels)) == pixels).all()
    assert glyph("1").shape == glyph("g").shape == glyph("€").shape == (9, 5)
    assert glyph("g")[7:].any() and not glyph("a")[7:].any()


def test_summary_and_reading(tmp_path):
    lines = summary_lines(make_report())
    text = "\n".join(lines)
    assert lines[0] == "federation demo · model digits-mlp"
    assert "final accuracy 0.9300, best 0.9300 in round 30" in text
    assert "rejected 1: duplicate 1" in text
    assert "broker dropped 2 messages" in text
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a fedmq report"):
        read_report(bad)


def test_report_command(tmp_path, capsys):
    report = tmp_path / "report.json"
    report.write_text(json.dumps(make_report()))
    chart = tmp_path / "accuracy.png"
    assert main(["report", str(report), "--plot", str(chart)]) == 0
    out = capsys.readouterr().out
    assert "30 rounds" in out and f"chart written to {chart}" in out
    read_png(chart.read_bytes())
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "cannot read a report" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(report), "--plot", str(tmp_path / "chart.gif")])
    assert "does not end in .png or .svg" in capsys.readouterr().err


def test_plotting_needs_no_plotting_library():
    source = (Path(__file__).parents[2] / "src" / "fedmq" / "plot.py").read_text()
    assert "matplotlib" not in source.split('"""', 2)[2]  # only named in the docstring


@pytest.mark.parametrize("name", ["chart.png", "chart.svg"])
def test_a_chart_in_a_missing_directory_names_the_users_path(tmp_path, capsys, name):
    """It named the internal '<path>.tmp' (issue 11)."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps(make_report()))
    target = tmp_path / "nonexistent" / name
    assert main(["report", str(report), "--plot", str(target)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"fedmq report: error: cannot write {target}: directory {target.parent} does not "
        "exist (create it or choose another path)\n"
    )
    assert not list(tmp_path.rglob("*.tmp"))


def test_report_into_a_closed_pipe_stops_quietly(tmp_path):
    """`fedmq report r.json | head` ended with a BrokenPipe error (issue 11). The reader is
    gone before the first write, which makes the broken pipe certain, not timed."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps(make_report()))
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "fedmq", "report", str(report)],
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert done.stderr == ""
    assert done.returncode == 128 + signal.SIGPIPE  # what a shell shows for `yes | head`
