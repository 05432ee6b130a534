"""Offload "disk" against "none" on a random Llama with LLaMA-7B layer shapes (issue 12, item 7, first bullet).

Builds a random Llama with hidden 4096, MLP 11008, 32 heads (multi-head, as LLaMA-7B) and a few
decoder layers, saves it as safetensors shards (with a small BPE tokenizer and a text corpus), then
compresses it once per offload mode, each run in its own subprocess: peak RSS (the child's own
VmHWM), wall time, per-layer calibration time (between the
first and the last layer's progress events, so with 2 layers or more) and the ranks (which must be
equal). It prints the goal's bound beside the measurements:

    one layer's weights + calibration inputs + one layer's Grams, + 20%

and the same bound plus what a bare process holding the libraries costs (measured here too), plus,
for reference, the factors kept for allocation (4·P_t: held in memory under "none", spilled to the
work directory and mapped back under "disk") and the factoring transient the bound leaves out
(on a CPU: the eigendecomposition of a d × d Gram of the whitened matrix with LAPACK's workspace,
about 3·8·d² bytes).

    .venv/bin/python bench/offload.py                      # 2 layers, 8 × 128 tokens, float32 (a few minutes)
    .venv/bin/python bench/offload.py --layers 4 --samples 16 --seq-len 256 --out bench/results
    .venv/bin/python bench/offload.py --tiny               # smoke test: hidden 256, for checking the script

Needs ~1 GB of disk per layer (float32) in --workdir (default: a temporary folder, removed after).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the cat dog runs fast slow red blue green house tree river stone light dark old new big small "
         "city field rain sun moon star sings reads writes falls rises").split()

# What one run does in its own process: the pipeline, then its own peak RSS and the report's figures.
# The child's own peak: /proc/self/status's VmHWM belongs to the process's memory map since exec.
# (ru_maxrss does not: Linux carries it over fork and exec, so a child would report at least the
# parent's RSS when it was forked, the model this script built included.)
PEAK = r"""
import resource
def peak_rss():
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""
CHILD = PEAK + r"""
import json, sys, time
from workbench.events import EventBus
from workbench.profile.schema import load_profile
from workbench.run.pipeline import run
layer_done = []  # when each layer's calibration finished (progress events), for the per-layer time
def listen(event):
    if event.stage == "calibrate" and event.kind == "progress" and event.data.get("unit") == "layer":
        layer_done.append(time.perf_counter())
start = time.perf_counter()
report = run(load_profile(sys.argv[1]), force=True, events=EventBus([listen]))
wall = time.perf_counter() - start
per_layer = (layer_done[-1] - layer_done[0]) / (len(layer_done) - 1) if len(layer_done) > 1 else None
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_bytes": peak_rss(),
                              "timings": report["timings"], "calibrate_s_per_layer": per_layer,
                              "ranks": [[r["group"], r["rank"]] for r in report["ranks"]]}))
"""
BASELINE = PEAK + r"""
import json
import torch, transformers, accelerate, safetensors, workbench.run.pipeline, workbench.registry
workbench.registry.get_registry()
print("RESULT " + json.dumps({"peak_rss_bytes": peak_rss()}))
"""


def build_model(folder: Path, layers: int, hidden: int, mlp: int, heads: int, seed: int) -> dict:
    """A random Llama saved as safetensors shards, with a tokenizer; returns its shapes."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer=trainers.BpeTrainer(vocab_size=120,
                                                                                 special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=heads, vocab_size=128, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # trained-like scale: keeps activations finite through a few layers
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.save_pretrained(folder, max_shard_size="900MB")
    fast.save_pretrained(folder)
    layer_params = sum(p.numel() for p in model.model.layers[0].parameters())
    return {"layers": layers, "hidden": hidden, "mlp": mlp, "heads": heads, "layer_params": layer_params,
            "params": sum(p.numel() for p in model.parameters())}


def write_corpus(path: Path, tokens: int) -> None:
    """About four times the calibration tokens of pseudo-English (tokenizing more would be timed as calibration)."""
    rng = random.Random(0)
    documents = max(16, 4 * tokens // 300 + 1)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(200, 400))) + "."
                                for _ in range(documents)))


def profile_text(model: Path, corpus: Path, out: Path, offload: str, args) -> str:
    return f"""name = "offload-{offload}"
[model]
source = "{model}"
dtype = "float32"
device = "cpu"
offload = "{offload}"
[calibration]
dataset = "{corpus}"
samples = {args.samples}
seq_len = {args.seq_len}
batch_size = {args.batch_size}
[compression]
ratio = 0.2
allocator = "drank"
group_size = 1
[output]
dir = "{out}"
save_model = {str(not args.no_save).lower()}
"""


def child(code: str, *argv: str) -> tuple[dict, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"child failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):]), wall


def bound(shapes: dict, args) -> dict:
    """The goal's bound, in bytes: one layer's weights + calibration inputs + one layer's Grams, + 20%."""
    b, d, m = 4, shapes["hidden"], shapes["mlp"]
    weights = shapes["layer_params"] * b
    inputs = args.samples * args.seq_len * d * b
    grams = 8 * (3 * d * d + m * m)  # attn_in (q/k/v), o_proj's input, mlp_in (gate/up): d; down_proj's: m
    targeted = 4 * d * d + 3 * d * m
    factors = 4 * targeted * shapes["layers"]  # float32 factors kept for allocation, at most 4·P_t
    return {"layer_weights": weights, "inputs": inputs, "grams": grams, "bound": int(1.2 * (weights + inputs + grams)),
            "factors_all_layers": factors, "factoring_transient_cpu": 3 * 8 * d * d}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8, help="[calibration] batch_size: sequences per layer pass")
    parser.add_argument("--modes", nargs="+", default=["none", "disk"])
    parser.add_argument("--no-save", action="store_true", help="do not save the compressed model")
    parser.add_argument("--tiny", action="store_true", help="hidden 256, MLP 688, 4 heads: a smoke test of the script")
    parser.add_argument("--half", action="store_true",
                        help="hidden 2048, MLP 5504, 16 heads: half LLaMA-7B's widths, a quarter of its memory, for quick comparisons")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="folder for offload.json (default: print only)")
    args = parser.parse_args()

    hidden, mlp, heads = (256, 688, 4) if args.tiny else (2048, 5504, 16) if args.half else (4096, 11008, 32)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="workbench-offload-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        model, corpus = work / "model", work / "corpus.txt"
        shapes = build_model(model, args.layers, hidden, mlp, heads, seed=0)
        write_corpus(corpus, args.samples * args.seq_len)
        baseline, _ = child(BASELINE)
        runs = {}
        for mode in args.modes:
            path = work / f"{mode}.toml"
            path.write_text(profile_text(model, corpus, work / f"out-{mode}", mode, args))
            result, wall = child(CHILD, str(path))
            result["process_wall_s"] = wall
            runs[mode] = result
            shutil.rmtree(work / f"out-{mode}", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    limits = bound(shapes, args)
    same = len({json.dumps(r["ranks"]) for r in runs.values()}) == 1
    result = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "shapes": shapes, "samples": args.samples, "seq_len": args.seq_len,
              "batch_size": args.batch_size,
              "baseline_rss_bytes": baseline["peak_rss_bytes"], "bound": limits, "same_ranks": same, "runs": runs}
    gib = 2 ** 30
    print(f"model: {shapes['layers']} layers of hidden {hidden}, MLP {mlp}, {heads} heads; "
          f"{shapes['params'] / 1e9:.2f} B parameters ({shapes['params'] * 4 / gib:.2f} GiB float32); "
          f"calibration {args.samples} × {args.seq_len} tokens in batches of {args.batch_size}")
    print(f"bound (one layer {limits['layer_weights'] / gib:.2f} + inputs {limits['inputs'] / gib:.3f} + Grams "
          f"{limits['grams'] / gib:.2f}, +20%): {limits['bound'] / gib:.2f} GiB; with the libraries' "
          f"{baseline['peak_rss_bytes'] / gib:.2f} GiB: {(limits['bound'] + baseline['peak_rss_bytes']) / gib:.2f} GiB; "
          f"factors kept for allocation (spilled under disk): {limits['factors_all_layers'] / gib:.2f} GiB; "
          f"factoring a group adds about {limits['factoring_transient_cpu'] / gib:.2f} GiB (the eigendecomposition of "
          f"the whitened matrix's d × d Gram with LAPACK's workspace; not in the bound)")
    print("| offload | peak RSS (GiB) | wall (s) | calibrate per layer (s) |\n|---|---|---|---|")
    for mode, r in runs.items():
        per_layer = "–" if r["calibrate_s_per_layer"] is None else f"{r['calibrate_s_per_layer']:.1f}"
        print(f"| {mode} | {r['peak_rss_bytes'] / gib:.2f} | {r['process_wall_s']:.1f} | {per_layer} |")
    print(f"same ranks: {same}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "offload-tiny.json" if args.tiny else "offload-half.json" if args.half else "offload.json"
        (args.out / name).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out / name}")
    if not same:
        raise SystemExit("the offload modes gave different ranks")


if __name__ == "__main__":
    main()
