"""The Fisher pass in float32 and under bf16 autocast against a float64 pass: time, scores, ranks, perplexity.

One calibration of the embedded model (quickstart settings: 32 × 512 tokens, group size 1, the
device's `auto` Grams), then Fisher passes over the first 8 windows in float32 and in bf16
(alternated, `--repeats` each, medians), one float64 pass (the model in float64) as the reference,
and one float32 pass over the next 8 windows, which shows how far the choice of windows alone moves
the scores. For each: the relative L2 error of every group's scores against float64 (median, max),
the loss-aware ranks at each ratio (groups differing from the float64 pass's, largest difference)
and the perplexity of the result (wiki evaluation split, first 16 × 512 windows; `--second-corpus`
adds a text file's evaluation split).

    .venv/bin/python bench/fisher_precision.py [--repeats 3] [--ratios 0.2 0.4] [--second-corpus FILE] [--out F]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch


def _relative_errors(scores: dict, reference: dict) -> list[float]:
    return sorted(float((scores[k].double() - reference[k]).norm() / reference[k].norm()) for k in reference)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--second-corpus", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON here too")
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
    from workbench_signals.fisher import fisher_scores, resolve_precision

    cpu = torch.device("cpu")
    registry = load_registry()
    loaded = load_model("embedded:smollm2-135m", "float32", "cpu")
    model, n = loaded.model, args.windows
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, None, [], 1)
    windows = calibration_windows(loaded.tokenizer, "embedded:wiki-vital", max(32, 2 * n), 512, 0)
    corpora = {"wiki": evaluation_tokens(loaded.tokenizer, "embedded:wiki-vital")}
    if args.second_corpus:
        corpora["second"] = evaluation_tokens(loaded.tokenizer, args.second_corpus)
    cal = calibrate(model, adapter, plans, windows[:32], cpu, EventBus(), CancelToken(),
                    gram_precision=resolve_gram_precision("auto", cpu))

    def fisher(on, precision, chunk):
        start = time.perf_counter()
        scores = fisher_scores(on, adapter, plans, cal.factors, chunk, cpu, EventBus(), CancelToken(), precision=precision)
        return scores, time.perf_counter() - start

    seconds: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    scores: dict[str, dict] = {}
    for _ in range(args.repeats):
        for precision in seconds:
            scores[precision], took = fisher(model, precision, windows[:n])
            seconds[precision].append(took)
    model64 = copy.deepcopy(model).double()
    scores["float64"], seconds_64 = fisher(model64, "float32", windows[:n])
    del model64
    scores["float32, next windows"], _ = fisher(model, "float32", windows[n:2 * n])

    result = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
              "auto_on_this_cpu": resolve_precision("auto", cpu), "windows": n,
              "fisher_s": {p: [round(s, 2) for s in v] for p, v in seconds.items()}, "float64_s": round(seconds_64, 1),
              "median_s": {p: round(statistics.median(v), 2) for p, v in seconds.items()}, "rows": {}}
    result["speed_up"] = round(result["median_s"]["float32"] / result["median_s"]["bfloat16"], 2)
    with torch.inference_mode():
        result["dense_perplexity"] = {name: round(perplexity(model, ids, 512, max_windows=args.eval_windows,
                                                             device="cpu")["perplexity"], 3)
                                      for name, ids in corpora.items()}
    ranks: dict[tuple, dict] = {}
    for label in ["float64"] + [label for label in scores if label != "float64"]:
        values = scores[label]
        put_signals(cal.spectra, {"fisher": values})
        row = {"perplexity": {}}
        if label != "float64":
            errors = _relative_errors(values, scores["float64"])
            row["relative_error"] = {"median": errors[len(errors) // 2], "max": errors[-1]}
        for ratio in args.ratios:
            ranks[label, ratio] = allocate(registry.allocators["loss-aware"], "loss-aware", cal.spectra,
                                           budget_for(cal.spectra, ratio), {})
            compressed = copy.deepcopy(model)
            assemble(compressed, adapter, plans, dict(cal.factors), ranks[label, ratio], cal.spectra)
            with torch.inference_mode():
                row["perplexity"][ratio] = {name: round(perplexity(compressed, ids, 512, max_windows=args.eval_windows,
                                                                   device="cpu")["perplexity"], 3)
                                            for name, ids in corpora.items()}
            del compressed
            diffs = [abs(ranks[label, ratio][k] - ranks["float64", ratio][k]) for k in ranks[label, ratio]] \
                if ("float64", ratio) in ranks else None
            if diffs is not None:
                row.setdefault("ranks_vs_float64", {})[ratio] = {"groups_differing": sum(d > 0 for d in diffs),
                                                                  "largest": max(diffs), "groups": len(diffs)}
        result["rows"][label] = row
        print(json.dumps({label: row}), flush=True)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
