"""The helpers several modules share: number formatting, the stage ETA, atomic file writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from workbench.render.eta import StageEta
from workbench.render.numbers import as_number, format_bytes, format_change, format_figure, format_short
from workbench.storage import durable_files
from workbench.storage.dense_cache import DenseCache
from workbench.storage.durable_files import write_atomically


# --------------------------------------------------------------------------- numbers


def test_numbers_read_the_same_everywhere():
    assert format_bytes(30 * 10**9) == "27.9 GiB" and format_bytes(999) == "999 B" and format_bytes("x") == "n/a"
    assert format_figure(2 * 1024**3, "parameter bytes") == "2.0 GiB" and format_figure(2000.0) == "2,000"
    assert format_figure(12.345) == "12.35" and format_figure(0.54321) == "0.5432" and format_figure(None) == "n/a"
    assert format_change(20, 25) == "×1.250 (+25.0%)" and format_change(20, 25, percent=False) == "×1.250"
    assert format_change(0, 1) == "" and format_change(None, 1) == "" and format_change(True, 1) == ""
    assert format_short(129.29648) == "129.3" and format_short("12") == "?"
    assert as_number(True) is None and as_number(3) == 3.0


# --------------------------------------------------------------------------- ETA


def test_eta_counts_from_the_first_progress_event():
    eta = StageEta()
    eta.start(0.0)
    eta.progress(1, 100.0)  # 100 s of loading before the first layer: not part of the rate
    eta.progress(3, 104.0)
    assert eta.remaining(3, 10, 104.0) == 14.0  # 2 s per layer, 7 left
    assert eta.remaining(3, 10, 106.0) == 21.0  # no news for 2 s: the rate slows


def test_eta_with_one_progress_event_uses_the_stage_start():
    eta = StageEta()
    eta.start(50.0)
    eta.progress(3, 60.0)
    assert eta.remaining(3, 30, 60.0) == pytest.approx(90.0)  # 3 layers in 10 s: 27 more in 90 s
    assert eta.remaining(0, 30, 60.0) is None and eta.remaining(3, None, 60.0) is None


def test_eta_restarts_with_a_new_stage_or_a_count_that_goes_back():
    eta = StageEta()
    eta.start(0.0)
    eta.progress(5, 10.0)
    eta.progress(10, 20.0)
    eta.start(20.0)
    eta.progress(1, 21.0)
    eta.progress(2, 22.0)
    assert eta.remaining(2, 4, 22.0) == 2.0
    eta.progress(1, 30.0)  # the count started again (say, a second pass): measure from here
    eta.progress(3, 34.0)
    assert eta.remaining(3, 5, 34.0) == 4.0
    assert eta.remaining(5, 5, 40.0) == 0.0


# --------------------------------------------------------------------------- atomic writes


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_write_atomically_replaces_the_file_and_flushes_it(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(durable_files.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    target = tmp_path / "a.json"
    target.write_text("old")
    write_atomically(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new" and synced and leftovers(tmp_path) == []


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    def half(tmp: str) -> None:
        Path(tmp).write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(target, half)
    assert target.read_text() == "old" and leftovers(tmp_path) == []


def test_dense_cache_writes_through_the_atomic_writer(tmp_path):
    cache = DenseCache(tmp_path)
    key = ("fp", "perplexity", "1", {"seq_len": 8}, "cpu", "float32")
    cache.put({"value": 12.5}, *key)
    assert cache.get(*key) == {"value": 12.5} and leftovers(tmp_path) == []
    with pytest.raises(TypeError):
        cache.put({"value": object()}, *key)  # not JSON: nothing half-written, the old value stays
    assert cache.get(*key) == {"value": 12.5} and leftovers(tmp_path) == []
    assert json.loads(next(tmp_path.glob("*.json")).read_text()) == {"value": 12.5}


def test_token_cache_writes_a_complete_npy_file(tmp_path):
    from workbench.sources.text import _write_atomic

    path = tmp_path / "tokens" / "abc.npy"
    _write_atomic(path, np.arange(5, dtype=np.int32))
    assert np.load(path).tolist() == [0, 1, 2, 3, 4] and leftovers(path.parent) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["abc.npy"]  # no "x.tmp.npy" beside it


# --------------------------------------------------------------------------- memory labels


def test_memory_figures_say_what_they_measure():
    import io

    from rich.console import Console

    from workbench.events import GPU_ALLOCATED, HOST_RSS, EventBus
    from workbench.render.display import LiveRenderer, PlainRenderer

    out = io.StringIO()
    bus = EventBus([PlainRenderer(out)], memory=lambda: 3 << 30)
    bus.log("load", "on the host")
    bus.track_memory(lambda: 1 << 30, GPU_ALLOCATED)
    gpu_event = bus.log("calibrate", "on the GPU")
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("on the host  rss 3.0 GiB") and lines[1].endswith("on the GPU  gpu 1.0 GiB")
    assert gpu_event.to_dict()["memory_kind"] == GPU_ALLOCATED

    console = Console(record=True, width=100, color_system=None, file=io.StringIO())
    live = LiveRenderer(console)
    live(bus.log("calibrate", "x"))
    console.print(live)
    shown = console.export_text()
    assert "memory 1.0 GiB (GPU allocated; peak 1.0 GiB)" in shown
    live(EventBus(memory=lambda: 2 << 30, memory_kind=HOST_RSS).log("save", "y"))
    console.print(live)
    assert "memory 2.0 GiB (host RSS; peak 2.0 GiB)" in console.export_text()  # a GPU peak is not an RSS peak
