"""Llama-family decoder layers (LLaMA-1/2 MHA, Llama-3 / SmolLM2 GQA)."""

from __future__ import annotations

from torch import nn

from workbench.plugin_api import Adapter, Site

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

LLAMA_SITES = [
    Site("q_proj", "self_attn.q_proj", "attn_in"),
    Site("k_proj", "self_attn.k_proj", "attn_in"),
    Site("v_proj", "self_attn.v_proj", "attn_in"),
    Site("o_proj", "self_attn.o_proj", "attn_out"),
    Site("gate_proj", "mlp.gate_proj", "mlp_in"),
    Site("up_proj", "mlp.up_proj", "mlp_in"),
    Site("down_proj", "mlp.down_proj", "mlp_out"),
]


def _has_llama_layout(model: nn.Module) -> bool:
    """Decided from the module structure, not from a name: every layer has the 7 Llama linears."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None:
            return False
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in _ATTN):
            return False
        if not all(isinstance(getattr(mlp, n, None), nn.Linear) for n in _MLP):
            return False
    return True


class LlamaAdapter(Adapter):
    name = "llama"
    description = "Llama decoder (LLaMA-1/2 multi-head, Llama-3.x / SmolLM2 grouped-query attention)"

    def claims(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        return getattr(config, "model_type", None) == "llama" and _has_llama_layout(model)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def sites(self, model: nn.Module) -> list[Site]:
        return list(LLAMA_SITES)
