"""Dense-model metrics are paid once: cached per model fingerprint, evaluator, options and device."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from workbench.storage.durable_files import write_atomically


def _key(fingerprint: str, evaluator: str, version: str, options: dict[str, Any], device_type: str, dtype: str) -> str:
    blob = json.dumps({"model": fingerprint, "evaluator": evaluator, "version": version, "options": options,
                       "device": device_type, "dtype": dtype}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class DenseCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    @classmethod
    def default(cls) -> "DenseCache":
        """$WORKBENCH_DENSE_CACHE, else `dense/` under the workbench cache directory."""
        from workbench.sources.models import cache_dir

        return cls(Path(os.environ.get("WORKBENCH_DENSE_CACHE") or cache_dir() / "dense"))

    def _path(self, *key_parts) -> Path:
        return self.root / f"{_key(*key_parts)}.json"

    def get(self, *key_parts) -> dict[str, Any] | None:
        path = self._path(*key_parts)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None  # missing or corrupt: recompute

    def put(self, value: dict[str, Any], *key_parts) -> None:
        path = self._path(*key_parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(value)  # before any file exists: a value JSON cannot hold leaves nothing behind
        write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
