"""Saving a compressed model and rebuilding it: `workbench.load_compressed(DIR)`.

Layout of `DIR/model/`: the dense `config.json`, the tokenizer, `compression.json` (which modules
are low-rank, at what rank, which share a basis, which adapter compressed it) and
`model.safetensors` holding every tensor once: a group's shared basis P is stored under
`workbench.basis.<group>` instead of per layer. Everything that was not compressed (embeddings,
norms, biases, rotary and sliding-window settings in the config) is saved as it was.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workbench.errors import UsageError, WorkbenchError, blame
from workbench.sources.files import check_file, read_json
from workbench.engine.lowrank import LowRankLinear, factor_linear
from workbench.api import Adapter

FORMAT = "workbench.compressed/1"
BASIS_PREFIX = "workbench.basis."


def _lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def save_compressed(model: nn.Module, tokenizer: Any, directory: Path, groups: list[dict[str, Any]],
                    adapter: Adapter | None = None, offloaded: Any = None) -> None:
    """Write the model into `directory` (which the caller made and will publish atomically).

    `groups` is the engine's rank table; each non-dense entry has `group` and `modules` (names).
    `adapter`, when given, is recorded so loading rebuilds the model the way that adapter says.
    `offloaded` (workbench.engine.offload.OffloadedLayers): the decoder layers are not in memory;
    the tensors are written as shards, a layer at a time, with `model.safetensors.index.json`.
    """
    if offloaded is not None:
        _save_offloaded(model, tokenizer, directory, groups, adapter, offloaded)
        return
    _write_config_and_tokenizer(model, tokenizer, directory)
    state = model.state_dict()
    manifest_groups = []
    for entry in groups:
        if entry["dense"]:
            continue
        names = entry["modules"]
        # On disk the factors keep their first names (`<module>.coef`, the basis once per group), which
        # exports and earlier workbench versions read; in memory they are `<module>.{coef,basis}.weight`.
        state[BASIS_PREFIX + entry["group"]] = state[f"{names[0]}.basis.weight"]
        for name in names:
            del state[f"{name}.basis.weight"]
            state[f"{name}.coef"] = state.pop(f"{name}.coef.weight")
        manifest_groups.append({"group": entry["group"], "modules": names, "rank": entry["rank"],
                                "in": entry["in"], "out": entry["out"]})
    # Tied weights (embeddings / lm_head) share storage: keep the first name only.
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name in list(state):
        ptr = state[name].data_ptr()  # the view itself, not its storage: group blocks share one
        if ptr in seen and state[name].shape == state[seen[ptr]].shape:
            tied[name] = seen[ptr]
            del state[name]
        else:
            seen[ptr] = name
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(directory / "model.safetensors"),
              metadata={"format": FORMAT})
    manifest = {"format": FORMAT, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "adapter": adapter.name if adapter is not None else None,
                "groups": manifest_groups, "tied": tied,
                "biases": {n: m.bias is not None for n, m in _lowrank_modules(model).items()}}
    (directory / "compression.json").write_text(json.dumps(manifest, indent=2))


def disk_names(state: dict[str, torch.Tensor], groups: list[dict[str, Any]]
               ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The names `save_compressed` stores a state dict under, for a part of one (a layer's tensors):
    a group's basis once as `workbench.basis.<group>` (with its first module), `<module>.coef` for Q,
    and tied tensors once. Returns (tensors by stored name, {tied name: the name kept})."""
    state = dict(state)
    for entry in groups:
        if entry["dense"]:
            continue
        names = entry["modules"]
        for name in names:
            basis = state.pop(f"{name}.basis.weight", None)
            if basis is not None and name == names[0]:
                state[BASIS_PREFIX + entry["group"]] = basis
            if f"{name}.coef.weight" in state:
                state[f"{name}.coef"] = state.pop(f"{name}.coef.weight")
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for name in list(state):
        ptr = state[name].data_ptr()
        if ptr in seen and state[name].shape == state[seen[ptr]].shape:
            tied[name] = seen[ptr]
            del state[name]
        else:
            seen[ptr] = name
    return state, tied


def _write_config_and_tokenizer(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """config.json (without a GGUF quantization config, which would make transformers refuse it) and the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def _save_offloaded(model: nn.Module, tokenizer: Any, directory: Path, groups: list[dict[str, Any]],
                    adapter: Adapter | None, offloaded: Any) -> None:
    from workbench.engine.offload import save_offloaded

    _write_config_and_tokenizer(model, tokenizer, directory)
    tied = save_offloaded(offloaded, model, directory, lambda part: disk_names(part, groups))
    manifest_groups = [{"group": e["group"], "modules": e["modules"], "rank": e["rank"], "in": e["in"],
                        "out": e["out"]} for e in groups if not e["dense"]]
    manifest = {"format": FORMAT, "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                "adapter": adapter.name if adapter is not None else None,
                "groups": manifest_groups, "tied": tied,
                "biases": {n: m.bias is not None for n, m in _lowrank_modules(model).items()}}
    (directory / "compression.json").write_text(json.dumps(manifest, indent=2))


def _read_shards(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model saved as shards (`model.safetensors.index.json`), each file checked."""
    from workbench.engine.offload import shard_files
    from workbench.sources.models import safetensors_problem

    state: dict[str, torch.Tensor] = {}
    for shard in shard_files(directory):
        problem = safetensors_problem(shard)
        if problem:
            raise UsageError(f"{shard}: {problem}")
        state.update(load_file(str(shard)))
    return state


def _model_dir(path: Path) -> Path:
    path = Path(path)
    if (path / "model" / "compression.json").exists():
        return path / "model"
    if (path / "compression.json").exists():
        return path
    raise UsageError(f"{path} holds no compressed model (no compression.json); was it run with save_model = false?")


def _saved_adapter(manifest: dict[str, Any]) -> Adapter:
    """The adapter that compressed the model if it is installed; else the generic defaults."""
    name = manifest.get("adapter")
    if name:
        from workbench.registry import get_registry

        adapter = get_registry().adapters.get(name)
        if adapter is not None:
            return adapter
    return Adapter()  # build_model / replace_module defaults fit any transformers causal LM


_DTYPES = ("float32", "float16", "bfloat16", "float64")


def _read_manifest(directory: Path) -> dict[str, Any]:
    """compression.json, checked field by field so a damaged one is named instead of a KeyError later."""
    manifest = read_json(directory / "compression.json", "compressed model", max_bytes=256 << 20)
    if not isinstance(manifest, dict):
        raise UsageError(f"{directory}/compression.json: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{directory}: unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    problems = []
    if manifest.get("dtype") not in _DTYPES:
        problems.append(f"dtype {manifest.get('dtype')!r} (expected one of {', '.join(_DTYPES)})")
    groups = manifest.get("groups")
    if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("group"), str) and isinstance(g.get("modules"), list)
            and all(isinstance(m, str) for m in g["modules"])
            and all(isinstance(g.get(k), int) and not isinstance(g.get(k), bool) and g[k] >= 1
                    for k in ("rank", "in", "out")) for g in groups):
        problems.append("'groups' is not a list of {group, modules, rank, in, out}")
    for key in ("tied", "biases"):
        if not isinstance(manifest.get(key), dict):
            problems.append(f"'{key}' is not an object")
    if problems:
        raise UsageError(f"{directory}/compression.json is damaged: " + "; ".join(problems))
    return manifest


def load_compressed(path, device: str = "cpu", dtype: torch.dtype | None = None,
                    max_memory: dict | None = None, offload_folder: str | Path | None = None) -> nn.Module:
    """Rebuild the compressed model with the same structure and weights it was saved with.

    A damaged folder (a file missing, truncated or edited) is a UsageError naming the file and what is
    wrong; an installed adapter that fails is a PluginError naming it.

    `max_memory` ({device: bytes or "10GiB"}, as accelerate takes it): a model larger than `device`
    is spread by accelerate (`infer_auto_device_map`, `dispatch_model`): what does not fit the
    device goes to the host, and what does not fit there to `offload_folder` on disk; each layer
    comes to `device` for its forward pass.
    """
    directory = _model_dir(Path(path))
    try:
        model = _load(directory, "cpu" if max_memory is not None else device, dtype)
    except WorkbenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged file makes torch, safetensors or transformers raise
        raise UsageError(f"{directory}: the saved model cannot be loaded, a file in it is damaged or does not "
                         f"match compression.json ({type(exc).__name__}: {exc})") from exc
    return model if max_memory is None else _dispatch(model, device, max_memory, offload_folder)


def _dispatch(model: nn.Module, device: str, max_memory: dict, offload_folder: str | Path | None) -> nn.Module:
    """The model spread over `max_memory` by accelerate, computed on `device` (load_compressed)."""
    from accelerate import dispatch_model, infer_auto_device_map

    try:
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=list(getattr(model, "_no_split_modules", None) or []))
    except (ValueError, TypeError) as exc:
        raise UsageError(f"max_memory {max_memory!r}: {exc}") from exc
    if "disk" in device_map.values() and offload_folder is None:
        raise UsageError(f"max_memory {max_memory!r} leaves part of the model for the disk: give offload_folder, "
                         f"a folder it can be written to")
    torch_device = torch.device(device)
    return dispatch_model(model, device_map=device_map, main_device=str(torch_device),
                          offload_dir=None if offload_folder is None else str(offload_folder), force_hooks=True)


def _load(directory: Path, device: str, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig

    manifest = _read_manifest(directory)
    saved_dtype = getattr(torch, manifest["dtype"])
    from workbench.sources.models import check_model_files, refuse_remote_code

    refuse_remote_code(directory)  # before transformers reads the config: never run a model folder's code
    sharded = (directory / "model.safetensors.index.json").exists() and not (directory / "model.safetensors").exists()
    weights = directory / "model.safetensors.index.json" if sharded else check_file(directory / "model.safetensors",
                                                                                     "compressed model")
    check_model_files(directory, "compressed model")  # config.json readable, model.safetensors complete
    try:
        config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise UsageError(f"{directory}/config.json cannot be read: {exc}") from exc
    adapter = _saved_adapter(manifest)
    with blame(f"adapter '{adapter.name}'", f"building the model of {directory}"):
        model = adapter.build_model(config, saved_dtype)
    try:
        state = _read_shards(directory) if sharded else load_file(str(weights))
    except WorkbenchError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type for a truncated file
        raise UsageError(f"{weights}: truncated or not a safetensors file ({exc})") from exc
    absent = [BASIS_PREFIX + g["group"] for g in manifest["groups"] if BASIS_PREFIX + g["group"] not in state]
    if absent:
        raise UsageError(f"{weights}: does not match compression.json: no tensor {absent[0]}"
                         + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    for group in manifest["groups"]:
        basis = factor_linear(group["in"], group["rank"], dtype=saved_dtype,  # one module, shared by the group
                              weight=nn.Parameter(state.pop(BASIS_PREFIX + group["group"]), requires_grad=False))
        for name in group["modules"]:
            module = LowRankLinear(group["in"], group["out"], group["rank"], bias=manifest["biases"].get(name, False),
                                   basis=basis, dtype=saved_dtype)
            with blame(f"adapter '{adapter.name}'", f"replacing {name}"):
                adapter.replace_module(model, name, module)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(".basis.weight") and m not in manifest["tied"]]
    if missing or unexpected:
        raise UsageError(f"{directory}: weights do not match the saved structure "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, source in manifest["tied"].items():
        parent, _, child = name.rpartition(".")
        src_parent, _, src_child = source.rpartition(".")
        setattr(model.get_submodule(parent), child, getattr(model.get_submodule(src_parent), src_child))
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()
