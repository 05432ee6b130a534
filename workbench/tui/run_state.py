"""What the run screen shows, folded from engine events. No Textual here.

The worker thread only posts events; this state is updated on the app's thread, so it needs no lock.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.events import LOG, MEMORY, PROGRESS, STAGE_END, STAGE_START, WARNING, Event
from workbench.render.eta import StageEta
from workbench.render.numbers import format_bytes, format_seconds, format_short
from workbench.report import Report, load_report
from workbench.run.live_memory import MemorySample

_ids = itertools.count(1)


@dataclass
class RunJob:
    """One queued or running compression."""

    profile_path: Path
    profile_name: str
    output_dir: Path
    force: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    profile: Any = field(default=None, repr=False, compare=False)  # the loaded Profile that runs


@dataclass
class RunProgress:
    """The live view of one run."""

    job: RunJob
    stage: str = "waiting"
    current: int | None = None
    total: int | None = None
    unit: str = ""
    timing: StageEta = field(default_factory=StageEta)
    memory: int | None = None
    peak_memory: int = 0
    memory_kind: str = ""  # what `memory` measures: workbench.events.HOST_RSS or GPU_ALLOCATED
    memory_history: deque = field(default_factory=lambda: deque(maxlen=120))
    samples: dict[int, MemorySample] = field(default_factory=dict)  # the latest MEMORY reading per rank
    log: list[str] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # the training loss per step ([recovery]), for the chart
    finished: str | None = None  # "done", "cancelled" or "failed"
    outcome: str = ""  # the report's output dir, or the error message

    def apply(self, event: Event, now: float | None = None) -> list[str]:
        """Fold one event in; return the log lines it adds."""
        now = time.monotonic() if now is None else now
        if event.memory_bytes is not None:
            self.memory, self.memory_kind = event.memory_bytes, event.memory_kind
            self.peak_memory = max(self.peak_memory, event.memory_bytes)
            self.memory_history.append(event.memory_bytes)
        lines: list[str] = []
        if event.kind == MEMORY:
            sample = MemorySample.from_data(event.data)
            if sample is not None:
                self.samples[sample.rank] = sample
        elif event.kind == STAGE_START:
            self.stage, self.current, self.total, self.unit = event.stage, None, None, ""
            self.timing.start(now)
            lines.append(f"▶ {event.stage}" + (f": {event.message}" if event.message else ""))
        elif event.kind == STAGE_END:
            lines.append(f"✓ {event.stage} ({event.message})" if event.message else f"✓ {event.stage}")
        elif event.kind == PROGRESS:
            self.timing.progress(event.current, now)
            self.current, self.total = event.current, event.total
            self.unit = (event.data or {}).get("unit", "") or ""
            loss = (event.data or {}).get("loss")
            if isinstance(loss, (int, float)) and not isinstance(loss, bool):
                self.losses.append(float(loss))
        elif event.kind == LOG:
            lines.append(f"  {event.stage}: {event.message}")
        elif event.kind == WARNING:
            lines.append(f"⚠ {event.stage}: {event.message}")
        self.log.extend(lines)
        return lines

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left in this stage at the rate seen so far (workbench/render/eta.py)."""
        return self.timing.remaining(self.current, self.total, time.monotonic() if now is None else now)

    def counter_text(self) -> str:
        if self.total is None:
            return ""
        text = f"{self.current}/{self.total}"
        return f"{self.unit} {text}" if self.unit else text

    def eta_text(self, now: float | None = None) -> str:
        eta = self.eta(now)
        return f"ETA {format_seconds(eta)}" if eta is not None else ""

    def loss_text(self) -> str:
        """'loss 3.21 → 2.87 (step 40)' while a training stage reports its loss; '' otherwise."""
        if not self.losses:
            return ""
        return f"loss {self.losses[0]:.4g} → {self.losses[-1]:.4g} (step {len(self.losses)})"

    def memory_text(self) -> str:
        if self.samples:  # host RSS and each CUDA device, one line per rank
            lines = [(f"rank {rank} " if len(self.samples) > 1 else "") + f"memory: {sample.text()}"
                     for rank, sample in sorted(self.samples.items())]
            peak = f"\npeak {self.memory_kind} {format_bytes(self.peak_memory)}" if self.memory is not None else ""
            return "\n".join(lines) + peak
        if self.memory is None:
            return "memory n/a"
        return f"memory {format_bytes(self.memory)} (peak {format_bytes(self.peak_memory)})"


def describe_result(report: Report | dict[str, Any]) -> str:
    """One line for the log when a run ends well."""
    report = load_report(report)
    parts = [f"saved to {report.output_dir or '?'}"]
    for m in report.metrics:
        if m.dense is not None and m.compressed is not None:
            parts.append(f"{m.name}: {format_short(m.dense)} → {format_short(m.compressed)}")
    return "; ".join(parts)
