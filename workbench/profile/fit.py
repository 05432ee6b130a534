"""Checks of a profile against the loaded model, made before the long work starts.

Validation reads no model, so what depends on its shapes is checked here, right after the model
is loaded and its groups are planned: a ratio no allocation can reach is refused (exit 2, instead of
failing in the allocator after the dense evaluation and the calibration); a sequence longer than
the model's positions and an `ignore` pattern that matches nothing are warned about.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from workbench.engine.grouping import GroupPlan, rank_one_cost, reachable_ratio, unmatched_patterns
from workbench.errors import UsageError

STAGE = "load"


def check_ratio(plans: Sequence[GroupPlan], ratio: float, key: str = "compression.ratio") -> None:
    """UsageError naming `key` when `ratio` cannot be met even with every group at rank 1."""
    dense = sum(len(p.layers) * p.in_features * p.out_features for p in plans)
    floor = rank_one_cost(plans)
    if not math.isfinite(ratio) or not 0 <= ratio < 1:
        raise UsageError(f"{key}: {ratio!r} is outside [0, 1)")
    if math.floor((1.0 - ratio) * dense) < floor:  # the budget arithmetic of engine/allocation.budget_for
        top = math.floor(reachable_ratio(plans) * 1e4) / 1e4  # rounded down: the bound shown is reachable
        raise UsageError(
            f"{key}: {ratio:g} cannot be reached for this model: with every group at rank 1 the targeted "
            f"layers still keep {floor:,} of their {dense:,} parameters. Reachable: 0 to {top:g}"
            " (use a smaller ratio, or target more matrices)")


def check_fits_model(profile: Any, model: Any, adapter: Any, plans: Sequence[GroupPlan], events: Any = None,
                     ratio: float | None = None) -> None:
    """Refuse what cannot finish (UsageError); warn (through `events`) about what looks wrong."""
    check_ratio(plans, profile.compression.ratio if ratio is None else ratio,
                "compression.ratio" if ratio is None else "--ratio")
    if events is None:
        return
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int):
        lengths = [("calibration.seq_len", profile.calibration.seq_len)]
        lengths += [(f"evaluate[{i}].seq_len", e.options["seq_len"]) for i, e in enumerate(profile.evaluate)
                    if isinstance(e.options.get("seq_len"), int)]
        for key, length in lengths:
            if length > positions:
                events.warn(STAGE, f"{key} = {length} is longer than the model's max_position_embeddings "
                                   f"({positions}): positions past it were never trained, so results may be poor")
    for pattern in unmatched_patterns(model, adapter, profile.compression.ignore):
        events.warn(STAGE, f"compression.ignore: '{pattern}' matches no matrix of this model, so it ignores "
                           "nothing (a typo?)")
