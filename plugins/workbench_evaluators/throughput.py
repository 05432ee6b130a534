"""Prefill and decode speed in tokens/s, dense beside compressed.

Dense and compressed are measured in the same process, on the same device, with the same seeded
prompt. One untimed warm-up pass comes first (allocator, kernel selection, lazy init), then
`repeats` timed passes; the median of each phase is reported, with its spread, so one disturbed
pass on a shared machine does not decide the figure. A pass is one prefill of batch × prompt_len
tokens that fills the KV cache, then `new_tokens` greedy decode steps of one token per sequence,
each reusing the cache: the way generation works, not a re-run of the whole sequence per token.
"""

from __future__ import annotations

import inspect
import statistics
import time
from contextlib import contextmanager
from typing import Any, Callable, Mapping

import torch

from workbench.api import EvalContext, EvalResult, Evaluator, Option, UsageError

WARMUP_DECODE_STEPS = 2  # enough to run the cached-decode path once before timing it


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: the clock must wait for them.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_keyword(model: torch.nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (argument and output); accept both.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _greedy_step(model: torch.nn.Module, ids: torch.Tensor, cache: Any, keyword: str) -> tuple[torch.Tensor, Any]:
    out = model(input_ids=ids, use_cache=True, **{keyword: cache})
    return out.logits[:, -1].argmax(-1, keepdim=True), getattr(out, keyword)


def timed_generation(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int,
                     clock: Callable[[], float] = time.perf_counter) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds, generated ids) of one greedy generation with the KV cache.

    The prefill yields the first new token; each of the `new_tokens` decode steps yields one more,
    so batch × (new_tokens + 1) ids come back.
    """
    device, keyword = prompt.device, _cache_keyword(model)
    _sync(device)
    start = clock()
    token, cache = _greedy_step(model, prompt, None, keyword)
    _sync(device)
    prefilled = clock()
    generated = [token]
    for _ in range(new_tokens):
        token, cache = _greedy_step(model, token, cache, keyword)
        generated.append(token)
    _sync(device)
    return prefilled - start, clock() - prefilled, torch.cat(generated, dim=1)


@contextmanager
def _torch_threads(threads: int):
    """Run with `threads` intra-op threads (0: leave torch's setting), then restore it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def _vocab_size(model: torch.nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size else int(model.get_input_embeddings().num_embeddings)


def measure_throughput(
    model: torch.nn.Module,
    batch_size: int = 4,
    prompt_len: int = 256,
    new_tokens: int = 32,
    repeats: int = 3,
    device: torch.device | str | None = None,
    seed: int = 0,
    threads: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    on_repeat: Callable[[int, int], None] | None = None,
    cancel: Any = None,
) -> dict[str, Any]:
    """Median prefill and decode tokens/s over `repeats` timed passes after one warm-up pass.

    `threads` > 0 sets torch's CPU threads for the measurement (restored afterwards): on a machine
    whose cores other jobs share, one thread avoids stalls where a parallel kernel waits for a
    thread that is not scheduled.
    """
    if threads < 0:
        raise UsageError(f"throughput: threads must be 0 (torch's setting) or more, got {threads}")
    for name, value in (("batch_size", batch_size), ("prompt_len", prompt_len), ("new_tokens", new_tokens),
                        ("repeats", repeats)):
        if value < 1:
            raise UsageError(f"throughput: {name} must be at least 1, got {value}")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, _vocab_size(model), (batch_size, prompt_len), generator=generator).to(device)

    prefill_s, decode_s = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _torch_threads(threads) as used_threads:
            timed_generation(model, prompt, min(new_tokens, WARMUP_DECODE_STEPS), clock)
            for r in range(repeats):
                if cancel is not None:
                    cancel.check()
                prefill, decode, _ = timed_generation(model, prompt, new_tokens, clock)
                prefill_s.append(prefill)
                decode_s.append(decode)
                if on_repeat is not None:
                    on_repeat(r + 1, repeats)
    finally:
        model.train(was_training)

    def rate(tokens: int, seconds: list[float]) -> tuple[float, float]:
        median = statistics.median(seconds)
        if not median > 0:
            raise RuntimeError(f"throughput: the clock measured {median} s; cannot compute tokens/s")
        return tokens / median, (max(seconds) - min(seconds)) / median

    prefill_rate, prefill_spread = rate(batch_size * prompt_len, prefill_s)
    decode_rate, decode_spread = rate(batch_size * new_tokens, decode_s)
    return {
        "prefill_tokens_per_s": prefill_rate,
        "decode_tokens_per_s": decode_rate,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "prefill_spread": prefill_spread,  # (max − min) / median of the timed passes
        "decode_spread": decode_spread,
        "threads": used_threads,
    }


class ThroughputEvaluator(Evaluator):
    name = "throughput"
    description = "Prefill and greedy-decode tokens/s with the KV cache, median of repeats after warm-up (higher is better)."
    cacheable = False  # timings belong to this process and this machine's load: dense is re-measured beside compressed
    options = (
        Option("batch_size", int, 4, "sequences per pass", min=1),
        Option("prompt_len", int, 256, "prompt tokens per sequence (prefill)", min=1),
        Option("new_tokens", int, 32, "greedy decode steps per pass, one token per sequence each", min=1),
        Option("repeats", int, 3, "timed passes; the median is reported", min=1),
        Option("threads", int, 0, "CPU threads while measuring (0: torch's default, all cores)", min=0),
    )

    def evaluate(self, model: Any, tokenizer: Any, options: Mapping[str, Any], ctx: EvalContext) -> EvalResult:
        opts = {o.name: o.default for o in self.options}
        opts.update(options)

        def on_repeat(i: int, n: int) -> None:
            ctx.events.progress("evaluate", i, n, message=f"throughput ({ctx.label})", data={"unit": "pass"})

        out = measure_throughput(model, opts["batch_size"], opts["prompt_len"], opts["new_tokens"], opts["repeats"],
                                 ctx.device, seed=ctx.seed, threads=opts["threads"], on_repeat=on_repeat,
                                 cancel=ctx.cancel)
        dtype = next((p.dtype for p in model.parameters()), None)
        return EvalResult(
            dataset="",
            metric="decode tokens/s",
            value=out["decode_tokens_per_s"],
            details={
                **opts,
                **out,  # `threads`: the count used, not the option's 0
                "figures": {"prefill tokens/s": out["prefill_tokens_per_s"]},
                "device": str(ctx.device),
                "dtype": str(dtype).removeprefix("torch."),
                "protocol": (f"seeded random prompts, {opts['batch_size']} × {opts['prompt_len']} tokens prefilled, then "
                             f"{opts['new_tokens']} greedy steps with the KV cache; 1 warm-up pass, median of "
                             f"{opts['repeats']} timed passes; {out['threads']} CPU thread(s) on {ctx.device}"),
            },
        )
