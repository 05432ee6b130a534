"""A run as a list of stages sharing one `RunContext`.

Each stage has a `name` (its timing in report.json, its progress events), its work (`run(ctx)`),
and, where its result is worth keeping for a resumed run, `save(ctx, work)` / `restore(ctx, work)`
through the work directory's generic `save_stage` / `load_stage`. `compress` marks the stages that
count in `timings.compress_s`. `run_stages` times each stage, restores it from the checkpoint when
it can, saves it after it ran, and checks for an interrupt between stages; so a new stage (recovery,
export) is one more object in `default_stages()`, nothing else.

Calibration keeps its own per-layer checkpoints through the layer walk's after-layer callback
(workbench/engine/compress.py), since a stage-level checkpoint would lose a whole pass.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from workbench import __version__
from workbench.api import EvalContext
from workbench.errors import Interrupted, RunFailed, WorkbenchError
from workbench.events import GPU_ALLOCATED, HOST_RSS, CancelToken, EventBus


@dataclass
class RunContext:
    """What the stages of one run share: the inputs, then each stage's results as it produces them."""

    profile: Any
    registry: Any
    events: EventBus
    cancel: CancelToken
    work: Any = None  # workbench.storage.checkpoint.WorkDir; None: nothing is checkpointed
    target: Path | None = None  # the output directory; None: nothing is written
    force: bool = False
    preflight: bool = False
    ratio: float | None = None  # `workbench inspect --ratio`; None: the profile's
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)
    stages: Sequence["Stage"] = ()
    # filled in by the stages
    loaded: Any = None
    model: Any = None
    tokenizer: Any = None
    adapter: Any = None
    plans: list = field(default_factory=list)
    params_model_dense: int = 0
    dense_results: list[dict[str, Any]] = field(default_factory=list)
    windows: Any = None
    gram_precision: str | None = None  # the resolved Gram mode the calibration used
    calibrated: Any = None
    signal_names: tuple[str, ...] | None = None  # None: what the profile's allocator needs
    signals: dict[str, dict[str, Any]] = field(default_factory=dict)
    signal_notes: dict[str, dict[str, Any]] = field(default_factory=dict)  # each signal's `SignalContext.notes`
    budget: int = 0
    ranks: Any = None
    table: list[dict[str, Any]] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    compressed_results: list[dict[str, Any]] = field(default_factory=list)
    dense_weights: Any = None  # {(layer, site path): host copy}, kept by Assemble for the compensate stage
    compensation: dict[str, Any] | None = None  # the compensate stage's report section
    recovery: dict[str, Any] | None = None  # the recover stage's report section ([recovery] method = "lora")
    offload: Any = None  # workbench.engine.offload.OffloadedLayers under [model] offload; None: all on the device
    report: dict[str, Any] = field(default_factory=dict)
    staged: Any = None  # workbench.storage.outputs.StagedOutput, made on first use by `output()`

    @property
    def allocator(self):
        return self.registry.get("allocator", self.profile.compression.allocator)

    def needed_signals(self) -> tuple[str, ...]:
        return tuple(self.allocator.needs) if self.signal_names is None else tuple(self.signal_names)

    def output(self) -> Path:
        """The staging directory the output is written into (made, with profile.toml, on first use)."""
        if self.staged is None:
            from workbench.storage.outputs import StagedOutput

            self.staged = StagedOutput(self.target, self.force, root=self.work.staging_root())
            (self.staged.path / "profile.toml").write_text(self.profile.to_toml())
        return self.staged.path


class Stage:
    """One step of a run. Subclasses set `name` and implement `run`; the rest is optional."""

    name: str = ""
    label: str = ""  # how a restored result is named in report.json's resumed_from_checkpoint
    compress: bool = False  # counts in timings.compress_s
    timed: bool = True  # False: no timing, no stage events (the report, which holds the timings)

    def wanted(self, ctx: RunContext) -> bool:
        return True

    def message(self, ctx: RunContext) -> str:
        return ""

    def run(self, ctx: RunContext) -> None:
        raise NotImplementedError

    def restore(self, ctx: RunContext, work) -> bool:
        """Take the result from the checkpoint instead of running; True when done so."""
        return False

    def save(self, ctx: RunContext, work) -> None:
        """Keep the result for a resumed run (after `run`)."""


@contextmanager
def _stage_errors(name: str):
    try:
        yield
    except (WorkbenchError, KeyboardInterrupt):
        raise
    except Exception as exc:  # an unexpected error: say where, keep the traceback for --debug
        raise RunFailed(f"stage '{name}' failed: {type(exc).__name__}: {exc}") from exc


def run_stages(ctx: RunContext, stages: Sequence[Stage]) -> None:
    """Run each wanted stage: restored from the checkpoint when it can be, else run and saved; timed."""
    ctx.stages = list(stages)
    for stage in ctx.stages:
        if not stage.wanted(ctx):
            continue
        start = time.perf_counter()
        if stage.timed:
            ctx.events.emit("stage_start", stage.name, stage.message(ctx))
        with _stage_errors(stage.name):
            if ctx.work is not None and stage.restore(ctx, ctx.work):
                ctx.work.resumed.append(stage.label or stage.name)
            else:
                stage.run(ctx)
                if ctx.work is not None:
                    stage.save(ctx, ctx.work)
        if stage.timed:
            ctx.timings[stage.name] = ctx.timings.get(stage.name, 0.0) + time.perf_counter() - start
            ctx.events.emit("stage_end", stage.name, f"{ctx.timings[stage.name]:.1f} s")
        ctx.cancel.sync()  # every process of a torchrun job passes here: where all agree to stop


def compress_seconds(ctx: RunContext) -> float:
    return sum(ctx.timings.get(s.name, 0.0) for s in ctx.stages if s.compress)


# ---------------------------------------------------------------------------------- the stages


class Load(Stage):
    name = "load"

    def message(self, ctx):
        return ctx.profile.model.source

    def run(self, ctx):
        from workbench.engine.grouping import plan_groups
        from workbench.profile.fit import check_fits_model
        from workbench.run.preflight import check as preflight_check, estimate, shapes_of
        from workbench.run.resources import count_parameters, current_memory
        from workbench.sources.models import load_model

        profile = ctx.profile
        loaded = ctx.loaded = load_model(profile.model.source, profile.model.dtype, profile.model.device,
                                         events=ctx.events, offload=getattr(profile.model, "offload", "none"))
        ctx.model, ctx.tokenizer = loaded.model, loaded.tokenizer
        kind = GPU_ALLOCATED if loaded.device.type == "cuda" else HOST_RSS  # labelled by what is measured
        ctx.events.track_memory(lambda: current_memory(loaded.device), kind)
        ctx.adapter = ctx.registry.adapter_for(ctx.model)
        if loaded.offload is not None:
            _attach_offload(ctx)
        ctx.plans = plan_groups(ctx.model, ctx.adapter, profile.compression.targets, profile.compression.ignore,
                                profile.compression.group_size)
        check_fits_model(profile, ctx.model, ctx.adapter, ctx.plans, ctx.events, ctx.ratio)
        ctx.params_model_dense = count_parameters(ctx.model)
        if ctx.work is not None:
            ctx.work.check_model(loaded.fingerprint, loaded.device.type)
        if ctx.preflight:
            shapes = shapes_of(ctx.model, ctx.plans, profile, ctx.params_model_dense, ctx.adapter,
                               ctx.needed_signals())
            ctx.events.log("load", preflight_check(estimate(shapes), ctx.target, loaded.device,
                                                   profile.output.save_model,
                                                   already_on_disk=ctx.work.disk_usage() if ctx.work else 0,
                                                   shapes=shapes, offload=_resolved_offload(loaded)))
            if profile.recovery.method != "none":  # training comes after calibration: checked on its own
                from workbench.run.preflight import check_training

                ctx.events.log("load", check_training(ctx.model, ctx.plans, profile.recovery, loaded.device))


def _resolved_offload(loaded) -> str:
    """"none", "cpu" or "disk": what the load chose ("auto" resolved), as preflight's estimate needs it."""
    return loaded.offload[0].mode if loaded.offload is not None else "none"


def _attach_offload(ctx: RunContext) -> None:
    """Under offload: the skeleton's non-layer weights onto the device, each layer's home set
    (workbench/engine/offload.py); what cannot run layer by layer is refused now, before the long work."""
    from workbench.engine.offload import attach, return_freed_host_memory
    from workbench.errors import UsageError

    devices, weights = ctx.loaded.offload
    ctx.offload = attach(ctx.model, ctx.adapter, devices, weights)
    return_freed_host_memory()
    where = f"offload = \"{devices.mode}\""
    if Compensate.enabled(ctx.profile):
        raise UsageError(f"[compression] sequential / update run a second walk that {where} does not support yet; "
                         f"set them off, or model.offload = \"none\"")
    if getattr(getattr(ctx.profile, "recovery", None), "method", "none") != "none":
        raise UsageError(f"[recovery] trains the whole model at once, which {where} does not support; "
                         f"set [recovery] method = \"none\", or model.offload = \"none\"")
    if ctx.needed_signals() and not devices.layers_on_compute:
        free = sorted(name for name, a in ctx.registry.allocators.items() if not getattr(a, "needs", ()))
        instead = f"compression.allocator = \"{free[0]}\"" + (f" (or {', '.join(free[1:])})" if free[1:] else "")
        raise UsageError(f"allocator '{ctx.allocator.name}' needs the signal(s) {', '.join(ctx.needed_signals())}, "
                         f"a backward pass through the whole model, which {where} cannot hold on {devices.compute}; "
                         f"use {instead}, which needs no signal, or model.offload = \"none\"")


def _as_json(row: dict[str, Any]) -> dict[str, Any]:
    """An evaluator's result as report.json will hold it; what JSON cannot hold fails that evaluator."""
    try:
        return json.loads(json.dumps(row, default=str))
    except (TypeError, ValueError, RecursionError) as exc:  # circular, non-string keys, a __str__ that raises
        raise ValueError(f"its result cannot be saved in report.json ({type(exc).__name__}: {exc})") from exc


def evaluate_all(ctx: RunContext, label: str, cache=None) -> list[dict[str, Any]]:
    """Run every [[evaluate]] entry; a failing evaluator is recorded, the others still run."""
    from workbench.engine.offload import dispatched
    from workbench.run.distributed import evaluate as distributed_evaluate, on_leader

    profile, loaded, events = ctx.profile, ctx.loaded, ctx.events
    results = []
    for entry in profile.evaluate:
        evaluator = ctx.registry.evaluators[entry.evaluator]
        who = ctx.registry.describe("evaluator", entry.evaluator)
        key = (loaded.fingerprint, evaluator.name, evaluator.version, entry.options, loaded.device.type,
               profile.model.dtype)
        if cache is not None and evaluator.cacheable:
            hit = on_leader(lambda: cache.get(*key))  # under torchrun: process 0's cache decides for all
            if hit is not None:
                events.log(f"evaluate {label}", f"{evaluator.name}: cached dense result {hit['value']:.4g}")
                results.append({**hit, "cached": True})
                continue
        eval_ctx = EvalContext(device=loaded.device, events=events, cancel=ctx.cancel, seed=profile.calibration.seed,
                               label=label)
        try:
            with dispatched(ctx.offload):  # under offload each layer comes to the device for its forward
                result = distributed_evaluate(evaluator, lambda: evaluator.evaluate(ctx.model, ctx.tokenizer,
                                                                                    entry.options, eval_ctx))
            row = _as_json({"dataset": result.dataset, "metric": result.metric, "value": float(result.value),
                            "details": result.details})
        except (Interrupted, KeyboardInterrupt):
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported by name (even sys.exit), the run goes on
            events.warn(f"evaluate {label}", f"{who} failed: {type(exc).__name__}: {exc}")
            results.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        if cache is not None and evaluator.cacheable:
            on_leader(lambda: cache.put(row, *key))
        results.append(row)
    return results


class EvaluateDense(Stage):
    name = "evaluate dense"
    label = "dense metrics"

    @staticmethod
    def _entries(ctx) -> list[dict[str, Any]]:
        from workbench.storage.durable_files import plain

        return plain([{"evaluator": e.evaluator, "options": e.options} for e in ctx.profile.evaluate])

    def run(self, ctx):
        from workbench.storage.dense_cache import DenseCache

        ctx.dense_results = evaluate_all(ctx, "dense", DenseCache.default())

    def restore(self, ctx, work):
        saved = work.load_stage(self.name)
        if saved is None or saved[0]["evaluate"] != self._entries(ctx):
            return False
        ctx.dense_results = saved[0]["results"]
        ctx.events.log(self.name, "dense metrics taken from the checkpoint")
        return True

    def save(self, ctx, work):
        if any("error" in r for r in ctx.dense_results):
            return  # a failed evaluator is retried by a resumed run, not frozen
        work.save_stage(self.name, {"evaluate": self._entries(ctx), "results": ctx.dense_results}, label=self.label)


class Calibrate(Stage):
    name = "calibrate"
    compress = True

    def message(self, ctx):
        return f"{ctx.profile.calibration.samples} × {ctx.profile.calibration.seq_len} tokens"

    def run(self, ctx):
        from workbench.engine.calibration import resolve_gram_precision
        from workbench.engine.compress import calibrate
        from workbench.sources.text import calibration_windows

        c = ctx.profile.calibration
        ctx.windows = calibration_windows(ctx.tokenizer, c.dataset, c.samples, c.seq_len, c.seed)
        if ctx.work is not None:
            ctx.work.check_windows(ctx.windows)
        ctx.gram_precision = resolve_gram_precision(ctx.profile.compression.gram_precision, ctx.loaded.device)
        from workbench.run.distributed import share_calibration

        windows, walk = share_calibration(ctx, _offload_walk(ctx))  # under torchrun: this process's share
        ctx.calibrated = calibrate(ctx.model, ctx.adapter, ctx.plans, windows, ctx.loaded.device, ctx.events,
                                   ctx.cancel, whitening=ctx.profile.compression.whitening, checkpoint=ctx.work,
                                   gram_precision=ctx.gram_precision, batch_size=c.batch_size, **walk)


def _offload_walk(ctx: RunContext) -> dict[str, Any]:
    """calibrate()'s arguments under offload: layers to the device one at a time, inputs and factors on the host."""
    if ctx.offload is None:
        return {}
    from workbench.engine import offload
    from workbench.engine.walk import GramStatistics

    spill = None
    if ctx.offload.devices.home == "disk" and ctx.work is not None:
        import shutil

        from workbench.storage.checkpoint import SPILL

        if ctx.work.path is not None:
            spill = ctx.work.path / SPILL
            shutil.rmtree(spill, ignore_errors=True)  # an interrupted run's: the checkpoint has them
        else:  # another process of a torchrun job (process 0 holds the work directory)
            spill = _private_folder("spill")
    # under "disk" the factors and, between layers, the calibration inputs wait in `spill`
    walk = {"strategies": offload.strategies(ctx.offload, ctx.plans, GramStatistics(ctx.gram_precision), spill),
            "factors_home": offload.HOST}
    if spill is not None:
        walk["factor_spill"] = offload.FactorSpill(spill)
    return walk


def _private_folder(what: str) -> Path:
    """A folder of this process's own, removed when it exits: where a torchrun job's processes other
    than 0 (which hold no work or staging directory) keep what offload writes (factors, layers)."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix=f"workbench-{what}-")
    atexit.register(shutil.rmtree, folder, True)
    return Path(folder)


class Signals(Stage):
    """The signals the allocator `needs` (registered `Signal` plugins), each with its options."""

    name = "sensitivity"

    compress = True

    def wanted(self, ctx):
        return bool(ctx.needed_signals())

    def message(self, ctx):
        return ", ".join(ctx.needed_signals())

    @staticmethod
    def _options(ctx) -> dict[str, dict[str, Any]]:
        from workbench.engine.sensitivity import signal_options

        return {name: signal_options(ctx.registry.get("signal", name), ctx.profile.signals.get(name))
                for name in ctx.needed_signals()}

    def run(self, ctx):
        from workbench.api import SignalContext
        from workbench.engine.allocation import budget_for
        from workbench.engine.offload import all_resident
        from workbench.engine.sensitivity import compute_signal, put_signals
        from workbench.storage.checkpoint import ProgressStore
        from workbench.storage.durable_files import plain

        ratio = ctx.profile.compression.ratio if ctx.ratio is None else ctx.ratio
        for name, options in self._options(ctx).items():
            if name in ctx.signals:
                continue  # restored from the checkpoint with the same options
            signal_ctx = SignalContext(model=ctx.model, adapter=ctx.adapter, plans=ctx.plans,
                                       factors=ctx.calibrated.factors, windows=ctx.windows, device=ctx.loaded.device,
                                       events=ctx.events, cancel=ctx.cancel, options=options, stage=self.name,
                                       ratio=ratio, budget=budget_for(ctx.calibrated.spectra, ratio),
                                       checkpoint=None if ctx.work is None else ProgressStore(
                                           ctx.work, f"signal-{name}-progress"),
                                       lookup=ctx.registry.get)
            with all_resident(ctx.offload):  # under offload only where that costs nothing (Load refused the rest)
                ctx.signals[name] = compute_signal(ctx.registry.get("signal", name),
                                                   ctx.registry.describe("signal", name), signal_ctx)
            ctx.signal_notes[name] = plain(signal_ctx.notes)
        put_signals(ctx.calibrated.spectra, ctx.signals)

    def restore(self, ctx, work):
        """Signals saved with the same options are reused; the others are computed again (by `run`)."""
        from workbench.engine.sensitivity import put_signals

        saved = work.load_stage(self.name)
        if saved is None:
            return False
        meta, tensors = saved
        for name, options in self._options(ctx).items():
            entry = meta.get(name)
            if entry is not None and entry["options"] == options:
                ctx.signals[name] = {key: tensors[t] for key, t in entry["index"].items()}
                ctx.signal_notes[name] = entry.get("notes", {})  # absent in a checkpoint from before notes
        if set(ctx.signals) != set(self._options(ctx)):
            return False
        put_signals(ctx.calibrated.spectra, ctx.signals)
        ctx.events.log(self.name, "signals taken from the checkpoint")
        return True

    def save(self, ctx, work):
        import torch

        from workbench.storage.durable_files import plain

        meta, tensors = {}, {}
        for name, options in self._options(ctx).items():
            values = ctx.signals[name]
            if not all(isinstance(v, torch.Tensor) for v in values.values()):
                continue  # a signal that is not tensors is recomputed rather than stored
            index = {}
            for key, value in values.items():
                index[key] = f"t{len(tensors)}"
                tensors[index[key]] = value
            meta[name] = {"options": plain(options), "index": index, "notes": ctx.signal_notes.get(name, {})}
        if meta:
            work.save_stage(self.name, meta, tensors, label="sensitivity")


class Allocate(Stage):
    name = "allocate"
    compress = True

    def message(self, ctx):
        return ctx.profile.compression.allocator

    def run(self, ctx):
        from workbench.engine.allocation import budget_for
        from workbench.engine.compress import allocate

        allocator = ctx.allocator
        ctx.budget = budget_for(ctx.calibrated.spectra, ctx.profile.compression.ratio)
        from workbench.run.distributed import on_leader

        ctx.ranks = on_leader(lambda: allocate(allocator, ctx.registry.describe("allocator", allocator.name),
                                               ctx.calibrated.spectra, ctx.budget,
                                               ctx.profile.compression.allocator_options))  # once, in process 0


# Under offload: the compressed decoder layers, one file each, in the staging directory until the end.
OFFLOAD_LAYERS = ".offload-layers"


class Assemble(Stage):
    name = "assemble"
    compress = True

    def run(self, ctx):
        from workbench.engine.compress import assemble
        from workbench.run.resources import count_parameters

        cal = ctx.calibrated
        if Compensate.enabled(ctx.profile):  # the dense targets, before the modules are replaced
            from workbench.engine.compensate import dense_weights

            ctx.dense_weights = dense_weights(ctx.model, ctx.adapter, ctx.plans)
        if ctx.offload is not None:  # layer by layer; each finished layer written to the staging directory
            from workbench.engine.distributed import is_leader
            from workbench.engine.offload import assemble_offloaded

            # under torchrun only process 0 stages the output; the others keep their layers privately
            folder = ctx.output() / OFFLOAD_LAYERS if is_leader() else _private_folder("layers")
            ctx.table = assemble_offloaded(ctx.offload, ctx.model, ctx.adapter, ctx.plans, cal.factors, ctx.ranks,
                                           cal.spectra, folder, ctx.cancel.check)
        else:
            ctx.table = assemble(ctx.model, ctx.adapter, ctx.plans, cal.factors, ctx.ranks, cal.spectra)
        cal.factors = {}
        if ctx.offload is not None and ctx.work is not None and ctx.work.path is not None:  # the spilled factors
            import shutil

            from workbench.storage.checkpoint import SPILL

            shutil.rmtree(ctx.work.path / SPILL, ignore_errors=True)  # what assembly did not use (groups kept dense) is not needed any more
        targeted_dense = sum(s.dense_params for s in cal.spectra)
        targeted_kept = sum(row["params"] for row in ctx.table)
        params_model = count_parameters(ctx.model)
        ctx.params = {
            "ratio_requested": ctx.profile.compression.ratio,
            "ratio_targeted": 1 - targeted_kept / targeted_dense,
            "ratio_model": 1 - params_model / ctx.params_model_dense,
            "targeted_dense": targeted_dense, "targeted_compressed": targeted_kept, "budget": ctx.budget,
            "model_dense": ctx.params_model_dense, "model_compressed": params_model,
        }


class Compensate(Stage):
    """The second walk (workbench/engine/compensate.py): `[compression] sequential` and/or `update`.

    Not checkpointed: a resumed run redoes it (it needs the dense weights, which are not kept)."""

    name = "compensate"
    compress = True

    @staticmethod
    def enabled(profile) -> bool:
        c = profile.compression
        return bool(c.sequential) or c.update != "none"

    def wanted(self, ctx):
        return self.enabled(ctx.profile)

    def message(self, ctx):
        c = ctx.profile.compression
        return f"sequential={str(c.sequential).lower()}, update={c.update}"

    def run(self, ctx):
        from workbench.engine.compensate import compensate

        c = ctx.profile.compression
        section = compensate(ctx.model, ctx.adapter, ctx.plans, ctx.table, ctx.dense_weights, ctx.windows,
                             ctx.loaded.device, ctx.cancel.check, sequential=c.sequential, update=c.update,
                             ridge=c.ridge, holdout=c.holdout, batch_size=ctx.profile.calibration.batch_size,
                             progress=lambda i, last: ctx.events.progress(self.name, i + 1, last + 1,
                                                                          data={"unit": "layer"}))
        ctx.dense_weights = None
        ctx.compensation = section
        changed = sum(bool(s.get("updated") or s.get("refactored")) for s in section["sites"])
        before, after = section["objective_before"], section["objective_after"]
        ctx.events.log(self.name, f"{changed} of {len(section['sites'])} sites changed; calibration objective "
                                  f"{before:.4g} → {after:.4g}")
        for note in section["notes"]:
            ctx.events.log(self.name, note)


class Recover(Stage):
    """`[recovery] method = "lora"`: LoRA on the low-rank factors with peft, merged back (engine/recovery.py).

    Checkpointed inside the training (every `checkpoint_every` steps), so a resumed run goes on from there."""

    name = "recover"
    compress = True

    def wanted(self, ctx):
        return ctx.profile.recovery.method != "none"

    def message(self, ctx):
        r = ctx.profile.recovery
        return f"LoRA rank {r.rank} on {'+'.join(r.targets)}, {r.steps} steps of {r.batch_size} × {r.seq_len} tokens"

    def run(self, ctx):
        from workbench.engine.recovery import recover

        ctx.recovery = recover(ctx.model, ctx.tokenizer, ctx.profile.recovery, ctx.loaded.device, ctx.events,
                               ctx.cancel.check, ctx.work)
        resumed = ctx.recovery["resumed_at_step"]
        if resumed is not None and ctx.work is not None:
            ctx.work.resumed.append(f"recovery training (step {resumed})")
        first, last = ctx.recovery["loss_first"], ctx.recovery["loss_last"]
        if first is not None:
            ctx.events.log(self.name, f"training loss {first:.4f} → {last:.4f}; adapters merged into the factors")
        for note in ctx.recovery["notes"]:
            ctx.events.log(self.name, note)


class Save(Stage):
    name = "save"

    def wanted(self, ctx):
        return ctx.profile.output.save_model

    def message(self, ctx):
        return str(ctx.target)

    def run(self, ctx):
        from workbench.storage.saving import save_compressed

        from workbench.run.distributed import on_leader

        on_leader(lambda: save_compressed(ctx.model, ctx.tokenizer, ctx.output() / "model", ctx.table,
                                          adapter=ctx.adapter, offloaded=ctx.offload))  # process 0 writes


class EvaluateCompressed(Stage):
    name = "evaluate compressed"

    def run(self, ctx):
        ctx.compressed_results = evaluate_all(ctx, "compressed")
        from workbench.engine.distributed import is_leader

        if ctx.offload is not None and is_leader():  # the compressed layers' homes (the output has its own
            import shutil                           # shards; other processes' go at exit)

            shutil.rmtree(ctx.output() / OFFLOAD_LAYERS, ignore_errors=True)


def pair_metrics(profile, dense: list[dict], compressed: list[dict]) -> list[dict[str, Any]]:
    metrics = []
    for entry, d, c in zip(profile.evaluate, dense, compressed):
        row = {"evaluator": entry.evaluator, "dataset": c.get("dataset") or d.get("dataset") or entry.options.get("dataset"),
               "metric": c.get("metric") or d.get("metric"), "dense": d.get("value"), "compressed": c.get("value"),
               "options": entry.options, "details": {"dense": d.get("details"), "compressed": c.get("details")}}
        errors = [f"{label}: {r['error']}" for label, r in (("dense", d), ("compressed", c)) if "error" in r]
        if errors:
            row["error"] = "; ".join(errors)
        metrics.append(row)
    return metrics


class Report(Stage):
    """report.json and report.md; untimed, since it holds every other stage's timing."""

    name = "report"
    timed = False

    def run(self, ctx):
        from workbench.run.distributed import on_leader

        ctx.report = on_leader(lambda: self._write(ctx))  # under torchrun: process 0 writes, all get the report

    def _write(self, ctx):
        from workbench.render.report_md import render_report_md
        from workbench.report import build_report
        from workbench.run.resources import peak_memory

        profile, adapter, model, loaded = ctx.profile, ctx.adapter, ctx.model, ctx.loaded
        timings = {name: round(t, 3) for name, t in ctx.timings.items()}
        timings["compress_s"] = round(compress_seconds(ctx), 3)
        timings["total_s"] = round(time.perf_counter() - ctx.started, 3)
        report = {
            "workbench_version": __version__,
            "profile_name": profile.name,
            "output_dir": str(ctx.target),
            "model": {"source": profile.model.source, "adapter": adapter.name, "heads": adapter.head_layout(model),
                      "group_sizes": {p.matrix_type: len(p.layers) for p in ctx.plans if p.layers[0] == 0},
                      "device": str(loaded.device),
                      "dtype": profile.model.dtype},
            "calibration": {"windows": int(ctx.windows.shape[0]), "seq_len": int(ctx.windows.shape[1]),
                            "tokens": int(ctx.windows.numel()), "gram_precision": ctx.gram_precision},
            "allocator": {"name": ctx.allocator.name, "options": profile.compression.allocator_options,
                          "notes": ctx.ranks.notes},
            "signals": {name: {"options": options, "notes": ctx.signal_notes.get(name, {})}
                        for name, options in Signals._options(ctx).items()} or None,
            "params": ctx.params,
            "ranks": [{k: v for k, v in row.items() if k != "modules"} for row in ctx.table],
            "whitening": ctx.calibrated.whitening,
            "metrics": pair_metrics(profile, ctx.dense_results, ctx.compressed_results),
            "timings": timings,
            "peak_memory": peak_memory(loaded.device),
            "profile": profile.to_dict(),
        }
        if ctx.compensation is not None:
            report["compensation"] = {**ctx.compensation, "time_s": timings.get(Compensate.name)}
        if ctx.recovery is not None:
            report["recovery"] = {**ctx.recovery, "time_s": timings.get(Recover.name)}
        if ctx.work is not None and ctx.work.resumed:  # timings then cover only this run's part
            report["resumed_from_checkpoint"] = ctx.work.resumed
        from workbench.engine.distributed import current as job

        if job() is not None:  # a torchrun job: the processes that shared the calibration windows
            report["calibration"]["processes"] = job().world
        report = build_report(**report).to_dict()  # report.json's schema (workbench/report.py), `format` first
        out = ctx.output()
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (out / "report.md").write_text(render_report_md(report))
        return report


def default_stages() -> list[Stage]:
    """A run, in order. rank_map (`workbench inspect`) runs the first ones it needs of the same objects."""
    return [Load(), EvaluateDense(), Calibrate(), Signals(), Allocate(), Assemble(), Compensate(), Recover(), Save(), EvaluateCompressed(),
            Report()]
