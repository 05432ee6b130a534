"""Decode and prefill speed of low-rank layers at a given rank, separated from the model's quality.

Speed depends on shapes, not values: every targeted linear layer of the embedded model is replaced
by a `LowRankLinear` of the rank the `uniform` allocator gives at `--ratio` (random factors), and
the dense and this model are timed alternately for `--rounds` rounds (`measure_throughput`, one
timed pass after a warm-up each), so load drifts hit both. Reports the median of the per-round
ratios and their spread.

    .venv/bin/python bench/decode_speed.py [--ratios 0.2] [--rounds 10] [--threads 0] [--out bench/results]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
from datetime import date
from pathlib import Path

import torch


def uniform_rank(inp: int, out: int, ratio: float) -> int:
    return max(1, int((1 - ratio) * inp * out / (inp + out)))


def low_rank_copy(dense: torch.nn.Module, ratio: float, seed: int = 0) -> torch.nn.Module:
    from workbench.engine.lowrank import LowRankLinear

    model = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(seed)
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, old in list(parent.named_children()):
                if isinstance(old, torch.nn.Linear):
                    rank = uniform_rank(old.in_features, old.out_features, ratio)
                    new = LowRankLinear(old.in_features, old.out_features, rank, bias=old.bias is not None)
                    with torch.no_grad():
                        new.basis.weight.normal_(0, old.in_features ** -0.5, generator=gen)
                        new.coef.weight.normal_(0, rank ** -0.5, generator=gen)
                    new.requires_grad_(False)
                    setattr(parent, name, new)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()

    from workbench.sources.models import load_model
    from workbench_evaluators.throughput import measure_throughput

    dense = load_model("embedded:smollm2-135m", "float32", "cpu").model
    result = {"date": date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                         f"{args.threads or torch.get_num_threads()} threads",
              "rows": []}
    for ratio in args.ratios:
        model = low_rank_copy(dense, ratio)
        ratios = {"prefill": [], "decode": []}
        for _ in range(args.rounds):
            d = measure_throughput(dense, repeats=1, threads=args.threads)
            c = measure_throughput(model, repeats=1, threads=args.threads)
            for k in ratios:
                ratios[k].append(c[f"{k}_tokens_per_s"] / d[f"{k}_tokens_per_s"])
        row = {"ratio": ratio, "rounds": args.rounds}
        for k, values in ratios.items():
            row[f"{k}_speedup_median"] = round(statistics.median(values), 3)
            row[f"{k}_speedup_range"] = [round(min(values), 3), round(max(values), 3)]
            row[f"{k}_rounds_faster"] = sum(v > 1 for v in values)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        del model
    print(json.dumps(result, indent=2))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "decode_speed.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
