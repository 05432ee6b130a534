"""LoRA recovery ([recovery] method = "lora"): the factor Linears, peft adapters merged back exactly,
training, checkpoint and resume, the training text's split, the profile section and the report."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import tiny_llama, tiny_profile
from workbench.api import uniform_ranks
from workbench.cli import app
from workbench.engine.allocation import budget_for
from workbench.engine.compress import assemble, calibrate
from workbench.engine.grouping import plan_groups
from workbench.engine.lowrank import LowRankLinear
from workbench.engine.recovery import (adapter_parameters, attach_lora, lora_targets, merge_lora, train,
                                       training_windows)
from workbench.errors import Interrupted, ProfileError, UsageError
from workbench.events import CancelToken, EventBus
from workbench.profile.schema import RecoverySection, parse_profile
from workbench.registry import load_registry

CPU = torch.device("cpu")
runner = CliRunner()


def _compressed(group_size: int = 1, ratio: float = 0.5, layers: int = 2, dtype=torch.float32):
    """A tiny model with every targeted group low-rank (uniform ranks), in `dtype`."""
    model = tiny_llama(layers=layers)
    registry = load_registry(strict=True)
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, None, [], lambda t: group_size)
    ids = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(3))
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    ranks = uniform_ranks(cal.spectra, budget_for(cal.spectra, ratio))
    table = assemble(model, adapter, plans, dict(cal.factors), dict(ranks), cal.spectra)
    assert not any(row["dense"] for row in table)
    return model.to(dtype), plans, table


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _low_rank(model):
    return [m for m in model.modules() if isinstance(m, LowRankLinear)]


# --------------------------------------------------------------------------- LowRankLinear's factor Linears


def test_low_rank_linear_runs_through_its_factor_linears_against_a_float64_reference():
    torch.manual_seed(0)
    module = LowRankLinear(12, 7, 3, bias=True, dtype=torch.float64)
    assert type(module.basis) is nn.Linear and type(module.coef) is nn.Linear
    assert (module.basis.in_features, module.basis.out_features) == (12, 3)
    assert (module.coef.in_features, module.coef.out_features) == (3, 7)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    p, q, b = module.basis.weight, module.coef.weight, module.bias
    assert torch.allclose(module(x), x @ p.T @ q.T + b, rtol=1e-12, atol=1e-12)
    assert torch.allclose(module.weight, q @ p, rtol=1e-12, atol=1e-12)
    assert sorted(module.state_dict()) == ["basis.weight", "bias", "coef.weight"]


def test_a_state_dict_of_the_earlier_layout_loads():
    """Before the factors became Linears, P and Q were Parameters named `basis` and `coef`."""
    torch.manual_seed(0)
    source = LowRankLinear(10, 6, 4, bias=True)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    old = {"basis": source.basis.weight.clone(), "coef": source.coef.weight.clone(), "bias": source.bias.clone()}
    target = LowRankLinear(10, 6, 4, bias=True)
    target.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    x = torch.randn(3, 10)
    assert torch.equal(target(x), source(x))
    # inside a model too: the keys carry the module's prefix
    holder = nn.Sequential(LowRankLinear(10, 6, 4, bias=True))
    holder.load_state_dict({f"0.{k}": v for k, v in old.items()})
    assert torch.equal(holder(x), source(x))


def test_a_shared_basis_is_one_module_and_is_stored_once(tmp_path):
    from workbench.storage.saving import load_compressed, save_compressed

    model, plans, table = _compressed(group_size=2)
    layers = model.model.layers
    assert layers[0].self_attn.q_proj.basis is layers[1].self_attn.q_proj.basis
    save_compressed(model, None, tmp_path / "model", table)
    from safetensors.torch import load_file

    keys = set(load_file(str(tmp_path / "model" / "model.safetensors")))
    # the on-disk names of earlier versions (and of exports): `<module>.coef`, one `workbench.basis.<group>`
    assert "model.layers.0.self_attn.q_proj.coef" in keys
    assert not [k for k in keys if k.endswith((".coef.weight", ".basis.weight", ".basis"))]
    assert sum(k.startswith("workbench.basis.") for k in keys) == len(plans)
    again = load_compressed(tmp_path)
    assert again.model.layers[0].self_attn.q_proj.basis is again.model.layers[1].self_attn.q_proj.basis
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


# --------------------------------------------------------------------------- adapters and the exact merge


def _settings(**kw) -> RecoverySection:
    return dataclasses.replace(RecoverySection(method="lora", rank=4, alpha=8.0, steps=6, lr=1e-2, batch_size=2,
                                               seq_len=16, checkpoint_every=2), **kw)


def test_merged_model_gives_the_peft_models_logits_with_the_same_ranks_and_parameter_count():
    model, _, _ = _compressed(dtype=torch.float64)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    count = _count(model)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(input_ids=ids).logits
    names, notes = lora_targets(model, ["coef", "basis"])
    assert len(names) == 2 * len(_low_rank(model)) and notes == []
    tuner = attach_lora(model, names, _settings(), seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # peft starts B at zero; a trained-looking B makes the merge matter
        for name, p in adapter_parameters(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    first = model.model.layers[0].self_attn.q_proj
    a = first.coef.lora_A["recovery"].weight.detach().clone()
    b = first.coef.lora_B["recovery"].weight.detach().clone()
    q_before = first.coef.base_layer.weight.detach().clone()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-3  # the adapters do change the model

    merged = merge_lora(tuner)
    assert merged is model
    assert {name: tuple(p.shape) for name, p in merged.named_parameters()} == shapes
    assert _count(merged) == count
    assert all(type(m.basis) is nn.Linear and type(m.coef) is nn.Linear for m in _low_rank(merged))
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, adapted, rtol=0, atol=1e-10)
    # Q + (alpha / r)·B·A, in float64
    expected = q_before + (8.0 / 4) * (b @ a)
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.coef.weight, expected, rtol=0, atol=1e-12)


def test_a_shared_basis_trains_one_adapter_merged_once_and_stays_shared():
    model, _, _ = _compressed(group_size=2, dtype=torch.float64)
    count = _count(model)
    names, notes = lora_targets(model, ["coef", "basis"])
    modules = _low_rank(model)
    assert len(names) == len(modules) + len(modules) // 2 and "shared" in notes[0]  # one basis per pair
    tuner = attach_lora(model, names, _settings(), seed=0)
    layers = model.model.layers
    wrapper = layers[0].self_attn.q_proj.basis
    assert hasattr(wrapper, "lora_A") and layers[1].self_attn.q_proj.basis is wrapper
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in adapter_parameters(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.1)
    p_before = wrapper.base_layer.weight.detach().clone()
    a, b = wrapper.lora_A["recovery"].weight.detach().clone(), wrapper.lora_B["recovery"].weight.detach().clone()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    merge_lora(tuner)
    basis = layers[0].self_attn.q_proj.basis
    assert type(basis) is nn.Linear and layers[1].self_attn.q_proj.basis is basis
    assert torch.allclose(basis.weight, p_before + 2.0 * (b @ a), rtol=0, atol=1e-12)  # added once
    assert _count(model) == count
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, adapted, rtol=0, atol=1e-10)


def test_only_coef_when_asked():
    model, _, _ = _compressed()
    names, _ = lora_targets(model, ["coef"])
    assert names and all(n.endswith(".coef") for n in names)


# --------------------------------------------------------------------------- training


class _Store:
    """The work directory's save_stage / load_stage, in memory, through safetensors like the real one."""

    def __init__(self):
        self.saved = None

    def save_stage(self, name, meta, tensors, label=None):
        from safetensors.torch import load, save

        self.saved = (json.loads(json.dumps(meta)), load(save({k: v.contiguous() for k, v in tensors.items()})))

    def load_stage(self, name):
        return self.saved


def _trained(windows, settings, store=None, stop_before: int | None = None):
    from workbench.engine.recovery import RecoveryCheckpoint

    model, _, _ = _compressed()
    names, _ = lora_targets(model, settings.targets)
    tuner = attach_lora(model, names, settings, seed=settings.seed)
    calls = []

    def check():
        calls.append(1)
        if stop_before is not None and len(calls) == stop_before:
            raise Interrupted("test")

    checkpoint = RecoveryCheckpoint(store, dataclasses.asdict(settings)) if store is not None else None
    state = train(model, windows, settings, CPU, check, checkpoint=checkpoint)
    return merge_lora(tuner), state


@pytest.fixture(scope="module")
def windows(tiny_workspace):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_workspace / "tiny-llama"))
    return training_windows(tokenizer, str(tiny_workspace / "corpus.txt"), 12 * 4, 16, seed=0)


def test_training_lowers_the_loss(windows):
    # Embeddings and head stay random and frozen, so a tiny model gains little: ~4.85 → ~4.7 nats.
    settings = _settings(steps=12, batch_size=4, lr=2e-2)
    _, state = _trained(windows, settings)
    assert len(state.losses) == 12
    assert sum(state.losses[-4:]) / 4 < sum(state.losses[:2]) / 2 - 0.08


def test_resumed_training_ends_where_the_uninterrupted_one_does(windows):
    settings = _settings(steps=6, checkpoint_every=2, dropout=0.1)  # dropout: the RNG state must resume too
    reference, whole = _trained(windows, settings)
    store = _Store()
    with pytest.raises(Interrupted):
        _trained(windows, settings, store, stop_before=4)  # steps 1-3 done; the checkpoint holds step 2
    assert int(store.saved[1]["step"]) == 2
    resumed, state = _trained(windows, settings, store)
    assert state.resumed_at == 2 and state.losses == whole.losses
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_a_checkpoint_of_other_settings_is_not_used(windows):
    store = _Store()
    _trained(windows, _settings(steps=2, checkpoint_every=1), store)
    _, state = _trained(windows, _settings(steps=2, checkpoint_every=1, lr=5e-3), store)
    assert state.resumed_at is None


def test_training_windows_come_from_the_calibration_split_only(tiny_workspace):
    from transformers import AutoTokenizer

    from workbench.sources.text import load_documents, split_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_workspace / "tiny-llama"))
    dataset = str(tiny_workspace / "corpus.txt")
    assert not set(load_documents(dataset, "calibration")) & set(load_documents(dataset, "evaluation"))
    got = training_windows(tokenizer, dataset, 64, 24, seed=7)
    train_stream = split_tokens(tokenizer, dataset, "calibration").unfold(0, 24, 1)
    eval_stream = split_tokens(tokenizer, dataset, "evaluation").unfold(0, 24, 1)
    for window in got:
        assert (train_stream == window).all(1).any()
        assert not (eval_stream == window).all(1).any()
    with pytest.raises(UsageError, match="recovery.seq_len"):
        training_windows(tokenizer, dataset, 1, 10**7, seed=0)


# --------------------------------------------------------------------------- the profile section


def test_recovery_section_defaults_and_round_trip(tiny_workspace, tmp_path):
    base = tiny_profile(tiny_workspace, tmp_path / "out")
    assert parse_profile(base).recovery == RecoverySection()
    assert "recovery" not in parse_profile(base).to_dict()  # off: old profiles and reports read as before
    profile = parse_profile(base + '[recovery]\nmethod = "lora"\nsteps = 7\ntargets = ["coef"]\n')
    assert profile.recovery.method == "lora" and profile.recovery.steps == 7 and profile.recovery.targets == ["coef"]
    assert parse_profile(profile.to_toml()) == profile


@pytest.mark.parametrize("lines,key,words", [
    ('method = "lorra"', "recovery.method", "lora"),
    ('targets = ["coeff"]', "recovery.targets", "coef"),
    ("targets = []", "recovery.targets", "non-empty"),
    ("lr = 0", "recovery.lr", "trains nothing"),
    ("steps = 0", "recovery.steps", "minimum"),
    ('dataset = "missing.txt"', "recovery.dataset", "does not exist"),
    ("rnak = 4", "recovery.rnak", "rank"),
])
def test_bad_recovery_settings_are_named(tiny_workspace, tmp_path, lines, key, words):
    with pytest.raises(ProfileError) as caught:
        parse_profile(tiny_profile(tiny_workspace, tmp_path / "out") + f"[recovery]\n{lines}\n")
    text = "\n".join(str(p) for p in caught.value.problems)
    assert key in text and words in text


# --------------------------------------------------------------------------- the run, the report, preflight


def _recovery_run(tiny_workspace, out, steps=4, extra="", group_size=1):
    return tiny_profile(tiny_workspace, out, ratio=0.4, group_size=group_size, extra=(
        f'[recovery]\nmethod = "lora"\nrank = 2\nsteps = {steps}\nbatch_size = 2\nseq_len = 16\nlr = 0.01\n'
        f'checkpoint_every = 2\ndataset = "{tiny_workspace / "corpus.txt"}"\n{extra}'))


def test_a_run_with_recovery_reports_it_and_saves_a_model_of_the_same_size(tiny_workspace, tmp_path):
    from workbench.render.report_md import render_report_md
    from workbench.storage.saving import load_compressed

    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_recovery_run(tiny_workspace, out, group_size=2))  # shared bases train too
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    section = report["recovery"]
    assert section["method"] == "lora" and section["steps"] == 4 and len(section["losses"]) == 4
    assert section["loss_first"] == pytest.approx(section["losses"][0], abs=1e-5) and section["trained_parameters"] > 0
    assert report["timings"]["recover"] == section["time_s"] > 0
    assert report["profile"]["recovery"]["steps"] == 4
    assert "recovery: lora rank 2" in result.output  # the summary
    assert "- recovery: lora rank 2" in render_report_md(report)
    assert "shared" in section["notes"][0]
    model = load_compressed(out)
    assert _count(model) == report["params"]["model_compressed"]


def test_an_interrupted_recovery_resumes_to_the_same_model(tiny_workspace, tmp_path):
    from workbench.run.pipeline import run

    profile = parse_profile(_recovery_run(tiny_workspace, tmp_path / "ref", steps=6))
    run(profile)
    reference = (tmp_path / "ref" / "model" / "model.safetensors").read_bytes()

    out = tmp_path / "out"
    profile = parse_profile(_recovery_run(tiny_workspace, out, steps=6))
    cancel = CancelToken()

    def listener(event):
        if event.stage == "recover" and event.current == 3:
            cancel.cancel("test interrupt")

    with pytest.raises(Interrupted):
        run(profile, events=EventBus([listener]), cancel=cancel)
    report = run(profile, resume=True)
    assert "recovery training (step 2)" in report["resumed_from_checkpoint"]
    assert report["recovery"]["resumed_at_step"] == 2
    assert (out / "model" / "model.safetensors").read_bytes() == reference


def test_preflight_refuses_training_that_does_not_fit():
    from workbench.run.preflight import check_training

    model, plans, table = _compressed()
    settings = _settings(batch_size=8, seq_len=64)
    with pytest.raises(UsageError, match="recovery.batch_size"):
        check_training(model, plans, settings, CPU, memory=lambda device: 1 << 20)
    assert "LoRA recovery needs about" in check_training(model, plans, settings, CPU, memory=lambda device: 1 << 40)


def test_the_recovery_section_round_trips_through_the_report_schema():
    from workbench.report import build_report, load_report

    section = {"method": "lora", "rank": 8, "steps": 2, "losses": [3.0, 2.5], "loss_first": 3.0, "loss_last": 2.5,
               "notes": [], "time_s": 1.5}
    written = build_report(recovery=section).to_dict()
    assert written["recovery"] == section and load_report(written).recovery == section
    assert "recovery" not in build_report().to_dict()


def test_the_app_folds_the_training_loss_and_offers_the_recovery_settings():
    from pathlib import Path

    from workbench.events import PROGRESS, Event
    from workbench.tui.form_model import build_sections
    from workbench.tui.run_state import RunJob, RunProgress

    progress = RunProgress(RunJob(Path("p.toml"), "p", Path("runs/p")))
    assert progress.loss_text() == ""
    for step, loss in enumerate((3.5, 3.25, 3.0), start=1):
        progress.apply(Event(PROGRESS, "recover", current=step, total=3, data={"unit": "step", "loss": loss}))
    progress.apply(Event(PROGRESS, "calibrate", current=1, total=4, data={"unit": "layer"}))  # no loss: not drawn
    assert progress.losses == [3.5, 3.25, 3.0]
    assert progress.loss_text() == "loss 3.5 → 3 (step 3)"

    sections = {s.title: s for s in build_sections({}, load_registry(strict=True))}
    fields = {f.key: f for f in sections["[recovery]"].fields}
    assert fields[("recovery", "method")].choices == ("none", "lora")
    assert {("recovery", k) for k in ("rank", "steps", "lr", "targets", "checkpoint_every")} <= set(fields)
    compression = {f.key for f in sections["[compression]"].fields}
    assert {("compression", "sequential"), ("compression", "update"), ("compression", "ridge")} <= compression
