"""One forward pass, whatever the model returns: transformers outputs, tuples, or bare tensors."""

from __future__ import annotations

import torch


def logits_of(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits (batch × sequence × vocab) of a causal LM, without building a KV cache."""
    # transformers models: skip the KV cache we would throw away; plain modules get ids only.
    if getattr(model, "config", None) is not None:
        out = model(input_ids=input_ids, use_cache=False)
    else:
        out = model(input_ids)
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)):
        return out[0]
    return out
