"""Built-in rank allocators, registered like any third-party plugin."""

from __future__ import annotations

from workbench.hookspecs import hookimpl

from workbench_allocators.uniform import UniformAllocator


@hookimpl
def register_allocators(register):
    register(UniformAllocator())
