"""`workbench plan`'s output: every setting's memory and disk, which fit this machine, the one to use.

Figures are in GiB (1 GiB = 1024³ bytes) in every column, so they compare at a glance.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from workbench.render.numbers import format_bytes
from workbench.run.plan import MODES, Machine, Setting, fisher_activations, verdict
from workbench.run.plan import settings as plan_settings

GIB = 1 << 30


def gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def best(settings: Sequence[Setting], machine: Machine) -> Setting | None:
    """The least offload that fits, with the fewest processes."""
    fitting = [s for s in settings if verdict(s, machine) is None]
    return min(fitting, key=lambda s: (MODES.index(s.offload), s.processes), default=None)


def _advice(s: Setting) -> str:
    launch = "" if s.processes == 1 else f", under torchrun --nproc-per-node {s.processes}"
    return (f"[model] offload = \"{s.offload}\"{launch} (about {format_bytes(s.device)} per device, "
            f"{format_bytes(s.host)} of host memory, {format_bytes(s.disk)} of disk)")


def plan_data(planned, settings: Sequence[Setting], machine: Machine) -> dict[str, Any]:
    """What the table shows, in bytes, for --json."""
    shapes, est = planned.shapes, settings[0].estimate
    chosen = best(settings, machine)
    return {
        "model": planned.description, "source": planned.source,
        "calibration": {"windows": shapes.windows, "seq_len": shapes.seq_len}, "ratio": shapes.ratio,
        "terms_bytes": {"weights": shapes.dtype_bytes * shapes.params, "inputs": est.inputs, "grams": est.grams,
                        "factors": est.factors, "transient": est.transient, "compensation": est.compensation,
                        "fisher_activations": fisher_activations(shapes), "model_file": est.model_file,
                        "checkpoint": est.checkpoint},
        "settings": [{"offload": s.offload, "processes": s.processes, "device_bytes": s.device,
                      "host_bytes": s.host, "disk_bytes": s.disk,
                      "phases": {name: {"device_bytes": n.device, "host_bytes": n.host}
                                 for name, n in s.phases.items()},
                      "fits": verdict(s, machine) is None, "why_not": verdict(s, machine)} for s in settings],
        "machine": {"host_available_bytes": machine.host, "disk_free_bytes": machine.disk,
                    "gpus": [{"name": n, "free_bytes": f} for n, f in zip(machine.gpu_names, machine.gpus)]},
        "recommended": None if chosen is None else {"offload": chosen.offload, "processes": chosen.processes},
    }


def plan_view(planned, settings: Sequence[Setting], machine: Machine, allocator: str, where: str) -> Group:
    shapes, est = planned.shapes, settings[0].estimate
    parts: list[Any] = [Text(f"plan for {planned.source}: {planned.description}"),
                        Text(f"calibration {shapes.windows} × {shapes.seq_len} tokens, ratio {shapes.ratio:g}, "
                             f"allocator {allocator}" + (" (needs the fisher signal)" if shapes.fisher else ""))]
    terms = (f"weights {gib(shapes.dtype_bytes * shapes.params)} · calibration inputs {gib(est.inputs)} · "
             f"Grams (float64) {gib(est.grams)} · factors until allocation (float32) {gib(est.factors)} · "
             f"largest transient {gib(est.transient)}")
    if est.compensation:
        terms += f" · compensation stream {gib(est.compensation)}"
    if shapes.fisher:
        terms += f" · fisher pass over one window {gib(fisher_activations(shapes))}"
    parts.append(Text(f"terms (GiB): {terms}", style="dim"))
    table = Table(title="estimated peak per setting (GiB = 1024³ bytes)", title_justify="left")
    for column in ("offload", "processes", "per device, GiB", "host, GiB", "disk, GiB", "this machine"):
        table.add_column(column, justify="right" if "GiB" in column or column == "processes" else "left")
    for s in settings:
        why = verdict(s, machine)
        table.add_row(s.offload, str(s.processes), gib(s.device), gib(s.host), gib(s.disk),
                      Text("fits", style="green") if why is None else Text(f"no: {why}", style="dim"))
    parts.append(table)
    parts.append(Text("per device: each compute GPU (one per process); host: all processes on this machine "
                      "together; no GPU: the compute device is the host, so both count against its memory",
                      style="dim"))
    gpus = "; ".join(f"GPU {i} ({name}) {format_bytes(free)} free"
                     for i, (name, free) in enumerate(zip(machine.gpu_names, machine.gpus))) or "no CUDA device"
    parts.append(Text(f"this machine: host {format_bytes(machine.host)} available; {gpus}; disk "
                         f"{format_bytes(machine.disk)} free at {where}"))
    chosen = best(settings, machine)
    if chosen is not None:
        parts.append(Text(f"use: {_advice(chosen)}", style="bold"))
    else:
        without = best(plan_settings(replace(shapes, fisher=False), processes=sorted({s.processes for s in settings})),
                       machine) if shapes.fisher else None
        if without is not None:
            parts.append(Text(f"nothing fits with the fisher signal (its backward pass over a {shapes.seq_len}-token "
                              f"window); with an allocator that needs no signal (uniform, drank): {_advice(without)}",
                              style="yellow"))
        else:
            parts.append(Text("nothing fits this machine: fewer calibration.samples × seq_len shrink the inputs; the "
                              "Grams and the transient depend only on the widths", style="yellow"))
    if shapes.fisher and chosen is not None and "fisher" in chosen.phases and \
            chosen.phases["fisher"].device >= chosen.phases["calibration"].device:
        parts.append(Text("the fisher signal's pass sets this device figure; an allocator that needs no signal "
                          "(uniform, drank) needs only the calibration's", style="dim"))
    return Group(*parts)
