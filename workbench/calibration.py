"""Layer-by-layer calibration: capture the first decoder layer's inputs, then push them through
one layer at a time, accumulating each input's Gram matrix XᵀX in float64 on the way.

Peak memory is one layer's Grams plus the calibration activations, never the whole model's
statistics. The inputs each layer sees are those of the original (dense) model, as in SVD-LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first layer's inputs."""


@dataclass
class LayerBatch:
    hidden: torch.Tensor
    kwargs: dict[str, Any]


def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device, check: Callable[[], None] | None = None) -> list[LayerBatch]:
    """Run the model up to its first decoder layer and keep that layer's inputs, per batch.

    The layer's keyword arguments (rotary embeddings, mask, positions) are kept as the model built
    them, so any decoder that the adapter can name is driven without architecture-specific code.
    """
    batches: list[LayerBatch] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        batches.append(LayerBatch(hidden.detach(), kwargs))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_size):
                if check:
                    check()
                ids = windows[start:start + batch_size].to(device)
                try:
                    model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return batches


class GramAccumulator:
    """Forward pre-hooks that add XᵀX (float64) of a module's input into a named Gram matrix."""

    def __init__(self) -> None:
        self.grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles: list[Any] = []

    def watch(self, name: str, module: nn.Module) -> None:
        def hook(mod, args):
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            gram = self.grams.get(name)
            if gram is None:
                gram = self.grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
                self.tokens[name] = 0
            gram.addmm_(x.mT, x)
            self.tokens[name] += x.shape[0]

        self._handles.append(module.register_forward_pre_hook(hook))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def run_layer(layer: nn.Module, batches: Iterable[LayerBatch], check: Callable[[], None] | None = None) -> None:
    """Run one decoder layer over every batch, replacing each batch's hidden states by the output."""
    with torch.inference_mode():
        for batch in batches:
            if check:
                check()
            out = layer(batch.hidden, **batch.kwargs)
            batch.hidden = out[0] if isinstance(out, tuple) else out
