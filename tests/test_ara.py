"""The `ara` signal (rank masks trained with the model's loss) and the `ara` allocator that rounds them."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama, tiny_profile
from workbench.api import GroupSpectrum, SignalContext
from workbench.cli import app
from workbench.engine.allocation import budget_for, check_allocation, rank_cost, total_cost
from workbench.engine.compress import allocate, calibrate
from workbench.engine.grouping import plan_groups
from workbench.engine.sensitivity import signal_options
from workbench.errors import Interrupted, UsageError
from workbench.events import CancelToken, EventBus
from workbench.profile.schema import parse_profile
from workbench.registry import load_registry
from workbench.run.pipeline import run
from workbench_allocators.ara import round_masks, soft_ratio
from workbench_signals.ara import (AraSignal, _group_spectra, _masked_modules, _Plan, initial_logits, initial_ranks,
                                   rank_mask, train_masks)

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------------------- the mask


def test_mask_is_monotone_starts_at_one_and_ends_at_the_dense_share():
    logits = torch.randn(5, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    m = rank_mask(logits)
    p = torch.softmax(logits, dim=-1)
    assert torch.allclose(m[:, 0], torch.ones(5, dtype=torch.float64))
    assert (m[:, 1:] <= m[:, :-1] + 1e-15).all()
    assert torch.equal(m[:, -1], p[:, -1])
    assert ((m >= 0) & (m <= 1 + 1e-12)).all()


def test_mask_jacobian_is_the_closed_form_and_every_logit_feels_the_whole_spectrum():
    """∂m_i/∂θ_l = p_l·([l ≥ i] − m_i): non-zero for every l once i > 1 (m_1 = 1 is constant)."""
    theta = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac = torch.autograd.functional.jacobian(rank_mask, theta)
    p, m = torch.softmax(theta, 0), rank_mask(theta)
    i = torch.arange(12).unsqueeze(1)
    l = torch.arange(12).unsqueeze(0)
    expected = p.unsqueeze(0) * ((l >= i).double() - m.unsqueeze(1))
    assert torch.allclose(jac, expected, atol=1e-14)
    assert (jac[1:].abs() > 0).all()
    assert torch.autograd.gradcheck(rank_mask, (theta.clone().requires_grad_(True),))


def test_initial_logits_centre_the_expected_rank_near_the_start():
    m = rank_mask(initial_logits(64, 20).double())
    assert abs(float(m.sum()) - 20) < 1.5
    assert rank_mask(initial_logits(64, 64).double())[-1] > 0.15  # dense start: the dense position leads


# ------------------------------------------------------------------------------------------- tiny models


def _calibrated(kv_heads: int, layers: int = 2, scale: dict[tuple[int, str], float] | None = None):
    """A tiny model made to have a loss worth training on: lm_head ×10 (peaked predictions) and windows
    it generates itself (greedy), so dropping components raises the loss; `scale` multiplies weights."""
    model = tiny_llama(kv_heads=kv_heads, layers=layers)
    adapter = load_registry(strict=True).adapter_for(model)
    with torch.no_grad():
        for (layer, path), factor in (scale or {}).items():
            adapter.decoder_layers(model)[layer].get_submodule(path).weight.mul_(factor)
        model.lm_head.weight.mul_(10.0)
        ids = torch.randint(0, 128, (8, 1), generator=torch.Generator().manual_seed(1))
        for _ in range(15):
            ids = torch.cat([ids, model(input_ids=ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    plans = plan_groups(model, adapter, None, [], lambda t: 1)
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    return model, adapter, plans, cal, ids


def _context(model, adapter, plans, cal, ids, options, events=None, cancel=None, checkpoint=None, budget=None,
             lookup=None):
    signal = AraSignal()
    return SignalContext(model=model, adapter=adapter, plans=plans, factors=cal.factors, windows=ids, device=CPU,
                         events=events or EventBus(), cancel=cancel or CancelToken(),
                         options=signal_options(signal, options), budget=budget, checkpoint=checkpoint,
                         lookup=lookup)


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def tiny(request):
    return _calibrated(request.param)


def test_masked_layer_is_the_rank_k_truncation_and_exactly_dense_at_break_even(tiny):
    model, adapter, plans, cal, ids = tiny
    plan = next(p for p in plans if p.matrix_type == "k_proj")
    g = _Plan(plan, cal.factors)
    x = torch.randn(3, plan.in_features, generator=torch.Generator().manual_seed(2))
    dense = adapter.decoder_layers(model)[plan.layers[0]].get_submodule(plan.site.path)
    f = cal.factors[plan.key]
    for k in (1, g.r // 2, g.r):
        logits = torch.full((g.r,), -60.0)
        logits[k - 1] = 60.0  # all the mass on position k
        module = next(iter(_masked_modules(_context(model, adapter, [plan], cal, ids, {}), [g], [logits]).values()))
        with torch.no_grad():
            got = module(x)
            if k == g.r:
                want = dense(x)
            else:
                want = (x @ f.vt_linv[:k].float().mT) @ (f.u[:plan.out_features, :k].float()
                                                          * f.singular_values[:k].float()).mT
        assert torch.allclose(got, want, atol=1e-5), k


def test_rounding_meets_the_budget_on_random_masks():
    gen = torch.Generator().manual_seed(3)
    groups = []
    for i, (inp, out) in enumerate([(64, 64), (64, 32), (128, 64), (64, 128), (64, 32), (96, 40)]):
        groups.append(GroupSpectrum(f"t{i}@{i}", f"t{i}", (i,), inp, out,
                                    torch.sort(torch.rand(min(inp, out), generator=gen), descending=True).values))
    dense = sum(g.dense_params for g in groups)
    for keep in (0.3, 0.5, 0.8, 0.95):
        budget = math.floor(keep * dense)
        masks = {g.key: rank_mask(torch.randn(g.max_rank, generator=gen) * 2) for g in groups}
        ranks, threshold = round_masks(groups, masks, budget)
        check_allocation(groups, ranks, budget, "ara")
        spent = total_cost(groups, ranks)
        assert spent <= budget
        # nothing more fits: every group is dense or its next step is over the budget
        assert all(ranks[g.key] >= g.max_rank or spent + rank_cost(g, ranks[g.key] + 1) - rank_cost(g, ranks[g.key])
                   > budget for g in groups)
        assert 0.0 <= threshold <= 1.0


def test_rounding_of_binary_masks_is_the_masks_own_ranks():
    g = [GroupSpectrum("a@0", "a", (0,), 64, 64, torch.ones(64)), GroupSpectrum("b@0", "b", (0,), 64, 64,
                                                                                 torch.ones(64))]
    r = g[0].max_rank
    masks = {"a@0": torch.tensor([1.0] * 10 + [0.0] * (r - 10)), "b@0": torch.ones(r)}  # b: dense
    budget = rank_cost(g[0], 10) + g[1].dense_params
    ranks, _ = round_masks(g, masks, budget)
    assert ranks == {"a@0": 10, "b@0": r}
    assert soft_ratio(g, masks) == pytest.approx(1 - budget / (2 * 64 * 64))


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_trained_masks_round_to_the_budget_on_mha_and_gqa(tiny, ratio):
    model, adapter, plans, cal, ids = tiny
    budget = budget_for(cal.spectra, ratio)
    masks = train_masks(_context(model, adapter, plans, cal, ids, {"steps": 3, "windows": 2}), budget)
    for spec in cal.spectra:
        spec.sensitivity = {"ara": masks[spec.key]}
        assert masks[spec.key].shape == (spec.max_rank,)
    ranks = allocate(load_registry(strict=True).allocators["ara"], "ara", cal.spectra, budget, {})
    achieved = 1 - total_cost(cal.spectra, ranks) / sum(s.dense_params for s in cal.spectra)
    assert total_cost(cal.spectra, ranks) <= budget
    assert abs(achieved - ratio) < 0.005
    assert abs(ranks.notes["trained_ratio"] - ratio) < 0.1


def test_training_lowers_the_loss_and_leaves_the_model_as_it_was(tiny):
    model, adapter, plans, cal, ids = tiny
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    seen = []
    events = EventBus([lambda e: seen.append(e) if e.kind == "progress" else None])
    train_masks(_context(model, adapter, plans, cal, ids[:1], {"steps": 10, "windows": 1, "lr": 0.3},
                         events=events), budget_for(cal.spectra, 0.4))
    losses = [e.data["loss"] for e in seen]
    assert [e.current for e in seen] == list(range(1, 11)) and seen[-1].data["unit"] == "step"
    assert losses[-1] < losses[0]
    assert all(0.0 <= e.data["ratio"] <= 1.0 for e in seen)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(type(adapter.decoder_layers(model)[0].get_submodule(p.site.path)).__name__ == "Linear" for p in plans)


def test_a_group_whose_loss_dominates_ends_dense():
    """The last layer's down_proj ×40: its output dominates the residual stream, so its error does."""
    key = "down_proj@1"
    model, adapter, plans, cal, ids = _calibrated(2, scale={(1, "mlp.down_proj"): 40.0})
    budget = budget_for(cal.spectra, 0.4)
    uniform = allocate(load_registry(strict=True).allocators["uniform"], "uniform", cal.spectra, budget, {})
    spec = next(s for s in cal.spectra if s.key == key)
    assert uniform[key] < 0.7 * spec.max_rank
    masks = train_masks(_context(model, adapter, plans, cal, ids, {"steps": 40, "windows": 8, "lr": 0.3}), budget)
    for s in cal.spectra:
        s.sensitivity = {"ara": masks[s.key]}
    ranks = allocate(load_registry(strict=True).allocators["ara"], "ara", cal.spectra, budget, {})
    assert ranks[key] == spec.max_rank, (ranks[key], spec.max_rank, masks[key][-1])
    assert masks[key][-1] > 0.5  # the trained dense share itself, not just the rounding
    assert total_cost(cal.spectra, ranks) <= budget


# ------------------------------------------------------------------------------------------- resuming


class MemoryStore:
    """A progress store in memory, round-tripping meta through JSON as the work directory does."""

    def __init__(self):
        self.saved, self.saves = None, 0

    def save(self, meta, tensors):
        self.saved = (json.loads(json.dumps(meta)), {k: v.clone() for k, v in tensors.items()})
        self.saves += 1

    def load(self):
        return self.saved


def test_resumed_training_gives_the_same_masks_and_ranks(tiny):
    model, adapter, plans, cal, ids = tiny
    budget = budget_for(cal.spectra, 0.4)
    options = {"steps": 8, "windows": 3, "checkpoint_every": 3}
    whole = train_masks(_context(model, adapter, plans, cal, ids, options), budget)

    store, cancel = MemoryStore(), CancelToken()

    def stop_after_five(event):
        if event.kind == "progress" and event.current == 5:
            cancel.cancel("test interrupt")

    with pytest.raises(Interrupted):
        train_masks(_context(model, adapter, plans, cal, ids, options, events=EventBus([stop_after_five]),
                             cancel=cancel, checkpoint=store), budget)
    assert store.saves == 1 and int(store.saved[1]["done"][0]) == 3
    seen = []
    events = EventBus([lambda e: seen.append(e.current) if e.kind == "progress" else None])
    resumed = train_masks(_context(model, adapter, plans, cal, ids, options, checkpoint=store, events=events), budget)
    assert seen == [4, 5, 6, 7, 8]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    # a save made for other options or another budget is not resumed from
    other = train_masks(_context(model, adapter, plans, cal, ids, {**options, "lr": 0.01}, checkpoint=store),
                        budget)
    assert not all(torch.equal(whole[k], other[k]) for k in whole)


def _interrupt(profile, stage, current):
    cancel = CancelToken()

    def listener(event):
        if event.stage == stage and event.kind == "progress" and event.current == current:
            cancel.cancel("test interrupt")

    with pytest.raises(Interrupted):
        run(profile, events=EventBus([listener]), cancel=cancel)


def test_a_run_interrupted_mid_training_resumes_to_the_same_ranks(tiny_workspace, tmp_path):
    extra = "[signals.ara]\nsteps = 6\nwindows = 3\ncheckpoint_every = 2\n"
    reference = tmp_path / "reference"
    run(parse_profile(tiny_profile(tiny_workspace, reference, ratio=0.4, allocator="ara", extra=extra)))
    out = tmp_path / "out"
    profile = parse_profile(tiny_profile(tiny_workspace, out, ratio=0.4, allocator="ara", extra=extra))
    _interrupt(profile, "sensitivity", 5)
    logs = []
    run(profile, resume=True, events=EventBus([lambda e: logs.append(e.message) if e.kind == "log" else None]))
    assert any("resuming mask training at step 4/6" in m for m in logs), logs
    ranks = lambda d: json.loads((d / "report.json").read_text())["ranks"]  # noqa: E731
    assert ranks(out) == ranks(reference)
    report = json.loads((out / "report.json").read_text())
    assert abs(report["params"]["ratio_targeted"] - 0.4) < 0.005
    assert "trained_ratio" in report["allocator"]["notes"]


# ------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("options,message", [
    ({"steps": 0}, "signals.ara.steps: 0 is below the minimum"),
    ({"lr": -1.0}, "signals.ara.lr"),
    ({"init": "random"}, "signals.ara.init: 'random' is not one of the choices"),
    ({"guidance": "high"}, "signals.ara.guidance: expected number"),
    ({"stepz": 10}, "signals.ara.stepz: unknown option"),
])
def test_bad_options_are_refused_naming_the_key(options, message):
    with pytest.raises(UsageError, match=message.replace(".", r"\.").replace("(", r"\(")):
        signal_options(AraSignal(), options)


def test_a_profile_with_a_bad_ara_option_is_refused_with_exit_2(tiny_workspace, tmp_path):
    text = tiny_profile(tiny_workspace, tmp_path / "out", allocator="ara", extra="[signals.ara]\nbudget_weight = -3\n")
    (tmp_path / "p.toml").write_text(text)
    result = CliRunner().invoke(app, ["profile", "validate", str(tmp_path / "p.toml")])
    assert result.exit_code == 2, result.output
    assert "signals.ara.budget_weight" in result.output


def test_loss_aware_start_is_the_registered_allocator_on_its_signal(tiny):
    """init = "loss-aware" gives the loss-aware allocator's ranks on a Fisher pass over `init_windows`."""
    model, adapter, plans, cal, ids = tiny
    registry = load_registry(strict=True)
    budget = budget_for(cal.spectra, 0.4)
    ctx = _context(model, adapter, plans, cal, ids, {"init": "loss-aware", "init_windows": 3}, budget=budget,
                   lookup=registry.get)
    got = initial_ranks(ctx, _group_spectra(plans, cal.factors), budget)
    from workbench.engine.sensitivity import compute_signals, put_signals

    put_signals(cal.spectra, compute_signals(registry, ("fisher",), model, adapter, plans, cal.factors, ids[:3], CPU,
                                             EventBus(), CancelToken()))
    expected = allocate(registry.allocators["loss-aware"], "loss-aware", cal.spectra, budget, {})
    assert got == dict(expected)
    assert total_cost(cal.spectra, got) <= budget


def test_loss_aware_start_uses_a_replacement_registered_under_the_names(tiny):
    """A third-party "loss-aware" (and the signal it needs) is what the start uses, not the built-in's code."""
    from workbench.api import Allocator, Option, Signal, fill_to_budget, uniform_ranks

    model, adapter, plans, cal, ids = tiny
    seen = {}

    class Probe(Signal):
        name = "probe"
        options = (Option("windows", int, 2, min=1),)

        def compute(self, ctx):
            seen["windows"] = ctx.options["windows"]
            return {p.key: float(i) for i, p in enumerate(ctx.plans)}

    class FirstGroupFirst(Allocator):
        name = "loss-aware"
        needs = ("probe",)
        options = (Option("floor", int, 1, min=1),)

        def allocate(self, groups, budget, options):
            seen["probe"] = {g.key: g.sensitivity["probe"] for g in groups}
            seen["options"] = dict(options)
            ranks = {g.key: options["floor"] for g in groups}
            ranks[groups[0].key] = groups[0].max_rank
            return ranks

    plugins = {("allocator", "loss-aware"): FirstGroupFirst(), ("signal", "probe"): Probe()}
    budget = budget_for(cal.spectra, 0.4)
    ctx = _context(model, adapter, plans, cal, ids, {"init": "loss-aware", "init_windows": 5}, budget=budget,
                   lookup=lambda kind, name: plugins[(kind, name)])
    groups = _group_spectra(plans, cal.factors)
    got = initial_ranks(ctx, groups, budget)
    assert seen["windows"] == 5 and seen["options"] == {"floor": 1}
    assert seen["probe"] == {p.key: float(i) for i, p in enumerate(plans)}
    assert got[groups[0].key] == groups[0].max_rank  # the replacement's choice survives the budget fill
    assert got == fill_to_budget(groups, {**{g.key: 1 for g in groups}, groups[0].key: groups[0].max_rank}, budget)
    assert got != uniform_ranks(groups, budget)


def test_loss_aware_start_without_a_registry_says_how_to_give_one(tiny):
    model, adapter, plans, cal, ids = tiny
    budget = budget_for(cal.spectra, 0.4)
    ctx = _context(model, adapter, plans, cal, ids, {"init": "loss-aware"}, budget=budget)
    with pytest.raises(UsageError, match="lookup=registry.get"):
        initial_ranks(ctx, _group_spectra(plans, cal.factors), budget)


def test_the_signal_without_a_budget_says_what_it_needs(tiny):
    model, adapter, plans, cal, ids = tiny
    with pytest.raises(UsageError, match="budget"):
        AraSignal().compute(_context(model, adapter, plans, cal, ids, {"steps": 1}))


def test_the_allocator_without_its_signal_names_it():
    g = GroupSpectrum("a@0", "a", (0,), 8, 8, torch.ones(8))
    with pytest.raises(ValueError, match="'ara' signal"):
        load_registry(strict=True).allocators["ara"].allocate([g], 64, {})


def test_preflight_counts_mask_training_only_for_ara(tiny, tiny_workspace, tmp_path):
    from workbench.run.plan import mask_training_bytes
    from workbench.run.preflight import shapes_of

    model, adapter, plans, cal, ids = tiny
    profile = parse_profile(tiny_profile(tiny_workspace, tmp_path / "out", allocator="ara"))
    with_ara = shapes_of(model, plans, profile, 1000, adapter, ("ara",))
    without = shapes_of(model, plans, profile, 1000, adapter, ("fisher",))
    assert mask_training_bytes(without) == 0
    # at least one window's logits and their gradient in float32
    assert mask_training_bytes(with_ara) >= 4 * 3 * model.config.vocab_size * profile.calibration.seq_len


def test_preflight_refuses_when_mask_training_does_not_fit(tiny, tiny_workspace, tmp_path):
    import dataclasses

    from workbench.run.plan import mask_training_bytes
    from workbench.run.preflight import check, estimate, shapes_of

    model, adapter, plans, cal, ids = tiny
    profile = parse_profile(tiny_profile(tiny_workspace, tmp_path / "out", allocator="ara"))
    shapes = dataclasses.replace(shapes_of(model, plans, profile, 1000, adapter, ("ara",)), seq_len=4096,
                                 windows=1)
    est = estimate(shapes)
    training = mask_training_bytes(shapes)
    assert est.factors + training > est.memory + 1  # the calibration fits, the training does not
    with pytest.raises(UsageError, match="mask training"):
        check(est, tmp_path / "out", CPU, False, disk=lambda _: 1 << 40, memory=lambda _: est.memory + 1,
              shapes=shapes)
    assert "preflight" in check(est, tmp_path / "out", CPU, False, disk=lambda _: 1 << 40,
                                memory=lambda _: est.factors + training + est.memory, shapes=shapes)


def test_inspect_leaves_ara_out_by_default_unless_the_profile_chose_it(tiny_workspace, tmp_path):
    from workbench.run.rank_map import default_allocators

    registry = load_registry(strict=True)
    plain = parse_profile(tiny_profile(tiny_workspace, tmp_path / "a", allocator="uniform"))
    chosen = parse_profile(tiny_profile(tiny_workspace, tmp_path / "b", allocator="ara"))
    assert "ara" not in default_allocators(plain, registry) and "loss-aware" in default_allocators(plain, registry)
    assert "ara" in default_allocators(chosen, registry)
