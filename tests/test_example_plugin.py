"""The example third-party allocator (plugins/examples/depth-ramp): built, installed, used from a profile."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import tiny_profile
from workbench.cli import app

EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "examples" / "depth-ramp"


def _install(package: Path, module: str, tmp_path: Path, monkeypatch):
    """Build `package`'s wheel with hatchling (offline) and pip-install it into a folder on sys.path."""
    from hatchling.builders.wheel import WheelBuilder

    [wheel] = list(WheelBuilder(str(package)).build(directory=str(tmp_path / "dist")))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
                    "--target", str(site), wheel], check=True)
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    import workbench.registry as plugins

    monkeypatch.setattr(plugins, "_cached", None)
    yield site
    monkeypatch.delitem(sys.modules, module, raising=False)


@pytest.fixture
def installed_example(tmp_path, monkeypatch):
    yield from _install(EXAMPLE, "workbench_depth_ramp", tmp_path, monkeypatch)


def test_example_plugin_installs_and_runs_from_a_profile(installed_example, tiny_workspace, tmp_path):
    from workbench.registry import load_registry

    registry = load_registry(strict=True)
    assert registry.describe("allocator", "depth-ramp") == "allocator 'depth-ramp' from workbench-depth-ramp 0.1.0"

    out = tmp_path / "out"
    text = tiny_profile(tiny_workspace, out, ratio=0.3, allocator="depth-ramp", allocator_options="slope = 0.6\n")
    profile = tmp_path / "p.toml"
    profile.write_text(text)
    result = CliRunner().invoke(app, ["run", str(profile), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["allocator"] == {"name": "depth-ramp", "options": {"slope": 0.6}, "notes": {"slope": 0.6}}
    assert abs(report["params"]["ratio_targeted"] - 0.3) < 0.005
    q = {row["layers"][0]: row["rank"] for row in report["ranks"] if row["type"] == "q_proj"}
    assert q[0] > q[3]  # the ramp favours early layers

    # a wrong option type is refused before any work, naming the key
    profile.write_text(text.replace("slope = 0.6", 'slope = "steep"'))
    result = CliRunner().invoke(app, ["run", str(profile)])
    assert result.exit_code == 2 and "compression.allocator_options.slope" in result.output


WEIGHT_ENERGY = EXAMPLE.parent / "weight-energy"


@pytest.fixture
def installed_signal_example(tmp_path, monkeypatch):
    """The example signal package (plugins/examples/weight-energy), built and installed like depth-ramp."""
    yield from _install(WEIGHT_ENERGY, "workbench_weight_energy", tmp_path, monkeypatch)


def test_example_signal_package_provides_a_signal_its_allocator_needs(installed_signal_example, tiny_workspace,
                                                                     tmp_path):
    from workbench.registry import load_registry

    registry = load_registry(strict=True)
    assert registry.describe("signal", "weight-energy") == "signal 'weight-energy' from workbench-weight-energy 0.1.0"
    assert registry.allocators["energy-greedy"].needs == ("weight-energy",)

    out = tmp_path / "out"
    text = tiny_profile(tiny_workspace, out, ratio=0.3, allocator="energy-greedy",
                        extra="[signals.weight-energy]\nrelative = true\n")
    profile = tmp_path / "p.toml"
    profile.write_text(text)
    result = CliRunner().invoke(app, ["run", str(profile), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["profile"]["signals"] == {"weight-energy": {"relative": True}}
    assert "sensitivity" in report["timings"]  # the signal stage ran, and counts in compress_s
    assert abs(report["params"]["ratio_targeted"] - 0.3) < 0.005
    assert report["allocator"]["notes"]["components_kept"] == sum(row["rank"] for row in report["ranks"])

    # the signal's declared options are checked like any other key
    profile.write_text(text.replace("relative = true", "relative = 3"))
    result = CliRunner().invoke(app, ["run", str(profile)])
    assert result.exit_code == 2 and "signals.weight-energy.relative" in result.output

