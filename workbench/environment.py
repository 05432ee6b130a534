"""Environment variables workbench reads as numbers, checked before a run does any work.

A value that is not a number is a usage error naming the variable (exit 2), never a traceback at
import time; `check_environment` runs first in every run and in `workbench inspect`.
"""

from __future__ import annotations

import math
import os

from workbench.errors import UsageError

# name -> (default, smallest allowed value, what it sets)
NUMBERS = {
    "WORKBENCH_CHECKPOINT_SPACING": (10.0, 0.0, "how sparingly calibration checkpoints are written; 0 = every layer"),
    # torch.distributed's own default; long enough for process 0 to save a large model while the others wait
    "WORKBENCH_DIST_TIMEOUT": (1800.0, 1.0, "seconds a torchrun process waits for the others at a collective"),
}


def env_number(name: str) -> float:
    """The variable's value, or its default when unset or empty; UsageError when it is not a number in range."""
    default, least, about = NUMBERS[name]
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < least:
        raise UsageError(f"environment variable {name}={raw!r}: expected a number >= {least:g} ({about}); "
                         f"unset it for the default {default:g}")
    return value


def env_number_or_default(name: str) -> float:
    """For module constants read at import: the default when the value is bad (`check_environment`
    refuses it before any work, with a message)."""
    try:
        return env_number(name)
    except UsageError:
        return NUMBERS[name][0]


def check_environment() -> None:
    for name in NUMBERS:
        env_number(name)
