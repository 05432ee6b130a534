"""Checks before the long work, so that a run which cannot finish fails in seconds, not hours.

- The output location can be written: the work directory beside it is made before any work
  (`checkpoint.WorkDir.acquire`), and a location that is not a directory is refused.
- The disk holds the compressed model and the checkpoints.
- The calibration fits in memory, by the estimate of `docs/scaling.md`, on top of the model that
  is already loaded: calibration inputs, the Grams alive at once, the factors kept until
  allocation, and the largest transient (workbench/run/plan.py, shared with `workbench plan`). When
  it does not fit, the message names the least offload setting that would.

They are estimates: `workbench run --skip-preflight` runs anyway. `free_disk` and `free_memory`
are plain functions so that tests can put figures in their place.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Sequence

import psutil
import torch

from workbench.engine.calibration import TOKEN_CHUNK
from workbench.engine.grouping import token_wise_paths
from workbench.errors import UsageError
from workbench.render.numbers import format_bytes as human
from workbench.run import plan
# The estimate itself lives in plan.py, shared with `workbench plan`; re-exported for existing callers.
from workbench.run.plan import MODEL_EXTRAS, Estimate, Machine, Shapes, choose_offload, estimate  # noqa: F401


def shapes_of(model: torch.nn.Module, plans: Sequence, profile, params: int, adapter=None,
              signals: Sequence[str] = ()) -> Shapes:
    """The run's shapes from a model (loaded, or built on the meta device from its config alone).

    With `adapter`, also the largest decoder layer and the modules around the layers, which the
    offload figures need; `signals`: what the allocator needs (the fisher signal has a cost of its own)."""
    config = model.config
    hidden = getattr(config, "hidden_size", None) or plans[0].in_features
    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads else 0)
    whole = dict(layers=0, layer_params=0, edge_params=0, token_chunk=0)
    if adapter is not None:
        layers = adapter.decoder_layers(model)
        edges = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
        whole = dict(layers=len(layers), layer_params=max(_count(layer) for layer in layers),
                     edge_params=max((_count(m) for m in edges), default=0),
                     token_chunk=TOKEN_CHUNK if token_wise_paths(model, adapter) else 0)
    return Shapes(params, next(model.parameters()).element_size(), hidden, head_dim,
                  [(p.statistic, len(p.layers), p.in_features, p.out_features) for p in plans],
                  profile.calibration.samples, profile.calibration.seq_len, profile.compression.ratio,
                  compensate=bool(getattr(profile.compression, "sequential", False))
                  or getattr(profile.compression, "update", "none") != "none",
                  vocab=int(getattr(config, "vocab_size", 0) or 0),
                  intermediate=int(getattr(config, "intermediate_size", 0) or 0),
                  fisher="fisher" in signals, eval_tokens=_evaluation_tokens(profile),
                  mask_training="ara" in signals, batch=profile.calibration.batch_size,
                  sole_inputs=_sole_inputs(plans), pass_tokens=TOKEN_CHUNK,
                  output_grams=frozenset(p.statistic for p in plans if p.output_statistic), **whole)


def _sole_inputs(plans: Sequence) -> frozenset[str]:
    """Statistics (`GroupPlan.statistic`) that one matrix type alone reads: an input Gram of these is
    factored in place (whitening.py)."""
    readers: dict[str, set[str]] = {}
    for p in plans:
        readers.setdefault(p.statistic, set()).add(p.site.path)
    return frozenset(group for group, paths in readers.items() if len(paths) == 1)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


def _evaluation_tokens(profile) -> int:
    """The largest batch an evaluator forms logits for: windows × tokens (options it does not have count 1 and 0)."""
    largest = 0
    for entry in getattr(profile, "evaluate", ()):
        options = entry.options
        length = options.get("seq_len") or (options.get("prompt_len", 0) or 0) + (options.get("new_tokens", 0) or 0)
        batch = options.get("batch_size") or 1
        if isinstance(length, int) and isinstance(batch, int):
            largest = max(largest, batch * length)
    return largest


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
          disk: Callable[[Path], int] | None = None, memory: Callable[[torch.device], int] | None = None,
          shapes: Shapes | None = None, offload: str = "none") -> str:
    """Raise UsageError (exit 2) with the figures when the run will not fit; else a one-line summary.

    `already_on_disk`: bytes of a checkpoint being resumed, which the free space no longer counts.
    `shapes` (with the whole model's figures, `shapes_of(..., adapter=...)`): when the run does not
    fit, the message names the least offload setting that does (workbench/run/plan.py's figures).
    `offload` "cpu" or "disk": the model is not on the device, so the plan's figures for that mode
    are checked instead of the model-on-the-device estimate.
    """
    disk_free = (disk or free_disk)(location)
    mem_free = (memory or free_memory)(device)
    model_bytes = est.model_file if save_model else 0
    disk_needed = model_bytes + max(0, est.checkpoint - already_on_disk)
    if offload == "disk" and shapes is not None:
        disk_needed += est.factors  # spilled into the work directory
    problems = []
    if disk_needed > disk_free:
        written = f", less {human(already_on_disk)} already written" if already_on_disk else ""
        problems.append(
            f"not enough free disk space at {location}: the run needs about {human(disk_needed)} "
            f"(compressed model {human(model_bytes)}, checkpoints {human(est.checkpoint)}{written}) and "
            f"{human(disk_free)} is free. Free some space, or set [output] dir (or --output) to a larger disk")
    if offload in ("cpu", "disk") and shapes is not None:
        problems += _offload_problems(shapes, est, offload, device, mem_free, memory)
        needed = plan.setting(shapes, offload, 1, est).phases["calibration"].device
    elif est.memory > mem_free:
        needed = est.memory
        problems.append(
            f"the calibration may not fit in {device.type} memory: it needs about {human(est.memory)} on top "
            f"of the loaded model (calibration inputs {human(est.inputs)}, Grams {human(est.grams)}, factors "
            f"kept until allocation {human(est.factors)}, largest transient {human(est.transient)}"
            f"{f', compensation stream {human(est.compensation)}' if est.compensation else ''}; see "
            f"docs/scaling.md) and {human(mem_free)} is available. The inputs shrink with calibration.samples "
            f"× calibration.seq_len; the factors grow with the targeted weights (compression.targets), so a "
            f"model this size may need a machine with more memory" + _offload_hint(shapes, device, mem_free,
                                                                                     disk_free, memory))
    else:
        needed = est.memory
    training = plan.mask_training_bytes(shapes) if shapes is not None else 0
    if training and est.factors + training > mem_free:
        problems.append(
            f"the ara signal's mask training may not fit in {device.type} memory: it needs about "
            f"{human(est.factors + training)} on top of the loaded model (factors {human(est.factors)}, one "
            f"window's backward pass, masks and optimizer state {human(training)}) and {human(mem_free)} is "
            f"available. It grows with calibration.seq_len; another allocator needs none of it")
    if training:
        needed = max(needed, est.factors + training)
    if problems:
        raise UsageError("preflight: " + "\n  ".join(problems) + "\n  (workbench run --skip-preflight runs anyway)")
    return (f"preflight: needs about {human(needed)} of {human(mem_free)} available {device.type} memory "
            f"and {human(disk_needed)} of {human(disk_free)} free disk")


def _offload_hint(shapes: Shapes | None, device: torch.device, mem_free: int, disk_free: int,
                  memory: Callable[[torch.device], int] | None) -> str:
    """'; set [model] offload = "disk" …' when an offload mode fits this machine, else ''."""
    if shapes is None or not shapes.layer_params:
        return ""
    loaded = shapes.dtype_bytes * shapes.params  # the model, loaded where it runs: freed under offload
    running = plan.HOST_BASE  # this process already runs: the plan's host figures count it
    if device.type == "cuda":
        host = (memory or free_memory)(torch.device("cpu")) + running
        machine = Machine(host=host, disk=disk_free, gpus=(mem_free + loaded,))
    else:
        machine = Machine(host=mem_free + loaded + running, disk=disk_free)
    fits = choose_offload(shapes, machine)
    if fits is None or fits.offload == "none":
        return ". No offload setting fits this machine either (workbench plan PROFILE shows every setting)"
    where = (f"{human(fits.device)} on the device and {human(fits.host)} of host memory" if device.type == "cuda"
             else f"{human(fits.device + fits.host)} of memory")  # on a CPU the device is the host
    return (f". With [model] offload = \"{fits.offload}\" it needs about {where}: set that (workbench plan "
            f"PROFILE shows every setting)")


def _offload_problems(shapes: Shapes, est: Estimate, offload: str, device: torch.device, mem_free: int,
                      memory: Callable[[torch.device], int] | None) -> list[str]:
    """The plan's figures for an offload mode against what is free; the weights already on the host count
    as available under "cpu" (they are loaded there)."""
    need = plan.setting(shapes, offload, 1, est).phases["calibration"]
    # Already in use, so not in what is free: the weights under "cpu" (loaded there) and this process.
    loaded = (shapes.dtype_bytes * shapes.params if offload == "cpu" else 0) + plan.HOST_BASE
    if device.type == "cuda":
        host_free = (memory or free_memory)(torch.device("cpu"))
        device_need, host_need = need.device, need.host - loaded
    else:  # the compute device is the host
        host_free, device_need, host_need = mem_free, 0, need.host + need.device - loaded
    problems = []
    if device_need > mem_free:
        problems.append(f"with offload = \"{offload}\" the calibration needs about {human(device_need)} of "
                        f"{device.type} memory (one layer, one batch of inputs, Grams {human(est.grams)}, largest "
                        f"transient {human(est.transient)}) and {human(mem_free)} is free; see workbench plan PROFILE")
    if host_need > host_free:
        problems.append(f"with offload = \"{offload}\" the calibration needs about {human(host_need)} more host "
                        f"memory and {human(host_free)} is available; "
                        + ("offload = \"disk\" keeps the weights off the host" if offload == "cpu"
                           else "fewer calibration.samples × calibration.seq_len shrink the inputs"))
    return problems


def check_training(model: torch.nn.Module, plans: Sequence, recovery, device: torch.device,
                   memory: Callable[[torch.device], int] | None = None) -> str:
    """`[recovery]` training's memory (engine/recovery.training_memory) against what is free beside the
    loaded model; UsageError (exit 2) when it does not fit, else a one-line summary."""
    from workbench.engine.recovery import training_memory

    targets = [(p.in_features, p.out_features) for p in plans for _ in p.layers]
    need = training_memory(model.config, targets, recovery, next(model.parameters()).element_size())
    free = (memory or free_memory)(device)
    if need > free:
        raise UsageError(
            f"preflight: the LoRA recovery may not fit in {device.type} memory: it needs about {human(need)} on "
            f"top of the loaded model (activations of {recovery.batch_size} × {recovery.seq_len} tokens kept for "
            f"the backward pass, the adapters and their AdamW state) and {human(free)} is available. Lower "
            f"recovery.batch_size or recovery.seq_len\n  (workbench run --skip-preflight runs anyway)")
    return f"preflight: LoRA recovery needs about {human(need)} of {human(free)} available {device.type} memory"
