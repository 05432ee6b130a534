"""The multi-head copy of a grouped-query model: same function, MHA layout, claimed as llama-mha."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from workbench.sources.multi_head import multi_head_copy
from workbench.registry import load_registry


@pytest.fixture
def ids():
    return torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_copy_has_the_same_logits(family, ids):
    model = tiny_model(family, kv_heads=2, tie=True)
    copy = multi_head_copy(model)
    with torch.no_grad():
        dense, again = model(ids).logits, copy(ids).logits
    assert float((dense - again).abs().max()) <= 1e-6 * float(dense.abs().max())
    assert copy.config.num_key_value_heads == copy.config.num_attention_heads == 4
    assert copy.model.layers[0].self_attn.k_proj.weight.shape == (64, 64)
    assert copy.lm_head.weight is copy.model.embed_tokens.weight
    # the original is untouched
    assert model.config.num_key_value_heads == 2 and model.model.layers[0].self_attn.k_proj.weight.shape == (32, 64)


def test_kv_heads_are_repeated_in_the_order_queries_read_them():
    """Query head h reads K/V head h // 2: rows of head 0 appear twice, then head 1's."""
    model = tiny_model("qwen2", kv_heads=2)
    k = model.model.layers[1].self_attn.k_proj
    copied = multi_head_copy(model).model.layers[1].self_attn.k_proj
    head0, head1 = k.weight[:16], k.weight[16:]
    assert torch.equal(copied.weight, torch.cat([head0, head0, head1, head1]))
    assert torch.equal(copied.bias, torch.cat([k.bias[:16], k.bias[:16], k.bias[16:], k.bias[16:]]))


def test_copy_is_claimed_by_the_multi_head_adapter():
    registry = load_registry(strict=True)
    model = tiny_model("llama", kv_heads=2)
    assert registry.adapter_for(model).name == "llama"
    assert registry.adapter_for(multi_head_copy(model)).name == "llama-mha"


def test_copy_of_a_multi_head_model_is_equal():
    model = tiny_model("llama", kv_heads=4)
    copy = multi_head_copy(model)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), copy.state_dict().values()))


@pytest.mark.embedded
def test_embedded_multi_head_source_matches_the_embedded_model():
    from workbench.sources.models import load_model

    base = load_model("embedded:smollm2-135m", device="cpu")
    mha = load_model("embedded:smollm2-135m-mha", device="cpu")
    text = "The river runs past the old stone house. Paris is the capital of France, and the moon"
    ids = base.tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        dense, again = base.model(ids).logits, mha.model(ids).logits
    assert float((dense - again).abs().max()) <= 1e-5 * float(dense.abs().max())  # measured: 0.0
    assert mha.model.config.num_key_value_heads == 9 and base.model.config.num_key_value_heads == 3
    assert mha.fingerprint != base.fingerprint
    assert load_registry(strict=True).adapter_for(mha.model).name == "llama-mha"


@pytest.mark.embedded
def test_embedded_multi_head_run_shares_bases_in_pairs(tmp_path):
    """The paper's MHA profile shape on real weights: q, k, v, gate, up in pairs of layers."""
    from workbench.cli import app

    out = tmp_path / "out"
    path = tmp_path / "p.toml"
    path.write_text(f"""
[model]
source = "embedded:smollm2-135m-mha"
device = "cpu"
[calibration]
dataset = "embedded:wiki-vital"
samples = 4
seq_len = 128
[compression]
ratio = 0.2
[output]
dir = "{out}"
save_model = false
""")
    result = CliRunner().invoke(app, ["run", str(path), "--log-format", "plain"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["model"]["adapter"] == "llama-mha"
    assert abs(report["params"]["ratio_targeted"] - 0.2) < 0.005
    sizes = {}
    for row in report["ranks"]:
        sizes.setdefault(row["type"], set()).add(len(row["layers"]))
    assert sizes == {"q_proj": {2}, "k_proj": {2}, "v_proj": {2}, "gate_proj": {2}, "up_proj": {2},
                     "o_proj": {1}, "down_proj": {1}}
    assert len(report["ranks"]) == 5 * 15 + 2 * 30
