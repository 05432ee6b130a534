"""One run of a profile: load → dense metrics → calibrate/factor → allocate → swap → save → evaluate.

The output appears all at once: everything is written into a staging directory beside the target
and renamed into place at the end. The compressed model is saved before the compressed model is
evaluated, so a failing evaluator never costs the compression.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from workbench import __version__
from workbench.engine.allocation import budget_for
from workbench.storage.checkpoint import WorkDir
from workbench.storage.dense_cache import DenseCache
from workbench.engine.compress import allocate, assemble, calibrate
from workbench.errors import Interrupted, RunFailed, WorkbenchError
from workbench.events import CancelToken, EventBus
from workbench.engine.grouping import plan_groups
from workbench.storage.outputs import StagedOutput, check_target
from workbench.api import EvalContext
from workbench.run.preflight import check as preflight_check, estimate, shapes_of
from workbench.render.report_md import render_report_md
from workbench.run.resources import count_parameters, current_memory, peak_memory
from workbench.engine.sensitivity import attach_signals, put_signals, signal_window_count


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, events: EventBus, message: str = ""):
        start = time.perf_counter()
        events.emit("stage_start", name, message)
        try:
            yield
        except (WorkbenchError, KeyboardInterrupt):
            raise
        except Exception as exc:  # an unexpected error: say where, keep the traceback for --debug
            raise RunFailed(f"stage '{name}' failed: {type(exc).__name__}: {exc}") from exc
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start
        events.emit("stage_end", name, f"{self.timings[name]:.1f} s")


def _evaluate_all(profile, registry, model, tokenizer, loaded, label: str, events: EventBus, cancel: CancelToken,
                  cache: DenseCache | None) -> list[dict[str, Any]]:
    """Run every [[evaluate]] entry; a failing evaluator is recorded, the others still run."""
    results = []
    for entry in profile.evaluate:
        evaluator = registry.evaluators[entry.evaluator]
        who = registry.describe("evaluator", entry.evaluator)
        key = (loaded.fingerprint, evaluator.name, evaluator.version, entry.options, loaded.device.type,
               profile.model.dtype)
        if cache is not None and evaluator.cacheable:
            hit = cache.get(*key)
            if hit is not None:
                events.log(f"evaluate {label}", f"{evaluator.name}: cached dense result {hit['value']:.4g}")
                results.append({**hit, "cached": True})
                continue
        ctx = EvalContext(device=loaded.device, events=events, cancel=cancel, seed=profile.calibration.seed, label=label)
        try:
            result = evaluator.evaluate(model, tokenizer, entry.options, ctx)
            row = {"dataset": result.dataset, "metric": result.metric, "value": float(result.value),
                   "details": result.details}
        except (Interrupted, KeyboardInterrupt):
            raise
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - reported by name (even sys.exit), the run goes on
            events.warn(f"evaluate {label}", f"{who} failed: {type(exc).__name__}: {exc}")
            results.append({"error": f"{type(exc).__name__}: {exc}"})
            continue
        if cache is not None and evaluator.cacheable:
            cache.put(row, *key)
        results.append(row)
    return results


def _pair_metrics(profile, dense: list[dict], compressed: list[dict]) -> list[dict[str, Any]]:
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


def run(profile, *, output_dir: str | Path | None = None, force: bool = False, events: EventBus | None = None,
        cancel: CancelToken | None = None, registry=None, resume: bool | str = False,
        preflight: bool = True) -> dict[str, Any]:
    """Run `profile` end to end and return the report (also written as report.json).

    Progress is checkpointed in `<output>.work/` (workbench/storage/checkpoint.py), kept when the run is
    interrupted or fails and removed once the output is published. `resume`: False refuses an
    existing checkpoint unless `force` (which starts over); True continues it; "auto" (the app)
    continues it when it belongs to this profile and model, else starts over. `preflight` checks
    disk and memory before the long work (workbench/run/preflight.py).
    """
    target = Path(output_dir if output_dir is not None else profile.output.dir)
    check_target(target, force)  # before the work directory is made beside it
    work = WorkDir.acquire(target)
    try:
        report = _run(profile, work, target, force=force, events=events, cancel=cancel, registry=registry,
                      resume=resume, preflight=preflight)
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
         registry, resume: bool | str, preflight: bool) -> dict[str, Any]:
    from workbench.sources.text import calibration_windows
    from workbench.sources.models import load_model
    from workbench.registry import get_registry

    registry = registry or get_registry()
    events = events or EventBus()
    cancel = cancel or CancelToken()
    allocator = registry.get("allocator", profile.compression.allocator)
    work.prepare(profile, resume, force, events)
    timer = _Timer()
    started = time.perf_counter()

    with timer.stage("load", events, profile.model.source):
        loaded = load_model(profile.model.source, profile.model.dtype, profile.model.device, events=events)
        model, tokenizer = loaded.model, loaded.tokenizer
        events._memory = lambda: current_memory(loaded.device)  # noqa: SLF001 - reading follows the device
        adapter = registry.adapter_for(model)
        plans = plan_groups(model, adapter, profile.compression.targets, profile.compression.ignore,
                            profile.compression.group_size)
        params_model_dense = count_parameters(model)
        work.check_model(loaded.fingerprint, loaded.device.type)
        if preflight:
            needs = estimate(shapes_of(model, plans, profile, params_model_dense))
            events.log("load", preflight_check(needs, target, loaded.device, profile.output.save_model,
                                               already_on_disk=work.disk_usage()))
    cancel.check()

    cache = DenseCache.default()
    with timer.stage("evaluate dense", events):
        dense_results = work.dense_results(profile.evaluate)
        if dense_results is None:
            dense_results = _evaluate_all(profile, registry, model, tokenizer, loaded, "dense", events, cancel, cache)
            work.save_dense(profile.evaluate, dense_results)
        else:
            events.log("evaluate dense", "dense metrics taken from the checkpoint")
    cancel.check()

    with timer.stage("calibrate", events, f"{profile.calibration.samples} × {profile.calibration.seq_len} tokens"):
        windows = calibration_windows(tokenizer, profile.calibration.dataset, profile.calibration.samples,
                                      profile.calibration.seq_len, profile.calibration.seed)
        work.check_windows(windows)
        calibrated = calibrate(model, adapter, plans, windows, loaded.device, events, cancel,
                               whitening=profile.compression.whitening, checkpoint=work)
    cancel.check()

    if allocator.needs:
        with timer.stage("sensitivity", events, ", ".join(allocator.needs)):
            saved_signals = work.signals(allocator.needs)
            if saved_signals is None:
                signal_windows = signal_window_count(profile.compression.allocator_options, windows.shape[0])
                attach_signals(allocator.needs, calibrated.spectra, model, adapter, plans, calibrated.factors,
                               windows[:signal_windows], loaded.device, events, cancel)
                work.save_signals(allocator.needs, calibrated.spectra)
            else:
                put_signals(calibrated.spectra, saved_signals)
                events.log("sensitivity", "signals taken from the checkpoint")
        cancel.check()

    with timer.stage("allocate", events, profile.compression.allocator):
        budget = budget_for(calibrated.spectra, profile.compression.ratio)
        ranks = allocate(allocator, registry.describe("allocator", allocator.name), calibrated.spectra, budget,
                         profile.compression.allocator_options)
    with timer.stage("assemble", events):
        table = assemble(model, adapter, plans, calibrated.factors, ranks, calibrated.spectra)
    del calibrated.factors
    cancel.check()

    targeted_dense = sum(s.dense_params for s in calibrated.spectra)
    targeted_kept = sum(row["params"] for row in table)
    params_model = count_parameters(model)
    params = {
        "ratio_requested": profile.compression.ratio,
        "ratio_targeted": 1 - targeted_kept / targeted_dense,
        "ratio_model": 1 - params_model / params_model_dense,
        "targeted_dense": targeted_dense, "targeted_compressed": targeted_kept, "budget": budget,
        "model_dense": params_model_dense, "model_compressed": params_model,
    }

    staged = StagedOutput(target, force, root=work.staging_root())
    try:
        (staged.path / "profile.toml").write_text(profile.to_toml())
        if profile.output.save_model:
            with timer.stage("save", events, str(target)):
                from workbench.storage.saving import save_compressed

                save_compressed(model, tokenizer, staged.path / "model", table, adapter=adapter)
        with timer.stage("evaluate compressed", events):
            compressed_results = _evaluate_all(profile, registry, model, tokenizer, loaded, "compressed", events,
                                               cancel, None)
        timings = {name: round(t, 3) for name, t in timer.timings.items()}
        timings["compress_s"] = round(sum(timer.timings.get(s, 0.0)
                                          for s in ("calibrate", "sensitivity", "allocate", "assemble")), 3)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        report = {
            "workbench_version": __version__,
            "profile_name": profile.name,
            "output_dir": str(target),
            "model": {"source": profile.model.source, "adapter": adapter.name, "heads": adapter.head_layout(model),
                      "group_sizes": {p.matrix_type: len(p.layers) for p in plans if p.layers[0] == 0},
                      "device": str(loaded.device),
                      "dtype": profile.model.dtype},
            "calibration": {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
                            "tokens": int(windows.numel())},
            "allocator": {"name": allocator.name, "options": profile.compression.allocator_options,
                          "notes": ranks.notes},
            "params": params,
            "ranks": [{k: v for k, v in row.items() if k != "modules"} for row in table],
            "whitening": calibrated.whitening,
            "metrics": _pair_metrics(profile, dense_results, compressed_results),
            "timings": timings,
            "peak_memory": peak_memory(loaded.device),
            "profile": profile.to_dict(),
        }
        if work.resumed:  # what an interrupted run had done; timings then cover only this run's part
            report["resumed_from_checkpoint"] = work.resumed
        (staged.path / "report.json").write_text(json.dumps(report, indent=2, default=str))
        (staged.path / "report.md").write_text(render_report_md(report))
        cancel.check()
        staged.publish()
        work.finish()
    except BaseException:
        staged.discard()  # interrupted or failed before publishing: leave the target as it was
        raise
    failed = [m["evaluator"] for m in report["metrics"] if "error" in m]
    if failed:
        raise RunFailed(f"evaluator(s) {', '.join(failed)} failed; the compressed model and report were saved in {target}",
                        ) from None
    return report


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
