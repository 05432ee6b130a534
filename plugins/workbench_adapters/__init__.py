"""Built-in architecture adapters, registered like any third-party plugin.

Each claims a model from its `config.model_type` and its module structure; claims do not overlap
(Llama is split by attention layout), so the order here only sets the order of the supported list.
"""

from __future__ import annotations

from workbench.api import hookimpl

from workbench_adapters.llama import LlamaAdapter, LlamaMultiHeadAdapter
from workbench_adapters.mistral import MistralAdapter
from workbench_adapters.qwen2 import Qwen2Adapter

BUILTIN_ADAPTERS = (LlamaMultiHeadAdapter, LlamaAdapter, MistralAdapter, Qwen2Adapter)


@hookimpl
def register_adapters(register):
    for adapter in BUILTIN_ADAPTERS:
        register(adapter())
