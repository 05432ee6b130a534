"""Built-in rank allocators, registered like any third-party plugin."""

from __future__ import annotations

from workbench.api import hookimpl

from workbench_allocators.ara import AraAllocator
from workbench_allocators.drank import DRankAllocator, DRankRebalancedAllocator
from workbench_allocators.loss_aware import LossAwareAllocator
from workbench_allocators.protect_first import ProtectFirstAllocator
from workbench_allocators.uniform import UniformAllocator


@hookimpl
def register_allocators(register):
    register(UniformAllocator())
    register(DRankAllocator())
    register(DRankRebalancedAllocator())
    register(ProtectFirstAllocator())
    register(LossAwareAllocator())
    register(AraAllocator())
