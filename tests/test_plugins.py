"""Plugin loading: built-ins via entry points, broken plugins contained, typos rejected."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from workbench.cli import app
from workbench.errors import PluginError
from workbench.registry import load_registry


def _install_fake(tmp_path, monkeypatch, name: str, version: str, source: str):
    """A real (if minimal) installed distribution with a `workbench` entry point."""
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    dist = tmp_path / f"{name}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(f"[workbench]\n{name} = {name}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_builtins_load_through_entry_points():
    registry = load_registry(strict=True)
    assert "uniform" in registry.allocators
    assert "llama" in registry.adapters
    assert "perplexity" in registry.evaluators
    names = {p.name for p in registry.plugins}
    assert {"allocators", "adapters", "evaluators"} <= names
    assert all(p.distribution == "workbench" for p in registry.plugins if p.name in ("allocators", "adapters"))


def test_broken_plugin_is_reported_and_others_keep_working(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, "wb_broken", "1.2.3", "raise ImportError('needs frobnicate')\n")
    registry = load_registry(strict=False)
    assert "uniform" in registry.allocators
    [failure] = [f for f in registry.failures if f.name == "wb_broken"]
    text = str(failure)
    assert "wb_broken" in text and "1.2.3" in text and "frobnicate" in text


def test_strict_mode_makes_a_broken_plugin_fatal(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, "wb_broken2", "0.1", "raise RuntimeError('boom')\n")
    monkeypatch.setenv("WORKBENCH_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="wb_broken2.*0.1"):
        load_registry()


def test_misspelt_hook_is_rejected(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, "wb_typo", "2.0", """
        from workbench.hookspecs import hookimpl

        @hookimpl
        def register_alocators(register):
            pass
    """)
    registry = load_registry(strict=False)
    [failure] = [f for f in registry.failures if f.name == "wb_typo"]
    assert "register_alocators" in failure.error
    # the rejected plugin left nothing behind and did not break later hooks
    assert "uniform" in registry.allocators


def test_plugin_that_raises_while_registering_is_rolled_back(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, "wb_half", "3.0", """
        from workbench.hookspecs import hookimpl
        from workbench.api import Allocator

        class Fine(Allocator):
            name = "half-fine"
            def allocate(self, groups, budget, options):
                return {}

        @hookimpl
        def register_allocators(register):
            register(Fine())
            raise ValueError("second allocator broken")
    """)
    registry = load_registry(strict=False)
    assert "half-fine" not in registry.allocators
    assert any(f.name == "wb_half" and "second allocator broken" in f.error for f in registry.failures)


def test_third_party_allocator_registers(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, "wb_extra", "0.9", """
        from workbench.hookspecs import hookimpl
        from workbench.api import Allocator, Option

        class Halves(Allocator):
            name = "halves"
            description = "half of every group's useful rank"
            options = (Option("scale", float, 0.5, min=0.0, max=1.0),)
            def allocate(self, groups, budget, options):
                return {g.key: max(1, int(g.max_rank * options["scale"])) for g in groups}

        @hookimpl
        def register_allocators(register):
            register(Halves)
    """)
    registry = load_registry(strict=True)
    assert registry.allocators["halves"].options[0].name == "scale"
    assert "wb_extra 0.9" in registry.describe("allocator", "halves")


def test_plugins_command_lists_versions(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, "wb_broken3", "4.5.6", "raise ImportError('nope')\n")
    import workbench.registry as plugins

    monkeypatch.setattr(plugins, "_cached", None)
    result = CliRunner().invoke(app, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    provides = {x for p in data["plugins"] for x in p["provides"]}
    assert {"allocator:uniform", "adapter:llama", "evaluator:perplexity"} <= provides
    assert any(f["name"] == "wb_broken3" and f["version"] == "4.5.6" for f in data["failures"])
    monkeypatch.setattr(plugins, "_cached", None)
