"""report.json's schema: what a run writes, and the one way to read it back.

The pipeline builds a `Report` (`build_report`) and writes `Report.to_dict()`; the run summary,
report.md, the app's results index and its run screen read reports with `load_report`, never as
raw dicts. Reading is lenient: a report from an earlier workbench (format 1, which had no
`format` key) or one edited by hand opens anyway. A field of the wrong type is treated as missing
and a line saying so is kept in `Report.notes`; it never raises. Keys this version does not know
are kept in `extra` and written back unchanged.

Format history: 1, no `format` key (workbench 0.1 before the typed report); 2, adds `format`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from workbench.errors import UsageError

FORMAT = 2


class ReportError(UsageError):
    """A report.json that cannot be read at all: missing, not JSON, or not a JSON object."""


class _Reader:
    """Pulls typed values out of parsed JSON, noting (not raising on) anything of the wrong type."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @staticmethod
    def at(where: str, key: str) -> str:
        return f"{where}.{key}" if where else key

    def wrong(self, where: str, expected: str, value: Any) -> None:
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
        self.notes.append(f"{where}: expected {expected}, got {shown}; treated as missing")

    def number(self, data: Mapping[str, Any], key: str, where: str) -> float | int | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return value
        self.wrong(self.at(where, key), "a number", value)
        return None

    def text(self, data: Mapping[str, Any], key: str, where: str) -> str | None:
        value = data.get(key)
        if value is None or isinstance(value, str):
            return value
        self.wrong(self.at(where, key), "text", value)
        return None

    def mapping(self, data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
        value = data.get(key)
        if value is None:
            return {}
        if isinstance(value, Mapping):
            return dict(value)
        self.wrong(self.at(where, key), "a table", value)
        return {}

    def items(self, data: Mapping[str, Any], key: str, where: str) -> list[Mapping[str, Any]]:
        """A list of tables; entries that are not tables are dropped with a note."""
        value = data.get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.wrong(self.at(where, key), "a list", value)
            return []
        kept = [v for v in value if isinstance(v, Mapping)]
        if len(kept) < len(value):
            self.notes.append(f"{key}: {len(value) - len(kept)} entries that are not tables were left out")
        return kept


def _extra(data: Mapping[str, Any], cls: type) -> dict[str, Any]:
    known = {f.metadata.get("key", f.name) for f in fields(cls)}
    return {k: v for k, v in data.items() if k not in known}


def _written(obj: Any, skip_none: tuple[str, ...] = ()) -> dict[str, Any]:
    """A dataclass back to its JSON keys, then the keys it did not know."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        if f.name in ("extra", "notes"):
            continue
        value = getattr(obj, f.name)
        if value is None and f.name in skip_none:
            continue
        out[f.metadata.get("key", f.name)] = value.to_dict() if hasattr(value, "to_dict") else value
    out.update(getattr(obj, "extra", {}))
    return out


@dataclass
class ModelInfo:
    source: str | None = None
    adapter: str | None = None
    heads: dict[str, Any] = field(default_factory=dict)  # heads, kv_heads, head_dim
    group_sizes: dict[str, Any] = field(default_factory=dict)  # matrix type -> layers sharing a basis
    device: str | None = None
    dtype: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, data: Mapping[str, Any], r: _Reader) -> "ModelInfo":
        w = "model"
        return cls(r.text(data, "source", w), r.text(data, "adapter", w), r.mapping(data, "heads", w),
                   r.mapping(data, "group_sizes", w), r.text(data, "device", w), r.text(data, "dtype", w),
                   _extra(data, cls))

    def to_dict(self) -> dict[str, Any]:
        return _written(self)


@dataclass
class CalibrationInfo:
    windows: int | None = None
    seq_len: int | None = None
    tokens: int | None = None
    gram_precision: str | None = None  # the resolved mode ("float64" or "float32-equilibrated"); absent before 0.2
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, data: Mapping[str, Any], r: _Reader) -> "CalibrationInfo":
        w = "calibration"
        return cls(r.number(data, "windows", w), r.number(data, "seq_len", w), r.number(data, "tokens", w),
                   r.text(data, "gram_precision", w), _extra(data, cls))

    def to_dict(self) -> dict[str, Any]:
        return _written(self, skip_none=("gram_precision",))


@dataclass
class AllocatorInfo:
    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)  # the allocator's own notes (`Allocation.notes`)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, data: Mapping[str, Any], r: _Reader) -> "AllocatorInfo":
        w = "allocator"
        return cls(r.text(data, "name", w), r.mapping(data, "options", w), r.mapping(data, "notes", w),
                   _extra(data, cls))

    def to_dict(self) -> dict[str, Any]:
        out = _written(self)
        out["notes"] = self.notes  # `_written` skips a field named notes (the reader's notes elsewhere)
        return out


_PARAM_KEYS = ("ratio_requested", "ratio_targeted", "ratio_model", "targeted_dense", "targeted_compressed",
               "budget", "model_dense", "model_compressed")


@dataclass
class Params:
    """Parameter counts; ratios are the fractions removed (targeted layers, whole model)."""

    ratio_requested: float | None = None
    ratio_targeted: float | None = None
    ratio_model: float | None = None
    targeted_dense: int | None = None
    targeted_compressed: int | None = None
    budget: int | None = None
    model_dense: int | None = None
    model_compressed: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, data: Mapping[str, Any], r: _Reader) -> "Params":
        return cls(*(r.number(data, k, "params") for k in _PARAM_KEYS), extra=_extra(data, cls))

    def to_dict(self) -> dict[str, Any]:
        return _written(self)


@dataclass
class RankRow:
    """One group of the rank table: a matrix type over `layers`, sharing a basis."""

    group: str | None = None
    type: str | None = None
    layers: list[int] = field(default_factory=list)
    in_features: int | None = field(default=None, metadata={"key": "in"})
    out_features: int | None = field(default=None, metadata={"key": "out"})
    rank: int | None = None
    max_rank: int | None = None
    dense: bool | None = None  # kept as nn.Linear (rank at or past break-even)
    effective_rank: float | None = None
    params: int | None = None
    loss: float | None = None  # whitened truncation loss at `rank`
    energy: float | None = None  # the group's whole whitened energy (loss at rank 0)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, data: Mapping[str, Any], r: _Reader, i: int) -> "RankRow":
        w = f"ranks[{i}]"
        layers = data.get("layers")
        if layers is not None and not (isinstance(layers, list) and all(
                isinstance(x, int) and not isinstance(x, bool) for x in layers)):
            r.wrong(f"{w}.layers", "a list of layer numbers", layers)
            layers = None
        dense = data.get("dense")
        if dense is not None and not isinstance(dense, bool):
            r.wrong(f"{w}.dense", "true or false", dense)
            dense = None
        return cls(r.text(data, "group", w), r.text(data, "type", w), list(layers or []),
                   r.number(data, "in", w), r.number(data, "out", w), r.number(data, "rank", w),
                   r.number(data, "max_rank", w), dense, r.number(data, "effective_rank", w),
                   r.number(data, "params", w), r.number(data, "loss", w), r.number(data, "energy", w),
                   _extra(data, cls))

    def to_dict(self) -> dict[str, Any]:
        return _written(self)


@dataclass
class Metric:
    """One evaluator's result, dense beside compressed. `details` holds each side's details."""

    evaluator: str | None = None
    dataset: str | None = None
    metric: str | None = None
    dense: float | None = None
    compressed: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # {"dense": {...}, "compressed": {...}}
    error: str | None = None  # set when the evaluator failed on either side
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, data: Mapping[str, Any], r: _Reader, i: int) -> "Metric":
        w = f"metrics[{i}]"
        error = data.get("error")
        return cls(r.text(data, "evaluator", w), r.text(data, "dataset", w), r.text(data, "metric", w),
                   r.number(data, "dense", w), r.number(data, "compressed", w), r.mapping(data, "options", w),
                   r.mapping(data, "details", w), None if error is None else str(error), _extra(data, cls))

    @property
    def name(self) -> str:
        """What is measured: the metric's name, else the evaluator's."""
        return self.metric or self.evaluator or "?"

    def side(self, label: str) -> dict[str, Any]:
        """The details of one side ("dense" or "compressed"); {} when there are none."""
        value = self.details.get(label)
        return dict(value) if isinstance(value, Mapping) else {}

    def figures(self, label: str) -> dict[str, float]:
        """The further figures one side lists (`details["figures"]`), numbers only."""
        figures = self.side(label).get("figures")
        if not isinstance(figures, Mapping):
            return {}
        return {str(k): v for k, v in figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def to_dict(self) -> dict[str, Any]:
        return _written(self, skip_none=("error",))


@dataclass
class PeakMemory:
    rss_bytes: int | None = None  # the process's peak resident set
    cuda_bytes: int | None = None  # the GPU allocator's peak, on CUDA
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, value: Any, r: _Reader) -> "PeakMemory":
        if isinstance(value, (int, float)) and not isinstance(value, bool):  # a bare byte count
            return cls(rss_bytes=value)
        data = value if isinstance(value, Mapping) else {}
        if value is not None and not isinstance(value, Mapping):
            r.wrong("peak_memory", "a table", value)
        return cls(r.number(data, "rss_bytes", "peak_memory"), r.number(data, "cuda_bytes", "peak_memory"),
                   _extra(data, cls))

    def to_dict(self) -> dict[str, Any]:
        return _written(self)


@dataclass
class Report:
    """report.json as typed fields; `notes` says what reading it had to leave out."""

    format: int = FORMAT
    workbench_version: str | None = None
    profile_name: str | None = None
    output_dir: str | None = None
    model: ModelInfo = field(default_factory=ModelInfo)
    calibration: CalibrationInfo = field(default_factory=CalibrationInfo)
    allocator: AllocatorInfo = field(default_factory=AllocatorInfo)
    params: Params = field(default_factory=Params)
    ranks: list[RankRow] = field(default_factory=list)
    whitening: list[dict[str, Any]] = field(default_factory=list)  # groups and the whitening route they took
    metrics: list[Metric] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds; also compress_s, total_s
    peak_memory: PeakMemory = field(default_factory=PeakMemory)
    profile: dict[str, Any] = field(default_factory=dict)  # the resolved profile the run used
    resumed_from_checkpoint: list[str] | None = None  # what an interrupted run had done
    # the compensate stage: options (sequential, update, ridge), per-site objectives, time; None when off
    compensation: dict[str, Any] | None = None
    # the recover stage ([recovery] method = "lora"): its settings, the loss per step, time; None when off
    recovery: dict[str, Any] | None = None
    # the signals the allocator needed: {name: {"options", "notes" (`SignalContext.notes`)}}; None when none
    signals: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """What report.json holds (`format` first); `notes` are the reader's and are not written."""
        out = _written(self, skip_none=("resumed_from_checkpoint", "compensation", "recovery", "signals"))
        out["ranks"] = [row.to_dict() for row in self.ranks]
        out["metrics"] = [m.to_dict() for m in self.metrics]
        return out


def _read(data: Mapping[str, Any]) -> Report:
    r = _Reader()
    version = data.get("format", 1)  # format 1 had no `format` key
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        r.wrong("format", "a positive whole number", version)
        version = 1
    elif version > FORMAT:
        r.notes.append(f"format {version} is newer than this workbench reads ({FORMAT}); what it added is ignored")
    timings = {}
    for stage, seconds in r.mapping(data, "timings", "").items():
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
            timings[str(stage)] = seconds
        else:
            r.wrong(f"timings.{stage}", "seconds", seconds)
    resumed = data.get("resumed_from_checkpoint")
    if resumed is not None and not isinstance(resumed, list):
        r.wrong("resumed_from_checkpoint", "a list", resumed)
        resumed = None
    report = Report(
        format=version,
        workbench_version=r.text(data, "workbench_version", ""),
        profile_name=r.text(data, "profile_name", ""),
        output_dir=r.text(data, "output_dir", ""),
        model=ModelInfo.read(r.mapping(data, "model", ""), r),
        calibration=CalibrationInfo.read(r.mapping(data, "calibration", ""), r),
        allocator=AllocatorInfo.read(r.mapping(data, "allocator", ""), r),
        params=Params.read(r.mapping(data, "params", ""), r),
        ranks=[RankRow.read(row, r, i) for i, row in enumerate(r.items(data, "ranks", ""))],
        whitening=[dict(e) for e in r.items(data, "whitening", "")],
        metrics=[Metric.read(m, r, i) for i, m in enumerate(r.items(data, "metrics", ""))],
        timings=timings,
        peak_memory=PeakMemory.read(data.get("peak_memory"), r),
        profile=r.mapping(data, "profile", ""),
        resumed_from_checkpoint=[str(x) for x in resumed] if resumed is not None else None,
        compensation=r.mapping(data, "compensation", "") or None,
        recovery=r.mapping(data, "recovery", "") or None,
        signals=r.mapping(data, "signals", "") or None,
        extra=_extra(data, Report),
    )
    report.notes = r.notes
    return report


def load_report(source: str | Path | Mapping[str, Any] | Report) -> Report:
    """A report from a report.json path, its parsed contents, or a Report (returned as is).

    Raises ReportError only when there is no report to read (missing file, not JSON, not an object).
    """
    if isinstance(source, Report):
        return source
    if isinstance(source, Mapping):
        return _read(source)
    path = Path(source)
    from workbench.sources.files import parse_json, read_text

    try:  # a FIFO, /dev/zero, binary bytes or JSON nested too deeply are refused, not hung on or raised
        data = parse_json(read_text(path, "report", 256 << 20), str(path))
    except UsageError as exc:
        raise ReportError(f"{exc}; was it cut short or edited by hand?") from None
    if not isinstance(data, Mapping):
        raise ReportError(f"{path}: a report is a JSON object, this file holds a {type(data).__name__}")
    return _read(data)


def build_report(**fields: Any) -> Report:
    """The report of a finished run, from report.json's keys as the pipeline has them (see `Report`)."""
    report = _read(fields)
    report.format = FORMAT
    return report
