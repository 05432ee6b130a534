"""Numerics: singular and ill-conditioned Grams take the eigen route, are reported, and stay exact
against float64 references built from the very activations the engine saw; NaN/Inf stop the run
naming the layer and the site."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import save_tiny_model, tiny_llama, write_text_corpus
from workbench.cli import app
from workbench.engine.calibration import GramAccumulator
from workbench.engine.compress import assemble, calibrate
from workbench.errors import RunFailed
from workbench.events import CancelToken, EventBus
from workbench.engine.grouping import plan_groups
from workbench.registry import load_registry

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def registry():
    return load_registry(strict=True)


def _plans(model, registry, group_size=1, output_grams=False):
    """By default every group on its input's Gram: these tests are about the whitening of XᵀX and its
    fallbacks (wide one-layer groups factored from their output's Gram have none: test_output_gram.py)."""
    adapter = registry.adapter_for(model)
    return adapter, plan_groups(model, adapter, None, [], lambda t: group_size, output_grams=output_grams)


def _record_inputs(model, adapter, plans):
    """float64 copies of each targeted input, per (input group, layer), taken by hooks of our own
    that run beside the engine's: the reference sees exactly what the engine saw."""
    layers = adapter.decoder_layers(model)
    seen: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []
    for plan in plans:
        for i in plan.layers:
            key = (plan.site.input_group, i)
            if key in seen:
                continue
            seen[key] = []

            def hook(module, args, key=key):
                seen[key].append(args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64))

            handles.append(layers[i].get_submodule(plan.site.path).register_forward_pre_hook(hook))
    return seen, handles


def _calibrate(model, registry, ids, group_size=1, events=None, output_grams=False):
    """Calibrate keeping float64 factors of every component, and the inputs each group saw."""
    adapter, plans = _plans(model, registry, group_size, output_grams)
    inputs, handles = _record_inputs(model, adapter, plans)
    try:
        cal = calibrate(model, adapter, plans, ids, CPU, events or EventBus(), CancelToken(), full_factors=True)
    finally:
        for h in handles:
            h.remove()
    xs = {key: torch.cat(chunks) for key, chunks in inputs.items()}
    return adapter, plans, cal, xs


def _check_group_against_reference(model, adapter, plan, cal, xs):
    """The loss identity on the real activations: ‖(W − Ŵ)Xᵀ‖²_F = Σ_{i>k} σ_i² at several k, and
    the σ themselves equal to the singular values of W·Xᵀ computed directly in float64.

    A group is whitened with its summed Gram (docs/architecture.md), so X stacks the inputs of all its layers
    and W the weights: every layer is measured on every layer's inputs.
    """
    layers = adapter.decoder_layers(model)
    w = torch.cat([layers[i].get_submodule(plan.site.path).weight.detach().to(torch.float64) for i in plan.layers])
    x = torch.cat([xs[(plan.site.input_group, i)] for i in plan.layers])
    f = cal.factors[plan.key]
    s = f.singular_values
    energy = float((s ** 2).sum())
    assert energy == pytest.approx(float(((w @ x.T) ** 2).sum()), rel=1e-9)
    reference = torch.linalg.svdvals(w @ x.T)
    top = min(len(reference), len(s))
    # compared squared: σ² is what the SVD-by-eigh computes, to float64 rounding of σ₁²
    assert torch.allclose(s[:top] ** 2, reference[:top] ** 2, rtol=0, atol=1e-11 * float(reference[0]) ** 2)
    for k in sorted({1, f.u.shape[1] // 4, f.u.shape[1] // 2, f.u.shape[1]} - {0}):
        root = s[:k].sqrt()
        w_hat = (f.u[:, :k] * root) @ (root[:, None] * f.vt_linv[:k])
        measured = float(((w - w_hat) @ x.T).pow(2).sum())
        predicted = float((s[k:] ** 2).sum())
        assert abs(measured - predicted) <= 1e-9 * energy, (plan.key, k, measured, predicted)
        assert torch.isfinite(f.vt_linv[:k]).all()


def _report(cal):
    return {row["group"]: row for row in cal.whitening}


# --------------------------------------------------------------------------- singular Grams


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fewer_tokens_than_input_width_fall_back_exactly(registry, dtype):
    """16 tokens against inputs 64 and 128 wide: every Gram is singular, every group says so."""
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    warnings = []
    bus = EventBus([lambda e: warnings.append(e.message) if e.kind == "warning" else None])
    adapter, plans, cal, xs = _calibrate(model, registry, ids, events=bus)
    report = _report(cal)
    for plan in plans:
        x = xs[(plan.site.input_group, plan.layers[0])]
        rank = int(torch.linalg.matrix_rank(x))
        assert rank <= 16 < plan.in_features
        row = report[plan.key]
        assert row["method"] == "eigen" and row["fallback"], row
        assert row["rank_of_gram"] == rank, (plan.key, row["rank_of_gram"], rank)
        assert any(m.startswith(f"{plan.key}:") and "eigen" in m for m in warnings), plan.key
        _check_group_against_reference(model, adapter, plan, cal, xs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_output_grams_need_no_fallback_where_the_input_gram_is_singular(registry, dtype):
    """The same 16 tokens, down_proj from its output's Gram: no warning, and the same reference
    checks on the activations it saw (σ of W·Xᵀ, the loss identity at several ranks)."""
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    warnings = []
    bus = EventBus([lambda e: warnings.append(e.message) if e.kind == "warning" else None])
    adapter, plans, cal, xs = _calibrate(model, registry, ids, events=bus, output_grams=True)
    report = _report(cal)
    down = [p for p in plans if p.output_statistic]
    assert [p.matrix_type for p in down] == ["down_proj"] * 4
    for plan in down:
        assert report[plan.key]["method"] == "output-gram" and not report[plan.key]["fallback"]
        assert not any(m.startswith(f"{plan.key}:") for m in warnings), plan.key
        _check_group_against_reference(model, adapter, plan, cal, xs)


def test_the_same_sentence_repeated_falls_back_exactly(registry):
    """Four windows of one 4-token phrase tiled: 128 tokens but only a handful of directions."""
    phrase = torch.tensor([5, 17, 42, 9])
    ids = phrase.repeat(8).unsqueeze(0).repeat(4, 1)  # 4 identical windows of 32 tokens
    model = tiny_llama()
    adapter, plans, cal, xs = _calibrate(model, registry, ids)
    report = _report(cal)
    assert report["q_proj@0"]["rank_of_gram"] <= 4  # layer 0 sees the 4 token embeddings only
    for plan in plans:
        assert report[plan.key]["method"] == "eigen", report[plan.key]
        _check_group_against_reference(model, adapter, plan, cal, xs)


def test_shared_basis_group_with_a_singular_gram_stays_exact(registry):
    model = tiny_llama()
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(4))
    adapter, plans, cal, xs = _calibrate(model, registry, ids, group_size=2)
    assert all(len(p.layers) == 2 for p in plans)
    for plan in plans:
        assert _report(cal)[plan.key]["method"] == "eigen"
        _check_group_against_reference(model, adapter, plan, cal, xs)


def test_dead_input_channels_get_no_weight_instead_of_amplified_noise(registry, calib_ids):
    """Channels that are always zero (a zeroed norm weight, a zeroed gate row) make every Gram
    singular; the factors must ignore those channels (P's column ≈ 0), not divide by ~0."""
    model = tiny_llama()
    dead = {"attn_in": 3, "mlp_in": 5, "mlp_out": 9}
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[dead["attn_in"]] = 0.0
            layer.post_attention_layernorm.weight[dead["mlp_in"]] = 0.0
            layer.mlp.gate_proj.weight[dead["mlp_out"]] = 0.0  # silu(0)·up = 0: down_proj's input dies
    adapter, plans, cal, xs = _calibrate(model, registry, calib_ids)
    report = _report(cal)
    for plan in plans:
        channel = dead.get(plan.site.input_group)
        if channel is None:
            continue
        x = xs[(plan.site.input_group, plan.layers[0])]
        assert float(x[:, channel].abs().max()) == 0.0  # the channel really is dead
        assert report[plan.key]["method"] == "eigen" and report[plan.key]["fallback"]
        assert report[plan.key]["rank_of_gram"] == plan.in_features - 1
        f = cal.factors[plan.key]
        p = f.vt_linv * f.singular_values[: f.vt_linv.shape[0], None].sqrt()
        assert float(p[:, channel].abs().max()) <= 1e-9 * float(p.abs().max()), plan.key
        _check_group_against_reference(model, adapter, plan, cal, xs)


def test_an_input_that_is_always_zero_gives_zero_factors_not_noise(registry, calib_ids):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight.zero_()  # mlp_in of layer 1: all zero
    adapter, plans, cal, xs = _calibrate(model, registry, calib_ids)
    for key in ("gate_proj@1", "up_proj@1"):
        row = _report(cal)[key]
        assert (row["method"], row["rank_of_gram"]) == ("eigen", 0)
        f = cal.factors[key]
        assert float(f.singular_values.abs().max()) == 0.0
        assert torch.isfinite(f.vt_linv).all() and float(f.vt_linv.abs().max()) == 0.0


def test_a_cholesky_factor_failing_the_loss_check_is_replaced_and_reported(registry, calib_ids, monkeypatch):
    """The third trigger: Cholesky "succeeded" but whitens badly (simulated by skewing its measured loss)."""
    import workbench.engine.compress as engine

    real = engine.measured_loss

    def skewed(weights, factors, rank):
        value = real(weights, factors, rank)
        return value * 1.01 + 1.0 if factors.whitening.method == "cholesky" else value

    monkeypatch.setattr(engine, "measured_loss", skewed)
    model = tiny_llama(layers=1)
    adapter, plans, cal, xs = _calibrate(model, registry, calib_ids)
    for plan in plans:
        row = _report(cal)[plan.key]
        assert row["method"] == "eigen" and row["fallback"].startswith("loss check failed on Cholesky"), row
        _check_group_against_reference(model, adapter, plan, cal, xs)


# --------------------------------------------------------------------------- float16


def test_float16_activations_accumulate_exactly_in_float64():
    """The Gram of float16 activations equals the float64 product of their (exact) upcasts."""
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(37, 48, generator=g) * 300).to(torch.float16) for _ in range(3)]
    chunks[1][:, 7] = 0  # and a dead channel
    acc = GramAccumulator()
    site = torch.nn.Identity()  # only its input matters to the accumulator's hook
    acc.watch("x", site)
    with torch.inference_mode():
        for x in chunks:
            site(x)
    acc.close()
    x64 = torch.cat(chunks).to(torch.float64)
    assert acc.tokens["x"] == 111
    assert torch.allclose(acc.grams["x"], x64.T @ x64, rtol=1e-13, atol=0)


def test_float16_model_calibrates_exactly_and_reports_every_site(registry, calib_ids):
    model = tiny_llama().to(torch.float16)
    adapter, plans, cal, xs = _calibrate(model, registry, calib_ids)
    assert {row["group"] for row in cal.whitening} == {p.key for p in plans}
    for plan in plans:
        assert xs[(plan.site.input_group, plan.layers[0])].abs().max() < 65504  # upcasts of float16
        _check_group_against_reference(model, adapter, plan, cal, xs)


def test_factors_that_overflow_float16_stop_the_run_naming_the_group(registry, calib_ids):
    model = tiny_llama()
    adapter, plans = _plans(model, registry)
    cal = calibrate(model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken())
    cal.factors["down_proj@2"].vt_linv *= 1e9  # as an ill-conditioned whitening could make it
    model.to(torch.float16)
    ranks = {s.key: max(1, s.max_rank // 2) for s in cal.spectra}
    with pytest.raises(RunFailed, match=r"down_proj@2: .*NaN or Inf in torch.float16"):
        assemble(model, adapter, plans, cal.factors, ranks, cal.spectra)


# --------------------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("layer,path", [(2, "self_attn.q_proj"), (3, "mlp.down_proj")])
def test_nan_or_inf_weight_names_the_layer_and_site(registry, calib_ids, bad, layer, path):
    """The last layer's down_proj matters most: no later activation would ever show its NaN."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[layer].get_submodule(path).weight[1, 2] = bad
    adapter, plans = _plans(model, registry)
    with pytest.raises(RunFailed, match=rf"layer {layer}, {path}: NaN or Inf in the weight \(1 of "):
        calibrate(model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken())


def test_inf_in_the_embeddings_names_layer_zero_and_its_sites(registry, calib_ids):
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[int(calib_ids[0, 0])] = float("inf")
    adapter, plans = _plans(model, registry)
    with pytest.raises(RunFailed, match=r"layer 0, input of attn_in \(self_attn.k_proj, self_attn.q_proj, "
                                        r"self_attn.v_proj\): NaN or Inf in the calibration activations"):
        calibrate(model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken())


def test_a_nan_loss_check_is_a_failure_not_a_pass(registry, calib_ids, monkeypatch):
    """NaN > tolerance is False: the check must not read a NaN mismatch as agreement."""
    import workbench.engine.compress as engine

    monkeypatch.setattr(engine, "measured_loss", lambda *a, **k: float("nan"))
    model = tiny_llama(layers=1)
    adapter, plans = _plans(model, registry)
    with pytest.raises(RunFailed, match="whitened loss check failed"):
        calibrate(model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken())


# --------------------------------------------------------------------------- whole runs


def _run_profile(root, out, dataset, samples, seq_len, source=None, gram_precision="auto"):
    return f"""
[model]
source = "{source or root / 'tiny-llama'}"
device = "cpu"
[calibration]
dataset = "{dataset}"
samples = {samples}
seq_len = {seq_len}
[compression]
ratio = 0.3
allocator = "uniform"
group_size = 1
gram_precision = "{gram_precision}"
[output]
dir = "{out}"
"""


# float64 Grams find the exact numerical rank of a rank-deficient Gram; float32-equilibrated ones
# (the CPU default) carry rounding at ~1e-7 of the largest eigenvalue, which the rank then counts.
@pytest.mark.parametrize("precision", ["float64", "float32-equilibrated"])
def test_a_run_on_one_repeated_sentence_reports_which_sites_fell_back(tiny_workspace, tmp_path, precision):
    corpus = tmp_path / "same.txt"
    corpus.write_text("\n\n".join(["the cat runs fast."] * 60))
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_run_profile(tiny_workspace, out, corpus, samples=2, seq_len=8, gram_precision=precision))
    result = CliRunner().invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert len(report["whitening"]) == 28  # every group of the 4-layer model is listed
    fell = [w for w in report["whitening"] if w["fallback"]]
    assert "q_proj@0" in {w["group"] for w in fell}  # 16 tokens, a handful of them distinct, 64 wide
    for w in fell:
        assert w["method"] == "eigen"
        width = 128 if w["group"].startswith("down_proj") else 64
        assert w["rank_of_gram"] < (64 if precision == "float64" else width)  # found rank-deficient
        assert f"{w['group']}: {w['fallback']}" in result.output  # and the run's log says so
    md = (out / "report.md").read_text()
    assert f"{len(fell)} fell back to the eigendecomposition" in md and "q_proj@0: rank of the Gram" in md


def test_a_run_on_a_model_with_a_nan_weight_exits_1_naming_layer_and_site(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path / "model")
    write_text_corpus(tmp_path / "c.txt")
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_run_profile(tmp_path, out, tmp_path / "c.txt", samples=4, seq_len=16, source=tmp_path / "model"))
    result = CliRunner().invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 1, result.output
    assert "layer 1, mlp.down_proj: NaN or Inf in the weight (1 of 8192 values)" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_non_finite_values_are_counted_slice_by_slice(monkeypatch):
    from workbench.engine import numerics

    monkeypatch.setattr(numerics, "FINITE_ROWS", 3)  # 10 rows: slices of 3, 3, 3 and 1
    gram = torch.ones(10, 7, dtype=torch.float64)
    assert numerics.all_finite(gram) and numerics._bad_count(torch.tensor(2.0)) == 0
    gram[0, 1], gram[4, 6], gram[9, 0] = float("nan"), float("inf"), -float("inf")
    assert numerics._bad_count(gram) == 3 and not numerics.all_finite(gram)
    assert numerics._bad_count(torch.tensor([1.0, float("nan")])) == 1  # a bias
