"""Messages the run worker posts to the app from its thread (Textual's post_message is thread-safe)."""

from __future__ import annotations

import time
from typing import Any, Callable

from textual.message import Message

from workbench.events import PROGRESS, Event


class RunEvent(Message):
    """One engine event of the job `job_id`."""

    def __init__(self, job_id: int, event: Event) -> None:
        super().__init__()
        self.job_id = job_id
        self.event = event


class RunFinished(Message):
    """The job ended: `status` is "done", "cancelled" or "failed"; `detail` is the report or the error text."""

    def __init__(self, job_id: int, status: str, detail: Any) -> None:
        super().__init__()
        self.job_id = job_id
        self.status = status
        self.detail = detail


class ThrottledForwarder:
    """An EventBus listener that posts RunEvents, merging progress events to at most `rate` per second.

    Stage, log and warning events always go through; a progress event closer than 1/rate seconds to
    the last one posted is dropped (the next one carries the newer count), except the last step of a
    stage (current == total), so the bar always reaches the end.
    """

    def __init__(self, post: Callable[[Message], Any], job_id: int, rate: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._post = post
        self._job_id = job_id
        self._interval = 1.0 / rate
        self._clock = clock
        self._last = float("-inf")

    def __call__(self, event: Event) -> None:
        if event.kind == PROGRESS and event.current != event.total:
            now = self._clock()
            if now - self._last < self._interval:
                return
            self._last = now
        self._post(RunEvent(self._job_id, event))
