"""Documentation that must not drift: every hook is documented, every built-in is listed."""

from __future__ import annotations

import re
from pathlib import Path

from workbench import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def _hook_names() -> list[str]:
    return [name for name, obj in vars(hookspecs).items()
            if callable(obj) and hasattr(obj, "workbench_spec")]


def test_there_are_hooks():
    assert set(_hook_names()) >= {"register_allocators", "register_adapters", "register_evaluators"}


def test_every_hook_has_a_section_in_plugins_md():
    text = (ROOT / "docs" / "plugins.md").read_text()
    headings = set(re.findall(r"^### (\w+)$", text, flags=re.M))
    missing = [name for name in _hook_names() if name not in headings]
    assert not missing, f"hooks without a '### name' section in docs/plugins.md: {missing}"


def test_readme_commands_exist():
    readme = (ROOT / "README.md").read_text()
    for script in re.findall(r"^bash (scripts/\S+)", readme, flags=re.M):
        assert (ROOT / script).exists(), script
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme


def test_changelog_has_unreleased_on_top():
    text = (ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert versions and versions[0] == "Unreleased"
