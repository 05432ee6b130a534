"""A run as a torchrun job: start the process group, agree on interrupts, share one work directory.

    torchrun --nproc-per-node 2 -m workbench run profile.toml

torchrun starts N copies of the program with WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT set; `start` joins them into one torch.distributed process group (gloo for host
tensors, NCCL for CUDA tensors, each process on cuda:LOCAL_RANK). What each process does:

- every process loads the model, calibrates its contiguous share of the windows and takes part in
  the sums (workbench/engine/distributed.py), the Fisher signal and the evaluators written for it
  (`Evaluator.distributed`); the others run in process 0 alone and their result is broadcast;
- process 0 alone owns the work directory (checkpoints), allocates, writes and publishes the
  output; whatever it reads from the checkpoint (restored stages, the calibration state with each
  process's calibration inputs) it broadcasts, so every process resumes at the same point;
- anything done by process 0 alone (`on_leader`) reaches the others as its result or its error,
  so all processes stop together with the same exit code.

Interrupts: a Ctrl-C or SIGTERM on any process is noticed by every process at the next
collective (each per-layer reduction, each stage boundary, each evaluator's sum): there all stop
with exit 130 and nothing is published. A process that dies is noticed at once by gloo (its
connection closes); a collective that waits longer than WORKBENCH_DIST_TIMEOUT seconds (default
1800, the torch.distributed default) fails, so no process waits forever, and torchrun itself
stops the remaining processes when one exits with an error.
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

from workbench.engine.distributed import DistributedReducer, Processes, current, moved, set_current, share_bounds
from workbench.errors import Interrupted, RunFailed, UsageError, WorkbenchError
from workbench.events import CancelToken

TIMEOUT_VARIABLE = "WORKBENCH_DIST_TIMEOUT"  # workbench/environment.py: default 1800 s


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise UsageError(f"{name} is not set: start several processes with torchrun "
                             "(torchrun --nproc-per-node N -m workbench run PROFILE)")
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{name}={value!r} is not a whole number (torchrun sets it)") from None


def launched_processes() -> int:
    """WORLD_SIZE as torchrun sets it; 1 when the program was not started by torchrun."""
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise UsageError(f"WORLD_SIZE={world}: expected 1 or more processes")
    return world


def timeout_seconds() -> float:
    from workbench.environment import env_number

    return env_number(TIMEOUT_VARIABLE)


def check_profile(profile, world: int) -> None:
    """What a torchrun job cannot do, refused before the process group is joined (exit 2 everywhere)."""
    from workbench.run.stages import Compensate

    c = profile.calibration
    if c.samples < world:
        raise UsageError(f"calibration.samples = {c.samples} is fewer than the {world} processes: every process "
                         f"needs at least one window; raise samples or start fewer processes")
    if Compensate.enabled(profile):
        raise UsageError("[compression] sequential / update (the compensate stage) run in one process only; "
                         "set sequential = false and update = \"none\", or run without torchrun")
    if getattr(getattr(profile, "recovery", None), "method", "none") != "none":
        raise UsageError("[recovery] (LoRA training) runs in one process only; set [recovery] method = \"none\", "
                         "or run without torchrun")
    if getattr(profile, "sweep", None) is not None:
        raise UsageError("a [sweep] runs in one process only; run it without torchrun")
    device = (profile.model.device or "auto").strip().lower()
    if device.startswith("cuda:") or device == "mps":
        raise UsageError(f"model.device = \"{profile.model.device}\" under torchrun: each process uses its own GPU "
                         f"(cuda:LOCAL_RANK); set device = \"auto\", \"cuda\" or \"cpu\"")


def start(profile) -> Processes | None:
    """Join the torchrun job this process was started in; None when it runs alone."""
    import torch.distributed as dist

    world = launched_processes()
    if world == 1:
        return None
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    _env_int("MASTER_PORT")
    if not os.environ.get("MASTER_ADDR"):
        raise UsageError("MASTER_ADDR is not set: start several processes with torchrun")
    check_profile(profile, world)
    timeout = timeout_seconds()
    from workbench.sources.models import resolve_device

    device = resolve_device(profile.model.device)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UsageError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s) visible: "
                             f"start at most that many processes per node")
        torch.cuda.set_device(local_rank)  # "cuda" means this process's GPU from here on
        device = torch.device("cuda", local_rank)
    # host tensors (flags, counts, pickled objects on a CPU run) over gloo, CUDA tensors over NCCL
    backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout))
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"process {rank} of {world} could not join the others at "
                         f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} ({exc}); start all of them "
                         f"with the same torchrun command") from None
    processes = Processes(rank, world, local_rank, device)
    set_current(processes)
    return processes


def stop() -> None:
    """Leave the process group (after the run, whatever its outcome)."""
    import torch.distributed as dist

    if current() is None:
        return
    set_current(None)
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a peer already gone: there is nothing left to tidy
            pass


# ---------------------------------------------------------------------------------- interrupts


class AgreedCancel(CancelToken):
    """A process's cancel token under torchrun: a signal stops every process at the same point.

    The signal handler still only sets this process's flag (`cancel`); `sync`, called at every
    collective, all-reduces the flags, and when any is set every process raises Interrupted there.
    In between, `check` raises only once that agreement was reached, or while process 0 works
    alone (`on_leader`), since nobody then waits for it.
    """

    def __init__(self, local: CancelToken, processes: Processes) -> None:
        self.local, self.p = local, processes
        self.agreed: str | None = None

    def cancel(self, reason: str = "cancelled") -> None:
        self.local.cancel(reason)

    @property
    def cancelled(self) -> bool:
        return self.local.cancelled

    @property
    def reason(self) -> str:
        return self.agreed or self.local.reason

    def check(self) -> None:
        if self.agreed is not None:
            raise Interrupted(self.agreed)
        if self.p.solo:
            self.local.check()

    def sync(self) -> None:
        import torch.distributed as dist

        self.check()
        if self.p.solo:
            return  # process 0 alone: the others are waiting for its result, not at this point
        flag = torch.tensor([int(self.local.cancelled)], dtype=torch.int64)
        self.p.collective(lambda: dist.all_reduce(flag, op=dist.ReduceOp.MAX))
        if flag.item():
            self.agreed = self.local.reason if self.local.cancelled else "another process of the run was interrupted"
            raise Interrupted(self.agreed)

    def broken(self, exc: BaseException) -> WorkbenchError:
        """A collective failed: a peer left (or timed out). Interrupted when this process was signalled too."""
        if self.local.cancelled or self.agreed:
            return Interrupted(self.reason)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return RunFailed(f"process {self.p.rank}: another process of this torchrun job stopped or stopped "
                         f"answering ({first[:300]}); its own message says why")


def agree_on_interrupts(processes: Processes, local: CancelToken) -> AgreedCancel:
    token = local if isinstance(local, AgreedCancel) else AgreedCancel(local, processes)
    processes.sync, processes.broken = token.sync, token.broken
    return token


def _relayed(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, WorkbenchError):
        return int(exc.exit_code), str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return int(Interrupted.exit_code), "forced by a second interrupt"
    return int(RunFailed.exit_code), f"{type(exc).__name__}: {exc}"


def _raise_relayed(code: int, message: str) -> None:
    kind = {int(UsageError.exit_code): UsageError, int(Interrupted.exit_code): Interrupted}.get(code, RunFailed)
    raise kind(f"process 0: {message}")


def on_leader(fn: Callable[[], Any]) -> Any:
    """fn() in process 0 alone; every process gets its result (tensors on the host) or its error.

    In a single-process run this is simply fn().
    """
    import torch.distributed as dist

    p = current()
    if p is None or p.solo:
        return fn()
    box: list[Any] = [None]
    if p.leader:
        p.solo = True
        try:
            box[0] = ("ok", moved(fn(), "cpu"))
        except BaseException as exc:
            p.solo = False
            box[0] = ("error", *_relayed(exc))
            try:
                p.collective(lambda: dist.broadcast_object_list(box, src=0))
            except WorkbenchError:
                pass  # the others are gone already; this process's own error is the one to report
            raise
        finally:
            p.solo = False
    p.collective(lambda: dist.broadcast_object_list(box, src=0))
    if box[0][0] == "error":
        _raise_relayed(box[0][1], box[0][2])
    return box[0][1]


def evaluate(evaluator, fn: Callable[[], Any]) -> Any:
    """An evaluator's `evaluate`: in every process when it is written for several (`distributed`),
    else in process 0 alone, its result broadcast."""
    if current() is None or getattr(evaluator, "distributed", False):
        return fn()
    return on_leader(fn)


# ---------------------------------------------------------------------------------- the work directory


class SharedWorkDir:
    """The run's work directory as every process of a torchrun job sees it.

    Process 0 holds the real one (`inner`, a workbench.storage.checkpoint.WorkDir); in the others
    `inner` is None. What process 0 reads or decides (`prepare`, the checks, restored stages, the
    calibration state) every process receives, so all restore the same stages and meet at the same
    collectives; writes happen in process 0 only. The calibration state's inputs are per process:
    saved, process 0 gathers them in process order; restored, each process gets its own part.
    """

    def __init__(self, processes: Processes, inner=None) -> None:
        self.p, self.inner = processes, inner
        self._resumed: list[str] = []
        self._windows = 0

    @property
    def path(self) -> Path | None:
        return self.inner.path if self.inner is not None else None

    @property
    def state(self) -> dict[str, Any]:
        return self.inner.state if self.inner is not None else {}

    @property
    def resumed(self) -> list[str]:
        return self.inner.resumed if self.inner is not None else self._resumed

    def prepare(self, profile, resume, force, events) -> None:
        on_leader(lambda: self.inner.prepare(profile, resume, force, events))

    def check_model(self, fingerprint: str, device_type: str) -> None:
        on_leader(lambda: self.inner.check_model(fingerprint, device_type))

    def check_windows(self, windows: torch.Tensor) -> None:
        self._windows = int(windows.shape[0])
        on_leader(lambda: self.inner.check_windows(windows))

    def load_stage(self, name: str, device: torch.device | str = "cpu"):
        return moved(on_leader(lambda: self.inner.load_stage(name, "cpu")), device)

    def save_stage(self, *args, **kwargs) -> None:
        if self.inner is not None:
            self.inner.save_stage(*args, **kwargs)

    def staging_root(self) -> Path:
        return self.inner.staging_root()

    def disk_usage(self) -> int:
        return self.inner.disk_usage() if self.inner is not None else 0

    def close(self) -> Path | None:
        return self.inner.close() if self.inner is not None else None

    def finish(self) -> None:
        if self.inner is not None:
            self.inner.finish()

    # -- calibration -------------------------------------------------------------------------

    def _shares(self) -> list[int]:
        return [b - a for a, b in (share_bounds(self._windows, self.p.world, r) for r in range(self.p.world))]

    def _split(self, hidden: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The saved batches, in process order, back into each process's own (batches never straddle)."""
        parts: list[list[torch.Tensor]] = []
        it = iter(hidden)
        for rows in self._shares():
            part, have = [], 0
            while have < rows:
                batch = next(it, None)
                if batch is None:
                    break
                part.append(batch)
                have += batch.shape[0]
            if have != rows:
                raise RunFailed("the checkpoint's calibration inputs do not split into this job's shares of the "
                                "windows; start over with --force (without --resume)")
            parts.append(part)
        return parts

    def load_calibration(self, device: torch.device):
        import torch.distributed as dist

        parts: list[Any] = []

        def leader():
            state = self.inner.load_calibration("cpu")
            if state is None:
                return None
            if state.hidden is not None:
                parts.extend(self._split(state.hidden))
            return dataclasses.replace(state, hidden=None), state.hidden is not None

        shared = on_leader(leader)
        if shared is None:
            return None
        state, has_hidden = shared
        if not self.p.leader:
            self._resumed.append(f"calibration ({state.next_layer} layers)")
        hidden = None
        if has_hidden:
            mine: list[Any] = [None]
            self.p.collective(lambda: dist.scatter_object_list(mine, parts if self.p.leader else None, src=0))
            hidden = mine[0]
        return moved(dataclasses.replace(state, hidden=hidden), device)

    def save_calibration(self, state, final: bool, layers: int | None = None) -> None:
        import torch.distributed as dist

        if not on_leader(lambda: self.inner.calibration_due(final)):
            return
        hidden = None if state.hidden is None else [h.cpu() for h in state.hidden]
        gathered: list[Any] | None = [None] * self.p.world if self.p.leader else None
        self.p.collective(lambda: dist.gather_object(hidden, gathered, dst=0))

        def leader():
            full = None if state.hidden is None else [h for part in gathered for h in part]
            self.inner.save_calibration(dataclasses.replace(state, hidden=full), final, layers)

        on_leader(leader)


def shared_work_dir(processes: Processes, target: Path, force: bool) -> SharedWorkDir:
    """Process 0 checks the output and takes the work directory; every process learns the outcome."""
    from workbench.storage.checkpoint import WorkDir
    from workbench.storage.outputs import check_target

    taken: list[Any] = []

    def acquire() -> None:
        check_target(target, force)
        taken.append(WorkDir.acquire(target))

    on_leader(acquire)
    return SharedWorkDir(processes, taken[0] if taken else None)


def share_calibration(ctx, walk: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """(windows, calibrate()'s walk arguments) for this process: under torchrun its share of the
    windows and the walk's strategies with the summing reducer; otherwise all windows and `walk`."""
    p = current()
    if p is None:
        return ctx.windows, walk
    from workbench.engine.walk import GramStatistics, Strategies

    strategies = walk.get("strategies") or Strategies(accumulator=GramStatistics(ctx.gram_precision))
    strategies.reducer = DistributedReducer(p, warn=lambda message: ctx.events.warn("calibrate", message))
    start, stop_ = share_bounds(int(ctx.windows.shape[0]), p.world, p.rank)
    return ctx.windows[start:stop_], {**walk, "strategies": strategies}
