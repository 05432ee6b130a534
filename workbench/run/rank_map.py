"""What each allocator would give, without compressing: `workbench inspect PROFILE`.

Calibrates once (as a run does), then asks every chosen allocator for its ranks at the profile's
ratio and lays them beside each group's effective rank, so a user can see why a layer got what it got.
"""

from __future__ import annotations

from typing import Any, Sequence

from workbench.api import validate_options
from workbench.engine.allocation import budget_for, total_cost
from workbench.engine.compress import allocate
from workbench.errors import UsageError
from workbench.events import CancelToken, EventBus
from workbench.run.stages import Calibrate, Load, RunContext, Signals, run_stages


def allocator_options(profile, allocator) -> dict[str, Any]:
    """The profile's options for its own allocator; any other allocator's defaults, filled by the same validation."""
    given = profile.compression.allocator_options if allocator.name == profile.compression.allocator else {}
    options, problems = validate_options(allocator.options, given, file=profile.path or "<profile>",
                                         key_prefix="compression.allocator_options")
    if problems:
        raise UsageError("; ".join(f"{p.key}: {p.message}" for p in problems))
    return options


def default_allocators(profile, registry) -> list[str]:
    """Every installed allocator, less those that train toward the target (a signal with
    `depends_on_target`, e.g. `ara`: minutes to hours) unless the profile chose it."""
    def trains(name: str) -> bool:
        return any(getattr(registry.signals.get(s), "depends_on_target", False)
                   for s in registry.allocators[name].needs)

    return [n for n in sorted(registry.allocators) if n == profile.compression.allocator or not trains(n)]


def rank_map(profile, registry, allocators: Sequence[str] | None = None, ratio: float | None = None,
             events: EventBus | None = None, cancel: CancelToken | None = None) -> dict[str, Any]:
    """{"ratio", "budget", "allocators", "rows": [per group: type, layers, shape, R_eff, ranks per allocator]}."""
    names = list(allocators) if allocators else default_allocators(profile, registry)
    chosen = [registry.get("allocator", n) for n in names]
    ctx = RunContext(profile, registry, events or EventBus(), cancel or CancelToken(), ratio=ratio,
                     signal_names=tuple(dict.fromkeys(s for a in chosen for s in a.needs)))
    run_stages(ctx, [Load(), Calibrate(), Signals()])  # as a run does, without checkpoints or output
    ratio = profile.compression.ratio if ratio is None else ratio
    cal = ctx.calibrated
    budget = budget_for(cal.spectra, ratio)
    dense = sum(s.dense_params for s in cal.spectra)
    answers, achieved, notes = {}, {}, {}
    for name, allocator in zip(names, chosen):
        ranks = allocate(allocator, registry.describe("allocator", name), cal.spectra, budget,
                         allocator_options(profile, allocator))
        answers[name], notes[name] = ranks, ranks.notes
        achieved[name] = 1 - total_cost(cal.spectra, ranks) / dense
    rows = [{"group": s.key, "type": s.matrix_type, "layers": list(s.layers), "in": s.in_features,
             "out": s.out_features, "max_rank": s.max_rank, "effective_rank": round(s.effective_rank, 3),
             "ranks": {n: answers[n][s.key] for n in names}} for s in cal.spectra]
    return {"model": profile.model.source, "ratio": ratio, "budget": budget, "allocators": names,
            "ratio_targeted": achieved, "notes": notes, "rows": rows}
