"""The built-in architecture adapters on tiny random models of each family, saved to local directories.

For every adapter: claimed from config and structure, defaults as the papers use them, full ranks
reproduce the dense logits, ratio 0.3 meets the budget at group sizes 1 and 2, and the saved model
reloads with identical logits while everything not compressed stays bit-identical.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import workbench
from conftest import TINY_SLIDING_WINDOW, save_tiny_model, tiny_model, write_text_corpus
from workbench.engine.allocation import budget_for, total_cost
from workbench.cli import app
from workbench.engine.compress import allocate, assemble, calibrate
from workbench.errors import UsageError
from workbench.events import CancelToken, EventBus
from workbench.engine.grouping import plan_groups
from workbench.engine.lowrank import LowRankLinear
from workbench.sources.models import load_model
from workbench.registry import load_registry
from workbench.storage.saving import load_compressed, save_compressed

CPU = torch.device("cpu")

# (family, key/value heads) -> the adapter that must claim it
CASES = {
    "llama-mha": ("llama", 4),
    "llama": ("llama", 2),
    "mistral": ("mistral", 2),
    "qwen2": ("qwen2", 2),
}
ALL_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def registry():
    return load_registry(strict=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One saved tiny model per adapter, plus a corpus, written once for this module."""
    root = tmp_path_factory.mktemp("families")
    for adapter, (family, kv_heads) in CASES.items():
        save_tiny_model(root / adapter, kv_heads=kv_heads, family=family, tie=family == "qwen2")
    write_text_corpus(root / "corpus.txt")
    return root


@pytest.fixture
def ids():
    return torch.randint(0, 120, (16, 32), generator=torch.Generator().manual_seed(1))


def _load(saved, name):
    return load_model(str(saved / name), device="cpu")


def _compress(model, adapter, ids, ratio, group_size, full=False):
    plans = plan_groups(model, adapter, None, [], group_size)
    cal = calibrate(model, adapter, plans, ids, CPU, EventBus(), CancelToken(), full_factors=full)
    if full:
        ranks = {s.key: min(s.in_features, s.n * s.out_features) for s in cal.spectra}
    else:
        ranks = allocate(load_registry().allocators["uniform"], "uniform", cal.spectra,
                         budget_for(cal.spectra, ratio), {})
    table = assemble(model, adapter, plans, cal.factors, ranks, cal.spectra, factor_all=full)
    return cal, ranks, table


# --------------------------------------------------------------------------- claiming


@pytest.mark.parametrize("name", CASES)
def test_each_family_is_claimed_by_its_adapter(registry, saved, name):
    model = _load(saved, name).model
    assert registry.adapter_for(model).name == name
    assert [a.name for a in registry.adapters.values() if a.claims(model)] == [name]  # claims never overlap


def test_mistral_with_multi_head_attention_is_still_mistral(registry):
    assert registry.adapter_for(tiny_model("mistral", kv_heads=4)).name == "mistral"


def test_a_llama_layout_under_another_model_type_is_not_claimed(registry):
    """model_type and structure must both fit: a Llama relabelled as GPT-2 is nobody's."""
    model = tiny_model("llama")
    model.config.model_type = "gpt2"
    with pytest.raises(UsageError, match="no architecture adapter claims this model"):
        registry.adapter_for(model)


@pytest.mark.parametrize("break_it", [
    lambda m: setattr(m.model.layers[2].self_attn, "k_proj", torch.nn.Identity()),
    lambda m: setattr(m.config, "num_key_value_heads", 1),  # config disagrees with k/v shapes
    lambda m: setattr(m.model.layers[3].mlp, "down_proj", torch.nn.Linear(64, 64)),
], ids=["missing-linear", "head-layout-mismatch", "mlp-shape-mismatch"])
def test_structure_that_does_not_fit_is_not_claimed(registry, break_it):
    model = tiny_model("llama")
    break_it(model)
    with pytest.raises(UsageError, match="no architecture adapter"):
        registry.adapter_for(model)


def test_qwen2_without_qkv_biases_is_not_claimed(registry):
    model = tiny_model("qwen2")
    model.model.layers[1].self_attn.v_proj.bias = None
    assert not registry.adapters["qwen2"].claims(model)


def test_qwen2_mixing_sliding_and_full_layers_is_not_claimed(registry):
    """Calibration drives every layer with the first layer's mask: wrong for mixed layer types."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, use_sliding_window=True, sliding_window=16,
                         max_window_layers=2)
    assert len(set(config.layer_types)) == 2
    assert not registry.adapters["qwen2"].claims(Qwen2ForCausalLM(config))


def test_compressed_model_is_still_claimed(registry, ids):
    model = tiny_model("llama", kv_heads=4)
    adapter = registry.adapter_for(model)
    _compress(model, adapter, ids, 0.3, 1)
    assert registry.adapter_for(model).name == "llama-mha"


# --------------------------------------------------------------------------- defaults


EXPECTED_DEFAULTS = {
    "llama-mha": {"q_proj": 2, "k_proj": 2, "v_proj": 2, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 1},
    "llama": dict.fromkeys(ALL_TYPES, 1),
    "mistral": {"q_proj": 2, "k_proj": 1, "v_proj": 1, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 1},
    "qwen2": dict.fromkeys(ALL_TYPES, 1),
}


@pytest.mark.parametrize("name", CASES)
def test_default_group_sizes_follow_the_papers(registry, name):
    family, kv_heads = CASES[name]
    model = tiny_model(family, kv_heads=kv_heads)
    adapter = registry.adapter_for(model)
    assert {t: adapter.default_group_size(model, t) for t in ALL_TYPES} == EXPECTED_DEFAULTS[name]
    assert adapter.default_targets(model) == list(ALL_TYPES)
    # an unset group_size plans exactly these: 4 layers -> 2 groups of 2, or 4 of 1
    plans = plan_groups(model, adapter, None, [], None)
    sizes = {p.matrix_type: len(p.layers) for p in plans}
    assert sizes == EXPECTED_DEFAULTS[name]
    assert len(plans) == sum(4 // n for n in EXPECTED_DEFAULTS[name].values())


def test_profile_group_size_overrides_adapter_defaults(registry):
    model = tiny_model("llama", kv_heads=4)
    adapter = registry.adapter_for(model)
    assert {len(p.layers) for p in plan_groups(model, adapter, None, [], 1)} == {1}
    plans = plan_groups(model, adapter, None, [], {"o_proj": 4, "q_proj": 1})
    sizes = {p.matrix_type: len(p.layers) for p in plans}
    assert sizes == {**EXPECTED_DEFAULTS["llama-mha"], "o_proj": 4, "q_proj": 1}
    with pytest.raises(UsageError, match=r"group_size\.qproj.*did you mean 'q_proj'"):
        plan_groups(model, adapter, None, [], {"qproj": 2})


def test_profile_without_group_size_takes_the_adapters_defaults():
    from workbench.profile.schema import parse_profile

    compression = parse_profile("[compression]\nratio = 0.3\n").compression
    assert compression.group_size is None
    table = parse_profile("[compression]\ngroup_size = { v_proj = 3 }\n").compression
    assert table.group_size == {"v_proj": 3}  # the types it leaves out: the adapter's default (plan_groups)


@pytest.mark.parametrize("name,layout", [
    ("llama-mha", {"heads": 4, "kv_heads": 4, "head_dim": 16}),
    ("llama", {"heads": 4, "kv_heads": 2, "head_dim": 16}),
    ("mistral", {"heads": 4, "kv_heads": 2, "head_dim": 16}),
    ("qwen2", {"heads": 4, "kv_heads": 2, "head_dim": 16}),
])
def test_head_layout(registry, name, layout):
    family, kv_heads = CASES[name]
    model = tiny_model(family, kv_heads=kv_heads)
    assert registry.adapters[name].head_layout(model) == layout


def test_supported_list_names_every_builtin(registry):
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UsageError) as info:
        registry.adapter_for(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
    text = str(info.value)
    for name in CASES:
        assert f"{name}:" in text
    assert "docs/plugins.md" in text and "model_type 'gpt2'" in text


# --------------------------------------------------------------------------- compression


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_full_rank_factors_reproduce_dense_logits(registry, saved, ids, name, group_size):
    model = _load(saved, name).model
    with torch.no_grad():
        dense = model(ids[:3]).logits
    _compress(model, registry.adapter_for(model), ids, 0.0, group_size, full=True)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 4 * 7
    with torch.no_grad():
        out = model(ids[:3]).logits
    assert float((out - dense).norm() / dense.norm()) < 1e-4


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_ratio_is_met_and_the_saved_model_reloads_identically(registry, saved, ids, tmp_path, name, group_size):
    loaded = _load(saved, name)
    model = loaded.model
    adapter = registry.adapter_for(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    cal, ranks, table = _compress(model, adapter, ids, 0.3, group_size)
    achieved = 1 - total_cost(cal.spectra, ranks) / sum(s.dense_params for s in cal.spectra)
    assert abs(achieved - 0.3) < 0.005
    assert {len(row["layers"]) for row in table} == {group_size}

    save_compressed(model, loaded.tokenizer, tmp_path / "model", table, adapter=adapter)
    assert json.loads((tmp_path / "model" / "compression.json").read_text())["adapter"] == name
    again = load_compressed(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(ids[:2]).logits, again(ids[:2]).logits)

    # Everything the factorization did not replace is bit-identical to the dense model:
    # embeddings, norms, lm_head and (Qwen2) the q/k/v biases.
    replaced = {f"{m}.weight" for row in table if not row["dense"] for m in row["modules"]}
    state = again.state_dict()
    kept = [k for k in dense_state if k not in replaced]
    assert kept and all(torch.equal(state[k], dense_state[k]) for k in kept)
    dense_config, config = model.config.to_dict(), again.config.to_dict()
    for key in ("rope_parameters", "sliding_window", "tie_word_embeddings", "num_key_value_heads", "model_type"):
        assert config.get(key) == dense_config.get(key), key


def test_qwen2_biases_are_kept_exactly_not_factored(registry, saved, ids, tmp_path):
    loaded = _load(saved, "qwen2")
    model = loaded.model
    attn = model.model.layers[1].self_attn
    biases = {n: attn.get_submodule(n).bias.detach().clone() for n in ("q_proj", "k_proj", "v_proj")}
    assert all(float(b.abs().max()) > 0.5 for b in biases.values())  # the fixture's random biases, not zeros
    _, _, table = _compress(model, registry.adapters["qwen2"], ids, 0.3, 2)
    save_compressed(model, loaded.tokenizer, tmp_path / "model", table)
    again = load_compressed(tmp_path)
    for name, bias in biases.items():
        module = again.model.layers[1].self_attn.get_submodule(name)
        assert isinstance(module, LowRankLinear) and torch.equal(module.bias, bias)
        assert module.basis.weight.shape[0] == module.rank  # only the weight is factored
    assert again.model.layers[1].self_attn.o_proj.bias is None
    assert again.lm_head.weight is again.model.embed_tokens.weight  # tied, as saved


def test_mistral_sliding_window_survives_and_matters(registry, saved, ids, tmp_path):
    """The reloaded model must attend within the window: with it removed the logits change."""
    loaded = _load(saved, "mistral")
    model = loaded.model
    _, _, table = _compress(model, registry.adapters["mistral"], ids, 0.3, 2)
    save_compressed(model, loaded.tokenizer, tmp_path / "model", table)
    again = load_compressed(tmp_path)
    assert again.config.sliding_window == TINY_SLIDING_WINDOW
    with torch.no_grad():
        windowed = again(ids[:2]).logits
        again.config.sliding_window = None
        unwindowed = again(ids[:2]).logits
    assert torch.equal(windowed[:, :TINY_SLIDING_WINDOW], unwindowed[:, :TINY_SLIDING_WINDOW])
    assert not torch.allclose(windowed[:, TINY_SLIDING_WINDOW:], unwindowed[:, TINY_SLIDING_WINDOW:])


def test_loading_rebuilds_through_the_recorded_adapter(saved, ids, tmp_path, monkeypatch):
    from workbench.registry import get_registry

    adapter = get_registry().adapters["qwen2"]
    built = []
    original = adapter.build_model
    monkeypatch.setattr(adapter, "build_model", lambda config, dtype: built.append(config.model_type)
                        or original(config, dtype))
    loaded = _load(saved, "qwen2")
    _, _, table = _compress(loaded.model, adapter, ids, 0.3, 1)
    save_compressed(loaded.model, None, tmp_path / "with" / "model", table, adapter=adapter)
    save_compressed(loaded.model, None, tmp_path / "without" / "model", table)
    load_compressed(tmp_path / "with")
    assert built == ["qwen2"]
    load_compressed(tmp_path / "without")  # no adapter recorded: the generic rebuild
    assert built == ["qwen2"]


# --------------------------------------------------------------------------- end to end


def _profile(saved, name, out, group_size) -> str:
    size = f"group_size = {group_size}" if group_size else ""
    return f"""
[model]
source = "{saved / name}"
device = "cpu"
[calibration]
dataset = "{saved / 'corpus.txt'}"
samples = 8
seq_len = 32
[compression]
ratio = 0.3
{size}
[[evaluate]]
evaluator = "perplexity"
dataset = "{saved / 'corpus.txt'}"
seq_len = 32
max_windows = 2
[output]
dir = "{out}"
"""


@pytest.mark.parametrize("group_size", [1, 2])
@pytest.mark.parametrize("name", CASES)
def test_workbench_run_on_each_family(saved, tmp_path, name, group_size):
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_profile(saved, name, out, group_size))
    result = CliRunner().invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["adapter"] == name
    assert abs(report["params"]["ratio_targeted"] - 0.3) < 0.005
    assert {len(r["layers"]) for r in report["ranks"]} == {group_size}
    [metric] = report["metrics"]
    model = workbench.load_compressed(out)
    from transformers import AutoTokenizer

    from workbench.sources.text import evaluation_tokens
    from workbench_evaluators.perplexity import perplexity

    tokens = evaluation_tokens(AutoTokenizer.from_pretrained(saved / name), str(saved / "corpus.txt"))
    again = perplexity(model, tokens, 32, 2, 4, CPU)
    assert again["perplexity"] == pytest.approx(metric["compressed"], rel=1e-6)


def test_run_without_group_size_uses_the_adapters_pairs(saved, tmp_path):
    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(_profile(saved, "llama-mha", out, None))
    result = CliRunner().invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    sizes = {r["type"]: len(r["layers"]) for r in report["ranks"]}
    assert sizes == EXPECTED_DEFAULTS["llama-mha"]
    assert abs(report["params"]["ratio_targeted"] - 0.3) < 0.005
