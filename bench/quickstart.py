"""Benchmark the quickstart: compression time per stage, peak RSS, and the floor.

The floor is one plain forward pass of the dense model (lm_head included) over the same
calibration tokens (same windows, batches of 8), timed in this same invocation, after the run:
`compress_s / floor_s` says how much the engine adds on top of running the model once;
`calibrate_over_floor` and `fisher_over_floor` split it into the layer walk (Grams, factoring)
and the Fisher signal's gradient pass ("sensitivity" stage).

    .venv/bin/python bench/quickstart.py [--profile profiles/quickstart.toml] [--repeats 1]

Prints a JSON object and a Markdown row for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def forward_seconds(model, windows: torch.Tensor, device, batch: int = 8) -> float:
    """One plain forward pass of `model` over `windows`, `batch` at a time (the engine's batches): the
    floor. On a GPU its queued work is waited for before and after."""
    device = torch.device(device)

    def wait():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with torch.inference_mode():
        wait()
        start = time.perf_counter()
        for i in range(0, windows.shape[0], batch):
            model(input_ids=windows[i:i + batch].to(device), use_cache=False)
        wait()
    return time.perf_counter() - start


def floor_seconds(profile, repeats: int) -> float:
    from workbench.sources.text import calibration_windows
    from workbench.sources.models import load_model

    loaded = load_model(profile.model.source, profile.model.dtype, profile.model.device)
    windows = calibration_windows(loaded.tokenizer, profile.calibration.dataset, profile.calibration.samples,
                                  profile.calibration.seq_len, profile.calibration.seed)
    # The whole model, lm_head included.
    return statistics.median(forward_seconds(loaded.model, windows, loaded.device) for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=str(ROOT / "profiles" / "quickstart.toml"))
    parser.add_argument("--repeats", type=int, default=1, help="runs of the floor pass (median)")
    args = parser.parse_args()

    from workbench.profile.schema import load_profile

    profile = load_profile(args.profile)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "workbench.cli", "run", args.profile, "--output", str(out), "--log-format", "plain"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        report = json.loads((out / "report.json").read_text())
    floor = floor_seconds(profile, args.repeats)
    timings = report["timings"]
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, device {report['model']['device']}",
        "profile": args.profile,
        "stages_s": {k: v for k, v in timings.items() if not k.endswith("_s")},
        "compress_s": timings["compress_s"],
        "floor_s": round(floor, 3),
        "compress_over_floor": round(timings["compress_s"] / floor, 2),
        # the issue-16 goals: calibrate / floor ≤ 1.2, compress / floor ≤ 1.5
        "calibrate_over_floor": round(timings.get("calibrate", float("nan")) / floor, 2),
        "fisher_over_floor": round(timings.get("sensitivity", 0.0) / floor, 2),
        "gram_precision": report.get("calibration", {}).get("gram_precision", profile.compression.gram_precision),
        "wall_s": round(wall, 1),
        "peak_rss_gib": round(report["peak_memory"]["rss_bytes"] / 2**30, 2),
        "ratio_targeted": round(report["params"]["ratio_targeted"], 4),
        "metrics": [{k: m.get(k) for k in ("evaluator", "dataset", "dense", "compressed")} for m in report["metrics"]],
        "ranks": {row["group"]: row["rank"] for row in report["ranks"]},  # to compare two runs' allocations
    }
    print(json.dumps(result, indent=2))
    ppl = report["metrics"][0] if report["metrics"] else {}
    stages = result["stages_s"]
    print(f"| {result['date']}, {result['machine']}, gram_precision {result['gram_precision']} | "
          f"{stages.get('calibrate', float('nan')):.1f} | {stages.get('sensitivity', 0.0):.1f} | "
          f"{result['compress_s']:.1f} | {result['floor_s']:.1f} | {result['calibrate_over_floor']} | "
          f"{result['fisher_over_floor']} | {result['compress_over_floor']} | {result['peak_rss_gib']} | "
          f"{ppl.get('dense', float('nan')):.2f} → {ppl.get('compressed', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
