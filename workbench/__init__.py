"""workbench: compress LLMs with whitened, low-rank SVD."""

from __future__ import annotations

__version__ = "0.1.0"


def load_compressed(path, device: str = "cpu", dtype=None):
    """Return a ready transformers model (and nothing else) from a saved run output.

    Imported lazily so `import workbench` stays cheap for the CLI and plugins.
    """
    from workbench.storage.saving import load_compressed as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["__version__", "load_compressed"]
