"""Misbehaving plugins: each is named (with its distribution and version), contained, and mapped to
the public exit codes (2 bad profile or usage, 1 the run failed); a compressed model survives a
failing evaluator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_profile
from test_plugins import _install_fake
from workbench.engine.allocation import budget_for, check_allocation
from workbench.cli import app
from workbench.errors import PluginError
from workbench.api import GroupSpectrum
from workbench.registry import load_registry

runner = CliRunner()


@pytest.fixture
def fresh_registry(monkeypatch):
    """Make the CLI load the plugins again (and forget them after the test)."""
    import workbench.registry as plugins

    monkeypatch.setattr(plugins, "_cached", None)


def _failure(registry, name):
    [failure] = [f for f in registry.failures if f.name == name]
    return failure


# --------------------------------------------------------------------------- registering


def test_a_plugin_calling_sys_exit_on_import_is_contained(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, "wb_quits", "1.0", "import sys\nsys.exit('needs a GPU')\n")
    registry = load_registry(strict=False)
    assert "SystemExit: needs a GPU" in str(_failure(registry, "wb_quits"))
    assert "wb_quits 1.0" in str(_failure(registry, "wb_quits"))
    assert "uniform" in registry.allocators


def test_a_register_hook_calling_sys_exit_is_rolled_back(tmp_path, monkeypatch):
    _install_fake(tmp_path, monkeypatch, "wb_quits2", "1.1", """
        import sys
        from workbench.hookspecs import hookimpl
        from workbench.api import Allocator

        class Fine(Allocator):
            name = "fine-then-quit"

        @hookimpl
        def register_allocators(register):
            register(Fine())
            sys.exit(4)
    """)
    registry = load_registry(strict=False)
    assert "fine-then-quit" not in registry.allocators
    assert "SystemExit: 4" in _failure(registry, "wb_quits2").error


_PLUGIN = """
from workbench.hookspecs import hookimpl
from workbench.api import Adapter, Allocator, Option

class Bad({base}):
    name = "bad-decl"
    {body}

@hookimpl
def register_{kind}s(register):
    register(Bad())
"""


@pytest.mark.parametrize("kind,body,error", [
    ("allocator", 'options = (Option("x", "int", 1),)', "type must be a class"),
    ("allocator", 'options = (Option("x", str, "a", choices="abc"),)', "choices must be a tuple"),
    ("allocator", 'options = (Option("x", int, 1, min="0"),)', "min must be a number"),
    ("allocator", 'options = Option("x", int, 1)', "options must be a tuple"),
    ("allocator", 'options = ("x",)', "options must be workbench.api.Option"),
    ("allocator", 'options = (Option("x", int, 1), Option("x", int, 2))', "options declared twice"),
    ("allocator", 'needs = "fisher"', "needs must be a tuple of signal names"),
    ("allocator", 'name = 5', "non-empty string `name`"),
    ("allocator", 'name = "  "', "non-empty string `name`"),
    ("adapter", 'priority = "high"', "priority must be a number"),
])
def test_a_bad_declaration_is_a_load_failure_naming_the_plugin(tmp_path, monkeypatch, kind, body, error):
    base = kind.capitalize()
    _install_fake(tmp_path, monkeypatch, "wb_decl", "2.5", _PLUGIN.format(base=base, body=body, kind=kind))
    registry = load_registry(strict=False)
    failure = _failure(registry, "wb_decl")
    assert error in failure.error and "wb_decl 2.5" in str(failure)
    assert "bad-decl" not in registry.table(kind)


def test_validate_names_the_plugin_that_failed_to_load(tmp_path, monkeypatch, fresh_registry):
    """Before the check at registration, this profile was a TypeError traceback in `validate`."""
    _install_fake(tmp_path, monkeypatch, "wb_decl2", "0.7", _PLUGIN.format(
        base="Allocator", body='options = (Option("x", "int", 1),)', kind="allocator"))
    path = tmp_path / "p.toml"
    path.write_text('[compression]\nallocator = "bad-decl"\n[compression.allocator_options]\nx = 3\n')
    result = runner.invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "plugin 'wb_decl2' (wb_decl2 0.7) failed to load" in result.output
    assert "unknown allocator 'bad-decl'" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_strict_plugins_make_validate_exit_1_with_a_message(tmp_path, monkeypatch, fresh_registry):
    _install_fake(tmp_path, monkeypatch, "wb_broken9", "9.9", "raise ImportError('needs [bold]frobnicate[/]')\n")
    monkeypatch.setenv("WORKBENCH_STRICT_PLUGINS", "1")
    path = tmp_path / "p.toml"
    path.write_text("")
    result = runner.invoke(app, ["profile", "validate", str(path)])
    assert result.exit_code == 1
    assert "wb_broken9 9.9" in result.output and "[bold]frobnicate[/]" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_failure_message_with_markup_characters_is_printed_verbatim(tmp_path, monkeypatch, fresh_registry):
    """rich would read '[/x]' as a closing tag and raise MarkupError on the failure line."""
    _install_fake(tmp_path, monkeypatch, "wb_brackets", "1.0", "raise ImportError('bad tag [/x] here')\n")
    result = runner.invoke(app, ["plugins"])
    assert result.exit_code == 0, result.output
    assert "bad tag [/x] here" in result.output


# --------------------------------------------------------------------------- allocator answers


def _groups():
    return [GroupSpectrum(f"q_proj@{i}", "q_proj", (i,), 64, 64, torch.ones(64, dtype=torch.float64)) for i in range(4)]


WHO = "allocator 'odd' from odd-allocators 1.2"


@pytest.mark.parametrize("rank", [16, np.int64(16), np.int32(16), torch.tensor(16)], ids=["int", "np.int64", "np.int32", "tensor"])
def test_integer_ranks_of_any_integer_type_are_accepted_as_plain_ints(rank):
    groups = _groups()
    clean = check_allocation(groups, {g.key: rank for g in groups}, budget_for(groups, 0.5), WHO)
    assert all(type(k) is int and k == 16 for k in clean.values())


@pytest.mark.parametrize("rank,shown", [
    (True, "True (bool)"),
    (np.bool_(True), "(bool"),
    (torch.tensor(True), "(Tensor)"),
    (16.0, "16.0 (float)"),
    (np.float64(16.0), "(float64)"),
    (torch.tensor(16.0), "(Tensor)"),
    (torch.tensor([16, 16]), "(Tensor)"),
    (None, "None (NoneType)"),
    ("16", "'16' (str)"),
    (float("nan"), "nan (float)"),
])
def test_non_integer_ranks_are_refused_naming_the_allocator(rank, shown):
    groups = _groups()
    answer = {g.key: 16 for g in groups} | {"q_proj@2": rank}
    with pytest.raises(PluginError) as info:
        check_allocation(groups, answer, budget_for(groups, 0.5), WHO)
    message = str(info.value)
    assert message.startswith(f"{WHO} gave an invalid allocation") and "q_proj@2" in message
    assert shown in message and "not an integer" in message


@pytest.mark.parametrize("change,expected", [
    ({"q_proj@1": -3}, "rank -3 for q_proj@1 outside [1, 32]"),
    ({"q_proj@1": 0}, "rank 0 for q_proj@1 outside [1, 32]"),
    ({"q_proj@1": 10**30}, "outside [1, 32]"),
    ({0: 1, None: 2, ("x",): 3}, "ranks for unknown group(s)"),  # keys of mixed types: sorted without crashing
    ({"q_proj@1": 32, "q_proj@2": 32, "q_proj@3": 32}, "over the budget"),
])
def test_out_of_range_unknown_and_over_budget_answers_are_refused(change, expected):
    groups = _groups()
    with pytest.raises(PluginError, match=r"^allocator 'odd' .*gave an invalid allocation") as info:
        check_allocation(groups, {g.key: 16 for g in groups} | change, budget_for(groups, 0.5), WHO)
    assert expected in str(info.value)


def test_a_missing_group_is_refused():
    groups = _groups()
    with pytest.raises(PluginError, match=r"no rank for 1 group\(s\), e.g. \['q_proj@3'\]"):
        check_allocation(groups, {g.key: 16 for g in groups[:3]}, budget_for(groups, 0.5), WHO)


# --------------------------------------------------------------------------- whole runs

_RUN_PLUGINS = """
import sys
from workbench.hookspecs import hookimpl
from workbench.api import Allocator, EvalResult, Evaluator

class Quitter(Allocator):
    name = "wb-quitter"
    def allocate(self, groups, budget, options):
        sys.exit("giving up")

class Negative(Allocator):
    name = "wb-negative"
    def allocate(self, groups, budget, options):
        return {g.key: -1 for g in groups}

class RaisesOnDense(Evaluator):
    name = "wb-raiser"
    def evaluate(self, model, tokenizer, options, ctx):
        if ctx.label == "dense":
            raise RuntimeError("dense side exploded")
        return EvalResult("none", "m", 1.0)

class ExitsOnCompressed(Evaluator):
    name = "wb-exiter"
    def evaluate(self, model, tokenizer, options, ctx):
        if ctx.label == "compressed":
            sys.exit(3)
        return EvalResult("none", "m", 2.0)

@hookimpl
def register_allocators(register):
    register(Quitter())
    register(Negative())

@hookimpl
def register_evaluators(register):
    register(RaisesOnDense())
    register(ExitsOnCompressed())
"""


@pytest.fixture
def run_plugins(tmp_path, monkeypatch, fresh_registry):
    _install_fake(tmp_path, monkeypatch, "wb_runtime", "0.4", _RUN_PLUGINS)


def _profile(root, out, allocator="uniform", extra=""):
    return tiny_profile(root, out, extra=extra, allocator=allocator)


@pytest.mark.parametrize("allocator,message", [
    ("wb-quitter", "allocator 'wb-quitter' from wb_runtime 0.4 raised SystemExit: giving up"),
    ("wb-negative", "allocator 'wb-negative' from wb_runtime 0.4 gave an invalid allocation: rank -1 for"),
])
def test_a_misbehaving_allocator_fails_the_run_with_exit_1_and_leaves_no_output(
        run_plugins, tiny_workspace, tmp_path, allocator, message):
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_profile(tiny_workspace, out, allocator))
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_failing_evaluators_are_named_the_others_run_and_the_model_is_saved(run_plugins, tiny_workspace, tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_profile(tiny_workspace, out, extra='[[evaluate]]\nevaluator = "wb-exiter"\n'
                                                      '[[evaluate]]\nevaluator = "wb-raiser"\n'))
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 1, result.output
    assert "evaluator 'wb-exiter' from wb_runtime 0.4 failed: SystemExit: 3" in result.output
    assert "evaluator 'wb-raiser' from wb_runtime 0.4 failed: RuntimeError: dense side exploded" in result.output
    assert "evaluator(s) wb-exiter, wb-raiser failed; the compressed model and report were saved" in result.output
    report = json.loads((out / "report.json").read_text())
    by_name = {m["evaluator"]: m for m in report["metrics"]}
    assert "error" not in by_name["perplexity"] and by_name["perplexity"]["compressed"] > 0
    assert by_name["wb-exiter"]["dense"] == 2.0 and "SystemExit" in by_name["wb-exiter"]["error"]
    assert by_name["wb-raiser"]["compressed"] == 1.0 and "dense side exploded" in by_name["wb-raiser"]["error"]
    assert (out / "model" / "model.safetensors").exists() and (out / "report.md").exists()


_BAD_ADAPTERS = """
from workbench.hookspecs import hookimpl
from workbench_adapters.llama import LlamaAdapter

class SitesRaise(LlamaAdapter):
    name = "wb-bad-sites"
    priority = 1000
    def sites(self, model):
        raise KeyError("self_attn")

@hookimpl
def register_adapters(register):
    register(SitesRaise())
"""


def test_an_adapter_that_raises_is_named_and_the_run_exits_1(tmp_path, monkeypatch, fresh_registry, tiny_workspace):
    _install_fake(tmp_path, monkeypatch, "wb_adapters_bad", "0.2", _BAD_ADAPTERS)
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_profile(tiny_workspace, out))
    result = runner.invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 1, result.output
    assert "adapter 'wb-bad-sites' failed while listing the decoder layers and their matrices: KeyError" in result.output
    assert "Traceback" not in result.output and not out.exists()


def test_an_adapter_that_fails_to_replace_a_module_is_named(tiny_workspace):
    from conftest import tiny_llama
    from workbench.engine.compress import assemble, calibrate
    from workbench.events import CancelToken, EventBus
    from workbench.engine.grouping import plan_groups

    registry = load_registry(strict=True)
    model = tiny_llama()
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, ["q_proj"], [], 1)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    cal = calibrate(model, adapter, plans, ids, torch.device("cpu"), EventBus(), CancelToken())

    class Refuses(type(adapter)):
        def replace_module(self, parent, path, module):
            raise AttributeError("read-only module tree")

    with pytest.raises(PluginError, match=r"adapter 'llama' failed while replacing self_attn.q_proj in layer 0: "
                                          r"AttributeError: read-only module tree"):
        assemble(model, Refuses(), plans, cal.factors, {s.key: 2 for s in cal.spectra}, cal.spectra)


@pytest.mark.parametrize("paths, message", [
    (["ffn"], r"adapter 'llama' names the token-wise module 'ffn', which a decoder layer of this model does not have"),
    ("mlp", r"adapter 'llama' gave token-wise modules 'mlp'; expected a list of module paths"),
])
def test_an_adapters_unknown_token_wise_module_is_named_before_calibration(paths, message):
    from conftest import tiny_llama
    from workbench.engine.compress import calibrate
    from workbench.engine.grouping import plan_groups
    from workbench.events import CancelToken, EventBus

    model = tiny_llama()
    adapter = load_registry(strict=True).adapter_for(model)

    class Names(type(adapter)):
        def token_wise_modules(self, model):
            return paths

    plans = plan_groups(model, adapter, ["q_proj"], [], 1)
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PluginError, match=message):
        calibrate(model, Names(), plans, ids, torch.device("cpu"), EventBus(), CancelToken())
