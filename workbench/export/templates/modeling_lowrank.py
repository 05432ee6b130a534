"""Low-rank variants of the transformers Llama, Mistral and Qwen2 causal LMs, exported by workbench.

Each class is the standard model whose listed linear layers compute y = (x Pᵀ) Qᵀ + b instead of
x Wᵀ + b, with W ≈ Q·P from a whitened SVD. A group of layers may share one basis P ("Basis
Sharing"); every basis is stored once, as `lowrank_bases.<group>`, and the layers look it up
there, so the checkpoint holds no tensor twice and loading needs no tying. The layers and ranks
come from `config.low_rank`:

    {"groups": [{"key": "q_proj_0_1", "rank": 96, "in_features": 576, "out_features": 576,
                 "modules": ["model.layers.0.self_attn.q_proj", ...], "bias": [false, ...]}]}

Needs only torch and transformers.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .configuration_lowrank import LowRankLlamaConfig, LowRankMistralConfig, LowRankQwen2Config


class LowRankLinear(nn.Module):
    """y = (x Pᵀ) Qᵀ + b; P is `bases[basis_key]`, possibly the same tensor for several layers."""

    def __init__(self, in_features, out_features, rank, bias, bases, basis_key):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.basis_key = basis_key
        # Not registered as a submodule: the bases belong to the model, once.
        object.__setattr__(self, "_bases", bases)
        self.coef = nn.Parameter(torch.zeros(out_features, rank))  # Q
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @property
    def basis(self):
        return self._bases[self.basis_key]  # P

    @property
    def weight(self):
        """The product Q·P, for code that inspects a layer's weight (dtype, device, shape)."""
        return self.coef @ self.basis.to(self.coef.device)

    def forward(self, x):
        basis = self.basis
        if basis.device != x.device:  # layers split across devices (device_map)
            basis = basis.to(x.device)
        return F.linear(F.linear(x, basis), self.coef, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"basis={self.basis_key}, bias={self.bias is not None}")


def _install_low_rank(model, config):
    """Replace the dense linears that `config.low_rank` lists by LowRankLinear modules."""
    table = getattr(config, "low_rank", None) or {}
    groups = table.get("groups", [])
    model.lowrank_bases = nn.ParameterDict({
        g["key"]: nn.Parameter(torch.zeros(g["rank"], g["in_features"])) for g in groups
    })
    for g in groups:
        biases = g.get("bias") or [False] * len(g["modules"])
        for name, bias in zip(g["modules"], biases):
            parent, _, child = name.rpartition(".")
            module = LowRankLinear(g["in_features"], g["out_features"], g["rank"], bias,
                                   model.lowrank_bases, g["key"])
            setattr(model.get_submodule(parent), child, module)


class LowRankLlamaForCausalLM(LlamaForCausalLM):
    config_class = LowRankLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        _install_low_rank(self, config)


class LowRankMistralForCausalLM(MistralForCausalLM):
    config_class = LowRankMistralConfig

    def __init__(self, config):
        super().__init__(config)
        _install_low_rank(self, config)


class LowRankQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = LowRankQwen2Config

    def __init__(self, config):
        super().__init__(config)
        _install_low_rank(self, config)
