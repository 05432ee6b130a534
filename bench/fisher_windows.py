"""How the loss-aware ranks depend on the number of Fisher windows (2, 4, 8, 16, 32).

One calibration of the embedded model (quickstart settings: 32 × 512 tokens, group size 1), then
one Fisher pass over the windows in the chunks [0:2], [2:4], [4:8], [8:16], [16:32]: the scores
from the first N windows are the token-weighted mean of the first chunks, so every N costs one
pass in total. For each N: loss-aware ranks at each ratio, their largest difference per group from
the ranks at the most windows, the number of groups that differ, and perplexity (first 16 × 512
evaluation windows).

    .venv/bin/python bench/fisher_windows.py [--windows 2 4 8 16 32] [--ratios 0.2 0.4]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--eval-windows", type=int, default=16)
    args = parser.parse_args()

    from workbench.engine.allocation import budget_for
    from workbench.engine.calibration import resolve_gram_precision
    from workbench.engine.compress import allocate, assemble, calibrate
    from workbench.engine.grouping import plan_groups
    from workbench.engine.sensitivity import put_signals
    from workbench.events import CancelToken, EventBus
    from workbench.registry import load_registry
    from workbench.sources.models import load_model
    from workbench.sources.text import calibration_windows, evaluation_tokens
    from workbench_evaluators.perplexity import perplexity
    from workbench_signals.fisher import fisher_scores

    cpu = torch.device("cpu")
    registry = load_registry()
    loaded = load_model("embedded:smollm2-135m", "float32", "cpu")
    adapter = registry.adapter_for(loaded.model)
    plans = plan_groups(loaded.model, adapter, None, [], 1)
    counts = sorted(args.windows)
    windows = calibration_windows(loaded.tokenizer, "embedded:wiki-vital", max(32, counts[-1]), 512, 0)
    eval_ids = evaluation_tokens(loaded.tokenizer, "embedded:wiki-vital")
    start = time.perf_counter()
    cal = calibrate(loaded.model, adapter, plans, windows, cpu, EventBus(), CancelToken(),
                    gram_precision=resolve_gram_precision("auto", cpu))  # as a run on this device would
    print(json.dumps({"calibrate_s": round(time.perf_counter() - start, 1)}), flush=True)
    sums: dict[str, torch.Tensor] = {}
    done = 0
    results = []
    for n in counts:
        start = time.perf_counter()
        chunk = fisher_scores(loaded.model, adapter, plans, cal.factors, windows[done:n], cpu, EventBus(),
                              CancelToken())
        seconds = time.perf_counter() - start
        for key, f in chunk.items():
            sums[key] = sums.get(key, 0) + f * (n - done)
        done = n
        put_signals(cal.spectra, {"fisher": {key: s / n for key, s in sums.items()}})
        row = {"windows": n, "fisher_s_this_chunk": round(seconds, 1), "ranks": {}, "perplexity": {}}
        for ratio in args.ratios:
            ranks = allocate(registry.allocators["loss-aware"], "loss-aware", cal.spectra,
                             budget_for(cal.spectra, ratio), {})
            model = copy.deepcopy(loaded.model)
            assemble(model, adapter, plans, dict(cal.factors), ranks, cal.spectra)
            with torch.inference_mode():
                row["perplexity"][ratio] = perplexity(model, eval_ids, 512, max_windows=args.eval_windows,
                                                      device="cpu")["perplexity"]
            row["ranks"][ratio] = {k: ranks[k] for k in ranks}
            del model
        results.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "ranks"}), flush=True)
    reference = results[-1]
    for row in results:
        for ratio in args.ratios:
            diffs = [abs(row["ranks"][ratio][k] - reference["ranks"][ratio][k]) for k in reference["ranks"][ratio]]
            print(json.dumps({"windows": row["windows"], "ratio": ratio, "perplexity": round(row["perplexity"][ratio], 3),
                              "max_rank_diff_vs_most": max(diffs), "groups_differing": sum(d > 0 for d in diffs),
                              "median_diff": sorted(diffs)[len(diffs) // 2]}), flush=True)


if __name__ == "__main__":
    main()
