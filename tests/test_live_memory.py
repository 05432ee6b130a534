"""Live memory: the sampler's MEMORY events and how the headless display and the app's run screen show them."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

from rich.console import Console

from workbench.events import MEMORY, EventBus
from workbench.render.display import JsonRenderer, LiveRenderer, PlainRenderer
from workbench.run.live_memory import DeviceMemory, MemorySample, MemorySampler, read_memory
from workbench.tui.run_state import RunJob, RunProgress

GIB = 1024**3
ONE_GPU = MemorySample(int(3.5 * GIB), (DeviceMemory("cuda:0", 10 * GIB, 12 * GIB, 87),))


def test_a_sample_reads_with_its_labels_and_survives_the_event_round_trip():
    assert MemorySample(2 * GIB).text() == "host RSS 2.0 GiB"
    assert ONE_GPU.text() == "host RSS 3.5 GiB · cuda:0 allocated 10.0 GiB, reserved 12.0 GiB, 87% busy"
    no_nvml = MemorySample(GIB, (DeviceMemory("cuda:1", GIB, 2 * GIB),))
    assert no_nvml.text().endswith("cuda:1 allocated 1.0 GiB, reserved 2.0 GiB")  # no utilisation: not shown
    assert MemorySample.from_data(ONE_GPU.to_data()) == ONE_GPU
    assert MemorySample.from_data({"metric": "perplexity"}) is None and MemorySample.from_data(None) is None


def test_reading_this_process():
    sample = read_memory(rank=3)
    assert sample.host_rss > 10 * 2**20 and sample.rank == 3
    assert sample.devices == ()  # CUDA not initialised here: no device is read (nor a context made)


def test_the_sampler_emits_until_the_block_ends():
    seen: list = []
    calls = threading.Event()

    def read(rank):
        calls.set()
        return MemorySample(GIB, rank=rank)

    bus = EventBus([seen.append])
    with MemorySampler(bus, interval=0.01, rank=2, read=read):
        assert calls.wait(5)
        time.sleep(0.05)
    count = len(seen)
    time.sleep(0.05)
    assert count >= 2 and len(seen) == count  # stopped with the block
    assert {(e.kind, e.data["rank"], e.data["host_rss"]) for e in seen} == {(MEMORY, 2, GIB)}


def test_a_failing_reading_stops_the_sampling_not_the_run():
    def broken(rank):
        raise OSError("no /proc")

    with MemorySampler(EventBus(), interval=0.01, read=broken) as sampler:
        sampler._thread.join(timeout=5)
        assert not sampler._thread.is_alive()


def test_plain_lines_carry_the_latest_sample_and_memory_events_print_nothing():
    out = io.StringIO()
    bus = EventBus([PlainRenderer(out)], memory=lambda: GIB)
    bus.log("load", "before any sample")
    bus.emit(MEMORY, "run", data=ONE_GPU.to_data())
    bus.log("calibrate", "after")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("before any sample  rss 1.0 GiB")
    assert lines[1].endswith("after  " + ONE_GPU.text())


def test_json_lines_keep_the_sample():
    out = io.StringIO()
    EventBus([JsonRenderer(out)]).emit(MEMORY, "run", data=ONE_GPU.to_data())
    assert '"kind": "memory"' in out.getvalue() and '"reserved": 12884901888' in out.getvalue()


def _shown(renderer: LiveRenderer) -> str:
    console = Console(record=True, width=160, color_system=None, file=io.StringIO())
    console.print(renderer)
    return console.export_text()


def test_the_live_panel_shows_host_rss_and_each_device_then_every_rank():
    r = LiveRenderer(Console(file=io.StringIO()))
    bus = EventBus([r], memory=lambda: 2 * GIB)
    bus.emit("stage_start", "calibrate")
    bus.emit(MEMORY, "run", data=ONE_GPU.to_data())
    shown = _shown(r)
    assert "memory: host RSS 3.5 GiB · cuda:0 allocated 10.0 GiB, reserved 12.0 GiB, 87% busy" in shown
    assert "peak host RSS 3.5 GiB" in shown and "memory 2.0 GiB" not in shown  # the sample replaces the old line
    # Another rank's events, forwarded onto this bus, get a line each; rank 0's bar is not moved by them.
    bus.emit(MEMORY, "run", data=MemorySample(GIB, rank=1).to_data())
    bus.progress("calibrate", 2, 4, data={"unit": "layer", "rank": 1})
    shown = _shown(r)
    assert "rank 0 memory: host RSS 3.5 GiB" in shown and "rank 1 memory: host RSS 1.0 GiB" in shown
    assert "rank 1: calibrate layer 2/4" in shown and "50%" not in shown


def test_the_run_screen_state_shows_the_sample():
    progress = RunProgress(RunJob(Path("p.toml"), "p", Path("out")))
    bus = EventBus([progress.apply], memory=lambda: 2 * GIB)
    bus.emit("stage_start", "load")
    assert progress.memory_text() == "memory 2.0 GiB (peak 2.0 GiB)"
    bus.emit(MEMORY, "run", data=ONE_GPU.to_data())
    assert progress.memory_text() == f"memory: {ONE_GPU.text()}\npeak host RSS 2.0 GiB"
    assert progress.log == ["▶ load"]  # a reading adds no log line
