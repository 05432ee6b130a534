"""Preflight: the run stops before the long work, with the figures, when it cannot fit."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_profile
from workbench.run import preflight
from workbench.cli import app
from workbench.errors import UsageError
from workbench.run.preflight import Shapes, check, estimate

runner = CliRunner()
GB = 1e9
GIB = 2**30


def llama_7b(group: int = 2) -> Shapes:
    """LLaMA-7B as docs/scaling.md works it out: float16, 256 × 2048 tokens, n = 2 on q, k, v, gate, up;
    down_proj (one layer, out < in) factored from its output's Gram, as `plan_groups` marks it."""
    d, m, layers = 4096, 11008, 32
    groups = []
    for _ in range(layers // group):
        groups += [("attn_in", group, d, d)] * 3 + [("mlp_in", group, d, m)] * 2
    groups += [("o_in", 1, d, d), ("down_in", 1, m, d)] * layers
    return Shapes(params=6_740_000_000, dtype_bytes=2, hidden=d, head_dim=128, groups=groups, windows=256,
                  seq_len=2048, ratio=0.2, output_grams=frozenset({"down_in"}))


def test_estimate_agrees_with_the_scaling_doc_for_llama_7b():
    """docs/scaling.md, "Worked out": the LLaMA-7B column, in GiB."""
    est = estimate(llama_7b())
    assert est.inputs == pytest.approx(4.25 * GIB, rel=0.01)
    assert est.grams == pytest.approx(0.75 * GIB, rel=0.01)  # 1.53 with down_proj's input Gram
    assert estimate(replace(llama_7b(), output_grams=frozenset())).grams == pytest.approx(1.53 * GIB, rel=0.01)
    assert est.factors == pytest.approx(24.12 * GIB, rel=0.01)
    assert est.transient == pytest.approx(4.16 * GIB, rel=0.01)  # gate/up stacked in pairs
    assert est.model_file == pytest.approx(10.16 * GIB, rel=0.01)
    assert 2 * 6.74e9 + est.memory == pytest.approx(45.8 * GIB, rel=0.01)  # offload "none", weights included


def test_check_passes_with_room_and_refuses_with_figures():
    est = estimate(llama_7b())
    cpu = torch.device("cpu")
    summary = check(est, Path("runs/x"), cpu, True, disk=lambda _: 10**12, memory=lambda _: 10**12)
    assert summary.startswith("preflight:")
    with pytest.raises(UsageError) as caught:
        check(est, Path("runs/x"), cpu, True, disk=lambda _: 30 * 10**9, memory=lambda _: 16 * 10**9)
    message = str(caught.value)
    # Binary units, as everywhere else: 30·10⁹ bytes are 27.9 GiB.
    assert "not enough free disk space at runs/x" in message and "27.9 GiB is free" in message
    assert "may not fit in cpu memory" in message and "14.9 GiB is available" in message
    assert "calibration.samples" in message and "--skip-preflight" in message


def test_a_resumed_checkpoint_counts_as_already_written():
    est = estimate(llama_7b())
    room = est.model_file + 1
    with pytest.raises(UsageError, match="disk"):
        check(est, Path("o"), torch.device("cpu"), True, disk=lambda _: room, memory=lambda _: 10**12)
    check(est, Path("o"), torch.device("cpu"), True, already_on_disk=est.checkpoint, disk=lambda _: room,
          memory=lambda _: 10**12)


@pytest.mark.parametrize("patch,words", [
    ("free_disk", ["not enough free disk space", "compressed model", "checkpoints"]),
    ("free_memory", ["may not fit in cpu memory", "calibration inputs", "calibration.samples"]),
])
def test_run_stops_before_the_long_work_with_exit_2(tiny_workspace, tmp_path, monkeypatch, patch, words):
    monkeypatch.setattr(preflight, patch, lambda _where: 999)
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(tiny_profile(tiny_workspace, out))
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 2, result.output
    assert all(w in result.output for w in words), result.output
    assert "999 B" in result.output and "Traceback" not in result.output
    assert "evaluate dense" not in result.output  # stopped before the long work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.toml"]  # no output, no work directory
    result = runner.invoke(app, ["run", str(path), "--skip-preflight", "--log-format", "plain"])
    assert result.exit_code == 0, result.output


def test_an_output_path_through_a_file_is_refused(tiny_workspace, tmp_path):
    (tmp_path / "file.txt").write_text("not a directory")
    path = tmp_path / "p.toml"
    path.write_text(tiny_profile(tiny_workspace, tmp_path / "file.txt" / "out"))
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 2, result.output
    assert "cannot create" in result.output and "file.txt" in result.output
