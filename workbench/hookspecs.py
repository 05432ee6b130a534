"""The hook specifications. A plugin implements any of these with `@workbench.api.hookimpl`.

Each hook hands the plugin a `register` function; the plugin calls it once per thing it provides.
"""

from __future__ import annotations

from typing import Callable

import pluggy

PROJECT = "workbench"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_allocators(register: Callable) -> None:
    """Register rank-allocation strategies: call `register(allocator)` with an `Allocator`."""


@hookspec
def register_adapters(register: Callable) -> None:
    """Register architecture adapters: call `register(adapter)` with an `Adapter`."""


@hookspec
def register_evaluators(register: Callable) -> None:
    """Register evaluators: call `register(evaluator)` with an `Evaluator`."""


@hookspec
def register_signals(register: Callable) -> None:
    """Register signals allocators can ask for in `needs`: call `register(signal)` with a `Signal`."""
