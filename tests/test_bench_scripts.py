"""The benchmark scripts still run against the engine they measure.

Nothing else calls them, so a change to an engine signature can break one silently until the next
measurement (bench/layer_shapes.py did once). Each runs here at its smoke-test size and its report
is checked for what the benchmark exists to say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workbench_signals.fisher import resolve_precision

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


CHOSEN = ["--gram-precision", "float32-equilibrated", "--svd-route", "lapack", "--fisher", "2"]


@pytest.mark.parametrize("engine", [[], CHOSEN], ids=["defaults", "chosen"])
def test_layer_shapes_measures_a_pass_and_a_factoring_per_layer(tmp_path, engine):
    out = tmp_path / "shapes.json"
    _run("layer_shapes.py", "--preset", "tiny", "--layers", "2", "--samples", "2", "--seq-len", "16",
         "--json", str(out), *engine)
    result = json.loads(out.read_text())
    assert result["engine"] == ({"gram_precision": "float64", "svd_route": "device"} if not engine else
                                {"gram_precision": "float32-equilibrated", "svd_route": "lapack"})
    measured = result["measured"]
    assert result["machine"]["device"] == "cpu" and measured["gpu_peak_allocated_bytes"] is None
    assert measured["calibration_s"] >= sum(row["wall_s"] for row in measured["layers"]) - 0.01
    assert measured["floor_s"] > 0 and measured["calibrate_over_floor"] > 0
    fisher = measured["fisher_windows"], measured["fisher_over_floor"] is None, measured["fisher_precision"]
    assert fisher == ((2, False, resolve_precision("auto", "cpu")) if engine else (None, True, None))
    layers = measured["layers"]
    assert [row["layer"] for row in layers] == [0, 1]
    for row in layers:  # factoring_s is 0 when the script's timer no longer wraps the engine's factoring
        assert 0 < row["factoring_s"] <= row["wall_s"] and row["pass_s"] >= 0
    assert result["measured"]["rss_peak_bytes"] >= result["measured"]["rss_before_bytes"]


def test_offload_bench_runs_each_mode_and_finds_the_same_ranks(tmp_path):
    _run("offload.py", "--tiny", "--layers", "2", "--samples", "4", "--seq-len", "32", "--batch-size", "2",
         "--modes", "none", "disk", "--no-save", "--out", str(tmp_path))
    result = json.loads((tmp_path / "offload-tiny.json").read_text())
    assert set(result["runs"]) == {"none", "disk"}
    assert result["same_ranks"] is True
    for run in result["runs"].values():
        assert run["peak_rss_bytes"] > result["baseline_rss_bytes"] > 0
        assert run["ranks"] and all(rank > 0 for _, rank in run["ranks"])


def test_gram_panels_times_each_panel_width_in_each_mode():
    out = _run("gram_panels.py", "--widths", "40", "--panels", "16", "64", "--repeats", "1")
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [row["mode"] for row in rows] == ["float32", "float32, scaled", "float64"]
    for row in rows:  # a panel as wide as the input or wider is the whole product, not timed twice
        assert set(row["ms"]) == {"whole", "16"} and all(v > 0 for v in row["ms"].values())


def test_the_device_check_runs_every_step_and_leaves_what_the_device_tool_brings_back(tmp_path):
    """bench/device_check.sh on this CPU at tiny sizes: every step passes, and $OUT holds at most 8
    plain files (all that a GPU loan's tool returns)."""
    import os

    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path), "WB_DEVICE": "cpu",
           "WB_LAYER_ARGS": "--preset tiny --layers 2 --samples 2 --seq-len 16", "WB_GRAM_SHAPES": "64x256"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["gram-products.jsonl", "layers-float32-equilibrated-device.json",
                     "layers-float32-equilibrated-eigh.json", "layers-float64-device.json", "log.txt",
                     "machine.txt", "tests.txt"]
    assert " passed" in (tmp_path / "tests.txt").read_text()
    routes = {(r["engine"]["gram_precision"], r["engine"]["svd_route"])
              for r in (json.loads((tmp_path / f).read_text()) for f in files if f.startswith("layers-"))}
    assert routes == {("float64", "device"), ("float32-equilibrated", "device"), ("float32-equilibrated", "eigh")}
