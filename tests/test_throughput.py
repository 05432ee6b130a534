"""The throughput evaluator: exact arithmetic on a fake clock, real decoding, repeatable figures."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from workbench.errors import Interrupted, UsageError
from workbench.events import PROGRESS, CancelToken, EventBus
from workbench.api import EvalContext
from workbench_evaluators.throughput import ThroughputEvaluator, measure_throughput, timed_generation

VOCAB = 50


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


class CostedLM(nn.Module):
    """Each forward pass advances a fake clock by `fixed + per_token × tokens`; the first costs extra
    (warm-up), and the prefill of timed pass number `slow_pass` (1-based) is 5 s slower."""

    def __init__(self, clock, fixed=0.01, per_token=0.001, slow_pass=None):
        super().__init__()
        self.config = SimpleNamespace(vocab_size=VOCAB)
        self.clock, self.fixed, self.per_token, self.slow_pass = clock, fixed, per_token, slow_pass
        self.calls, self.prefills = 0, 0
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, past_key_values=None, use_cache=True):
        self.calls += 1
        self.clock.t += self.fixed + self.per_token * input_ids.numel() + (50.0 if self.calls == 1 else 0.0)
        if past_key_values is None:
            self.prefills += 1
            if self.slow_pass is not None and self.prefills == self.slow_pass + 1:  # +1: the warm-up
                self.clock.t += 5.0
        seen = (past_key_values or 0) + input_ids.shape[1]
        logits = torch.zeros(*input_ids.shape, VOCAB)
        logits[..., seen % VOCAB] = 1.0  # greedy picks a token that tells how far we are
        return SimpleNamespace(logits=logits, past_key_values=seen)


def test_figures_follow_from_the_clock_exactly():
    clock = Clock()
    model = CostedLM(clock)
    b, L, n = 3, 20, 7
    got = measure_throughput(model, batch_size=b, prompt_len=L, new_tokens=n, repeats=4, clock=clock)
    prefill_s = 0.01 + 0.001 * b * L
    decode_s = n * (0.01 + 0.001 * b)
    assert got["prefill_tokens_per_s"] == pytest.approx(b * L / prefill_s, rel=1e-9)
    assert got["decode_tokens_per_s"] == pytest.approx(b * n / decode_s, rel=1e-9)
    assert got["prefill_s"] == pytest.approx([prefill_s] * 4) and got["decode_s"] == pytest.approx([decode_s] * 4)
    assert got["prefill_spread"] == pytest.approx(0, abs=1e-9)
    # warm-up (1 prefill + 2 steps) + 4 timed passes of 1 prefill + n steps; the slow first call is not timed
    assert model.calls == 3 + 4 * (1 + n)


def test_the_median_ignores_one_disturbed_pass():
    clock = Clock()
    got = measure_throughput(CostedLM(clock, slow_pass=2), batch_size=2, prompt_len=10, new_tokens=3, repeats=3,
                             clock=clock)
    prefill_s = 0.01 + 0.001 * 20
    assert got["prefill_tokens_per_s"] == pytest.approx(20 / prefill_s, rel=1e-9)
    assert got["prefill_spread"] == pytest.approx(5.0 / prefill_s, rel=1e-9)


def test_decoding_uses_the_cache_and_matches_generate():
    model = tiny_llama()
    prompt = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        _, _, ids = timed_generation(model, prompt, new_tokens=6)
        reference = model.generate(prompt, max_new_tokens=7, min_new_tokens=7, do_sample=False,
                                   pad_token_id=0)[:, 12:]
    assert ids.shape == (2, 7)
    assert torch.equal(ids, reference)


def test_real_model_figures_are_positive_finite_and_repeatable():
    model = tiny_llama(layers=2)
    # one thread: with two, a kernel waits for a thread another job has descheduled (250 ms stalls here)
    runs = [measure_throughput(model, batch_size=2, prompt_len=32, new_tokens=8, repeats=3, threads=1)
            for _ in range(3)]
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        values = sorted(r[key] for r in runs)
        assert all(math.isfinite(v) and v > 0 for v in values), values
        # On a shared machine another job can stall one run; two of three must agree within 50%.
        assert min(values[1] / values[0], values[2] / values[1]) < 1.5, (key, values)
    assert runs[0]["prefill_tokens_per_s"] > runs[0]["decode_tokens_per_s"]  # batched prefill beats one-by-one decode


def test_evaluator_reports_the_setting_device_and_threads():
    clock_model = tiny_llama(layers=1)
    events = []
    ctx = EvalContext(device=torch.device("cpu"), events=EventBus([events.append]), cancel=CancelToken())
    opts = {"batch_size": 1, "prompt_len": 8, "new_tokens": 4, "repeats": 2, "threads": 0}
    result = ThroughputEvaluator().evaluate(clock_model, None, opts, ctx)
    assert result.metric == "decode tokens/s" and result.value == result.details["decode_tokens_per_s"] > 0
    assert result.details["figures"] == {"prefill tokens/s": result.details["prefill_tokens_per_s"]}
    assert result.details["device"] == "cpu" and result.details["threads"] == torch.get_num_threads()
    assert {k: result.details[k] for k in opts if k != "threads"} == {k: v for k, v in opts.items() if k != "threads"}
    assert result.details["dtype"] == "float32"
    assert len(result.details["prefill_s"]) == 2 and "median of 2" in result.details["protocol"]
    assert [(e.current, e.total) for e in events if e.kind == PROGRESS] == [(1, 2), (2, 2)]
    assert not ThroughputEvaluator.cacheable


def test_bad_settings_and_cancel():
    with pytest.raises(UsageError, match="new_tokens must be at least 1"):
        measure_throughput(tiny_llama(layers=1), new_tokens=0)
    token = CancelToken()
    token.cancel("stop")
    with pytest.raises(Interrupted):
        measure_throughput(tiny_llama(layers=1), batch_size=1, prompt_len=4, new_tokens=1, cancel=token)


def test_threads_are_set_for_the_measurement_and_restored():
    before = torch.get_num_threads()
    ctx = EvalContext(device=torch.device("cpu"), events=EventBus(), cancel=CancelToken())
    opts = {"batch_size": 1, "prompt_len": 4, "new_tokens": 1, "repeats": 1, "threads": 1}
    result = ThroughputEvaluator().evaluate(tiny_llama(layers=1), None, opts, ctx)
    assert result.details["threads"] == 1 and "1 CPU thread(s) on cpu" in result.details["protocol"]
    assert torch.get_num_threads() == before
