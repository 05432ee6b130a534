"""Built-in allocators: D-Rank's closed form, exact integer budgets, β transfer, protect-first, loss-aware."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_llama
from workbench.engine.allocation import budget_for, check_allocation, rank_cost, total_cost
from workbench.engine.compress import allocate, assemble, calibrate
from workbench.events import CancelToken, EventBus
from workbench.engine.grouping import plan_groups
from workbench.api import GroupSpectrum
from workbench.registry import load_registry
from workbench.engine.sensitivity import compute_signals, put_signals
from workbench_allocators.drank import (drank_type, lagrange_bounded, lagrange_closed_form, rebalance_qk_to_v,
                                        type_budgets)
from workbench_allocators.loss_aware import water_fill

CPU = torch.device("cpu")
BUILTINS = ("uniform", "drank", "drank-rebalanced", "protect-first", "loss-aware")


@pytest.fixture(scope="module")
def registry():
    return load_registry(strict=True)


def _spectrum(key, mtype, layer, inp, out, sigma):
    return GroupSpectrum(key, mtype, (layer,), inp, out, torch.tensor(sigma, dtype=torch.float64))


def test_closed_form_is_the_constrained_minimiser():
    """k_g = T·√(R_g/ω_g)/Σ√(R_j ω_j) meets the budget and R_g/k_g² ∝ ω_g (stationarity), to 1e-9."""
    reff, omega, budget = [3.0, 40.0, 7.5, 120.0], [1152.0, 1152.0, 768.0, 2112.0], 500_000.0
    k = lagrange_closed_form(reff, omega, budget)
    expected = [budget * math.sqrt(r / w) / sum(math.sqrt(a * b) for a, b in zip(reff, omega)) for r, w in zip(reff, omega)]
    assert all(abs(a - b) <= 1e-9 * b for a, b in zip(k, expected))
    assert abs(sum(a * w for a, w in zip(k, omega)) - budget) <= 1e-9 * budget
    lam = [r / (ki * ki * w) for r, ki, w in zip(reff, k, omega)]  # the Lagrange multiplier, one for all
    assert max(lam) - min(lam) <= 1e-9 * max(lam)
    # the bounded solver returns the closed form itself when no bound binds
    bounded = lagrange_bounded(reff, omega, budget, [1.0] * 4, [1e9] * 4)
    assert all(abs(a - b) <= 1e-9 * b for a, b in zip(bounded, expected))
    # a concrete number: T·√(3/1152)/Σ√(R ω)
    assert k[0] == pytest.approx(500_000 * math.sqrt(3 / 1152) / (math.sqrt(3 * 1152) + math.sqrt(40 * 1152)
                                 + math.sqrt(7.5 * 768) + math.sqrt(120 * 2112)), rel=1e-12)


def test_bounded_lagrange_clamps_and_keeps_the_budget():
    reff, omega = [1.0, 1.0, 400.0], [100.0, 100.0, 100.0]
    k = lagrange_bounded(reff, omega, 30_000.0, [1.0] * 3, [150.0] * 3)
    assert k[2] == 150.0  # the closed form would give 273 > cap
    assert k[0] == pytest.approx(75.0, rel=1e-9) and k[1] == pytest.approx(75.0, rel=1e-9)
    assert sum(a * w for a, w in zip(k, omega)) == pytest.approx(30_000.0, rel=1e-9)


@st.composite
def random_type(draw):
    """One matrix type: 1–12 groups of one shape, random decreasing spectra, and a budget fraction."""
    inp = draw(st.integers(8, 96))
    out = draw(st.integers(4, 96))
    n = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for i in range(n):
        r = min(inp, out)
        decay = float(torch.rand((), generator=gen, dtype=torch.float64)) * 3 + 0.01
        scale = 10 ** (float(torch.rand((), generator=gen, dtype=torch.float64)) * 6 - 3)
        noise = torch.rand(r, generator=gen, dtype=torch.float64) * 1e-3
        sigma = (scale * torch.exp(-decay * torch.arange(r, dtype=torch.float64)) + noise).sort(descending=True).values
        groups.append(GroupSpectrum(f"t@{i}", "t", (i,), inp, out, sigma))
    keep = draw(st.floats(0.05, 0.95))
    return groups, keep


@settings(max_examples=100, deadline=None)
@given(random_type())
def test_drank_integer_ranks_meet_the_type_budget_exactly(case):
    groups, keep = case
    budget = math.floor(keep * sum(g.dense_params for g in groups))
    ranks = drank_type(groups, budget)
    spent = total_cost(groups, ranks)
    omega = groups[0].omega
    assert all(1 <= ranks[g.key] <= g.max_rank for g in groups)
    # no group could take one more rank (all at max_rank, or the step onto dense does not fit)
    maximal = all(ranks[g.key] == g.max_rank or spent + rank_cost(g, ranks[g.key] + 1) - rank_cost(g, ranks[g.key])
                  > budget for g in groups)
    floor_cost = sum(rank_cost(g, 1) for g in groups)
    if budget >= floor_cost:
        assert spent <= budget  # never over
        assert maximal
        assert spent >= budget - omega or any(ranks[g.key] == g.max_rank - 1 for g in groups)


@settings(max_examples=40, deadline=None)
@given(random_type(), st.floats(0.0, 0.9))
def test_every_allocator_answer_passes_the_engine_check(case, beta):
    groups, keep = case
    # three types from one random spectrum family: q and k donors, v taker with a narrower output
    typed = []
    for mtype, out_scale in (("q_proj", 1), ("k_proj", 1), ("v_proj", 2)):
        for g in groups:
            out = max(2, g.out_features // out_scale)
            typed.append(_spectrum(f"{mtype}@{g.layers[0]}", mtype, g.layers[0], g.in_features, out,
                                   g.singular_values[:min(g.in_features, out)].tolist()))
    budget = math.floor(keep * sum(g.dense_params for g in typed))
    if budget < sum(rank_cost(g, 1) for g in typed):
        return  # not even rank 1 everywhere fits
    registry = load_registry(strict=True)
    for name, options in (("uniform", {}), ("drank", {"fallback": "none"}), ("drank", {"fallback": "loss"}),
                          ("drank-rebalanced", {"beta": beta, "fallback": "none"}), ("protect-first", {"layers": 1})):
        answer = registry.allocators[name].allocate(typed, budget, options)
        check_allocation(typed, answer, budget, name)


def _calibrated(kv_heads, ids):
    model = tiny_llama(kv_heads=kv_heads)
    registry = load_registry(strict=True)
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, None, [], lambda t: 1)
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    put_signals(cal.spectra, compute_signals(registry, ("fisher",), model, adapter, plans, cal.factors, ids[:4], CPU,
                                             EventBus(), CancelToken()))
    return registry, cal


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def calibrated(request):
    ids = torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(1))
    return _calibrated(request.param, ids)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("name", BUILTINS)
def test_builtins_meet_the_budget_on_tiny_models(calibrated, name, ratio):
    registry, cal = calibrated
    allocator = registry.allocators[name]
    options = {o.name: o.default for o in allocator.options}
    budget = budget_for(cal.spectra, ratio)
    ranks = allocate(allocator, name, cal.spectra, budget, options)
    achieved = 1 - total_cost(cal.spectra, ranks) / sum(s.dense_params for s in cal.spectra)
    assert abs(achieved - ratio) < 0.005


def test_drank_types_each_meet_their_own_budget(calibrated):
    registry, cal = calibrated
    budget = budget_for(cal.spectra, 0.3)
    ranks, _ = registry.allocators["drank"].allocate(cal.spectra, budget, {"fallback": "none"}), None
    for mtype, type_budget in type_budgets(cal.spectra, budget).items():
        members = [s for s in cal.spectra if s.matrix_type == mtype]
        # within one ω (the final top-up may hand a type one extra rank)
        assert abs(total_cost(members, ranks) - type_budget) <= members[0].omega


def test_drank_fallback_reports_the_types_that_fell_back(calibrated):
    registry, cal = calibrated
    budget = budget_for(cal.spectra, 0.3)
    answer = allocate(registry.allocators["drank"], "drank", cal.spectra, budget, {"fallback": "loss"})
    fell = answer.notes["fell_back_to_uniform"]
    assert fell["gate_proj"] == "always uniform (reference code)"
    uniform = registry.allocators["uniform"].allocate([s for s in cal.spectra if s.matrix_type == "gate_proj"],
                                                      type_budgets(cal.spectra, budget)["gate_proj"], {})
    assert all(answer[k] - v in (0, 1) for k, v in uniform.items())  # at most the final top-up's one rank
    plain = allocate(registry.allocators["drank"], "drank", cal.spectra, budget, {"fallback": "none"})
    assert plain.notes["fell_back_to_uniform"] == {}


def test_rebalance_moves_parameters_not_ranks_on_gqa():
    """GQA-like shapes: q, k and v have different ω; β moves β·Σ k·ω parameters, V gets them in its own ω."""
    def g(key, mtype, layer, out):
        return _spectrum(key, mtype, layer, 64, out, [1.0] * min(64, out))
    groups = [g("q@0", "q_proj", 0, 64), g("k@0", "k_proj", 0, 16), g("v@0", "v_proj", 0, 32),
              g("v@1", "v_proj", 1, 32)]
    ranks = {"q@0": 20, "k@0": 10, "v@0": 5, "v@1": 5}
    new, notes = rebalance_qk_to_v(groups, ranks, 0.5)
    assert new["q@0"] == 10 and new["k@0"] == 5
    freed = 10 * 128 + 5 * 80  # 1680 parameters
    assert notes["moved_params"] == 17 * 96 == 1632  # 17 V ranks of ω = 96; 48 left, too few for q or k
    assert new["v@0"] + new["v@1"] == 10 + 17 and abs(new["v@0"] - new["v@1"]) <= 1
    assert total_cost(groups, ranks) - total_cost(groups, new) == freed - 1632


def test_rebalance_caps_v_and_returns_the_overflow():
    def g(key, mtype, out):
        return _spectrum(key, mtype, 0, 64, out, [1.0] * min(64, out))
    groups = [g("q@0", "q_proj", 64), g("k@0", "k_proj", 64), g("v@0", "v_proj", 16)]  # v: max_rank 12
    ranks = {"q@0": 30, "k@0": 30, "v@0": 10}
    new, notes = rebalance_qk_to_v(groups, ranks, 0.5)
    assert new["v@0"] == groups[2].max_rank == 12
    assert notes["returned_params"] > 0
    assert total_cost(groups, new) <= total_cost(groups, ranks)
    assert total_cost(groups, ranks) - total_cost(groups, new) < 128


def _rebalance_one_rank_at_a_time(groups, ranks, beta):
    """The rebalance as first written (one V rank per loop step): the reference the fast one must equal."""
    from workbench.api import fill_to_budget

    ranks = dict(ranks)
    donors = [g for g in groups if g.matrix_type in ("q_proj", "k_proj")]
    takers = [g for g in groups if g.matrix_type == "v_proj"]
    before = total_cost(donors, ranks)
    for g in donors:
        ranks[g.key] = max(1, round((1 - beta) * ranks[g.key]))
    left = before - total_cost(donors, ranks)
    added = {g.key: 0 for g in takers}
    while True:
        open_ = [g for g in takers if ranks[g.key] < g.max_rank
                 and rank_cost(g, ranks[g.key] + 1) - rank_cost(g, ranks[g.key]) <= left]
        if not open_:
            break
        g = min(open_, key=lambda g: (added[g.key], g.key))
        left -= rank_cost(g, ranks[g.key] + 1) - rank_cost(g, ranks[g.key])
        ranks[g.key] += 1
        added[g.key] += 1
    ranks.update(fill_to_budget(donors, {g.key: ranks[g.key] for g in donors}, total_cost(donors, ranks) + left))
    return ranks


@pytest.mark.parametrize("seed", range(12))
def test_rebalance_in_whole_rounds_equals_one_rank_at_a_time(seed):
    """Random GQA-like layouts (V groups of 1 or 2 layers, some near their max_rank): same ranks exactly."""
    gen = torch.Generator().manual_seed(seed)

    def pick(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    hidden, kv = pick(24, 64), pick(8, 32)
    groups, ranks = [], {}
    layer, depth = 0, pick(3, 8)
    while layer < depth:
        n = pick(1, 2)
        layers = tuple(range(layer, layer + n))
        for mtype, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv)):
            key = f"{mtype}@{layer}"
            g = GroupSpectrum(key, mtype, layers, hidden, out, torch.ones(min(hidden, n * out), dtype=torch.float64))
            groups.append(g)
            ranks[key] = pick(1, g.max_rank)
        layer += n
    beta = [0.1, 0.3, 0.5, 0.9][seed % 4]
    fast, _ = rebalance_qk_to_v(groups, ranks, beta)
    assert fast == _rebalance_one_rank_at_a_time(groups, ranks, beta)


def test_protect_first_keeps_layer_zero_dense(calibrated):
    registry, cal = calibrated
    ranks = allocate(registry.allocators["protect-first"], "protect-first", cal.spectra, budget_for(cal.spectra, 0.3), {})
    for s in cal.spectra:
        if s.layers[0] == 0:
            assert ranks[s.key] == s.max_rank
    assert set(ranks.notes["dense_groups"]) == {s.key for s in cal.spectra if s.layers[0] == 0}


def test_water_fill_takes_the_best_loss_per_parameter_first():
    """Two groups, ω = 10 each: A's components are worth 9, 8, 1; B's 5, 4, 3. Budget for 4 ranks."""
    a = _spectrum("a", "t", 0, 5, 5, [1.0] * 5)  # ω = 10, max_rank = 2 → use bigger shapes
    a = GroupSpectrum("a", "t", (0,), 8, 8, torch.ones(8, dtype=torch.float64))
    b = GroupSpectrum("b", "t", (1,), 8, 8, torch.ones(8, dtype=torch.float64))
    assert a.omega == 16 and a.max_rank == 4
    scores = {"a": [9.0, 8.0, 1.0, 0.5, 0.0], "b": [5.0, 4.0, 3.0, 0.1, 0.0]}
    ranks = water_fill([a, b], scores, budget=16 * 5)
    assert ranks == {"a": 2, "b": 3}  # keeps 9, 8 | 5, 4, 3 (rank 1 of each is mandatory)


def test_water_fill_sees_past_a_small_component():
    """A prefix constraint: a big component behind a small one is reached through the concave envelope."""
    a = GroupSpectrum("a", "t", (0,), 8, 8, torch.ones(8, dtype=torch.float64))
    b = GroupSpectrum("b", "t", (1,), 8, 8, torch.ones(8, dtype=torch.float64))
    scores = {"a": [1.0, 0.1, 9.0, 0.0, 0.0], "b": [1.0, 2.0, 0.5, 0.0, 0.0]}
    ranks = water_fill([a, b], scores, budget=16 * 4)
    assert ranks == {"a": 3, "b": 1}  # 0.1 + 9 over two ranks beats 2 + 0.5


def test_loss_aware_refuses_without_its_signal(registry):
    g = _spectrum("a", "t", 0, 8, 8, [1.0] * 8)
    with pytest.raises(ValueError, match="fisher"):
        registry.allocators["loss-aware"].allocate([g], 32, {})


def test_loss_aware_runs_from_a_profile_with_its_signal_stage(tiny_workspace, tmp_path):
    import json

    from typer.testing import CliRunner

    from conftest import tiny_profile
    from workbench.cli import app

    out = tmp_path / "out"
    text = tiny_profile(tiny_workspace, out, ratio=0.4, allocator="loss-aware", extra="[signals.fisher]\nwindows = 3\n")
    (tmp_path / "p.toml").write_text(text)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "p.toml"), "--log-format", "json"])
    assert result.exit_code == 0, result.output
    progress = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    assert [e["current"] for e in progress if e["stage"] == "sensitivity" and e["kind"] == "progress"] == [1, 2, 3]
    report = json.loads((out / "report.json").read_text())
    assert "sensitivity" in report["timings"]
    assert report["allocator"]["notes"]["signal"] == "component"
    assert abs(report["params"]["ratio_targeted"] - 0.4) < 0.005


@pytest.mark.embedded
def test_builtins_meet_the_budget_on_the_embedded_model():
    from workbench.sources.text import calibration_windows
    from workbench.sources.models import load_model

    registry = load_registry(strict=True)
    loaded = load_model("embedded:smollm2-135m", "float32", "cpu")
    adapter = registry.adapter_for(loaded.model)
    plans = plan_groups(loaded.model, adapter, None, [], 1)
    windows = calibration_windows(loaded.tokenizer, "embedded:wiki-vital", 4, 128, 0)
    cal = calibrate(loaded.model, adapter, plans, windows, CPU, EventBus(), CancelToken())
    put_signals(cal.spectra, compute_signals(registry, ("fisher",), loaded.model, adapter, plans, cal.factors,
                                             windows[:2], CPU, EventBus(), CancelToken()))
    dense = sum(s.dense_params for s in cal.spectra)
    for ratio in (0.2, 0.4):
        budget = budget_for(cal.spectra, ratio)
        for name in BUILTINS:
            allocator = registry.allocators[name]
            ranks = allocate(allocator, name, cal.spectra, budget, {o.name: o.default for o in allocator.options})
            assert abs(1 - total_cost(cal.spectra, ranks) / dense - ratio) < 0.005, name

    # The default must earn its place on held-out text, even from this small calibration.
    from workbench.sources.text import evaluation_tokens
    from workbench_evaluators.perplexity import perplexity

    held_out = evaluation_tokens(loaded.tokenizer, "embedded:wiki-vital")
    budget = budget_for(cal.spectra, 0.4)
    scores = {}
    for name in ("uniform", "loss-aware"):
        allocator = registry.allocators[name]
        ranks = allocate(allocator, name, cal.spectra, budget, {o.name: o.default for o in allocator.options})
        model = copy.deepcopy(loaded.model)
        assemble(model, adapter, plans, dict(cal.factors), ranks, cal.spectra)
        with torch.inference_mode():
            scores[name] = perplexity(model, held_out, 128, max_windows=8, device="cpu")["perplexity"]
        del model
    assert scores["loss-aware"] < 0.85 * scores["uniform"], scores


@pytest.mark.parametrize("group_size", [1, 2])
def test_fisher_scores_match_the_loss_slope_of_removing_each_component(group_size):
    """F_i = ½·mean_b (dL_b/dt)², where W(t) = W − t·σ_i u_i v_iᵀL⁻¹ removes component i at t = 1.

    The reference differentiates the float64 loss with respect to the scalar t itself, through a
    functional call, so neither the gradient hooks nor the per-layer projection are reused.
    """
    from torch.func import functional_call

    from workbench_signals.fisher import fisher_scores

    model = tiny_llama(kv_heads=2, layers=2).double()
    adapter = load_registry(strict=True).adapter_for(model)
    plans = plan_groups(model, adapter, ["q_proj", "down_proj"], [], lambda t: group_size)
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(3))
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    windows = ids[:3]
    scores = fisher_scores(model, adapter, plans, cal.factors, windows, CPU, EventBus(), CancelToken())
    names = {id(p): n for n, p in model.named_parameters()}
    layers = adapter.decoder_layers(model)
    for plan in plans:
        f = cal.factors[plan.key]
        weights = [layers[j].get_submodule(plan.site.path).weight for j in plan.layers]
        for i in (0, 3, f.u.shape[1] - 1):
            steps = [-f.singular_values[i] * torch.outer(u[:, i].double(), f.vt_linv[i].double())
                     for u in f.u.split(plan.out_features, dim=0)]  # rows of U per layer of the group
            slopes = []
            for b in range(windows.shape[0]):
                t = torch.zeros((), dtype=torch.float64, requires_grad=True)
                moved = {names[id(w)]: w.detach() + t * d for w, d in zip(weights, steps)}
                logits = functional_call(model, moved, kwargs={"input_ids": windows[b:b + 1], "use_cache": False}).logits
                torch.nn.functional.cross_entropy(logits[0, :-1], windows[b, 1:]).backward()
                slopes.append(t.grad.item())
            expected = 0.5 * sum(x * x for x in slopes) / len(slopes)
            assert expected > 0
            assert scores[plan.key][i].item() == pytest.approx(expected, rel=1e-3), (plan.key, i)


def test_protect_first_falls_back_when_rank_one_elsewhere_costs_more_than_omega():
    # Found by the property test above: v groups 8 → 2 have break-even rank 1, where they cost their dense
    # 16 parameters, not ω = 10; dense first layers left too little for that and the answer went over budget.
    q = [_spectrum(f"q_proj@{i}", "q_proj", i, 8, 5, [4.0, 2.0, 1.0, 0.5, 0.25]) for i in range(4)]
    v = [_spectrum(f"v_proj@{i}", "v_proj", i, 8, 2, [3.0, 1.0]) for i in range(4)]
    groups = q + v
    budget = sum(rank_cost(g, g.max_rank) for g in groups if g.layers[0] == 0) + sum(g.omega for g in groups[1:4]) \
        + sum(g.omega for g in groups[5:])  # pays ω, not the dense 16, for the v groups at rank 1
    registry = load_registry(strict=True)
    answer = registry.allocators["protect-first"].allocate(groups, budget, {"layers": 1})
    checked = check_allocation(groups, answer, budget, "protect-first")
    assert total_cost(groups, checked) <= budget and answer.notes["note"] == "budget too small"
