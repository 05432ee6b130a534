"""Headless renderers: plain lines, JSON lines, the live panel and the final summary."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
from rich.console import Console

from workbench.render.display import (
    JsonRenderer,
    LiveRenderer,
    PlainRenderer,
    format_bytes,
    format_count,
    format_seconds,
    make_renderer,
    print_summary,
    summary_table,
)
from workbench.errors import UsageError
from workbench.events import EventBus

GIB = 1024**3
T0 = 1_800_000_000.0  # a fixed wall-clock time for event timestamps


class FakeClock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_formatters():
    assert format_bytes(1.2 * GIB) == "1.2 GiB"
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024**2) == "3.0 MiB"
    assert format_bytes(None) == "n/a"
    assert format_seconds(3.21) == "3.2 s"
    assert format_seconds(125) == "2 m 05 s"
    assert format_seconds(7300) == "2 h 01 m"
    assert format_count(134_515_008) == "134.5 M"
    assert format_count(900) == "900"


def test_plain_lines_have_timestamps_stages_and_counts():
    out = io.StringIO()
    bus = EventBus([PlainRenderer(out, clock=FakeClock())], memory=lambda: int(1.2 * GIB))
    bus.emit("stage_start", "calibrate", "32 samples × 128 tokens", time=T0)
    bus.progress("calibrate", 3, 30, "q_proj", data={"unit": "layer"}, time=T0 + 1)
    bus.warn("calibrate", "Gram matrix not positive definite; regularised", time=T0 + 2)
    bus.log("calibrate", "captured inputs", time=T0 + 3)
    bus.emit("stage_end", "calibrate", time=T0 + 12.5)
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    stamp = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d \[calibrate\] ")
    assert all(stamp.match(line) for line in lines), lines
    assert "started: 32 samples × 128 tokens" in lines[0]
    assert "layer 3/30 q_proj" in lines[1] and lines[1].endswith("rss 1.2 GiB")
    assert "WARNING: Gram matrix not positive definite" in lines[2]
    assert "captured inputs" in lines[3]
    assert "done in 12.5 s" in lines[4]


def test_plain_progress_is_throttled_per_stage():
    out = io.StringIO()
    clock = FakeClock(100.0)
    r = PlainRenderer(out, interval=2.0, clock=clock)
    bus = EventBus([r])
    for i in range(1, 11):  # ten layers, 0.5 s apart
        clock.t = 100.0 + 0.5 * i
        bus.progress("compress", i, 10)
        bus.progress("evaluate", i, 10)  # another stage keeps its own clock
    counts = lambda stage: [l.split()[-1] for l in out.getvalue().splitlines() if f"[{stage}]" in l]  # noqa: E731
    # First at once, then one every 2 s, and the last step (10/10) always.
    assert counts("compress") == ["1/10", "5/10", "9/10", "10/10"]
    assert counts("evaluate") == ["1/10", "5/10", "9/10", "10/10"]


def test_json_lines_parse_back():
    out = io.StringIO()
    bus = EventBus([JsonRenderer(out)])
    bus.emit("stage_start", "allocate", time=T0)
    bus.progress("allocate", 2, 4, "ranks", memory_bytes=123)
    bus.log("evaluate", "", data={"metric": "perplexity", "value": 12.5})
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["kind"] for r in rows] == ["stage_start", "progress", "log"]
    assert rows[0]["time"] == T0 and rows[0]["stage"] == "allocate"
    assert (rows[1]["current"], rows[1]["total"], rows[1]["fraction"], rows[1]["memory_bytes"]) == (2, 4, 0.5, 123)
    assert rows[2]["data"] == {"metric": "perplexity", "value": 12.5}


def recording_console(terminal: bool = True) -> Console:
    return Console(record=True, width=100, force_terminal=terminal, color_system=None, file=io.StringIO())


def test_live_renderer_shows_stage_count_eta_and_logs():
    console = recording_console()
    clock = FakeClock(T0 + 10)
    with LiveRenderer(console, clock=clock) as r:
        bus = EventBus([r], memory=lambda: 2 * GIB)
        bus.emit("stage_start", "load", time=T0 - 5)
        bus.emit("stage_end", "load", time=T0 - 2)
        bus.emit("stage_start", "calibrate", time=T0)
        bus.progress("calibrate", 3, 30, "streaming inputs", data={"unit": "layer"}, time=T0 + 10)
        bus.warn("calibrate", "slow disk")
        # 3 of 30 layers took 10 s: 27 more take 90 s.
        assert r.eta() == pytest.approx(90.0)
        text = recording_console(terminal=False)
        text.print(r)
        shown = text.export_text()
    assert "calibrate" in shown and "layer 3/30" in shown and "10%" in shown
    assert "ETA 1 m 30 s" in shown and "elapsed 10.0 s" in shown
    assert "memory 2.0 GiB" in shown and "slow disk" in shown
    assert "✓ load 3.0 s" in shown
    # Leaving the context leaves the final state on the console.
    assert "layer 3/30" in console.export_text()


def test_live_renderer_from_another_thread():
    import threading

    console = recording_console()
    with LiveRenderer(console, refresh_per_second=50) as r:
        bus = EventBus([r])

        def work():
            bus.emit("stage_start", "compress")
            for i in range(1, 31):
                bus.progress("compress", i, 30)
            bus.emit("stage_end", "compress")

        t = threading.Thread(target=work)
        t.start()
        t.join()
    assert "✓ compress" in console.export_text()


def test_make_renderer_modes():
    term, pipe = recording_console(True), recording_console(False)
    assert isinstance(make_renderer("auto", term), LiveRenderer)
    assert isinstance(make_renderer("auto", pipe), PlainRenderer)
    assert isinstance(make_renderer("live", pipe), LiveRenderer)
    assert isinstance(make_renderer("plain", term), PlainRenderer)
    json_r = make_renderer("json", pipe)
    assert isinstance(json_r, JsonRenderer)
    with json_r as r:
        EventBus([r]).log("load", "hello")
    assert json.loads(pipe.file.getvalue())["message"] == "hello"
    with pytest.raises(UsageError, match="allowed: auto, live, plain, json"):
        make_renderer("fancy", term)


REPORT = {
    "params": {
        "ratio_targeted": 0.4,
        "ratio_model": 0.2876,
        "targeted_dense": 106_168_320,
        "targeted_compressed": 63_700_992,
        "model_dense": 134_515_008,
        "model_compressed": 92_047_680,
    },
    "metrics": [
        {"evaluator": "perplexity", "dataset": "embedded:wiki-vital", "metric": "perplexity", "dense": 20.0, "compressed": 25.0},
        {"evaluator": "zeroshot", "dataset": "piqa", "metric": "accuracy", "dense": 0.5, "compressed": None, "error": "no network"},
    ],
    "timings": {"load": 2.0, "calibrate": 75.0, "compress": 12.25, "total_s": 95.0},
    "peak_memory": {"rss_bytes": int(1.5 * GIB), "cuda_bytes": None},
    "output_dir": "runs/smollm2-40",
}


def render(report) -> str:
    console = Console(record=True, width=100, file=io.StringIO())
    print_summary(console, report)
    return console.export_text()


def test_summary_shows_ratios_params_metrics_time_and_memory():
    text = render(REPORT)
    lines = text.splitlines()

    def row(label):
        hits = [l for l in lines if label in l]
        assert hits, f"no row with {label!r} in:\n{text}"
        return hits[0]

    assert re.search(r"targeted layers.*106\.2 M.*63\.7 M.*40\.0% removed", row("targeted layers"))
    assert re.search(r"whole model.*134\.5 M.*92\.0 M.*28\.8% removed", row("whole model"))
    assert re.search(r"20\.00.*25\.00.*×1\.250 \(\+25\.0%\)", row("perplexity (embedded:wiki-vital)"))
    assert re.search(r"0\.5000.*failed.*no network", row("accuracy (piqa)"))
    assert re.search(r"calibrate.*1 m 15 s", row("calibrate"))
    assert re.search(r"compress.*12\.2 s", row("compress "))
    assert re.search(r"total.*1 m 35 s", row("total"))
    assert re.search(r"peak memory \(RSS\).*1\.5 GiB", row("RSS"))
    assert "GPU" not in text  # no CUDA figure, no row
    assert "output: runs/smollm2-40" in text


def test_summary_tolerates_missing_keys():
    assert render({}).strip() == ""
    text = render({"params": {"targeted_dense": 1000, "targeted_compressed": 600}, "peak_memory": 2 * GIB})
    assert "40.0% removed" in text and "2.0 GiB" in text
    assert "1.00" in render({"metrics": [{"evaluator": "x", "dense": 1.0}]})


def test_headless_path_does_not_import_textual():
    assert "workbench.render.display" in sys.modules
    # Importing display must not pull Textual in (the app is optional for headless runs).
    import subprocess

    code = "import sys, workbench.render.display; print('textual' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_summary_shows_every_evaluator_with_its_figures():
    report = {"metrics": [
        {"evaluator": "throughput", "dataset": None, "metric": "decode tokens/s", "dense": 100.0, "compressed": 125.0,
         "details": {"dense": {"figures": {"prefill tokens/s": 2000.0}},
                     "compressed": {"figures": {"prefill tokens/s": 2400.0}}}},
        {"evaluator": "memory", "dataset": None, "metric": "parameter bytes", "dense": 2 * GIB, "compressed": 1.5 * GIB,
         "details": {"dense": {"figures": {"peak RSS bytes (process so far)": 3 * GIB}}, "compressed": None}},
        {"evaluator": "choice", "dataset": "embedded:wiki-vital", "metric": "accuracy", "dense": 0.54,
         "compressed": 0.5, "details": {"dense": {"questions": 200}, "compressed": {"questions": 200}}},
    ]}
    lines = render(report).splitlines()

    def row(label):
        hits = [l for l in lines if label in l]
        assert hits, f"no row with {label!r} in:\n" + "\n".join(lines)
        return hits[0]

    assert re.search(r"100\.00.*125\.00.*×1\.250", row("throughput decode tokens/s"))
    assert re.search(r"^\s*│?\s*prefill tokens/s.*2,000.*2,400.*×1\.200", row("prefill tokens/s"))
    assert re.search(r"2\.0 GiB.*1\.5 GiB.*×0\.750", row("memory parameter bytes"))
    assert re.search(r"3\.0 GiB.*n/a", row("peak RSS bytes"))  # a figure only one side has
    assert re.search(r"0\.5400.*0\.5000", row("choice accuracy (embedded:wiki-vital)"))
    assert "questions" not in "\n".join(lines)  # details that are not figures stay in report.md
