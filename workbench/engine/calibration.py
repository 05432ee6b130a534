"""Layer-by-layer calibration: capture the first decoder layer's inputs, then push them through
one layer at a time, accumulating each input's Gram matrix XᵀX in float64 on the way.

Peak memory is one layer's Grams plus the calibration activations, never the whole model's
statistics. The inputs each layer sees are those of the original (dense) model, as in SVD-LLM.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass after the first layer's inputs."""


@dataclass
class LayerBatch:
    hidden: torch.Tensor
    kwargs: dict[str, Any]


def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device, check: Callable[[], None] | None = None) -> list[LayerBatch]:
    """Run the model up to its first decoder layer and keep that layer's inputs, per batch.

    The layer's keyword arguments (rotary embeddings, mask, positions) are kept as the model built
    them, so any decoder that the adapter can name is driven without architecture-specific code.
    """
    batches: list[LayerBatch] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
        kwargs["use_cache"] = False
        batches.append(LayerBatch(hidden.detach(), kwargs))
        raise _Captured

    handle = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for start in range(0, windows.shape[0], batch_size):
                if check:
                    check()
                ids = windows[start:start + batch_size].to(device)
                try:
                    model(input_ids=ids, use_cache=False)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return batches


# The upper part of a Gram is computed in row panels: panel P gives rows P × the columns from P's
# first on, about half the multiply-adds of the whole XᵀX; `symmetrize` mirrors it. Panel widths
# measured fastest on a 2-core CPU (bench/gram_panels.py): 256 columns up to 2048 wide, 512 beyond
# (against the whole product: −26% at 576, −24% at 1536, −46% at 4096 columns; BENCHMARKS.md).
PANEL = 256
WIDE_PANEL = 512
WIDE_FROM = 2048
# Columns per piece: the products are taken a piece of columns at a time (each panel's part of it),
# which bounds a product to a panel × this many values and a float32 copy of the input (of a bf16
# input, or scaled) to CHUNK_ROWS × this many: 32 MiB, not 224 MiB at a 70B down_proj's 28672 columns.
MAX_COLUMNS = 4096

GRAM_PRECISIONS = ("float64", "float32-equilibrated", "auto")

# Rows per product. In the float32-equilibrated mode its rounding error grows with the
# length m of each dot product (bound γ_m = m·u/(1 − m·u), u = 2⁻²⁴), so products are taken over
# at most this many tokens and summed in float64: γ_2048 ≈ 1.2e-4 worst case, ~√m·u ≈ 3e-6 typical.
# In both modes the copies made of the input (float64, or float32) are of this many rows.
CHUNK_ROWS = 2048


def panel_width(width: int) -> int:
    return WIDE_PANEL if width > WIDE_FROM else PANEL


def _panels(width: int) -> list[tuple[int, int]]:
    step = panel_width(width)
    return [(start, min(start + step, width)) for start in range(0, width, step)]


def upper_products(width: int) -> list[tuple[slice, slice, slice]]:
    """(piece, rows, columns) of each product; together they cover the upper part of a width × width
    Gram, a piece of columns after the other, so that a piece's copy serves every panel reaching it."""
    out = []
    for c0 in range(0, width, MAX_COLUMNS):
        c1 = min(c0 + MAX_COLUMNS, width)
        out += [(slice(c0, c1), slice(r0, r1), slice(max(r0, c0), c1)) for r0, r1 in _panels(width) if r0 < c1]
    return out


def add_gram(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram[upper part] += XᵀX in float64; `symmetrize` completes the lower part at the end.

    `x` of any float dtype, taken CHUNK_ROWS rows at a time: its float64 copy is one chunk's, not
    the batch's (3.5 GiB for a 70B down_proj's input over 8 × 2048 tokens)."""
    for start in range(0, x.shape[0], CHUNK_ROWS):
        chunk = x[start:start + CHUNK_ROWS].to(torch.float64)
        for _, rows, cols in upper_products(x.shape[1]):
            gram[rows, cols].addmm_(chunk[:, rows].mT, chunk[:, cols])


def channel_scales(x: torch.Tensor) -> torch.Tensor:
    """Per input channel, the power of two 2^e with max|x_j| in [2^(e−1), 2^e) (1 for a zero channel).

    Powers of two make X D⁻¹ and D G̃ D exact in binary floating point: the only rounding left in
    the equilibrated Gram is that of the float32 products themselves.
    """
    # max |x_j| without a copy of |X|; amax and amin apart, not aminmax(dim=0): 2.3 → 0.5 s over the
    # quickstart's calibration on a CPU (profiled, BENCHMARKS.md)
    magnitude = torch.maximum(x.amax(dim=0), x.amin(dim=0).neg())
    _, exponent = torch.frexp(magnitude.to(torch.float32))
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent)


# Channels whose largest magnitude lies within 2^±40 are not scaled: with power-of-two scales each
# float32 operation on X̃ = X D⁻¹ gives that on X times D's entries, exactly, wherever neither
# overflows nor underflows, and within this range X's cannot overflow (|x_i x_j| ≤ 2^80, sums of
# 2048 ≤ 2^91 ≪ 2^128) and what underflows (each lost product < 2^−126) is below 2^−35 of the two
# channels' norms. Any channel outside it (a massive activation beyond 10^12, a channel of 10^−13)
# and the whole chunk is scaled.
UNSCALED_RANGE = 2.0 ** 40


class _Float32Products:
    """Scope float32 matmuls to full IEEE precision: TF32 (CUDA) and reduced-precision paths off."""

    def __enter__(self) -> None:
        self._tf32 = torch.backends.cuda.matmul.allow_tf32
        self._precision = torch.get_float32_matmul_precision()
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self._tf32
        torch.set_float32_matmul_precision(self._precision)


def add_gram_equilibrated(gram: torch.Tensor, x: torch.Tensor) -> None:
    """gram[upper part] += XᵀX from float32 products of per-channel equilibrated inputs.

    With D = diag(channel_scales(X)) and X̃ = X D⁻¹ (|x̃| ≤ 1, exact), each chunk of rows gives
    G̃_c = fl32(X̃_cᵀX̃_c), added as D G̃_c D into the float64 `gram` (exact scaling). Error bound
    per entry: |ΔG_ij| ≤ γ_m·‖x_i‖·‖x_j‖ (m = CHUNK_ROWS, Cauchy–Schwarz over chunks) plus float64
    rounding, i.e. relative to the *channels' own* norms: a massive-activation channel cannot
    swamp the entries of the small ones, which is what whitening needs. Short products and float64
    sums across chunks and batches keep γ_m small (summing the batches in float32 would add
    u·|running total| per batch). The power-of-two scaling itself changes no rounding; it keeps
    every product in range (|x̃_i x̃_j| ≤ 1: no overflow of squared massive activations, no
    underflow of tiny channels in float16/bfloat16 models), so where X's range needs no help
    (UNSCALED_RANGE) it is skipped, and with it the scaled copies.
    """
    scale = channel_scales(x)
    scaled = not bool(((scale >= 1 / UNSCALED_RANGE) & (scale <= UNSCALED_RANGE)).all())
    scale64 = scale.to(torch.float64)

    def columns(chunk: torch.Tensor, cols: slice) -> torch.Tensor:
        part = chunk[:, cols]
        if scaled:  # a float32 copy of X D⁻¹ (exact); never a change to the caller's tensor
            return part / scale[cols] if part.dtype == torch.float32 else part.to(torch.float32).div_(scale[cols])
        return part.to(torch.float32)  # no copy of a float32 input

    with _Float32Products():
        for start in range(0, x.shape[0], CHUNK_ROWS):
            chunk = x[start:start + CHUNK_ROWS]
            piece, right = None, None
            for cut, rows, cols in upper_products(x.shape[1]):
                if cut != piece:  # one float32 copy (scaled, or of a bf16/fp16 input) per piece of columns
                    piece, right = cut, columns(chunk, cut)
                inside = cut.start <= rows.start and rows.stop <= cut.stop
                left = right[:, rows.start - cut.start:rows.stop - cut.start] if inside else columns(chunk, rows)
                product = left.mT @ right[:, cols.start - cut.start:]
                if scaled:
                    product = product.to(torch.float64).mul_(scale64[rows, None]).mul_(scale64[None, cols])
                gram[rows, cols].add_(product)  # summed in float64 (float32 entries convert exactly)


# Names the `auto` rule below: stored with a checkpoint made under "auto", so a run is never
# resumed with Grams accumulated partly under an earlier rule (before it, CPUs used float64).
AUTO_RULE = "2: float64 only on CUDA capability 6.0/7.0/8.0/9.0"

# CUDA compute capabilities whose float64 rate is half (or all) of their float32 rate.
FAST_FLOAT64_CUDA = {(6, 0), (7, 0), (8, 0), (9, 0)}


def resolve_gram_precision(precision: str, device: torch.device) -> str:
    """The Gram mode `precision` means on `device`: "auto" resolves by the rule in docs/speed.md.

    Deterministic per device (never timed at run time), so a resumed run or a rerun on the same
    machine accumulates its Grams the same way. float64 only where the device runs float64 near
    its float32 rate: CUDA data-centre parts with compute capability 6.0, 7.0, 8.0 or 9.0 (P100,
    V100, A100, H100/H200). Everywhere else float32-equilibrated: consumer/workstation GPUs run
    float64 at 1/32–1/64 of their float32 rate, and on CPUs the quickstart's calibration measured
    1.31× faster with it on an idle 2-core machine (median 81 s against 106 s), same perplexity to
    four digits.
    """
    if precision not in GRAM_PRECISIONS:
        raise ValueError(f"unknown gram_precision {precision!r}; allowed: {', '.join(GRAM_PRECISIONS)}")
    if precision != "auto":
        return precision
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) in FAST_FLOAT64_CUDA:
        return "float64"
    return "float32-equilibrated"


@torch.inference_mode()  # the Grams were made inside inference mode, so they are updated inside it too
def symmetrize(gram: torch.Tensor) -> torch.Tensor:
    """Mirror the upper part the products filled (`upper_products`) into the lower: symmetric to the bit."""
    for r0, r1 in _panels(gram.shape[0]):
        gram[r1:, r0:r1] = gram[r0:r1, r1:].mT
        diagonal = gram[r0:r1, r0:r1]  # one product, but a product's two triangles may differ in the last bit
        diagonal.copy_(diagonal.triu() + diagonal.triu(1).mT)
    return gram


# Rows of W per product when a linear layer's output is recomputed (`_exact_output`): the copy of W
# in the product's dtype is this many rows, not the whole matrix (0.36 GB in float64 at a 7B down_proj).
OUTPUT_ROWS = 1024


def _exact_output(module: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> torch.Tensor:
    """X Wᵀ of a linear module, as exact as the Gram mode's products: the forward's own output (less its
    bias) where that is a float32 product at full precision and the mode is float32-equilibrated;
    otherwise recomputed, in float64 or in float32 with TF32 off, from the input, a block of W's rows at
    a time (a bf16 output's rounding, 2⁻⁸ relative per element, would floor the small eigenvalues the ranks need)."""
    full_float32 = (y.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest"
                    and (y.device.type != "cuda" or not torch.backends.cuda.matmul.allow_tf32))
    if precision != "float64" and full_float32:
        bias = getattr(module, "bias", None)
        return y if bias is None else y - bias.detach()
    dtype = torch.float64 if precision == "float64" else torch.float32
    weight = module.weight.detach()
    x = x.reshape(-1, x.shape[-1]).to(dtype)
    out = x.new_empty((x.shape[0], weight.shape[0]))
    with _Float32Products():
        for start in range(0, weight.shape[0], OUTPUT_ROWS):
            out[:, start:start + OUTPUT_ROWS] = x @ weight[start:start + OUTPUT_ROWS].to(dtype).mT
    return out


class GramAccumulator:
    """Forward pre-hooks that add XᵀX of a module's input into a named float64 Gram matrix.

    `precision`: "float64" (products in float64), "float32-equilibrated" (`add_gram_equilibrated`)
    or "auto" (`resolve_gram_precision` on the device of the first input seen).
    """

    def __init__(self, precision: str = "float64") -> None:
        if precision not in GRAM_PRECISIONS:
            raise ValueError(f"unknown gram_precision {precision!r}; allowed: {', '.join(GRAM_PRECISIONS)}")
        self.precision = precision
        self._grams: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self._handles: list[Any] = []

    def watch(self, name: str, module: nn.Module) -> None:
        """Accumulate XᵀX of `module`'s input under `name`."""
        self._handles.append(module.register_forward_pre_hook(lambda mod, args: self._add(name, args[0].detach())))

    def watch_output(self, name: str, module: nn.Module) -> None:
        """Accumulate YᵀY of a linear `module`'s output without its bias, Y = X Wᵀ, under `name`
        (= W XᵀX Wᵀ: what a one-layer group needs of its input's Gram, `grouping.output_statistics`)."""
        def hook(mod, args, output):
            self._add(name, _exact_output(mod, args[0].detach(), output.detach(), self._resolved(output.device)))

        self._handles.append(module.register_forward_hook(hook))

    def _resolved(self, device: torch.device) -> str:
        if self.precision == "auto":
            self.precision = resolve_gram_precision("auto", device)
        return self.precision

    def _add(self, name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        precision = self._resolved(x.device)
        gram = self._grams.get(name)
        if gram is None:
            gram = self._grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
            self.tokens[name] = 0
        if precision == "float64":
            add_gram(gram, x)
        else:
            add_gram_equilibrated(gram, x)
        self.tokens[name] += x.shape[0]

    @property
    def grams(self) -> dict[str, torch.Tensor]:
        """The finished (symmetric) Gram matrices; read after the layer has run."""
        return {name: symmetrize(g) for name, g in self._grams.items()}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


# Tokens per pass while the walk runs a layer: the layer over as many whole sequences of a batch as
# fit in this many tokens (one at least: `layer_forward`), and within it a module that acts on each
# token alone (an MLP; the adapter names them) over at most this many tokens. A gated MLP's three
# MLP-wide activations are then bounded by this many rows instead of the batch's, 0.13 GiB instead of
# 1 GiB at LLaMA-7B widths with 8 × 1024 tokens in float32.
TOKEN_CHUNK = 1024


@contextlib.contextmanager
def token_wise_in_chunks(layer: nn.Module, paths: Iterable[str], rows: int | None = None) -> Iterator[None]:
    """While inside, the modules at `paths` of `layer` run over at most `rows` tokens at a time."""
    rows = rows or TOKEN_CHUNK
    patched = []
    for path in paths:
        module = layer.get_submodule(path)
        patched.append((module, module.__dict__.get("forward")))  # an instance forward (accelerate's hook) too
        module.forward = _in_chunks(module.forward, rows)
    try:
        yield
    finally:
        for module, own in reversed(patched):
            if own is None:
                del module.forward
            else:
                module.forward = own


def _in_chunks(forward: Callable, rows: int) -> Callable:
    def run(x, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[:-1].numel() <= rows:
            return forward(x, *args, **kwargs)
        flat = x.reshape(-1, x.shape[-1])
        first = forward(flat[:rows])
        if not isinstance(first, torch.Tensor) or first.shape[0] != rows:
            return forward(x)  # not token-wise after all: run it whole, as without chunks
        out = first.new_empty((flat.shape[0], *first.shape[1:]))
        out[:rows] = first
        del first
        for start in range(rows, flat.shape[0], rows):
            out[start:start + rows] = forward(flat[start:start + rows])
        return out.reshape(*x.shape[:-1], *out.shape[1:])

    return run


def layer_output(out: Any) -> torch.Tensor:
    """A decoder layer's hidden states out of whatever it returns (a tensor, or a tuple led by one)."""
    return out[0] if isinstance(out, tuple) else out


def _sequences(value: Any, batch: int, start: int, stop: int) -> Any:
    """`value` (a keyword argument of the layer) cut to sequences start:stop where it has one row per
    sequence; what is shared by the batch (a (1, seq) position table, a cache position) is left whole."""
    if isinstance(value, torch.Tensor):
        return value[start:stop] if value.dim() >= 2 and value.shape[0] == batch else value
    if isinstance(value, (tuple, list)):
        return type(value)(_sequences(v, batch, start, stop) for v in value)
    return value


def layer_forward(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], tokens: int | None = None
                  ) -> torch.Tensor:
    """The layer's hidden states out over a batch, run over at most `tokens` (TOKEN_CHUNK) tokens of
    whole sequences at a time, one sequence at least.

    Its activations (attention's projections and their rotated copies, about 8 tensors of a pass's
    tokens × hidden, and the residual stream's) are then those of one such pass, not of the batch:
    `[calibration] batch_size` no longer sets the forward's peak (1 GiB against 0.13 GiB at LLaMA-7B
    widths with 8 × 1024 tokens in float32). A layer whose output is not one row per sequence runs whole.
    """
    batch = hidden.shape[0]
    per_pass = max(1, (tokens or TOKEN_CHUNK) // max(1, hidden.shape[1])) if hidden.dim() == 3 else batch
    if batch <= per_pass:
        return layer_output(layer(hidden, **kwargs))

    def run(start: int, stop: int) -> Any:
        return layer_output(layer(hidden[start:stop], **{k: _sequences(v, batch, start, stop) for k, v in kwargs.items()}))

    first = run(0, per_pass)
    if not isinstance(first, torch.Tensor) or first.shape[0] != per_pass:
        return layer_output(layer(hidden, **kwargs))  # not one row per sequence: run it whole, as before
    out = first.new_empty((batch, *first.shape[1:]))
    out[:per_pass] = first
    del first
    for start in range(per_pass, batch, per_pass):
        out[start:start + per_pass] = run(start, min(start + per_pass, batch))
    return out


def run_layer(layer: nn.Module, batches: Iterable[LayerBatch], check: Callable[[], None] | None = None) -> None:
    """Run one decoder layer over every batch (`layer_forward`), replacing each batch's hidden states by the output."""
    with torch.inference_mode():
        for batch in batches:
            if check:
                check()
            batch.hidden = layer_forward(layer, batch.hidden, batch.kwargs)
