"""Files that are complete or absent, and dataclasses of tensors stored as safetensors + JSON.

A write goes to a temporary name in the same directory, is flushed to disk and renamed into place,
so a process killed at any instant leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file


def plain(value: Any) -> Any:
    """`value` as JSON gives it back (tuples → lists, keys sorted): what a file can hold."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a directory be opened
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Write through `write(temp_path)`, flush to disk, rename into place: complete or absent."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {"workbench": json.dumps(meta)} if meta is not None else None
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_tensors(path: Path, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    # Copied into fresh memory: tensors backed by the file could differ in alignment, and kernels
    # that pick a code path by alignment could then round differently from the uninterrupted run.
    return {k: v.to(device).clone() for k, v in load_file(str(path)).items()}


def load_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {})["workbench"])


# ---------------------------------------------------------------------------------- dataclasses of tensors


def flatten(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A dataclass of tensors and plain values (GroupFactors, Whitening) → tensors + JSON, field by
    field, so fields added later are kept without touching this module."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"class": f"{type(obj).__module__}:{type(obj).__qualname__}", "fields": {}}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, torch.Tensor):
            tensors[prefix + f.name] = value
            meta["fields"][f.name] = {"tensor": prefix + f.name}
        elif dataclasses.is_dataclass(value):
            inner_tensors, inner = flatten(value, f"{prefix}{f.name}.")
            tensors.update(inner_tensors)
            meta["fields"][f.name] = {"dataclass": inner}
        else:
            if plain(value) != value:  # fail loudly rather than restore a different value
                raise TypeError(f"cannot checkpoint {type(obj).__name__}.{f.name} = {value!r}")
            meta["fields"][f.name] = {"value": value}
    return tensors, meta


def unflatten(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    module, _, name = meta["class"].partition(":")
    if module != "workbench" and not module.startswith("workbench."):
        # only our own dataclasses: a file must not be able to make us import arbitrary code
        raise ValueError(f"refusing to restore {meta['class']!r}: not a workbench class")
    cls = getattr(importlib.import_module(module), name)
    values = {}
    for key, spec in meta["fields"].items():
        if "tensor" in spec:
            values[key] = tensors[spec["tensor"]]
        elif "dataclass" in spec:
            values[key] = unflatten(spec["dataclass"], tensors)
        else:
            values[key] = spec["value"]
    init = {f.name for f in dataclasses.fields(cls) if f.init}
    obj = cls(**{k: v for k, v in values.items() if k in init})
    for key, value in values.items():
        if key not in init:
            setattr(obj, key, value)
    return obj


