"""How much memory and disk a run needs, per compute device and for the host, from shapes alone.

Pure arithmetic: no model, no torch. `estimate` gives the terms of docs/scaling.md for one run;
`setting` places them for an offload mode and a number of processes; `verdict` says whether a
setting fits a `Machine`. `workbench plan` (from a model's config, no weights) and preflight
(from the loaded model) both call these, so they never disagree.

Where each term lives, as the code keeps it (docs/scaling.md works the figures out):

- weights b·P: on the device under offload "none"; on the host under "cpu"; on disk under "disk",
  read one decoder layer at a time. Under offload the device holds one layer (or the embeddings,
  when larger) and one batch of inputs and outputs.
- calibration inputs b·T·(d + 2·head_dim) (hidden states and rotary tables): on the device under
  "none", on the host under offload. N processes split the windows N ways.
- Grams, float64, 8·Σ n·in² for the inputs alive at once (8·out² for a wide one-layer group factored
  from its output's Gram): on the compute device, in every process (and under offload once more on
  the host, where the checkpoint copies them).
- factors kept until allocation, float32, at most 4·P_t: on the device under "none", on the host
  under offload (under "disk" spilled to the work directory). With N
  processes the groups are factored round-robin and gathered: every process holds them all.
- the largest transient (factoring the widest group, or one layer's forward over a batch).
- the fisher signal (when the allocator needs it): a forward and backward pass over one window,
  with every factor on the device (the signal watches all groups at once). It needs the whole
  model on the compute device, as the compensate stage does: offload refuses both, except "cpu"
  on a CPU-only machine (`verdict`).
- evaluation: the model (or one layer, under offload) and the logits of one batch.

Figures are bytes; they are estimates on the safe side (the transient counts float64 copies the
allocator may reuse). Host figures add `HOST_BASE` per process for the interpreter and libraries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from workbench.api import break_even_rank
from workbench.engine.calibration import CHUNK_ROWS
from workbench.engine.whitening import IN_PLACE_FROM

MODES = ("none", "cpu", "disk")  # least offload first: `choose_offload` takes the first that fits
PROCESSES = (1, 2, 4, 8)
# Tokenizer, config and manifest files saved beside the weights: a few MiB for every model we know.
MODEL_EXTRAS = 20 << 20
# Python with torch and transformers imported: 0.4 GiB measured on a CPU (docs/scaling.md); CUDA's
# libraries add about as much again. Counted once per process on the host.
HOST_BASE = 1 << 30


@dataclass(frozen=True)
class Shapes:
    """What the estimates need to know about a run."""

    params: int  # P, parameters of the model (tied ones once)
    dtype_bytes: int  # b
    hidden: int  # d
    head_dim: int
    groups: Sequence[tuple[str, int, int, int]]  # per group: (statistic, n layers, in, out)
    windows: int  # N
    seq_len: int  # S
    ratio: float
    batch: int = 8  # the engine's calibration batch
    compensate: bool = False  # the compensate stage runs ([compression] sequential / update)
    # Known when the whole model is described (`workbench plan`, preflight); 0: unknown, and the
    # figures under offload then count the whole model where one layer would do.
    layers: int = 0  # decoder layers
    layer_params: int = 0  # the largest decoder layer's parameters
    edge_params: int = 0  # the largest module outside the layers (embeddings, lm_head)
    vocab: int = 0
    intermediate: int = 0  # the MLP width
    fisher: bool = False  # the allocator needs the fisher signal
    mask_training: bool = False  # the allocator needs the ara signal (rank masks trained by backpropagation)
    eval_tokens: int = 0  # the largest evaluation batch: windows × seq_len, whose logits are formed at once
    sole_inputs: frozenset[str] = frozenset()  # input groups one matrix type alone reads (down_proj's)
    token_chunk: int = 0  # tokens per pass of the adapter's token-wise modules (the MLP); 0: the whole batch
    pass_tokens: int = 0  # tokens per pass of a decoder layer (whole sequences, one at least); 0: the whole batch
    output_grams: frozenset[str] = frozenset()  # statistics that are a group's output Gram (out × out)


@dataclass(frozen=True)
class Estimate:
    inputs: int  # calibration hidden states (+ rotary tables)
    grams: int  # float64 Grams alive at once
    factors: int  # float32 factors kept until allocation
    transient: int  # the larger of factoring the largest group and one layer's forward over a batch
    model_file: int  # the saved compressed model
    checkpoint: int  # the work directory at its fullest
    compensation: int = 0  # the compensate stage's second stream and one layer's dense inputs; 0 when off

    @property
    def memory(self) -> int:
        """Memory the run adds on top of the loaded model, at its peak (end of calibration).

        The compensate stage's extra stream is added on top (it comes after calibration, so this
        over-counts a little, which is the safe side)."""
        return self.inputs + self.grams + self.factors + self.transient + self.compensation


def estimate(s: Shapes) -> Estimate:
    """docs/scaling.md's terms for one run: peak ≈ b·P + b·T·d + 8·Σ n·in² + 4·P_t + transient."""
    b, tokens = s.dtype_bytes, s.windows * s.seq_len
    hidden_states = b * tokens * s.hidden
    inputs = hidden_states + 2 * b * tokens * s.head_dim
    widest: dict[str, tuple[int, int]] = {}  # statistic -> (longest group, width): its Grams alive at once
    for name, n, fan_in, fan_out in s.groups:
        widest[name] = max(widest.get(name, (0, 0)), (n, fan_out if name in s.output_grams else fan_in))
    grams = 8 * sum(n * fan_in ** 2 for n, fan_in in widest.values())
    factors = 4 * sum(break_even_rank(i, o, n) * (i + n * o) for _, n, i, o in s.groups)
    # Factoring a group: its whitening factor L (a shared group's summed Gram, then L in its memory), except
    # where L takes the Gram's own memory (a one-layer group, the only reader of an input from
    # IN_PLACE_FROM wide), plus the stacked weights, the whitened matrix, U, Vᵀ, VᵀL⁻¹ and the loss check;
    # from an output Gram C: its copy the eigenvectors overwrite, LAPACK's workspace, W and VᵀL⁻¹.
    factoring = max(3 * 8 * o * o + 2 * 8 * o * i if name in s.output_grams else
                    (0 if n == 1 and i >= IN_PLACE_FROM and name in s.sole_inputs else 8 * i * i) + 6 * 8 * n * o * i
                    for name, n, i, o in s.groups)
    rows, widest_in = min(s.batch, s.windows) * s.seq_len, max(i for _, _, i, _ in s.groups)
    # One layer's forward over a batch, a pass of whole sequences at a time: attention's projections,
    # rotated copies and outputs (about 8 hidden-wide tensors of the pass, measured 8.0–8.5 at LLaMA-7B
    # widths), or the MLP over a chunk of tokens (three MLP-wide activations, the Gram hook's float64
    # copy of its rows), beside the batch's output.
    pass_rows = min(rows, max(1, s.pass_tokens // s.seq_len) * s.seq_len) if s.pass_tokens else rows
    mlp_rows = min(pass_rows, s.token_chunk) if s.token_chunk else pass_rows
    output = b * rows * s.hidden
    attention = 8 * b * pass_rows * s.hidden + (output if pass_rows < rows else 0)
    mlp = 3 * b * mlp_rows * widest_in + 8 * min(mlp_rows, CHUNK_ROWS) * widest_in + output
    forward = max(attention, mlp)
    targeted = sum(n * i * o for _, n, i, o in s.groups)
    model_file = int(b * (s.params - s.ratio * targeted)) + MODEL_EXTRAS
    # Factors + the Grams of pending groups + two layers' inputs (the new one is written before the old goes).
    checkpoint = factors + grams + 2 * hidden_states
    # Compensation: the compressed stream beside the dense one, one layer's dense inputs per input group,
    # and the widest input group's float64 statistics: G, C, Ĝ for the fit and the held-out windows
    # plus their sum while a site is refit.
    compensation = 0
    if s.compensate:
        widths = {name: fan_in for name, _, fan_in, _ in s.groups}
        compensation = hidden_states + b * tokens * sum(widths.values()) + 9 * 8 * widest_in ** 2
    return Estimate(inputs, grams, factors, max(factoring, forward), model_file, checkpoint, compensation)


def fisher_activations(s: Shapes) -> int:
    """Bytes of one window's forward and backward pass in the fisher signal, its own (high-side) figure:
    per token ≈ 3·vocab float32 (logits and their gradient) + 20·d + 4·m per decoder layer."""
    if not s.fisher:
        return 0
    per_token = 3 * s.vocab + s.layers * (20 * s.hidden + 4 * (s.intermediate or 4 * s.hidden))
    return 4 * per_token * s.seq_len


def mask_training_bytes(s: Shapes) -> int:
    """Bytes the ara signal's training adds to the model and the factors (used in place): fisher's figure
    for one window's backward pass, plus each masked layer's own saved tensors (x·P and W·x, float32,
    per token) and the mask logits with their two Adam moments."""
    if not s.mask_training:
        return 0
    per_token = 3 * s.vocab + s.layers * (20 * s.hidden + 4 * (s.intermediate or 4 * s.hidden))
    per_token += sum(n * (break_even_rank(i, o, n) + o) for _, n, i, o in s.groups)
    masks = 3 * sum(break_even_rank(i, o, n) for _, n, i, o in s.groups)
    return 4 * (per_token * s.seq_len + masks)


@dataclass(frozen=True)
class Need:
    device: int  # per compute device (every process holds the same)
    host: int  # the host: every process on this machine together


@dataclass(frozen=True)
class Setting:
    offload: str
    processes: int
    phases: dict[str, Need]  # "calibration", and "fisher" / "evaluation" where the run has them
    disk: int  # written by the run: the compressed model, checkpoints, spilled factors
    estimate: Estimate = field(repr=False, compare=False)
    # What of the run needs the whole model on the compute device, which offload refuses
    # ("fisher", "compensation"); `verdict` turns it into "no" under offload.
    whole_model: tuple[str, ...] = ()

    @property
    def device(self) -> int:
        return max(n.device for n in self.phases.values())

    @property
    def host(self) -> int:
        return max(n.host for n in self.phases.values())


def setting(s: Shapes, offload: str, processes: int = 1, est: Estimate | None = None) -> Setting:
    """Where the run's bytes are at each phase's peak, for one offload mode and number of processes."""
    if offload not in MODES:
        raise ValueError(f"offload must be one of {', '.join(MODES)}, not {offload!r}")
    if processes < 1:
        raise ValueError(f"processes must be at least 1, not {processes}")
    est = est or estimate(s)
    b, p = s.dtype_bytes, processes
    weights = b * s.params
    one_layer = b * max(s.layer_params, s.edge_params) if s.layer_params else weights
    windows = math.ceil(s.windows / p)  # rank 0's share
    per_token = b * (s.hidden + 2 * s.head_dim)  # a hidden state and its rotary tables
    inputs = per_token * windows * s.seq_len
    batch_io = 2 * per_token * min(s.batch, windows) * s.seq_len  # one batch in, its outputs out
    compensation = math.ceil(est.compensation / p)
    token_ids = 8 * s.windows * s.seq_len
    base = p * HOST_BASE + token_ids
    on_host = est.inputs + est.compensation  # every rank's share of the inputs, together
    if offload == "none":
        calibration = Need(weights + inputs + est.grams + est.factors + est.transient + compensation,
                           base)
    elif offload == "cpu":
        calibration = Need(one_layer + batch_io + est.grams + est.transient,
                           base + p * (weights + est.factors + est.grams) + on_host)
    else:
        calibration = Need(one_layer + batch_io + est.grams + est.transient,  # factors spilled to disk
                           base + p * (one_layer + est.grams) + on_host)
    phases = {"calibration": calibration}
    activations = fisher_activations(s)
    if activations:
        if offload == "none":
            phases["fisher"] = Need(weights + est.factors + activations, base)
        else:  # runs only where the host is the compute device ("cpu" on a CPU): weights and factors stay put
            phases["fisher"] = Need(activations, calibration.host)
    training = mask_training_bytes(s)
    if training:  # the whole model takes part in every step: it stays where it is
        phases["mask training"] = Need(weights + est.factors + training, base)
    if s.eval_tokens:
        logits = 2 * 4 * s.eval_tokens * s.vocab  # float32 logits and their log-softmax
        held = weights if offload == "none" else one_layer
        host = base + {"none": 0, "cpu": p * weights, "disk": p * one_layer}[offload]
        phases["evaluation"] = Need(held + logits, host)
    # Under offload every process keeps its compressed layers on disk until the end (process 0 in the
    # staging directory, the others in a folder of their own), and under "disk" spills every factor
    # and parks its share of the calibration inputs between layers.
    disk = (est.model_file + est.checkpoint + (p * est.factors + est.inputs if offload == "disk" else 0)
            + ((p - 1) * est.model_file if offload != "none" else 0))
    whole_model = tuple(name for name, needed in (("fisher", s.fisher), ("compensation", s.compensate)) if needed)
    return Setting(offload, p, phases, disk, est, whole_model)


def settings(s: Shapes, modes: Sequence[str] = MODES, processes: Sequence[int] = PROCESSES) -> list[Setting]:
    est = estimate(s)
    return [setting(s, mode, p, est) for mode in modes for p in processes]


@dataclass(frozen=True)
class Machine:
    """What this machine offers: available host memory, free disk where the output goes, free memory
    per CUDA device (none: the compute device is the host itself)."""

    host: int
    disk: int
    gpus: tuple[int, ...] = ()
    gpu_names: tuple[str, ...] = ()


def verdict(s: Setting, machine: Machine) -> str | None:
    """None when the setting fits `machine`; else what does not, in a few words."""
    # The fisher signal and the compensate stage need the whole model on the compute device: offload
    # refuses them, except "cpu" on a CPU-only machine, where the host is the compute device.
    if s.whole_model and (s.offload == "disk" or (s.offload == "cpu" and machine.gpus)):
        return f"{' and '.join(s.whole_model)} need{'s' if len(s.whole_model) == 1 else ''} offload = \"none\""
    if machine.gpus:
        if s.processes > len(machine.gpus):
            return f"needs {s.processes} GPUs, {len(machine.gpus)} here"
        smallest = sorted(machine.gpus, reverse=True)[s.processes - 1]
        if s.device > smallest:
            return "device memory"
        host = s.host
    else:  # on a CPU the compute device is the host: its figures add up, once per process
        host = s.host + s.processes * s.device
    if host > machine.host:
        return "host memory"
    if s.disk > machine.disk:
        return "disk"
    return None


def choose_offload(s: Shapes, machine: Machine, processes: int = 1) -> Setting | None:
    """The least offload that fits `machine` (offload = "auto"), or None when none does."""
    est = estimate(s)
    for mode in MODES:
        candidate = setting(s, mode, processes, est)
        if verdict(candidate, machine) is None:
            return candidate
    return None
