"""The architecture seams: signals as plugins, the layer walk's strategies, the run as a list of stages."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_llama, tiny_profile
from workbench.api import Allocation, Allocator, Option, Signal, SignalContext, hookimpl, uniform_ranks
from workbench.cli import app
from workbench.engine.allocation import budget_for
from workbench.engine.calibration import LayerBatch, capture_layer_inputs, run_layer
from workbench.engine.compress import assemble, calibrate, group_factorer
from workbench.engine.grouping import plan_groups
from workbench.engine.sensitivity import compute_signal
from workbench.engine.walk import GramStatistics, LayerWalk, Placement, Reducer, Strategies
from workbench.errors import Interrupted, ProfileError, RunFailed
from workbench.events import CancelToken, EventBus
from workbench.profile.schema import parse_profile
from workbench.registry import load_registry
from workbench.run.pipeline import run
from workbench.run.stages import Stage, compress_seconds, default_stages
from workbench.storage import checkpoint
from workbench.storage.checkpoint import work_dir_for

CPU = torch.device("cpu")
runner = CliRunner()


@pytest.fixture(autouse=True)
def _checkpoint_every_layer(monkeypatch):
    monkeypatch.setattr(checkpoint, "COMMIT_SPACING", 0.0)


def _interrupt_at(profile, stage, **kw):
    """Run until `stage` starts, cancel there (the run stops once it is done), return the Interrupted."""
    cancel = CancelToken()

    def listener(event):
        if event.stage == stage and event.kind == "stage_start":
            cancel.cancel("test interrupt")

    with pytest.raises(Interrupted) as caught:
        run(profile, events=EventBus([listener]), cancel=cancel, **kw)
    return caught.value


# ---------------------------------------------------------------------------------- signals


class Probe(Signal):
    """A third-party-style signal: per group, `scale` × the mean |output| of the group's first module,
    measured with that module swapped for a recording wrapper during one forward pass."""

    name = "probe"
    description = "test signal"
    options = (Option("scale", float, 1.0, min=0.0),)
    calls = 0

    def compute(self, ctx: SignalContext):
        type(self).calls += 1
        layers = ctx.adapter.decoder_layers(ctx.model)
        prefix = next(n for n, m in ctx.model.named_modules() if m is layers)
        seen = {}

        class Recorder(torch.nn.Module):
            def __init__(self, inner, key):
                super().__init__()
                self.inner, self.key = inner, key

            def forward(self, x):
                y = self.inner(x)
                seen[self.key] = float(y.abs().mean())
                return y

        swaps = {}
        for plan in ctx.plans:
            path = f"{prefix}.{plan.layers[0]}.{plan.site.path}"
            swaps[path] = Recorder(ctx.model.get_submodule(path), plan.key)
        with ctx.swapped(swaps), torch.inference_mode():
            ctx.model(input_ids=ctx.windows[:1].to(ctx.device), use_cache=False)
        return {key: torch.tensor([ctx.options["scale"] * value], dtype=torch.float64) for key, value in seen.items()}


class ProbeUniform(Allocator):
    name = "probe-uniform"
    description = "uniform ranks; notes the probe signal it received"
    needs = ("probe",)

    def allocate(self, groups, budget, options):
        return Allocation(uniform_ranks(groups, budget),
                          {"probe_sum": sum(float(g.sensitivity["probe"].sum()) for g in groups)})


class NeedsNothingRegistered(Allocator):
    name = "needs-nope"
    description = "needs a signal nobody registers"
    needs = ("nope",)

    def allocate(self, groups, budget, options):
        return uniform_ranks(groups, budget)


def _probe_module() -> types.ModuleType:
    module = types.ModuleType("wb_probe_plugin")

    @hookimpl
    def register_signals(register):
        register(Probe())

    @hookimpl
    def register_allocators(register):
        register(ProbeUniform())
        register(NeedsNothingRegistered())

    module.register_signals, module.register_allocators = register_signals, register_allocators
    return module


@pytest.fixture(scope="module")
def registry():
    registry = load_registry(strict=True)
    registry.add_module(_probe_module(), "wb-probe", "wb-probe", "1.0")
    return registry


def test_a_third_party_signal_is_computed_checkpointed_and_restored(registry, tiny_workspace, tmp_path):
    out = tmp_path / "out"
    text = tiny_profile(tiny_workspace, out, allocator="probe-uniform", extra="[signals.probe]\nscale = 2.0\n")
    profile = parse_profile(text, registry=registry)
    assert profile.signals == {"probe": {"scale": 2.0}}
    Probe.calls = 0
    _interrupt_at(profile, "allocate", registry=registry)
    assert Probe.calls == 1
    state = json.loads((work_dir_for(out) / "state.json").read_text())
    assert state["stages"]["sensitivity"]["meta"]["probe"]["options"] == {"scale": 2.0}

    report = run(profile, registry=registry, resume=True)
    assert Probe.calls == 1  # taken from the checkpoint, not computed again
    assert report["resumed_from_checkpoint"][-1] == "sensitivity"
    restored_sum = report["allocator"]["notes"]["probe_sum"]
    assert restored_sum > 0

    # changed signal options: the checkpointed values are not reused, the signal is computed again
    _interrupt_at(profile, "allocate", registry=registry, force=True)
    halved = parse_profile(text.replace("scale = 2.0", "scale = 1.0"), registry=registry)
    report = run(halved, registry=registry, resume=True, force=True)
    assert Probe.calls == 3 and "sensitivity" not in report["resumed_from_checkpoint"]
    assert report["allocator"]["notes"]["probe_sum"] == pytest.approx(restored_sum / 2, rel=1e-6)


def test_swapped_modules_are_restored_even_when_the_signal_raises(registry):
    model = tiny_llama(layers=2)
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, ["q_proj"], [], lambda t: 1)
    original = model.model.layers[0].self_attn.q_proj
    inside = {}

    class Failing(Signal):
        name = "failing"

        def compute(self, ctx):
            with ctx.swapped({"model.layers.0.self_attn.q_proj": torch.nn.Identity()}):
                inside["module"] = ctx.model.model.layers[0].self_attn.q_proj
                raise ValueError("mask training diverged")

    ctx = SignalContext(model=model, adapter=adapter, plans=plans, factors={}, windows=torch.zeros(1, 4, dtype=torch.long),
                        device=CPU, events=EventBus(), cancel=CancelToken())
    with pytest.raises(RunFailed, match="signal 'failing' from wb-probe 1.0 raised ValueError: mask training diverged"):
        compute_signal(Failing(), "signal 'failing' from wb-probe 1.0", ctx)
    assert isinstance(inside["module"], torch.nn.Identity)  # swapped inside the block
    assert model.model.layers[0].self_attn.q_proj is original  # and put back


def test_needs_naming_an_unregistered_signal_is_a_profile_problem_listing_the_registered(registry, tmp_path,
                                                                                        monkeypatch):
    import workbench.registry as registry_module

    monkeypatch.setattr(registry_module, "_cached", registry)
    path = tmp_path / "p.toml"
    path.write_text('[compression]\nallocator = "needs-nope"\n')
    result = runner.invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "needs the signal 'nope'" in result.output and "fisher, probe" in result.output

    path.write_text('[compression]\nallocator = "uniform"\n[signals.fishr]\nwindows = 2\n')
    result = runner.invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 2 and "unknown signal 'fishr'" in result.output and "fisher" in result.output


def test_the_old_fisher_windows_spelling_names_the_new_key(registry):
    text = '[compression]\nallocator = "loss-aware"\n[compression.allocator_options]\nfisher_windows = 4\n'
    with pytest.raises(ProfileError) as caught:
        parse_profile(text, registry=registry)
    [problem] = caught.value.problems
    assert problem.key == "compression.allocator_options.fisher_windows"
    assert "[signals.fisher] windows" in str(problem)
    resolved = parse_profile('[compression]\nallocator = "loss-aware"\n[signals.fisher]\nwindows = 4\n',
                             registry=registry)
    assert resolved.signals == {"fisher": {"windows": 4, "precision": "auto"}}
    assert parse_profile('[compression]\nallocator = "loss-aware"\n', registry=registry).signals == {
        "fisher": {"windows": 8, "precision": "auto"}}  # the declared defaults, filled like any option


# ---------------------------------------------------------------------------------- the layer walk


@pytest.fixture(scope="module")
def dense_setup():
    model = tiny_llama(layers=3)
    registry = load_registry(strict=True)
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, None, [], lambda t: 1)
    ids = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(5))
    return model, adapter, plans, ids


def _gram_of_outputs(model, module, ids) -> torch.Tensor:
    """float64 YᵀY of a bias-free linear `module`'s output when `model` runs over `ids`."""
    ys = []
    handle = module.register_forward_hook(lambda m, args, out: ys.append(out.detach().reshape(-1, out.shape[-1])))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    y = torch.cat(ys).to(torch.float64)
    return y.T @ y


def _gram_of_inputs(model, module, ids) -> torch.Tensor:
    """float64 XᵀX of `module`'s input when `model` runs over `ids`: the reference, without the walk."""
    xs = []
    handle = module.register_forward_pre_hook(lambda m, args: xs.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    with torch.inference_mode():
        model(input_ids=ids, use_cache=False)
    handle.remove()
    x = torch.cat(xs).double()
    return x.T @ x


class Recording(Reducer):
    """Keeps a copy of every statistic it is handed (and can scale them, like a sum over processes)."""

    def __init__(self, log: list, factor: float = 1.0):
        self.log, self.factor, self.seen = log, factor, {}

    def reduce(self, index, stats, tokens):
        self.log.append(("reduce", index, sorted(stats)))
        self.seen.update({(group, index): s.clone() for group, s in stats.items()})
        return {group: s * self.factor for group, s in stats.items()}, tokens


class TwoStreams:
    """Propagator for a second walk: the walked (compressed) layers run on their own inputs, where the
    statistics are taken; the dense layers run on the dense inputs, whose outputs are kept as targets."""

    def __init__(self, dense_layers):
        self.dense_layers, self.targets = dense_layers, {}

    def capture(self, model, first_layer, windows, batch_size, device, check):
        self.batches = capture_layer_inputs(model, first_layer, windows, batch_size, device, check)
        self.dense = [LayerBatch(b.hidden.clone(), b.kwargs) for b in self.batches]  # same embeddings

    def forward(self, index, layer, check):
        run_layer(layer, self.batches, check)  # the accumulator watches this layer
        run_layer(self.dense_layers[index], self.dense, check)  # not watched
        self.targets[index] = torch.cat([b.hidden for b in self.dense])

    def advance(self, index):
        pass

    def inputs(self):
        return [b.hidden for b in self.batches]

    def restore(self, hidden):
        raise AssertionError("not resumed here")

    def release(self):
        self.batches = self.dense = []


def test_walk_a_second_walk_runs_compressed_layers_and_keeps_dense_outputs_as_targets(dense_setup):
    model, adapter, plans, ids = dense_setup
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    compressed = copy.deepcopy(model)
    assemble(compressed, adapter, plans, dict(cal.factors), uniform_ranks(cal.spectra, budget_for(cal.spectra, 0.5)),
             cal.spectra)
    log: list = []
    reducer = Recording(log)
    streams = TwoStreams(adapter.decoder_layers(model))
    factored = {}
    walk = LayerWalk(compressed, adapter, plans,
                     factor=lambda layers, plan, stats: (factored.setdefault(plan.key, True), {}),
                     strategies=Strategies(reducer=reducer, propagator=streams))
    walk.run(ids, CPU, CancelToken().check)
    assert set(factored) == {p.key for p in plans}

    with torch.inference_mode():
        dense_hidden = model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    for i in range(2):  # hidden_states[i + 1] is layer i's output (the last one is normed)
        assert torch.allclose(streams.targets[i], dense_hidden[i + 1], rtol=1e-5, atol=1e-6)
    for i in range(3):
        c_layer, d_layer = adapter.decoder_layers(compressed)[i], adapter.decoder_layers(model)[i]
        want = _gram_of_inputs(compressed, c_layer.self_attn.q_proj, ids)
        got = reducer.seen[("attn_in", i)]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max())), i
        dense_gram = _gram_of_inputs(model, d_layer.self_attn.q_proj, ids)
        differs = not torch.allclose(got, dense_gram, rtol=1e-4, atol=1e-4 * float(dense_gram.abs().max()))
        assert differs == (i > 0)  # layer 0 sees the same embeddings; later ones the compressed stream


def test_walk_b_the_reducer_sees_every_statistic_before_factoring(dense_setup):
    model, adapter, plans, ids = dense_setup
    model = copy.deepcopy(model)
    two = [p for p in plan_groups(model, adapter, ["q_proj", "down_proj"], [], lambda t: 2)]
    log: list = []
    default = group_factorer("cholesky", CPU, EventBus())

    def factor(layers, plan, stats):
        log.append(("factor", plan.key))
        return default(layers, plan, stats)

    def walk(reducer):
        return LayerWalk(model, adapter, two, factor, Strategies(reducer=reducer)).run(ids, CPU, CancelToken().check)

    plain = walk(Reducer())
    log.clear()
    doubled = walk(Recording(log, factor=2.0))  # a sum over two identical processes
    def reduced(entries):
        return {(e[1], g) for e in entries if e[0] == "reduce" for g in e[2]}

    for plan in two:
        position = log.index(("factor", plan.key))
        before = reduced(log[:position])
        assert {(i, plan.statistic) for i in plan.layers} <= before, plan.key
    # down_proj@2, a one-layer remainder, is factored from its output's Gram (test_output_gram.py)
    assert reduced(log) == {(i, g) for i in range(3) for g in ("attn_in",)} | {
        (0, "mlp_out"), (1, "mlp_out"), (2, "mlp.down_proj:output")}
    for plan in two:  # what the reducer returned is what was factored: G → 2G scales σ by √2
        assert torch.allclose(doubled.factors[plan.key].singular_values.double(),
                              2 ** 0.5 * plain.factors[plan.key].singular_values.double(), rtol=1e-5)


def _assert_same_factors(test, reference):
    """σ to 1e-9 and Q·P at rank 4 to 1e-4 (float32 factors) for every group."""
    for key, f in test.factors.items():
        ref = reference.factors[key]
        assert torch.allclose(f.singular_values, ref.singular_values, rtol=1e-9), key
        q, p = f.factors(4, torch.float64)
        q0, p0 = ref.factors(4, torch.float64)
        assert torch.allclose(q[0] @ p, q0[0] @ p0, rtol=1e-4, atol=1e-5 * float((q0[0] @ p0).abs().max())), key


def test_walk_each_input_groups_last_reader_factors_its_gram_in_place_with_the_same_result(dense_setup, monkeypatch):
    from workbench.engine import whitening

    model, adapter, plans, ids = dense_setup
    before = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    monkeypatch.setattr(whitening, "IN_PLACE_FROM", 16)  # every input of the tiny model is wide enough
    monkeypatch.setattr(whitening, "BLOCK", 8)
    owners = []
    real = whitening._cholesky_in_place
    monkeypatch.setattr(whitening, "_cholesky_in_place", lambda gram, block: owners.append(gram.shape) or real(gram, block))
    after = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    # one Gram per input group and layer (attn_in, o_in, mlp_in), each by its last reader only; down_proj
    # is factored from its output's Gram, with no whitening factor
    groups = {p.statistic for p in plans if not p.output_statistic}
    assert len(owners) == 3 * len(groups) and len(groups) < len(plans)
    methods = {e["group"]: e["method"] for e in after.whitening}
    assert all(methods[p.key] == ("output-gram" if p.output_statistic else "cholesky") for p in plans)
    _assert_same_factors(after, before)


def test_walk_a_spent_gram_is_freed_before_the_next_group_is_factored(dense_setup, monkeypatch):
    """The walk's statistics are the only holder of a layer's Grams: popping a spent one frees it."""
    import weakref

    from workbench.engine import compress

    model, adapter, plans, ids = dense_setup
    real = compress._factor_group
    spent_refs, checked = [], []

    def watching(layers, plan, grams, method, device, full, spent=(), **kwargs):
        for key, ref in spent_refs:  # spent by an earlier group, popped by the factor step after it
            assert ref() is None, f"{key} is still held after the group that spent it"
            checked.append(key)
        spent_refs.clear()
        spent_refs.extend((key, weakref.ref(grams[key])) for key in spent)
        return real(layers, plan, grams, method, device, full, spent, **kwargs)

    monkeypatch.setattr(compress, "_factor_group", watching)
    calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    groups_per_layer = len({p.site.input_group for p in plans})
    assert len(checked) >= 3 * groups_per_layer - 1  # every spent Gram but the walk's very last


def test_groups_whitened_by_the_same_grams_factor_them_once_with_the_same_result(dense_setup, monkeypatch):
    from workbench.engine import factorize, walk, whitening

    model, adapter, plans, ids = dense_setup
    monkeypatch.setattr(walk, "_shared_whitenings", lambda ready, pending: {})  # every group its own whitening
    alone = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    monkeypatch.undo()
    monkeypatch.setattr(whitening, "IN_PLACE_FROM", 16)  # the first reader takes the Gram's memory
    factored = []
    real = whitening.whitening_factor
    monkeypatch.setattr(factorize, "whitening_factor", lambda gram, method, overwrite: factored.append(
        (gram.shape[0], overwrite)) or real(gram, method, overwrite))
    shared = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken())
    groups = {p.statistic for p in plans if not p.output_statistic}
    assert len(factored) == 3 * len(groups) < len(plans)  # once per input group and layer, not per group
    assert all(overwrite for _, overwrite in factored)  # the first reader (or the only one) in place
    _assert_same_factors(shared, alone)
    assert [e["method"] for e in shared.whitening] == [e["method"] for e in alone.whitening]


def test_shared_whitenings_name_the_first_reader_and_whether_it_may_overwrite():
    from workbench.api import Site
    from workbench.engine.grouping import GroupPlan
    from workbench.engine.walk import _shared_whitenings

    def plan(name, group, layers):
        return GroupPlan(f"{name}@{layers[0]}", Site(name, name, group), tuple(layers), 8, 8)

    q, k, v = plan("q", "attn", [3]), plan("k", "attn", [3]), plan("v", "attn", [3])
    gate, up, down = plan("gate", "mlp_in", [3]), plan("up", "mlp_in", [3]), plan("down", "mlp_out", [3])
    assert _shared_whitenings([q, k, v, gate, up, down], [q, k, v, gate, up, down]) == {"q@3": True, "gate@3": True}
    # a basis shared with layer 4 reads ("mlp_in", 3) too: gate and up reuse one whitening, but not in its memory
    pending_up = plan("up", "mlp_in", [3, 4])
    assert _shared_whitenings([q, k, gate, down], [q, k, gate, down, pending_up]) == {"q@3": True}
    gate2 = plan("gate2", "mlp_in", [3])
    assert _shared_whitenings([gate, gate2], [gate, gate2, pending_up]) == {"gate@3": False}


def test_walk_runs_the_adapters_token_wise_modules_in_chunks_with_the_same_statistics(dense_setup, monkeypatch):
    """Each layer runs over whole sequences of at most TOKEN_CHUNK tokens (one at least) and its MLP
    over at most TOKEN_CHUNK tokens at a time (a ragged last chunk included); the Grams are those of
    the whole model's forward, and the walk leaves the modules as it found them."""
    from workbench.engine import calibration

    model, adapter, plans, ids = dense_setup
    assert adapter.token_wise_modules(model) == ["mlp"]
    monkeypatch.setattr(calibration, "TOKEN_CHUNK", 5)  # batches of 80, 80 and 32 tokens: the last chunk is 2
    layers = adapter.decoder_layers(model)
    rows: list[int] = []
    sequences: list[int] = []  # per call of a decoder layer past the first (whose hooks see the capture too)
    handles = [layer.mlp.down_proj.register_forward_pre_hook(lambda m, args: rows.append(args[0].reshape(
        -1, args[0].shape[-1]).shape[0])) for layer in layers]
    handles += [layer.register_forward_pre_hook(lambda m, args, kwargs: sequences.append(
        (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True) for layer in layers[1:]]
    log: list = []
    recording = Recording(log)
    try:
        LayerWalk(model, adapter, plans, group_factorer("cholesky", CPU, EventBus()),
                  Strategies(reducer=recording)).run(ids, CPU, CancelToken().check, batch_size=5)
    finally:
        for handle in handles:
            handle.remove()
    assert max(rows) == 5 and min(rows) < 5 and sum(rows) == len(layers) * ids.numel()
    assert set(sequences) == {1} and len(sequences) == (len(layers) - 1) * ids.shape[0]  # one 16-token sequence a pass
    assert all("forward" not in layer.mlp.__dict__ for layer in layers)
    for i, layer in enumerate(layers):
        for group, module in (("mlp.down_proj:output", layer.mlp.down_proj), ("mlp_in", layer.mlp.gate_proj),
                              ("attn_in", layer.self_attn.q_proj)):
            # float32 activations: chunked GEMMs round differently
            exact = (_gram_of_outputs if group.endswith(":output") else _gram_of_inputs)(model, module, ids)
            assert (recording.seen[(group, i)] - exact).norm() / exact.norm() < 1e-6, (group, i)


class _PerSequence(torch.nn.Module):
    """A stand-in decoder layer whose output per sequence depends on that sequence's arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict] = []

    def forward(self, hidden, attention_mask=None, position_ids=None, position_embeddings=None,
                cache_position=None, use_cache=False):
        self.calls.append({"hidden": hidden.shape[0], "mask": attention_mask.shape[0],
                           "positions": position_ids.shape[0], "cos": position_embeddings[0].shape[0]})
        cos, sin = position_embeddings
        out = hidden * 2 + attention_mask.sum(dim=(1, 2, 3))[:, None, None] + position_ids[..., None]
        return (out + cos.sum(-1, keepdim=True) - sin.sum(-1, keepdim=True) + cache_position.sum(),)


def test_a_layer_runs_over_whole_sequences_with_each_ones_own_arguments():
    """Arguments with a row per sequence are cut with the batch; those the batch shares (a (1, S) table,
    a 1-D cache position, even one as long as the batch) are passed whole; the output is the whole batch's."""
    from workbench.engine.calibration import layer_forward

    g = torch.Generator().manual_seed(0)
    batch, seq = 7, 7
    hidden = torch.randn(batch, seq, 4, generator=g)
    kwargs = {"attention_mask": torch.randn(batch, 1, seq, seq, generator=g),
              "position_ids": torch.arange(seq)[None].float(),
              "position_embeddings": (torch.randn(batch, seq, 3, generator=g), torch.randn(batch, seq, 3, generator=g)),
              "cache_position": torch.arange(seq).float(), "use_cache": False}
    layer = _PerSequence()
    whole = layer(hidden, **kwargs)[0]
    layer.calls.clear()
    out = layer_forward(layer, hidden, kwargs, tokens=2 * seq + 3)  # two sequences a pass, a ragged last one
    assert torch.equal(out, whole)
    assert [c["hidden"] for c in layer.calls] == [2, 2, 2, 1]
    assert all(c["mask"] == c["cos"] == c["hidden"] and c["positions"] == 1 for c in layer.calls)
    layer.calls.clear()
    assert torch.equal(layer_forward(layer, hidden, kwargs, tokens=1), whole)  # fewer tokens than a sequence: one
    assert len(layer.calls) == batch


def test_a_layer_whose_output_is_not_per_sequence_runs_whole():
    from workbench.engine.calibration import layer_forward

    class Pool(torch.nn.Module):
        def forward(self, hidden):
            return hidden.mean(dim=0, keepdim=True)

    hidden = torch.randn(6, 3, 2)
    assert torch.equal(layer_forward(Pool(), hidden, {}, tokens=6), hidden.mean(dim=0, keepdim=True))  # passes of 2


def test_token_wise_chunks_restore_an_instance_forward_and_run_whole_what_is_not_token_wise():
    from workbench.engine.calibration import token_wise_in_chunks

    layer = torch.nn.Module()
    layer.mlp = torch.nn.Linear(4, 3)
    calls: list[tuple[int, ...]] = []

    def hooked(x):  # what accelerate's hooks put on a module: an instance attribute
        calls.append(tuple(x.shape))
        return torch.nn.Linear.forward(layer.mlp, x)

    layer.mlp.forward = hooked
    x = torch.randn(2, 7, 4)
    with token_wise_in_chunks(layer, ["mlp"], rows=3):
        out = layer.mlp(x)
    assert calls == [(3, 4), (3, 4), (3, 4), (3, 4), (2, 4)]  # 14 tokens in chunks of 3
    assert torch.allclose(out, torch.nn.functional.linear(x, layer.mlp.weight, layer.mlp.bias))
    assert layer.mlp.forward is hooked

    layer.pool = torch.nn.Module()  # mixes tokens: its first chunk's output has the wrong length
    layer.pool.forward = lambda x: x.mean(dim=0, keepdim=True)
    with token_wise_in_chunks(layer, ["pool"], rows=3):
        pooled = layer.pool(x.reshape(-1, 4))
    assert torch.allclose(pooled, x.reshape(-1, 4).mean(dim=0, keepdim=True))


def test_walk_c_a_placement_sees_each_layer_go_on_and_off_the_device(dense_setup):
    model, adapter, plans, ids = dense_setup
    model = copy.deepcopy(model)
    moves: list = []

    class Watching(Placement):
        current = None

        def before(self, index, layer):
            assert self.current is None
            self.current = index
            moves.append(("on", index, layer))

        def after(self, index, layer):
            assert self.current == index
            self.current = None
            moves.append(("off", index, layer))

    placement = Watching()

    class Checked(GramStatistics):
        def start(self, index, layer, modules, outputs=None):
            assert placement.current == index  # statistics are taken while the layer is placed
            super().start(index, layer, modules, outputs)

    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken(),
                    strategies=Strategies(placement=placement, accumulator=Checked()))
    layers = adapter.decoder_layers(model)
    assert moves == [(kind, i, layers[i]) for i in range(3) for kind in ("on", "off")]
    reference = calibrate(copy.deepcopy(model), adapter, plans, ids, CPU, EventBus(), CancelToken())
    for key, f in cal.factors.items():  # the default strategies behind the seams: the same numbers
        assert torch.equal(f.singular_values, reference.factors[key].singular_values)


# ---------------------------------------------------------------------------------- stages


class Probing(Stage):
    """A new stage, added to the list and nothing else: it runs after calibration, is timed, counts
    in compress_s, and keeps its result (a tensor and a number) in the work directory."""

    name = "probe stage"
    label = "probe result"
    compress = True
    runs = 0

    def run(self, ctx):
        type(self).runs += 1
        ctx.probe = torch.stack([s.singular_values[0] for s in ctx.calibrated.spectra])

    def save(self, ctx, work):
        work.save_stage(self.name, {"groups": len(ctx.probe)}, {"top": ctx.probe}, label=self.label)

    def restore(self, ctx, work):
        saved = work.load_stage(self.name)
        if saved is None:
            return False
        meta, tensors = saved
        assert meta == {"groups": len(tensors["top"])}
        ctx.probe = tensors["top"]
        return True


class Reading(Stage):
    name = "read probe"
    timed = False

    def run(self, ctx):
        ctx.report["probe"] = ctx.probe.tolist()


def test_a_new_stage_runs_is_timed_checkpointed_and_restored(tiny_workspace, tmp_path):
    stages = default_stages()
    at = [s.name for s in stages].index("calibrate") + 1
    stages[at:at] = [Probing()]
    stages.append(Reading())
    out = tmp_path / "out"
    profile = parse_profile(tiny_profile(tiny_workspace, out, allocator="uniform"))
    Probing.runs = 0
    _interrupt_at(profile, "allocate", stages=stages)
    assert Probing.runs == 1
    work = work_dir_for(out)
    state = json.loads((work / "state.json").read_text())
    assert state["stages"]["probe stage"]["meta"] == {"groups": 4 * 7}
    assert (work / state["stages"]["probe stage"]["file"]).is_file()
    assert "probe result" in checkpoint.WorkDir.describe(state)

    report = run(profile, resume=True, stages=stages)
    assert Probing.runs == 1  # restored, not run again
    assert report["resumed_from_checkpoint"][-1] == "probe result"
    assert "probe stage" in report["timings"] and "read probe" not in report["timings"]
    compress = sum(report["timings"][n] for n in ("calibrate", "probe stage", "allocate", "assemble"))
    assert report["timings"]["compress_s"] == pytest.approx(compress, abs=0.002)
    assert len(report["probe"]) == 4 * 7 and all(v > 0 for v in report["probe"])
    assert not work.exists()


def test_compress_seconds_sum_the_stages_marked_compress():
    from types import SimpleNamespace

    stages = default_stages()
    ctx = SimpleNamespace(stages=stages, timings={s.name: 1.0 for s in stages} | {"other": 5.0})
    assert compress_seconds(ctx) == sum(1.0 for s in stages if s.compress)
    assert {s.name for s in stages if s.compress} == {"calibrate", "sensitivity", "allocate", "assemble",
                                                     "compensate", "recover"}


def test_calibration_batch_size_sets_the_walks_batches_and_the_plans_forward_term(tiny_workspace, tmp_path, monkeypatch):
    from workbench.engine import walk as walk_module
    from workbench.run.plan import setting
    from workbench.run.preflight import shapes_of

    captured = []
    real = walk_module.capture_layer_inputs

    def spying(model, first_layer, windows, batch_size, device, check):
        captured.append(batch_size)
        return real(model, first_layer, windows, batch_size, device, check)

    monkeypatch.setattr(walk_module, "capture_layer_inputs", spying)
    reports = {}
    for size in (8, 3):
        text = tiny_profile(tiny_workspace, tmp_path / f"out{size}", samples=8).replace(
            "seq_len = 32\n[compression]", f"seq_len = 32\nbatch_size = {size}\n[compression]")
        profile = parse_profile(text, str(tmp_path / f"p{size}.toml"))
        assert profile.calibration.batch_size == size
        reports[size] = run(profile, force=True)
    assert captured == [8, 3]
    assert [r["rank"] for r in reports[3]["ranks"]] == [r["rank"] for r in reports[8]["ranks"]]  # rounding only
    model = tiny_llama(layers=2)
    registry = load_registry(strict=True)
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, None, [], lambda t: 1)
    small = parse_profile("[calibration]\nbatch_size = 1\n", str(tmp_path / "s.toml"))
    large = parse_profile("[calibration]\nbatch_size = 32\n", str(tmp_path / "l.toml"))
    forward = [shapes_of(model, plans, p, 10**6).batch for p in (small, large)]
    assert forward == [1, 32]
    # under offload one batch in and out is on the device: 32 sequences hold more than 1
    on_device = [setting(shapes_of(model, plans, p, 10**6, adapter), "cpu").phases["calibration"].device
                 for p in (small, large)]
    assert on_device[0] < on_device[1]
