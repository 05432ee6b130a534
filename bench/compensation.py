"""Error compensation and LoRA recovery on the embedded model: held-out perplexity per ratio, allocator
and variant, on the wiki evaluation split and on a second corpus nothing was tuned on.

Calibrates once (32 × 512 tokens of the wiki calibration split, as the quickstart) and computes the
Fisher signal once (8 windows, for loss-aware); then for each ratio × allocator it assembles the
compressed model and builds the variants from it:

    plain                      allocation and assembly only
    sequential                 + [compression] sequential = true
    sequential+update          + update = "closed-form" (ridge 1e-6)
    lora                       plain + [recovery] method = "lora"
    sequential+update+lora     sequential+update, then the same LoRA training

plus the dense model given the same LoRA training on its targeted linears (`--dense-lora`, on by
default), so that recovery is not mistaken for adaptation to the training text. LoRA settings are
the profile's defaults unless `--lora-*` say otherwise; its training time (CPU seconds) is recorded.

Resumable: every finished row is written to `<out>/compensation.json` at once, and a rerun skips the
rows already there (the calibration is redone, ~5 minutes). A subset:

    .venv/bin/python bench/compensation.py --ratios 0.4 --allocators loss-aware --variants plain,lora
    .venv/bin/python bench/compensation.py                      # everything (hours on a 2-core CPU)

The second corpus is `--second-corpus FILE`, or else built by bench/metadata_corpus.py from
bench/results/second_corpus_packages.txt into `<out>/second_corpus.txt`. `--model DIR --samples 4
--eval-windows 2 --lora-steps 2` runs the whole script in about two minutes on a tiny model, to check it.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "sequential", "sequential+update", "lora", "sequential+update+lora")
BASE = {"plain": "plain", "sequential": "sequential", "sequential+update": "sequential+update",
        "lora": "plain", "sequential+update+lora": "sequential+update"}  # the model each variant starts from
WIKI = "embedded:wiki-vital"


def lora_settings(args):
    from workbench.profile.schema import RecoverySection

    defaults = RecoverySection(method="lora")
    given = {"rank": args.lora_rank, "alpha": args.lora_alpha, "steps": args.lora_steps, "lr": args.lora_lr,
             "batch_size": args.lora_batch_size, "seq_len": args.lora_seq_len,
             "targets": args.lora_targets.split(",") if args.lora_targets else None}
    return dataclasses.replace(defaults, **{k: v for k, v in given.items() if v is not None})


def second_corpus(args, out: Path) -> str:
    if args.second_corpus:
        return args.second_corpus
    import importlib.util

    path = out / "second_corpus.txt"
    if not path.exists():
        spec = importlib.util.spec_from_file_location("metadata_corpus", ROOT / "bench" / "metadata_corpus.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.main(str(path), str(ROOT / "bench" / "results" / "second_corpus_packages.txt"))
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.5])
    parser.add_argument("--allocators", default="loss-aware,uniform", help="comma-separated")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--no-dense-lora", dest="dense_lora", action="store_false",
                        help="skip the dense model given the same LoRA training")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--second-corpus", default=None, help="a .txt/.jsonl evaluated on its evaluation split")
    parser.add_argument("--lora-rank", type=int, default=None)
    parser.add_argument("--lora-alpha", type=float, default=None)
    parser.add_argument("--lora-steps", type=int, default=None)
    parser.add_argument("--lora-lr", type=float, default=None)
    parser.add_argument("--lora-batch-size", type=int, default=None)
    parser.add_argument("--lora-seq-len", type=int, default=None)
    parser.add_argument("--lora-targets", default=None, help="coef,basis (default) or coef")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--model", default="embedded:smollm2-135m", help="another model, e.g. to smoke-test the script")
    parser.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    parser.add_argument("--eval-windows", type=int, default=16, help="evaluation windows of 512 tokens per corpus")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)

    from workbench.engine.allocation import budget_for, total_cost
    from workbench.engine.compensate import compensate, dense_weights
    from workbench.engine.compress import allocate, assemble, calibrate
    from workbench.engine.grouping import module_prefix, plan_groups
    from workbench.engine.recovery import attach_lora, merge_lora, recover, train, training_windows
    from workbench.engine.sensitivity import compute_signals, put_signals
    from workbench.events import CancelToken, EventBus
    from workbench.registry import load_registry
    from workbench.sources.models import load_model
    from workbench.sources.text import calibration_windows, evaluation_tokens
    from workbench_evaluators.perplexity import perplexity

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "compensation.json"
    settings = lora_settings(args)
    cpu = torch.device("cpu")
    registry = load_registry()
    loaded = load_model(args.model, "float32", "cpu")
    dense_model, tok = loaded.model, loaded.tokenizer
    adapter = registry.adapter_for(dense_model)
    plans = plan_groups(dense_model, adapter, None, [], 1)
    eval_ids = {"wiki": evaluation_tokens(tok, WIKI), "second": evaluation_tokens(tok, second_corpus(args, out))}

    def ppl(model) -> dict[str, float]:
        with torch.inference_mode():
            return {c: perplexity(model, ids, 512, max_windows=args.eval_windows, device="cpu")["perplexity"]
                    for c, ids in eval_ids.items()}

    results = json.loads(path.read_text()) if path.exists() else {"runs": []}
    done = {r["key"] for r in results["runs"]}
    # LoRA rows are keyed by their settings too, so a rerun with other --lora-* options adds rows
    lora_key = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True).encode()).hexdigest()[:8]

    def save(row) -> None:
        results["runs"].append(row)
        done.add(row["key"])
        path.write_text(json.dumps(results, indent=2, default=str))
        print(f"{row['key']:<44} {row['perplexity']}", flush=True)

    results.update({"date": date.today().isoformat(), "model": args.model,
                    "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
                    "calibration": f"{WIKI} calibration split, {args.samples} × 512, seed 0",
                    "evaluation": f"first {args.eval_windows} × 512 windows of each evaluation split",
                    "lora": dataclasses.asdict(settings)})
    if "dense" not in results:
        results["dense"] = ppl(dense_model)

    def lora_row(key, model, start_s, base_ppl):
        train_start = time.perf_counter()
        section = recover(model, tok, settings, cpu)
        return {"key": key, "lora": {"train_s": round(time.perf_counter() - train_start, 1),
                                     "loss_first": section["loss_first"], "loss_last": section["loss_last"],
                                     "trained_parameters": section["trained_parameters"],
                                     "settings": lora_key, "notes": section["notes"]},
                "perplexity": ppl(model), "before_lora": base_ppl, "seconds": round(time.perf_counter() - start_s, 1)}

    if args.dense_lora and f"dense+lora|{lora_key}" not in done:
        start = time.perf_counter()
        model = copy.deepcopy(dense_model)
        prefix = module_prefix(model, adapter.decoder_layers(model))
        names = [f"{prefix}.{i}.{p.site.path}" for p in plans for i in p.layers]
        windows = training_windows(tok, settings.dataset, settings.steps * settings.batch_size, settings.seq_len,
                                   settings.seed)
        tuner = attach_lora(model, names, settings, settings.seed)
        state = train(model, windows, settings, cpu, lambda: None)
        merge_lora(tuner)
        save({"key": f"dense+lora|{lora_key}", "variant": "dense+lora", "perplexity": ppl(model),
              "lora": {"train_s": round(time.perf_counter() - start, 1), "loss_first": state.losses[0],
                       "loss_last": state.losses[-1]}, "before_lora": results["dense"]})
        del model

    allocators = [a for a in args.allocators.split(",") if a]

    def row_key(name, ratio, variant) -> str:
        return f"{name}|{ratio}|{variant}" + (f"|{lora_key}" if "lora" in variant else "")

    if all(row_key(n, r, v) in done for r in args.ratios for n in allocators for v in variants):
        (out / "compensation.md").write_text(markdown(results))  # every row is there already: no calibration
        print(markdown(results))
        return
    t0 = time.perf_counter()
    windows = calibration_windows(tok, WIKI, args.samples, 512, 0)
    cal = calibrate(dense_model, adapter, plans, windows, cpu, EventBus(), CancelToken())
    results["calibrate_s"] = round(time.perf_counter() - t0, 1)
    if "loss-aware" in allocators:
        t0 = time.perf_counter()
        put_signals(cal.spectra, compute_signals(registry, ("fisher",), dense_model, adapter, plans, cal.factors,
                                                 windows[:8], cpu, EventBus(), CancelToken()))
        results["fisher_s_8_windows"] = round(time.perf_counter() - t0, 1)
    weights = dense_weights(dense_model, adapter, plans)
    dense_params = sum(s.dense_params for s in cal.spectra)

    for ratio in args.ratios:
        budget = budget_for(cal.spectra, ratio)
        for name in allocators:
            keys = {v: row_key(name, ratio, v) for v in variants}
            todo = [v for v in variants if keys[v] not in done]
            if not todo:
                continue
            ranks = allocate(registry.allocators[name], name, cal.spectra, budget, {})
            bases: dict[str, tuple] = {}  # variant without LoRA -> (model, its perplexity, seconds to build it)
            for base in dict.fromkeys(BASE[v] for v in todo):
                start = time.perf_counter()
                model = copy.deepcopy(dense_model)
                table = assemble(model, adapter, plans, dict(cal.factors), dict(ranks), cal.spectra)
                section = None
                if base != "plain":
                    section = compensate(model, adapter, plans, table, weights, windows, cpu, lambda: None,
                                         sequential=True, update="closed-form" if "update" in base else "none")
                built = time.perf_counter() - start
                row = {"key": f"{name}|{ratio}|{base}", "allocator": name, "ratio": ratio, "variant": base,
                       "ratio_targeted": round(1 - total_cost(cal.spectra, ranks) / dense_params, 4),
                       "compensate_s": section["time_s"] if section else None,
                       "objective": ([section["objective_before"], section["objective_after"]] if section else None),
                       "held_out": ([section.get("held_out_before"), section.get("held_out_after")]
                                    if section else None),
                       "holdout": section.get("holdout") if section else None}
                row["perplexity"] = ppl(model)
                row["seconds"] = round(time.perf_counter() - start, 1)
                if base in todo and row["key"] not in done:
                    save(row)
                bases[base] = (model, row["perplexity"], built)
            for variant in [v for v in todo if "lora" in v]:
                model, base_ppl, built = bases[BASE[variant]]
                start = time.perf_counter() - built
                row = lora_row(keys[variant], copy.deepcopy(model), start, base_ppl)
                save({**row, "allocator": name, "ratio": ratio, "variant": variant})
            del bases
    (out / "compensation.md").write_text(markdown(results))
    print(markdown(results))


def markdown(results) -> str:
    rows = [r for r in results["runs"] if r.get("variant") != "dense+lora"]
    dense = results["dense"]
    lines = [f"dense: wiki {dense['wiki']:.2f}, second corpus {dense['second']:.2f}", "",
             "| allocator | ratio | variant | wiki | second corpus | LoRA train s | loss first → last |",
             "|---|---|---|---|---|---|---|"]
    order = {v: i for i, v in enumerate(VARIANTS)}
    for r in sorted(rows, key=lambda r: (r["allocator"], r["ratio"], order.get(r["variant"], 9))):
        lora = r.get("lora") or {}
        loss = f"{lora['loss_first']:.3f} → {lora['loss_last']:.3f}" if lora else ""
        lines.append(f"| {r['allocator']} | {r['ratio']:.0%} | {r['variant']} | {r['perplexity']['wiki']:.1f} | "
                     f"{r['perplexity']['second']:.1f} | {lora.get('train_s', '')} | {loss} |")
    for r in results["runs"]:
        if r.get("variant") == "dense+lora":
            lines += ["", f"dense + the same LoRA training: wiki {r['perplexity']['wiki']:.2f}, second corpus "
                          f"{r['perplexity']['second']:.2f} ({r['lora']['train_s']} s)"]
    lines += ["", f"LoRA settings (the rows' last key): {json.dumps(results.get('lora'))}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
