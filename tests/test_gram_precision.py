"""The float32-equilibrated Gram mode against the float64 reference: Grams, whitened loss, spectra, ranks."""

from __future__ import annotations

import copy

import pytest
import torch

from workbench.engine import calibration
from workbench.engine.calibration import (GramAccumulator, add_gram, add_gram_equilibrated, channel_scales,
                                          resolve_gram_precision, symmetrize)
from workbench.engine.factorize import measured_loss, predicted_loss, whitened_svd

CPU = torch.device("cpu")


def massive_activations(tokens: int = 3000, width: int = 96, seed: int = 0) -> torch.Tensor:
    """Correlated float32 activations whose first 3 channels are 1e3–1e4× the rest (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=g, dtype=torch.float64) / width ** 0.5
    x = torch.randn(tokens, width, generator=g, dtype=torch.float64) @ mix
    x[:, :3] *= torch.tensor([1e3, 3e3, 1e4], dtype=torch.float64)
    return x.to(torch.float32)


def gram_of(x: torch.Tensor, precision: str, batch: int = 1000) -> torch.Tensor:
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], batch):
        part = x[start:start + batch]
        add_gram(gram, part.double()) if precision == "float64" else add_gram_equilibrated(gram, part)
    with torch.inference_mode():
        return symmetrize(gram).clone()


@pytest.mark.parametrize("panels", [1, 5])  # the whole product, or the upper part in 5 row panels
def test_the_gram_error_is_bounded_per_channel_pair_despite_massive_channels(monkeypatch, panels):
    x = massive_activations()
    monkeypatch.setattr(calibration, "PANEL", -(-x.shape[1] // panels))
    assert len(calibration.upper_products(x.shape[1])) == panels
    exact = x.double().mT @ x.double()
    gram = gram_of(x, "float32-equilibrated")
    assert (gram == gram.mT).all()
    norms = exact.diagonal().sqrt()
    scaled = (gram - exact).abs() / (norms[:, None] * norms[None, :])
    # The documented bound γ_m (m = CHUNK_ROWS) per entry, relative to the two channels' norms;
    # typical float32 rounding sits far below it (√m·u ≈ 3e-6).
    bound = calibration.CHUNK_ROWS * 2.0 ** -24
    assert scaled.max() < 1e-5 < bound
    # the small channels' block, which whitening needs, is as accurate as the massive ones
    assert scaled[3:, 3:].max() < 1e-5


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_inputs_are_copied_a_chunk_of_rows_and_a_column_piece_at_a_time(monkeypatch, dtype, scaled):
    """Several row chunks (a ragged last one), panels of 4 columns and pieces of at most 5: both
    modes (the equilibrated one with and without scaled copies) give the float64 Gram of the input
    as given, exactly symmetric, and the caller's tensor is left as it was."""
    monkeypatch.setattr(calibration, "CHUNK_ROWS", 7)
    monkeypatch.setattr(calibration, "PANEL", 4)
    monkeypatch.setattr(calibration, "MAX_COLUMNS", 5)
    if scaled:  # no channel counts as in range: every chunk is scaled
        monkeypatch.setattr(calibration, "UNSCALED_RANGE", 1.0)
    x = massive_activations(tokens=40, width=12).to(dtype)
    before = x.clone()
    exact = x.double().mT @ x.double()
    norms = exact.diagonal().sqrt()
    for add, tolerance in ((add_gram, 1e-14), (add_gram_equilibrated, 1e-6)):
        gram = torch.zeros(12, 12, dtype=torch.float64)
        add(gram, x)
        with torch.inference_mode():
            symmetrize(gram)
        assert torch.equal(gram, gram.mT)
        assert ((gram - exact).abs() / (norms[:, None] * norms[None, :])).max() < tolerance, add.__name__
        assert torch.equal(x, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_beyond_the_unscaled_range_are_scaled(dtype):
    """A channel of 1e25 squares past float32's range, one of 1e-25 below it: unscaled products would
    give Inf and 0. The chunk is scaled and both keep the error bound relative to their own norms."""
    x = massive_activations(tokens=500, width=16).double()
    x[:, 4] *= 1e25
    x[:, 7] *= 1e-25
    x = x.to(dtype)
    scales = channel_scales(x)
    assert scales[4] > calibration.UNSCALED_RANGE and scales[7] < 1 / calibration.UNSCALED_RANGE
    exact = x.double().mT @ x.double()
    norms = exact.diagonal().sqrt()
    gram = gram_of(x, "float32-equilibrated", batch=200)
    assert torch.isfinite(gram).all()
    assert ((gram - exact).abs() / (norms[:, None] * norms[None, :])).max() < 1e-6


def test_channel_scales_follow_the_largest_magnitude_of_either_sign():
    x = torch.tensor([[-5.0, 0.3, 0.0], [1.0, -0.2, 0.0]])
    assert channel_scales(x).tolist() == [8.0, 0.5, 1.0]


def test_power_of_two_scales_are_exact_and_keep_overflowing_products_in_range():
    x = massive_activations(tokens=500)
    scale = channel_scales(x)
    assert torch.equal((x / scale) * scale, x)  # no rounding in the equilibration itself
    assert (x / scale).abs().max() <= 1.0
    # Squares of 1e20 overflow float32 (max 3.4e38): the plain float32 product gives inf,
    # the equilibrated one the right Gram.
    big = x.clone()
    big[:, 0] = 1e20 * torch.sign(big[:, 0])
    assert not torch.isfinite(big.mT @ big).all()
    exact = big.double().mT @ big.double()
    gram = gram_of(big, "float32-equilibrated")
    assert torch.isfinite(gram).all()
    assert ((gram - exact).norm() / exact.norm()) < 1e-6


@pytest.mark.parametrize("rank", [4, 16, 32, 48])
def test_the_whitened_loss_of_equilibrated_factors_is_the_float64_optimum(rank):
    x = massive_activations()
    exact, gram = gram_of(x, "float64"), gram_of(x, "float32-equilibrated")
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(3))
    ref = whitened_svd([w], exact, keep=64)
    test = whitened_svd([w], gram, keep=64)
    energy = float((ref.singular_values ** 2).sum())
    # the engine's identity holds on the new mode's own factors, to float64 rounding
    assert abs(measured_loss([w], test, rank) - predicted_loss(test, rank)) / energy < 1e-12
    # and judged by the true (float64) whitened loss, its truncation is the optimum
    optimum = predicted_loss(ref, rank)
    test.whitening = ref.whitening
    assert optimum <= measured_loss([w], test, rank) * (1 + 1e-9)
    assert (measured_loss([w], test, rank) - optimum) / optimum < 1e-6


def test_singular_values_match_float64_in_the_small_directions_too():
    x = massive_activations()
    w = torch.randn(64, 96, generator=torch.Generator().manual_seed(4))
    s_ref = whitened_svd([w], gram_of(x, "float64"), keep=64).singular_values
    s = whitened_svd([w], gram_of(x, "float32-equilibrated"), keep=64).singular_values
    assert s_ref[-1] < 1e-2 * s_ref[0]  # the massive channels do spread the spectrum
    assert ((s - s_ref).abs() / s_ref[0]).max() < 1e-7
    assert ((s - s_ref).abs() / s_ref).max() < 1e-4  # relative to each σ_i, the smallest included


def test_the_accumulator_takes_a_precision_and_keeps_its_interface():
    x = massive_activations(tokens=600, width=32)
    linear = torch.nn.Linear(32, 8)
    grams = {}
    for precision in ("float64", "float32-equilibrated", "auto"):
        acc = GramAccumulator(precision)
        acc.watch("in", linear)
        with torch.inference_mode():
            for part in x.split(200):
                linear(part[None])
        acc.close()
        assert acc.tokens == {"in": 600}
        grams[precision] = acc.grams["in"]
    assert acc.precision == "float32-equilibrated"  # "auto" resolved on the first input (a CPU)
    ref = grams["float64"]
    assert ((grams["float32-equilibrated"] - ref).norm() / ref.norm()) < 1e-6
    assert torch.equal(grams["auto"], grams["float32-equilibrated"])
    with pytest.raises(ValueError, match="float32-equilibrated"):
        GramAccumulator("float16")


def test_auto_keeps_float64_only_on_gpus_with_fast_float64(monkeypatch):
    assert resolve_gram_precision("auto", CPU) == "float32-equilibrated"
    assert resolve_gram_precision("float32-equilibrated", CPU) == "float32-equilibrated"
    assert resolve_gram_precision("float64", CPU) == "float64"
    for capability, expected in [((9, 0), "float64"), ((8, 0), "float64"), ((8, 9), "float32-equilibrated"),
                                 ((8, 6), "float32-equilibrated"), ((12, 0), "float32-equilibrated")]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert resolve_gram_precision("auto", torch.device("cuda:0")) == expected


def test_float32_products_run_at_full_precision_and_restore_the_settings():
    before_tf32, before = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("medium")
        seen = []
        real_mm = torch.Tensor.__matmul__

        def spy(a, b):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()))
            return real_mm(a, b)

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.Tensor, "__matmul__", spy)
            gram = torch.zeros(8, 8, dtype=torch.float64)
            add_gram_equilibrated(gram, torch.randn(16, 8))
        assert seen and all(s == (False, "highest") for s in seen)
        assert torch.backends.cuda.matmul.allow_tf32 is True
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before_tf32
        torch.set_float32_matmul_precision(before)


def _calibrate(model, ids, precision):
    from workbench.engine.compress import calibrate
    from workbench.engine.grouping import plan_groups
    from workbench.engine.walk import GramStatistics, Strategies
    from workbench.events import CancelToken, EventBus
    from workbench.registry import load_registry

    registry = load_registry()
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, None, [], 1)
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken(),
                    strategies=Strategies(accumulator=GramStatistics(precision)))
    return registry, adapter, plans, cal


def test_a_tiny_models_calibration_matches_float64(gqa_model, calib_ids):
    _, _, _, ref = _calibrate(gqa_model, calib_ids, "float64")
    _, _, _, test = _calibrate(gqa_model, calib_ids, "float32-equilibrated")
    assert [s.key for s in ref.spectra] == [s.key for s in test.spectra]
    for a, b in zip(ref.spectra, test.spectra):
        s_ref, s = a.singular_values, b.singular_values
        # ~width·√m·u (64·3e-7) at most, measured ≤ 2e-6
        assert ((s - s_ref).abs() / s_ref[0]).max() < 1e-5, a.key
        # Relative to σ_i itself down to 1% of σ_1 (measured ≤ 1e-5). Below that the error grows
        # as the Gram's conditioning allows (o_proj of a random model reaches 1e-5·σ_1); those
        # components weigh σ_i² ≤ 1e-4·σ_1² in the loss.
        wanted = s_ref >= 1e-2 * s_ref[0]
        assert ((s - s_ref)[wanted].abs() / s_ref[wanted]).max() < 1e-4, a.key


def test_the_profile_key_is_validated():
    from workbench.errors import ProfileError
    from workbench.profile.schema import parse_profile

    assert parse_profile("").compression.gram_precision == "auto"
    assert parse_profile('[compression]\ngram_precision = "float64"\n').compression.gram_precision == "float64"
    with pytest.raises(ProfileError, match="float32-equilibrated"):
        parse_profile('[compression]\ngram_precision = "float32"\n')


@pytest.mark.embedded
def test_embedded_model_ranks_and_perplexity_match_float64():
    """SmolLM2-135M (massive activations in its residual stream), 8 × 256 calibration tokens."""
    from workbench.engine.allocation import budget_for
    from workbench.engine.compress import allocate, assemble
    from workbench.engine.sensitivity import compute_signals, put_signals
    from workbench.events import CancelToken, EventBus
    from workbench.sources.models import load_model
    from workbench.sources.text import calibration_windows, evaluation_tokens
    from workbench_evaluators.perplexity import perplexity

    loaded = load_model("embedded:smollm2-135m", "float32", "cpu")
    windows = calibration_windows(loaded.tokenizer, "embedded:wiki-vital", 8, 256, 0)
    eval_ids = evaluation_tokens(loaded.tokenizer, "embedded:wiki-vital")
    result = {}
    for precision in ("float64", "float32-equilibrated"):
        registry, adapter, plans, cal = _calibrate(loaded.model, windows, precision)
        put_signals(cal.spectra, compute_signals(registry, ("fisher",), loaded.model, adapter, plans, cal.factors,
                                                 windows[:4], CPU, EventBus(), CancelToken()))
        budget = budget_for(cal.spectra, 0.2)
        ranks = allocate(registry.allocators["loss-aware"], "loss-aware", cal.spectra, budget, {})
        model = copy.deepcopy(loaded.model)
        assemble(model, adapter, plans, dict(cal.factors), ranks, cal.spectra)
        with torch.inference_mode():
            ppl = perplexity(model, eval_ids, 256, max_windows=8, device="cpu")["perplexity"]
        result[precision] = ({k: ranks[k] for k in ranks}, ppl)
        del model
    (ranks64, ppl64), (ranks32, ppl32) = result["float64"], result["float32-equilibrated"]
    assert max(abs(ranks64[k] - ranks32[k]) for k in ranks64) <= 1
    assert abs(ppl32 - ppl64) / ppl64 < 0.005


def test_batched_fisher_windows_give_the_one_at_a_time_scores_without_weight_gradients():
    from conftest import tiny_llama
    from workbench.events import CancelToken, EventBus
    from workbench_signals.fisher import fisher_scores

    model = tiny_llama(kv_heads=2, layers=2).double()
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)  # a flag the pass must give back
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(2))
    registry, adapter, plans, cal = _calibrate(model, ids, "float64")
    one = fisher_scores(model, adapter, plans, cal.factors, ids, CPU, EventBus(), CancelToken(), per_pass=1)
    batched = fisher_scores(model, adapter, plans, cal.factors, ids, CPU, EventBus(), CancelToken(), per_pass=3)
    assert set(one) == {p.key for p in plans}
    for key in one:
        assert one[key].abs().max() > 0
        torch.testing.assert_close(batched[key], one[key], rtol=1e-10, atol=0)
    assert all(p.grad is None for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_windows_per_pass_fills_a_quarter_of_free_cuda_memory_and_is_one_on_a_cpu(monkeypatch):
    from types import SimpleNamespace

    from workbench_signals.fisher import windows_per_pass

    model = SimpleNamespace(config=SimpleNamespace(hidden_size=8, vocab_size=100, num_hidden_layers=2,
                                                   intermediate_size=16))
    assert windows_per_pass(model, 32, CPU, 10) == 1
    per_window = 4 * 32 * (3 * 100 + 2 * (20 * 8 + 4 * 16))  # bytes: float32 elements per token × tokens
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * 3 * per_window + 5, 10 ** 12))
    assert windows_per_pass(model, 32, torch.device("cuda:0"), 10) == 3
    assert windows_per_pass(model, 32, torch.device("cuda:0"), 2) == 2  # never more than there are
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10, 10 ** 12))
    assert windows_per_pass(model, 32, torch.device("cuda:0"), 10) == 1  # always at least one


def test_checkpoints_made_under_an_earlier_auto_rule_are_not_resumed():
    """`auto` changed meaning on CPUs (float64 → float32-equilibrated): its rule is part of what a
    checkpoint must match, so Grams are never accumulated partly under each rule."""
    from workbench.engine.calibration import AUTO_RULE
    from workbench.profile.schema import parse_profile
    from workbench.storage.checkpoint import _differences, result_fields

    auto = result_fields(parse_profile(""))
    assert auto["compression.gram_precision auto rule"] == AUTO_RULE
    explicit = result_fields(parse_profile('[compression]\ngram_precision = "float64"\n'))
    assert "compression.gram_precision auto rule" not in explicit
    earlier = {k: v for k, v in auto.items() if k != "compression.gram_precision auto rule"}
    assert any("auto rule" in d for d in _differences(earlier, auto))
