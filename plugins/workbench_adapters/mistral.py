"""Mistral: a Llama layout with sliding-window attention.

The sliding window lives in the config (which the saved model keeps) and in the attention mask the
model builds (which calibration captures), so nothing here has to handle it. Default grouping
follows Basis Sharing: q, gate and up share a basis in pairs of layers; the narrow grouped-query
k/v and the o/down projections stay private.
"""

from __future__ import annotations

from workbench_adapters.decoder import GatedDecoderAdapter


class MistralAdapter(GatedDecoderAdapter):
    name = "mistral"
    description = "Mistral, sliding window kept: q, gate, up shared in pairs of layers by default"
    model_types = ("mistral",)
    shared_types = frozenset({"q_proj", "gate_proj", "up_proj"})
