"""The compensate stage: the closed-form update and sequential re-factoring on a second layer walk."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama, tiny_profile
from workbench.api import uniform_ranks
from workbench.cli import app
from workbench.engine.allocation import budget_for
from workbench.engine.compensate import compensate, dense_weights
from workbench.engine.compress import assemble, calibrate
from workbench.engine.grouping import plan_groups
from workbench.engine.lowrank import LowRankLinear
from workbench.events import CancelToken, EventBus
from workbench.registry import load_registry

CPU = torch.device("cpu")
runner = CliRunner()


def _setup(group_size: int, ratio: float = 0.6, layers: int = 3, windows: int = 12, seq: int = 16):
    """A dense tiny model and its assembled copy (uniform ranks), plus the calibration windows."""
    dense = tiny_llama(layers=layers)
    registry = load_registry(strict=True)
    adapter = registry.adapter_for(dense)
    plans = plan_groups(dense, adapter, None, [], lambda t: group_size)
    ids = torch.randint(0, 128, (windows, seq), generator=torch.Generator().manual_seed(3))
    cal = calibrate(dense, adapter, plans, ids, CPU, EventBus(), CancelToken())
    ranks = uniform_ranks(cal.spectra, budget_for(cal.spectra, ratio))
    compressed = copy.deepcopy(dense)
    weights = dense_weights(compressed, adapter, plans)
    table = assemble(compressed, adapter, plans, dict(cal.factors), dict(ranks), cal.spectra)
    return dense, compressed, adapter, plans, table, weights, ids


def _inputs(model, adapter, plans, ids) -> dict[tuple[int, str], torch.Tensor]:
    """Every targeted site's input token matrix (float64) when `model` runs over `ids`."""
    layers = adapter.decoder_layers(model)
    xs, handles = {}, []
    for plan in plans:
        for i in plan.layers:
            key = (i, plan.site.path)
            handles.append(layers[i].get_submodule(plan.site.path).register_forward_pre_hook(
                lambda m, args, key=key: xs.setdefault(key, []).append(args[0].reshape(-1, args[0].shape[-1]).double())))
    with torch.inference_mode():
        for start in range(0, ids.shape[0], 8):
            model(input_ids=ids[start:start + 8], use_cache=False)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in xs.items()}


def _objective(dense, compressed, adapter, plans, ids) -> float:
    """Σ over the low-rank sites of ‖X·Wᵀ − X̂·Pᵀ·Qᵀ‖², from the token matrices (float64)."""
    x, x_hat = _inputs(dense, adapter, plans, ids), _inputs(compressed, adapter, plans, ids)
    d_layers, c_layers = adapter.decoder_layers(dense), adapter.decoder_layers(compressed)
    total = 0.0
    for (i, path), xd in x.items():
        module = c_layers[i].get_submodule(path)
        if not isinstance(module, LowRankLinear):
            continue
        w = d_layers[i].get_submodule(path).weight.detach().double()
        total += float(((xd @ w.T - x_hat[(i, path)] @ module.basis.weight.double().T @ module.coef.weight.double().T) ** 2).sum())
    return total


def _run(compressed, adapter, plans, table, weights, ids, **kw):
    kw.setdefault("holdout", 0.0)  # the exact fits on all windows; the held-out choice has its own tests
    return compensate(compressed, adapter, plans, table, weights, ids, CPU, CancelToken().check, **kw)


@pytest.mark.parametrize("group_size", [1, 2])
def test_closed_form_q_equals_a_float64_lstsq_on_the_captured_token_matrices(group_size):
    dense, compressed, adapter, plans, table, weights, ids = _setup(group_size)
    section = _run(compressed, adapter, plans, table, weights, ids, update="closed-form", ridge=0.0)
    assert section["sites"] and all(s["updated"] for s in section["sites"])
    # every site's inputs in the final model are those the stage saw: earlier sites were final by then
    x, x_hat = _inputs(dense, adapter, plans, ids), _inputs(compressed, adapter, plans, ids)
    assert min(v.shape[0] for v in x.values()) > max(v.shape[1] for v in x.values())  # more tokens than width
    d_layers, c_layers = adapter.decoder_layers(dense), adapter.decoder_layers(compressed)
    checked = 0
    for (i, path), xd in x.items():
        module = c_layers[i].get_submodule(path)
        if not isinstance(module, LowRankLinear):
            continue
        w = d_layers[i].get_submodule(path).weight.detach().double()
        a = x_hat[(i, path)] @ module.basis.weight.double().T  # N×k
        want = torch.linalg.lstsq(a, xd @ w.T, driver="gelsd").solution.T  # out×k
        got = module.coef.weight.double()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), (i, path)
        checked += 1
    assert checked == len(section["sites"])
    if group_size == 2:  # one shared P per group, one Q per layer
        first = c_layers[0].get_submodule("self_attn.q_proj")
        assert first.basis is c_layers[1].get_submodule("self_attn.q_proj").basis


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("options", [dict(update="closed-form"), dict(sequential=True),
                                     dict(sequential=True, update="closed-form")])
def test_the_calibration_objective_never_gets_worse_and_ranks_stay(group_size, options):
    dense, compressed, adapter, plans, table, weights, ids = _setup(group_size)
    ranks = {n: m.rank for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)}
    without = _objective(dense, compressed, adapter, plans, ids)
    section = _run(compressed, adapter, plans, table, weights, ids, **options)
    with_stage = _objective(dense, compressed, adapter, plans, ids)
    assert with_stage <= without * (1 + 1e-9)
    assert with_stage == pytest.approx(section["objective_after"], rel=1e-4)
    assert all(s["objective_after"] <= s["objective_before"] for s in section["sites"])
    assert {n: m.rank for n, m in compressed.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert {tuple(m.basis.weight.shape) for m in compressed.modules() if isinstance(m, LowRankLinear)} == \
        {(r["rank"], r["in"]) for r in table if not r["dense"]}
    sizes = {p.key: len(p.layers) for p in plans}
    if options.get("sequential") and group_size == 2:  # 3 layers: groups of layers 0-1, then layer 2 alone
        assert section["notes"] and not any(s.get("refactored") for s in section["sites"] if sizes[s["group"]] > 1)
    if options.get("sequential") and group_size == 1:
        assert any(s.get("refactored") for s in section["sites"])


def test_the_dense_model_is_not_touched_and_the_compressed_model_still_runs():
    dense, compressed, adapter, plans, table, weights, ids = _setup(1)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    _run(compressed, adapter, plans, table, weights, ids, sequential=True, update="closed-form")
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert not any(isinstance(m, torch.nn.Linear) and n.endswith("q_proj")
                   for n, m in compressed.named_modules())  # the dense swap was undone
    with torch.inference_mode():
        assert torch.isfinite(compressed(input_ids=ids[:2]).logits).all()


def _cli_run(tiny_workspace, tmp_path, name, extra="", group_size=1):
    out = tmp_path / name
    text = tiny_profile(tiny_workspace, out, ratio=0.6, group_size=group_size, samples=8)
    text = text.replace("[[evaluate]]", extra + "[[evaluate]]")
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "report.json").read_text()), (out / "report.md").read_text(), result.output


def test_a_run_with_compensation_reports_it_and_perplexity_does_not_get_worse(tiny_workspace, tmp_path):
    plain, plain_md, _ = _cli_run(tiny_workspace, tmp_path, "plain")
    assert "compensation" not in plain
    report, md, output = _cli_run(tiny_workspace, tmp_path, "comp",
                                  'sequential = true\nupdate = "closed-form"\n')
    section = report["compensation"]
    assert section["sequential"] is True and section["update"] == "closed-form" and section["ridge"] == 1e-6
    assert section["time_s"] == report["timings"]["compensate"] > 0
    assert section["objective_after"] <= section["objective_before"]
    assert [r["rank"] for r in report["ranks"]] == [r["rank"] for r in plain["ranks"]]
    assert "sequential" in md and "closed-form" in md
    assert "sequential" in output and "closed-form" in output
    # the perplexity evaluator here reads the calibration corpus
    assert report["metrics"][0]["compressed"] <= plain["metrics"][0]["compressed"] * 1.0001


@pytest.mark.parametrize("key, value, allowed", [("update", '"closedform"', "'none' | 'closed-form'"),
                                                  ("sequential", '"yes"', "boolean"),
                                                  ("ridge", "-1.0", ">= 0")])
def test_bad_compensation_keys_are_profile_errors_naming_the_key(tiny_workspace, tmp_path, key, value, allowed):
    text = tiny_profile(tiny_workspace, tmp_path / "o").replace("[[evaluate]]", f"{key} = {value}\n[[evaluate]]")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    result = runner.invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 2
    assert f"compression.{key}" in result.output and allowed in result.output


def test_preflight_counts_the_second_stream_only_when_the_stage_runs():
    import dataclasses

    from workbench.run.preflight import Shapes, estimate

    groups = [("attn_in", 1, 64, 64)] * 3 + [("mlp_in", 1, 64, 128)] * 2 + [("mlp_out", 1, 128, 64)]
    off = Shapes(params=10_000, dtype_bytes=4, hidden=64, head_dim=16, groups=groups, windows=8, seq_len=32, ratio=0.5)
    on = dataclasses.replace(off, compensate=True)
    tokens = 8 * 32
    assert estimate(off).compensation == 0
    # the second stream, one layer's dense inputs per input group, and the widest input's float64
    # statistics: G, C, Ĝ for the fit and held-out windows plus their sum (9 matrices of 128²)
    assert estimate(on).memory - estimate(off).memory == (4 * tokens * 64 + 4 * tokens * (64 + 64 + 128)
                                                          + 9 * 8 * 128 ** 2)


def _kl_to_dense(dense, compressed, ids) -> float:
    """Mean KL(dense ‖ compressed) of the next-token distributions on `ids` (float64)."""
    with torch.inference_mode():
        ld = torch.log_softmax(dense(input_ids=ids, use_cache=False).logits.double(), -1)
        lc = torch.log_softmax(compressed(input_ids=ids, use_cache=False).logits.double(), -1)
    return float((ld.exp() * (ld - lc)).sum(-1).mean())


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("options", [dict(update="closed-form"), dict(sequential=True, update="closed-form")])
def test_end_to_end_the_compressed_model_moves_towards_the_dense_one_on_the_calibration_windows(group_size, options):
    # A random-weight model's perplexity on random tokens sits at log(vocab) whatever the weights, so the
    # end-to-end check is the distance of the whole model's predictions from the dense model's.
    dense, compressed, adapter, plans, table, weights, ids = _setup(group_size, ratio=0.6)
    plain = _kl_to_dense(dense, compressed, ids)
    _run(compressed, adapter, plans, table, weights, ids, **options)
    assert _kl_to_dense(dense, compressed, ids) < 0.9 * plain


def test_sequential_reaches_the_best_rank_k_fit_of_each_site_from_the_token_matrices():
    """Float64 reference: min over rank-k M of ‖X·Wᵀ − X̂·Mᵀ‖² = ‖X·Wᵀ − A‖² + Σ_{i>k} σ_i(A)², with A the
    projection of X·Wᵀ on X̂'s columns (lstsq); every site of a one-layer group reaches it (ridge 0)."""
    dense, compressed, adapter, plans, table, weights, ids = _setup(1)
    section = _run(compressed, adapter, plans, table, weights, ids, sequential=True, ridge=0.0)
    assert {s.get("refactor_ridge") for s in section["sites"]} == {0.0, 1e-6}  # singular Ĝ: the floor
    x, x_hat = _inputs(dense, adapter, plans, ids), _inputs(compressed, adapter, plans, ids)
    d_layers, c_layers = adapter.decoder_layers(dense), adapter.decoder_layers(compressed)
    by_site = {(s["layer"], s["group"]): s for s in section["sites"]}
    checked = 0
    for plan in plans:
        for i in plan.layers:
            module = c_layers[i].get_submodule(plan.site.path)
            if not isinstance(module, LowRankLinear):
                continue
            target = x[(i, plan.site.path)] @ d_layers[i].get_submodule(plan.site.path).weight.detach().double().T
            xh = x_hat[(i, plan.site.path)]
            # X̂ is float32: directions it lacks (o_proj's input after a low-rank v_proj) hold ~1e-7 noise, which
            # a float64 lstsq would use to fit anything; rcond drops them, as the ridge does in the stage.
            a = xh @ torch.linalg.lstsq(xh, target, rcond=1e-5, driver="gelsd").solution
            sigma = torch.linalg.svdvals(a)
            best = float(((target - a) ** 2).sum() + (sigma[module.rank:] ** 2).sum())
            entry = by_site[(i, plan.key)]
            # layer 0's first sites see X̂ = X: the whitened SVD is that optimum already, and the refit may tie
            # the ridge floor (singular Ĝ) costs a little optimality: ~1e-6 of the input's energy
            tolerance = 2e-3 if entry.get("refactor_ridge") else 1e-4
            assert entry["objective_after"] == pytest.approx(best, rel=tolerance)
            got = float(((target - xh @ module.basis.weight.double().T @ module.coef.weight.double().T) ** 2).sum())
            assert got == pytest.approx(best, rel=tolerance)  # the float32 module holds it too
            checked += 1
    assert checked == len(section["sites"]) > 0
    assert sum(s["refactored"] for s in section["sites"]) > len(section["sites"]) // 2


def test_the_compensation_section_round_trips_through_the_report_schema():
    from workbench.report import build_report, load_report

    section = {"sequential": True, "update": "closed-form", "ridge": 1e-6, "sites": [], "notes": [],
               "objective_before": 2.0, "objective_after": 1.0, "time_s": 0.5}
    written = build_report(compensation=section).to_dict()
    assert written["compensation"] == section
    assert load_report(written).compensation == section
    assert "compensation" not in build_report().to_dict()  # absent when the stage did not run


def test_held_out_windows_are_spread_evenly_and_never_empty_a_side():
    from workbench.engine.compensate import held_out_windows

    assert held_out_windows(8, 0.25) == [False, False, False, True] * 2
    assert held_out_windows(4, 0.5) == [False, True, False, True]
    assert held_out_windows(3, 0.25) == [False] * 3  # every 4th of 3: none, so nothing is held out
    assert held_out_windows(8, 0.0) == [False] * 8


def _site(seed: int = 0, d_in: int = 12, d_out: int = 8, k: int = 3, n: int = 60):
    """One low-rank module with random factors, its dense weight and token matrices for two window sets."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    module = LowRankLinear(d_in, d_out, k, dtype=torch.float64)
    with torch.no_grad():
        module.basis.weight.copy_(torch.randn(k, d_in, generator=g, dtype=torch.float64))
        module.coef.weight.copy_(torch.randn(d_out, k, generator=g, dtype=torch.float64))
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = [torch.randn(n, d_in, generator=g, dtype=torch.float64) for _ in range(2)]
    x_hat = [a + 0.5 * torch.randn(n, d_in, generator=g, dtype=torch.float64) for a in x]
    return SimpleNamespace(key="q_proj@0", layers=[0]), module, w, x, x_hat


def _stat(x, x_hat):
    return {"gram": x.mT @ x, "cross": x.mT @ x_hat, "gram_hat": x_hat.mT @ x_hat}


def test_a_change_that_hurts_the_held_out_windows_is_not_taken():
    from workbench.engine.compensate import _update_site

    plan, module, w, x, x_hat = _site()
    # Make the current Q exactly optimal for the held-out windows: any other Q is worse there.
    held = _stat(x[1], x_hat[1])
    p = module.basis.weight.detach().clone()
    z = x_hat[1] @ p.mT
    with torch.no_grad():
        module.coef.weight.copy_(torch.linalg.lstsq(z, x[1] @ w.mT).solution.mT)
    q_before = module.coef.weight.detach().clone()
    entry = _update_site(plan, 0, module, w, {"fit": _stat(x[0], x_hat[0]), "held": held}, False, "closed-form",
                         1e-6, 0.0)
    assert entry["updated"] is False and "ridge" not in entry
    assert torch.equal(module.coef.weight, q_before)
    assert entry["held_out_after"] == entry["held_out_before"]
    # Judged on the windows it was fit on (no holdout), the same update is taken: it lowers that objective.
    both = {n: _stat(x[0], x_hat[0])[n] + held[n] for n in held}
    entry = _update_site(plan, 0, module, w, {"fit": both}, False, "closed-form", 1e-6, 0.0)
    assert entry["updated"] is True and entry["objective_after"] < entry["objective_before"]


@pytest.mark.parametrize("sequential", [False, True])
def test_held_out_windows_like_the_fit_ones_choose_the_smallest_ridge_and_the_plain_fit(sequential):
    """Held-out statistics equal to the fit ones: the fit error grows with λ, so the smallest λ wins,
    and the refit on all windows (twice the statistics, a relative λ) equals the fit without holdout."""
    from workbench.engine.compensate import _update_site

    plan, module, w, x, x_hat = _site(1)
    stats = _stat(x[0], x_hat[0])
    plain = copy.deepcopy(module)
    reference = _update_site(plan, 0, plain, w, {"fit": stats}, sequential, "closed-form", 1e-6, 0.0)
    entry = _update_site(plan, 0, module, w, {"fit": stats, "held": stats}, sequential, "closed-form", 1e-6, 0.0)
    assert entry["updated"] and entry["ridge"] == 1e-6
    assert entry.get("refactor_ridge") == reference.get("refactor_ridge")
    assert torch.allclose(module.weight, plain.weight, rtol=1e-9, atol=1e-12)
    assert entry["objective_after"] == pytest.approx(2 * reference["objective_after"], rel=1e-9)


@pytest.mark.parametrize("sequential", [False, True])
def test_with_windows_held_out_the_stage_never_worsens_them_and_reports_the_real_objective(sequential):
    dense, compressed, adapter, plans, table, weights, ids = _setup(1)
    section = _run(compressed, adapter, plans, table, weights, ids, sequential=sequential, update="closed-form",
                   holdout=0.25)
    assert section["holdout"] == 0.25
    assert all(s["held_out_after"] <= s["held_out_before"] for s in section["sites"])
    assert section["held_out_after"] <= section["held_out_before"]
    assert any(s.get("updated") or s.get("refactored") for s in section["sites"])
    # what the modules hold now (refit on all windows) is what the section reports
    assert section["objective_after"] == pytest.approx(_objective(dense, compressed, adapter, plans, ids), rel=1e-6)
