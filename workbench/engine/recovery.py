"""LoRA recovery: train the compressed model's low-rank factors with peft, then merge the adapters back.

`[recovery] method = "lora"` (docs/compensation.md, "Recovery"). Each `LowRankLinear` exposes its
factors as `nn.Linear` children, `basis` (P, in → k) and `coef` (Q, k → out); peft's LoRA wraps the
ones `targets` names. Training minimises the causal-LM loss on windows of the dataset's calibration
split (never its evaluation split) with AdamW; only the adapters train. Afterwards each adapter is
merged into the factor it wraps, Q + s·B·A (out×k) or P + s·B·A (k×in), so ranks and parameter
counts stay exactly as allocated.

A basis shared by several layers is one module held by each of them. peft wraps modules by name, so
it wraps such a module where it first appears; `attach_lora` then hands that same wrapper to the
group's other layers. The group trains one adapter on its one basis, and it is merged once.

Resuming: every `checkpoint_every` steps the adapters, the optimizer, the step, the losses and the
RNG state are saved; a resumed run continues from there to the same result as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn

from workbench.engine.lowrank import LowRankLinear
from workbench.errors import RunFailed, UsageError

STAGE = "recover"  # the stage's name in events, timings and the checkpoint
ADAPTER = "recovery"  # peft's adapter name


# --------------------------------------------------------------------------- what is trained, on what


def training_windows(tokenizer, dataset: str, count: int, seq_len: int, seed: int) -> torch.LongTensor:
    """`count` windows of `seq_len` tokens from the calibration split of `dataset` (never its evaluation split)."""
    from workbench.sources.text import split_tokens, windows_from_tokens

    ids = split_tokens(tokenizer, dataset, "calibration")
    if ids.numel() < seq_len:
        raise UsageError(f"recovery.seq_len: the training text of {dataset} has only {ids.numel()} tokens, fewer "
                         f"than seq_len={seq_len}; use a shorter recovery.seq_len or a larger recovery.dataset")
    return windows_from_tokens(ids, count, seq_len, seed)


def shared_bases(model: nn.Module) -> set[int]:
    """ids of the basis weights held by more than one LowRankLinear."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, LowRankLinear):
            key = id(module.basis.weight)
            seen[key] = seen.get(key, 0) + 1
    return {key for key, n in seen.items() if n > 1}


def lora_targets(model: nn.Module, targets: Iterable[str]) -> tuple[list[str], list[str]]:
    """(full names of the factor Linears to adapt, notes). A shared basis is named once, in its first layer."""
    targets = set(targets)
    shared = shared_bases(model) if "basis" in targets else set()
    names, seen = [], set()
    for name, module in model.named_modules():
        if not isinstance(module, LowRankLinear):
            continue
        if "coef" in targets:
            names.append(f"{name}.coef")
        if "basis" in targets and id(module.basis) not in seen:
            seen.add(id(module.basis))
            names.append(f"{name}.basis")
    notes = []
    if shared:
        notes.append(f"{len(shared)} bases are shared by the layers of their group: one adapter each, merged once")
    return names, notes


def _share_wrappers(model: nn.Module) -> None:
    """Give every layer of a group the adapter-wrapped basis that peft put in the group's first layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    wrapped = {id(m.basis.get_base_layer()): m.basis for m in modules if isinstance(m.basis, BaseTunerLayer)}
    for module in modules:
        if id(module.basis) in wrapped:
            module.basis = wrapped[id(module.basis)]


def attach_lora(model: nn.Module, names: list[str], settings, seed: int):
    """peft's LoRA on the modules `names`; returns the peft tuner (its `.model` is `model`, now adapted)."""
    from peft import LoraConfig, LoraModel

    if not names:
        raise UsageError("recovery: no module to train: the model has no low-rank layers (every group kept dense?) "
                         "or recovery.targets names none of them; set [recovery] method = \"none\"")
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=names, bias="none")
    with torch.random.fork_rng(devices=[]):  # the adapters' initialisation draws from the seed, not the caller's RNG
        torch.manual_seed(seed)
        tuner = LoraModel(model, config, ADAPTER)
    _share_wrappers(model)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return tuner


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def merge_lora(tuner) -> nn.Module:
    """Each adapter added into its factor (Q + s·B·A or P + s·B·A) and the wrappers removed."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = tuner.merge_and_unload(safe_merge=True)  # a shared wrapper is merged once, unwrapped in one layer
    for module in [m for m in model.modules() if isinstance(m, LowRankLinear)]:
        if isinstance(module.basis, BaseTunerLayer):  # the group's other layers: the merged basis itself
            module.basis = module.basis.get_base_layer()
    for attribute in ("peft_config", "_hf_peft_config_loaded"):
        if attribute in model.__dict__:
            delattr(model, attribute)
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainState:
    step: int = 0
    losses: list[float] = dataclasses.field(default_factory=list)
    resumed_at: int | None = None


class RecoveryCheckpoint:
    """Training state in the work directory (`WorkDir.save_stage`). The step and the losses are kept in the
    tensor file, with the adapters and optimizer: the file is replaced before state.json names it."""

    def __init__(self, work, settings: dict[str, Any]):
        self.work, self.settings = work, settings

    def save(self, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, state: TrainState) -> None:
        tensors = {f"param.{name}": p.detach() for name, p in params.items()}
        saved = optimizer.state_dict()
        for index, entry in saved["state"].items():
            for key, value in entry.items():
                tensors[f"opt.{index}.{key}"] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        tensors["step"] = torch.tensor(state.step)
        tensors["losses"] = torch.tensor(state.losses, dtype=torch.float64)
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            tensors["rng.cuda"] = torch.cuda.get_rng_state()
        groups = [{k: v for k, v in g.items() if k != "params"} for g in saved["param_groups"]]
        self.work.save_stage(STAGE, {"settings": self.settings, "names": sorted(params), "param_groups": groups},
                             tensors, label=f"recovery (step {state.step})")

    def load(self, params: dict[str, nn.Parameter], optimizer: torch.optim.Optimizer) -> TrainState | None:
        """Put the saved training state in place; None when there is none for these settings and adapters."""
        saved = self.work.load_stage(STAGE)
        if saved is None:
            return None
        meta, tensors = saved
        if meta.get("settings") != self.settings or meta.get("names") != sorted(params):
            return None
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(tensors[f"param.{name}"])
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("opt."):
                _, index, field = key.split(".", 2)
                state.setdefault(int(index), {})[field] = value
        groups = [{**g, "params": list(range(len(params)))} for g in meta["param_groups"]]
        optimizer.load_state_dict({"state": state, "param_groups": groups})
        torch.set_rng_state(tensors["rng.cpu"])
        if "rng.cuda" in tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(tensors["rng.cuda"])
        step = int(tensors["step"])
        return TrainState(step, [float(x) for x in tensors["losses"]], resumed_at=step)


def train(model: nn.Module, windows: torch.Tensor, settings, device: torch.device, check: Callable[[], None],
          on_step: Callable[[int, float], None] | None = None, checkpoint: RecoveryCheckpoint | None = None) -> TrainState:
    """AdamW on the adapters, one batch of `windows` per step, causal-LM loss; bf16 autocast under CUDA.

    `check` is called before each step (it raises to cancel). The caller's RNG state is left as it was.
    """
    params = adapter_parameters(model)
    optimizer = torch.optim.AdamW(params.values(), lr=settings.lr, weight_decay=0.0)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    batch_size = settings.batch_size
    was_training = model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)  # dropout; a resumed run restores the RNG state saved with the step
        state = (checkpoint.load(params, optimizer) if checkpoint is not None else None) or TrainState()
        model.train()
        try:
            for step in range(state.step, settings.steps):
                check()
                batch = windows[step * batch_size:(step + 1) * batch_size].to(device)
                with autocast:
                    loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise RunFailed(f"recovery: the training loss is {value} at step {step + 1}; lower recovery.lr "
                                    f"(now {settings.lr:g})")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step = step + 1
                state.losses.append(value)
                if on_step is not None:
                    on_step(state.step, value)
                if checkpoint is not None and (state.step % settings.checkpoint_every == 0
                                               or state.step == settings.steps):
                    checkpoint.save(params, optimizer, state)
        finally:
            model.train(was_training)
    return state


# --------------------------------------------------------------------------- the stage's work


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def recover(model: nn.Module, tokenizer, settings, device: torch.device, events=None,
            check: Callable[[], None] = lambda: None, work=None) -> dict[str, Any]:
    """Train LoRA adapters on the compressed model and merge them; returns report.json's `recovery` section."""
    start = time.perf_counter()
    windows = training_windows(tokenizer, settings.dataset, settings.steps * settings.batch_size, settings.seq_len,
                               settings.seed)
    before = count_parameters(model)
    names, notes = lora_targets(model, settings.targets)
    tuner = attach_lora(model, names, settings, settings.seed)
    trained = sum(p.numel() for p in adapter_parameters(model).values())
    checkpoint = RecoveryCheckpoint(work, dataclasses.asdict(settings)) if work is not None else None

    def on_step(step: int, loss: float) -> None:
        if events is not None:
            events.progress(STAGE, step, settings.steps, f"loss {loss:.4f}", data={"unit": "step", "loss": loss})

    state = train(model, windows, settings, device, check, on_step, checkpoint)
    merge_lora(tuner)
    after = count_parameters(model)
    if after != before:  # merging must give back exactly the allocated factors
        raise RunFailed(f"recovery: merging the adapters changed the parameter count ({before:,} → {after:,})")
    if state.resumed_at is not None and events is not None:
        events.log(STAGE, f"resumed the training at step {state.resumed_at} of {settings.steps} from the checkpoint")
    losses = state.losses
    return {**dataclasses.asdict(settings), "adapted_modules": len(names), "trained_parameters": trained,
            "tokens": int(windows.numel()), "device": str(device),
            "autocast": "bfloat16" if device.type == "cuda" else None,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "losses": [round(x, 5) for x in losses], "resumed_at_step": state.resumed_at,
            "notes": notes, "train_s": round(time.perf_counter() - start, 3)}


# --------------------------------------------------------------------------- preflight


def training_memory(config, targets: Iterable[tuple[int, int]], settings, dtype_bytes: int = 4) -> int:
    """Bytes training needs on top of the loaded model (an estimate, like the rest of preflight).

    Activations kept for the backward pass, per token and decoder layer about 10·hidden + 4·intermediate
    + 2·heads·seq_len values (attention inputs and outputs, the MLP's three wide products, attention
    weights), plus the logits with their softmax and gradient; and for every adapter, r·(in + out)
    parameters four times over (weights, gradients, AdamW's two moments). `targets`: (in, out) of each
    targeted dense layer; an upper bound takes the factors' rank as min(in, out).
    """
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    intermediate = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    layers = int(getattr(config, "num_hidden_layers", 0) or 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    tokens = settings.batch_size * settings.seq_len
    compute = max(dtype_bytes, 4)  # autocast keeps float32 copies where it matters
    activations = tokens * layers * (10 * hidden + 4 * intermediate + 2 * heads * settings.seq_len) * compute
    logits = 3 * tokens * vocab * 4
    adapters = 0
    for fan_in, fan_out in targets:
        k = min(fan_in, fan_out)
        if "coef" in settings.targets:
            adapters += settings.rank * (k + fan_out)
        if "basis" in settings.targets:
            adapters += settings.rank * (fan_in + k)
    return activations + logits + 4 * 4 * adapters
