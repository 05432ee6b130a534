"""`workbench.api` is the one module plugins import from workbench, and importing it stays torch-free."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import workbench.api as api

PLUGINS = Path(__file__).resolve().parent.parent / "plugins"


def workbench_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a `workbench` module other than `workbench.api`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
            if node.module == "workbench":  # `from workbench import api` is fine, anything else is not
                modules = [f"workbench.{alias.name}" for alias in node.names]
        else:
            continue  # relative imports stay inside the plugin's own package
        found += [(node.lineno, m) for m in modules
                  if (m == "workbench" or m.startswith("workbench.")) and m != "workbench.api"]
    return found


def test_the_checker_catches_what_it_should():
    source = ("import workbench.errors\nfrom workbench.engine import allocation\nfrom workbench import registry\n"
              "from workbench.api import Option\nfrom workbench import api\nfrom workbench_allocators.drank import x\n"
              "from . import sibling\nimport workbench\n")
    assert workbench_imports(source) == [(1, "workbench.errors"), (2, "workbench.engine"),
                                         (3, "workbench.registry"), (8, "workbench")]


def plugin_files() -> list[Path]:
    return sorted(p for p in PLUGINS.rglob("*.py") if "__pycache__" not in p.parts)


def test_there_are_plugin_files_to_check():
    names = {p.parent.name for p in plugin_files()}
    assert {"workbench_allocators", "workbench_adapters", "workbench_evaluators", "workbench_depth_ramp"} <= names


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(PLUGINS)))
def test_plugins_import_only_the_public_module(path: Path):
    offending = workbench_imports(path.read_text(encoding="utf-8"))
    assert not offending, f"{path}: import from workbench.api instead of {offending}"


def test_importing_the_api_does_not_import_torch():
    code = "import sys, workbench.api; print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", api.__all__)
def test_every_public_name_resolves(name: str):
    assert getattr(api, name) is not None


def test_public_names_are_unique_and_unknown_ones_fail():
    assert len(api.__all__) == len(set(api.__all__))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        api.not_a_name  # noqa: B018


def test_lazy_names_are_the_engine_objects():
    from workbench.engine.allocation import fit_to_budget
    from workbench.engine.lowrank import LowRankLinear

    assert api.fit_to_budget is fit_to_budget
    assert api.LowRankLinear is LowRankLinear


@pytest.mark.parametrize("fan_in, fan_out, n", [(576, 576, 1), (576, 1536, 1), (1536, 576, 1), (576, 192, 2),
                                                (4096, 11008, 2), (7, 3, 5), (1, 1, 1)])
def test_break_even_rank_is_the_largest_rank_that_stores_fewer_parameters(fan_in, fan_out, n):
    rank = api.break_even_rank(fan_in, fan_out, n)
    dense = n * fan_in * fan_out
    assert rank <= min(fan_in, n * fan_out)
    assert rank * (fan_in + n * fan_out) <= dense
    if rank < min(fan_in, n * fan_out):  # capped by break-even: one more rank would cost more than dense
        assert (rank + 1) * (fan_in + n * fan_out) > dense


def test_plugins_md_lists_every_public_name():
    import re

    text = (PLUGINS.parent / "docs" / "plugins.md").read_text(encoding="utf-8")
    missing = [name for name in api.__all__ if not re.search(rf"`{re.escape(name)}\b", text)]
    assert not missing, f"docs/plugins.md does not mention {missing} (see its 'The public module' table)"
