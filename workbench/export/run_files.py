"""Read a run directory's compressed model for export or generation, refusing a damaged one.

A run directory is input like any other: its files may have been edited, truncated or swapped.
Before anything is built from it, `read_run` checks that `compression.json`, `config.json` and
the tensor names, shapes and dtypes in `model.safetensors` agree with each other and with the
standard transformers architecture the config names, reading only the safetensors header. Any
disagreement is a `UsageError` naming the file and the tensor, never a traceback from deep inside
torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workbench.errors import UsageError
from workbench.storage.saving import BASIS_PREFIX, FORMAT

# config.model_type -> the standard transformers class an export may name (one per adapter family)
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
WEIGHTS = "model.safetensors"
_DAMAGED = "the run directory was modified or is damaged; run its profile again to rebuild it"


@dataclass
class SavedRun:
    """What export and generation need from a run directory, checked for consistency."""

    model_dir: Path  # the folder holding compression.json (RUN_DIR/model)
    run_dir: Path | None  # the run output holding report.json and profile.toml, when there is one
    config: dict[str, Any]  # the dense model's config.json
    manifest: dict[str, Any]  # compression.json
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, from the safetensors header
    report: dict[str, Any] = field(default_factory=dict)
    profile_text: str = ""

    @property
    def family(self) -> str:
        return self.config["model_type"]

    @property
    def groups(self) -> list[dict[str, Any]]:
        return self.manifest["groups"]


def _json(path: Path, what: str) -> Any:
    from workbench.sources.files import read_json

    try:
        return read_json(path, what)  # size-capped, every failure a UsageError naming the file
    except UsageError as exc:
        raise UsageError(f"{exc}; {_DAMAGED}") from None


def _locate(path: Path) -> tuple[Path, Path | None]:
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path} does not exist; give a run output directory (the [output] dir of a profile)")
    if (path / "model" / "compression.json").is_file():
        return path / "model", path
    if (path / "compression.json").is_file():
        parent = path.parent
        return path, parent if (parent / "report.json").is_file() else None
    raise UsageError(f"{path} holds no compressed model (no model/compression.json); "
                     "was the run made with [output] save_model = false?")


def _check_manifest(manifest: Any, where: Path) -> None:
    def bad(what: str) -> UsageError:
        return UsageError(f"{where}: {what}: {_DAMAGED}")

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("format") != FORMAT:
        raise bad(f"format {manifest.get('format')!r} is not {FORMAT!r}")
    if manifest.get("dtype") not in DTYPES:
        raise bad(f"dtype {manifest.get('dtype')!r} is not one of {', '.join(DTYPES)}")
    groups = manifest.get("groups")
    if not isinstance(groups, list):
        raise bad("'groups' is not a list")
    for i, g in enumerate(groups):
        ok = (isinstance(g, dict) and isinstance(g.get("group"), str) and isinstance(g.get("modules"), list)
              and g["modules"] and all(isinstance(m, str) for m in g["modules"])
              and all(type(g.get(k)) is int and g[k] > 0 for k in ("rank", "in", "out")))
        if not ok:
            raise bad(f"groups[{i}] needs 'group', a non-empty 'modules' list and positive integers 'rank', 'in', 'out'")
    for key in ("tied", "biases"):
        if not isinstance(manifest.get(key, {}), dict):
            raise bad(f"'{key}' is not an object")


def _check_config(config: Any, where: Path) -> None:
    if not isinstance(config, dict):
        raise UsageError(f"{where}: not a JSON object: {_DAMAGED}")
    if "auto_map" in config:
        raise UsageError(f"{where} has the key \"auto_map\": it asks to run Python code, and workbench never runs "
                         f"code from a model folder; {_DAMAGED}")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UsageError(f"{where}: model_type {model_type!r} is not one workbench exports "
                         f"(supported: {', '.join(FAMILIES)}); {_DAMAGED}")
    architectures = config.get("architectures") or [FAMILIES[model_type]]
    if architectures != [FAMILIES[model_type]]:
        raise UsageError(f"{where}: architectures {architectures} name an unknown class for model_type "
                         f"'{model_type}' (expected ['{FAMILIES[model_type]}']); {_DAMAGED}")


def _header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            return ({n: tuple(s.get_shape()) for n, s in slices.items()},
                    {n: s.get_dtype() for n, s in slices.items()})
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: {_DAMAGED}") from None
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types for a bad header
        raise UsageError(f"{path} is not a readable safetensors file ({exc}): {_DAMAGED}") from None


def expected_shapes(config: dict[str, Any], manifest: dict[str, Any], where: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape the saved model must hold: the dense architecture's, with the low-rank
    modules' weights replaced by factors and each group's basis stored once."""
    import transformers

    family = config["model_type"]
    config_class = transformers.AutoConfig.for_model(family).__class__
    try:
        dense_config = config_class.from_dict(config)
        with torch.device("meta"):
            model = getattr(transformers, FAMILIES[family])(dense_config)
    except Exception as exc:  # noqa: BLE001 - transformers validates configs with many error types
        raise UsageError(f"{where}: the config does not build a {FAMILIES[family]} ({exc}); {_DAMAGED}") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    biases = manifest.get("biases", {})
    for g in manifest["groups"]:
        shapes[BASIS_PREFIX + g["group"]] = (g["rank"], g["in"])
        for name in g["modules"]:
            dense = shapes.pop(f"{name}.weight", None)
            if dense != (g["out"], g["in"]):
                found = "no such linear layer" if dense is None else f"its weight is {dense}"
                raise UsageError(f"{where}: group {g['group']} lists {name} as {g['out']}×{g['in']}, but the "
                                 f"architecture has {found}; {_DAMAGED}")
            shapes[f"{name}.coef"] = (g["out"], g["rank"])
            if biases.get(name):
                shapes[f"{name}.bias"] = (g["out"],)
    for target, source in manifest.get("tied", {}).items():
        if shapes.get(target) is None or shapes.get(target) != shapes.get(source):
            raise UsageError(f"{where}: 'tied' pairs {target} with {source}, which do not match; {_DAMAGED}")
        del shapes[target]
    return shapes


def _check_tensors(run: SavedRun, dtypes: dict[str, str]) -> None:
    path = run.model_dir / WEIGHTS
    expected = expected_shapes(run.config, run.manifest, run.model_dir / "compression.json")
    missing = sorted(set(expected) - set(run.shapes))
    unexpected = sorted(set(run.shapes) - set(expected))
    wrong = [f"{n} is {run.shapes[n]}, expected {expected[n]}" for n in sorted(expected)
             if n in run.shapes and run.shapes[n] != expected[n]]
    wanted = DTYPES[run.manifest["dtype"]]
    wrong += [f"{n} is {d}, expected {wanted}" for n, d in sorted(dtypes.items()) if d != wanted]
    problems = ([f"missing tensor {n}" for n in missing[:3]] + [f"unexpected tensor {n}" for n in unexpected[:3]]
                + [f"tensor {w}" for w in wrong[:3]])
    if problems:
        more = len(missing) + len(unexpected) + len(wrong) - len(problems)
        raise UsageError(f"{path} does not match compression.json and config.json: " + "; ".join(problems)
                         + (f" (and {more} more)" if more > 0 else "") + f"; {_DAMAGED}")


def _optional_text(path: Path) -> str:
    """A run's profile.toml for the model card; an unreadable one is left out, not fatal."""
    from workbench.sources.files import read_text

    try:
        return read_text(path, "profile", max_bytes=1 << 20) if path.exists() else ""
    except UsageError:
        return ""


def read_run(path: Path) -> SavedRun:
    """The checked run at `path` (a run output directory or its `model/` folder)."""
    model_dir, run_dir = _locate(Path(path))
    manifest = _json(model_dir / "compression.json", "compressed model")
    _check_manifest(manifest, model_dir / "compression.json")
    config = _json(model_dir / "config.json", "compressed model")
    _check_config(config, model_dir / "config.json")
    from workbench.sources.models import refuse_remote_code

    refuse_remote_code(model_dir)  # the tokenizer config too: nothing of the folder's may ask to run code
    shapes, dtypes = _header(model_dir / WEIGHTS)
    run = SavedRun(model_dir=model_dir, run_dir=run_dir, config=config, manifest=manifest, shapes=shapes)
    _check_tensors(run, dtypes)
    if run_dir is not None:
        report = _json(run_dir / "report.json", "run report") if (run_dir / "report.json").exists() else {}
        run.report = report if isinstance(report, dict) else {}
        run.profile_text = _optional_text(run_dir / "profile.toml")
    return run
