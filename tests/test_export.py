"""`workbench export`: the hf folder loads in plain transformers with workbench unimportable, logits
equal to `load_compressed`'s; the dense folder is the standard architecture with the same logits;
a damaged run directory or an occupied destination is refused with exit 2 and a clear message."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import workbench
from conftest import save_tiny_model, tiny_profile, write_text_corpus
from workbench.cli import app
from workbench.profile.schema import parse_profile
from workbench.run.pipeline import run

runner = CliRunner()

# name -> (family, kv_heads, group_size, tied embeddings)
CASES = {
    "llama-mha": ("llama", 4, 1, False),
    "llama-gqa": ("llama", 2, 1, False),
    "mistral": ("mistral", 2, 1, False),
    "qwen2": ("qwen2", 2, 1, True),
    "llama-mha-shared": ("llama", 4, 2, False),
}
SHARDED = "llama-gqa-sharded"
IDS = torch.randint(0, 120, (2, 24), generator=torch.Generator().manual_seed(3))


def _make_run(root, name, family, kv_heads, group_size, tie):
    model_dir = root / f"model-{name}"
    save_tiny_model(model_dir, kv_heads=kv_heads, family=family, tie=tie)
    text = tiny_profile(root, root / "runs" / name, ratio=0.3, group_size=group_size)
    profile = parse_profile(text.replace(str(root / "tiny-llama"), str(model_dir)))
    run(profile)
    return root / "runs" / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    write_text_corpus(root / "corpus.txt")
    return {name: _make_run(root, name, *case) for name, case in CASES.items()}


# Runs with workbench unimportable: a meta-path finder refuses it before anything else is imported.
NO_WORKBENCH = textwrap.dedent('''
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0].startswith("workbench"):
                raise ImportError(f"{name}: workbench is not installed here")

    sys.meta_path.insert(0, Refuse())
    try:
        import workbench
    except ImportError:
        pass
    else:
        raise SystemExit("workbench is still importable")

    import json
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    jobs = json.loads(sys.argv[1])
    ids = torch.load(sys.argv[2])
    for folder, out in jobs:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with torch.no_grad():
            logits = model(ids).logits
            tokens = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
        torch.save({"logits": logits, "tokens": tokens, "class": type(model).__name__,
                    "vocab": len(tokenizer)}, out)
    assert not [m for m in sys.modules if m.startswith("workbench")]
''')


@pytest.fixture(scope="module")
def hf_exports(runs, tmp_path_factory):
    """Every case exported (one also sharded), loaded in one subprocess without workbench."""
    root = tmp_path_factory.mktemp("hf")
    jobs, folders = [], {}
    for name, run_dir in [*runs.items(), (SHARDED, runs["llama-gqa"])]:
        folders[name] = root / name
        options = ["--max-shard-size", "60KB"] if name == SHARDED else []
        result = runner.invoke(app, ["export", str(run_dir), "--to", str(folders[name]), *options])
        assert result.exit_code == 0, result.output
        jobs.append([str(folders[name]), str(root / f"{name}.pt")])
    _load_without_workbench(jobs, IDS, root)
    return {name: (folders[name], torch.load(root / f"{name}.pt")) for name in folders}


def _load_without_workbench(jobs, ids, root):
    """Run NO_WORKBENCH on [[export folder, result file], ...] in a fresh interpreter."""
    torch.save(ids, root / "ids.pt")
    (root / "check.py").write_text(NO_WORKBENCH)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(root / "hf-home"), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(root / "check.py"), json.dumps(jobs), str(root / "ids.pt")],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _reference(run_dir):
    model = workbench.load_compressed(run_dir)
    with torch.no_grad():
        return model, model(IDS).logits


@pytest.mark.parametrize("name", [*CASES, SHARDED])
def test_hf_export_loads_without_workbench_with_equal_logits(name, runs, hf_exports):
    run_dir = runs["llama-gqa" if name == SHARDED else name]
    model, expected = _reference(run_dir)
    folder, loaded = hf_exports[name]
    family = CASES.get(name, CASES["llama-gqa"])[0]
    assert loaded["class"] == {"llama": "LowRankLlamaForCausalLM", "mistral": "LowRankMistralForCausalLM",
                               "qwen2": "LowRankQwen2ForCausalLM"}[family]
    torch.testing.assert_close(loaded["logits"], expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        tokens = model.generate(IDS[:1, :8], max_new_tokens=6, do_sample=False)
    assert torch.equal(loaded["tokens"], tokens)
    assert loaded["vocab"] > 100  # the tokenizer came along
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == f"lowrank_{family}"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    assert (folder / "generation_config.json").is_file()


def test_shared_basis_is_stored_once_and_the_export_is_no_bigger(runs, hf_exports):
    folder, _ = hf_exports["llama-mha-shared"]
    manifest = json.loads((runs["llama-mha-shared"] / "model" / "compression.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    bases = [k for k in tensors if k.startswith("lowrank_bases.")]
    assert len(bases) == len(manifest["groups"]) and all(len(g["modules"]) == 2 for g in manifest["groups"])
    assert not [k for k in tensors if k.endswith(".basis")]

    def weight_bytes(path):
        return sum(p.stat().st_size for p in path.glob("*.safetensors"))

    assert weight_bytes(folder) <= weight_bytes(runs["llama-mha-shared"] / "model")


def test_sharded_export_has_an_index(hf_exports):
    folder, _ = hf_exports[SHARDED]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)
    assert not (folder / "model.safetensors").exists()


def test_model_card_describes_the_run(runs, hf_exports):
    folder, _ = hf_exports["llama-mha-shared"]
    card = (folder / "README.md").read_text()
    report = json.loads((runs["llama-mha-shared"] / "report.json").read_text())
    assert "Basis Sharing" in card and report["allocator"]["name"] in card
    assert f"{100 * report['params']['ratio_targeted']:.1f}%" in card
    assert f"{100 * report['params']['ratio_model']:.1f}%" in card
    assert f"{report['metrics'][0]['dense']:.4g}" in card and f"{report['metrics'][0]['compressed']:.4g}" in card
    assert "ratio = 0.3" in card and workbench.__version__ in card  # resolved profile, version
    assert "trust_remote_code=True" in card


@pytest.mark.parametrize("name", list(CASES))
def test_dense_export_is_the_standard_architecture_with_equal_logits(name, runs, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "dense"
    result = runner.invoke(app, ["export", str(runs[name]), "--to", str(out), "--format", "dense"])
    assert result.exit_code == 0, result.output
    assert "saves no space" in result.output
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["model_type"] == CASES[name][0]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    _, expected = _reference(runs[name])
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, expected, atol=1e-4, rtol=1e-4)
    assert "no smaller than the original model" in (out / "README.md").read_text()


# --- refusals ------------------------------------------------------------------------------------


def test_workbench_never_runs_an_exports_code(hf_exports, tmp_path):
    """An export asks for trust_remote_code; workbench refuses it as a model source instead of running it."""
    from workbench.errors import UsageError
    from workbench.sources.models import load_model

    folder = tmp_path / "planted"
    shutil.copytree(hf_exports["llama-gqa"][0], folder)
    sentinel = tmp_path / "SENTINEL"
    code = folder / "modeling_lowrank.py"
    code.write_text(f"open({str(sentinel)!r}, 'w').write('ran')\n" + code.read_text())
    with pytest.raises(UsageError, match="auto_map"):
        load_model(str(folder), device="cpu")
    result = runner.invoke(app, ["generate", str(folder), "the cat"])
    assert result.exit_code == 2 and "no compressed model" in result.output
    assert not sentinel.exists()



def _copy(run_dir, tmp_path):
    copy = tmp_path / "run-copy"
    shutil.copytree(run_dir, copy)
    return copy


def _edit_tensors(run_dir, change):
    path = run_dir / "model" / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "workbench.compressed/1"})


def _export(run_dir, to, *extra):
    return runner.invoke(app, ["export", str(run_dir), "--to", str(to), *extra])


def _first_coef(tensors):
    return next(k for k in sorted(tensors) if k.endswith(".coef"))


@pytest.mark.parametrize("fmt", ["hf", "dense"])
def test_missing_tensor_is_refused(runs, tmp_path, fmt):
    damaged = _copy(runs["llama-gqa"], tmp_path)
    removed = []
    _edit_tensors(damaged, lambda t: removed.append(t.pop(_first_coef(t))))
    result = _export(damaged, tmp_path / "x", "--format", fmt)
    assert result.exit_code == 2, result.output
    assert "missing tensor model.layers." in result.output and "modified or is damaged" in result.output
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial-*"))


def test_wrong_shape_is_refused(runs, tmp_path):
    damaged = _copy(runs["qwen2"], tmp_path)

    def widen(tensors):
        name = _first_coef(tensors)
        tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)

    _edit_tensors(damaged, widen)
    result = _export(damaged, tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert ".coef is (" in result.output and "expected (" in result.output


@pytest.mark.parametrize("edit, words", [
    ({"architectures": ["EvilForCausalLM"]}, "name an unknown class"),
    ({"model_type": "evil"}, "model_type 'evil' is not one workbench exports"),
    ({"auto_map": {"AutoModelForCausalLM": "evil.Evil"}}, "never runs code"),
])
def test_config_naming_an_unknown_class_is_refused(runs, tmp_path, edit, words):
    damaged = _copy(runs["mistral"], tmp_path)
    config = damaged / "model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **edit}))
    for command in (["export", str(damaged), "--to", str(tmp_path / "x")], ["generate", str(damaged), "the cat"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, result.output
        assert words in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": "workbench.compressed/1", "dtype": "float32",
                                                               "groups": [{"group": "g"}]})])
def test_garbled_manifest_is_refused(runs, tmp_path, content):
    damaged = _copy(runs["llama-gqa"], tmp_path)
    (damaged / "model" / "compression.json").write_text(content)
    result = _export(damaged, tmp_path / "x")
    assert result.exit_code == 2, result.output
    assert "compression.json" in result.output


def test_a_run_without_a_model_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    result = _export(tmp_path / "run", tmp_path / "x")
    assert result.exit_code == 2 and "save_model = false" in result.output


def test_non_empty_destination_needs_force_and_foreign_files_are_never_replaced(runs, tmp_path):
    target = tmp_path / "exp"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    result = _export(runs["llama-gqa"], target)
    assert result.exit_code == 2 and "--force" in result.output
    result = _export(runs["llama-gqa"], target, "--force")
    assert result.exit_code == 2 and "notes.txt" in result.output
    assert (target / "notes.txt").read_text() == "mine" and len(list(target.iterdir())) == 1


def test_force_replaces_an_earlier_export_and_an_empty_folder_needs_no_force(runs, tmp_path):
    target = tmp_path / "exp"
    target.mkdir()
    assert _export(runs["llama-gqa"], target).exit_code == 0
    first = (target / "config.json").read_text()
    assert _export(runs["mistral"], target, "--format", "dense").exit_code == 2  # not empty any more
    result = _export(runs["mistral"], target, "--format", "dense", "--force")
    assert result.exit_code == 0, result.output
    assert (target / "config.json").read_text() != first and not (target / "modeling_lowrank.py").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no staging or replaced folder left


@pytest.mark.parametrize("where", ["itself", "inside"])
def test_destination_overlapping_the_run_is_refused(runs, tmp_path, where):
    run_dir = _copy(runs["llama-gqa"], tmp_path)
    target = run_dir if where == "itself" else run_dir / "export"
    result = _export(run_dir, target, "--force")
    assert result.exit_code == 2 and "outside the run directory" in result.output
    assert (run_dir / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("options, words", [
    (["--format", "gguf"], "unknown format 'gguf'"), (["--max-shard-size", "lots"], "not a size")])
def test_bad_options_exit_2(runs, tmp_path, options, words):
    result = _export(runs["llama-gqa"], tmp_path / "x", *options)
    assert result.exit_code == 2 and words in result.output


def test_export_code_is_packaged_and_imports_only_torch_and_transformers(tmp_path):
    import ast
    import zipfile
    from pathlib import Path

    from hatchling.builders.wheel import WheelBuilder

    from workbench.export.hf import TEMPLATE_FILES, TEMPLATES

    for name in TEMPLATE_FILES:
        tree = ast.parse((TEMPLATES / name).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.module and n.level == 0}
        assert roots <= {"torch", "transformers"}, (name, roots)
    [wheel] = WheelBuilder(str(Path(__file__).resolve().parents[1])).build(directory=str(tmp_path),
                                                                           versions=["standard"])
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"workbench/export/templates/{name}" for name in TEMPLATE_FILES} <= names


EMBEDDED_PROFILE = """
[model]
source = "embedded:smollm2-135m"
device = "cpu"
[calibration]
dataset = "embedded:wiki-vital"
samples = 4
seq_len = 128
[compression]
ratio = 0.2
[[evaluate]]
evaluator = "perplexity"
dataset = "embedded:wiki-vital"
seq_len = 128
max_windows = 2
[output]
dir = "{out}"
"""


@pytest.mark.embedded
def test_embedded_model_round_trip_equal_logits_and_no_bigger(tmp_path):
    out = tmp_path / "run"
    run(parse_profile(EMBEDDED_PROFILE.format(out=out)))
    folder = tmp_path / "export"
    result = runner.invoke(app, ["export", str(out), "--to", str(folder)])
    assert result.exit_code == 0, result.output
    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    _load_without_workbench([[str(folder), str(tmp_path / "loaded.pt")]], ids, tmp_path)
    loaded = torch.load(tmp_path / "loaded.pt")
    model = workbench.load_compressed(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded["logits"], model(ids).logits, atol=1e-5, rtol=0)
        assert torch.equal(loaded["tokens"], model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False))

    def size(path):
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

    assert size(folder) <= size(out / "model") + (folder / "README.md").stat().st_size
