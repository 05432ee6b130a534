"""Live memory during a run: host RSS and, under CUDA, each device's allocated / reserved bytes.

A `MemorySampler` thread reads them about once a second and emits a `MEMORY` event whose `data` is
a `MemorySample` (`to_data`); the headless display (render/display.py) and the app's run screen
(tui/run_state.py) show the latest one. GPU utilisation is added when NVML is importable
(`torch.cuda.utilization` uses pynvml); it is never required.

Devices appear once this process has initialised CUDA (before that nothing is allocated there),
so sampling never starts a CUDA context of its own.

Several processes (torchrun): each sample carries its `rank`, and the displays keep the latest
sample *per rank* (one line each), as they keep PROGRESS events that carry `data["rank"]`; the
other ranks' MEMORY and PROGRESS events reach rank 0's EventBus through run/rank_relay.py.

Importing this module does not import torch (the app imports it at start-up).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any, Callable

from workbench.events import MEMORY, EventBus
from workbench.render.numbers import format_bytes

INTERVAL = 1.0  # seconds between samples: often enough to see a layer come and go, cheap to read


@dataclass(frozen=True)
class DeviceMemory:
    name: str  # "cuda:0"
    allocated: int  # bytes in live tensors (torch.cuda.memory_allocated)
    reserved: int  # bytes the caching allocator holds (torch.cuda.memory_reserved), ≥ allocated
    utilisation: int | None = None  # percent of time a kernel ran (NVML); None without it


@dataclass(frozen=True)
class MemorySample:
    host_rss: int  # this process's resident set
    devices: tuple[DeviceMemory, ...] = ()
    rank: int = 0

    def to_data(self) -> dict[str, Any]:
        return {"host_rss": self.host_rss, "devices": [asdict(d) for d in self.devices], "rank": self.rank}

    @classmethod
    def from_data(cls, data: Any) -> "MemorySample | None":
        """Back from an event's data; None when it is not a sample (another sender, a damaged line)."""
        try:
            devices = tuple(DeviceMemory(str(d["name"]), int(d["allocated"]), int(d["reserved"]),
                                         None if d.get("utilisation") is None else int(d["utilisation"]))
                            for d in data.get("devices", ()))
            return cls(int(data["host_rss"]), devices, int(data.get("rank", 0)))
        except (AttributeError, KeyError, TypeError, ValueError):
            return None

    def text(self) -> str:
        """'host RSS 3.1 GiB · cuda:0 allocated 10.2 GiB, reserved 12.0 GiB, 87% busy'."""
        parts = [f"host RSS {format_bytes(self.host_rss)}"]
        for d in self.devices:
            busy = f", {d.utilisation}% busy" if d.utilisation is not None else ""
            parts.append(f"{d.name} allocated {format_bytes(d.allocated)}, reserved {format_bytes(d.reserved)}{busy}")
        return " · ".join(parts)


def read_memory(rank: int = 0) -> MemorySample:
    """This process's memory now."""
    import psutil
    import torch

    devices = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index in range(torch.cuda.device_count()):
            devices.append(DeviceMemory(f"cuda:{index}", int(torch.cuda.memory_allocated(index)),
                                        int(torch.cuda.memory_reserved(index)), _utilisation(index)))
    return MemorySample(int(psutil.Process().memory_info().rss), tuple(devices), rank)


def _utilisation(index: int) -> int | None:
    try:
        import torch

        return int(torch.cuda.utilization(index))
    except Exception:  # noqa: BLE001 - pynvml missing or NVML unusable: utilisation is optional
        return None


class Periodic:
    """A daemon thread that calls `step` every `interval` seconds while a with-block runs, and once
    more as the block ends. A failing step ends the thread, never the run: these are display aids."""

    thread_name = "workbench-periodic"

    def __init__(self, interval: float):
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> None:
        raise NotImplementedError

    def _loop(self) -> None:
        try:
            while True:
                self.step()
                if self._stop.wait(self.interval):
                    self.step()  # the last word: what happened since the previous step is not lost
                    return
        except Exception:  # noqa: BLE001 - a display aid must not disturb the run
            return

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class MemorySampler(Periodic):
    """A daemon thread emitting a MEMORY event every `interval` seconds while the block runs.

        with MemorySampler(bus):
            run_safely(...)

    `read` exists for tests. A failing reading stops the sampling, never the run.
    """

    thread_name = "workbench-memory"

    def __init__(self, events: EventBus, interval: float = INTERVAL, rank: int = 0,
                 read: Callable[[int], MemorySample] = read_memory, stage: str = "run"):
        super().__init__(interval)
        self.events, self.rank, self.read, self.stage = events, rank, read, stage

    def sample(self) -> None:
        self.events.emit(MEMORY, self.stage, data=self.read(self.rank).to_data())

    def step(self) -> None:
        self.sample()
