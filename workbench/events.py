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
RESULT = "result"


@dataclass(frozen=True)
class Event:
    kind: str
    stage: str
    message: str = ""
    current: int | None = None  # e.g. layer index done so far
    total: int | None = None  # e.g. number of layers
    memory_bytes: int | None = None  # RSS, or GPU memory on CUDA
    data: dict[str, Any] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

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


class EventBus:
    """Fan-out of events to listeners; a failing listener never breaks the run."""

    def __init__(self, listeners: list[Listener] | None = None, memory: Callable[[], int] | None = None):
        self._listeners: list[Listener] = list(listeners or [])
        self._memory = memory

    def subscribe(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, stage: str, message: str = "", **kw: Any) -> Event:
        if "memory_bytes" not in kw and self._memory is not None:
            kw["memory_bytes"] = self._memory()
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
