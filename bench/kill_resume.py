"""Kill runs of a tiny model at random moments, resume each, and compare with an uninterrupted run.

    .venv/bin/python bench/kill_resume.py --kills 30 --seed 0 [--profile PROFILE] [--dir DIR]

First one uninterrupted run. Then, per kill point: `workbench run PROFILE --force --log-format json`
(as `python -m workbench.cli`) into an output directory holding only the marker of a workbench output; the JSON
events are read as they come and, after a randomly chosen event plus a random delay (seeded), the
process gets SIGINT, SIGTERM or SIGKILL, in turn. The output directory must then hold exactly the
marker (and nothing else may appear beside it but the `.work` checkpoint directory). The run is
then finished with `--resume --force`, and its ranks (report.json), metrics, and every file of
`model/` byte for byte must equal the uninterrupted run's; the work directory must be gone.

Prints how many kill points were tried and in which stage each run stopped; exits 1 on any
difference. Without --profile it builds a tiny random Llama (6 layers, groups of 2, the Fisher-
based `loss-aware` allocator so the sensitivity stage runs) with the test suite's helpers.
Checkpoints are written after every layer (WORKBENCH_CHECKPOINT_SPACING=0), each run gets an
empty dense-metric cache so the dense evaluation really runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
# An earlier output: --force replaces only a workbench output, which this marker makes it.
MARKER = ".workbench-output"


def tiny_profile(root: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import save_tiny_model, tiny_profile, write_text_corpus

    save_tiny_model(root / "tiny-llama", layers=6)
    write_text_corpus(root / "corpus.txt")
    path = root / "tiny.toml"
    path.write_text(tiny_profile(root, root / "unused", ratio=0.3, group_size=2, samples=16, allocator="loss-aware",
                                 extra="[signals.fisher]\nwindows = 4\n"))
    return path


def _env(scratch: Path) -> dict[str, str]:
    env = dict(os.environ, WORKBENCH_CHECKPOINT_SPACING="0", PYTHONPATH=str(ROOT))
    env["WORKBENCH_DENSE_CACHE"] = tempfile.mkdtemp(prefix="dense-", dir=scratch)  # every run measures
    return env


def _command(profile: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "workbench.cli", "run", str(profile), "--output", str(out), "--log-format",
            "json", *extra]


def run_to_end(profile: Path, out: Path, scratch: Path, *extra: str) -> None:
    done = subprocess.run(_command(profile, out, *extra), env=_env(scratch), capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"run {' '.join(extra)} into {out} exited {done.returncode}:\n{done.stderr[-3000:]}")


def _describe(event: dict) -> str:
    where = f" {event['current']}/{event['total']}" if event.get("current") is not None else ""
    return f"{event['kind']} {event['stage']}{where}"


def run_and_kill(profile: Path, out: Path, scratch: Path, after_event: int, delay: float,
                 sig: signal.Signals) -> tuple[int, str, str, str]:
    """(exit status, stage the run stopped in, the last event it sent, stderr); the signal follows
    event `after_event`. A run stopped right after a stage ended counts as "between stages"."""
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(_command(profile, out, "--force"), env=_env(scratch), stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        open_stages: list[str] = []
        seen, sent, last = 0, False, "none"
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            if event["kind"] == "stage_start":
                open_stages.append(event["stage"])
            elif event["kind"] == "stage_end" and event["stage"] in open_stages:
                open_stages.remove(event["stage"])
            seen += 1
            last = _describe(event)
            if not sent and seen > after_event:
                time.sleep(delay)
                proc.send_signal(sig)
                sent = True
        code = proc.wait(timeout=600)
        stderr.seek(0)
        return code, (open_stages[-1] if open_stages else "between stages"), last, stderr.read()


def model_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "model").rglob("*")) if p.is_file()}


def comparable(out: Path) -> tuple:
    report = json.loads((out / "report.json").read_text())
    metrics = [(m["evaluator"], m["dense"], m["compressed"]) for m in report["metrics"]]
    return report["ranks"], metrics, model_files(out)


def differences(reference: tuple, result: tuple) -> list[str]:
    names = ("ranks", "metrics", "model files")
    found = [name for name, a, b in zip(names, reference, result) if a != b]
    if "model files" in found:
        found += [f"  {name} differs" for name in sorted(set(reference[2]) | set(result[2]))
                  if reference[2].get(name) != result[2].get(name)]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12, help="kill points to try")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", type=Path, help="profile to run (default: a tiny random Llama)")
    parser.add_argument("--dir", type=Path, help="where to put outputs (default: a temporary directory)")
    args = parser.parse_args(argv)

    scratch = args.dir or Path(tempfile.mkdtemp(prefix="kill-resume-"))
    scratch.mkdir(parents=True, exist_ok=True)
    profile = args.profile or tiny_profile(scratch)
    rng = random.Random(args.seed)

    started = time.perf_counter()
    reference_out = scratch / "reference"
    probe = subprocess.Popen(_command(profile, reference_out), env=_env(scratch), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    stdout, stderr = probe.communicate(timeout=600)
    if probe.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed ({probe.returncode}):\n{stderr[-3000:]}")
    events = sum(1 for line in stdout.splitlines() if line.startswith("{"))
    reference = comparable(reference_out)

    stopped: Counter[str] = Counter()
    by_signal: Counter[str] = Counter()
    failures: list[str] = []
    failed_kills: set[int] = set()
    for k in range(args.kills):
        sig = SIGNALS[k % len(SIGNALS)]
        after_event, delay = rng.randrange(events), rng.choice((0.0, 0.0, rng.uniform(0, 0.05)))
        out = scratch / f"killed-{k}"
        out.mkdir()
        (out / MARKER).write_text(json.dumps({"kind": "output", "note": "an earlier run's output"}))
        code, stage, last, err = run_and_kill(profile, out, scratch, after_event, delay, sig)
        by_signal[sig.name] += 1
        where = f"kill {k} ({sig.name} after event {after_event}, +{delay * 1000:.0f} ms)"
        problems: list[str] = []
        finished = (out / "report.json").exists()  # the signal came after the output was published
        print(f"{where}: exit {code}, " + ("finished before the signal" if finished else
                                           f"stopped in {stage}, last event: {last}"), flush=True)
        if finished:
            stopped["finished before the signal"] += 1
        else:
            stopped[stage] += 1
            expected = -signal.SIGKILL if sig == signal.SIGKILL else 130
            if code != expected:
                failures.append(f"{where}: exit {code}, expected {expected}\n{err[-2000:]}")
                failed_kills.add(k)
                continue
            left = sorted(p.name for p in out.iterdir())
            if left != [MARKER]:
                problems.append(f"the output directory was touched: {left}")
            strays = [p.name for p in scratch.iterdir() if p.name.startswith(f".{out.name}.")]
            if strays:
                problems.append(f"left {strays} beside the output")
            if sig != signal.SIGKILL and out.with_name(out.name + ".work").exists() and "--resume" not in err:
                problems.append(f"the message does not say how to resume:\n{err[-1000:]}")
            run_to_end(profile, out, scratch, "--resume", "--force")
        if out.with_name(out.name + ".work").exists():
            problems.append("the work directory is still there after the run finished")
        different = differences(reference, comparable(out))
        if different:
            problems.append("differs from the uninterrupted run in " + "\n".join(different))
        if problems:
            failed_kills.add(k)
            failures += [f"{where}, stopped in {stage}: {p}" for p in problems]

    print(f"kill points tried: {args.kills} ({', '.join(f'{n} {s}' for s, n in sorted(by_signal.items()))})")
    print("stopped in: " + ", ".join(f"{stage} {n}" for stage, n in stopped.most_common()))
    print(f"identical to the uninterrupted run: {args.kills - len(failed_kills)} of {args.kills} "
          f"({time.perf_counter() - started:.0f} s)")
    for failure in failures:
        print("FAILED " + failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
