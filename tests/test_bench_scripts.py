"""The benchmark scripts still run against the engine they measure.

Nothing else calls them, so a change to an engine signature can break one silently until the next
measurement (bench/layer_shapes.py did once). Each runs here at its smoke-test size and its report
is checked for what the benchmark exists to say."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_layer_shapes_measures_a_pass_and_a_factoring_per_layer(tmp_path):
    out = tmp_path / "shapes.json"
    _run("layer_shapes.py", "--preset", "tiny", "--layers", "2", "--samples", "2", "--seq-len", "16",
         "--json", str(out))
    result = json.loads(out.read_text())
    layers = result["measured"]["layers"]
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
