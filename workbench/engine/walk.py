"""The layer walk: calibration as named phases over the decoder layers, with strategies at the seams.

    capture     Propagator.capture: the first decoder layer's inputs (hidden states and keyword arguments)
    for each layer i (from a checkpoint's `next_layer` on):
      place       Placement.before(i, layer); the layer's targeted weights are checked for NaN/Inf
      accumulate  the Accumulator watches the layer's statistics (its input groups' inputs, and the
                  outputs of groups factored from their output's Gram) while Propagator.forward runs the
                  layer over every batch (the adapter's token-wise modules, such as the MLP, over
                  chunks of at most TOKEN_CHUNK tokens)
      reduce      Reducer.reduce(i, statistics, tokens): every per-layer statistic passes through here
                  before anything uses it (where an all-reduce across processes goes)
      factor      each group whose last layer is i, from its layers' statistics (the `factor` callable,
                  run through Reducer.factor_groups, which may share the groups out among processes);
                  a statistic that no later group reads may be overwritten and freed by the one
                  factored last among those reading it (`spent_by`)
      release     Placement.after(i, layer); statistics no pending group needs are freed
      propagate   Propagator.advance(i): the layer's outputs become the next layer's inputs
      after       each after-layer callback gets a `LayerDone` (checkpoint, progress)

The defaults reproduce SVD-LLM's calibration: the model stays where it is (`Placement`), float64
Gram matrices of each input group (`GramStatistics`), no reduction (`Reducer`) and the dense
model's own activations, replaced batch by batch as each layer runs (`LayerInputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from workbench.engine.calibration import (GramAccumulator, LayerBatch, capture_layer_inputs, run_layer,
                                          token_wise_in_chunks)
from workbench.engine.factorize import GroupFactors
from workbench.engine.grouping import GroupPlan, token_wise_paths
from workbench.engine.numerics import check_gram, check_layer_weights
from workbench.engine.state import CalibrationState
from workbench.errors import RunFailed

Check = Callable[[], None]


# ---------------------------------------------------------------------------------- strategies


class Placement:
    """Puts a layer where it is computed and takes it away after. Default: the model is already there."""

    def before(self, index: int, layer: nn.Module) -> None:
        """Called before layer `index` runs."""

    def after(self, index: int, layer: nn.Module) -> None:
        """Called once layer `index` is done (also when it failed)."""


class Accumulator(Protocol):
    """Collects one statistic per input group (and per output watched) while a layer runs."""

    def start(self, index: int, layer: nn.Module, modules: dict[str, nn.Module],
              outputs: dict[str, nn.Module] | None = None) -> None:
        """Begin watching `modules` ({input group: the module whose input it is}) of layer `index`, and
        `outputs` ({statistic: the linear module whose output's Gram it is}, `GroupPlan.output_statistic`)."""

    def stop(self) -> None:
        """Stop watching (always called, also when the layer failed)."""

    def stats(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """({input group: statistic}, {input group: tokens seen}) of the layer just run."""


class GramStatistics:
    """The default accumulator: XᵀX of each input group (YᵀY of each output watched), accumulated in
    float64 (GramAccumulator)."""

    def __init__(self, precision: str = "float64") -> None:
        self.precision = precision
        self._acc: GramAccumulator | None = None

    def start(self, index: int, layer: nn.Module, modules: dict[str, nn.Module],
              outputs: dict[str, nn.Module] | None = None) -> None:
        self._acc = GramAccumulator(self.precision)
        for name, module in modules.items():
            self._acc.watch(name, module)
        for name, module in (outputs or {}).items():
            self._acc.watch_output(name, module)

    def stop(self) -> None:
        if self._acc is not None:
            self._acc.close()

    def stats(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        acc, self._acc = self._acc, None
        return acc.grams, dict(acc.tokens)  # symmetric, complete


class Reducer:
    """Sees every per-layer statistic before it is used, and factors the groups complete at a layer.
    Default: one process, nothing to combine, groups factored one after the other."""

    def reduce(self, index: int, stats: dict[str, torch.Tensor], tokens: dict[str, int]
               ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        return stats, tokens

    def factor_groups(self, factor: "Factor", layers: nn.ModuleList, plans: Sequence[GroupPlan], stats: dict
                      ) -> list[tuple[GroupFactors, dict[str, Any]]]:
        """`factor` of each plan, in order (where processes would share the work)."""
        return [factor(layers, plan, stats) for plan in plans]


class Propagator(Protocol):
    """Owns the inputs the layers are driven with, and what becomes the next layer's inputs."""

    def capture(self, model: nn.Module, first_layer: nn.Module, windows: torch.Tensor, batch_size: int,
                device: torch.device, check: Check) -> None: ...

    def forward(self, index: int, layer: nn.Module, check: Check) -> None:
        """Run layer `index` over the inputs (the accumulator is watching)."""

    def advance(self, index: int) -> None:
        """Make layer `index`'s outputs the next layer's inputs."""

    def inputs(self) -> list[torch.Tensor]:
        """The next layer's hidden states, per batch (what a checkpoint keeps)."""

    def restore(self, hidden: list[torch.Tensor] | None) -> None:
        """Put a checkpoint's hidden states in place of the freshly captured ones."""

    def release(self) -> None: ...


class LayerInputs:
    """The default propagator: the dense model's activations, each batch's replaced as the layer runs
    (so there is never a second copy of them: `advance` has nothing left to do)."""

    def __init__(self) -> None:
        self.batches: list[LayerBatch] = []

    def capture(self, model, first_layer, windows, batch_size, device, check) -> None:
        self.batches = capture_layer_inputs(model, first_layer, windows, batch_size, device, check)

    def forward(self, index: int, layer: nn.Module, check: Check) -> None:
        run_layer(layer, self.batches, check)

    def advance(self, index: int) -> None:
        pass

    def inputs(self) -> list[torch.Tensor]:
        return [b.hidden for b in self.batches]

    def restore(self, hidden: list[torch.Tensor] | None) -> None:
        batches = self.batches
        if hidden is None or len(hidden) != len(batches) or any(
                h.shape != b.hidden.shape or h.dtype != b.hidden.dtype for h, b in zip(hidden, batches)):
            raise RunFailed("the checkpoint's calibration inputs do not match this run's calibration batches; "
                            "start over with --force (without --resume)")
        for batch, h in zip(batches, hidden):
            batch.hidden = h.to(batch.hidden.device)

    def release(self) -> None:
        self.batches = []


@dataclass
class Strategies:
    """The four seams of the walk; each defaults to today's single-process, in-place behaviour."""

    placement: Placement = field(default_factory=Placement)
    accumulator: Accumulator = field(default_factory=GramStatistics)
    reducer: Reducer = field(default_factory=Reducer)
    propagator: Propagator = field(default_factory=LayerInputs)


# ---------------------------------------------------------------------------------- the driver


class LayerStatistics(dict):
    """The walk's statistics, {(input group, layer): tensor}, and, while a layer's groups are factored,
    which of them each group is the last to read (`last_reader`: {group key: [statistic keys]}) and
    which groups' whitening later groups reuse (`shared`: {group key: may it overwrite the Grams})."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.last_reader: dict[str, list[tuple[str, int]]] = {}
        self.shared: dict[str, bool] = {}


def spent_by(stats: dict, key: str) -> tuple[tuple[str, int], ...]:
    """The statistics that no group reads after group `key`: its factor step may overwrite them, and frees them."""
    return tuple(getattr(stats, "last_reader", {}).get(key, ()))


def shared_by(stats: dict, key: str) -> bool | None:
    """None, or group `key` is the first of several whitened by the same Grams (same input group and
    layers), which reuse its whitening: True when no other group reads those Grams, so the factor
    may take their memory."""
    return getattr(stats, "shared", {}).get(key)


def whitening_key(plan: GroupPlan) -> tuple[str, tuple[int, ...]]:
    """What a group's whitening depends on: its statistic and layers (q/k/v of one layer share it)."""
    return plan.statistic, tuple(plan.layers)


def _shared_whitenings(ready: Sequence[GroupPlan], pending: Sequence[GroupPlan]) -> dict[str, bool]:
    """For the first of each run of ready groups with the same whitening: may it overwrite the Grams."""
    out: dict[str, bool] = {}
    seen: set = set()
    for index, plan in enumerate(ready):
        mine = whitening_key(plan)
        if mine in seen or not any(whitening_key(p) == mine for p in ready[index + 1:]):
            continue
        seen.add(mine)
        keys = {(mine[0], j) for j in mine[1]}
        out[plan.key] = not any(whitening_key(p) != mine and keys & {(p.statistic, j) for j in p.layers}
                                for p in (*ready, *pending))
    return out


def _last_readers(ready: Sequence[GroupPlan], pending: Sequence[GroupPlan]) -> dict[str, list[tuple[str, int]]]:
    """For each ready group (factored in this order), the statistics it is the last to read."""
    later = {(p.statistic, j) for p in pending if p not in ready for j in p.layers}
    reader: dict[tuple[str, int], str] = {}
    for plan in ready:
        for j in plan.layers:
            reader[(plan.statistic, j)] = plan.key
    out: dict[str, list[tuple[str, int]]] = {}
    for stat, key in reader.items():
        if stat not in later:
            out.setdefault(key, []).append(stat)
    return out


def _file_statistics(stats: LayerStatistics, index: int, layer_stats: dict[str, torch.Tensor],
                     layer_tokens: dict[str, int], plans: Sequence[GroupPlan], tokens: int) -> int:
    """Check layer `index`'s statistics and move them into `stats`, from here on their only holder:
    a group that spends one frees it (a name left holding a 7B down_proj's Gram keeps 0.9 GiB).
    Returns the token count."""
    for group in list(layer_stats):
        stat = layer_stats.pop(group)
        paths = sorted({p.site.path for p in plans if p.statistic == group})
        check_gram(stat, index, group, paths)
        stats[(group, index)] = stat
        tokens = layer_tokens.get(group, tokens)
    return tokens


@dataclass
class LayerDone:
    """What an after-layer callback is told: layer `index` of `last` is done."""

    index: int
    last: int
    factored: list[str]  # groups factored at this layer
    state: CalibrationState  # where the walk stands now (what a checkpoint keeps)

    @property
    def final(self) -> bool:
        return self.index == self.last


# (layers, plan, {(input group, layer): statistic}) -> (factors, report entry)
Factor = Callable[[nn.ModuleList, GroupPlan, dict], tuple[GroupFactors, dict[str, Any]]]


class LayerWalk:
    """Walks the decoder layers once through the phases above (see the module docstring)."""

    def __init__(self, model: nn.Module, adapter: Any, plans: Sequence[GroupPlan], factor: Factor,
                 strategies: Strategies | None = None, after_layer: Sequence[Callable[[LayerDone], None]] = ()):
        self.model, self.adapter, self.plans, self.factor = model, adapter, list(plans), factor
        self.strategies = strategies or Strategies()
        self.after_layer = list(after_layer)

    def run(self, windows: torch.Tensor, device: torch.device, check: Check, batch_size: int = 8,
            state: CalibrationState | None = None) -> CalibrationState:
        s = self.strategies
        layers = self.adapter.decoder_layers(self.model)
        plans = self.plans
        last = max(i for p in plans for i in p.layers)
        needed: dict[int, set[str]] = {}
        for plan in plans:
            for i in plan.layers:
                needed.setdefault(i, set()).add(plan.statistic)
        pending = {plan.key: plan for plan in plans}
        token_wise = token_wise_paths(self.model, self.adapter)
        stats = LayerStatistics()
        factors: dict[str, GroupFactors] = {}
        report: list[dict[str, Any]] = []
        tokens, start = 0, 0
        if state is not None:
            start, stats, factors, report, tokens = (state.next_layer, LayerStatistics(state.grams), state.factors,
                                                     state.whitening, state.tokens)
            pending = {k: p for k, p in pending.items() if k not in factors}
        try:
            if start <= last:
                s.propagator.capture(self.model, layers[0], windows, batch_size, device, check)
                if state is not None:
                    s.propagator.restore(state.hidden)
            for i in range(start, last + 1):
                check()
                layer = layers[i]
                s.placement.before(i, layer)
                try:
                    check_layer_weights(layer, i, {p.site for p in plans if i in p.layers})
                    modules, outputs = {}, {}
                    for name in sorted(needed.get(i, ())):
                        plan = next(p for p in plans if p.statistic == name)
                        (outputs if plan.output_statistic else modules)[name] = layer.get_submodule(plan.site.path)
                    s.accumulator.start(i, layer, modules, outputs)
                    try:
                        with token_wise_in_chunks(layer, token_wise):
                            s.propagator.forward(i, layer, check)
                    finally:
                        s.accumulator.stop()
                    tokens = _file_statistics(stats, i, *s.reducer.reduce(i, *s.accumulator.stats()), plans, tokens)
                    done = []
                    ready = [p for p in pending.values() if p.layers[-1] == i]
                    stats.last_reader = _last_readers(ready, list(pending.values()))
                    stats.shared = _shared_whitenings(ready, list(pending.values()))
                    try:
                        results = s.reducer.factor_groups(self.factor, layers, ready, stats)
                    finally:
                        stats.last_reader, stats.shared = {}, {}
                    for plan, (group_factors, entry) in zip(ready, results):
                        factors[plan.key] = group_factors
                        report.append(entry)
                        del pending[plan.key]
                        done.append(plan.key)
                finally:
                    s.placement.after(i, layer)
                live = {(p.statistic, j) for p in pending.values() for j in p.layers}
                for key in [k for k in stats if k not in live]:
                    del stats[key]
                s.propagator.advance(i)
                hidden = s.propagator.inputs() if i < last else None
                now = CalibrationState(i + 1, hidden, stats, factors, report, tokens)
                for callback in self.after_layer:
                    callback(LayerDone(i, last, done, now))
                del hidden, now  # what the callbacks read of the inputs (mapped pages, under offload) goes now
        finally:
            s.propagator.release()
        return CalibrationState(last + 1, None, stats, factors, report, tokens)
