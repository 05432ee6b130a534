"""Workbench never runs code from a model folder: `auto_map` is refused, trust_remote_code is always False."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import tiny_profile
from workbench.sources import models
from workbench.errors import RunFailed, UsageError
from workbench.sources.models import load_model

EVIL = '''
import pathlib
pathlib.Path({sentinel!r}).write_text("the model folder's code ran")
raise RuntimeError("planted code was imported")
'''
PROMPTS = ("[y/N]", "custom code", "trust_remote_code=True", "Do you wish to run")


def _plant(folder, sentinel, *, config=True, tokenizer=True, source=None):
    """A copy of the tiny model whose config / tokenizer config point at a planted modeling_evil.py."""
    shutil.copytree(source, folder)
    (folder / "modeling_evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="evil", architectures=["EvilForCausalLM"],
                   auto_map={"AutoConfig": "modeling_evil.EvilConfig",
                             "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})
        (folder / "config.json").write_text(json.dumps(cfg))
    if tokenizer:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        tok["auto_map"] = {"AutoTokenizer": ["modeling_evil.EvilTokenizer", None]}
        (folder / "tokenizer_config.json").write_text(json.dumps(tok))
    return folder


def _cli(args, cwd, env=None):
    """`workbench ...` in a fresh process whose stdin answers "y" to any question."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-c", "from workbench.cli import main; main()", *args], cwd=cwd,
                          input="y\ny\ny\n", capture_output=True, text=True, env=full_env, timeout=300)


def test_cli_refuses_a_model_folder_with_auto_map_without_asking(tiny_workspace, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    evil = _plant(tmp_path / "evil-model", sentinel, source=tiny_workspace / "tiny-llama")
    text = tiny_profile(tiny_workspace, tmp_path / "out", extra="save_model = false").replace(
        str(tiny_workspace / "tiny-llama"), str(evil))
    (tmp_path / "p.toml").write_text(text)
    result = _cli(["run", str(tmp_path / "p.toml"), "--log-format", "plain"], cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "auto_map" in output and "config.json" in output and "never runs code" in output
    assert not sentinel.exists()
    assert not any(prompt in output for prompt in PROMPTS), output
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()


def _fake_hub_cache(hf_home, repo_id, files):
    """The layout huggingface_hub keeps: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_cli_refuses_a_cached_hub_model_with_auto_map(tiny_workspace, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    evil = _plant(tmp_path / "evil-files", sentinel, source=tiny_workspace / "tiny-llama")
    snapshot = _fake_hub_cache(tmp_path / "hf", "evil-org/evil-model", evil)
    text = tiny_profile(tiny_workspace, tmp_path / "out", extra="save_model = false").replace(
        str(tiny_workspace / "tiny-llama"), "evil-org/evil-model")
    (tmp_path / "p.toml").write_text(text)
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    result = _cli(["run", str(tmp_path / "p.toml"), "--log-format", "plain"], cwd=tmp_path, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "auto_map" in output and str(snapshot.name) in output
    assert not sentinel.exists()
    assert not any(prompt in output for prompt in PROMPTS), output


def test_a_tokenizer_config_with_auto_map_is_refused(tiny_workspace, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    evil = _plant(tmp_path / "evil", sentinel, config=False, source=tiny_workspace / "tiny-llama")
    with pytest.raises(UsageError, match=r"tokenizer_config\.json has the key \"auto_map\""):
        load_model(str(evil), device="cpu")
    assert not sentinel.exists()


def test_transformers_is_never_allowed_to_run_model_code(tiny_workspace, tmp_path, monkeypatch):
    """Behind the auto_map check: even when it is bypassed, transformers is told not to run code."""
    import transformers

    sentinel = tmp_path / "SENTINEL"
    evil = _plant(tmp_path / "evil", sentinel, source=tiny_workspace / "tiny-llama")
    monkeypatch.setattr(models, "refuse_remote_code", lambda folder: None)
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("transformers asked a question"))
    with pytest.raises((RunFailed, ValueError)):
        load_model(str(evil), device="cpu")
    assert not sentinel.exists()

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "unset")))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(tiny_workspace / "tiny-llama"), device="cpu")
    assert seen and all(value is False for _, value in seen), seen


def test_load_compressed_refuses_a_config_with_auto_map(tmp_path):
    from workbench.storage.saving import FORMAT, load_compressed

    sentinel = tmp_path / "SENTINEL"
    model = tmp_path / "run" / "model"
    model.mkdir(parents=True)
    (model / "modeling_evil.py").write_text(EVIL.format(sentinel=str(sentinel)))
    (model / "config.json").write_text(json.dumps({"model_type": "evil", "auto_map": {
        "AutoConfig": "modeling_evil.EvilConfig"}}))
    (model / "compression.json").write_text(json.dumps({"format": FORMAT, "dtype": "float32", "adapter": None,
                                                        "groups": [], "tied": {}, "biases": {}}))
    with pytest.raises(UsageError, match="auto_map") as info:
        load_compressed(tmp_path / "run")
    assert str(model / "config.json") in str(info.value)
    assert not sentinel.exists()
