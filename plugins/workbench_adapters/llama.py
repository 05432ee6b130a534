"""Llama decoders, as two adapters because their defaults differ with the attention layout.

Multi-head attention (LLaMA-1, Llama-2 7B/13B): q, k, v, gate and up share a basis across pairs of
layers, o and down stay private (Basis Sharing's profiles). Grouped-query attention (Llama-3.x,
Llama-2-70B, SmolLM2): every matrix private, because the narrow k/v (kv_heads·head_dim rows) lose
more by sharing than they save.
"""

from __future__ import annotations

from torch import nn

from workbench_adapters.decoder import GatedDecoderAdapter


def is_multi_head(adapter: GatedDecoderAdapter, model: nn.Module) -> bool:
    heads = adapter.head_layout(model)
    return heads["kv_heads"] == heads["heads"]


class LlamaAdapter(GatedDecoderAdapter):
    name = "llama"
    description = "Llama, grouped-query attention (Llama-3.x, Llama-2-70B, SmolLM2): group size 1 by default"
    model_types = ("llama",)

    def accepts(self, model: nn.Module) -> bool:
        return not is_multi_head(self, model)


class LlamaMultiHeadAdapter(GatedDecoderAdapter):
    name = "llama-mha"
    description = ("Llama, multi-head attention (LLaMA-1, Llama-2 7B/13B): "
                   "q, k, v, gate, up shared in pairs of layers by default")
    model_types = ("llama",)
    shared_types = frozenset({"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"})

    def accepts(self, model: nn.Module) -> bool:
        return is_multi_head(self, model)
