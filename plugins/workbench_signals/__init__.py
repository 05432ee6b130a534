"""Built-in signals (measurements allocators ask for in `needs`), registered like any third-party plugin."""

from __future__ import annotations

from workbench.api import hookimpl

from workbench_signals.ara import AraSignal
from workbench_signals.fisher import FisherSignal


@hookimpl
def register_signals(register):
    register(FisherSignal())
    register(AraSignal())
