"""`workbench inspect PROFILE`: effective ranks and each allocator's ranks, without compressing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_profile
from workbench.cli import app


@pytest.fixture
def profile_file(tiny_workspace, tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(tiny_profile(tiny_workspace, tmp_path / "never-written", ratio=0.4))
    return path


def test_inspect_table_json_and_plot(profile_file, tmp_path):
    names = "uniform,drank,drank-rebalanced,protect-first,loss-aware"
    result = CliRunner().invoke(app, ["inspect", str(profile_file), "--allocators", names, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["allocators"] == names.split(",") and data["ratio"] == 0.4
    assert len(data["rows"]) == 4 * 7
    for name in data["allocators"]:
        assert abs(data["ratio_targeted"][name] - 0.4) < 0.005
    row = next(r for r in data["rows"] if r["group"] == "q_proj@0")
    assert row["max_rank"] == 32 and 1 <= row["effective_rank"] <= 64
    assert row["ranks"]["protect-first"] == 32  # layer 0 kept at break-even
    assert not (tmp_path / "never-written").exists()  # nothing compressed, nothing written

    plot = tmp_path / "map.png"
    result = CliRunner().invoke(app, ["inspect", str(profile_file), "--allocators", "uniform,drank",
                                      "--ratio", "0.3", "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[1].split() == ["layers", "type", "in×out", "max", "R_eff", "uniform", "drank"]
    first = lines[2].split()
    assert first[:4] == ["0", "q_proj", "64×64", "32"]
    assert "ratio achieved: uniform 0.30" in result.output
    pytest.importorskip("matplotlib")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_names_an_unknown_allocator(profile_file):
    result = CliRunner().invoke(app, ["inspect", str(profile_file), "--allocators", "drnak"])
    assert result.exit_code == 2 and "did you mean 'drank'" in result.output
