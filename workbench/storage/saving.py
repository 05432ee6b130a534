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

from workbench.errors import UsageError, blame
from workbench.engine.lowrank import LowRankLinear
from workbench.api import Adapter

FORMAT = "workbench.compressed/1"
BASIS_PREFIX = "workbench.basis."


def _lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def save_compressed(model: nn.Module, tokenizer: Any, directory: Path, groups: list[dict[str, Any]],
                    adapter: Adapter | None = None) -> None:
    """Write the model into `directory` (which the caller made and will publish atomically).

    `groups` is the engine's rank table; each non-dense entry has `group` and `modules` (names).
    `adapter`, when given, is recorded so loading rebuilds the model the way that adapter says.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))
    state = model.state_dict()
    manifest_groups = []
    for entry in groups:
        if entry["dense"]:
            continue
        names = entry["modules"]
        state[BASIS_PREFIX + entry["group"]] = state[f"{names[0]}.basis"]
        for name in names:
            del state[f"{name}.basis"]
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


def load_compressed(path, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """Rebuild the compressed model with the same structure and weights it was saved with."""
    from transformers import AutoConfig

    directory = _model_dir(Path(path))
    manifest = json.loads((directory / "compression.json").read_text())
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{directory}: unsupported format {manifest.get('format')!r} (expected {FORMAT})")
    saved_dtype = getattr(torch, manifest["dtype"])
    from workbench.sources.models import refuse_remote_code

    refuse_remote_code(directory)  # before transformers reads the config: never run a model folder's code
    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    adapter = _saved_adapter(manifest)
    with blame(f"adapter '{adapter.name}'", f"building the model of {directory}"):
        model = adapter.build_model(config, saved_dtype)
    state = load_file(str(directory / "model.safetensors"))
    for group in manifest["groups"]:
        basis = nn.Parameter(state.pop(BASIS_PREFIX + group["group"]), requires_grad=False)
        for name in group["modules"]:
            module = LowRankLinear(group["in"], group["out"], group["rank"], bias=manifest["biases"].get(name, False),
                                   basis=basis, dtype=saved_dtype)
            with blame(f"adapter '{adapter.name}'", f"replacing {name}"):
                adapter.replace_module(model, name, module)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not m.endswith(".basis") and m not in manifest["tied"]]
    if missing or unexpected:
        raise UsageError(f"{directory}: weights do not match the saved structure "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, source in manifest["tied"].items():
        parent, _, child = name.rpartition(".")
        src_parent, _, src_child = source.rpartition(".")
        setattr(model.get_submodule(parent), child, getattr(model.get_submodule(src_parent), src_child))
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval()
