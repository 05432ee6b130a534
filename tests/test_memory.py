"""The memory evaluator against parameter counts worked out by hand for the tiny Llama."""

from __future__ import annotations

import torch
from torch import nn

from conftest import tiny_llama
from workbench.events import CancelToken, EventBus
from workbench.engine.lowrank import LowRankLinear
from workbench.api import EvalContext
from workbench_evaluators.memory import MemoryEvaluator, memory_footprint

# tiny_llama: hidden 64, 4 heads of 16, 2 KV heads (k/v out 32), MLP 128, vocab 128, 4 layers.
PER_LAYER_LINEAR = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q k v o gate up down = 36,864
LINEAR = 4 * PER_LAYER_LINEAR
EMBED = 128 * 64
NORMS = 4 * 2 * 64 + 64
WHOLE = LINEAR + 2 * EMBED + NORMS  # untied head


def test_dense_model_counts():
    out = memory_footprint(tiny_llama())
    assert out["parameters"] == WHOLE == 164_416
    assert out["parameter_bytes"] == 4 * WHOLE
    lin = out["decoder_linear"]
    assert (lin["low_rank_modules"], lin["dense_modules"]) == (0, 28)
    assert lin["dense_parameters"] == lin["parameters"] == LINEAR and lin["dense_bytes"] == 4 * LINEAR
    assert "adapter llama" in lin["scope"]


def test_tied_embeddings_and_half_precision():
    out = memory_footprint(tiny_llama(tie=True).to(torch.bfloat16))
    assert out["parameters"] == WHOLE - EMBED  # the head shares the embedding matrix
    assert out["parameter_bytes"] == 2 * (WHOLE - EMBED)


def _share_a_basis(model, rank=8):
    """q_proj of layers 0 and 1 become LowRankLinear modules sharing one basis."""
    basis = nn.Parameter(torch.randn(rank, 64))
    for i in (0, 1):
        low = LowRankLinear(64, 64, rank, basis=basis)
        nn.init.normal_(low.coef.weight)
        model.model.layers[i].self_attn.q_proj = low
    return model


def test_low_rank_modules_and_a_shared_basis_counted_once():
    out = memory_footprint(_share_a_basis(tiny_llama()))
    low_rank_params = 8 * 64 + 2 * 64 * 8  # one basis, two coefficient matrices
    lin = out["decoder_linear"]
    assert (lin["low_rank_modules"], lin["dense_modules"]) == (2, 26)
    assert lin["low_rank_parameters"] == low_rank_params and lin["low_rank_bytes"] == 4 * low_rank_params
    assert lin["dense_parameters"] == LINEAR - 2 * 64 * 64
    assert out["parameters"] == WHOLE - 2 * 64 * 64 + low_rank_params


def test_a_model_no_adapter_claims_counts_its_linear_layers():
    out = memory_footprint(nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5, bias=False)))
    lin = out["decoder_linear"]
    assert lin["dense_modules"] == 2 and lin["dense_parameters"] == 10 * 20 + 20 + 20 * 5
    assert "no adapter" in lin["scope"]


def test_evaluator_headline_figures_and_peak():
    ctx = EvalContext(device=torch.device("cpu"), events=EventBus(), cancel=CancelToken())
    dense = MemoryEvaluator().evaluate(tiny_llama(), None, {}, ctx)
    compressed = MemoryEvaluator().evaluate(_share_a_basis(tiny_llama()), None, {}, ctx)
    assert (dense.metric, dense.value) == ("parameter bytes", 4 * WHOLE)
    assert compressed.value < dense.value
    figures = dense.details["figures"]
    assert figures["parameters"] == WHOLE and figures["decoder linear bytes"] == 4 * LINEAR
    assert figures["peak RSS bytes (process so far)"] > 4 * WHOLE  # the process holds at least the model
    assert "peak GPU bytes (process so far)" not in figures  # CPU run: no CUDA figure
    assert dense.details["peak_memory"]["cuda_bytes"] is None
