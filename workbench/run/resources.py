"""Memory readings for progress events and the report: RSS on CPU, allocator figures on CUDA."""

from __future__ import annotations

import resource
import sys

import psutil
import torch


def current_memory(device: torch.device | None = None) -> int:
    if device is not None and device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return int(psutil.Process().memory_info().rss)


def peak_memory(device: torch.device | None = None) -> dict[str, int | None]:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB, macOS bytes
    cuda = int(torch.cuda.max_memory_allocated(device)) if device is not None and device.type == "cuda" else None
    return {"rss_bytes": int(rss), "cuda_bytes": cuda}


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters counted once each, so tied embeddings and shared bases are not double-counted."""
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
