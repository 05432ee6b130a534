"""Interrupt and resume: checkpoints in `<output>.work/`, resumed bit for bit, refused when they do not fit."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
from typer.testing import CliRunner

from conftest import tiny_profile, write_text_corpus
from workbench.storage import checkpoint
from workbench.storage import durable_files
from workbench.storage.checkpoint import WorkDir, work_dir_for
from workbench.cli import app
from workbench.errors import Interrupted, UsageError
from workbench.events import CancelToken, EventBus
from workbench.run.pipeline import run
from workbench.profile.schema import parse_profile

runner = CliRunner()


@pytest.fixture(autouse=True)
def _checkpoint_every_layer(monkeypatch):
    monkeypatch.setattr(checkpoint, "COMMIT_SPACING", 0.0)


def _text(root, out, ratio=0.3, dataset=None):
    """4 layers in groups of 2 (so a checkpoint holds Grams of a pending group), Fisher-based allocator."""
    text = tiny_profile(root, out, ratio=ratio, group_size=2, allocator="loss-aware",
                        extra="[signals.fisher]\nwindows = 4\n")
    if dataset is not None:
        text = text.replace(f'dataset = "{root / "corpus.txt"}"\nsamples', f'dataset = "{dataset}"\nsamples')
    return text


def _interrupt(profile, stage, current=None, **kw):
    """Run until the first event of `stage` (with progress `current`), cancel there, return the Interrupted."""
    cancel = CancelToken()

    def listener(event):
        if event.stage == stage and (current is None or event.current == current):
            cancel.cancel("test interrupt")

    with pytest.raises(Interrupted) as caught:
        run(profile, events=EventBus([listener]), cancel=cancel, **kw)
    return caught.value


def _result(out):
    report = json.loads((out / "report.json").read_text())
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "model").rglob("*")) if p.is_file()}
    return report["ranks"], [(m["dense"], m["compressed"]) for m in report["metrics"]], files, report["signals"]


@pytest.fixture(scope="module")
def reference(tiny_workspace, tmp_path_factory):
    """The uninterrupted run. Module-scoped fixtures run before the autouse cache isolation: isolate here."""
    out = tmp_path_factory.mktemp("reference") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WORKBENCH_DENSE_CACHE", str(tmp_path_factory.mktemp("dense")))
        run(parse_profile(_text(tiny_workspace, out)))
    return _result(out)


@pytest.mark.parametrize("stage,current,reused", [
    ("calibrate", 1, ["dense metrics", "calibration (1 of 4 layers)"]),
    ("calibrate", 3, ["dense metrics", "calibration (3 of 4 layers)"]),
    ("sensitivity", 2, ["dense metrics", "calibration (4 of 4 layers)"]),
    ("evaluate compressed", None, ["dense metrics", "calibration (4 of 4 layers)", "sensitivity"]),
])
def test_interrupted_run_resumes_to_the_same_ranks_and_weights(tiny_workspace, tmp_path, reference, stage, current,
                                                                reused):
    out = tmp_path / "out"
    profile = parse_profile(_text(tiny_workspace, out))
    stopped = _interrupt(profile, stage, current)
    work = work_dir_for(out)
    assert not out.exists()  # nothing published
    assert stopped.checkpoint == work and (work / "state.json").exists()
    assert not [p for p in work.iterdir() if ".partial-" in p.name or p.name.endswith(".tmp")]

    report = run(profile, resume=True)
    assert report["resumed_from_checkpoint"] == reused
    assert _result(out) == reference  # ranks, metrics and every model file, byte for byte
    assert not work.exists()  # a finished run leaves no checkpoint behind


def test_interrupt_before_anything_is_done_leaves_no_work_dir(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    stopped = _interrupt(parse_profile(_text(tiny_workspace, out)), "evaluate dense")
    assert stopped.checkpoint is None
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_checkpoint_of_a_different_profile_is_refused_naming_the_field(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    _interrupt(parse_profile(_text(tiny_workspace, out)), "calibrate", 2)
    state = (work_dir_for(out) / "state.json").read_text()
    path = tmp_path / "p.toml"
    path.write_text(_text(tiny_workspace, out, ratio=0.4))
    result = runner.invoke(app, ["run", str(path), "--resume", "--log-format", "plain"])
    assert result.exit_code == 2, result.output
    assert "compression.ratio: 0.3 in the checkpoint, 0.4 now" in result.output
    assert "--force" in result.output and str(work_dir_for(out)) in result.output
    assert (work_dir_for(out) / "state.json").read_text() == state  # refused, not touched
    assert not out.exists()


def test_existing_checkpoint_needs_resume_or_force(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_text(tiny_workspace, out))
    _interrupt(parse_profile(path.read_text()), "calibrate", 2)
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 2, result.output
    assert "--resume" in result.output and "--force" in result.output and "2 of 4 layers" in result.output
    result = runner.invoke(app, ["run", str(path), "--force", "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    assert "resumed_from_checkpoint" not in json.loads((out / "report.json").read_text())  # started over
    assert not work_dir_for(out).exists()


def test_checkpoint_of_an_older_format_is_refused_then_replaced_with_force(tiny_workspace, tmp_path):
    """Format 1 named classes by their old flat module paths: refused with what to do, never imported."""
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_text(tiny_workspace, out))
    _interrupt(parse_profile(path.read_text()), "calibrate", 2)
    state_path = work_dir_for(out) / "state.json"
    state = json.loads(state_path.read_text())
    state["format"] = 1
    state_path.write_text(json.dumps(state))
    for extra in (["--resume"], []):
        result = runner.invoke(app, ["run", str(path), *extra, "--log-format", "plain"])
        assert result.exit_code == 2, result.output
        assert "another workbench version" in result.output and "--force" in result.output
        assert json.loads(state_path.read_text())["format"] == 1  # refused, not touched
    result = runner.invoke(app, ["run", str(path), "--force", "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    assert "resumed_from_checkpoint" not in json.loads((out / "report.json").read_text())


def test_resumed_run_says_so_in_its_summary(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_text(tiny_workspace, out))
    _interrupt(parse_profile(path.read_text()), "calibrate", 2)
    result = runner.invoke(app, ["run", str(path), "--resume", "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    assert "resumed from a checkpoint: dense metrics, calibration (2 of 4 layers)" in result.output


def test_resume_without_a_checkpoint_starts_from_the_beginning(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    events = []
    report = run(parse_profile(_text(tiny_workspace, out)), resume=True, events=EventBus([events.append]))
    assert "resumed_from_checkpoint" not in report
    assert any("no checkpoint" in e.message for e in events)


def test_changed_model_weights_are_refused(tiny_workspace, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_workspace / "tiny-llama", model)
    out = tmp_path / "out"
    profile = parse_profile(_text(tiny_workspace, out).replace(str(tiny_workspace / "tiny-llama"), str(model)))
    _interrupt(profile, "calibrate", 2)
    weights = model / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced since
    with pytest.raises(UsageError, match="model fingerprint"):
        run(profile, resume=True)
    report = run(profile, resume="auto")  # the app's mode starts over instead
    assert "resumed_from_checkpoint" not in report


def test_changed_calibration_text_is_refused(tiny_workspace, tmp_path):
    corpus = tmp_path / "corpus.txt"
    write_text_corpus(corpus)
    out = tmp_path / "out"
    profile = parse_profile(_text(tiny_workspace, out, dataset=corpus))
    _interrupt(profile, "calibrate", 2)
    write_text_corpus(corpus, seed=1)
    with pytest.raises(UsageError, match="calibration.dataset"):
        run(profile, resume=True)


def test_a_second_run_on_the_same_output_is_refused_while_one_runs(tiny_workspace, tmp_path):
    out = tmp_path / "out"
    holder = WorkDir.acquire(out)
    try:
        with pytest.raises(UsageError, match="another run"):
            run(parse_profile(_text(tiny_workspace, out)))
        assert holder.path.exists()
    finally:
        holder.close()


def test_leftovers_of_a_killed_write_are_ignored_and_removed(tiny_workspace, tmp_path, reference):
    """What SIGKILL during a commit leaves: a temp file and a data file no state.json names yet."""
    out = tmp_path / "out"
    profile = parse_profile(_text(tiny_workspace, out))
    _interrupt(profile, "calibrate", 2)
    work = work_dir_for(out)
    leftovers = [work / ".hidden-3.safetensors.x1y2.tmp", work / "hidden-7.safetensors"]
    for path in leftovers:
        path.write_bytes(b"truncated")
    _interrupt(profile, "calibrate", 3, resume=True)
    assert not any(p.exists() for p in leftovers)
    run(profile, resume=True)
    assert _result(out) == reference


def test_atomic_write_keeps_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")

    def half_then_interrupt(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        durable_files.write_atomically(target, half_then_interrupt)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_group_factors_round_trip_exactly(tmp_path):
    import torch

    from workbench.engine.factorize import whitened_svd

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 16, dtype=torch.float64, generator=g)
    weights = [torch.randn(8, 16, generator=g) for _ in range(2)]
    factors = whitened_svd(weights, x.T @ x, keep=6).compact(torch.float32)
    factors.whitening.fallback_reason = "a reason"
    tensors, meta = durable_files.flatten(factors)
    durable_files.save_tensors(tmp_path / "f.safetensors", tensors, meta)
    back = durable_files.unflatten(durable_files.load_meta(tmp_path / "f.safetensors"),
                                 durable_files.load_tensors(tmp_path / "f.safetensors"))
    for name in ("singular_values", "u", "vt_linv"):
        assert torch.equal(getattr(back, name), getattr(factors, name))
        assert getattr(back, name).dtype == getattr(factors, name).dtype
    assert (back.out_features, back.whitening.method, back.whitening.rank, back.whitening.fallback_reason) == (
        factors.out_features, factors.whitening.method, factors.whitening.rank, "a reason")


def test_sigterm_asks_for_the_same_cooperative_stop_as_ctrl_c():
    from workbench.cli import _Interrupts

    before = signal.getsignal(signal.SIGTERM)
    cancel = CancelToken()
    with _Interrupts(cancel):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert cancel.cancelled and "SIGTERM" in cancel.reason
        with pytest.raises(KeyboardInterrupt):  # a second one forces the stop
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_checkpoint_file_cannot_name_a_class_outside_workbench():
    meta = {"class": "subprocess:Popen", "fields": {"args": {"value": ["true"]}}}
    with pytest.raises(ValueError, match="not a workbench class"):
        durable_files.unflatten(meta, {})


@pytest.mark.parametrize("spacing,cost,waited,due", [
    (10.0, 0.05, 5.0, False),   # a cheap commit, but not 10 s of work yet: a short layer is redone, not saved
    (10.0, 0.05, 10.5, True),
    (10.0, 2.0, 15.0, False),   # a costly commit (large inputs): 10× its cost first
    (10.0, 2.0, 20.5, True),
    (0.0, 2.0, 0.0, True),      # WORKBENCH_CHECKPOINT_SPACING=0: every layer
])
def test_calibration_checkpoints_wait_for_spacing_times_their_cost_and_spacing_seconds(monkeypatch, tmp_path, spacing,
                                                                                      cost, waited, due):
    monkeypatch.setattr(checkpoint, "COMMIT_SPACING", spacing)
    work = WorkDir(tmp_path / "out.work")
    now = 1000.0
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: now)
    work._since_commit, work._commit_cost = now - waited, cost
    assert work.calibration_due(final=False) is due
    assert work.calibration_due(final=True)
