"""The embedded SmolLM2-135M end to end, with a small calibration set (marked: slower)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import workbench
from workbench.cli import app

pytestmark = pytest.mark.embedded

PROFILE = """
[model]
source = "embedded:smollm2-135m"
device = "cpu"
[calibration]
dataset = "embedded:wiki-vital"
samples = 4
seq_len = 128
[compression]
ratio = 0.2
group_size = {group_size}
[[evaluate]]
evaluator = "perplexity"
dataset = "embedded:wiki-vital"
seq_len = 128
max_windows = 4
[output]
dir = "{out}"
"""


@pytest.mark.parametrize("group_size", [1, 2])
def test_quickstart_shape_run_on_the_embedded_model(tmp_path, group_size):
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(PROFILE.format(group_size=group_size, out=out))
    result = CliRunner().invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert abs(report["params"]["ratio_targeted"] - 0.2) < 0.005
    assert report["model"]["adapter"] == "llama"
    assert len(report["ranks"]) == 7 * 30 // group_size
    [metric] = report["metrics"]
    # SmolLM2 on Wikipedia summaries: dense perplexity is ~15 at 512 tokens, higher at 128
    assert 5 < metric["dense"] < 60
    assert metric["dense"] < metric["compressed"] < 50 * metric["dense"]
    model = workbench.load_compressed(out)
    ids = torch.arange(100, 164)[None]
    from workbench.sources.models import load_model

    assert model(ids).logits.isfinite().all()
    assert sum(p.numel() for p in model.parameters()) == report["params"]["model_compressed"]
    assert load_model("embedded:smollm2-135m").model.config.num_key_value_heads == 3
