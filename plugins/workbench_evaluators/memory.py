"""What the model weighs: parameters and bytes, whole model and its decoder linear layers, and the
process's peak memory so far.

Every tensor is counted once, so a basis shared by a group's LowRankLinear modules and tied
embeddings are not double-counted. The decoder linear layers are those inside the decoder layers
the architecture adapter names: LowRankLinear modules after compression, nn.Linear ones where a
group stayed dense (or before compression). A model no adapter claims falls back to every linear
layer except the output head.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import nn

from workbench.api import EvalContext, EvalResult, Evaluator, LowRankLinear, claiming_adapter, peak_memory


def tensor_totals(tensors: Iterable[Any]) -> tuple[int, int]:
    """(elements, bytes) of `tensors`, each distinct tensor counted once."""
    seen, count, size = set(), 0, 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            count += t.numel()
            size += t.numel() * t.element_size()
    return count, size


def _decoder_scope(model: nn.Module) -> tuple[list[nn.Module], str]:
    """The modules to search for linear layers, and a line saying what they are."""
    adapter = claiming_adapter(model)
    if adapter is None:
        return [model], "every linear layer but the output head (no adapter claims the model)"
    return list(adapter.decoder_layers(model)), f"decoder layers (adapter {adapter.name})"


def decoder_linear_layers(model: nn.Module) -> tuple[list[LowRankLinear], list[nn.Linear], str]:
    scopes, scope = _decoder_scope(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    low_rank, dense = [], []
    for root in scopes:
        # A LowRankLinear's factors are nn.Linear children: counted with it, not as dense layers.
        factors = {id(f) for m in root.modules() if isinstance(m, LowRankLinear) for f in m.modules() if f is not m}
        for module in root.modules():
            if isinstance(module, LowRankLinear):
                low_rank.append(module)
            elif isinstance(module, nn.Linear) and module is not head and id(module) not in factors:
                dense.append(module)
    return low_rank, dense, scope


def memory_footprint(model: nn.Module) -> dict[str, Any]:
    low_rank, dense, scope = decoder_linear_layers(model)
    params, param_bytes = tensor_totals(model.parameters())
    _, buffer_bytes = tensor_totals(model.buffers())
    low_params, low_bytes = tensor_totals(p for m in low_rank for p in m.parameters())
    dense_params, dense_bytes = tensor_totals(p for m in dense for p in m.parameters())
    return {
        "parameters": params,
        "parameter_bytes": param_bytes,
        "buffer_bytes": buffer_bytes,
        "decoder_linear": {
            "scope": scope,
            "low_rank_modules": len(low_rank),
            "low_rank_parameters": low_params,
            "low_rank_bytes": low_bytes,
            "dense_modules": len(dense),
            "dense_parameters": dense_params,
            "dense_bytes": dense_bytes,
            "parameters": low_params + dense_params,
            "bytes": low_bytes + dense_bytes,
        },
    }


class MemoryEvaluator(Evaluator):
    name = "memory"
    description = ("Parameters and bytes of the whole model and its decoder linear layers (low-rank vs dense), "
                   "and the process's peak memory so far (lower is better).")
    cacheable = False  # the peak belongs to this run; the counts cost nothing to redo

    def evaluate(self, model: Any, tokenizer: Any, options: Mapping[str, Any], ctx: EvalContext) -> EvalResult:
        out = memory_footprint(model)
        peak = peak_memory(ctx.device)
        figures = {
            "parameters": out["parameters"],
            "decoder linear bytes": out["decoder_linear"]["bytes"],
            # dense: measured before calibration; compressed: after it, so it includes calibration's peak
            "peak RSS bytes (process so far)": peak["rss_bytes"],
        }
        if peak["cuda_bytes"] is not None:
            figures["peak GPU bytes (process so far)"] = peak["cuda_bytes"]
        return EvalResult(
            dataset="",
            metric="parameter bytes",
            value=out["parameter_bytes"],
            details={**out, "peak_memory": peak, "figures": figures, "device": str(ctx.device)},
        )
