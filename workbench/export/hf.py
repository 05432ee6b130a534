"""`workbench export RUN_DIR --to DIR --format hf`: a folder plain transformers loads, no workbench needed.

DIR holds the low-rank model as transformers "remote code": `config.json` (the family's standard
config plus the rank table `low_rank`, a model type of its own and an `auto_map` naming the classes
in `modeling_lowrank.py`), the two template files copied from `templates/`, safetensors weights
(sharded above `max_shard_bytes`), the tokenizer, `generation_config.json` and a model card.
The tensors are the run's own, renamed: a shared basis is still stored once, as
`lowrank_bases.<group>`, so DIR is no bigger than the run's `model/`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from workbench.errors import UsageError
from workbench.export.card import model_card
from workbench.export.run_files import SavedRun, read_run
from workbench.export.writing import staged_export
from workbench.storage.saving import BASIS_PREFIX

TEMPLATES = Path(__file__).with_name("templates")
TEMPLATE_FILES = ("configuration_lowrank.py", "modeling_lowrank.py")
# model_type -> the class names inside the templates
CLASSES = {"llama": "LowRankLlama", "mistral": "LowRankMistral", "qwen2": "LowRankQwen2"}
DEFAULT_SHARD_BYTES = 2 * 10**9


def basis_keys(groups: list[dict[str, Any]]) -> dict[str, str]:
    """Group name ('q_proj@0-1') -> a parameter name ('q_proj_0_1'): module names allow no '@', '-' or '.'."""
    keys: dict[str, str] = {}
    for g in groups:
        key = re.sub(r"\W", "_", g["group"])
        while key in keys.values():
            key += "_"
        keys[g["group"]] = key
    return keys


def low_rank_table(run: SavedRun) -> dict[str, Any]:
    """`config.low_rank` as modeling_lowrank.py reads it."""
    keys = basis_keys(run.groups)
    biases = run.manifest.get("biases", {})
    table = []
    for g in run.groups:
        entry = {"key": keys[g["group"]], "rank": g["rank"], "in_features": g["in"], "out_features": g["out"],
                 "modules": g["modules"]}
        if any(biases.get(m) for m in g["modules"]):
            entry["bias"] = [bool(biases.get(m)) for m in g["modules"]]
        table.append(entry)
    return {"format": 1, "groups": table}


def export_config(run: SavedRun) -> dict[str, Any]:
    config = {k: v for k, v in run.config.items() if k not in ("auto_map", "_name_or_path")}
    name = CLASSES[run.family]
    config.update({
        "model_type": f"lowrank_{run.family}",
        "architectures": [f"{name}ForCausalLM"],
        "auto_map": {"AutoConfig": f"configuration_lowrank.{name}Config",
                     "AutoModelForCausalLM": f"modeling_lowrank.{name}ForCausalLM"},
        "dtype": run.manifest["dtype"],
        "low_rank": low_rank_table(run),
    })
    return config


def config_text(config: dict[str, Any]) -> str:
    """config.json as transformers writes it (indented, sorted keys), but one line per rank-table group:
    readable, and a few hundred groups do not make the file bigger than the run's manifest."""
    placeholder = '"@low_rank@"'
    text = json.dumps({**config, "low_rank": json.loads(placeholder)}, indent=2, sort_keys=True)
    table = config["low_rank"]
    groups = ",\n      ".join(json.dumps(g) for g in table["groups"])
    rest = "".join(f'    {json.dumps(k)}: {json.dumps(v)},\n' for k, v in sorted(table.items()) if k != "groups")
    inner = "{\n" + rest + '    "groups": [\n      ' + groups + "\n    ]\n  }"
    return text.replace(placeholder, inner) + "\n"


def _tensors(run: SavedRun) -> dict[str, torch.Tensor]:
    """The run's tensors under the names modeling_lowrank.py gives them."""
    from safetensors.torch import load_file

    state = load_file(str(run.model_dir / "model.safetensors"))
    keys = basis_keys(run.groups)
    for group, key in keys.items():
        state[f"lowrank_bases.{key}"] = state.pop(BASIS_PREFIX + group)
    tie_embeddings = bool(run.config.get("tie_word_embeddings"))
    for target, source in run.manifest.get("tied", {}).items():
        if not (tie_embeddings and target == "lm_head.weight"):  # transformers re-ties only the embeddings
            state[target] = state[source].clone()
    return state


def write_weights(state: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> list[str]:
    """safetensors file(s) in transformers' layout: one file, or shards plus an index. Returns the names."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes,
                                               filename_pattern="model{suffix}.safetensors")
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(folder / filename), metadata={"format": "pt"})
    written = list(split.filename_to_tensors)
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        written.append("model.safetensors.index.json")
    return written


def write_tokenizer_and_generation(run: SavedRun, folder: Path) -> bool:
    """The run's tokenizer (loaded without running any code) and a generation config; False when no tokenizer."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.for_model(run.family).__class__.from_dict(run.config)
    GenerationConfig.from_model_config(config).save_pretrained(str(folder))
    if not (run.model_dir / "tokenizer_config.json").is_file():
        return False
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(run.model_dir), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers fail in many ways on damaged files
        raise UsageError(f"{run.model_dir}: the tokenizer does not load ({exc}); the run directory was modified "
                         "or is damaged; run its profile again to rebuild it") from None
    tokenizer.save_pretrained(str(folder))
    return True


def export_hf(run_path: Path, target: Path, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the low-rank export of the run at `run_path` into `target`; returns `target`."""
    run = read_run(run_path)
    sources = [run.model_dir] + ([run.run_dir] if run.run_dir else [])
    with staged_export(target, force, sources, kind="export-hf") as stage:
        for name in TEMPLATE_FILES:
            shutil.copyfile(TEMPLATES / name, stage / name)
        (stage / "config.json").write_text(config_text(export_config(run)))
        write_weights(_tensors(run), stage, max_shard_bytes)
        write_tokenizer_and_generation(run, stage)
        (stage / "README.md").write_text(model_card(run))
    return Path(target)
