"""The Fisher pass's precision: the `auto` rule, the option reaching the pass, bf16 against float64."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_llama, tiny_profile
from workbench.api import SignalContext
from workbench.engine.compress import calibrate
from workbench.engine.grouping import plan_groups
from workbench.engine.sensitivity import signal_options
from workbench.errors import UsageError
from workbench.events import CancelToken, EventBus
from workbench.profile.schema import parse_profile
from workbench.registry import load_registry
from workbench_signals.fisher import FisherSignal, fisher_scores, resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("capabilities,expected", [
    ({"architecture": "x86_64", "avx512_bf16": True, "amx_bf16": False}, "bfloat16"),
    ({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": True}, "bfloat16"),
    ({"architecture": "x86_64", "avx512_bf16": False, "amx_bf16": False, "avx2": True}, "float32"),
    ({"architecture": "arm64", "bf16": True}, "float32"),  # not measured there: float32 until it is
])
def test_auto_on_a_cpu_takes_bf16_only_with_native_bf16_products(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    assert resolve_precision("auto", CPU) == expected
    assert resolve_precision("float32", CPU) == "float32"
    assert resolve_precision("bfloat16", CPU) == "bfloat16"


@pytest.mark.parametrize("avx512_bf16,amx,expected", [(True, False, "bfloat16"), (False, True, "bfloat16"),
                                                      (False, False, "float32")])
def test_auto_on_a_cpu_with_an_older_torch_asks_its_feature_probes(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.delattr(torch.cpu, "get_capabilities", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_precision("auto", CPU) == expected


@pytest.mark.parametrize("capability,expected", [((9, 0), "bfloat16"), ((8, 6), "bfloat16"), ((8, 0), "bfloat16"),
                                                 ((7, 5), "float32"), ((7, 0), "float32"), ((6, 0), "float32")])
def test_auto_on_a_gpu_takes_bf16_from_ampere_on(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected


def test_an_unknown_precision_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="bfloat16, float32"):
        resolve_precision("fp8", CPU)
    with pytest.raises(UsageError, match=r"signals\.fisher\.precision: 'fp8' is not one of the choices"):
        signal_options(FisherSignal(), {"precision": "fp8"})
    assert signal_options(FisherSignal(), {})["precision"] == "auto"


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_llama(kv_heads=2, layers=2)
    adapter = load_registry().adapter_for(model)
    plans = plan_groups(model, adapter, None, [], 1)
    ids = torch.randint(0, 128, (6, 24), generator=torch.Generator().manual_seed(5))
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken(), gram_precision="float64")
    return model, adapter, plans, cal, ids


@pytest.fixture(scope="module")
def model64(calibrated):
    """The calibrated model's weights in float64."""
    model = tiny_llama(kv_heads=2, layers=2).double()
    model.load_state_dict(calibrated[0].state_dict())
    return model


def _relative_errors(scores, reference):
    return [float((scores[k].double() - reference[k]).norm() / reference[k].norm()) for k in reference]


def test_each_precision_reaches_the_pass_and_bf16_stays_within_a_few_per_cent_of_float64(calibrated, model64):
    """The signal's option decides the arithmetic: float32 to float64's rounding, bf16 a few per cent
    off (and so visibly not float32), and the choice is in the run's log."""
    model, adapter, plans, cal, ids = calibrated
    reference = fisher_scores(model64, adapter, plans, cal.factors, ids[:3], CPU, EventBus(), CancelToken(),
                              precision="float32")  # a float64 model: autocast would leave it alone anyway
    errors = {}
    for precision in ("float32", "bfloat16"):
        events = EventBus()
        ctx = SignalContext(model=model, adapter=adapter, plans=plans, factors=cal.factors, windows=ids, device=CPU,
                            events=events, cancel=CancelToken(),
                            options=signal_options(FisherSignal(), {"windows": 3, "precision": precision}))
        logged = []
        events.subscribe(lambda event: logged.append(event.message))
        errors[precision] = _relative_errors(FisherSignal().compute(ctx), reference)
        assert any(f"fisher: 3 windows, {precision}" in line for line in logged), logged
    assert max(errors["float32"]) < 1e-4, errors
    assert 1e-4 < max(errors["bfloat16"]) < 0.05, errors


def test_a_float64_model_is_not_cast_down_by_the_bf16_option(calibrated, model64):
    """Autocast leaves float64 alone: a float64 model's pass is the same in both precisions, to the bit."""
    _, adapter, plans, cal, ids = calibrated
    run = {p: fisher_scores(model64, adapter, plans, cal.factors, ids[:2], CPU, EventBus(), CancelToken(), precision=p)
           for p in ("float32", "bfloat16")}
    for key in run["float32"]:
        assert torch.equal(run["float32"][key], run["bfloat16"][key]), key


def test_the_report_says_which_precision_the_pass_took(tiny_workspace, tmp_path):
    """report.json keeps each signal's options and notes (the resolved precision), report.md shows them;
    a run whose allocator needs no signal has no signals section."""
    from workbench.run.pipeline import run

    out = tmp_path / "out"
    run(parse_profile(tiny_profile(tiny_workspace, out, allocator="loss-aware",
                                   extra="[signals.fisher]\nwindows = 3\n")))
    report = json.loads((out / "report.json").read_text())
    taken = resolve_precision("auto", CPU)
    assert report["signals"] == {"fisher": {"options": {"windows": 3, "precision": "auto"},
                                            "notes": {"windows": 3, "precision": taken}}}
    assert f"- signal fisher: precision {taken}, windows 3" in (out / "report.md").read_text()
    plain = tmp_path / "plain"
    run(parse_profile(tiny_profile(tiny_workspace, plain, allocator="uniform")))
    assert "signals" not in json.loads((plain / "report.json").read_text())


def test_a_signal_built_on_another_keeps_that_ones_notes_under_its_name(calibrated):
    """`SignalContext.signal` gives the inner signal its own notes, joined to the caller's under its name."""
    model, adapter, plans, cal, ids = calibrated
    ctx = SignalContext(model=model, adapter=adapter, plans=plans, factors=cal.factors, windows=ids, device=CPU,
                        events=EventBus(), cancel=CancelToken(), lookup=load_registry().get)
    ctx.notes["own"] = 1
    values = ctx.signal("fisher", {"windows": 2, "precision": "float32"})
    assert set(values) == {p.key for p in plans}
    assert ctx.notes == {"own": 1, "fisher": {"windows": 2, "precision": "float32"}}
