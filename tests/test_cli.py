"""`workbench run` end to end on a tiny model: report, output safety, exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import workbench
from conftest import tiny_profile
from workbench.cli import app
from workbench.errors import Interrupted
from workbench.events import CancelToken, EventBus
from workbench.run.pipeline import run
from workbench.profile.schema import parse_profile

runner = CliRunner()


def _write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("group_size", [1, 2])
def test_run_writes_report_and_model(tiny_workspace, tmp_path, group_size):
    out = tmp_path / "out"
    path = _write(tmp_path, tiny_profile(tiny_workspace, out, ratio=0.3, group_size=group_size))
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert abs(report["params"]["ratio_targeted"] - 0.3) < 0.005
    assert 0 < report["params"]["ratio_model"] < report["params"]["ratio_targeted"]
    [metric] = report["metrics"]
    assert metric["evaluator"] == "perplexity" and metric["dense"] > 1 and metric["compressed"] > 1
    assert {"calibrate", "allocate", "total_s"} <= set(report["timings"])
    assert report["peak_memory"]["rss_bytes"] > 0
    assert all({"rank", "layers", "in", "out"} <= set(r) for r in report["ranks"])
    assert {len(r["layers"]) for r in report["ranks"]} == {group_size}
    assert report["profile"]["compression"]["ratio"] == 0.3
    # the saved profile is the resolved one and parses back to the same profile
    assert parse_profile((out / "profile.toml").read_text()).compression.ratio == 0.3
    assert (out / "report.md").read_text().startswith("# workbench run")
    # reload gives the same logits as the perplexity the run measured
    model = workbench.load_compressed(out)
    from workbench.sources.text import evaluation_tokens
    from transformers import AutoTokenizer
    from workbench_evaluators.perplexity import perplexity

    tok = AutoTokenizer.from_pretrained(tiny_workspace / "tiny-llama")
    ids = evaluation_tokens(tok, str(tiny_workspace / "corpus.txt"))
    again = perplexity(model, ids, 32, 4, 4, torch.device("cpu"))
    assert again["perplexity"] == pytest.approx(metric["compressed"], rel=1e-5)
    assert "perplexity" in result.output and "removed" in result.output
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_existing_output_is_refused_then_replaced_with_force(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    path = _write(tmp_path, tiny_profile(tiny_workspace, out))
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2
    assert "already exists" in result.output and "--force" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only a workbench output: this folder is the user's (tests/test_hardening_storage.py)
    result = runner.invoke(app, ["run", str(path), "--force"])
    assert result.exit_code == 2 and "not a workbench output" in result.output
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    (out / "report.json").write_text(json.dumps({"workbench_version": "0"}))  # an older run's output
    result = runner.invoke(app, ["run", str(path), "--force", "--log-format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "report.json").read_text())["workbench_version"] != "0"
    kinds = {json.loads(line)["kind"] for line in result.output.splitlines() if line.startswith("{")}
    assert {"stage_start", "progress", "stage_end"} <= kinds


def test_output_option_overrides_profile(tiny_workspace, tmp_path):
    path = _write(tmp_path, tiny_profile(tiny_workspace, tmp_path / "ignored", extra="save_model = false"))
    result = runner.invoke(app, ["run", str(path), "--output", str(tmp_path / "chosen"), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "chosen" / "report.json").exists() and not (tmp_path / "ignored").exists()
    assert not (tmp_path / "chosen" / "model").exists()


@pytest.mark.parametrize("stage", ["calibrate", "evaluate compressed"])
def test_interrupt_leaves_output_as_it_was(tiny_workspace, tmp_path, stage):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"workbench_version": "old result"}')  # an earlier run's output
    profile = parse_profile(tiny_profile(tiny_workspace, out))
    cancel = CancelToken()

    def listener(event):
        if event.stage == stage and event.kind in ("progress", "stage_start"):
            cancel.cancel("test interrupt")

    with pytest.raises(Interrupted):
        run(profile, force=True, events=EventBus([listener]), cancel=cancel)
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert "old result" in (out / "report.json").read_text()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_failing_evaluator_keeps_model_and_exits_1(tiny_workspace, tmp_path, monkeypatch):
    out = tmp_path / "out"
    path = _write(tmp_path, tiny_profile(tiny_workspace, out))
    from workbench.registry import get_registry

    evaluator_class = type(get_registry().evaluators["perplexity"])
    original = evaluator_class.evaluate

    def flaky(self, model, tokenizer, options, ctx):
        if ctx.label == "compressed":
            raise RuntimeError("evaluator exploded")
        return original(self, model, tokenizer, options, ctx)

    monkeypatch.setattr(evaluator_class, "evaluate", flaky)
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 1
    assert "perplexity" in result.output and "exploded" in result.output
    report = json.loads((out / "report.json").read_text())
    assert "exploded" in report["metrics"][0]["error"]
    assert (out / "model" / "model.safetensors").exists()


def test_dense_metric_is_cached(tiny_workspace, tmp_path):
    events = []
    for name in ("a", "b"):
        profile = parse_profile(tiny_profile(tiny_workspace, tmp_path / name, extra="save_model = false"))
        bus = EventBus([events.append])
        run(profile, events=bus)
    cached = [e for e in events if "cached dense result" in e.message]
    assert len(cached) == 1


@pytest.mark.parametrize("snippet,key", [
    ("[compression]\nratoi = 0.2\n", "ratio"),
    ("[compression]\nratio = 1.0\n", "compression.ratio"),
    ("[compression]\nratio = \"high\"\n", "compression.ratio"),
    ("[calibration]\nsamples = 0\n", "calibration.samples"),
    ("[compression]\ngroup_size = 0\n", "compression.group_size"),
    ("[compression]\nallocator = \"unifrom\"\n", "uniform"),
    ("[model]\nsource = \"./no/such/model\"\n", "model.source"),
    ("[model\nsource = 1\n", "p.toml:1:"),
])
def test_broken_profiles_exit_2_naming_the_key(tmp_path, snippet, key):
    path = _write(tmp_path, snippet)
    for command in (["run", str(path)], ["profile", "validate", str(path)]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert key in result.output and str(path) in result.output
        assert "Traceback" not in result.output


def test_unclaimed_model_exits_2_with_supported_list(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    from conftest import write_text_corpus

    write_text_corpus(tmp_path / "c.txt")
    path = _write(tmp_path, f'[model]\nsource = "{tmp_path / "gpt2"}"\n[calibration]\ndataset = "{tmp_path / "c.txt"}"\n'
                            f'[output]\ndir = "{tmp_path / "o"}"\n')
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 2, result.output
    assert "no architecture adapter" in result.output and "llama" in result.output


def test_unexpected_error_exits_1_naming_the_stage(tiny_workspace, tmp_path, monkeypatch):
    import workbench.engine.compress as engine

    def broken(*args, **kwargs):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(engine, "whitened_svd", broken)
    path = _write(tmp_path, tiny_profile(tiny_workspace, tmp_path / "out"))
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 1
    assert "stage 'calibrate' failed" in result.output and "simulated kernel failure" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
