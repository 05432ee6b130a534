"""Built-in architecture adapters, registered like any third-party plugin."""

from __future__ import annotations

from workbench.hookspecs import hookimpl

from workbench_adapters.llama import LlamaAdapter


@hookimpl
def register_adapters(register):
    register(LlamaAdapter())
