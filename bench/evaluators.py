"""Dense vs compressed on the embedded model with every offline evaluator, from ONE calibration.

For each (allocator, ratio): perplexity (first 16 × 512 windows of the wiki evaluation split),
`choice` accuracy (n questions), prefill and decode throughput, parameter bytes. Throughput of the
dense and the compressed model is measured alternately in the same process (`--rounds` rounds of
`measure_throughput(repeats=3)` each), so machine load hits both alike; the ratio reported is the
median of the per-round ratios.

    .venv/bin/python bench/evaluators.py [--ratios 0.2 0.5] [--allocators uniform loss-aware] [--out bench/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.5])
    parser.add_argument("--allocators", nargs="+", default=["uniform", "loss-aware"])
    parser.add_argument("--choice-n", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads while timing (0: default)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    from workbench.engine.allocation import budget_for, total_cost
    from workbench.sources.text import calibration_windows, evaluation_tokens
    from workbench.engine.compress import allocate, assemble, calibrate
    from workbench.events import CancelToken, EventBus
    from workbench.engine.grouping import plan_groups
    from workbench.sources.models import load_model
    from workbench.api import EvalContext
    from workbench.registry import load_registry
    from workbench.engine.sensitivity import compute_signals, put_signals
    from workbench_evaluators.memory import tensor_totals
    from workbench_evaluators.perplexity import perplexity
    from workbench_evaluators.throughput import measure_throughput

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    registry = load_registry()
    loaded = load_model("embedded:smollm2-135m", "float32", "cpu")
    dense, tok = loaded.model, loaded.tokenizer
    adapter = registry.adapter_for(dense)
    plans = plan_groups(dense, adapter, None, [], 1)
    eval_ids = evaluation_tokens(tok, "embedded:wiki-vital")
    ctx = EvalContext(device=torch.device("cpu"), events=EventBus(), cancel=CancelToken())

    def quality(model) -> dict:
        with torch.inference_mode():
            ppl = perplexity(model, eval_ids, 512, max_windows=16, device="cpu")["perplexity"]
        choice = registry.evaluators["choice"].evaluate(model, tok, {"n": args.choice_n, "seed": 0, "batch_size": 16}, ctx)
        return {"perplexity": ppl, "choice_accuracy": choice.value, "parameter_bytes": tensor_totals(model.parameters())[1]}

    t0 = time.perf_counter()
    windows = calibration_windows(tok, "embedded:wiki-vital", 32, 512, 0)
    cal = calibrate(dense, adapter, plans, windows, torch.device("cpu"), EventBus(), CancelToken())
    if any(registry.allocators[a].needs for a in args.allocators):
        put_signals(cal.spectra, compute_signals(registry, ("fisher",), dense, adapter, plans, cal.factors,
                                                 windows[:8], torch.device("cpu"), EventBus(), CancelToken()))
    results = {"date": date.today().isoformat(),
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{torch.get_num_threads() if not args.threads else args.threads} threads while timing",
               "throughput_options": {"batch_size": 4, "prompt_len": 256, "new_tokens": 32, "repeats": 3,
                                      "rounds": args.rounds},
               "calibrate_s": round(time.perf_counter() - t0, 1),
               "dense": quality(dense), "runs": []}
    print("dense", results["dense"], flush=True)
    dense_params = sum(s.dense_params for s in cal.spectra)
    for ratio in args.ratios:
        budget = budget_for(cal.spectra, ratio)
        for name in args.allocators:
            ranks = allocate(registry.allocators[name], name, cal.spectra, budget, {})
            model = copy.deepcopy(dense)
            assemble(model, adapter, plans, dict(cal.factors), ranks, cal.spectra)
            row = {"allocator": name, "ratio": ratio,
                   "ratio_targeted": round(1 - total_cost(cal.spectra, ranks) / dense_params, 4),
                   "dense_groups": sum(ranks[s.key] >= s.max_rank for s in cal.spectra),
                   **quality(model)}
            rounds = []
            for _ in range(args.rounds):  # alternate so load drifts hit both
                d = measure_throughput(dense, threads=args.threads)
                c = measure_throughput(model, threads=args.threads)
                rounds.append({k: (d[f"{k}_tokens_per_s"], c[f"{k}_tokens_per_s"]) for k in ("prefill", "decode")})
            for k in ("prefill", "decode"):
                row[f"{k}_dense"] = statistics.median(r[k][0] for r in rounds)
                row[f"{k}_compressed"] = statistics.median(r[k][1] for r in rounds)
                row[f"{k}_speedup"] = statistics.median(r[k][1] / r[k][0] for r in rounds)
                row[f"{k}_rounds"] = rounds and [r[k] for r in rounds]
            results["runs"].append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_rounds")}), flush=True)
            (out / "evaluators.json").write_text(json.dumps(results, indent=2))
            del model
    (out / "evaluators.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results) -> str:
    d = results["dense"]
    lines = ["| model | ratio | perplexity | choice acc. | prefill tok/s | decode tok/s | parameter MB |",
             "|---|---|---|---|---|---|---|",
             f"| dense | — | {d['perplexity']:.2f} | {d['choice_accuracy']:.3f} | "
             f"{results['runs'][0]['prefill_dense']:.0f} | {results['runs'][0]['decode_dense']:.1f} | "
             f"{d['parameter_bytes'] / 1e6:.1f} |"]
    for r in results["runs"]:
        lines.append(f"| {r['allocator']} | {r['ratio']:.0%} | {r['perplexity']:.2f} | {r['choice_accuracy']:.3f} | "
                     f"{r['prefill_compressed']:.0f} (×{r['prefill_speedup']:.2f}) | "
                     f"{r['decode_compressed']:.1f} (×{r['decode_speedup']:.2f}) | {r['parameter_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
