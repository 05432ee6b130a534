"""Every allocator at several ratios from ONE calibration of the embedded model: held-out perplexity.

Calibrates once (32 × 512 tokens of the wiki calibration split, as the quickstart), computes the
Fisher signal once, then for each (allocator, ratio) copies the dense model, swaps in the low-rank
modules and measures perplexity on the first 16 × 512-token windows of the evaluation split. A
plain-SVD baseline (no whitening, uniform ranks) gives the scale. Writes JSON and a Markdown table.

    .venv/bin/python bench/allocators.py [--ratios 0.2 0.4] [--out bench/results] [--second-corpus FILE]
    .venv/bin/python bench/allocators.py --model embedded:smollm2-135m-mha --group-size default \
        --ratios 0.2 --configs uniform drank --out bench/results/mha-pairs
    .venv/bin/python bench/allocators.py --configs uniform "loss-aware (component)" "ara (init uniform)" \
        "ara (init loss-aware)" --second-corpus FILE --reuse bench/results/allocators.json

The `ara` rows train the signal's masks once per ratio on the same calibration (default
[signals.ara] options; `--ara-steps N` changes the step count) and record the training's seconds
and peak memory (host RSS on a CPU) under "training".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = [
    ("uniform", "uniform", {}),
    ("drank", "drank", {"fallback": "none"}),
    ("drank fallback=loss", "drank", {"fallback": "loss"}),
    *[(f"drank-rebalanced β={b}", "drank-rebalanced", {"beta": b, "fallback": "none"}) for b in (0.1, 0.2, 0.3, 0.4, 0.5)],
    ("protect-first", "protect-first", {"layers": 1}),
    ("loss-aware (group)", "loss-aware", {"signal": "group"}),
    ("loss-aware (component)", "loss-aware", {"signal": "component"}),
    # Trained masks (the "ara" signal, trained per ratio from this calibration); options are [signals.ara]'s.
    ("ara (init uniform)", "ara", {"init": "uniform"}),
    ("ara (init loss-aware)", "ara", {"init": "loss-aware"}),
]


def train_ara(registry, dense_model, adapter, plans, cal, windows, budget, options):
    """The ara signal's masks for one budget, put into the spectra; (seconds, peak memory bytes, last loss,
    the resolved options).

    The loss-aware start takes its ranks from the Fisher signal already computed (not a second pass).
    Peak memory: the largest reading (host RSS, or GPU allocated) stamped on the training's events.
    """
    from workbench.api import SignalContext
    from workbench.engine.compress import allocate
    from workbench.engine.sensitivity import signal_options
    from workbench.events import CancelToken, EventBus
    from workbench.run.resources import current_memory
    from workbench_signals.ara import train_masks

    device = torch.device("cpu")
    seen = {"peak": current_memory(device), "loss": None}

    def listen(event):
        seen["peak"] = max(seen["peak"], event.memory_bytes or 0)
        if event.kind == "progress" and event.data:
            seen["loss"] = event.data.get("loss")

    events = EventBus([listen])
    events.track_memory(lambda: current_memory(device))
    signal = registry.get("signal", "ara")
    ctx = SignalContext(model=dense_model, adapter=adapter, plans=plans, factors=cal.factors, windows=windows,
                        device=device, events=events, cancel=CancelToken(),
                        options=signal_options(signal, options), budget=budget)
    init = None
    if ctx.options["init"] == "loss-aware":
        init = allocate(registry.allocators["loss-aware"], "loss-aware", cal.spectra, budget, {"signal": "component"})
    start = time.perf_counter()
    masks = train_masks(ctx, budget, init_ranks=init)
    seconds = time.perf_counter() - start
    for spec in cal.spectra:
        spec.sensitivity = {**spec.sensitivity, "ara": masks[spec.key]}
    return seconds, seen["peak"], seen["loss"], dict(ctx.options)


def plain_svd(model, adapter, plans, ranks) -> None:
    """Replace each targeted weight by its best rank-k approximation without whitening (in place)."""
    layers = adapter.decoder_layers(model)
    for plan in plans:
        k = ranks[plan.key]
        for i in plan.layers:
            w = layers[i].get_submodule(plan.site.path).weight
            u, s, vt = torch.linalg.svd(w.detach().double(), full_matrices=False)
            w.data.copy_(((u[:, :k] * s[:k]) @ vt[:k]).to(w.dtype))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5])
    parser.add_argument("--configs", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--group-size", default="1",
                        help="layers per shared basis, or 'default' for the adapter's (e.g. pairs on MHA)")
    parser.add_argument("--second-corpus", default=None, help="a .txt/.jsonl evaluated too (its evaluation split)")
    parser.add_argument("--second-configs", nargs="*",
                        default=["uniform", "drank", "protect-first", "loss-aware (group)", "loss-aware (component)",
                                 "ara (init uniform)", "ara (init loss-aware)"])
    parser.add_argument("--ara-steps", type=int, default=None, help="[signals.ara] steps for the ara rows")
    parser.add_argument("--reuse", default=None, help="an earlier allocators.json: its rows are kept, not rerun")
    args = parser.parse_args()

    from workbench.engine.allocation import budget_for, total_cost
    from workbench.sources.text import calibration_windows, evaluation_tokens
    from workbench.engine.compress import allocate, assemble, calibrate
    from workbench.events import CancelToken, EventBus
    from workbench.engine.grouping import plan_groups
    from workbench.sources.models import load_model
    from workbench.registry import load_registry
    from workbench.engine.sensitivity import compute_signals, put_signals
    from workbench_evaluators.perplexity import perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    registry = load_registry()
    loaded = load_model(args.model, "float32", "cpu")
    dense_model, tok = loaded.model, loaded.tokenizer
    adapter = registry.adapter_for(dense_model)
    group_size = None if args.group_size == "default" else int(args.group_size)
    plans = plan_groups(dense_model, adapter, None, [], group_size)
    eval_ids = {"wiki": evaluation_tokens(tok, "embedded:wiki-vital")}
    if args.second_corpus:
        eval_ids["second"] = evaluation_tokens(tok, args.second_corpus)

    def ppl(model, corpus="wiki"):
        with torch.inference_mode():
            return perplexity(model, eval_ids[corpus], 512, max_windows=16, device="cpu")["perplexity"]

    t0 = time.perf_counter()
    windows = calibration_windows(tok, "embedded:wiki-vital", 32, 512, 0)
    cal = calibrate(dense_model, adapter, plans, windows, torch.device("cpu"), EventBus(), CancelToken())
    t_cal = time.perf_counter() - t0
    t0 = time.perf_counter()
    put_signals(cal.spectra, compute_signals(registry, ("fisher",), dense_model, adapter, plans, cal.factors,
                                             windows[:8], torch.device("cpu"), EventBus(), CancelToken()))
    t_fisher = time.perf_counter() - t0
    results = {"date": date.today().isoformat(), "model": args.model, "adapter": adapter.name,
               "group_sizes": {p.matrix_type: len(p.layers) for p in plans if p.layers[0] == 0},
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "calibration": "embedded:wiki-vital calibration split, 32 × 512, seed 0",
               "evaluation": "embedded:wiki-vital evaluation split, first 16 × 512 windows",
               "calibrate_s": round(t_cal, 1), "fisher_s_8_windows": round(t_fisher, 1),
               "dense": {c: ppl(dense_model, c) for c in eval_ids}, "runs": [], "ranks_at_0.4": {}}
    dense_params = sum(s.dense_params for s in cal.spectra)
    wanted = [c for c in CONFIGS if args.configs is None or c[0] in args.configs]
    if args.ara_steps is not None:
        wanted = [(label, name, {**options, "steps": args.ara_steps} if name == "ara" else options)
                  for label, name, options in wanted]
    path = out / "allocators.json"
    earlier = json.loads(Path(args.reuse).read_text()) if args.reuse else {"runs": [], "ranks_at_0.4": {}}
    results["ranks_at_0.4"].update(earlier.get("ranks_at_0.4", {}))
    for ratio in args.ratios:
        budget = budget_for(cal.spectra, ratio)
        for label, name, options in [("plain SVD (no whitening), uniform", "uniform", {}), *wanted]:
            if label.startswith("plain") and args.configs is not None and label not in args.configs:
                continue
            old = [r for r in earlier["runs"] if r["label"] == label and abs(r["ratio"] - ratio) < 1e-9
                   and ("second" not in eval_ids or label not in args.second_configs or "second" in r["perplexity"])]
            if old:
                results["runs"].append(old[0])
                continue
            start = time.perf_counter()
            training = None
            if name == "ara":  # the options are the signal's; the allocator has none
                seconds, peak, loss, resolved = train_ara(registry, dense_model, adapter, plans, cal, windows, budget,
                                                          options)
                training = {"train_s": round(seconds, 1), "peak_memory_bytes": peak, "final_loss": loss,
                            "signal_options": resolved}
                options = {}
            ranks = allocate(registry.allocators[name], name, cal.spectra, budget, options)
            model = copy.deepcopy(dense_model)
            if label.startswith("plain"):
                plain_svd(model, adapter, plans, ranks)
            else:
                assemble(model, adapter, plans, dict(cal.factors), ranks, cal.spectra)
            row = {"label": label, "allocator": name, "options": options, "ratio": ratio,
                   "ratio_targeted": round(1 - total_cost(cal.spectra, ranks) / dense_params, 4),
                   "perplexity": {"wiki": ppl(model)}, "notes": ranks.notes}
            if training is not None:
                row["training"] = training
            if "second" in eval_ids and label in args.second_configs:
                row["perplexity"]["second"] = ppl(model, "second")
            row["seconds"] = round(time.perf_counter() - start, 1)
            results["runs"].append(row)
            if abs(ratio - 0.4) < 1e-9 and not label.startswith("plain"):
                results["ranks_at_0.4"][label] = {s.key: ranks[s.key] for s in cal.spectra}
            del model
            print(f"{ratio:.1f} {label:<36} {row['perplexity']}", flush=True)
            path.write_text(json.dumps(results, indent=2, default=str))
    results["max_rank"] = {s.key: s.max_rank for s in cal.spectra}
    results["effective_rank"] = {s.key: s.effective_rank for s in cal.spectra}
    path.write_text(json.dumps(results, indent=2, default=str))
    (out / "allocators.md").write_text(markdown(results))
    if results["ranks_at_0.4"]:
        plot_rank_map(results, out / "rank_map_0.4.png")
    print(markdown(results))


def plot_rank_map(results, path) -> None:
    """The rank map of every allocator at 0.4, drawn like `workbench inspect --plot`."""
    from workbench.render.rank_charts import plot_png

    labels = [label for label in results["ranks_at_0.4"] if "β=0.1" not in label and "β=0.2" not in label
              and "β=0.4" not in label and "β=0.5" not in label]
    rows = []
    for key, max_rank in results["max_rank"].items():
        mtype, _, layer = key.partition("@")
        rows.append({"group": key, "type": mtype, "layers": [int(layer.split("-")[0])], "max_rank": max_rank,
                     "effective_rank": results["effective_rank"][key],
                     "ranks": {label: results["ranks_at_0.4"][label][key] for label in labels}})
    plot_png({"model": results.get("model", "embedded:smollm2-135m"), "ratio": 0.4, "allocators": labels, "rows": rows}, path)


def markdown(results) -> str:
    ratios = sorted({r["ratio"] for r in results["runs"]})
    labels = list(dict.fromkeys(r["label"] for r in results["runs"]))
    cell = {(r["label"], r["ratio"]): r["perplexity"]["wiki"] for r in results["runs"]}
    lines = [f"dense: {results['dense']['wiki']:.2f}", "",
             "| allocator | " + " | ".join(f"{x:.0%}" for x in ratios) + " |",
             "|---|" + "---|" * len(ratios)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{cell[(label, x)]:.1f}" if (label, x) in cell else "—"
                                                  for x in ratios) + " |")
    trained = [r for r in results["runs"] if "training" in r]
    if trained:
        lines += ["", "ara mask training (the signal's cost, on top of calibration):", "",
                  "| allocator | ratio | steps | training s | peak memory GiB | final loss |",
                  "|---|---|---|---|---|---|"]
        for r in trained:
            t = r["training"]
            loss = "—" if t["final_loss"] is None else f"{t['final_loss']:.3f}"
            lines.append(f"| {r['label']} | {r['ratio']:.0%} | {t['signal_options'].get('steps')} | "
                         f"{t['train_s']:.0f} | {t['peak_memory_bytes'] / 2**30:.2f} | {loss} |")
    second = [r for r in results["runs"] if "second" in r["perplexity"]]
    if second:
        lines += ["", f"second corpus (dense {results['dense']['second']:.2f}):", "",
                  "| allocator | ratio | perplexity |", "|---|---|---|"]
        lines += [f"| {r['label']} | {r['ratio']:.0%} | {r['perplexity']['second']:.1f} |" for r in second]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
