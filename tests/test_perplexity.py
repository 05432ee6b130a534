"""The perplexity evaluator against an independent reference and two models with known answers."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from workbench.errors import Interrupted
from workbench.events import PROGRESS, CancelToken, EventBus
from workbench.api import EvalContext
from workbench_evaluators import PerplexityEvaluator, perplexity

VOCAB = 64


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (16 * 7 + 5,), generator=g)  # 7 windows of 16 and a partial one


def reference_ppl(model, ids, seq_len, max_windows=0):
    """Written independently of the evaluator: one window at a time, float64 cross-entropy."""
    n = len(ids) // seq_len
    if max_windows:
        n = min(n, max_windows)
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in range(n):
            window = ids[w * seq_len : (w + 1) * seq_len].unsqueeze(0)
            logits = model(window).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
            count += seq_len - 1
    return math.exp(nll / count), n, count


def test_matches_reference(tiny_llama, tokens):
    expected, windows, count = reference_ppl(tiny_llama, tokens, 16)
    got = perplexity(tiny_llama, tokens, seq_len=16, batch_size=3, device="cpu")
    assert got["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert (got["windows"], got["tokens"], got["seq_len"]) == (7, 7 * 15, 16) == (windows, count, 16)
    assert got["nll"] == pytest.approx(math.log(expected), rel=1e-6)
    # A random model is close to, but not exactly, uniform: the test would catch a constant answer.
    assert 0.5 * VOCAB < got["perplexity"] < 2 * VOCAB and got["perplexity"] != pytest.approx(VOCAB, rel=1e-4)


def test_batch_size_does_not_change_the_result(tiny_llama, tokens):
    values = [perplexity(tiny_llama, tokens, 16, batch_size=b)["perplexity"] for b in (1, 2, 4, 7, 50)]
    assert max(values) == pytest.approx(min(values), rel=1e-9)


def test_max_windows_takes_the_first_windows(tiny_llama, tokens):
    expected, windows, count = reference_ppl(tiny_llama, tokens, 16, max_windows=2)
    got = perplexity(tiny_llama, tokens, 16, max_windows=2, batch_size=4)
    assert (got["windows"], got["tokens"]) == (2, 30) == (windows, count)
    assert got["perplexity"] == pytest.approx(expected, rel=1e-6)
    # Only the first two windows count: changing a later token leaves the figure unchanged.
    changed = tokens.clone()
    changed[40:] = (changed[40:] + 1) % VOCAB
    assert perplexity(tiny_llama, changed, 16, max_windows=2)["perplexity"] == pytest.approx(got["perplexity"], rel=1e-12)
    # max_windows beyond what exists means all of them.
    assert perplexity(tiny_llama, tokens, 16, max_windows=100)["windows"] == 7


class Oracle(nn.Module):
    """Knows the sequence 0, 1, ..., 9, 0, 1, ...: puts all its mass on (token + 1) mod 10."""

    def forward(self, input_ids):
        logits = torch.full((*input_ids.shape, VOCAB), -1e4)
        logits.scatter_(-1, ((input_ids + 1) % 10).unsqueeze(-1), 1e4)
        return SimpleNamespace(logits=logits)


class Uniform(nn.Module):
    def forward(self, input_ids):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))


def test_perfect_model_has_perplexity_one():
    ids = torch.arange(200) % 10
    got = perplexity(Oracle(), ids, seq_len=32, batch_size=2)
    assert got["perplexity"] == pytest.approx(1.0, abs=1e-9)
    assert got["windows"] == 6


def test_uniform_model_has_perplexity_vocab_size(tokens):
    got = perplexity(Uniform(), tokens, seq_len=16)
    assert got["perplexity"] == pytest.approx(VOCAB, rel=1e-6)
    assert got["nll"] == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_too_few_tokens_is_a_clear_error():
    with pytest.raises(Exception, match="fewer than one window"):
        perplexity(Uniform(), torch.arange(10), seq_len=16)


def test_progress_and_cancel(tokens):
    seen = []
    perplexity(Uniform(), tokens, 16, batch_size=3, on_batch=lambda i, n: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]

    token = CancelToken()
    token.cancel("stop")
    with pytest.raises(Interrupted):
        perplexity(Uniform(), tokens, 16, cancel=token)


def test_evaluator_uses_data_module_and_reports(monkeypatch, tokens):
    calls = []

    def fake_tokens(tokenizer, dataset):
        calls.append((tokenizer, dataset))
        return tokens

    # The evaluator reaches the evaluation text through the public module, when it evaluates.
    import workbench.api as api

    monkeypatch.setattr(api, "evaluation_tokens", fake_tokens, raising=False)
    events = []
    bus = EventBus([events.append])
    ctx = EvalContext(device=torch.device("cpu"), events=bus, cancel=CancelToken())
    ev = PerplexityEvaluator()
    result = ev.evaluate(Uniform(), "tok", {"dataset": "some.txt", "seq_len": 16, "batch_size": 4}, ctx)

    assert calls == [("tok", "some.txt")]
    assert (result.dataset, result.metric) == ("some.txt", "perplexity")
    assert result.value == pytest.approx(VOCAB, rel=1e-6)
    assert result.details["windows"] == 7 and result.details["tokens"] == 105 and result.details["seq_len"] == 16
    assert result.details["nll"] == pytest.approx(math.log(VOCAB))
    progress = [(e.stage, e.current, e.total) for e in events if e.kind == PROGRESS]
    assert progress == [("evaluate", 1, 2), ("evaluate", 2, 2)]


def test_declared_options():
    ev = PerplexityEvaluator()
    opts = {o.name: o for o in ev.options}
    assert ev.name == "perplexity" and ev.cacheable
    assert {k: o.default for k, o in opts.items()} == {
        "dataset": "embedded:wiki-vital",
        "seq_len": 512,
        "max_windows": 0,
        "batch_size": 4,
    }
    assert opts["seq_len"].check(4)[1] is not None  # below the minimum of 8
    assert opts["batch_size"].check(0)[1] is not None
    assert opts["max_windows"].check(-1)[1] is not None


def test_registered_as_a_plugin():
    from workbench.registry import load_registry

    registry = load_registry()
    assert isinstance(registry.evaluators.get("perplexity"), PerplexityEvaluator)
    assert not [f for f in registry.failures if "evaluators" in f.name]
