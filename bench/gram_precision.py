"""Gram precision: float32-equilibrated against float64 on the real model's activations.

For every decoder layer (or `--layers`) and input group, the calibration inputs are captured once
and each Gram mode is timed on them (repeats interleaved, medians), apart from the forward pass.
Accuracy against the float64 Gram G:

- `gram_err`: ‖ΔG‖_F / ‖G‖_F, and `scaled_err`: max |ΔG_ij| / √(G_ii·G_jj) (the bound's form);
- `sigma_err`: max_i |σ'_i − σ_i| / σ_1 of the whitened weights of every matrix reading that
  input, and `tail_err`: max |σ'_i − σ_i| / σ_i over the ranks an allocator can keep;
- `excess_loss`: the whitened loss (measured with the float64 G) of the new mode's rank-k
  factors above the optimum Σ_{i>k} σ_i², relative to it, at k = ¼, ½, ¾ of the kept rank;
- `identity`: the engine's check on the new mode's own factors, |measured − Σ_{i>k} σ_i²| / energy.

`spread` is the largest channel norm over the median one: the massive-activation channels.
"float32-plain" (one float32 product per batch, summed in float32: what was rejected) is shown
for comparison.

    .venv/bin/python bench/gram_precision.py [--samples 32 --seq-len 512 --layers 0 1 15 29 --repeats 3]
    .venv/bin/python bench/gram_precision.py --shape 4096x4096 --shape 11008x4096 --device cuda  # 7B layers

Prints JSON lines per layer and a summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def add_plain_float32(gram32: torch.Tensor, x: torch.Tensor) -> None:
    gram32.addmm_(x.mT, x)


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def gram_in_mode(mode: str, xs: list[torch.Tensor]) -> torch.Tensor:
    from workbench.engine.calibration import add_gram, add_gram_equilibrated, symmetrize

    width, device = xs[0].shape[1], xs[0].device
    if mode == "float32-plain":
        gram = torch.zeros(width, width, dtype=torch.float32, device=device)
        for x in xs:
            add_plain_float32(gram, x.to(torch.float32))
        return gram.double()
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    for x in xs:
        add_gram(gram, x.to(torch.float64)) if mode == "float64" else add_gram_equilibrated(gram, x)
    with torch.inference_mode():
        return symmetrize(gram)


def accuracy(gram: torch.Tensor, ref: torch.Tensor, weights: list[torch.Tensor], max_rank: int) -> dict:
    from workbench.engine.factorize import measured_loss, predicted_loss, whitened_svd

    delta = gram - ref
    diag = ref.diagonal().clamp_min(1e-300).sqrt()
    out = {"gram_err": float(delta.norm() / ref.norm()),
           "scaled_err": float((delta.abs() / diag[:, None] / diag[None, :]).max())}
    sigma_err = tail_err = excess = identity = 0.0
    for w in weights:
        keep = min(max_rank, w.shape[0], w.shape[1])
        exact = whitened_svd([w], ref, keep)
        test = whitened_svd([w], gram, keep)
        s, t = exact.singular_values, test.singular_values
        sigma_err = max(sigma_err, float((t - s).abs().max() / s[0]))
        tail_err = max(tail_err, float(((t[:keep] - s[:keep]).abs() / s[:keep]).max()))
        energy = float((s ** 2).sum())
        for k in (keep // 4, keep // 2, 3 * keep // 4):
            k = max(k, 1)
            optimum = predicted_loss(exact, k)
            # the new mode's factors, judged by the true (float64) whitened loss
            test.whitening = exact.whitening
            excess = max(excess, (measured_loss([w], test, k) - optimum) / optimum)
        own = whitened_svd([w], gram, keep)
        k = max(1, keep // 2)
        identity = max(identity, abs(measured_loss([w], own, k) - predicted_loss(own, k)) / energy)
    return {**out, "sigma_err": sigma_err, "tail_err": tail_err, "excess_loss": excess, "identity": identity}


def model_layers(args) -> None:
    from workbench.engine.calibration import capture_layer_inputs, run_layer
    from workbench.engine.grouping import plan_groups
    from workbench.registry import load_registry
    from workbench.sources.models import load_model
    from workbench.sources.text import calibration_windows

    device = torch.device(args.device)
    loaded = load_model(args.model, "float32", str(device))
    model = loaded.model
    adapter = load_registry().adapter_for(model)
    plans = plan_groups(model, adapter, None, [], 1)
    windows = calibration_windows(loaded.tokenizer, "embedded:wiki-vital", args.samples, args.seq_len, 0)
    layers = adapter.decoder_layers(model)
    wanted = set(args.layers) if args.layers else set(range(len(layers)))
    batches = capture_layer_inputs(model, layers[0], windows, 8, device)
    modes = ["float64", "float32-equilibrated", "float32-plain"]
    rows = []
    for i in range(max(wanted) + 1):
        if i not in wanted:
            run_layer(layers[i], batches)
            continue
        inputs: dict[str, list[torch.Tensor]] = {}
        handles = []
        for group in sorted({p.site.input_group for p in plans}):
            site = next(p.site for p in plans if p.site.input_group == group)

            def hook(mod, a, group=group):
                inputs.setdefault(group, []).append(a[0].detach().reshape(-1, a[0].shape[-1]).clone())

            handles.append(layers[i].get_submodule(site.path).register_forward_pre_hook(hook))
        run_layer(layers[i], batches)
        for h in handles:
            h.remove()
        for group, xs in inputs.items():
            times = {m: [] for m in modes}
            for _ in range(args.repeats):
                for m in modes:
                    times[m].append(timed(lambda: gram_in_mode(m, xs), device))
            ref = gram_in_mode("float64", xs)
            norms = ref.diagonal().sqrt()
            group_plans = [p for p in plans if p.site.input_group == group and i in p.layers]
            weights = [layers[i].get_submodule(p.site.path).weight.detach() for p in group_plans]
            max_rank = max(min(p.in_features, p.out_features) for p in group_plans)
            row = {"layer": i, "group": group, "width": ref.shape[0], "tokens": sum(x.shape[0] for x in xs),
                   "spread": round(float(norms.max() / norms.median()), 1),
                   "float64_s": statistics.median(times["float64"]),
                   "equilibrated_s": statistics.median(times["float32-equilibrated"]),
                   "speedup": statistics.median(a / b for a, b in zip(times["float64"], times["float32-equilibrated"]))}
            for m in modes[1:]:
                row[m] = accuracy(gram_in_mode(m, xs), ref, weights, max_rank)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {"speedup_median": statistics.median(r["speedup"] for r in rows),
               "float64_s_total": sum(r["float64_s"] for r in rows),
               "equilibrated_s_total": sum(r["equilibrated_s"] for r in rows)}
    for m in modes[1:]:
        summary[m] = {k: max(r[m][k] for r in rows) for k in rows[0][m]}
    print(json.dumps({"summary": summary}, indent=2))


def shapes(args) -> None:
    """Time one batch's Gram for given `tokens x width` inputs (e.g. 7B: 4096 and 11008 wide)."""
    device = torch.device(args.device)
    for shape in args.shape:
        width, tokens = (int(v) for v in shape.lower().split("x"))
        torch.manual_seed(0)
        x = torch.randn(tokens, width, device=device)
        x[:, :4] *= 1e3  # massive-activation channels
        times = {m: [] for m in ("float64", "float32-equilibrated")}
        for _ in range(args.repeats):
            for m in times:
                times[m].append(timed(lambda: gram_in_mode(m, [x]), device))
        print(json.dumps({"width": width, "tokens": tokens, "device": str(device),
                          **{f"{m}_s": statistics.median(t) for m, t in times.items()},
                          "speedup": statistics.median(a / b for a, b in zip(times["float64"],
                                                                              times["float32-equilibrated"]))}),
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded:smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, nargs="*", default=None, help="decoder layers (default: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shape", action="append", default=None,
                        help="WIDTHxTOKENS: time synthetic inputs of that shape instead of the model's")
    args = parser.parse_args()
    with torch.inference_mode():
        shapes(args) if args.shape else model_layers(args)


if __name__ == "__main__":
    main()
