"""One run of a profile: the stages of workbench/run/stages.py, load → dense metrics → calibrate →
signals → allocate → assemble → save → evaluate → report, around a work directory and a staged output.

The output appears all at once: everything is written into a staging directory beside the target
and renamed into place at the end. The compressed model is saved before the compressed model is
evaluated, so a failing evaluator never costs the compression.
"""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path
from typing import Any, Sequence

import torch

from workbench.environment import check_environment
from workbench.errors import RunFailed, WorkbenchError
from workbench.events import CancelToken, EventBus
from workbench.engine.distributed import current as current_processes
from workbench.run.distributed import agree_on_interrupts, on_leader, shared_work_dir
from workbench.run.stages import RunContext, Stage, default_stages, run_stages
from workbench.storage.checkpoint import WorkDir
from workbench.storage.outputs import check_target


def run(profile, *, output_dir: str | Path | None = None, force: bool = False, events: EventBus | None = None,
        cancel: CancelToken | None = None, registry=None, resume: bool | str = False,
        preflight: bool = True, stages: Sequence[Stage] | None = None) -> dict[str, Any]:
    """Run `profile` end to end and return the report (also written as report.json).

    Progress is checkpointed in `<output>.work/` (workbench/storage/checkpoint.py), kept when the run is
    interrupted or fails and removed once the output is published. `resume`: False refuses an
    existing checkpoint unless `force` (which starts over); True continues it; "auto" (the app)
    continues it when it belongs to this profile and model, else starts over. `preflight` checks
    disk and memory before the long work (workbench/run/preflight.py). `stages` replaces
    `workbench.run.stages.default_stages()` (e.g. with one more stage). A profile with a `[sweep]`
    runs every cell on one calibration (workbench/run/sweep.py) and returns sweep.json's content.
    """
    if stages is None and getattr(profile, "sweep", None) is not None:
        from workbench.run.sweep import run_sweep

        return run_sweep(profile, output_dir=output_dir, force=force, events=events, cancel=cancel, registry=registry,
                         resume=resume, preflight=preflight)
    from workbench.sources.text import check_text_sources
    check_environment()
    check_text_sources(profile)  # a bad text file costs seconds, not the model load and the dense metrics
    target = Path(output_dir if output_dir is not None else profile.output.dir)
    processes = current_processes()
    if processes is None:
        check_target(target, force)  # before the work directory is made beside it
        work = WorkDir.acquire(target)
    else:  # a torchrun job (workbench/run/distributed.py): process 0 owns the output and the work directory
        cancel = agree_on_interrupts(processes, cancel or CancelToken())
        work = shared_work_dir(processes, target, force)
    try:
        report = _run(profile, work, target, force=force, events=events, cancel=cancel, registry=registry,
                      resume=resume, preflight=preflight, stages=stages)
    except BaseException as exc:
        ours = bool(work.state)  # this run's checkpoint, not one it refused to touch
        kept = work.close()
        if kept is not None and ours:  # the CLI and the app tell the user how to continue
            with suppress(AttributeError, TypeError):
                exc.checkpoint = kept
        raise
    work.close()
    return report


def _run(profile, work: WorkDir, target: Path, *, force: bool, events: EventBus | None, cancel: CancelToken | None,
         registry, resume: bool | str, preflight: bool, stages: Sequence[Stage] | None) -> dict[str, Any]:
    from workbench.registry import get_registry

    registry = registry or get_registry()
    ctx = RunContext(profile, registry, events or EventBus(), cancel or CancelToken(), work=work, target=target,
                     force=force, preflight=preflight)
    ctx.allocator  # an unknown allocator is refused before any work  # noqa: B018
    work.prepare(profile, resume, force, ctx.events)
    try:
        run_stages(ctx, default_stages() if stages is None else stages)
        ctx.cancel.sync()

        def publish() -> None:
            ctx.output()  # a run whose stages wrote nothing still publishes its profile.toml
            ctx.staged.publish()
            work.finish()

        on_leader(publish)  # under torchrun process 0 publishes and the others learn how that went
    except BaseException:
        if ctx.staged is not None:
            ctx.staged.discard()  # interrupted or failed before publishing: leave the target as it was
        raise
    failed = [m["evaluator"] for m in ctx.report.get("metrics", []) if "error" in m]
    if failed:
        raise RunFailed(f"evaluator(s) {', '.join(failed)} failed; the compressed model and report were saved in {target}",
                        ) from None
    return ctx.report


def run_safely(*args, **kwargs) -> dict[str, Any]:
    """`run`, with any unexpected error turned into RunFailed (for the CLI and the app)."""
    try:
        return run(*args, **kwargs)
    except (WorkbenchError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            failed = RunFailed(f"out of GPU memory: {exc}. Lower calibration.samples or use a smaller dtype.")
        else:
            failed = RunFailed(f"{type(exc).__name__}: {exc}")
        failed.checkpoint = getattr(exc, "checkpoint", None)  # where the CLI says to --resume from
        raise failed from exc
