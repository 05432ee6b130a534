"""Time of the compensate stage's per-site fits at the embedded model's shapes (random statistics).

For each site shape (out × in, rank k) it builds float64 statistics G, C, Ĝ from random inputs (a
held-out quarter and a fit part, as `holdout = 0.25`), then times `_update_site` with
`sequential` and `update = "closed-form"` (the λ search over the grid, the refit on all windows)
and, separately, one objective evaluation both ways: the direct traces (tr W·G·Wᵀ − 2 tr W·C·Mᵀ +
tr M·Ĝ·Mᵀ, every term recomputed) against `OutputError`, which computes the factor-free terms once.
Medians of `--repeat` runs.

    .venv/bin/python bench/compensate_fit.py [--tokens 16384] [--repeat 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from datetime import date

import torch

from workbench.engine.compensate import _update_site
from workbench.engine.compensation import OutputError
from workbench.engine.lowrank import LowRankLinear

# (site, out, in, k): the embedded model's (hidden 576, MLP 1536, 3 KV heads of 64) at about 50%.
SHAPES = [("q_proj", 576, 576, 150), ("k_proj", 192, 576, 70), ("gate_proj", 1536, 576, 250),
          ("down_proj", 576, 1536, 300)]


class _Plan:  # what _update_site reads of a GroupPlan
    key, layers = "site", [0]


def _stats(tokens: int, width: int) -> dict[str, torch.Tensor]:
    x = torch.randn(tokens, width, dtype=torch.float64)
    x_hat = x + 0.1 * torch.randn(tokens, width, dtype=torch.float64)
    return {"gram": x.mT @ x, "cross": x.mT @ x_hat, "gram_hat": x_hat.mT @ x_hat}


def _direct(w, q, p, s) -> float:
    m = q @ p
    return float(torch.trace(w @ s["gram"] @ w.mT) - 2 * torch.trace(w @ s["cross"] @ m.mT)
                 + torch.trace(m @ s["gram_hat"] @ m.mT))


def _median(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{date.today()}, {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| site | out × in, k | site fit (s) | objective, direct (ms) | objective, cached (ms) |\n|---|---|---|---|---|")
    for name, out, width, k in SHAPES:
        fit, held = _stats(args.tokens * 3 // 4, width), _stats(args.tokens // 4, width)
        weight = torch.randn(out, width, dtype=torch.float64)
        module = LowRankLinear(width, out, k, dtype=torch.float64)
        with torch.no_grad():
            module.basis.weight.normal_()
            module.coef.weight.normal_()
        q, p = module.coef.weight.detach().clone(), module.basis.weight.detach().clone()

        def fit_site() -> None:
            with torch.no_grad():  # every repeat starts from the same factors (a kept fit overwrites them)
                module.coef.weight.copy_(q)
                module.basis.weight.copy_(p)
            _update_site(_Plan, 0, module, weight, {"fit": fit, "held": held}, True, "closed-form", 1e-6, 0.0)

        error = OutputError(weight, fit["gram"], fit["cross"], fit["gram_hat"])
        assert abs(error(q, p) - _direct(weight, q, p, fit)) <= 1e-9 * abs(_direct(weight, q, p, fit))
        site = _median(fit_site, args.repeat)
        direct = _median(lambda: _direct(weight, q, p, fit), args.repeat)
        cached = _median(lambda: error(q, p), args.repeat)
        print(f"| {name} | {out} × {width}, {k} | {site:.2f} | {direct * 1e3:.0f} | {cached * 1e3:.0f} |")


if __name__ == "__main__":
    main()
