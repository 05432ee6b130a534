"""Checkpoints of a run in progress, so that an interrupted run resumes where it stopped.

Where: a work directory beside the output, `<output dir>.work/` (`runs/quickstart.work/` for
`runs/quickstart`), never inside the output, which appears only when complete. The run's staging
directory lives in it too, so a killed run leaves nothing beside the output but this one folder.
A finished run removes it.

What, each once it is done, and each what the next stage needs to go on bit for bit:
- calibration after a decoder layer (`CalibrationState`, kept through the layer walk's after-layer
  callback): the next layer's inputs (hidden states), the per-layer Grams a pending group still
  needs, and every finished group's factors (each written once);
- any stage's result through the generic `save_stage(name, meta, tensors)` / `load_stage(name)`:
  the run's stages (workbench/run/stages.py) keep the dense metrics and the signals this way, and
  a new stage needs nothing here.
Allocation, assembly and saving take seconds and are redone from these, so a run interrupted
while the compressed model is evaluated loses only that evaluation.

How: each file is written under a temporary name, flushed and renamed into place; `state.json`,
written the same way last, is the commit point. It names the files that make up the checkpoint;
other files this module writes (an older layer's inputs, the temp file of a killed write) are
deleted. A run killed at any instant, SIGKILL included, leaves the previous complete checkpoint.

Ownership: the folder is made with a marker file, `.workbench-work`, in it. An existing folder
without one (nor, from older versions, a workbench `state.json` or a lone `lock`) is refused, not
used: it was not made by workbench. Even in its own folder workbench deletes only the names it
writes (`_ours`); anything else is left, with a warning, and keeps the folder from being removed.

Identity: `state.json` records the profile fields that change what is computed, the workbench
version, the model's fingerprint and device type and a hash of the calibration windows. A
checkpoint that differs in any of them is refused, naming the difference (or, for the app's
`resume="auto"`, discarded).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from workbench import __version__
from workbench.engine.state import CalibrationState
from workbench.environment import env_number_or_default
from workbench.errors import UsageError
from workbench.storage.durable_files import (flatten, fsync_dir, load_meta, load_tensors, plain, save_tensors, unflatten,
                                     write_atomically)
from workbench.events import EventBus

try:  # advisory lock: two runs writing one work directory would corrupt each other's checkpoint
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None

# 2: classes moved into sub-packages (workbench.engine.factorize, ...); a format-1 checkpoint names
# modules that no longer exist, so it is refused with what to do rather than migrated.
# 3: stage results under "stages" (dense metrics, signals with their options) instead of "dense"
# and "signals"; an older checkpoint is refused the same way.
FORMAT = 3
STATE = "state.json"
LOCK = "lock"
MARKER = ".workbench-work"  # written first into a work directory workbench makes: it is ours
# Under offload "disk", the factors kept for allocation (workbench/engine/offload.py, FactorSpill)
# and, between layers, the calibration inputs (HostInputs) wait here: not part of the checkpoint,
# kept across commits, removed with the work directory.
SPILL = "offload-factors"
# The names this module writes (besides STATE, LOCK, MARKER): nothing else is ever deleted.
_CHECKPOINT_FILE = re.compile(r"(?:(?:factors|gram|stage)-[A-Za-z0-9_.-]*-[0-9a-f]{8}|hidden-\d+|signals)\.safetensors")
_TEMP_FILE = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp")  # durable_files.write_atomically's temp names
# A calibration checkpoint is written only once the work since the last one took at least this many
# times as long as writing that one did, and at least this many seconds: checkpoints then cost at most
# ~1/COMMIT_SPACING of the time, and an interrupted run loses at most ~COMMIT_SPACING seconds and a
# layer. A layer that computes for longer than that is checkpointed after every layer (a 7B model on
# a CPU, or on a GPU with a few hundred windows); where layers take less (the embedded model) or
# compute faster than their inputs can be written (a 7B model on a fast GPU with few windows), every
# few layers. WORKBENCH_CHECKPOINT_SPACING=0 checkpoints after every layer whatever it costs.
COMMIT_SPACING = env_number_or_default("WORKBENCH_CHECKPOINT_SPACING")  # a bad value: refused by check_environment


def work_dir_for(target: Path) -> Path:
    """`runs/x` → `runs/x.work`: beside the output, on the same file system, so staging can rename."""
    target = Path(target)
    if target.name in ("", ".."):  # "." or ".."
        target = Path(os.path.abspath(target))
    return target.with_name(target.name + ".work")


def result_fields(profile) -> dict[str, Any]:
    """The profile's fields that change what a run computes, as dotted keys, plus the version.

    Evaluation and output settings are left out: they do not change the compression (dense metrics
    are reused only for the same `[[evaluate]]` tables). The device is compared once resolved;
    the offload mode changes where weights wait, not the numbers, so a run resumes under another.
    """
    fields: dict[str, Any] = {"workbench version": __version__}
    for section in ("model", "calibration", "compression"):
        for key, value in dataclasses.asdict(getattr(profile, section)).items():
            if (section, key) not in (("model", "device"), ("model", "offload")):  # where, not what
                fields[f"{section}.{key}"] = value
    if profile.compression.gram_precision == "auto":
        from workbench.engine.calibration import AUTO_RULE

        fields["compression.gram_precision auto rule"] = AUTO_RULE
    from workbench.engine.distributed import current

    if current() is not None:  # a torchrun job: the shares of the windows, and the sums' rounding, depend on it
        fields["processes (torchrun)"] = current().world
    return plain(fields)


def windows_hash(windows: torch.Tensor) -> str:
    """Identifies the calibration token windows: catches a dataset file edited between runs."""
    data = windows.detach().cpu().contiguous()
    return hashlib.sha256(repr(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()[:32]


def _differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{key}: {saved.get(key)!r} in the checkpoint, {current.get(key)!r} now"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]


def _file_name(kind: str, key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
    return f"{kind}-{slug}-{hashlib.sha256(key.encode()).hexdigest()[:8]}.safetensors"


# ---------------------------------------------------------------------------------- the work directory


class WorkDir:
    """The work directory of one output: locked while a run uses it, committed through `state.json`."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.state: dict[str, Any] = {}  # what state.json on disk says; empty: nothing committed
        self.resumed: list[str] = []  # what this run took from the checkpoint, for the report
        self.finished = False
        self._lock_fd: int | None = None
        self._mode: bool | str = False
        self._events = EventBus()
        self._identity: dict[str, Any] = {}
        self._model: dict[str, Any] = {}
        self._windows: str | None = None
        self._since_commit = time.monotonic()
        self._commit_cost = 0.0

    # -- lifetime ----------------------------------------------------------------------------

    @classmethod
    def acquire(cls, target: Path) -> "WorkDir":
        """Make (or open) the work directory of `target` and lock it for this run.

        An existing folder that workbench did not make is refused (UsageError), never used: using it
        would mean deleting files in it.
        """
        work = cls(work_dir_for(target))
        try:
            work.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                work.path.mkdir()
            except FileExistsError:
                work._check_ours()
            if not (work.path / MARKER).is_file():
                marker = json.dumps({"workbench": __version__, "kind": "work directory", "output": Path(target).name})
                write_atomically(work.path / MARKER, lambda tmp: Path(tmp).write_text(marker))
            fd = os.open(work.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UsageError(f"cannot write the work directory {work.path} beside the output "
                             f"({exc.strerror or exc}); choose a writable [output] dir") from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise UsageError(f"another run is using {work.path} (it writes the same output directory); "
                                 "wait for it to finish or set another [output] dir") from None
        work._lock_fd = fd
        return work

    def close(self) -> Path | None:
        """Unlock. Keeps a committed checkpoint (returns its path); removes a directory with none."""
        kept = None
        if not self.finished:
            if not (self.path / STATE).exists():
                self._remove_ours()
            else:
                kept = self.path
                if self.state:  # ours: tidy it (e.g. the staging directory); a refused one is left alone
                    self._remove_unreferenced()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return kept

    def finish(self) -> None:
        """The output is published: the checkpoint has served its purpose."""
        self.finished = True
        self._remove_ours()

    # -- what is ours ------------------------------------------------------------------------

    def _ours(self, entry: Path) -> bool:
        """Whether `entry` (in the work directory) has a name workbench writes there: the only
        entries it ever deletes. Anything else is a user's, whatever the folder."""
        name = entry.name
        if entry.is_symlink():
            return False
        if entry.is_dir() and name == SPILL:
            return True
        if entry.is_dir():  # the run's staging directory (outputs.StagedOutput, made with mkdtemp)
            target = self.path.name[:-len(".work")] if self.path.name.endswith(".work") else ""
            return re.fullmatch(rf"\.{re.escape(target) if target else '.+'}\.partial-[A-Za-z0-9_]+", name) is not None
        if name in (STATE, LOCK, MARKER) or _CHECKPOINT_FILE.fullmatch(name):
            return True
        temp = _TEMP_FILE.fullmatch(name)
        if temp is None:
            return False
        return temp["name"] in (STATE, MARKER) or _CHECKPOINT_FILE.fullmatch(temp["name"]) is not None

    def _check_ours(self) -> None:
        """Refuse an existing `<output>.work` that workbench did not make."""
        if not self.path.is_dir():
            raise UsageError(f"{self.path} is in the way of the run's work directory (it is not a folder); "
                             "move it away or choose another [output] dir")
        if (self.path / MARKER).is_file():
            return
        entries = sorted(self.path.iterdir())
        if not entries:
            return  # empty: nothing in it to lose
        names = {e.name for e in entries}
        if STATE in names and self._legacy_state():
            return  # made by an older workbench, before the marker
        if LOCK in names and all(self._ours(e) for e in entries):
            return  # ditto, killed before its first checkpoint
        foreign = [e.name for e in entries if not self._ours(e)] or [e.name for e in entries]
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(f"{self.path} already exists and was not made by workbench (it holds {shown}); workbench "
                         f"keeps its checkpoints in that folder and would delete files there. Move the folder away, "
                         f"or choose another [output] dir")

    def _legacy_state(self) -> bool:
        try:
            saved = json.loads((self.path / STATE).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(saved, dict) and "format" in saved and "workbench" in saved and "profile" in saved

    def _delete(self, entry: Path) -> None:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()

    def _remove_ours(self) -> None:
        """Delete what workbench wrote here, then the folder if that leaves it empty; warn about the rest."""
        with contextlib.suppress(FileNotFoundError):
            left = []
            for entry in self.path.iterdir():
                if entry.name in (LOCK, MARKER):
                    continue  # last: they say the folder is ours while anything else is in it
                if self._ours(entry):
                    self._delete(entry)
                else:
                    left.append(entry.name)
            if left:
                self._events.warn("save", f"{self.path} is kept: it holds {', '.join(sorted(left)[:5])}"
                                          f"{' and more' if len(left) > 5 else ''}, which workbench did not write; "
                                          f"move what you need and delete the folder")
                return
            for name in (LOCK, MARKER):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / name)
            with contextlib.suppress(OSError):
                self.path.rmdir()  # fails, and leaves it, if something appeared meanwhile

    def staging_root(self) -> Path:
        return self.path

    def disk_usage(self) -> int:
        """Bytes the checkpoint already holds (a resumed run needs that much less free space)."""
        if not self.state:
            return 0
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())

    # -- deciding whether to resume ----------------------------------------------------------

    def prepare(self, profile, resume: bool | str, force: bool, events: EventBus) -> None:
        """Load, refuse or discard an existing checkpoint, as `resume` and `force` say.

        resume=False: an existing checkpoint is refused unless `force` (which starts over);
        resume=True: it is continued, and refused when made by a different profile;
        resume="auto" (the app): continued when it matches, otherwise discarded.
        """
        self._mode, self._events = resume, events
        self._identity = result_fields(profile)
        saved, problem = self._read_state()
        if saved is None and problem is None:
            self._remove_unreferenced()  # a killed run's temp files, if any
            if resume is True:
                events.log("load", f"no checkpoint in {self.path}; starting from the beginning")
            return
        old_format = bool(problem) and problem.startswith("checkpoint format")
        if old_format and resume != "auto" and (resume is True or not force):
            raise UsageError(f"{self.path} holds a checkpoint written by another workbench version ({problem}); "
                             f"it cannot be resumed. Start over with --force (without --resume), which discards it")
        if resume is False:
            if not force:
                what = problem or self.describe(saved)
                raise UsageError(f"{self.path} holds the checkpoint of an interrupted run ({what}); continue it "
                                 f"with --resume, or start over with --force (deletes it)")
            events.log("load", f"--force: discarding the checkpoint in {self.path}")
            self._discard()
            return
        differences = [problem] if problem else _differences(saved.get("profile", {}), self._identity)
        self._resolve(differences, saved)

    def check_model(self, fingerprint: str, device_type: str) -> None:
        """After loading: the checkpoint must come from the same weights on the same kind of device."""
        self._model = {"model fingerprint": fingerprint, "model.device (resolved)": device_type}
        if self.state:
            self._resolve(_differences(self.state.get("model", {}), self._model), self.state)
        saved_torch = self.state.get("torch")
        if saved_torch and saved_torch != torch.__version__:
            self._events.warn("load", f"the checkpoint was written with torch {saved_torch}, this is "
                                      f"{torch.__version__}: the result may differ in the last bits")

    def check_windows(self, windows: torch.Tensor) -> None:
        self._windows = windows_hash(windows)
        saved = self.state.get("calibration", {}).get("windows")
        if saved is not None and saved != self._windows:
            self._resolve([f"calibration.dataset: the calibration text ({self.state['profile'].get('calibration.dataset')})"
                           " gives different token windows than when the checkpoint was made"], self.state)

    def _resolve(self, differences: list[str], saved: dict[str, Any]) -> None:
        if not differences:
            if not self.state:
                self.state = saved
                self._events.log("load", f"resuming from the checkpoint in {self.path}: {self.describe(saved)}")
            return
        if self._mode == "auto":
            self._events.log("load", f"the checkpoint in {self.path} does not belong to this run "
                                     f"({differences[0]}); starting over")
            self._discard()
            return
        self.state = {}  # not ours to use, nor to tidy
        raise UsageError(f"the checkpoint in {self.path} does not belong to this run: {'; '.join(differences)}. "
                         f"Resume with the profile and model it was made with, or start over: run without "
                         f"--resume and with --force (discards it), or delete {self.path}")

    def _read_state(self) -> tuple[dict[str, Any] | None, str | None]:
        path = self.path / STATE
        if not path.exists():
            return None, None
        try:
            saved = json.loads(path.read_text())
            if saved.get("format") != FORMAT:
                return saved, f"checkpoint format {saved.get('format')!r}, this workbench writes {FORMAT}"
            missing = [name for name in self._referenced(saved) if not (self.path / name).exists()]
            if missing:
                return saved, f"checkpoint files missing: {', '.join(missing[:3])}"
            return saved, None
        except (OSError, ValueError, AttributeError) as exc:
            return {}, f"unreadable checkpoint ({exc})"

    @staticmethod
    def describe(state: dict[str, Any] | None) -> str:
        if not state:
            return "nothing done yet"
        done = [(entry.get("seq", 0), entry.get("label", name)) for name, entry in state.get("stages", {}).items()]
        cal = state.get("calibration")
        if cal:
            done.append((cal.get("seq", 0), f"{cal['next_layer']} of {cal['layers']} layers calibrated"))
        return ", ".join(text for _, text in sorted(done, key=lambda d: d[0])) or "nothing done yet"

    def _discard(self) -> None:
        self.state = {}
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path / STATE)
        self._remove_unreferenced()

    # -- committing --------------------------------------------------------------------------

    @staticmethod
    def _referenced(state: dict[str, Any]) -> set[str]:
        names = set()
        cal = state.get("calibration") or {}
        names.update(cal.get("factors", {}).values())
        names.update(cal.get("grams", {}).values())
        if cal.get("hidden"):
            names.add(cal["hidden"])
        names.update(entry["file"] for entry in state.get("stages", {}).values() if entry.get("file"))
        names.update(entry["folder"] for entry in state.get("stages", {}).values() if entry.get("folder"))
        return names

    def _remove_unreferenced(self) -> None:
        """Delete the files workbench wrote here that the checkpoint no longer names (only those)."""
        keep = self._referenced(self.state) | {STATE, LOCK, MARKER, SPILL}
        for entry in self.path.iterdir():
            if entry.name not in keep and self._ours(entry):
                self._delete(entry)

    def _commit(self, **changes: Any) -> None:
        state = {**self.state, **changes, "format": FORMAT, "workbench": __version__, "torch": torch.__version__,
                 "profile": self._identity, "model": self._model}
        text = json.dumps(state, indent=1, default=str)
        write_atomically(self.path / STATE, lambda tmp: Path(tmp).write_text(text))
        fsync_dir(self.path)  # the renames above are durable once the directory is
        self.state = state
        self._remove_unreferenced()

    # -- any stage's result ------------------------------------------------------------------

    def _seq(self) -> int:
        """Order of first commit, so `describe` lists what was done in the order it was done."""
        entries = [*self.state.get("stages", {}).values(), self.state.get("calibration") or {}]
        return 1 + max((e.get("seq", 0) for e in entries), default=0)

    def save_stage(self, name: str, meta: Any, tensors: dict[str, torch.Tensor] | None = None,
                   label: str | None = None, folder: Path | None = None) -> None:
        """Commit stage `name`'s result: JSON-able `meta` and, optionally, tensors (one file) and a
        `folder` of finished output this checkpoint keeps (a sweep's staging directory, made in here)."""
        previous = self.state.get("stages", {}).get(name, {})
        file = None
        if tensors:
            file = _file_name("stage", name)
            save_tensors(self.path / file, tensors)
        entry = {"label": label or name, "meta": plain(meta), "file": file, "seq": previous.get("seq") or self._seq()}
        if folder is not None:
            entry["folder"] = Path(folder).name
        self._commit(stages={**self.state.get("stages", {}), name: entry})

    def load_stage(self, name: str, device: torch.device | str = "cpu") -> tuple[Any, dict[str, torch.Tensor]] | None:
        """(meta, tensors) of stage `name` from the checkpoint, or None when it holds none."""
        entry = self.state.get("stages", {}).get(name)
        if not entry:
            return None
        tensors = load_tensors(self.path / entry["file"], device) if entry.get("file") else {}
        return entry["meta"], tensors

    # -- calibration -------------------------------------------------------------------------

    def load_calibration(self, device: torch.device) -> CalibrationState | None:
        cal = self.state.get("calibration")
        if not cal:
            self._since_commit = time.monotonic()
            return None
        factors = {}
        for key, name in cal["factors"].items():
            path = self.path / name
            factors[key] = unflatten(load_meta(path), load_tensors(path, device))
        grams = {}
        for key, name in cal["grams"].items():
            group, _, layer = key.rpartition("@")
            grams[(group, int(layer))] = load_tensors(self.path / name, device)["gram"]
        hidden = None
        if cal["hidden"]:
            tensors = load_tensors(self.path / cal["hidden"], device)
            hidden = [tensors[str(i)] for i in range(len(tensors))]
        self.resumed.append(f"calibration ({cal['next_layer']} of {cal['layers']} layers)")
        self._since_commit = time.monotonic()
        return CalibrationState(cal["next_layer"], hidden, grams, factors, cal["whitening"], cal["tokens"])

    def calibration_due(self, final: bool) -> bool:
        """Whether `save_calibration` would write now (a torchrun job gathers the inputs only then)."""
        # and COMMIT_SPACING seconds at least: a few seconds of work are cheaper to redo than to checkpoint
        return final or time.monotonic() - self._since_commit >= COMMIT_SPACING * max(self._commit_cost, 1.0)

    def save_calibration(self, state: CalibrationState, final: bool, layers: int | None = None) -> None:
        """Commit the calibration state after a layer; between layers only as often as COMMIT_SPACING allows."""
        if not self.calibration_due(final):
            return
        started = time.monotonic()
        previous = self.state.get("calibration") or {}
        written_factors = dict(previous.get("factors", {}))
        for key, f in state.factors.items():
            if key not in written_factors:
                name = _file_name("factors", key)
                tensors, meta = flatten(f)
                save_tensors(self.path / name, tensors, meta)
                written_factors[key] = name
        written_grams = previous.get("grams", {})
        grams = {}
        for (group, layer), gram in state.grams.items():
            key = f"{group}@{layer}"
            grams[key] = written_grams.get(key) or _file_name("gram", key)
            if key not in written_grams:
                save_tensors(self.path / grams[key], {"gram": gram})
        hidden = None
        if state.hidden is not None:
            hidden = f"hidden-{state.next_layer}.safetensors"
            save_tensors(self.path / hidden, {str(i): h for i, h in enumerate(state.hidden)})
        self._commit(calibration={"next_layer": state.next_layer, "layers": layers or previous.get("layers"),
                                  "windows": self._windows, "tokens": state.tokens, "whitening": plain(state.whitening),
                                  "factors": {k: written_factors[k] for k in state.factors}, "grams": grams,
                                  "hidden": hidden, "seq": previous.get("seq") or self._seq()})
        self._since_commit = time.monotonic()
        self._commit_cost = self._since_commit - started


class ProgressStore:
    """Progress of a long stage inside the work directory (`SignalContext.checkpoint`): the last save wins.

    Each save rewrites one tensor file and then commits `state.json`, so an interrupted save leaves
    either the previous save or this one; keep anything that must match the tensors (a step count)
    in the tensors themselves, since the file can be newer than the meta beside it.
    """

    def __init__(self, work: "WorkDir", name: str):
        self.work, self.name = work, name

    def save(self, meta: Any, tensors: dict[str, torch.Tensor]) -> None:
        self.work.save_stage(self.name, meta, tensors)

    def load(self) -> tuple[Any, dict[str, torch.Tensor]] | None:
        return self.work.load_stage(self.name)
