"""Finite-value guards: NaN or Inf anywhere in the factor path stops the run, naming where.

A NaN compares false with everything, so without these checks it would slip through the loss
check (`error > tolerance` is false for NaN) and end up in the saved model. Each guard costs one
`isfinite` pass over tensors the engine touches anyway.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from workbench.errors import RunFailed
from workbench.api import Site
from workbench.engine.grouping import output_module


# Rows per slice of a finiteness check: `torch.isfinite` of a float tensor works on a full-size
# copy (its absolute value) plus a mask, 1 GiB at a 7B model's down_proj Gram; by slices it is ~1%.
FINITE_ROWS = 1024


def _bad_count(tensor: torch.Tensor) -> int:
    """How many entries are NaN or ±Inf, counted slice by slice (no full-size temporaries)."""
    rows = tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() >= 2 else tensor.reshape(1, -1)
    return sum(int((~torch.isfinite(part)).sum()) for part in rows.split(FINITE_ROWS))


def all_finite(tensor: torch.Tensor) -> bool:
    return _bad_count(tensor) == 0


def check_layer_weights(layer: nn.Module, index: int, sites: Iterable[Site]) -> None:
    """Refuse NaN/Inf in the targeted weights of decoder layer `index`, before the layer runs.

    Checked first so a broken weight is named as such, not as the NaN activations it causes
    further down the same layer.
    """
    for site in sites:
        linear = layer.get_submodule(site.path)
        for name in ("weight", "bias"):
            tensor = getattr(linear, name, None)
            if isinstance(tensor, torch.Tensor) and (bad := _bad_count(tensor.detach())):
                raise RunFailed(f"layer {index}, {site.path}: NaN or Inf in the {name} ({bad} of {tensor.numel()} "
                                "values); the model file is damaged or was saved after a diverged training step")


def check_gram(gram: torch.Tensor, index: int, input_group: str, paths: Sequence[str]) -> None:
    """Refuse a Gram matrix built from NaN/Inf activations (or one whose float64 sums overflowed).
    `input_group`: the walk's statistic, an input group or `<module path>:output` (an output's Gram)."""
    if not all_finite(gram):
        if (module := output_module(input_group)) is not None:
            where = f"layer {index}, output of {module}"
        else:
            where = f"layer {index}, input of {input_group}" + (f" ({', '.join(paths)})" if paths else "")
        raise RunFailed(f"{where}: NaN or Inf in the calibration activations. Earlier layers produced them: "
                        "check the model's dtype (float16 overflows where bfloat16 does not) and its weights.")


def loss_check_failed(error: float, tolerance: float) -> bool:
    """True when the relative loss mismatch is above `tolerance` or is not a number at all."""
    return not error <= tolerance  # `not <=` is true for NaN, unlike `>`


def check_factors(key: str, qs: Sequence[torch.Tensor], p: torch.Tensor, dtype: torch.dtype) -> None:
    """Refuse low-rank factors that are not finite once cast to the model's dtype.

    float16 tops out at 65504: a badly conditioned whitening can give P entries beyond that even
    when the float64 product Q·P is fine, and the model would silently compute Inf.
    """
    bad = _bad_count(p) + sum(_bad_count(q) for q in qs)
    if bad:
        limit = f" (largest finite {dtype} value: {torch.finfo(dtype).max:.4g})" if dtype.is_floating_point else ""
        raise RunFailed(f"{key}: {bad} values of the low-rank factors are NaN or Inf in {dtype}{limit}. "
                        "Use model.dtype = \"bfloat16\" or \"float32\", or more calibration samples.")
