"""Perplexity over non-overlapping windows of the evaluation text: exp of the mean next-token NLL."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch

from workbench.api import EvalContext, EvalResult, Evaluator, Option, UsageError, all_reduce_sum, process_share
from workbench_evaluators.forward import logits_of


def perplexity(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    seq_len: int,
    max_windows: int = 0,
    batch_size: int = 4,
    device: torch.device | str | None = None,
    on_batch: Callable[[int, int], None] | None = None,
    cancel: Any = None,
) -> dict[str, float | int]:
    """Token-weighted perplexity of `model` on `token_ids` (1-D) cut into windows of `seq_len`.

    Windows do not overlap and the last partial one is dropped; each window predicts its
    seq_len - 1 next tokens. `max_windows` > 0 keeps only the first windows. `on_batch(i, n)` is
    called after batch i of n, `cancel.check()` before each batch.
    Returns {"perplexity", "nll" (mean per token), "tokens" (predicted), "windows", "seq_len"}.
    """
    if seq_len < 2:
        raise UsageError(f"perplexity: seq_len must be at least 2, got {seq_len}")
    if batch_size < 1:
        raise UsageError(f"perplexity: batch_size must be at least 1, got {batch_size}")
    ids = torch.as_tensor(token_ids).reshape(-1).long()
    n_windows = ids.numel() // seq_len
    if max_windows and max_windows > 0:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise UsageError(
            f"perplexity: the evaluation text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}"
        )
    mine = process_share(n_windows)  # under torchrun: this process's windows; the sums are added below
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)[mine.start : mine.stop]
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))

    n_batches = math.ceil(len(mine) / batch_size)
    total_nll = 0.0  # a Python float is float64
    was_training = model.training
    model.eval()  # dropout would make the figure random
    try:
        with torch.inference_mode():
            for b in range(n_batches):
                if cancel is not None:
                    cancel.check()
                batch = windows[b * batch_size : (b + 1) * batch_size].to(device)
                logits = logits_of(model, batch)
                # One row at a time keeps the float32 copy of the logits to seq_len × vocab.
                for row in range(batch.shape[0]):
                    logp = torch.log_softmax(logits[row, :-1].float(), dim=-1)
                    picked = logp.gather(-1, batch[row, 1:].unsqueeze(-1))
                    total_nll -= float(picked.double().sum())
                del logits
                if on_batch is not None:
                    on_batch(b + 1, n_batches)
    finally:
        model.train(was_training)
    total_nll = all_reduce_sum(total_nll)  # float64, exact to ~1e-16 relative of one process's sum

    n_tokens = n_windows * (seq_len - 1)
    nll = total_nll / n_tokens
    return {
        "perplexity": math.exp(nll),
        "nll": nll,
        "tokens": n_tokens,
        "windows": n_windows,
        "seq_len": seq_len,
    }


class PerplexityEvaluator(Evaluator):
    name = "perplexity"
    description = "Perplexity on non-overlapping windows of an evaluation text (lower is better)."
    cacheable = True
    distributed = True  # under torchrun each process takes its share of the windows
    options = (
        Option("dataset", str, "embedded:wiki-vital", "evaluation text: embedded:wiki-vital, wikitext2, ptb, c4, or a .txt/.jsonl path"),
        Option("seq_len", int, 512, "tokens per window", min=8),
        Option("max_windows", int, 0, "evaluate only the first N windows (0: all)", min=0),
        Option("batch_size", int, 4, "windows per forward pass (does not change the result)", min=1),
    )

    def evaluate(self, model: Any, tokenizer: Any, options: Mapping[str, Any], ctx: EvalContext) -> EvalResult:
        from workbench.api import evaluation_tokens

        opts = {o.name: o.default for o in self.options}
        opts.update(options)
        dataset = opts["dataset"]
        tokens = evaluation_tokens(tokenizer, dataset)

        def on_batch(i: int, n: int) -> None:
            ctx.events.progress(
                "evaluate", i, n, message=f"perplexity on {dataset} ({ctx.label})", data={"unit": "batch"}
            )

        out = perplexity(
            model,
            tokens,
            seq_len=opts["seq_len"],
            max_windows=opts["max_windows"],
            batch_size=opts["batch_size"],
            device=ctx.device,
            on_batch=on_batch,
            cancel=ctx.cancel,
        )
        return EvalResult(
            dataset=dataset,
            metric="perplexity",
            value=out["perplexity"],
            details={
                **{k: out[k] for k in ("seq_len", "windows", "tokens", "nll")},
                "protocol": (
                    f"evaluation split's documents joined with blank lines and tokenized once; "
                    f"{out['windows']} non-overlapping windows of {out['seq_len']} tokens, {out['tokens']:,} "
                    "predicted tokens; exp of the token-weighted mean NLL"
                ),
            },
        )
