"""What Llama, Mistral and Qwen2 have in common: a decoder whose layers hold q/k/v/o attention
projections and a gated (SwiGLU) MLP with gate/up/down, under `model.layers`.

An adapter for one of these families says which `config.model_type` it takes, which matrix types
share a basis by default, and any extra condition; the module structure is checked here, shapes
included, so a model is claimed only when every layer really has the layout the sites describe.
"""

from __future__ import annotations

from torch import nn

from workbench.api import Adapter, LowRankLinear, Site

DECODER_SITES = (
    Site("q_proj", "self_attn.q_proj", "attn_in"),
    Site("k_proj", "self_attn.k_proj", "attn_in"),
    Site("v_proj", "self_attn.v_proj", "attn_in"),
    Site("o_proj", "self_attn.o_proj", "attn_out"),
    Site("gate_proj", "mlp.gate_proj", "mlp_in"),
    Site("up_proj", "mlp.up_proj", "mlp_in"),
    Site("down_proj", "mlp.down_proj", "mlp_out"),
)

# Group size of the matrix types an adapter shares by default (the papers' profiles use pairs).
SHARED_GROUP_SIZE = 2


def _linear_shape(layer: nn.Module, path: str) -> tuple[int, int] | None:
    """(in, out) of the linear at `path`, or None when there is none (a compressed one counts)."""
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        return None
    if not isinstance(module, (nn.Linear, LowRankLinear)):
        return None
    return module.in_features, module.out_features


class GatedDecoderAdapter(Adapter):
    """Base of the built-in adapters; a subclass sets `model_types` and `shared_types`."""

    model_types: tuple[str, ...] = ()
    #: Matrix types whose default is to share one basis across SHARED_GROUP_SIZE consecutive layers.
    shared_types: frozenset[str] = frozenset()

    def claims(self, model: nn.Module) -> bool:
        config = getattr(model, "config", None)
        if getattr(config, "model_type", None) not in self.model_types:
            return False
        return self._has_layout(model) and self.accepts(model)

    def accepts(self, model: nn.Module) -> bool:
        """A family-specific condition on top of model type and structure (e.g. MHA vs GQA)."""
        return True

    def _has_layout(self, model: nn.Module) -> bool:
        layers = getattr(getattr(model, "model", None), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            return False
        try:
            heads = self.head_layout(model)
            hidden = model.config.hidden_size
        except (AttributeError, TypeError, ZeroDivisionError):
            return False
        q_width, kv_width = heads["heads"] * heads["head_dim"], heads["kv_heads"] * heads["head_dim"]
        for layer in layers:
            shape = {s.matrix_type: _linear_shape(layer, s.path) for s in DECODER_SITES}
            if None in shape.values():
                return False
            mlp_width = shape["gate_proj"][1]
            expected = {
                "q_proj": (hidden, q_width), "k_proj": (hidden, kv_width), "v_proj": (hidden, kv_width),
                "o_proj": (q_width, hidden), "gate_proj": (hidden, mlp_width), "up_proj": (hidden, mlp_width),
                "down_proj": (mlp_width, hidden),
            }
            if shape != expected:
                return False
        return True

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def sites(self, model: nn.Module) -> list[Site]:
        return list(DECODER_SITES)

    def token_wise_modules(self, model: nn.Module) -> list[str]:
        return ["mlp"]  # gate, up, down act on each token alone

    def default_group_size(self, model: nn.Module, matrix_type: str) -> int:
        return SHARED_GROUP_SIZE if matrix_type in self.shared_types else 1
