"""Running signals (registered `Signal` plugins, e.g. the built-in "fisher") and handing their values over.

After calibration, every signal an allocator `needs` gets one `SignalContext` (the dense model, the
groups and their factors, the calibration windows, its options) and returns {group key: value};
the values land in each group's `GroupSpectrum.sensitivity[name]`. A signal that raises or leaves a
group out stops the run with a message naming it and its package.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from workbench.api import Adapter, GroupSpectrum, Signal, SignalContext, validate_options
from workbench.errors import Interrupted, RunFailed, UsageError, WorkbenchError
from workbench.events import CancelToken, EventBus


def signal_options(signal: Signal, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """`given` checked against the signal's declared options, defaults filled (as a profile's table is)."""
    resolved, problems = validate_options(signal.options, dict(given or {}), file="<signals>",
                                          key_prefix=f"signals.{signal.name}")
    if problems:
        raise UsageError("; ".join(f"{p.key}: {p.message}" for p in problems))
    return resolved


def compute_signal(signal: Signal, who: str, ctx: SignalContext) -> dict[str, Any]:
    """{group key: value} for every group in `ctx.plans`; a plugin's failure is reported by name."""
    try:
        values = signal.compute(ctx)
    except (WorkbenchError, Interrupted, KeyboardInterrupt):
        raise
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - a plugin's bug is reported by name
        raise RunFailed(f"{who} raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(values, Mapping):
        raise RunFailed(f"{who} returned {type(values).__name__}, expected {{group key: value}}")
    missing = [p.key for p in ctx.plans if p.key not in values]
    if missing:
        raise RunFailed(f"{who} returned no value for {len(missing)} group(s), e.g. '{missing[0]}'")
    return {p.key: values[p.key] for p in ctx.plans}


def compute_signals(registry, names: Sequence[str], model: nn.Module, adapter: Adapter, plans: Sequence[Any],
                    factors: Mapping[str, Any], windows: torch.Tensor, device: torch.device, events: EventBus,
                    cancel: CancelToken, options: Mapping[str, Mapping[str, Any]] | None = None,
                    budget: int | None = None, ratio: float | None = None, checkpoint: Any = None
                    ) -> dict[str, dict[str, Any]]:
    """{signal name: {group key: value}} for each of `names`; `options` per signal (defaults filled);
    `budget` / `ratio` / `checkpoint` as `SignalContext` has them."""
    options = options or {}
    out = {}
    for name in names:
        signal = registry.get("signal", name)
        ctx = SignalContext(model=model, adapter=adapter, plans=plans, factors=factors, windows=windows,
                            device=device, events=events, cancel=cancel,
                            options=signal_options(signal, options.get(name)), budget=budget, ratio=ratio,
                            checkpoint=checkpoint, lookup=registry.get)
        out[name] = compute_signal(signal, registry.describe("signal", name), ctx)
    return out


def put_signals(spectra: Sequence[GroupSpectrum], signals: Mapping[str, Mapping[str, Any]]) -> None:
    """Give every spectrum its value of each signal ({signal: {group key: value}})."""
    for spec in spectra:
        spec.sensitivity = {**spec.sensitivity, **{name: by_key[spec.key] for name, by_key in signals.items()}}
