"""``fedmq report --plot``: charts drawn with matplotlib (the ``plot`` extra), as valid
PNG and SVG; without matplotlib, one line naming the extra."""

import json
import os
import signal
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zlib

import numpy as np
import pytest
from PIL import Image  # comes with matplotlib

from fedmq.cli import main
from fedmq.plot import BLUE, GREEN, ORANGE, PURPLE, RED, _lonely, render, report_figure, save_plot
from fedmq.report import read_report, summary_lines

SVG = "{http://www.w3.org/2000/svg}"


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


def read_png(path) -> np.ndarray:
    """The RGB pixels of a PNG file, after checking its signature, every chunk's CRC and
    that the header's size is the picture's."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, kinds = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        kinds.append(kind)
        offset += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and b"IDAT" in kinds
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (height, width, 3)
    return pixels


def svg_texts(root: ET.Element) -> list[str]:
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_png_chart_is_valid_and_drawn(tmp_path):
    path = tmp_path / "accuracy.png"
    save_plot(make_report(), path)
    pixels = read_png(path)
    height, width, _ = pixels.shape
    assert 400 <= width <= 4000 and 300 <= height <= 4000
    assert path.stat().st_size > 5_000
    colours = {tuple(c) for c in np.unique(pixels.reshape(-1, 3), axis=0).tolist()}
    assert (255, 255, 255) in colours
    for series in (BLUE, RED, ORANGE, GREEN, PURPLE):
        rgb = tuple(int(series[i : i + 2], 16) for i in (1, 3, 5))
        assert rgb in colours, series  # accuracy, both losses, uplink and downlink are drawn
    assert not path.with_name("accuracy.png.tmp").exists()


def test_svg_chart_parses_and_says_what_it_shows(tmp_path):
    path = tmp_path / "chart.svg"
    save_plot(make_report(200), path)
    root = ET.parse(path).getroot()
    assert root.tag == f"{SVG}svg"
    _, _, width, height = (float(v) for v in root.get("viewBox").split())
    assert 400 <= width <= 4000 and 300 <= height <= 4000
    texts = svg_texts(root)  # text stays text (the viewer's font), not outlines
    for label in (
        "fedmq federation demo",
        "model digits-mlp · 200 rounds",
        "final accuracy 0.9470, best 0.9470 (round 200)",
        "1 update rejected · 2 messages dropped by the broker",
        "Test accuracy", "accuracy", "Loss", "test loss", "train loss",
        "Bytes per round (KiB)", "uplink", "downlink", "Round",
    ):  # fmt: skip
        assert label in texts, label
    assert "200" in texts  # the x axis reaches the last round
    styles = " ".join(e.get("style", "") for e in root.iter(f"{SVG}path"))
    for series in (BLUE, RED, ORANGE, GREEN, PURPLE):
        assert f"stroke: {series}" in styles, series


def test_a_report_without_test_set_still_plots_bytes():
    figure = report_figure(make_report(3, accuracy=False))
    assert [p.title.split(" (")[0] for p in figure.panels] == ["Loss", "Bytes per round"]
    texts = svg_texts(ET.fromstring(render(figure, "svg")))
    assert "Loss" in texts and "train loss" in texts and "uplink" in texts
    assert "Test accuracy" not in texts and "test loss" not in texts  # no empty series


def test_a_value_between_gaps_still_shows():
    """Beyond 40 rounds lines have no dots; a value with no known neighbour would vanish."""
    assert _lonely((None, 1.0, None, 2.0, 3.0, None, 4.0)) == [
        False, True, False, False, False, False, True,
    ]  # fmt: skip
    report = make_report(60)
    for row in report["rounds"]:
        if row["round"] != 30:
            row["accuracy"] = None
    root = ET.fromstring(render(report_figure(report), "svg"))
    dots = [e for e in root.iter(f"{SVG}use") if f"fill: {BLUE}" in e.get("style", "")]
    assert len(dots) == 1  # round 30's, and no marker on the other 59


def test_a_single_round_and_an_empty_report(tmp_path):
    save_plot(make_report(1), tmp_path / "one.png")
    read_png(tmp_path / "one.png")
    with pytest.raises(ValueError, match="no rounds"):
        save_plot({"rounds": []}, tmp_path / "none.png")


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
    read_png(chart)
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "cannot read a report" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["report", str(report), "--plot", str(tmp_path / "chart.gif")])
    assert "does not end in .png or .svg" in capsys.readouterr().err


def test_without_matplotlib_the_report_works_and_plot_names_the_extra(tmp_path):
    """matplotlib is an extra for the operator's machine: a summary needs none, and a chart
    asked for without it fails in one line that says what to install."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps(make_report()))
    chart = tmp_path / "chart.png"
    code = (
        "import sys; sys.modules['matplotlib'] = None  # `import matplotlib` fails\n"
        "from fedmq.cli import main\n"
        "import fedmq.plot, fedmq.node.app\n"
        "raise SystemExit(main(sys.argv[1:]))"
    )

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", code, "report", str(report), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    summary = run()
    assert summary.returncode == 0 and summary.stderr == "", summary.stderr
    assert "30 rounds" in summary.stdout
    plotted = run("--plot", str(chart))
    assert plotted.returncode == 2
    assert plotted.stderr == (
        "fedmq report: error: drawing a chart needs matplotlib: pip install 'fedmq[plot]'\n"
    )
    assert not chart.exists() and not list(tmp_path.glob("*.tmp"))


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
