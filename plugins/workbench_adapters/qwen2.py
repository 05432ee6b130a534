"""Qwen2: a Llama layout whose q, k and v projections carry biases.

A bias is not part of the factorization: the low-rank module computes (x Pᵀ) Qᵀ + b with the
original b, so it is kept exactly. Default group size 1 (Qwen2 uses grouped-query attention).

Calibration drives every layer with the attention mask the model built for its first layer. A
Qwen2 config with `use_sliding_window` mixes full and sliding layers (`layer_types`), whose masks
differ; such a model is not claimed rather than calibrated with the wrong mask. Every released
Qwen2 checkpoint has all layers alike.
"""

from __future__ import annotations

from torch import nn

from workbench_adapters.decoder import GatedDecoderAdapter

_BIASED = ("q_proj", "k_proj", "v_proj")


class Qwen2Adapter(GatedDecoderAdapter):
    name = "qwen2"
    description = "Qwen2, q/k/v biases kept exactly: group size 1 by default"
    model_types = ("qwen2",)

    def accepts(self, model: nn.Module) -> bool:
        layer_types = getattr(model.config, "layer_types", None) or []
        if len(set(layer_types)) > 1:
            return False
        attn = [layer.self_attn for layer in self.decoder_layers(model)]
        return all(getattr(a, name).bias is not None for a in attn for name in _BIASED)
