"""A sweep: one load, dense evaluation, calibration and signal pass, then one cell per combination.

`run_sweep` is `workbench.run.pipeline.run` with other stages: the shared ones of a run (load →
dense metrics → calibrate → signals, the union of what the sweep's allocators need), then one
`SweepCells` stage. For each cell (workbench/profile/sweep.py) it runs the rest of a run's stages
(allocate → assemble → compensate → save → evaluate compressed, and whatever `default_stages()`
adds later) on a context that shares the calibrated factors, the signals and the dense metrics,
writes the cell's report.json/report.md (the same as a run's, so `load_compressed`, `inspect`,
`export` work on it) into `<output>/<cell>/`, and puts the dense modules back before the next cell.

Output: the whole sweep is staged in the work directory and published at the end, as a run is. A
finished cell is renamed into the staging directory whole and then committed to the checkpoint
(with the staging directory it lives in), so an interrupted sweep resumes at the next unfinished
cell with the calibration and signals restored, and never redoes a finished one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from workbench import __version__
from workbench.errors import Interrupted, RunFailed
from workbench.profile.sweep import SweepCell, cell_profile
from workbench.run.stages import Load, Report, RunContext, Signals, Stage, default_stages, run_stages
from workbench.storage.outputs import MARKER, StagedOutput, check_target, record_entries

STAGE = "sweep"
FORMAT = 1


class SweepStaging(StagedOutput):
    """The sweep's staging directory: once the checkpoint names it (a cell is finished) it is kept for
    `--resume` instead of discarded; the work directory removes it when nothing refers to it any more."""

    kept = False

    @classmethod
    def reopen(cls, target: Path, force: bool, path: Path) -> "SweepStaging":
        """The staging directory an interrupted sweep left in its work directory."""
        check_target(Path(target), force)
        staged = cls.__new__(cls)
        staged.target, staged.force, staged.path, staged.kept = Path(target), force, Path(path), True
        return staged

    def discard(self) -> None:
        if not self.kept:
            super().discard()


class SweepLoad(Load):
    """A run's load, plus: every swept ratio reachable, and the signals of every swept allocator."""

    def run(self, ctx):
        from workbench.errors import UsageError
        from workbench.profile.fit import check_ratio

        sweep = ctx.profile.sweep
        ctx.signal_names = sweep.needed_signals(ctx.registry)  # before the preflight, which counts them
        super().run(ctx)
        if getattr(ctx, "offload", None) is not None:
            raise UsageError("a [sweep] puts the dense layers back between cells, which [model] offload does not "
                             "support yet; set model.offload = \"none\", or run the cells as separate runs")
        for i, ratio in enumerate(sweep.ratios):
            check_ratio(ctx.plans, ratio, f"sweep.ratio[{i}]")
        if len(sweep.ratios) == 1:  # a signal trained toward the target (validation allows one ratio) gets it
            ctx.ratio = sweep.ratios[0]


def _cell_stages() -> tuple[list[Stage], list[Stage]]:
    """default_stages() split: the shared ones (up to the signals) and those each cell runs (before the report)."""
    stages = default_stages()
    split = next(i for i, s in enumerate(stages) if isinstance(s, Signals)) + 1
    shared = [SweepLoad() if type(s) is Load else s for s in stages[:split]]
    return shared, [s for s in stages[split:] if not isinstance(s, Report)]


def sweep_stages() -> list[Stage]:
    shared, per_cell = _cell_stages()
    return [*shared, SweepCells(shared, per_cell)]


def _folder_write(path: Path, profile) -> None:
    path.mkdir()
    (path / MARKER).write_text(json.dumps({"workbench": __version__, "kind": "output"}) + "\n")
    (path / "profile.toml").write_text(profile.to_toml())


class _CellFolder:
    """What a cell's RunContext writes into (its `staged`): a folder inside the sweep's staging directory."""

    def __init__(self, path: Path):
        self.path = path


class SweepCells(Stage):
    name = STAGE

    def __init__(self, shared: list[Stage], per_cell: list[Stage]):
        self.shared, self.per_cell = shared, per_cell

    def message(self, ctx):
        return f"{len(ctx.profile.sweep.cells())} cells"

    # -- the checkpoint's record of finished cells ---------------------------------------------

    @staticmethod
    def _record(ctx, cell: SweepCell) -> dict[str, Any]:
        """What a finished cell must match to be reused: its resolved profile, the output's place aside."""
        from workbench.storage.durable_files import plain

        data = cell_profile(ctx.profile, cell, ctx.target).to_dict()
        return plain({**{k: v for k, v in data.items() if k not in ("name", "description", "output")},
                      "save_model": ctx.profile.output.save_model})

    def _staging(self, ctx) -> tuple[SweepStaging, dict[str, Any]]:
        """The staging directory (reopened from the checkpoint when it holds finished cells) and those cells."""
        saved = ctx.work.load_stage(self.name) if ctx.work is not None else None
        if saved is not None:
            meta = saved[0]
            path = ctx.work.path / meta["staging"]
            if path.is_dir():
                staged = SweepStaging.reopen(ctx.target, ctx.force, path)
                (path / "profile.toml").write_text(ctx.profile.to_toml())
                return staged, dict(meta["cells"])
        staged = SweepStaging(ctx.target, ctx.force, root=ctx.work.staging_root() if ctx.work else None)
        (staged.path / "profile.toml").write_text(ctx.profile.to_toml())
        return staged, {}

    def _commit(self, ctx, done: dict[str, Any], total: int) -> None:
        if ctx.work is None:
            return
        ctx.work.save_stage(self.name, {"staging": ctx.staged.path.name, "cells": done},
                            label=f"{len(done)} of {total} sweep cells", folder=ctx.staged.path)
        ctx.staged.kept = True

    # -- the cells -------------------------------------------------------------------------------

    def run(self, ctx):
        cells = ctx.profile.sweep.cells()
        ctx.staged, saved = self._staging(ctx)
        root = ctx.staged.path
        wanted = {cell.name: self._record(ctx, cell) for cell in cells}
        done = {name: entry for name, entry in saved.items()
                if name in wanted and entry.get("record") == wanted[name] and (root / name).is_dir()}
        for entry in root.iterdir():  # a cell no longer in the sweep, or one a killed run left half-written
            if entry.is_dir() and entry.name not in done:
                shutil.rmtree(entry, ignore_errors=True)
        if len(done) != len(saved):
            self._commit(ctx, done, len(cells))
        if done:
            ctx.events.log(self.name, f"{len(done)} of {len(cells)} cells taken from the checkpoint")
            ctx.work.resumed.append(f"{len(done)} of {len(cells)} sweep cells")
        shared_timings = {k: v for k, v in ctx.timings.items()}
        rows, failed = [], []
        for index, cell in enumerate(cells, 1):
            if cell.name in done:
                rows.append({**done[cell.name]["row"], "resumed": True})
            else:
                row = self._run_cell(ctx, cell, shared_timings, root)
                rows.append(row)
                if "error" in row:
                    failed.append(cell.name)
                else:
                    done[cell.name] = {"record": wanted[cell.name], "row": row}
                    self._commit(ctx, done, len(cells))
            ctx.events.progress(self.name, index, len(cells), cell.name, data={"unit": "cell"})
            ctx.cancel.check()
        summary = sweep_summary(ctx, rows, shared_timings)
        (root / "sweep.json").write_text(json.dumps(summary, indent=2, default=str))
        from workbench.render.sweep_table import render_sweep_md

        (root / "sweep.md").write_text(render_sweep_md(summary))
        record_entries(root, "sweep")  # so that --force may replace this output later
        ctx.report = summary

    def _run_cell(self, ctx, cell: SweepCell, shared_timings: dict[str, float], root: Path) -> dict[str, Any]:
        start = time.perf_counter()
        profile = cell_profile(ctx.profile, cell, ctx.target)
        partial = root / f".{cell.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        _folder_write(partial, profile)
        c = RunContext(profile, ctx.registry, ctx.events, ctx.cancel, target=Path(ctx.target) / cell.name)
        for name in ("loaded", "model", "tokenizer", "adapter", "plans", "params_model_dense", "dense_results",
                     "windows", "gram_precision", "signal_names", "signals", "signal_notes", "offload"):
            if hasattr(ctx, name):
                setattr(c, name, getattr(ctx, name))
        # Assembly consumes the factors it uses, and the spectra carry the signals: each cell its own copies.
        c.calibrated = dataclasses.replace(ctx.calibrated, factors=dict(ctx.calibrated.factors),
                                           spectra=copy.deepcopy(ctx.calibrated.spectra))
        c.staged = _CellFolder(partial)
        c.timings = dict(shared_timings)
        shared_s = sum(shared_timings.values())
        c.started = start - shared_s  # total_s in its report: as if run alone with the shared stages
        ctx.events.log(self.name, f"cell {cell.name}")
        dense = _dense_modules(ctx)
        try:
            run_stages(c, self.per_cell)
            c.stages = [*self.shared, *self.per_cell]  # compress_s counts the shared calibration too
            Report().run(c)
        except (Interrupted, KeyboardInterrupt):
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except Exception as exc:  # noqa: BLE001 - one failed cell does not stop the others
            shutil.rmtree(partial, ignore_errors=True)
            ctx.events.warn(self.name, f"cell {cell.name} failed: {exc}")
            return {"cell": cell.name, **cell.spec(), "error": f"{type(exc).__name__}: {exc}",
                    "time_s": round(time.perf_counter() - start, 3)}
        finally:
            _restore(ctx, dense)
        own = {k: round(v, 3) for k, v in c.timings.items() if k not in shared_timings}
        report = {**c.report, "sweep": {"output": str(ctx.target), "cell": cell.name,
                                        "shared_stages": sorted(shared_timings)}}
        (partial / "report.json").write_text(json.dumps(report, indent=2, default=str))
        os.replace(partial, root / cell.name)
        return _row(cell, report, own, round(time.perf_counter() - start, 3))


def _dense_modules(ctx) -> dict[tuple[int, str], Any]:
    layers = ctx.adapter.decoder_layers(ctx.model)
    return {(i, p.site.path): layers[i].get_submodule(p.site.path) for p in ctx.plans for i in p.layers}


def _restore(ctx, dense: dict[tuple[int, str], Any]) -> None:
    """Put every original (dense) module back: the next cell starts from the dense model."""
    layers = ctx.adapter.decoder_layers(ctx.model)
    for (i, path), module in dense.items():
        if layers[i].get_submodule(path) is not module:
            ctx.adapter.replace_module(layers[i], path, module)


def _row(cell: SweepCell, report: dict[str, Any], timings: dict[str, float], seconds: float) -> dict[str, Any]:
    params = report.get("params", {})
    metrics = [{k: m.get(k) for k in ("evaluator", "dataset", "metric", "dense", "compressed", "error")
                if m.get(k) is not None} for m in report.get("metrics", [])]
    row = {"cell": cell.name, **cell.spec(), "ratio_targeted": params.get("ratio_targeted"),
           "ratio_model": params.get("ratio_model"), "params_targeted": params.get("targeted_compressed"),
           "params_model": params.get("model_compressed"), "metrics": metrics, "time_s": seconds,
           "timings": timings}
    compensation = report.get("compensation")
    if compensation:
        row["compensation"] = {k: compensation.get(k) for k in ("objective_before", "objective_after")}
    return row


def sweep_summary(ctx, rows: list[dict[str, Any]], shared_timings: dict[str, float]) -> dict[str, Any]:
    """sweep.json: the shared stages once, then one row per cell (metrics dense and compressed, ratios, times)."""
    from workbench.run.stages import pair_metrics

    dense = pair_metrics(ctx.profile, ctx.dense_results, [{} for _ in ctx.dense_results])
    shared_s = sum(shared_timings.values())
    cells_s = sum(r.get("time_s", 0.0) for r in rows if not r.get("resumed"))
    summary = {
        "format": FORMAT,
        "kind": "sweep",
        "workbench_version": __version__,
        "profile_name": ctx.profile.name,
        "output_dir": str(ctx.target),
        "model": {"source": ctx.profile.model.source, "adapter": ctx.adapter.name, "device": str(ctx.loaded.device),
                  "dtype": ctx.profile.model.dtype},
        "calibration": {"windows": int(ctx.windows.shape[0]), "seq_len": int(ctx.windows.shape[1]),
                        "tokens": int(ctx.windows.numel()), "gram_precision": ctx.gram_precision},
        "params": {"targeted_dense": sum(s.dense_params for s in ctx.calibrated.spectra),
                   "model_dense": ctx.params_model_dense},
        "signals": list(ctx.signal_names or ()),
        "sweep": ctx.profile.sweep.to_dict(),
        "dense": [{k: m[k] for k in ("evaluator", "dataset", "metric", "dense") if m.get(k) is not None}
                  for m in dense],
        "cells": rows,
        "failed": [r["cell"] for r in rows if "error" in r or any("error" in m for m in r.get("metrics", []))],
        "timings": {"shared": {k: round(v, 3) for k, v in shared_timings.items()}, "shared_s": round(shared_s, 3),
                    "cells_s": round(cells_s, 3), "total_s": round(time.perf_counter() - ctx.started, 3)},
    }
    if ctx.work is not None and ctx.work.resumed:
        summary["resumed_from_checkpoint"] = list(ctx.work.resumed)
    return summary


def run_sweep(profile, **kwargs) -> dict[str, Any]:
    """Run every cell of `profile.sweep` on one calibration (module docstring); returns sweep.json's content.

    Takes `workbench.run.pipeline.run`'s keyword arguments (not `stages`). A cell that fails is
    recorded and the others still run; the sweep is then published and RunFailed names the failures.
    """
    from workbench.errors import UsageError
    from workbench.run.pipeline import run

    from workbench.engine.distributed import current as torchrun_processes

    if torchrun_processes() is not None:  # every process would write the cells' folders
        raise UsageError("a [sweep] runs in one process; torchrun is not supported for sweeps yet: run it with "
                         "`workbench run`, or run each cell's profile under torchrun")
    summary = run(profile, stages=sweep_stages(), **kwargs)
    if summary.get("failed"):
        raise RunFailed(f"sweep cell(s) {', '.join(summary['failed'])} failed, or one of their evaluators did (see "
                        f"sweep.md); the sweep was saved in {summary['output_dir']}")
    return summary


def load_sweep(path: Path) -> dict[str, Any]:
    """sweep.json of a sweep output; a missing or unreadable one is a UsageError naming it."""
    from workbench.errors import UsageError

    file = Path(path) / "sweep.json"
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is not a sweep output (no sweep.json); give the folder a sweep wrote") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{file} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    if not isinstance(data, dict) or data.get("kind") != "sweep" or not isinstance(data.get("cells"), list):
        raise UsageError(f"{file} is not a workbench sweep.json")
    return data
