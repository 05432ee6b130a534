"""Time left in a stage, from its progress events: one estimate for the terminal and the app.

The rate counts from the stage's first progress event, so work before it (loading, capturing the
first layer's inputs) does not skew it. Until a second event gives a rate, the time since the
stage started stands in for it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StageEta:
    stage_started: float | None = None
    first_time: float | None = None  # the first progress event of the stage (or of a restarted count)
    first_count: int = 0
    last_count: int = 0

    def start(self, now: float) -> None:
        """A new stage began at `now`."""
        self.stage_started, self.first_time, self.first_count, self.last_count = now, None, 0, 0

    def progress(self, current: int | None, now: float) -> None:
        """A progress event: `current` of the stage's units done at `now`."""
        current = current or 0
        if self.stage_started is None:  # progress without a stage start: time the stage from here
            self.stage_started = now
        if self.first_time is None or current < self.last_count:  # the count started over: so does the rate
            self.first_time, self.first_count = now, current
        self.last_count = current

    def remaining(self, current: int | None, total: int | None, now: float) -> float | None:
        """Seconds left at the rate seen so far; None while there is no rate."""
        if not total or current is None or current <= 0:
            return None
        left = max(0, total - current)
        if self.first_time is not None and current > self.first_count:
            return max(0.0, now - self.first_time) / (current - self.first_count) * left
        if self.stage_started is not None:
            return max(0.0, now - self.stage_started) / current * left
        return None
