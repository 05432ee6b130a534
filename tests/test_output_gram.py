"""Wide one-layer groups factored from their output's Gram YᵀY = W XᵀX Wᵀ (grouping.output_statistics):
the same singular values and truncations as the input route, against float64 references built from
the inputs; which groups take it; what the accumulator adds; the loss check that can fail."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_llama
from workbench.engine.calibration import GramAccumulator
from workbench.engine.compress import calibrate
from workbench.engine.factorize import (OUTPUT_METHOD, measured_output_loss, output_svd, predicted_loss,
                                        whitened_svd)
from workbench.engine.grouping import plan_groups
from workbench.events import CancelToken, EventBus
from workbench.registry import load_registry

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def registry():
    return load_registry(strict=True)


def _inputs(tokens: int, width: int, seed: int) -> torch.Tensor:
    """float64 activations with a massive channel (×1e4) and a small one (×1e-2)."""
    x = torch.randn(tokens, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[:, 3] *= 1e4
    x[:, 7] *= 1e-2
    return x


def _w_hat(factors, rank: int) -> torch.Tensor:
    qs, p = factors.factors(rank, torch.float64)
    return qs[0] @ p


@pytest.mark.parametrize("tokens", [400, 40], ids=["regular", "singular-input-gram"])
def test_the_output_gram_gives_the_input_routes_whitened_svd(tokens):
    """σ² against the float64 SVD of W Xᵀ; at every rank the same Ŵ Xᵀ as the Cholesky (or, with fewer
    tokens than input channels, the eigen) route, and the loss identity on the activations themselves."""
    out_features, in_features = 24, 64
    x = _inputs(tokens, in_features, tokens)
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1))
    w64 = w.double()
    via_output = output_svd(w, (x @ w64.T).T @ (x @ w64.T), out_features)
    via_input = whitened_svd([w], x.T @ x, out_features)
    assert via_output.whitening.method == OUTPUT_METHOD
    assert via_input.whitening.method == ("cholesky" if tokens > in_features else "eigen")
    wx = w64 @ x.T
    reference = torch.linalg.svdvals(wx)
    s = via_output.singular_values
    assert torch.allclose(s ** 2, reference ** 2, rtol=0, atol=1e-11 * float(reference[0]) ** 2)
    energy = float((reference ** 2).sum())
    for k in (1, 6, 12, 23):
        on_data = _w_hat(via_output, k) @ x.T
        assert float((wx - on_data).pow(2).sum()) == pytest.approx(float((reference[k:] ** 2).sum()), abs=1e-9 * energy)
        assert float((on_data - _w_hat(via_input, k) @ x.T).norm()) <= 1e-7 * float(wx.norm()), k


def test_the_output_routes_loss_check_fails_on_wrong_vectors():
    x = _inputs(300, 48, 2)
    w = torch.randn(16, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    c = (x @ w.T).T @ (x @ w.T)
    f = output_svd(w, c, 16)
    energy = float((f.singular_values ** 2).sum())
    assert abs(measured_output_loss(f, c, 8) - predicted_loss(f, 8)) <= 1e-12 * energy
    swapped = dataclasses.replace(f, u=f.u.clone())
    swapped.u[:, 0] = f.u[:, 12]  # a tail direction in place of the leading one
    assert abs(measured_output_loss(swapped, c, 8) - predicted_loss(swapped, 8)) > 1e-3 * energy


@pytest.mark.parametrize("precision,tolerance", [("float64", 1e-12), ("float32-equilibrated", 1e-5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_accumulated_output_gram_is_w_xtx_wt_without_the_bias(precision, tolerance, dtype):
    """Per entry, relative to the two output channels' norms, as the input Grams are bounded. A bf16
    output's own rounding (2⁻⁸) or a bias left in would be far outside these tolerances."""
    g = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(48, 16)
    with torch.no_grad():
        linear.bias.normal_(0.0, 3.0, generator=g)
    linear = linear.to(dtype)
    chunks = [(_inputs(37, 48, seed) / 100).to(dtype) for seed in range(3)]
    acc = GramAccumulator(precision)
    acc.watch_output("y", linear)
    with torch.inference_mode():
        for x in chunks:
            linear(x)
    acc.close()
    w, x64 = linear.weight.detach().double(), torch.cat(chunks).double()
    reference = w @ (x64.T @ x64) @ w.T
    norms = reference.diagonal().sqrt()
    gram = acc.grams["y"]
    assert acc.tokens["y"] == 111 and torch.equal(gram, gram.mT)
    assert float(((gram - reference).abs() / (norms[:, None] * norms[None, :])).max()) < tolerance


def test_wide_one_layer_groups_alone_on_their_input_take_the_output_gram(registry):
    model = tiny_llama(kv_heads=2)  # hidden 64, MLP 128; k/v give 32 outputs
    adapter = registry.adapter_for(model)
    by_default = plan_groups(model, adapter, None, [], 1)
    assert {p.matrix_type for p in by_default if p.output_statistic} == {"down_proj"}
    assert {p.statistic for p in by_default if p.output_statistic} == {"mlp.down_proj:output"}
    # k/v are wide but share their input with q, which needs its Gram
    assert {p.statistic for p in by_default if p.matrix_type in ("q_proj", "k_proj", "v_proj")} == {"attn_in"}
    # a shared basis needs the input Gram; a one-layer remainder group does not
    mixed = {p.key: p.output_statistic for p in plan_groups(model, adapter, None, [], {"down_proj": 3})}
    assert mixed["down_proj@0-2"] is False and mixed["down_proj@3"] is True
    assert not any(p.output_statistic for p in plan_groups(model, adapter, None, [], 2))
    # k and v alone on the attention input: an output Gram each (2·32² < 64²)
    kv = plan_groups(model, adapter, ["k_proj", "v_proj"], [], 1)
    assert all(p.output_statistic for p in kv) and len({p.statistic for p in kv}) == 2
    assert not any(p.output_statistic for p in plan_groups(model, adapter, None, [], 1, output_grams=False))


@pytest.mark.parametrize("precision", ["float64", "float32-equilibrated"])
def test_calibration_from_output_grams_matches_the_input_route(registry, calib_ids, precision):
    """The walk with down_proj's output Grams (one-layer groups, and a remainder group beside a shared
    basis) gives the input route's spectra and truncations."""
    model = tiny_llama()
    adapter = registry.adapter_for(model)
    runs = {}
    for output_grams in (True, False):
        plans = plan_groups(model, adapter, None, [], {"down_proj": 3}, output_grams=output_grams)
        runs[output_grams] = calibrate(model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken(),
                                       gram_precision=precision, full_factors=True)
    methods = {row["group"]: row["method"] for row in runs[True].whitening}
    assert methods["down_proj@3"] == OUTPUT_METHOD and methods["down_proj@0-2"] == "cholesky"
    scale = 1e-10 if precision == "float64" else 1e-5
    for key, f_in in runs[False].factors.items():
        f_out = runs[True].factors[key]
        s_in, s_out = f_in.singular_values, f_out.singular_values
        assert torch.allclose(s_out ** 2, s_in ** 2, rtol=0, atol=scale * float(s_in[0]) ** 2), key
        if precision == "float64":
            rank = max(1, f_in.u.shape[1] // 2)
            w_in = torch.cat(f_in.factors(rank, torch.float64)[0]) @ f_in.factors(rank, torch.float64)[1]
            w_out = torch.cat(f_out.factors(rank, torch.float64)[0]) @ f_out.factors(rank, torch.float64)[1]
            assert float((w_out - w_in).norm()) <= 1e-6 * float(w_in.norm()), key



def test_nan_in_an_output_gram_names_the_layer_and_the_module_whose_output_it_is(registry, calib_ids):
    """down_proj's input turns NaN in layer 1 (a NaN in its norm's weight upstream); only its output's
    Gram is taken there, and the message says so."""
    from workbench.errors import RunFailed

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, ["down_proj"], [], 1)
    with pytest.raises(RunFailed, match=r"^layer 1, output of mlp\.down_proj: NaN or Inf in the calibration"):
        calibrate(model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken())
