"""`workbench plan`'s inputs: a run's shapes from the model's config alone, and what this machine offers.

The model is built on the meta device (accelerate's `init_empty_weights`): no weights are read or
allocated, yet the adapter, the groups and the parameter counts are exactly those of a real run.
The config comes from a local directory, a config.json, a model in the local Hugging Face cache, a
.gguf file or an embedded model; transformers is always called with `trust_remote_code=False`, and a
config with an `auto_map` (code shipped with the model) is refused as `load_model` refuses it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from workbench.errors import UsageError
from workbench.run.plan import Machine, Shapes


@dataclass(frozen=True)
class PlannedModel:
    shapes: Shapes
    description: str  # e.g. "LlamaForCausalLM, 80 layers, hidden 8192, 68.98 B parameters, bfloat16"
    source: str


def read_config(source: str, what: str = "model.source") -> Any:
    """The transformers config of `source`, without reading any weights."""
    from transformers import AutoConfig

    from workbench.sources import models

    path = Path(source).expanduser()
    try:
        if source in models.EMBEDDED or source in models.MULTI_HEAD_COPIES:
            base = models.MULTI_HEAD_COPIES.get(source, source)
            config = _gguf_config(models._embedded_gguf(base))  # noqa: SLF001 - the package's GGUF, header only
            if source in models.MULTI_HEAD_COPIES:  # its K/V heads repeated (sources/multi_head.py)
                config.num_key_value_heads = config.num_attention_heads
            return config
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UsageError(f"{what}: directory '{path}' has no config.json; it is not a transformers model")
            _refuse_auto_map(path / "config.json", what)
            return AutoConfig.from_pretrained(path, trust_remote_code=False)
        if path.is_file() and path.suffix.lower() == ".json":
            _refuse_auto_map(path, what)
            return AutoConfig.from_pretrained(path, trust_remote_code=False)
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _gguf_config(path)
        if path.exists():
            raise UsageError(f"{what}: '{source}' is not a model directory, a config.json or a .gguf file")
        if source.startswith(("/", ".", "~", "embedded:")) or path.suffix.lower() in (".json", ".gguf") \
                or source.count("/") > 1:  # a path, not a hub id "org/name"
            raise UsageError(f"{what}: '{source}' does not exist (give a model directory, a config.json, a .gguf "
                             "file or a hub id in the local cache)")
        return _cached_config(source, what)
    except (OSError, ValueError, KeyError) as exc:  # transformers: unreadable JSON, an unknown model_type
        raise UsageError(f"{what}: cannot read the config of '{source}': {exc}") from None


def _gguf_config(path: Path) -> Any:
    from gguf import GGUFReader
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    # The GGUF's metadata does not say whether lm_head shares the embeddings; a missing output
    # tensor does (as the loader ties them then). The reader maps the file; no tensor is read.
    config.tie_word_embeddings = "output.weight" not in {t.name for t in GGUFReader(path).tensors}
    return config


def _cached_config(repo_id: str, what: str) -> Any:
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig

    cached = try_to_load_from_cache(repo_id, "config.json")
    if not isinstance(cached, str):
        raise UsageError(f"{what}: '{repo_id}' has no config.json in the local Hugging Face cache. Plan from its "
                         f"config alone: `huggingface-cli download {repo_id} config.json`, or pass --model with a "
                         "config.json or a model directory")
    _refuse_auto_map(Path(cached), what)
    return AutoConfig.from_pretrained(Path(cached), trust_remote_code=False)


def _refuse_auto_map(path: Path, what: str) -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{what}: {path} is not a JSON object, so not a model config")
    if "auto_map" in data:
        raise UsageError(f"{what}: {path} has the key \"auto_map\": it asks to run Python code shipped with the "
                         "model, and workbench never runs code from a model folder; use a model without auto_map")


def plan_model(profile, registry, source: str | None = None, dtype: str | None = None,
               ratio: float | None = None) -> PlannedModel:
    """The shapes of `profile`'s run (its model replaced by `source`, its dtype by `dtype`) from the config."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from workbench.engine.grouping import plan_groups
    from workbench.profile.fit import check_ratio
    from workbench.run.preflight import shapes_of
    from workbench.run.resources import count_parameters
    from workbench.sources.models import resolve_dtype

    source = source or profile.model.source
    dtype = dtype or profile.model.dtype
    torch_dtype = resolve_dtype(dtype)
    config = read_config(source, "--model" if source != profile.model.source else "model.source")
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot build a model from the config of '{source}': {exc}") from None
    model.tie_weights()  # from_config leaves tied embeddings apart (and cannot tie under init_empty_weights)
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, profile.compression.targets, profile.compression.ignore,
                        profile.compression.group_size)
    ratio = profile.compression.ratio if ratio is None else ratio
    check_ratio(plans, ratio, "compression.ratio" if ratio == profile.compression.ratio else "--ratio")
    params = count_parameters(model)
    needs = tuple(registry.get("allocator", profile.compression.allocator).needs)
    shapes = replace(shapes_of(model, plans, profile, params, adapter, needs), ratio=ratio)
    layers = adapter.decoder_layers(model)
    description = (f"{type(model).__name__}, {len(layers)} layers, hidden {shapes.hidden}, "
                   f"{params / 1e9:.2f} B parameters, {dtype}")
    return PlannedModel(shapes, description, source)


def this_machine(output: Path) -> Machine:
    """Available host memory (psutil), free memory per visible CUDA device, free disk where `output` goes."""
    import psutil
    import torch

    folder = Path(output).absolute()
    while not folder.exists():
        folder = folder.parent
    gpus, names = [], []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(index)
            gpus.append(int(free))
            names.append(torch.cuda.get_device_name(index))
    return Machine(host=int(psutil.virtual_memory().available), disk=int(shutil.disk_usage(folder).free),
                   gpus=tuple(gpus), gpu_names=tuple(names))
