"""Typed progress events. The engine never prints: it emits these to whoever listens."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from workbench.errors import Interrupted

# Event kinds, kept as plain strings so JSON-lines output and third-party listeners stay simple.
STAGE_START = "stage_start"
STAGE_END = "stage_end"
PROGRESS = "progress"
LOG = "log"
WARNING = "warning"
MEMORY = "memory"  # a periodic reading: data is workbench.run.live_memory.MemorySample.to_data()

# What `Event.memory_bytes` measures: the process's resident set, or the GPU allocator's live bytes.
HOST_RSS = "host RSS"
GPU_ALLOCATED = "GPU allocated"


@dataclass(frozen=True)
class Event:
    kind: str
    stage: str
    message: str = ""
    current: int | None = None  # e.g. layer index done so far
    total: int | None = None  # e.g. number of layers
    memory_bytes: int | None = None  # what `memory_kind` says
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)
    memory_kind: str = HOST_RSS  # HOST_RSS, or GPU_ALLOCATED when the run is on CUDA

    @property
    def fraction(self) -> float | None:
        if self.current is None or not self.total:
            return None
        return min(1.0, self.current / self.total)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "stage": self.stage,
            "message": self.message,
            "current": self.current,
            "total": self.total,
            "fraction": self.fraction,
            "memory_bytes": self.memory_bytes,
            "memory_kind": self.memory_kind,
            "data": self.data,
            "time": self.time,
        }


Listener = Callable[[Event], None]


class CancelToken:
    """Cooperative cancellation: the engine calls `check()` at safe points."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Interrupted(self.reason)

    def sync(self) -> None:
        """A safe point every process of a run reaches together (between stages): where a torchrun
        job agrees to stop (workbench/run/distributed.py). In one process, `check`."""
        self.check()


class EventBus:
    """Fan-out of events to listeners; a failing listener never breaks the run."""

    def __init__(self, listeners: list[Listener] | None = None, memory: Callable[[], int] | None = None,
                 memory_kind: str = HOST_RSS):
        self._listeners: list[Listener] = list(listeners or [])
        self._memory = memory
        self._memory_kind = memory_kind

    def track_memory(self, reading: Callable[[], int], kind: str = HOST_RSS) -> None:
        """Stamp every later event with `reading()`, which measures `kind` (HOST_RSS or GPU_ALLOCATED)."""
        self._memory, self._memory_kind = reading, kind

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, stage: str, message: str = "", **kw: Any) -> Event:
        if "memory_bytes" not in kw and self._memory is not None:
            kw["memory_bytes"] = self._memory()
            kw.setdefault("memory_kind", self._memory_kind)
        event = Event(kind=kind, stage=stage, message=message, **kw)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a display bug must not kill a compression
                pass
        return event

    # Convenience wrappers keep engine code short.
    def log(self, stage: str, message: str, **kw: Any) -> Event:
        return self.emit(LOG, stage, message, **kw)

    def warn(self, stage: str, message: str, **kw: Any) -> Event:
        return self.emit(WARNING, stage, message, **kw)

    def progress(self, stage: str, current: int, total: int, message: str = "", **kw: Any) -> Event:
        return self.emit(PROGRESS, stage, message, current=current, total=total, **kw)
