"""Zero-shot multiple choice from the embedded corpus: which one-line description fits a title?

Built from the evaluation articles of `embedded:wiki-vital` (never seen by calibration), so it needs
no download. Each question shows an article's title; the options are its own short description and
three descriptions of other articles, in a seeded random order. The model picks the option whose
tokens have the highest mean log-likelihood given the prompt (length-normalized, so long options
are not penalised for having more tokens); the plain sum is reported too.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from workbench.api import EvalContext, EvalResult, Evaluator, Option, UsageError
from workbench_evaluators.forward import logits_of

PROMPT = "Wikipedia article: {title}\nShort description:"
CHOICES = 4


@dataclass(frozen=True)
class Question:
    context: str
    options: tuple[str, ...]
    answer: int  # index into options


def build_questions(articles: Sequence[Mapping[str, str]], n: int, seed: int, choices: int = CHOICES) -> list[Question]:
    """Up to `n` questions from articles with a title and a description; the same seed, the same questions."""
    usable = [a for a in articles if a.get("title") and (a.get("description") or "").strip()]
    if len({a["description"].strip().casefold() for a in usable}) < choices:
        raise UsageError(f"choice: need at least {choices} articles with distinct descriptions, found fewer")
    rng = random.Random(seed)
    questions = []
    for i in rng.sample(range(len(usable)), min(n, len(usable))):
        correct = usable[i]["description"].strip()
        seen, options = {correct.casefold()}, [correct]
        while len(options) < choices:
            candidate = usable[rng.randrange(len(usable))]["description"].strip()
            if candidate.casefold() not in seen:  # a distractor equal to the answer would be a second right one
                seen.add(candidate.casefold())
                options.append(candidate)
        rng.shuffle(options)
        questions.append(Question(PROMPT.format(title=usable[i]["title"]), tuple(options), options.index(correct)))
    return questions


def _encode(tokenizer: Any, text: str) -> list[int]:
    out = tokenizer(text, add_special_tokens=False)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out.input_ids)


def continuation_logprobs(
    model: torch.nn.Module,
    requests: Sequence[tuple[list[int], list[int]]],
    batch_size: int = 16,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    cancel: Any = None,
) -> list[float]:
    """Σ log p(continuation | context) for each (context ids, continuation ids) request.

    Requests are batched in order of length, so little of a batch is padding. Rows are padded on
    the right: a causal model's logits at real positions never see the padding, so no attention
    mask is needed and neither the batch size nor the order changes the result.
    """
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    n_batches = math.ceil(len(requests) / batch_size)
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]) + len(requests[i][1]))
    scores = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for b in range(n_batches):
                if cancel is not None:
                    cancel.check()
                picked = order[b * batch_size : (b + 1) * batch_size]
                chunk = [requests[i] for i in picked]
                width = max(len(c) + len(x) for c, x in chunk)
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                for row, (context, continuation) in enumerate(chunk):
                    ids[row, : len(context) + len(continuation)] = torch.tensor(context + continuation)
                logits = logits_of(model, ids.to(device))
                for row, (context, continuation) in enumerate(chunk):
                    # the token at position t is predicted by the logits at t - 1
                    start, end = len(context) - 1, len(context) + len(continuation) - 1
                    logp = torch.log_softmax(logits[row, start:end].float(), dim=-1)
                    target = torch.tensor(continuation, device=logp.device).unsqueeze(-1)
                    scores[picked[row]] = float(logp.gather(-1, target).double().sum())
                del logits
                if on_batch is not None:
                    on_batch(b + 1, n_batches)
    finally:
        model.train(was_training)
    return scores


def answer_questions(model, tokenizer, questions: Sequence[Question], batch_size: int = 16, device=None,
                     on_batch=None, cancel=None) -> dict[str, Any]:
    """Accuracy with length-normalized (mean per token) and plain (sum) log-likelihood."""
    requests, lengths = [], []
    for q in questions:
        context = _encode(tokenizer, q.context)
        if not context:
            raise UsageError(f"choice: the prompt {q.context!r} encodes to no tokens")
        for option in q.options:
            continuation = _encode(tokenizer, " " + option)
            requests.append((context, continuation))
            lengths.append(len(continuation))
    sums = continuation_logprobs(model, requests, batch_size, device, on_batch, cancel)
    right_norm = right_sum = 0
    at = 0
    for q in questions:
        k = len(q.options)
        total, count = sums[at : at + k], lengths[at : at + k]
        at += k
        means = [s / max(c, 1) for s, c in zip(total, count)]
        right_norm += max(range(k), key=means.__getitem__) == q.answer  # ties go to the first option
        right_sum += max(range(k), key=total.__getitem__) == q.answer
    n = len(questions)
    return {"accuracy": right_norm / n, "accuracy_unnormalized": right_sum / n, "questions": n}


class ChoiceEvaluator(Evaluator):
    name = "choice"
    description = ("Zero-shot multiple choice built into workbench: pick an article's short description among "
                   f"{CHOICES} (embedded:wiki-vital evaluation articles; higher is better, chance {1 / CHOICES:.2f}).")
    cacheable = True
    options = (
        Option("n", int, 200, "number of questions (at most one per evaluation article with a description)", min=1),
        Option("seed", int, 0, "which articles and distractors are drawn, and the order of the options"),
        Option("batch_size", int, 16, "option sequences per forward pass (does not change the result)", min=1),
    )

    def evaluate(self, model: Any, tokenizer: Any, options: Mapping[str, Any], ctx: EvalContext) -> EvalResult:
        from workbench.api import EMBEDDED_WIKI, wiki_vital_articles  # loads the text sources

        opts = {o.name: o.default for o in self.options}
        opts.update(options)
        questions = build_questions(wiki_vital_articles("evaluation"), opts["n"], opts["seed"])

        def on_batch(i: int, n: int) -> None:
            ctx.events.progress("evaluate", i, n, message=f"choice ({ctx.label})", data={"unit": "batch"})

        out = answer_questions(model, tokenizer, questions, opts["batch_size"], ctx.device, on_batch, ctx.cancel)
        p, n = out["accuracy"], out["questions"]
        return EvalResult(
            dataset=EMBEDDED_WIKI,
            metric="accuracy",
            value=p,
            details={
                **out,
                "stderr": math.sqrt(p * (1 - p) / n),
                "chance": 1 / CHOICES,
                "seed": opts["seed"],
                "protocol": (f"{n} questions from the evaluation articles, 0-shot: prompt {PROMPT!r}, {CHOICES} "
                             "descriptions as options, the highest mean log-likelihood per token wins"),
            },
        )
