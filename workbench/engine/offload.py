"""Offload: compress a model whose weights do not fit the compute device (`[model] offload`).

Two places a decoder layer's weights can be, kept apart on purpose (`Devices`):
  compute device  where a layer runs (the profile's device: cuda, or cpu on a CPU-only machine);
  home            where its weights wait between uses: the compute device itself ("none"), host
                  memory ("cpu", pinned under CUDA) or the model's safetensors shards ("disk",
                  read lazily, layer by layer, with `safetensors.safe_open`).

Under offload the model is a skeleton built on the meta device (accelerate's `init_empty_weights`,
in `workbench.sources.models`); the embeddings, final norm and lm_head are loaded onto the compute
device, and every decoder layer stays on meta except while it is used:
  calibration   `OffloadPlacement` materialises layer i before its pass and sends it back to meta
                after (a layer a pending shared-basis group still needs stays until the group is
                factored); `HostInputs` keeps the calibration inputs on the host between layers and
                streams them to the device batch by batch; `factors_to_host` moves each group's
                factors off the device once checked;
  assembly      `assemble_offloaded` swaps the low-rank modules in layer by layer and writes each
                finished layer to a file, which becomes that layer's home; `save_offloaded` writes
                the output model as shards (`model-NNNNN-of-MMMMM.safetensors`), a layer at a time;
  forward       `dispatched` attaches accelerate's `AlignDevicesHook` to every layer, with the
                layer's home as its weights map, for the evaluators.

`choose_offload` resolves "auto" by one simple rule (documented in docs/scaling.md, "Offload").
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from workbench.engine.calibration import capture_layer_inputs, layer_forward
from workbench.engine.walk import LayerInputs, Placement, Strategies
from workbench.errors import UsageError

OFFLOAD_MODES = ("none", "cpu", "disk", "auto")
# "auto" keeps the model where it runs only when its weights fit the free memory with this margin
# (activations, Grams and the factoring transient come on top; preflight checks those).
AUTO_HEADROOM = 1.25
HOST = torch.device("cpu")


@dataclass(frozen=True)
class Devices:
    """Where decoder layers run (`compute`) and where their weights wait between uses (`home`)."""

    compute: torch.device
    home: str  # "compute" (offload "none"), "cpu" (host memory) or "disk" (the safetensors shards)

    @property
    def mode(self) -> str:
        return {"compute": "none"}.get(self.home, self.home)

    @property
    def offloaded(self) -> bool:
        return self.home != "compute"

    @property
    def pin(self) -> bool:
        """Host tensors are pinned when they stream to a CUDA device (faster, asynchronous copies)."""
        return self.compute.type == "cuda"

    @property
    def layers_on_compute(self) -> bool:
        """Whether a layer's home is memory the compute device reads directly (no copy needed)."""
        return self.home == "compute" or (self.home == "cpu" and self.compute.type == "cpu")


# ---------------------------------------------------------------------------------- "auto"


def free_bytes(device: torch.device) -> int:
    """Free memory of `device`: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


# Host allocations from this size are mapped on their own (glibc's M_MMAP_THRESHOLD), so freeing one
# returns it to the system. glibc raises its threshold to 32 MiB as large blocks are freed, and the
# Gram, factor and SVD buffers of a layer below that size then stay in the heap, fragmented
# (bench/offload.py, one LLaMA-7B-shaped layer under "disk": 3.89 → 3.82 GiB peak with it).
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h


def return_freed_host_memory() -> bool:
    """Under offload, where host memory is what is being saved: fix glibc's mmap threshold at
    MMAP_THRESHOLD. True when set; False where the C library is not glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def choose_offload(requested: str, weights_bytes: int, compute: torch.device,
                   free: Callable[[torch.device], int] = free_bytes) -> str:
    """The offload mode to use. "auto" is the least offload whose weights fit:

    "none" when the weights fit the compute device's free memory with 25% to spare; else, on a
    GPU, "cpu" when they fit the host's available memory that way; else "disk". (On a CPU-only
    machine host and device are the same memory, so "cpu" never helps and "auto" goes from
    "none" to "disk".) The one place that decides: a finer estimate (the run's Grams, inputs and
    factors) can replace this rule without touching anything else.
    """
    if requested not in OFFLOAD_MODES:
        raise UsageError(f"model.offload: unknown mode {requested!r} (allowed: {', '.join(OFFLOAD_MODES)})")
    if requested != "auto":
        return requested
    need = weights_bytes * AUTO_HEADROOM
    if need <= free(compute):
        return "none"
    if compute.type != "cpu" and need <= free(HOST):
        return "cpu"
    return "disk"


# ---------------------------------------------------------------------------------- lazy weights


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (those its index names, else every *.safetensors)."""
    index = folder / INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


class SafetensorsWeights(Mapping):
    """{tensor name: tensor} over safetensors files, each tensor read from its file when asked for.

    Nothing is cached: reading a layer's tensors costs that layer's bytes, and dropping them frees
    them. `aliases` maps a name to the stored key it is read from (a shared basis stored once).
    """

    def __init__(self, files: Sequence[Path], aliases: Mapping[str, str] | None = None):
        from safetensors import safe_open

        self._where: dict[str, tuple[str, str]] = {}
        self._numel = 0
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    self._where[key] = (str(path), key)
                    self._numel += int(torch.Size(handle.get_slice(key).get_shape()).numel())
        for name, key in (aliases or {}).items():
            self._where[name] = self._where[key]

    def __getitem__(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path, key = self._where[name]
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor
        return name in self._where

    def numel(self) -> int:
        """Elements stored in the files (each stored tensor once)."""
        return self._numel


class Prefixed(Mapping):
    """The part of a mapping under `prefix`, with the prefix left off the names."""

    def __init__(self, data: Mapping, prefix: str):
        self.data, self.prefix = data, prefix

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.data[self.prefix + name]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.prefix + name in self.data

    def __iter__(self) -> Iterator[str]:
        return (k[len(self.prefix):] for k in self.data if k.startswith(self.prefix))

    def __len__(self) -> int:
        return sum(1 for _ in self)


# ---------------------------------------------------------------------------------- the layers


def _tensor_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()]


def _set(module: nn.Module, name: str, device, value: torch.Tensor | None = None, non_blocking: bool = False) -> None:
    from accelerate.utils import set_module_tensor_to_device

    # clear_cache=False: emptying CUDA's cache on every tensor would cost more than the copy
    set_module_tensor_to_device(module, name, device, value=value, non_blocking=non_blocking, clear_cache=False)


def is_materialised(layer: nn.Module) -> bool:
    return any(p.device.type != "meta" for p in layer.parameters())


class OffloadedLayers:
    """The decoder layers of an offloaded model: each one's home (a {name: tensor} mapping) and
    moving it to the compute device (`materialise`) and back to meta (`release`)."""

    def __init__(self, devices: Devices, layers: nn.ModuleList, prefix: str, homes: list[Mapping]):
        self.devices, self.layers, self.prefix, self.homes = devices, layers, prefix, homes

    def materialise(self, index: int) -> None:
        layer, home = self.layers[index], self.homes[index]
        pinned = self.devices.home == "cpu" and self.devices.pin  # copies from pinned memory can overlap
        for name in _tensor_names(layer):
            _set(layer, name, self.devices.compute, home[name], non_blocking=pinned)

    def release(self, index: int) -> None:
        layer = self.layers[index]
        for name in _tensor_names(layer):
            _set(layer, name, "meta")

    def materialised(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if is_materialised(layer)]


def attach(model: nn.Module, adapter: Any, devices: Devices, weights: Mapping) -> OffloadedLayers:
    """Load a meta skeleton's non-layer weights onto the compute device and give each decoder layer
    its home: host copies (pinned under CUDA) for "cpu", the lazy `weights` themselves for "disk"."""
    from workbench.engine.grouping import module_prefix

    layers = adapter.decoder_layers(model)
    prefix = module_prefix(model, layers)
    layer_names = {f"{prefix}.{i}." for i in range(len(layers))}
    for name in _tensor_names(model):
        if any(name.startswith(p) for p in layer_names):
            continue
        if name in weights:
            _set(model, name, devices.compute, weights[name])
    for name, _ in model.named_buffers():  # rotary tables: made on the host by the skeleton
        if not any(name.startswith(p) for p in layer_names):
            _set(model, name, devices.compute)
    with contextlib.suppress(AttributeError):
        model.tie_weights()  # lm_head shares the embeddings where the config says so
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta" and not any(name.startswith(p) for p in layer_names):
            raise UsageError(f"model.offload: the model's weights have no tensor {name!r}; its safetensors files "
                             f"do not match its config. Use offload = \"none\"")
    homes: list[Mapping] = []
    for i, layer in enumerate(layers):
        view = Prefixed(weights, f"{prefix}.{i}.")
        missing = [n for n in _tensor_names(layer) if n not in view]
        if missing:
            raise UsageError(f"model.offload: the model's weights have no tensor {prefix}.{i}.{missing[0]}; "
                             f"its safetensors files do not match its config. Use offload = \"none\"")
        if devices.home == "cpu":
            dtype = next(layer.parameters()).dtype
            view = {n: _host_copy(view[n].to(dtype), devices.pin) for n in _tensor_names(layer)}
        homes.append(view)
    return OffloadedLayers(devices, layers, prefix, homes)


def _host_copy(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin else tensor


# ---------------------------------------------------------------------------------- calibration


class OffloadPlacement(Placement):
    """Materialises layer i on the compute device before its pass and sends it home after, except
    while a pending group (a basis shared with later layers) still needs its weights to be factored."""

    def __init__(self, offloaded: OffloadedLayers, plans: Sequence[Any]):
        self.offloaded = offloaded
        # layer -> the last layer of any group it belongs to: it may go home once that one is done
        self.until: dict[int, int] = {}
        self.partners: dict[int, set[int]] = {}  # layer -> itself and the earlier layers of its groups
        for plan in plans:
            for i in plan.layers:
                self.until[i] = max(self.until.get(i, i), plan.layers[-1])
                self.partners.setdefault(i, {i}).update(j for j in plan.layers if j < i)
        self.live: set[int] = set()

    def before(self, index: int, layer: nn.Module) -> None:
        # A walk resumed inside a group starts with the group's earlier layers gone home: bring them too.
        for i in sorted(self.partners.get(index, {index})):
            if i not in self.live:
                self.offloaded.materialise(i)
                self.live.add(i)

    def after(self, index: int, layer: nn.Module) -> None:
        for i in sorted(self.live):
            if self.until.get(i, i) <= index:
                self.offloaded.release(i)
                self.live.discard(i)

    def release_all(self) -> None:
        for i in sorted(self.live):
            self.offloaded.release(i)
        self.live.clear()


class HostInputs(LayerInputs):
    """The calibration inputs live on the host between layers (pinned under CUDA) and go to the
    compute device one batch at a time; the keyword arguments (rotary tables, masks) stay on it.

    With `park` (offload "disk"), each batch's output waits for the next layer in a file there,
    written as soon as it is made and mapped back into memory (pages read when used, the kernel's to
    drop), instead of in host memory: 0.25 GiB at LLaMA-7B widths with 16 × 1024 tokens, 8 GiB for a
    70B model's 256 × 2048 in bfloat16. A batch's input file is unmapped once its output replaces it,
    so a layer's forward holds the pages of one batch in and one out, not a layer's inputs and outputs."""

    def __init__(self, devices: Devices, park: Path | None = None):
        super().__init__()
        self.devices = devices
        self.park = park

    def _home(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device == HOST:
            return tensor
        out = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.devices.pin)
        return out.copy_(tensor)

    def _file(self, j: int) -> Path:
        return self.park / f"inputs-{j:05d}.safetensors"

    def capture(self, model, first_layer, windows, batch_size, device, check) -> None:
        self.batches = capture_layer_inputs(model, first_layer, windows, batch_size, device, check)
        for batch in self.batches:
            batch.hidden = self._home(batch.hidden)

    def forward(self, index: int, layer: nn.Module, check) -> None:
        compute = self.devices.compute
        with torch.inference_mode():
            for j, batch in enumerate(self.batches):
                if check:
                    check()
                out = self._home(layer_forward(layer, batch.hidden.to(compute, non_blocking=True), batch.kwargs))
                # one file per batch, written beside the input's and renamed over it (safetensors copies what it writes)
                batch.hidden = out if self.park is None else write_mapped(self._file(j), {"hidden": out})["hidden"]
                del out

    def inputs(self) -> list[torch.Tensor]:
        """The next layer's hidden states; parked ones mapped afresh, so that the pages a reader (the
        checkpoint) makes resident go with the reader's copy, not with the walk's."""
        if self.park is None:
            return super().inputs()
        return [_mapped(self._file(j))["hidden"] for j in range(len(self.batches))]


def write_mapped(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write `tensors` to a safetensors file and return them mapped from it (pages read when used).

    Written beside and renamed over `path`: a file of that name still mapped somewhere stays intact."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(partial))
    os.replace(partial, path)
    return _mapped(path)


def _mapped(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def factors_to_host(factor: Callable, spill: "FactorSpill | None" = None) -> Callable:
    """Wrap the walk's factor step: a group's factors leave the device once checked and compacted
    (to host memory; with `spill`, to a file mapped back into memory)."""

    def keep(key: str, factors) -> None:
        factors.singular_values = factors.singular_values.to(HOST)
        factors.u = factors.u.to(HOST)
        factors.vt_linv = factors.vt_linv.to(HOST)
        if spill is not None:
            spill.write(key, factors)

    def moved(layers, plan, stats):
        factors, entry = factor(layers, plan, stats)
        keep(plan.key, factors)
        return factors, entry

    # Under torchrun each process factors some groups and receives the others' (DistributedReducer):
    # those go through `keep` too, so they are spilled where this process's own are.
    moved.keep = keep
    return moved


class FactorSpill:
    """Factors kept for allocation, written to safetensors files in `folder` and held as tensors
    mapped from them (safetensors maps the file: pages are read when used, and are the kernel's to
    drop again), so under "disk" they do not accumulate in host memory. Whatever reads them (the
    checkpoint writing them once) makes their pages resident: `remap` after each layer maps every
    file afresh, dropping those pages."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.files: dict[str, Path] = {}

    def write(self, key: str, factors: Any) -> None:
        path = self.folder / f"group-{len(self.files):05d}.safetensors"
        self.files[key] = path
        mapped = write_mapped(path, {"u": factors.u, "vt_linv": factors.vt_linv})
        factors.u, factors.vt_linv = mapped["u"], mapped["vt_linv"]

    def remap(self, factors: dict) -> None:
        for key, path in self.files.items():
            if key in factors:
                mapped = _mapped(path)
                factors[key].u, factors[key].vt_linv = mapped["u"], mapped["vt_linv"]


def strategies(offloaded: OffloadedLayers, plans: Sequence[Any], accumulator, park: Path | None = None) -> Strategies:
    return Strategies(placement=OffloadPlacement(offloaded, plans), accumulator=accumulator,
                      propagator=HostInputs(offloaded.devices, park))


# ---------------------------------------------------------------------------------- forward passes


@contextlib.contextmanager
def dispatched(offloaded: OffloadedLayers | None) -> Iterator[None]:
    """Every decoder layer runs with accelerate's AlignDevicesHook: its weights come from its home to
    the compute device for the forward and go back to meta after (so at most one layer is there)."""
    if offloaded is None:
        yield
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module

    for layer, home in zip(offloaded.layers, offloaded.homes):
        add_hook_to_module(layer, AlignDevicesHook(execution_device=offloaded.devices.compute, offload=True,
                                                   io_same_device=False, weights_map=home, place_submodules=True))
    try:
        yield
    finally:
        for layer in offloaded.layers:
            remove_hook_from_module(layer)
            for name in _tensor_names(layer):
                if getattr(layer.get_parameter(name), "device", None) != torch.device("meta"):
                    _set(layer, name, "meta")


@contextlib.contextmanager
def all_resident(offloaded: OffloadedLayers | None, what: str = "this pass",
                 allocators: Sequence[str] = ()) -> Iterator[None]:
    """Every layer in place for a whole-model pass that needs them all at once (a backward pass).

    Only where it costs nothing: the layers' home is memory the compute device reads directly
    ("cpu" offload on a CPU-only machine). Otherwise refused, naming what works instead."""
    if offloaded is None:
        yield
        return
    if not offloaded.devices.layers_on_compute:
        instead = (f"compression.allocator = \"{allocators[0]}\" (or {', '.join(allocators[1:])}), which needs no signal"
                   if allocators else "an allocator that needs no signal")
        raise UsageError(f"{what} runs a backward pass through the whole model, which offload = "
                         f"\"{offloaded.devices.mode}\" cannot hold on {offloaded.devices.compute}; use {instead}, "
                         f"or model.offload = \"none\"")
    done = []
    try:
        for i in range(len(offloaded.layers)):
            offloaded.materialise(i)
            done.append(i)
        yield
    finally:
        for i in done:
            offloaded.release(i)


# ---------------------------------------------------------------------------------- assembly


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def assemble_offloaded(offloaded: OffloadedLayers, model: nn.Module, adapter: Any, plans: Sequence[Any],
                       factors: dict, ranks: dict, spectra: Sequence[Any], folder: Path,
                       check: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """`engine.compress.assemble`, a layer at a time: each group is assembled once its layers are in
    place; each finished layer is written to `folder` (`layer-NNNNN.safetensors`, its tensors under
    their names in the model) and that file becomes its home. Returns the rank table."""
    from safetensors.torch import save_file

    from workbench.engine.compress import assemble

    layers = offloaded.layers
    folder.mkdir(parents=True, exist_ok=True)
    placement = OffloadPlacement(offloaded, plans)
    rows: dict[str, dict[str, Any]] = {}
    for i in range(len(layers)):
        check()
        placement.before(i, layers[i])
        for plan in [p for p in plans if p.layers[-1] == i]:
            rows.update((row["group"], row) for row in assemble(model, adapter, [plan], factors, ranks, spectra))
        done = [j for j in sorted(placement.live) if placement.until.get(j, j) <= i]
        for j in done:  # all written before any is released: a group's layers hold one basis module
            prefix = f"{offloaded.prefix}.{j}."
            tensors = {prefix + name: t.detach().to(HOST).contiguous()
                       for name, t in layers[j].named_parameters(remove_duplicate=False)}
            path = folder / f"layer-{j:05d}.safetensors"
            save_file(tensors, str(path), metadata={"format": "pt"})
            offloaded.homes[j] = Prefixed(SafetensorsWeights([path]), prefix)
        for j in done:
            offloaded.release(j)
            placement.live.discard(j)
    return [rows[p.key] for p in plans]


def save_offloaded(offloaded: OffloadedLayers, model: nn.Module, folder: Path,
                   disk_names: Callable[[dict], tuple[dict, dict]]) -> dict[str, str]:
    """Write the model as shards into `folder`, one layer in memory at a time: shard 1 holds what is
    not a decoder layer, shard i + 2 layer i (read from its home); `disk_names` turns a part of the
    state dict into the names stored on disk. Returns {tied name: the name it shares storage with}."""
    from safetensors.torch import save_file

    count = len(offloaded.layers) + 1
    layer_prefix = f"{offloaded.prefix}."
    state = {n: t for n, t in model.state_dict(keep_vars=True).items() if not n.startswith(layer_prefix)}
    own, tied = disk_names(state)
    weight_map: dict[str, str] = {}
    parts = [(own, shard_name(1, count))]
    for i, home in enumerate(offloaded.homes):
        parts.append((lambda home=home, i=i: disk_names({f"{layer_prefix}{i}.{n}": home[n] for n in home})[0],
                      shard_name(i + 2, count)))
    for tensors, name in parts:
        tensors = tensors() if callable(tensors) else tensors
        save_file({k: v.detach().to(HOST).contiguous() for k, v in tensors.items()}, str(folder / name),
                  metadata={"format": "pt"})
        weight_map.update((k, name) for k in tensors)
        del tensors
    index = {"metadata": {"total_size": sum(os.path.getsize(folder / f) for f in set(weight_map.values()))},
             "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=1))
    return tied


INDEX = "model.safetensors.index.json"
