"""One process against a torchrun job of N gloo processes on the CPU: same ranks? same numbers? how long?

    .venv/bin/python bench/distributed.py                       # profiles/quickstart.toml, 16 samples, 2 processes
    .venv/bin/python bench/distributed.py --samples 32 --processes 2 --dir /tmp/dist
    .venv/bin/python bench/distributed.py --smoke               # a tiny random Llama: checks the script, seconds

Runs `python -m workbench run` once in one process (all cores) and once under
`python -m torch.distributed.run --nproc-per-node N` (cores / N threads each, `--threads` to change),
on the profile with `[calibration] samples` set to `--samples`, each into its own output folder, and
prints: wall time of each, the ranks (identical or not), every metric dense and compressed with its
relative difference, and the largest relative difference (Frobenius) of a low-rank weight Q·P.
Exits 1 when the ranks differ. The last line is the same as JSON.
Meant for an otherwise idle machine (the wall times are the point); the lead records the figures
in BENCHMARKS.md with the machine and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_profile(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_model, tiny_profile, write_text_corpus

    save_tiny_model(root / "tiny-llama", layers=4)
    write_text_corpus(root / "corpus.txt")
    path = root / "tiny.toml"
    path.write_text(tiny_profile(root, root / "unused", ratio=0.3, group_size=2, samples=8,
                                 extra="[signals.fisher]\nwindows = 4\n"))
    return path


def with_samples(profile_path: Path, samples: int, folder: Path) -> Path:
    """The profile with `[calibration] samples` replaced, written into `folder` (relative paths kept working)."""
    from workbench.profile.schema import load_profile

    profile = load_profile(profile_path)
    profile = dataclasses.replace(profile, calibration=dataclasses.replace(profile.calibration, samples=samples))
    path = folder / "bench.toml"
    path.write_text(profile.to_toml())
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(command: list[str], threads: int, log: Path) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}; see {log}")
    return seconds


def low_rank_weights(run: Path) -> dict:
    """{module: Q·P in float64} of every low-rank module (single factors may rotate within near-equal
    singular values; their product is what the model computes with)."""
    from workbench import load_compressed
    from workbench.engine.lowrank import LowRankLinear

    model = load_compressed(run)
    return {name: (m.coef.weight.double() @ m.basis.weight.double()).detach() for name, m in model.named_modules()
            if isinstance(m, LowRankLinear)}


def compare(one: Path, many: Path) -> dict:
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, many))
    ranks_a = {r["group"]: r["rank"] for r in a["ranks"]}
    ranks_b = {r["group"]: r["rank"] for r in b["ranks"]}
    metrics = []
    for ma, mb in zip(a["metrics"], b["metrics"]):
        for kind in ("dense", "compressed"):
            x, y = ma.get(kind), mb.get(kind)
            rel = abs(x - y) / abs(x) if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x else None
            metrics.append({"metric": f"{ma['evaluator']} {kind}", "one": x, "many": y, "relative_difference": rel})
    worst = None
    if (one / "model").is_dir() and (many / "model").is_dir():
        qa, qb = low_rank_weights(one), low_rank_weights(many)
        worst = max((float((qa[k] - qb[k]).norm() / qa[k].norm()) if k in qb else float("inf") for k in qa),
                    default=0.0)
    return {"ranks_identical": ranks_a == ranks_b,
            "ranks_differing": sorted(k for k in ranks_a if ranks_a[k] != ranks_b.get(k)),
            "metrics": metrics, "low_rank_weight_difference": worst,
            "tokens": [a["calibration"]["tokens"], b["calibration"]["tokens"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", type=Path, default=ROOT / "profiles" / "quickstart.toml")
    parser.add_argument("--samples", type=int, default=16, help="calibration windows (the profile's are replaced)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="threads per process of the job (default cores / N)")
    parser.add_argument("--dir", type=Path, default=None, help="where the outputs go (default a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama instead of --profile")
    args = parser.parse_args()

    folder = Path(args.dir or tempfile.mkdtemp(prefix="bench-distributed-"))
    folder.mkdir(parents=True, exist_ok=True)
    source = tiny_profile(folder) if args.smoke else args.profile.resolve()
    profile = with_samples(source, args.samples if not args.smoke else 8, folder)
    cores = os.cpu_count() or 1
    threads = args.threads or max(1, cores // args.processes)
    run = [sys.executable, "-m", "workbench", "run", str(profile), "--force", "--skip-preflight", "--log-format",
           "plain", "--output"]
    one_s = timed([*run, str(folder / "one")], cores, folder / "one.log")
    job = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(args.processes),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "workbench", *run[3:]]
    many_s = timed([*job, str(folder / "many")], threads, folder / "many.log")
    result = {"profile": str(source), "samples": args.samples if not args.smoke else 8,
              "processes": args.processes, "threads_one": cores, "threads_each": threads,
              "wall_one_s": round(one_s, 2), "wall_many_s": round(many_s, 2),
              **compare(folder / "one", folder / "many")}
    print(f"profile {result['profile']}, {result['samples']} calibration windows, outputs in {folder}")
    print(f"one process ({cores} threads):            {one_s:8.1f} s")
    print(f"{args.processes} processes ({threads} thread(s) each):   {many_s:8.1f} s")
    print(f"ranks identical: {result['ranks_identical']}" + (
        f" (differ: {', '.join(result['ranks_differing'][:5])})" if result["ranks_differing"] else ""))
    for m in result["metrics"]:
        rel = "n/a" if m["relative_difference"] is None else f"{m['relative_difference']:.1e}"
        print(f"  {m['metric']:<28} {m['one']!s:>22} {m['many']!s:>22}  relative difference {rel}")
    worst = result["low_rank_weight_difference"]
    print("largest difference of a low-rank weight Q·P (relative, Frobenius): "
          + ("n/a (no model saved)" if worst is None else f"{worst:.1e}"))
    print(json.dumps(result))
    return 0 if result["ranks_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
