"""Text from a run's compressed model (and, to compare, its dense model): `workbench generate` and the app.

A perplexity figure does not show a model that repeats itself or drifts into nonsense; reading a
continuation does. Decoding is transformers' `generate`, greedy unless sampling is asked for, with
every decoding setting passed explicitly so the model's own generation config (which may turn
sampling on) cannot make the compressed and the dense continuation differ for another reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from workbench.errors import UsageError
from workbench.export.run_files import SavedRun, read_run

MAX_NEW_TOKENS = 2048


@dataclass(frozen=True)
class Decoding:
    max_new_tokens: int = 40
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise UsageError(f"--max-new-tokens: {self.max_new_tokens} is out of range (1 to {MAX_NEW_TOKENS})")
        if not self.temperature > 0:
            raise UsageError(f"--temperature: {self.temperature} must be above 0")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"--top-p: {self.top_p} must be above 0 and at most 1")

    def generate_kwargs(self, tokenizer: Any, model: Any) -> dict[str, Any]:
        eos = getattr(model.generation_config, "eos_token_id", None)
        if eos is None:
            eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        common = {"max_new_tokens": self.max_new_tokens, "eos_token_id": eos, "pad_token_id": pad,
                  "do_sample": self.sample, "top_k": None, "repetition_penalty": None}
        if self.sample:
            return {**common, "temperature": self.temperature, "top_p": self.top_p}
        return {**common, "temperature": None, "top_p": None}


def continuation(model: Any, tokenizer: Any, prompt: str, decoding: Decoding) -> str:
    """The text `model` adds after `prompt` (special tokens left out)."""
    if not prompt.strip():
        raise UsageError("the prompt is empty; give the text to continue")
    device = next(model.parameters()).device
    encoded = tokenizer(prompt, return_tensors="pt").to(device)
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(decoding.seed)  # sampled text is repeatable, and the caller's RNG is left alone
        out = model.generate(**encoded, **decoding.generate_kwargs(tokenizer, model))
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)


@dataclass
class Loaded:
    run: SavedRun
    model: Any
    tokenizer: Any


def load_run_model(run_path: Path, device: str = "cpu") -> Loaded:
    """The run's compressed model and tokenizer, after checking the run directory."""
    from transformers import AutoTokenizer

    from workbench.sources.models import resolve_device
    from workbench.storage.saving import load_compressed

    run = read_run(run_path)
    if not (run.model_dir / "tokenizer_config.json").is_file():
        raise UsageError(f"{run.model_dir} has no tokenizer, so there is no text to generate; "
                         "run the profile again with a model that has one")
    tokenizer = AutoTokenizer.from_pretrained(str(run.model_dir), trust_remote_code=False)
    model = load_compressed(run.model_dir, device=str(resolve_device(device)))
    return Loaded(run, model, tokenizer)


def load_dense_model(run: SavedRun, device: str = "cpu") -> tuple[Any, Any, str]:
    """The dense model the run started from (model, tokenizer, source), loaded as the run loaded it."""
    from workbench.sources.models import load_model

    model_section = run.report.get("profile", {}).get("model", {}) if isinstance(run.report, dict) else {}
    source = model_section.get("source") if isinstance(model_section, dict) else None
    if not isinstance(source, str) or not source:
        raise UsageError(f"{run.run_dir or run.model_dir}: report.json names no model.source, so the dense model "
                         "cannot be loaded; leave out --dense")
    loaded = load_model(source, dtype=run.manifest["dtype"], device=device)
    return loaded.model, loaded.tokenizer, source
