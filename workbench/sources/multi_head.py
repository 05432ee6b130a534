"""A multi-head (MHA) copy of a grouped-query (GQA) decoder that computes the same function.

In grouped-query attention, query head h reads key/value head h // (heads / kv_heads). Repeating
each K/V head's rows of k_proj and v_proj (and their biases) that many times gives a model with
kv_heads == heads whose attention sees exactly the same keys and values, so its logits equal the
original's up to float rounding. The copy has real weights in the MHA layout, which is what the
LLaMA-1/2 profiles of the papers (Basis Sharing's group sizes > 1 on q, k, v) are about; it is how
`model.source = "embedded:smollm2-135m-mha"` is built.

Works for decoders that name their projections `self_attn.k_proj` / `self_attn.v_proj` and their
heads the usual way in the config (Llama, Mistral, Qwen2).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

# State-dict keys of the K/V projections, e.g. "model.layers.3.self_attn.k_proj.weight".
_KV_KEY = re.compile(r"(^|\.)self_attn\.(k_proj|v_proj)\.(weight|bias)$")


def _repeat_heads(tensor: torch.Tensor, kv_heads: int, repeats: int) -> torch.Tensor:
    """Rows grouped per K/V head (kv_heads·head_dim, ...) -> each head's rows `repeats` times in a row."""
    blocks = tensor.reshape(kv_heads, -1, *tensor.shape[1:])
    return blocks.repeat_interleave(repeats, dim=0).reshape(-1, *tensor.shape[1:]).contiguous()


def multi_head_copy(model: nn.Module) -> nn.Module:
    """A new model with num_key_value_heads == num_attention_heads and the same outputs as `model`.

    `model` is left untouched. An MHA model is copied as it is. The copy is in eval mode, in the
    same dtype and on the same device as `model`.
    """
    from transformers import AutoModelForCausalLM

    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ValueError(f"{heads} attention heads are not a multiple of {kv_heads} key/value heads")
    repeats = heads // kv_heads
    state = model.state_dict()
    converted = [k for k in state if _KV_KEY.search(k)]
    if repeats > 1 and not converted:
        raise ValueError("no self_attn.k_proj / self_attn.v_proj weights found; not a Llama-style decoder")
    new_config = copy.deepcopy(config)
    new_config.num_key_value_heads = heads
    parameter = next(model.parameters())
    new = AutoModelForCausalLM.from_config(new_config, dtype=parameter.dtype, trust_remote_code=False)
    new = new.to(parameter.device)
    for key in converted:
        state[key] = _repeat_heads(state[key], kv_heads, repeats)
    new.load_state_dict(state, strict=True)
    return new.eval()
