"""The relay that lets process 0 of a torchrun job show every process's progress and memory."""

from __future__ import annotations

import io
import os
import time
from datetime import timedelta

import pytest
import torch.distributed as dist
from rich.console import Console

from workbench.events import MEMORY, PROGRESS, EventBus
from workbench.render.display import LiveRenderer, PlainRenderer
from workbench.run.live_memory import MemorySample
from workbench.run.rank_relay import RankRelay, connect_store

GIB = 1024**3


def _pair(store, world: int = 2):
    """Process 0's bus (recording what it receives) and process 1's, relaying through `store`."""
    seen: list = []
    leader_bus, follower_bus = EventBus([seen.append]), EventBus()
    leader = RankRelay(leader_bus, 0, world, store)
    follower = RankRelay(follower_bus, 1, world, store)
    return seen, leader, follower, follower_bus


def test_the_other_process_events_reach_process_0_once_each_with_their_rank():
    seen, leader, follower, bus = _pair(dist.HashStore())
    leader.collect()
    assert seen == []  # nothing written yet: nothing emitted, no error
    bus.progress("calibrate", 3, 10, "layers")
    bus.emit(MEMORY, "run", data=MemorySample(2 * GIB, rank=1).to_data())
    bus.log("calibrate", "a log line stays where it was")
    follower.publish()
    leader.collect()
    assert sorted((e.kind, e.stage, e.current, e.total, e.data["rank"]) for e in seen) == [
        (MEMORY, "run", None, None, 1), (PROGRESS, "calibrate", 3, 10, 1)]
    assert MemorySample.from_data(next(e for e in seen if e.kind == MEMORY).data) == MemorySample(2 * GIB, rank=1)
    follower.publish()
    leader.collect()
    assert len(seen) == 2  # nothing new: nothing emitted twice
    bus.progress("calibrate", 4, 10)
    bus.progress("calibrate", 5, 10)
    follower.publish()
    leader.collect()
    assert [(e.kind, e.current) for e in seen[2:]] == [(PROGRESS, 5)]  # the latest, not every step


def test_the_thread_relays_while_the_block_runs_and_the_last_progress_on_exit():
    store = dist.HashStore()
    seen, leader, follower, bus = _pair(store)
    with leader:
        with RankRelay(bus, 1, 2, store, interval=0.01):
            bus.progress("calibrate", 1, 4)
            deadline = time.time() + 5
            while not seen and time.time() < deadline:
                time.sleep(0.01)
            bus.progress("calibrate", 4, 4)
        # the follower's block ended: its final progress was written, process 0 still collects it
    assert [(e.current, e.data["rank"]) for e in seen if e.kind == PROGRESS][-1] == (4, 1)


def test_a_failing_store_stops_the_relay_not_the_run():
    class Broken:
        def set(self, key, value):
            raise RuntimeError("connection reset")

    bus = EventBus()
    with RankRelay(bus, 1, 2, Broken(), interval=0.01) as relay:
        bus.progress("calibrate", 1, 2)
        relay._thread.join(timeout=5)
        assert not relay._thread.is_alive()
        bus.progress("calibrate", 2, 2)  # the run goes on


def test_process_0_displays_name_each_process():
    seen, leader, follower, bus = _pair(dist.HashStore())
    out = io.StringIO()
    leader.bus.subscribe(PlainRenderer(out, interval=0))
    live = LiveRenderer(Console(file=io.StringIO(), width=120))
    leader.bus.subscribe(live)
    leader.bus.progress("calibrate", 2, 8)  # process 0's own
    leader.bus.emit(MEMORY, "run", data=MemorySample(GIB, rank=0).to_data())
    bus.emit(MEMORY, "run", data=MemorySample(3 * GIB, rank=1).to_data())
    bus.progress("calibrate", 5, 8)
    follower.publish()
    leader.collect()
    lines = out.getvalue().splitlines()
    assert any("rank 1: 5/8" in line and line.endswith("host RSS 3.0 GiB") for line in lines), lines
    assert not any("rank 1" in line for line in lines if "2/8" in line)  # process 0's line is its own
    console = Console(file=io.StringIO(), width=120)
    console.print(live)
    text = console.file.getvalue()
    assert "rank 1: calibrate 5/8" in text and "rank 0 memory: host RSS 1.0 GiB" in text
    assert "rank 1 memory: host RSS 3.0 GiB" in text


def test_connecting_to_the_job_store_as_torchrun_sets_it(monkeypatch):
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(server.port))
    client = connect_store(timeout_s=10)
    client.set("1/progress", b"x")
    assert server.get("workbench/relay/1/progress") == b"x"  # under the relay's own prefix


@pytest.mark.skipif(os.name == "nt", reason="TCPStore on loopback")
def test_relaying_through_a_real_tcp_store():
    server = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    seen, leader, follower, bus = _pair(dist.PrefixStore("workbench/relay", server))
    bus.progress("fisher", 1, 3)
    follower.publish()
    leader.collect()
    assert [(e.stage, e.current, e.data["rank"]) for e in seen] == [("fisher", 1, 1)]
