"""The engine on tiny random Llama models: exact factor path, budget, grouping, save and reload."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_llama
from workbench.engine.allocation import budget_for, total_cost
from workbench.engine.compress import allocate, assemble, calibrate
from workbench.errors import PluginError, UsageError
from workbench.events import CancelToken, EventBus
from workbench.errors import Interrupted
from workbench.engine.grouping import plan_groups
from workbench.engine.lowrank import LowRankLinear
from workbench.registry import load_registry
from workbench.storage.saving import load_compressed, save_compressed

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def registry():
    return load_registry(strict=True)


def _compress(model, registry, ids, ratio, group_size, full=False, allocator="uniform"):
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, None, [], lambda t: group_size)
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken(), full_factors=full)
    if full:
        ranks = {s.key: min(s.in_features, s.n * s.out_features) for s in cal.spectra}
    else:
        budget = budget_for(cal.spectra, ratio)
        ranks = allocate(registry.allocators[allocator], allocator, cal.spectra, budget, {})
    table = assemble(model, adapter, plans, cal.factors, ranks, cal.spectra, factor_all=full)
    return cal, ranks, table


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("group_size", [1, 2])
def test_full_rank_factors_reproduce_dense_logits(registry, calib_ids, kv_heads, group_size):
    model = tiny_llama(kv_heads=kv_heads)
    with torch.no_grad():
        dense = model(calib_ids[:3]).logits
    _compress(model, registry, calib_ids, 0.0, group_size, full=True)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 4 * 7
    with torch.no_grad():
        out = model(calib_ids[:3]).logits
    assert float((out - dense).norm() / dense.norm()) < 1e-4


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("ratio", [0.2, 0.3, 0.5])
def test_uniform_meets_the_ratio(registry, calib_ids, kv_heads, group_size, ratio):
    model = tiny_llama(kv_heads=kv_heads)
    cal, ranks, table = _compress(model, registry, calib_ids, ratio, group_size)
    dense = sum(s.dense_params for s in cal.spectra)
    achieved = 1 - total_cost(cal.spectra, ranks) / dense
    assert abs(achieved - ratio) < 0.005
    # the parameters actually in the model agree with the bookkeeping
    kept = sum(row["params"] for row in table)
    low_rank_params = {id(p): p.numel() for m in model.modules() if isinstance(m, LowRankLinear)
                       for p in (m.basis.weight, m.coef.weight)}
    dense_rows = sum(row["params"] for row in table if row["dense"])
    assert sum(low_rank_params.values()) + dense_rows == kept


def test_group_shares_one_basis_object(registry, calib_ids):
    model = tiny_llama(kv_heads=4)
    _compress(model, registry, calib_ids, 0.3, 2)
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.basis is layers[1].self_attn.q_proj.basis
    assert layers[1].self_attn.q_proj.basis is not layers[2].self_attn.q_proj.basis
    assert layers[0].self_attn.q_proj.coef is not layers[1].self_attn.q_proj.coef


def test_rank_table_reports_partial_whitened_loss(registry, calib_ids):
    """Every factored group loses some, never all, of its whitened energy."""
    model = tiny_llama(kv_heads=2)
    cal, ranks, table = _compress(model, registry, calib_ids, 0.4, 1)
    for row in table:
        if not row["dense"]:
            assert 0 < row["loss"] < row["energy"]


@pytest.mark.parametrize("kv_heads,group_size,tie", [(4, 2, False), (2, 1, True)])
def test_save_and_reload_gives_identical_logits(registry, calib_ids, tmp_path, kv_heads, group_size, tie):
    model = tiny_llama(kv_heads=kv_heads, tie=tie)
    _, _, table = _compress(model, registry, calib_ids, 0.3, group_size)
    save_compressed(model, None, tmp_path / "model", table)
    again = load_compressed(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(calib_ids[:2]).logits, again(calib_ids[:2]).logits)
    if tie:
        assert again.lm_head.weight is again.model.embed_tokens.weight
    if group_size == 2:
        assert again.model.layers[0].self_attn.q_proj.basis is again.model.layers[1].self_attn.q_proj.basis


def test_targets_and_ignore(registry, gqa_model):
    adapter = registry.adapter_for(gqa_model)
    plans = plan_groups(gqa_model, adapter, ["q_proj", "re:(up|down)_proj"], ["model.layers.1.self_attn.q_proj"],
                        lambda t: 2)
    keys = [p.key for p in plans]
    assert "q_proj@0" in keys and "q_proj@2-3" in keys  # layer 1 ignored splits the run
    assert {p.matrix_type for p in plans} == {"q_proj", "up_proj", "down_proj"}
    with pytest.raises(UsageError, match="did you mean 'q_proj'"):
        plan_groups(gqa_model, adapter, ["qproj"], [], lambda t: 1)


def test_cancel_stops_calibration(registry, gqa_model, calib_ids):
    adapter = registry.adapter_for(gqa_model)
    plans = plan_groups(gqa_model, adapter, None, [], lambda t: 1)
    cancel = CancelToken()
    bus = EventBus([lambda e: cancel.cancel("test") if e.kind == "progress" and e.current == 2 else None])
    with pytest.raises(Interrupted):
        calibrate(gqa_model, adapter, plans, calib_ids, CPU, bus, cancel)
    assert not any(isinstance(m, LowRankLinear) for m in gqa_model.modules())


def test_nan_activation_names_the_layer(registry, gqa_model, calib_ids):
    with torch.no_grad():
        gqa_model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    adapter = registry.adapter_for(gqa_model)
    plans = plan_groups(gqa_model, adapter, None, [], lambda t: 1)
    from workbench.errors import RunFailed

    with pytest.raises(RunFailed, match="layer 1, input of mlp_in"):
        calibrate(gqa_model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken())


class _Bad:
    name = "bad"

    def __init__(self, answer):
        self.answer = answer

    def allocate(self, groups, budget, options):
        return self.answer(groups)


@pytest.mark.parametrize("answer,match", [
    (lambda gs: {g.key: -1 for g in gs}, "outside"),
    (lambda gs: {g.key: 1.5 for g in gs}, "not an integer"),
    (lambda gs: {g.key: 1 for g in gs[1:]}, "no rank"),
    (lambda gs: {g.key: g.max_rank for g in gs}, "over the budget"),
    (lambda gs: {g.key: 1 for g in gs}, "under the budget"),
    (lambda gs: [1, 2], "expected a mapping"),
])
def test_allocator_answers_are_checked(registry, gqa_model, calib_ids, answer, match):
    adapter = registry.adapter_for(gqa_model)
    plans = plan_groups(gqa_model, adapter, None, [], lambda t: 1)
    cal = calibrate(gqa_model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken())
    with pytest.raises(PluginError, match=match) as info:
        allocate(_Bad(answer), "allocator 'bad' from bad-plugin 1.0", cal.spectra, budget_for(cal.spectra, 0.3), {})
    assert "bad-plugin 1.0" in str(info.value)


def test_wide_inputs_take_the_panelled_gram_path_exactly(registry, calib_ids):
    """down_proj's input, wider than a panel, is accumulated in several; the factor path must stay exact."""
    from workbench.engine.calibration import PANEL

    model = tiny_llama(layers=2, intermediate=2 * PANEL + 64)
    with torch.no_grad():
        dense = model(calib_ids[:2]).logits
    cal, _, _ = _compress(model, registry, calib_ids, 0.0, 1, full=True)
    with torch.no_grad():
        out = model(calib_ids[:2]).logits
    assert float((out - dense).norm() / dense.norm()) < 1e-4
