"""The routes a GPU takes, checked against float64 references computed on the CPU.

On a machine with CUDA (or with WORKBENCH_TEST_ACCELERATOR naming a device, e.g. "cuda:1") these
run what only a GPU runs: the whitened SVD by LAPACK on the device, Gram products with TF32
switched on for the rest of the process, the Fisher pass under bf16 autocast with its windows
batched, LoRA recovery under autocast, layers offloaded to the host, and whole runs with their GPU
memory figures. Without one the same checks run on the CPU's routes (the LAPACK route called
directly), so the file keeps working where CI runs it. On a GPU box: `bash bench/device_check.sh`.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import tiny_llama, tiny_profile
from test_gram_precision import massive_activations
from workbench.engine.calibration import GramAccumulator, resolve_gram_precision
from workbench.engine.compress import calibrate
from workbench.engine.factorize import _svd_by_eigh, _svd_by_lapack, whitened_svd
from workbench.engine.grouping import plan_groups
from workbench.engine.whitening import whitening_factor
from workbench.events import CancelToken, EventBus
from workbench.profile.schema import parse_profile
from workbench.registry import load_registry
from workbench.run.pipeline import run

CPU = torch.device("cpu")


def _accelerator() -> torch.device:
    chosen = os.environ.get("WORKBENCH_TEST_ACCELERATOR", "").strip()
    if chosen:
        return torch.device(chosen)
    return torch.device("cuda") if torch.cuda.is_available() else CPU


ACCEL = _accelerator()
ON_CUDA = ACCEL.type == "cuda"


@pytest.fixture(scope="module")
def registry():
    return load_registry(strict=True)


@pytest.fixture
def tf32_switched_on():
    """What a user's script may have set for its own training: the engine must not inherit it."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    yield
    torch.backends.cuda.matmul.allow_tf32 = before[0]
    torch.set_float32_matmul_precision(before[1])


# ------------------------------------------------------------------------------ the whitened SVD


def _chosen(weights, white, keep):
    """The route `whitened_svd` picks for the device: LAPACK's SVD on a GPU, eigh of the smaller Gram on a CPU."""
    f = whitened_svd(weights, None, keep, white=white)
    return f.singular_values, f.u, f.vt_linv


@pytest.mark.parametrize("route", [_chosen, _svd_by_eigh, _svd_by_lapack], ids=["chosen", "eigh", "lapack"])
@pytest.mark.parametrize("shapes", [[(40, 96)], [(200, 96)], [(40, 96), (40, 96)]], ids=["wide", "tall", "shared"])
def test_the_whitened_svd_on_the_accelerator_matches_float64(route, shapes):
    """σ against the float64 SVD of W·Xᵀ on the CPU, and the rank-k reconstruction's loss on the data
    equal to Σ_{i>k} σ_i², with massive-activation channels in X."""
    g = torch.Generator().manual_seed(7)
    x = massive_activations(tokens=2000, width=96).double()
    weights = [torch.randn(out, width, generator=g) for out, width in shapes]
    gram = (x.T @ x).to(ACCEL)
    keep = 30
    s, u, vt_linv = route([w.to(ACCEL) for w in weights], whitening_factor(gram), keep)
    assert s.device.type == ACCEL.type and u.device.type == ACCEL.type
    w64 = torch.cat([w.double() for w in weights])
    wx = w64 @ x.T
    reference = torch.linalg.svdvals(wx)[:min(wx.shape[0], 96)]  # rank ≤ in: the rest is rounding
    s = s.cpu()
    assert s.shape == reference.shape
    assert ((s - reference).abs() / reference[0]).max() < 1e-9
    energy = float((reference ** 2).sum())
    for k in (5, 15, 30):
        w_hat = (u[:, :k].cpu().double() * s[:k]) @ vt_linv[:k].cpu().double()
        loss = float((wx - w_hat @ x.T).pow(2).sum())
        assert loss == pytest.approx(float((reference[k:] ** 2).sum()), abs=1e-9 * energy), k


# ------------------------------------------------------------------------------ the Gram products


@pytest.mark.parametrize("precision,tolerance", [("float64", 1e-12), ("float32-equilibrated", 1e-5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grams_on_the_accelerator_stay_exact_with_tf32_switched_on(tf32_switched_on, precision, tolerance, dtype):
    """Input and output Grams per entry, relative to the two channels' norms. A TF32 product (10-bit
    mantissa) would miss the equilibrated tolerance by two orders of magnitude."""
    g = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(96, 24)
    with torch.no_grad():
        linear.bias.normal_(0.0, 3.0, generator=g)
    linear = linear.to(device=ACCEL, dtype=dtype)
    chunks = [(massive_activations(tokens=300, width=96, seed=seed) / 100).to(dtype) for seed in range(3)]
    acc = GramAccumulator(precision)
    acc.watch("x", linear)
    acc.watch_output("y", linear)
    with torch.inference_mode():
        for chunk in chunks:
            linear(chunk.to(ACCEL))
    acc.close()
    x64, w64 = torch.cat(chunks).double(), linear.weight.detach().cpu().double()
    for name, reference in (("x", x64.T @ x64), ("y", w64 @ (x64.T @ x64) @ w64.T)):
        gram = acc.grams[name]
        assert gram.device.type == ACCEL.type and gram.dtype == torch.float64 and torch.equal(gram, gram.mT)
        norms = reference.diagonal().sqrt()
        error = ((gram.cpu() - reference).abs() / (norms[:, None] * norms[None, :])).max()
        assert float(error) < tolerance, name


# ------------------------------------------------------------------------------ a calibration


def test_a_calibration_on_the_accelerator_matches_a_float64_one_on_the_cpu(registry, calib_ids):
    """The accelerator in the Gram mode `auto` picks for it (the run's default) against float64
    Grams on the CPU: the same groups, the same spectra to float32 rounding, factors on the device."""
    reference_model = tiny_llama(kv_heads=2)
    adapter = registry.adapter_for(reference_model)
    plans = plan_groups(reference_model, adapter, None, [], 1)
    reference = calibrate(reference_model, adapter, plans, calib_ids, CPU, EventBus(), CancelToken(),
                          gram_precision="float64")
    model = tiny_llama(kv_heads=2).to(ACCEL)
    mode = resolve_gram_precision("auto", ACCEL)
    test = calibrate(model, adapter, plans, calib_ids, ACCEL, EventBus(), CancelToken(), gram_precision=mode)
    assert [s.key for s in test.spectra] == [s.key for s in reference.spectra]
    for a, b in zip(reference.spectra, test.spectra):
        s_ref, s = a.singular_values, b.singular_values.cpu()
        assert ((s - s_ref).abs() / s_ref[0]).max() < 1e-5, a.key
    assert all(f.u.device.type == ACCEL.type for f in test.factors.values())


# ------------------------------------------------------------------------------ the Fisher pass


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_the_fisher_pass_on_the_accelerator_matches_float64(registry, precision):
    """Scores on the accelerator (batched windows under CUDA) in each precision against the float64
    pass on the CPU with the same factors, one window at a time (that pass is checked against
    autograd slopes in test_allocators.py)."""
    from workbench_signals.fisher import fisher_scores, windows_per_pass

    model64 = tiny_llama(kv_heads=2, layers=2).double()
    adapter = registry.adapter_for(model64)
    plans = plan_groups(model64, adapter, None, [], 1)
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(3))
    cal = calibrate(model64, adapter, plans, ids, CPU, EventBus(), CancelToken(), full_factors=True)
    windows = ids[:4]
    reference = fisher_scores(model64, adapter, plans, cal.factors, windows, CPU, EventBus(), CancelToken(), per_pass=1)
    model = tiny_llama(kv_heads=2, layers=2).to(ACCEL)
    per_pass = windows_per_pass(model, windows.shape[1], ACCEL, windows.shape[0])
    assert per_pass == (windows.shape[0] if ON_CUDA else 1)  # a tiny model's windows all fit at once on a GPU
    scores = fisher_scores(model, adapter, plans, cal.factors, windows, ACCEL, EventBus(), CancelToken(),
                           precision=precision)
    # bf16 keeps 8 bits of each product: a few per cent of each score (and visibly more than float32's)
    errors = []
    for plan in plans:
        got, want = scores[plan.key].double(), reference[plan.key]
        assert want.abs().max() > 0
        errors.append(float((got - want).norm() / want.norm()))
    assert max(errors) < (0.05 if precision == "bfloat16" else 1e-4), errors
    if precision == "bfloat16":
        assert max(errors) > 1e-4  # the autocast took effect


# ------------------------------------------------------------------------------ whole runs


def _profile(root, out, device, allocator: str = "loss-aware", offload: str = "none", extra: str = ""):
    return parse_profile(tiny_profile(root, out, ratio=0.3, allocator=allocator, extra=extra, device=device,
                                      offload=offload))


def _perplexity(report, model: str) -> float:
    return next(m[model] for m in report["metrics"] if m["metric"] == "perplexity")


@pytest.fixture(scope="module")
def cpu_runs(tiny_workspace, tmp_path_factory):
    """The CPU's run per allocator, made when a test first asks for it."""
    done = {}

    def of(allocator):
        if allocator not in done:
            with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse cache isolation is not active
                mp.setenv("WORKBENCH_DENSE_CACHE", str(tmp_path_factory.mktemp("dense")))
                out = tmp_path_factory.mktemp(f"cpu-{allocator}") / "out"
                done[allocator] = run(_profile(tiny_workspace, out, "cpu", allocator))
        return done[allocator]

    return of


# loss-aware runs the Fisher pass (bf16 autocast under CUDA: its ranks may move, so only the
# perplexity is compared); offload = "cpu" on a GPU cannot hold that pass's backward, so it is
# checked with drank, whose ranks follow from the spectra alone.
@pytest.mark.parametrize("allocator,offload", [("loss-aware", "none"), ("drank", "none"), ("drank", "cpu")])
def test_a_run_on_the_accelerator_agrees_with_the_cpus(tiny_workspace, tmp_path, cpu_runs, allocator, offload):
    """Calibration in the default Gram mode, allocation, evaluation and saving on the accelerator,
    its layers kept there or waiting on the host; the GPU's peak memory reported where there is one."""
    reference = cpu_runs(allocator)
    report = run(_profile(tiny_workspace, tmp_path / "out", str(ACCEL), allocator, offload))
    ranks = {r["group"]: r["rank"] for r in report["ranks"]}
    expected = {r["group"]: r["rank"] for r in reference["ranks"]}
    assert ranks.keys() == expected.keys()
    if allocator == "drank":
        assert max(abs(ranks[k] - expected[k]) for k in ranks) <= 1
    assert report["params"]["targeted_compressed"] <= report["params"]["budget"] == reference["params"]["budget"]
    assert _perplexity(report, "dense") == pytest.approx(_perplexity(reference, "dense"), rel=1e-3)
    tolerance = 0.01 if allocator == "drank" else 0.02
    assert _perplexity(report, "compressed") == pytest.approx(_perplexity(reference, "compressed"), rel=tolerance)
    cuda_bytes = report["peak_memory"]["cuda_bytes"]
    assert (cuda_bytes > 0) if ON_CUDA else cuda_bytes is None
    assert (tmp_path / "out" / "model").is_dir()


def test_lora_recovery_on_the_accelerator_trains_and_merges(tiny_workspace, tmp_path):
    extra = f"""[recovery]
method = "lora"
rank = 4
steps = 3
batch_size = 2
seq_len = 32
lr = 1e-3
dataset = "{tiny_workspace / 'corpus.txt'}"
"""
    report = run(_profile(tiny_workspace, tmp_path / "out", str(ACCEL), extra=extra))
    recovery = report["recovery"]
    assert recovery["autocast"] == ("bfloat16" if ON_CUDA else None)
    assert len(recovery["losses"]) == 3 and all(math.isfinite(x) for x in recovery["losses"])
    assert math.isfinite(_perplexity(report, "compressed"))
