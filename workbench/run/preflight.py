"""Checks before the long work, so that a run which cannot finish fails in seconds, not hours.

- The output location can be written: the work directory beside it is made before any work
  (`checkpoint.WorkDir.acquire`), and a location that is not a directory is refused.
- The disk holds the compressed model and the checkpoints.
- The calibration fits in memory, by the estimate of `docs/scaling.md`, on top of the model that
  is already loaded: calibration inputs, the Grams alive at once, the factors kept until
  allocation, and the largest transient.

They are estimates: `workbench run --skip-preflight` runs anyway. `free_disk` and `free_memory`
are plain functions so that tests can put figures in their place.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import psutil
import torch

from workbench.api import break_even_rank
from workbench.errors import UsageError
from workbench.render.numbers import format_bytes as human

# Tokenizer, config and manifest files saved beside the weights: a few MiB for every model we know.
MODEL_EXTRAS = 20 << 20


@dataclass(frozen=True)
class Shapes:
    """What the estimates need to know about a run."""

    params: int  # P, parameters of the loaded model (tied ones once)
    dtype_bytes: int  # b
    hidden: int  # d
    head_dim: int
    groups: Sequence[tuple[str, int, int, int]]  # per group: (input group, n layers, in, out)
    windows: int  # N
    seq_len: int  # S
    ratio: float
    batch: int = 8  # the engine's calibration batch
    compensate: bool = False  # the compensate stage runs ([compression] sequential / update)


@dataclass(frozen=True)
class Estimate:
    inputs: int  # calibration hidden states (+ rotary tables)
    grams: int  # float64 Grams alive at once
    factors: int  # float32 factors kept until allocation
    transient: int  # the larger of factoring the largest group and one layer's forward over a batch
    model_file: int  # the saved compressed model
    checkpoint: int  # the work directory at its fullest
    compensation: int = 0  # the compensate stage's second stream and one layer's dense inputs; 0 when off

    @property
    def memory(self) -> int:
        """Memory the run adds on top of the loaded model, at its peak (end of calibration).

        The compensate stage's extra stream is added on top (it comes after calibration, so this
        over-counts a little, which is the safe side)."""
        return self.inputs + self.grams + self.factors + self.transient + self.compensation


def estimate(s: Shapes) -> Estimate:
    """docs/scaling.md's terms for one run: peak ≈ b·P + b·T·d + 8·Σ n·in² + 4·P_t + transient."""
    b, tokens = s.dtype_bytes, s.windows * s.seq_len
    hidden_states = b * tokens * s.hidden
    inputs = hidden_states + 2 * b * tokens * s.head_dim
    widest: dict[str, tuple[int, int]] = {}  # input group -> (longest group, in): its Grams alive at once
    for name, n, fan_in, _ in s.groups:
        widest[name] = max(widest.get(name, (0, 0)), (n, fan_in))
    grams = 8 * sum(n * fan_in ** 2 for n, fan_in in widest.values())
    factors = 4 * sum(break_even_rank(i, o, n) * (i + n * o) for _, n, i, o in s.groups)
    factoring = max(2 * 8 * i * i + 6 * 8 * n * o * i for _, n, i, o in s.groups)
    rows, widest_in = min(s.batch, s.windows) * s.seq_len, max(i for _, _, i, _ in s.groups)
    forward = 3 * b * rows * widest_in + 8 * rows * widest_in  # MLP activations + the Gram hook's float64 copy
    targeted = sum(n * i * o for _, n, i, o in s.groups)
    model_file = int(b * (s.params - s.ratio * targeted)) + MODEL_EXTRAS
    # Factors + the Grams of pending groups + two layers' inputs (the new one is written before the old goes).
    checkpoint = factors + grams + 2 * hidden_states
    # Compensation: the compressed stream beside the dense one, plus one layer's dense inputs per input group.
    compensation = 0
    if s.compensate:
        widths = {name: fan_in for name, _, fan_in, _ in s.groups}
        compensation = hidden_states + b * tokens * sum(widths.values())
    return Estimate(inputs, grams, factors, max(factoring, forward), model_file, checkpoint, compensation)


def shapes_of(model: torch.nn.Module, plans: Sequence, profile, params: int) -> Shapes:
    config = model.config
    hidden = getattr(config, "hidden_size", None) or plans[0].in_features
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    return Shapes(params, next(model.parameters()).element_size(), hidden, head_dim,
                  [(p.site.input_group, len(p.layers), p.in_features, p.out_features) for p in plans],
                  profile.calibration.samples, profile.calibration.seq_len, profile.compression.ratio,
                  compensate=bool(getattr(profile.compression, "sequential", False))
                  or getattr(profile.compression, "update", "none") != "none")


def free_disk(location: Path) -> int:
    path = Path(location).absolute()
    while not path.exists():  # the output does not exist yet: ask the disk it will be on
        path = path.parent
    return shutil.disk_usage(path).free


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return int(psutil.virtual_memory().available)


def check(est: Estimate, location: Path, device: torch.device, save_model: bool, already_on_disk: int = 0,
          disk: Callable[[Path], int] | None = None, memory: Callable[[torch.device], int] | None = None) -> str:
    """Raise UsageError (exit 2) with the figures when the run will not fit; else a one-line summary.

    `already_on_disk`: bytes of a checkpoint being resumed, which the free space no longer counts.
    """
    disk_free = (disk or free_disk)(location)
    mem_free = (memory or free_memory)(device)
    model_bytes = est.model_file if save_model else 0
    disk_needed = model_bytes + max(0, est.checkpoint - already_on_disk)
    problems = []
    if disk_needed > disk_free:
        written = f", less {human(already_on_disk)} already written" if already_on_disk else ""
        problems.append(
            f"not enough free disk space at {location}: the run needs about {human(disk_needed)} "
            f"(compressed model {human(model_bytes)}, checkpoints {human(est.checkpoint)}{written}) and "
            f"{human(disk_free)} is free. Free some space, or set [output] dir (or --output) to a larger disk")
    if est.memory > mem_free:
        problems.append(
            f"the calibration may not fit in {device.type} memory: it needs about {human(est.memory)} on top "
            f"of the loaded model (calibration inputs {human(est.inputs)}, Grams {human(est.grams)}, factors "
            f"kept until allocation {human(est.factors)}, largest transient {human(est.transient)}"
            f"{f', compensation stream {human(est.compensation)}' if est.compensation else ''}; see "
            f"docs/scaling.md) and {human(mem_free)} is available. The inputs shrink with calibration.samples "
            f"× calibration.seq_len; the factors grow with the targeted weights (compression.targets), so a "
            f"model this size may need a machine with more memory")
    if problems:
        raise UsageError("preflight: " + "\n  ".join(problems) + "\n  (workbench run --skip-preflight runs anyway)")
    return (f"preflight: needs about {human(est.memory)} of {human(mem_free)} available {device.type} memory "
            f"and {human(disk_needed)} of {human(disk_free)} free disk")
