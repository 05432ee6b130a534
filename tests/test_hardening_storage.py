"""Workbench deletes only what it created: the work directory, outputs replaced with --force, caches."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import tiny_profile
from workbench.storage import checkpoint
from workbench.storage.checkpoint import MARKER as WORK_MARKER
from workbench.storage.checkpoint import WorkDir, work_dir_for
from workbench.cli import app
from workbench.errors import RunFailed, UsageError
from workbench.events import CancelToken, EventBus
from workbench.storage.outputs import MARKER as OUTPUT_MARKER
from workbench.storage.outputs import StagedOutput, check_target
from workbench.run.pipeline import run
from workbench.profile.schema import parse_profile

runner = CliRunner()


@pytest.fixture(autouse=True)
def _checkpoint_every_layer(monkeypatch):
    monkeypatch.setattr(checkpoint, "COMMIT_SPACING", 0.0)


def _write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _warnings(events):
    return [e.message for e in events if e.kind == "warning"]


# ---------------------------------------------------------------------------------- the work directory


def test_foreign_work_folder_is_refused_and_untouched(tiny_workspace, tmp_path):
    out = tmp_path / "proj"
    work = work_dir_for(out)
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    path = _write(tmp_path, tiny_profile(tiny_workspace, out, extra="save_model = false"))
    for args in (["run", str(path)], ["run", str(path), "--force"], ["run", str(path), "--resume"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "not made by workbench" in result.output and "notes.txt" in result.output
        assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]  # no lock, no marker, nothing deleted
        assert (work / "notes.txt").read_text() == "mine"
        assert not out.exists()


def test_a_file_where_the_work_folder_goes_is_refused(tmp_path):
    work_dir_for(tmp_path / "proj").write_text("mine")
    with pytest.raises(UsageError, match="not a folder"):
        WorkDir.acquire(tmp_path / "proj")
    assert work_dir_for(tmp_path / "proj").read_text() == "mine"


def test_made_work_dir_has_the_marker_and_older_ones_are_still_accepted(tmp_path):
    work = WorkDir.acquire(tmp_path / "a")
    marker = json.loads((work.path / WORK_MARKER).read_text())
    assert marker["kind"] == "work directory"
    work.close()
    assert not work.path.exists()
    # an older version's: a lone lock, or a workbench state.json (no marker)
    lone = work_dir_for(tmp_path / "b")
    lone.mkdir()
    (lone / "lock").write_text("")
    WorkDir.acquire(tmp_path / "b").close()
    assert not lone.exists()
    old = work_dir_for(tmp_path / "c")
    old.mkdir()
    (old / "state.json").write_text(json.dumps({"format": 1, "workbench": "0.1", "profile": {}, "model": {}}))
    kept = WorkDir.acquire(tmp_path / "c")
    assert (old / WORK_MARKER).exists()
    kept.close()
    # a state.json that is not workbench's does not make a folder ours
    other = work_dir_for(tmp_path / "d")
    other.mkdir()
    (other / "state.json").write_text('{"my": "app"}')
    with pytest.raises(UsageError, match="state.json"):
        WorkDir.acquire(tmp_path / "d")
    assert sorted(p.name for p in other.iterdir()) == ["state.json"]


def test_only_workbench_names_are_deleted_from_its_own_work_dir(tmp_path):
    events = []
    work = WorkDir.acquire(tmp_path / "proj")
    work._events = EventBus([events.append])  # noqa: SLF001 - what prepare() sets
    ours = ["hidden-3.safetensors", "signals.safetensors", checkpoint._file_name("factors", "q@0"),  # noqa: SLF001
            ".state.json.ab12cd_3.tmp", ".hidden-2.safetensors.x1y2z3w4.tmp"]
    theirs = ["notes.txt", "model.safetensors", ".state.json.bak", "hidden.safetensors", "state.json.orig"]
    for name in ours + theirs:
        (work.path / name).write_text("x")
    (work.path / ".proj.partial-abc123").mkdir()
    (work.path / ".proj.partial-abc123" / "report.json").write_text("{}")
    (work.path / "mydir").mkdir()
    (work.path / "mydir" / "data").write_text("x")
    work._remove_unreferenced()  # noqa: SLF001 - nothing committed: nothing referenced
    left = sorted(p.name for p in work.path.iterdir())
    assert left == sorted([*theirs, "mydir", "lock", WORK_MARKER])
    work.finish()  # the folder stays, with the user's files in it, and a warning names them
    assert sorted(p.name for p in work.path.iterdir()) == sorted([*theirs, "mydir", "lock", WORK_MARKER])
    assert any("notes.txt" in w and str(work.path) in w for w in _warnings(events))
    work.close()
    # the next run still recognises the folder as its own (the marker stayed), and leaves the files
    again = WorkDir.acquire(tmp_path / "proj")
    again.close()
    assert (work.path / "notes.txt").exists() and (work.path / "mydir" / "data").exists()


def _profile(tiny_workspace, out, extra="save_model = false"):
    return parse_profile(tiny_profile(tiny_workspace, out, extra=extra))


def test_user_notes_in_the_work_dir_survive_a_successful_run(tiny_workspace, tmp_path):
    out = tmp_path / "proj"
    events = []

    def drop_notes(event):
        events.append(event)
        if event.stage == "calibrate" and not (work_dir_for(out) / "notes.txt").exists():
            (work_dir_for(out) / "notes.txt").write_text("mine")

    run(_profile(tiny_workspace, out), events=EventBus([drop_notes]))
    assert (out / "report.json").exists() and (out / OUTPUT_MARKER).exists()
    work = work_dir_for(out)
    assert sorted(p.name for p in work.iterdir()) == sorted(["notes.txt", "lock", WORK_MARKER])
    assert (work / "notes.txt").read_text() == "mine"
    assert any("notes.txt" in w for w in _warnings(events))


def test_user_notes_in_the_work_dir_survive_a_failed_run(tiny_workspace, tmp_path):
    out = tmp_path / "proj"
    cancel = CancelToken()

    def drop_notes_and_stop(event):
        if event.stage == "calibrate" and event.kind == "progress":
            (work_dir_for(out) / "notes.txt").write_text("mine")
            cancel.cancel()

    with pytest.raises(BaseException):  # Interrupted
        run(_profile(tiny_workspace, out), events=EventBus([drop_notes_and_stop]), cancel=cancel)
    work = work_dir_for(out)
    assert (work / "notes.txt").read_text() == "mine"
    assert not out.exists()


def test_a_run_that_fails_before_any_checkpoint_keeps_user_notes(tiny_workspace, tmp_path):
    out = tmp_path / "proj"
    work = work_dir_for(out)
    work.mkdir()
    (work / WORK_MARKER).write_text("{}")  # a work dir workbench made, where the user left a file
    (work / "notes.txt").write_text("mine")
    profile = parse_profile(tiny_profile(tiny_workspace, out, extra="save_model = false")
                            .replace(f'source = "{tiny_workspace / "tiny-llama"}"', f'source = "{tmp_path}"'))
    with pytest.raises(UsageError, match="no config.json"):
        run(profile)
    assert sorted(p.name for p in work.iterdir()) == sorted(["notes.txt", "lock", WORK_MARKER])
    assert (work / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------- --force on the output


def test_force_refuses_a_regular_file(tiny_workspace, tmp_path):
    out = tmp_path / "proj"
    out.write_text("my thesis")
    path = _write(tmp_path, tiny_profile(tiny_workspace, out, extra="save_model = false"))
    result = runner.invoke(app, ["run", str(path), "--force"])
    assert result.exit_code == 2, result.output
    assert "is a file" in result.output
    assert out.read_text() == "my thesis"
    assert not work_dir_for(out).exists()


def test_force_refuses_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "report.json").write_text(json.dumps({"workbench_version": "0"}))
    link = tmp_path / "proj"
    link.symlink_to(real)
    with pytest.raises(UsageError, match="symbolic link"):
        check_target(link, force=True)
    assert link.is_symlink() and (real / "report.json").exists()


def test_force_refuses_a_directory_that_is_not_a_workbench_output(tiny_workspace, tmp_path):
    out = tmp_path / "proj"
    out.mkdir()
    (out / "data.csv").write_text("1,2")
    path = _write(tmp_path, tiny_profile(tiny_workspace, out, extra="save_model = false"))
    result = runner.invoke(app, ["run", str(path), "--force"])
    assert result.exit_code == 2, result.output
    assert "not a workbench output" in result.output and "data.csv" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["data.csv"]


def test_force_refuses_a_workbench_output_holding_user_files(tmp_path):
    out = tmp_path / "proj"
    out.mkdir()
    (out / OUTPUT_MARKER).write_text("{}")
    (out / "report.json").write_text("{}")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="notes.txt"):
        check_target(out, force=True)


@pytest.mark.parametrize("where", [".", "..", "~"])
def test_force_refuses_the_current_directory_its_parents_and_home(tiny_workspace, tmp_path, monkeypatch, where):
    cwd = tmp_path / "here" / "sub"
    cwd.mkdir(parents=True)
    (cwd / "report.json").write_text(json.dumps({"workbench_version": "0"}))  # even if it looks like an output
    (cwd.parent / "report.json").write_text(json.dumps({"workbench_version": "0"}))
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / OUTPUT_MARKER).write_text("{}")
    target = {"~": str(tmp_path / "home")}.get(where, where)
    path = _write(tmp_path, tiny_profile(tiny_workspace, target, extra="save_model = false"))
    result = runner.invoke(app, ["run", str(path), "--force", "--output", target])
    assert result.exit_code == 2, result.output
    assert "already exists" in result.output
    assert (cwd / "report.json").exists() and (cwd.parent / "report.json").exists()
    assert (tmp_path / "home" / OUTPUT_MARKER).exists()
    assert not [p for p in tmp_path.rglob("*.work")]


def test_a_workbench_output_is_replaced_with_force(tiny_workspace, tmp_path):
    out = tmp_path / "proj"
    path = _write(tmp_path, tiny_profile(tiny_workspace, out, extra="save_model = false"))
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "output"
    first = (out / "report.json").read_text()
    result = runner.invoke(app, ["run", str(path)])
    assert result.exit_code == 2 and "--force" in result.output
    result = runner.invoke(app, ["run", str(path), "--force", "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    assert (out / "report.json").read_text() != first  # timings differ: a new report
    assert sorted(p.name for p in out.iterdir()) == sorted([OUTPUT_MARKER, "profile.toml", "report.json", "report.md"])
    assert not work_dir_for(out).exists()
    assert not [p for p in tmp_path.iterdir() if ".replaced-" in p.name or ".partial-" in p.name]


def test_an_output_made_before_the_marker_is_still_replaceable(tmp_path):
    out = tmp_path / "proj"
    out.mkdir()
    for name in ("profile.toml", "report.md"):
        (out / name).write_text("")
    (out / "report.json").write_text(json.dumps({"workbench_version": "0.1"}))
    (out / "model").mkdir()
    check_target(out, force=True)  # no error
    staged = StagedOutput(out, force=True)
    (staged.path / "report.json").write_text("{}")
    staged.publish()
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "report.json"]


def test_publish_refuses_a_target_that_became_foreign_during_the_run(tmp_path):
    out = tmp_path / "proj"
    staged = StagedOutput(out, force=True)
    out.write_text("appeared meanwhile")
    with pytest.raises(UsageError, match="is a file"):
        staged.publish()
    assert out.read_text() == "appeared meanwhile"
    staged.discard()


# ---------------------------------------------------------------------------------- the GGUF conversion cache


def test_gguf_publish_never_removes_a_foreign_folder(tmp_path):
    from workbench.sources import models

    expected = {"format": models._CACHE_FORMAT, "gguf": "x.gguf", "gguf_size": 1}  # noqa: SLF001
    final = tmp_path / "models" / "x"
    final.mkdir(parents=True)
    (final / "notes.txt").write_text("mine")
    tmp = tmp_path / "models" / ".x.tmp-1"
    tmp.mkdir()
    (tmp / models.MARKER).write_text(json.dumps(expected))
    with pytest.raises(RunFailed, match="did not write"):
        models._publish(tmp, final, expected)  # noqa: SLF001
    assert (final / "notes.txt").read_text() == "mine"
    # a stale conversion of ours (another format) is replaced
    (final / "notes.txt").unlink()
    (final / models.MARKER).write_text(json.dumps({**expected, "format": 0}))
    (final / "config.json").write_text("{}")
    models._publish(tmp, final, expected)  # noqa: SLF001
    assert json.loads((final / models.MARKER).read_text()) == expected
    assert not (final / "config.json").exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["x"]
