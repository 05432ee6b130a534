"""Calibration spread over the processes of a torchrun job: shares of the windows, sums, spread factoring.

In one process every function here is the identity (or the plain loop), so the single-process path
is unchanged. Under torchrun (workbench/run/distributed.py starts the process group) each process
calibrates a contiguous share of the windows, and every per-layer statistic is summed across the
processes before anything uses it:

- Grams and token counts are sums over tokens, so the all-reduced Gram is the one-process Gram up to
  rounding: float64 products added in another grouping (per process, then across: a few float64
  ulps), of activations each process computed in the model's dtype over its own batches, which can
  differ from one process's in the last bits (kernels are chosen by batch shape): ~1e-7 relative in
  float32. The low-rank weights Q·P then agree to ~1e-7·cond (tests/test_distributed.py: ranks
  exactly, Q·P within 1e-4, measured 7e-6). Every process receives the same reduced bits.
- The reductions run in a fixed order (the input groups sorted by name, one collective each), so
  every run with the same number of processes adds in the same order.
- Groups that become complete at a layer are factored round-robin over the processes and gathered
  (all_gather_object), so the SVDs run in parallel and every process ends with every group.

Collectives carry no cancellation themselves; workbench/run/distributed.py agrees on an interrupt
at each of them (`sync`), so every process stops at the same point.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Sequence

import torch

from workbench.engine.walk import Reducer
from workbench.errors import RunFailed, WorkbenchError


class Processes:
    """The torch.distributed job this process belongs to (set by workbench/run/distributed.py)."""

    def __init__(self, rank: int, world: int, local_rank: int, device: torch.device | None = None) -> None:
        self.rank, self.world, self.local_rank, self.device = rank, world, local_rank, device
        self.sync: Callable[[], None] = lambda: None  # agree on an interrupt (set by the run)
        self.broken: Callable[[BaseException], BaseException] = lambda exc: exc  # a failed collective, explained
        self.solo = False  # process 0 is working alone (the others wait for its result): no collectives

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def collective(self, fn: Callable[[], Any]) -> Any:
        """Run one torch.distributed call; a peer that is gone becomes a message, not a traceback."""
        try:
            return fn()
        except RuntimeError as exc:  # DistBackendError and gloo's "Connection closed by peer" are RuntimeErrors
            raise self.broken(exc) from exc


_current: Processes | None = None


def current() -> Processes | None:
    """The job this process is part of; None in a single-process run."""
    return _current


def set_current(processes: Processes | None) -> None:
    global _current
    _current = processes


def is_leader() -> bool:
    """True in process 0 of a torchrun job, and in a single-process run."""
    return _current is None or _current.leader


# ---------------------------------------------------------------------------------- shares and sums


def share_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, stop) of process `rank`'s contiguous share of n items: the first n % world get one more."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def process_share(n: int) -> range:
    """The items (windows) of n this process handles: all of them in one process, a contiguous,
    deterministic share under torchrun. Sum what you compute over them with `all_reduce_sum`."""
    if _current is None or _current.solo:
        return range(n)
    return range(*share_bounds(n, _current.world, _current.rank))


def all_reduce_sum(value: Any) -> Any:
    """`value` summed over the processes of a torchrun job; `value` itself in one process.

    A Python number (float sums in float64, int exactly), a tensor (summed in its own dtype, on its
    own device: use float64 for sums that must match one process to ~1e-15), or a dict / list /
    tuple of them, reduced leaf by leaf in their order. Every process must call it at the same
    point with the same structure. It is also where a distributed run agrees on an interrupt.
    """
    p = _current
    if p is None or p.solo:
        return value
    p.sync()
    return _reduce(p, value)


def _reduce(p: Processes, value: Any) -> Any:
    import torch.distributed as dist

    if isinstance(value, dict):
        return {k: _reduce(p, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_reduce(p, v) for v in value)
    if isinstance(value, torch.Tensor):
        out = value.detach().clone()
        p.collective(lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM))
        return out
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"all_reduce_sum: cannot sum {type(value).__name__}; pass numbers or tensors")
    t = torch.tensor([value], dtype=torch.int64 if isinstance(value, int) else torch.float64)
    p.collective(lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))
    return type(value)(t.item())


def moved(obj: Any, device: torch.device | str) -> Any:
    """A copy of `obj` with every tensor inside (dicts, lists, tuples, dataclasses) on `device`.

    Objects cross processes through pickles; a pickled CUDA tensor would come back on the sender's
    GPU index, so they travel on the host and each process puts them on its own device.
    """
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict) and type(obj) is dict:
        return {k: moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(moved(v, device) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for f in dataclasses.fields(obj):
            object.__setattr__(new, f.name, moved(getattr(obj, f.name), device))
        return new
    return obj


# ---------------------------------------------------------------------------------- the walk's reducer


class DistributedReducer(Reducer):
    """The walk's `Reducer` under torchrun: sums each layer's statistics across the processes and
    spreads the factoring of the groups that complete at a layer over them."""

    def __init__(self, processes: Processes, warn: Callable[[str], None] = lambda message: None) -> None:
        self.p = processes
        self.warn = warn

    def reduce(self, index: int, stats: dict[str, torch.Tensor], tokens: dict[str, int]
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        import torch.distributed as dist

        self.p.sync()
        names = sorted(stats)  # the same groups on every process (every share has windows)
        with torch.inference_mode():  # the Grams were made in inference mode: only there may they change in place
            for name in names:  # float64 sums, one collective each, in name order
                self.p.collective(lambda: dist.all_reduce(stats[name], op=dist.ReduceOp.SUM))
        counts = torch.tensor([tokens[name] for name in names], dtype=torch.int64)
        self.p.collective(lambda: dist.all_reduce(counts, op=dist.ReduceOp.SUM))
        return {name: stats[name] for name in names}, dict(zip(names, counts.tolist()))

    def factor_groups(self, factor, layers, plans: Sequence[Any], stats: dict) -> list[tuple[Any, dict[str, Any]]]:
        """Group j of the ready ones is factored by process j mod N; everyone gets every result."""
        import torch.distributed as dist

        p = self.p
        mine: dict[str, tuple] = {}
        local: dict[str, Any] = {}  # this process's own results, as `factor` left them (spilled, say)
        for j, plan in enumerate(plans):
            if j % p.world != p.rank:
                continue
            try:
                f, entry = factor(layers, plan, stats)
                local[plan.key] = f
                # where `factor` left them ("cuda": each process's own GPU), so every process keeps them alike
                home = f.u.device.type if isinstance(getattr(f, "u", None), torch.Tensor) else "cpu"
                mine[plan.key] = ("ok", moved(f, "cpu"), entry, home)
            except WorkbenchError as exc:  # every process must learn of it, or the others would wait
                mine[plan.key] = ("error", str(exc), None, None)
        gathered: list[Any] = [None] * p.world
        p.collective(lambda: dist.all_gather_object(gathered, mine))
        results = {key: value for part in gathered for key, value in part.items()}
        errors = [results[plan.key][1] for plan in plans if results[plan.key][0] == "error"]
        if errors:
            raise RunFailed(errors[0])
        keep = getattr(factor, "keep", None)  # offload: where received factors go (host memory, a spill file)
        out = []
        for j, plan in enumerate(plans):
            _, f, entry, home = results[plan.key]
            if plan.key in local:
                out.append((local[plan.key], entry))
                continue
            if entry.get("fallback") and p.leader:
                self.warn(f"{plan.key}: {entry['fallback']}; used the eigen route")  # told where it is shown
            f = moved(f, home)
            if keep is not None:
                keep(plan.key, f)
            out.append((f, entry))
        return out
