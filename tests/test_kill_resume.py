"""bench/kill_resume.py with a few kill points: killed runs leave the output as it was and resume to
the same ranks, metrics and model bytes as an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_runs_killed_at_random_moments_resume_to_identical_results(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "kill_resume.py"), "--kills", "3", "--seed", "3",
                           "--dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kill points tried: 3 (1 SIGINT, 1 SIGKILL, 1 SIGTERM)" in done.stdout
    assert "identical to the uninterrupted run: 3 of 3" in done.stdout
