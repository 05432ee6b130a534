"""`workbench export RUN_DIR --to DIR --format dense`: the factors multiplied back, W = Q·P.

The result is the standard architecture (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
with full-size weights, for tools that accept only standard checkpoints (quantizers, llama.cpp's
converter, vLLM). It is as large as the original model: it saves nothing on disk or in memory;
what it keeps is the compressed model's behaviour. The product is formed in float32 at least, so
a bfloat16 model's weights are rounded once, not twice.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from workbench.engine.lowrank import LowRankLinear
from workbench.export.card import model_card
from workbench.export.hf import DEFAULT_SHARD_BYTES, write_tokenizer_and_generation
from workbench.export.run_files import read_run
from workbench.export.writing import staged_export


def densify(model: nn.Module) -> nn.Module:
    """Replace every LowRankLinear in `model` by the nn.Linear with weight Q·P (and the same bias)."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LowRankLinear):
            continue
        linear = module.as_linear()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


def export_dense(run_path: Path, target: Path, force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write the dense export of the run at `run_path` into `target`; returns `target`."""
    from workbench.sources.models import _quiet_transformers
    from workbench.storage.saving import load_compressed

    run = read_run(run_path)
    sources = [run.model_dir] + ([run.run_dir] if run.run_dir else [])
    with staged_export(target, force, sources, kind="export-dense") as stage:
        model = densify(load_compressed(run.model_dir))
        with _quiet_transformers():  # its progress bar would write to the terminal
            model.save_pretrained(str(stage), max_shard_size=max_shard_bytes)
        write_tokenizer_and_generation(run, stage)  # the run's generation config replaces the default one
        (stage / "README.md").write_text(model_card(run, dense_export=True))
    return Path(target)
