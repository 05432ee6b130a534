"""Where calibration stands after a layer, and what a checkpoint store must offer to keep it.

Neutral ground between the layer walk (workbench/engine/walk.py), which produces this state, and
the work directory (workbench/storage/checkpoint.py), which stores it: neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from workbench.engine.factorize import GroupFactors


@dataclass
class CalibrationState:
    """All calibration needs to go on exactly as if never stopped.

    `hidden` is the next layer's input per batch (None once every layer is done); the batches'
    keyword arguments (rotary embeddings, masks) are not kept: they are the same for every layer,
    so a resumed run captures them again, which costs only the embedding.
    """

    next_layer: int
    hidden: list[torch.Tensor] | None
    grams: dict[tuple[str, int], torch.Tensor]  # per-layer statistics a pending group still needs
    factors: dict[str, GroupFactors]  # finished groups
    whitening: list[dict[str, Any]]
    tokens: int


class CalibrationCheckpoint(Protocol):
    """A store for `CalibrationState` (`workbench.storage.checkpoint.WorkDir` is one)."""

    def load_calibration(self, device: torch.device) -> CalibrationState | None:
        """The state of an interrupted calibration, or None to start at the first layer."""

    def save_calibration(self, state: CalibrationState, final: bool, layers: int | None = None) -> None:
        """Keep `state` (after a layer); `final` after the last one. May skip non-final states."""
