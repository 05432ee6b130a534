"""Gram products by row panels: time of one chunk's XᵀX for several panel widths, both Gram modes.

For each input width, one chunk of CHUNK_ROWS random rows is accumulated into a float64 Gram with
`add_gram_equilibrated` (float32 products; unscaled, as for activations in range, and forced
scaled) and `add_gram` (float64 products), the panel width set to each candidate; "whole" is one
panel as wide as the input (the whole product). Medians of `--repeats` timed calls after a warm-up.
This is what chose `calibration.PANEL`, `WIDE_PANEL` and `WIDE_FROM`.

    .venv/bin/python bench/gram_panels.py [--widths 576 1536 4096] [--panels 128 256 512 1024] [--repeats 7]

Prints JSON lines, then a Markdown table (ms per chunk).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from datetime import date

import torch

from workbench.engine import calibration

from gram_precision import timed  # bench/ is on the path when this runs as a script


def measure(width: int, panel: int, mode: str, repeats: int, device: torch.device) -> float:
    x = torch.randn(calibration.CHUNK_ROWS, width, device=device)
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    saved = calibration.PANEL, calibration.WIDE_PANEL, calibration.UNSCALED_RANGE
    calibration.PANEL = calibration.WIDE_PANEL = panel
    if mode == "float32, scaled":
        calibration.UNSCALED_RANGE = 1.0  # no channel in range: every chunk scaled
    add = calibration.add_gram if mode == "float64" else calibration.add_gram_equilibrated

    def once():
        with torch.inference_mode():
            add(gram, x)

    try:
        once()  # warm-up
        return statistics.median(timed(once, device) for _ in range(repeats)) * 1e3
    finally:
        calibration.PANEL, calibration.WIDE_PANEL, calibration.UNSCALED_RANGE = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[576, 1536, 4096])
    parser.add_argument("--panels", type=int, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--modes", nargs="+", default=["float32", "float32, scaled", "float64"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, {device}")
    rows = []
    for width in args.widths:
        for mode in args.modes:
            times = {"whole": measure(width, width, mode, args.repeats, device)}
            for panel in args.panels:
                if panel < width:
                    times[str(panel)] = measure(width, panel, mode, args.repeats, device)
            row = {"date": date.today().isoformat(), "machine": machine, "width": width, "rows": calibration.CHUNK_ROWS,
                   "mode": mode, "ms": {k: round(v, 2) for k, v in times.items()}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    columns = ["whole", *map(str, args.panels)]
    print("\n| width | mode | " + " | ".join(f"panel {c}" if c != "whole" else c for c in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in rows:
        cells = [f"{row['ms'][c]:.1f}" if c in row["ms"] else "—" for c in columns]
        print(f"| {row['width']} | {row['mode']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
