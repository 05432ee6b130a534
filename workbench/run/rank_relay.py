"""Under torchrun, process 0 shows every process's progress and memory.

Only process 0 has a display. Each other process keeps its latest PROGRESS and MEMORY event and,
about once a second, writes the ones that changed into the job's torch.distributed key-value store
(a `TCPStore` client on MASTER_ADDR:MASTER_PORT, the store the process group was set up through,
under a prefix of its own). Process 0 reads them back at the same pace and emits them on its own
EventBus with `data["rank"]` set, where the headless display (render/display.py) keeps one line per
rank. Nothing here takes part in the collectives, so a slow or dead relay never holds up the run: a
store that fails stops the relaying, never the run.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import timedelta
from typing import Any

from workbench.events import MEMORY, PROGRESS, Event, EventBus
from workbench.run.live_memory import Periodic

INTERVAL = 1.0  # seconds between relays: the display's pace, a handful of small store writes per second
PREFIX = "workbench/relay"  # PrefixStore adds the "/"
KINDS = (MEMORY, PROGRESS)  # memory first: a relayed progress line then shows its process's memory


def _encode(event: Event, rank: int, sequence: int) -> bytes:
    return json.dumps({"seq": sequence, "stage": event.stage, "message": event.message, "current": event.current,
                       "total": event.total, "data": {**(event.data or {}), "rank": rank}}).encode()


def connect_store(timeout_s: float = 30.0):
    """A client of the job's store (MASTER_ADDR:MASTER_PORT, set by torchrun), under this module's prefix."""
    import torch.distributed as dist

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore(PREFIX, store)


class RankRelay(Periodic):
    """A thread that relays PROGRESS and MEMORY events between a job's processes (module docstring).

        with RankRelay(bus, rank, world, store):
            run_safely(...)

    On process 0 it emits the other processes' events onto `bus`; on the others it listens on
    `bus` and publishes. `store` is any torch.distributed Store (tests pass their own).
    """

    thread_name = "workbench-rank-relay"

    def __init__(self, bus: EventBus, rank: int, world: int, store: Any, interval: float = INTERVAL):
        super().__init__(interval)
        self.bus, self.rank, self.world, self.store = bus, rank, world, store
        self._latest: dict[str, tuple[int, Event]] = {}  # kind -> (sequence number, latest event)
        self._sent: dict[str, int] = {}  # kind -> sequence number of the event last written
        self._seen: dict[tuple[int, str], int] = {}  # (rank, kind) -> sequence number last emitted
        self._sequence = 0
        self._lock = threading.Lock()
        if rank != 0:
            bus.subscribe(self._keep)

    def _keep(self, event: Event) -> None:
        if event.kind in KINDS and not self._stop.is_set():
            with self._lock:
                self._sequence += 1
                self._latest[event.kind] = (self._sequence, event)

    def publish(self) -> None:
        """Write this process's latest events that changed since the last call."""
        with self._lock:
            pending = [(kind, seq, event) for kind, (seq, event) in self._latest.items() if self._sent.get(kind) != seq]
        for kind, seq, event in pending:
            self.store.set(f"{self.rank}/{kind}", _encode(event, self.rank, seq))
            self._sent[kind] = seq

    def collect(self) -> None:
        """Emit, on process 0's bus, every other process's events written since the last call."""
        for rank in range(1, self.world):
            for kind in KINDS:
                key = f"{rank}/{kind}"
                if not self.store.check([key]):
                    continue
                item = json.loads(self.store.get(key))
                if self._seen.get((rank, kind)) == item["seq"]:
                    continue
                self._seen[(rank, kind)] = item["seq"]
                self.bus.emit(kind, item["stage"], item["message"], current=item["current"], total=item["total"],
                              data=item["data"])

    def step(self) -> None:
        if self.rank == 0:
            self.collect()
        else:
            self.publish()
