"""Per-layer calibration time and memory at LLaMA-7B layer shapes, and the 7B / 70B totals projected from them.

A random Llama with the layer shapes of LLaMA-7B (hidden 4096, MLP 11008, 32 heads, multi-head
attention) and `--layers` decoder layers (default 2) is calibrated by the engine itself
(`workbench.engine.compress.calibrate`, group size 1) on random token windows, on this machine's
CPU or on `--device cuda`, with `--gram-precision` (default float64) and the whitened SVD by the
device's own route or by `--svd-route eigh|lapack`. Each layer's wall time is split into its pass
(the layer's forward over every window with the Gram products) and its factoring (whitening, SVD,
the loss check), and the RSS (and on a GPU its peak allocated memory) is sampled.

What is MEASURED: per-layer pass and factoring seconds, the whole calibration against the floor
(one plain forward pass of the same model over the same windows, as bench/quickstart.py's) and,
with `--fisher N`, the Fisher pass over N windows against it too; RSS before calibration and its
peak during it, RSS growth per layer.
What is PROJECTED (and printed as such):
- the 7B calibration time: 32 × the mean measured layer (same shapes, so only the layer count changes);
- the 70B calibration time: 80 layers, each pass scaled by the ratio of float64 Gram multiply-adds
  plus the layer's forward multiply-adds (Σ in² + parameters per layer, per token), each factoring by
  the ratio of Σ over the layer's groups of (in³ + n·out·in²), the eigen/Cholesky and whitening
  products; a rough guide, since the rates of the two kinds of work differ. `--preset 70b` measures
  70B layer shapes directly instead (about 3.4 GB of float32 weights per layer, ~35 GB at the peak);
- memory of the whole runs: workbench/run/plan.py's estimate for the same tokens (not measured here).

    .venv/bin/python bench/layer_shapes.py                       # 7B shapes, 2 layers, 32 × 512 tokens
    .venv/bin/python bench/layer_shapes.py --samples 256 --seq-len 2048   # the papers' tokens (slow)
    .venv/bin/python bench/layer_shapes.py --preset tiny --samples 2 --seq-len 16   # a smoke test
    .venv/bin/python bench/layer_shapes.py --json results.json
    python3 bench/layer_shapes.py --device cuda --samples 64 --seq-len 2048 --gram-precision float32-equilibrated

Run it on an idle machine: the times are what it is for.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time
from types import SimpleNamespace

import torch

PRESETS = {  # hidden, MLP, heads, KV heads, decoder layers of the full model
    "7b": (4096, 11008, 32, 32, 32),
    "70b": (8192, 28672, 64, 8, 80),
    "tiny": (64, 172, 4, 4, 4),
}
SEVEN_B, SEVENTY_B = PRESETS["7b"], PRESETS["70b"]


def layer_costs(hidden: int, mlp: int, heads: int, kv_heads: int) -> tuple[int, int, int]:
    """(parameters of a layer's linears, Σ in² of its Gram inputs, Σ over its groups of in³ + out·in²)."""
    kv = hidden // heads * kv_heads
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, mlp), (hidden, mlp),
              (mlp, hidden)]  # (in, out): q k v o gate up down
    params = sum(i * o for i, o in shapes)
    gram_inputs = 3 * hidden ** 2 + mlp ** 2  # attn_in, o_in, mlp_in (hidden) and down_in (mlp)
    factoring = sum(i ** 3 + o * i * i for i, o in shapes)
    return params, gram_inputs, factoring


class RssSampler:
    """Peak resident set over the block, sampled every `interval` seconds."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self.process, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--gram-precision", choices=("float64", "float32-equilibrated", "auto"), default="float64")
    parser.add_argument("--fisher", type=int, default=0, metavar="WINDOWS",
                        help="also time the Fisher pass over this many windows (the default allocator's signal)")
    parser.add_argument("--svd-route", choices=("device", "eigh", "lapack"), default="device",
                        help="the whitened SVD: the device's own route (eigh on a CPU, LAPACK on a GPU) or one forced")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import psutil
    from transformers import LlamaConfig, LlamaForCausalLM

    from quickstart import forward_seconds  # bench/, beside this script
    from workbench.engine import compress, factorize
    from workbench.engine.calibration import resolve_gram_precision
    from workbench.engine.grouping import plan_groups
    from workbench.events import CancelToken, EventBus
    from workbench.registry import get_registry
    from workbench.render.numbers import format_bytes
    from workbench.run.plan import Shapes, estimate
    from workbench.run.preflight import shapes_of

    hidden, mlp, heads, kv_heads, full_layers = PRESETS[args.preset]
    dtype = getattr(torch, args.dtype)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=args.layers, vocab_size=1024,
                         max_position_embeddings=max(2048, args.seq_len))
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = LlamaForCausalLM(config).to(dtype).eval().to(device)
    registry = get_registry()
    adapter = registry.adapter_for(model)
    plans = plan_groups(model, adapter, None, [], 1)
    windows = torch.randint(0, config.vocab_size, (args.samples, args.seq_len))
    precision = resolve_gram_precision(args.gram_precision, device)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    factoring: dict[int, float] = {}  # last layer of the group -> seconds spent factoring there
    original = compress._factor_group

    def timed_factor(layers, plan, grams, *rest, **options):
        synchronize()  # the pass's queued GPU work is the pass's, not the factoring's
        start = time.perf_counter()
        try:
            return original(layers, plan, grams, *rest, **options)
        finally:
            synchronize()
            factoring[plan.layers[-1]] = factoring.get(plan.layers[-1], 0.0) + time.perf_counter() - start

    def layer_done(event):
        if event.kind == "progress":
            synchronize()
            ends.append(time.perf_counter())

    ends: list[float] = []
    bus = EventBus([layer_done])
    routes = {"eigh": factorize._svd_by_eigh, "lapack": factorize._svd_by_lapack}  # the originals, restored after
    forced = routes.get(args.svd_route)
    if forced is not None:  # whitened_svd looks both names up when it is called
        factorize._svd_by_eigh = factorize._svd_by_lapack = forced
    compress._factor_group = timed_factor
    rss_before = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with RssSampler() as rss:
            synchronize()
            start = time.perf_counter()
            calibrated = compress.calibrate(model, adapter, plans, windows, device, bus, CancelToken(),
                                            gram_precision=precision)
    finally:
        compress._factor_group = original
        factorize._svd_by_eigh, factorize._svd_by_lapack = routes["eigh"], routes["lapack"]
    gpu_peak = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    calibration_s = ends[-1] - start
    # The floor, bench/quickstart.py's: one plain forward pass of the same model over the same windows.
    # With a 1024-token vocabulary it is the decoder layers' forward alone.
    floor_s = forward_seconds(model, windows, device)
    fisher_s = fisher_precision = None
    if args.fisher:  # the default allocator's signal on the first windows, as a run computes it
        from workbench_signals.fisher import fisher_scores, resolve_precision

        fisher_precision = resolve_precision("auto", device)  # as a run's `auto` takes it here
        synchronize()
        fisher_start = time.perf_counter()
        fisher_scores(model, adapter, plans, calibrated.factors, windows[:args.fisher], device, EventBus(),
                      CancelToken(), precision=fisher_precision)
        synchronize()
        fisher_s = time.perf_counter() - fisher_start
    del calibrated
    walls = [b - a for a, b in zip([start, *ends[:-1]], ends)]
    rows = [{"layer": i, "wall_s": round(w, 3), "factoring_s": round(factoring.get(i, 0.0), 3),
             "pass_s": round(w - factoring.get(i, 0.0), 3)} for i, w in enumerate(walls)]
    # The first layer's time includes capturing its inputs (the embeddings' forward): small, kept.
    mean_pass = statistics.mean(r["pass_s"] for r in rows)
    mean_factor = statistics.mean(r["factoring_s"] for r in rows)
    params, grams, factor_cost = layer_costs(hidden, mlp, heads, kv_heads)
    p70, g70, f70 = layer_costs(*SEVENTY_B[:4])
    same_as_7b = (hidden, mlp, heads, kv_heads) == SEVEN_B[:4]
    projected = {
        "7b_calibration_s": round(SEVEN_B[4] * (mean_pass + mean_factor), 1) if same_as_7b else None,
        "70b_calibration_s": None if args.preset == "tiny" else  # too far from either shape to scale
        round(SEVENTY_B[4] * (mean_pass * (g70 + p70) / (grams + params) + mean_factor * f70 / factor_cost), 1),
        "basis": "measured mean per layer × layers" + ("" if args.preset == "70b" else
                                                       "; 70B scaled by multiply-add ratios (see the docstring)"),
    }

    def plan_memory(shape: tuple) -> dict:
        h, m, nh, kv, n = shape
        groups = []
        for _ in range(n):
            groups += [("attn_in", 1, h, h), ("attn_in", 1, h, h // nh * kv), ("attn_in", 1, h, h // nh * kv),
                       ("o_in", 1, h, h), ("mlp_in", 1, h, m), ("mlp_in", 1, h, m), ("down_in", 1, m, h)]
        est = estimate(Shapes(params=0, dtype_bytes=torch.finfo(dtype).bits // 8, hidden=h, head_dim=h // nh,
                              groups=groups, windows=args.samples, seq_len=args.seq_len, ratio=0.2))
        return {"inputs": est.inputs, "grams": est.grams, "factors": est.factors, "transient": est.transient}

    run = SimpleNamespace(calibration=SimpleNamespace(samples=args.samples, seq_len=args.seq_len, batch_size=8),
                          compression=SimpleNamespace(ratio=0.2), evaluate=())
    measured_shapes = shapes_of(model, plans, run, sum(p.numel() for p in model.parameters()))
    this_run = estimate(measured_shapes)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": psutil.cpu_count(logical=True),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "shapes": {"preset": args.preset, "hidden": hidden, "mlp": mlp, "heads": heads, "kv_heads": kv_heads,
                   "layers": args.layers, "dtype": args.dtype, "samples": args.samples, "seq_len": args.seq_len},
        "engine": {"gram_precision": precision, "svd_route": args.svd_route},
        "measured": {"layers": rows, "rss_before_bytes": rss_before, "rss_peak_bytes": rss.peak,
                     "rss_growth_bytes": rss.peak - rss_before, "gpu_peak_allocated_bytes": gpu_peak,
                     "calibration_s": round(calibration_s, 3), "floor_s": round(floor_s, 3),
                     "calibrate_over_floor": round(calibration_s / floor_s, 2),
                     "fisher_windows": args.fisher or None, "fisher_precision": fisher_precision,
                     "fisher_s": None if fisher_s is None else round(fisher_s, 3),
                     "fisher_over_floor": None if fisher_s is None else round(fisher_s / floor_s, 2),
                     "estimate_on_top_of_model_bytes": this_run.memory},
        "projected": projected,
        "plan_estimate_bytes": {"7b": plan_memory(SEVEN_B), "70b": plan_memory(SEVENTY_B)},
    }
    print(json.dumps(result, indent=2))
    where = "this CPU" if device.type == "cpu" else f"{result['machine']['gpu']} ({device})"
    gpu = "" if gpu_peak is None else f"; GPU peak allocated {format_bytes(gpu_peak)}"
    fisher = ("" if fisher_s is None else
              f", Fisher pass over {args.fisher} windows ({fisher_precision}) {fisher_s:.1f} s ({fisher_s / floor_s:.2f}×)")
    print(f"\nMEASURED on {where} ({args.layers} layers at {args.preset} shapes, {args.samples} × {args.seq_len} "
          f"tokens, {args.dtype}, {precision} Grams, SVD route {args.svd_route}): mean pass {mean_pass:.2f} s + "
          f"factoring {mean_factor:.2f} s per layer, calibration {calibration_s:.1f} s against a floor of "
          f"{floor_s:.1f} s (one plain forward pass, {calibration_s / floor_s:.2f}×){fisher}; RSS "
          f"{format_bytes(rss_before)} before calibration, peak {format_bytes(rss.peak)}{gpu} (plan's estimate on "
          f"top of the model: {format_bytes(this_run.memory)})")
    seven = projected["7b_calibration_s"]
    seventy = projected["70b_calibration_s"]
    print(f"PROJECTED: 7B calibration {'n/a (other shapes)' if seven is None else f'{seven:.0f} s'}, 70B "
          f"calibration {'n/a (other shapes)' if seventy is None else f'{seventy:.0f} s'} ({projected['basis']})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
