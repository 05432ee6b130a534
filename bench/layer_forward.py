"""One decoder layer's forward with the calibration's Gram hooks, at LLaMA-7B widths: time and the
memory it adds, by the submodule running at the peak (attention or the MLP).

A random Llama decoder layer (hidden 4096, MLP 11008, 32 heads; float32, CPU) runs over a batch of
`--batch` sequences of 1024 tokens, with GramAccumulator hooks on q_proj, o_proj, gate_proj and
down_proj, as the walk runs it: with the MLP in chunks of TOKEN_CHUNK tokens (the built-in
adapters' token-wise module), or whole with `--whole-mlp`. A thread samples the process's anonymous
RSS every 2 ms and notes the innermost submodule running; the figures are its largest values above
the RSS before the pass (the layer's weights and Grams already allocated), in MiB and in tensors of
batch × 1024 × 4096 float32 (B·S·d), from one pass sampled apart from the timed ones. Time: the
median of `--repeats` passes, without hooks and with the Gram hooks (the first allocates the Grams).

    .venv/bin/python bench/layer_forward.py --batch 2 8 --out bench/results/offload-7b
    .venv/bin/python bench/layer_forward.py --batch 8 --whole-mlp

Needs ~4 GiB of memory at --batch 8.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import threading
import time
from datetime import date
from pathlib import Path

import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from workbench.engine.calibration import TOKEN_CHUNK, GramAccumulator, token_wise_in_chunks
from workbench.engine.offload import return_freed_host_memory

from rss_watch import status_bytes  # bench/ is on the path when this runs as a script

HIDDEN, MLP, HEADS, SEQ = 4096, 11008, 32, 1024
WATCHED = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def _anon_rss() -> int:
    found = status_bytes("self", ("RssAnon",))
    if "RssAnon" not in found:
        raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")
    return found["RssAnon"]


class PhaseSampler:
    """Samples anonymous RSS with the innermost running submodule's name."""

    def __init__(self, layer: torch.nn.Module):
        self.stack, self.samples, self.running = ["idle"], [], False
        for name, module in layer.named_modules():
            if name:
                module.register_forward_pre_hook(lambda m, a, name=name: self.stack.append(name))
                module.register_forward_hook(lambda m, a, o: self._pop())

    def _pop(self) -> None:
        self.stack.pop()

    def _sample(self) -> None:
        while self.running:
            self.samples.append((_anon_rss(), self.stack[-1]))
            time.sleep(0.002)

    @contextlib.contextmanager
    def sampling(self):
        self.samples, self.running = [], True
        thread = threading.Thread(target=self._sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            self.running = False
            thread.join()

    def peaks(self, base: int) -> dict[str, float]:
        """MiB above `base` at the peak of each top-level phase (self_attn, mlp)."""
        out: dict[str, float] = {}
        for rss, name in self.samples:
            top = name.split(".")[0]
            out[top] = max(out.get(top, 0.0), (rss - base) / 2**20)
        return out


def measure(batch: int, precision: str, chunked: bool, repeats: int) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=MLP, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, num_hidden_layers=1, vocab_size=128)
    config._attn_implementation = "sdpa"  # transformers' default
    layer = LlamaDecoderLayer(config, 0).eval()
    hidden = torch.randn(batch, SEQ, HIDDEN)
    rotary = LlamaRotaryEmbedding(config)(hidden, torch.arange(SEQ)[None].expand(batch, -1))

    def forward() -> float:
        start = time.perf_counter()
        layer(hidden, position_embeddings=rotary, attention_mask=None, use_cache=False)
        return time.perf_counter() - start

    result: dict = {"batch": batch, "tokens": batch * SEQ, "precision": precision,
                    "mlp": f"chunks of {TOKEN_CHUNK} tokens" if chunked else "whole batch"}
    with torch.inference_mode():
        result["plain_s"] = statistics.median(forward() for _ in range(repeats))
        acc = GramAccumulator(precision)
        for name in WATCHED:
            acc.watch(name, layer.get_submodule(name))
        with token_wise_in_chunks(layer, ["mlp"]) if chunked else contextlib.nullcontext():
            result["hooks_s"] = statistics.median(forward() for _ in range(repeats))  # the first allocates the Grams
            sampler = PhaseSampler(layer)  # its own hooks and thread only for the memory pass
            time.sleep(0.2)
            base = _anon_rss()
            with sampler.sampling():
                forward()
        acc.close()
    unit = batch * SEQ * HIDDEN * 4 / 2**20  # one B·S·d float32 tensor, MiB
    result["peak_mib"] = {k: round(v, 1) for k, v in sampler.peaks(base).items() if k in ("self_attn", "mlp")}
    result["peak_tensors_of_bsd"] = {k: round(v / unit, 2) for k, v in result["peak_mib"].items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--precision", default="float32-equilibrated", choices=["float64", "float32-equilibrated"])
    parser.add_argument("--whole-mlp", action="store_true", help="the MLP over the whole batch (as before chunks)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="folder for layer_forward.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return_freed_host_memory()  # as under offload: freed blocks go back to the system at once
    rows = [measure(b, args.precision, not args.whole_mlp, args.repeats) for b in args.batch]
    print("| batch | MLP | forward (s) | with Gram hooks (s) | attention peak (MiB, B·S·d) | MLP peak (MiB, B·S·d) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        p, t = r["peak_mib"], r["peak_tensors_of_bsd"]
        print(f"| {r['batch']} | {r['mlp']} | {r['plain_s']:.2f} | {r['hooks_s']:.2f} | "
              f"{p.get('self_attn', 0):.0f} ({t.get('self_attn', 0):.2f}) | {p.get('mlp', 0):.0f} ({t.get('mlp', 0):.2f}) |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        name = "layer_forward-whole-mlp.json" if args.whole_mlp else "layer_forward.json"
        record = {"date": date.today().isoformat(), "machine": platform.machine(), "cpus": torch.get_num_threads(),
                  "torch": torch.__version__, "shapes": {"hidden": HIDDEN, "mlp": MLP, "heads": HEADS, "seq_len": SEQ},
                  "rows": rows}
        (args.out / name).write_text(json.dumps(record, indent=1) + "\n")
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
