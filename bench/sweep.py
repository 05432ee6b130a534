"""A sweep against the same cells run one by one: wall time, and whether ranks and metrics agree per cell.

Runs `workbench run PROFILE` (a profile with a [sweep], default profiles/quickstart-sweep.toml) once,
then each cell as its own `workbench run` of the cell's profile (the sweep's, with that cell's
[compression] values and no [sweep]), each a fresh process, as a user would. Compares every cell's
ranks and metrics (exactly) and prints a Markdown row for BENCHMARKS.md; writes sweep-bench.json.

    .venv/bin/python bench/sweep.py [--profile profiles/quickstart-sweep.toml] [--out bench/results/sweep]
    .venv/bin/python bench/sweep.py --cells 0.2-uniform 0.5-loss-aware   # a subset run separately
                                                                         # (their mean extrapolated)

Separate runs reuse the dense-metric cache, as repeated runs do for a user; `--fresh-dense-cache`
gives every process an empty one (the sweep too), for the cost of fully independent runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def workbench_run(profile: Path, output: Path, log: Path, env: dict[str, str]) -> float:
    """`workbench run` in a fresh process; its wall time in seconds (exit status checked)."""
    command = [sys.executable, "-m", "workbench.cli", "run", str(profile), "--output", str(output), "--force",
               "--log-format", "plain"]
    start = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {done.returncode}; see {log}")
    return seconds


def cell_result(folder: Path) -> tuple[list, list]:
    report = json.loads((folder / "report.json").read_text())
    ranks = [(r["group"], r["rank"]) for r in report["ranks"]]
    metrics = [(m.get("evaluator"), m.get("dense"), m.get("compressed")) for m in report["metrics"]]
    return ranks, metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=str(ROOT / "profiles" / "quickstart-sweep.toml"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "sweep"))
    parser.add_argument("--cells", nargs="*", default=None, help="cell names to run separately (default: all)")
    parser.add_argument("--fresh-dense-cache", action="store_true", help="an empty dense-metric cache per process")
    args = parser.parse_args()

    import torch

    from workbench.profile.schema import load_profile
    from workbench.profile.sweep import cell_profile

    profile = load_profile(args.profile)
    if profile.sweep is None:
        sys.exit(f"{args.profile} has no [sweep] table")
    cells = profile.sweep.cells()
    names = [c.name for c in cells]
    chosen = [c for c in cells if args.cells is None or c.name in args.cells]
    unknown = sorted(set(args.cells or ()) - set(names))
    if unknown:
        sys.exit(f"unknown cell(s) {', '.join(unknown)}; the sweep's cells: {', '.join(names)}")
    out = Path(args.out).resolve()
    (out / "profiles").mkdir(parents=True, exist_ok=True)

    def env() -> dict[str, str]:
        environment = dict(os.environ)
        if args.fresh_dense_cache:
            environment["WORKBENCH_DENSE_CACHE"] = tempfile.mkdtemp(prefix="dense-", dir=out)
        return environment

    sweep_s = workbench_run(Path(args.profile).resolve(), out / "sweep", out / "sweep.log", env())
    print(f"sweep of {len(cells)} cells: {sweep_s:.0f} s", flush=True)
    rows = []
    for cell in chosen:
        path = out / "profiles" / f"{cell.name}.toml"
        path.write_text(cell_profile(profile, cell, out / "separate").to_toml())
        seconds = workbench_run(path, out / "separate" / cell.name, out / f"{cell.name}.log", env())
        swept, alone = cell_result(out / "sweep" / cell.name), cell_result(out / "separate" / cell.name)
        rows.append({"cell": cell.name, "seconds": round(seconds, 1), "ranks_identical": swept[0] == alone[0],
                     "metrics_identical": swept[1] == alone[1], "metrics_sweep": swept[1], "metrics_alone": alone[1]})
        print(f"{cell.name:<28} {seconds:6.0f} s  ranks {'=' if rows[-1]['ranks_identical'] else '≠'}  "
              f"metrics {'=' if rows[-1]['metrics_identical'] else '≠'}", flush=True)
    separate_s = sum(r["seconds"] for r in rows)
    estimated = separate_s / len(rows) * len(cells) if rows else float("nan")
    result = {"date": date.today().isoformat(), "profile": str(args.profile),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "fresh_dense_cache": args.fresh_dense_cache, "cells": len(cells), "cells_run_separately": len(rows),
              "sweep_s": round(sweep_s, 1), "separate_s": round(separate_s, 1),
              "separate_s_all_cells": round(estimated, 1), "ratio": round(sweep_s / estimated, 3),
              "all_identical": all(r["ranks_identical"] and r["metrics_identical"] for r in rows), "rows": rows}
    (out / "sweep-bench.json").write_text(json.dumps(result, indent=2))
    extrapolated = "" if len(rows) == len(cells) else f" (mean of {len(rows)} × {len(cells)})"
    print("\n| date | profile | cells | sweep | separate runs | sweep / separate | ranks and metrics identical |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {result['date']} | {Path(args.profile).name} | {len(cells)} | {sweep_s:.0f} s | {estimated:.0f} s"
          f"{extrapolated} | {result['ratio']:.0%} | {'yes' if result['all_identical'] else 'NO'} "
          f"({len(rows)} cells) |")


if __name__ == "__main__":
    main()
