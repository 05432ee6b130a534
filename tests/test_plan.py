"""`workbench plan`: memory and disk per offload mode and process count, from a config alone.

The small shapes below are worked out by hand in the comments (bytes); the Llama configs are the
published LLaMA-7B and Llama-2-70B shapes, built on the meta device (no weights anywhere).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from workbench.cli import app
from workbench.errors import UsageError
from workbench.run import plan_config
from workbench.run.plan import (
    HOST_BASE,
    MODEL_EXTRAS,
    Machine,
    Need,
    Shapes,
    choose_offload,
    estimate,
    fisher_activations,
    setting,
    settings,
    verdict,
)
from workbench.run.preflight import check

runner = CliRunner()
GB = 10**9

# b = 2, d = 8, head_dim 2, 4 windows × 4 tokens (T = 16), batch 2; q/k/v-like group 8×8 and a
# down-like group in 16 → out 8; 2 layers of 300 parameters, embeddings 100; vocab 10, MLP 16.
SMALL = Shapes(params=1000, dtype_bytes=2, hidden=8, head_dim=2, groups=[("attn_in", 1, 8, 8), ("down_in", 1, 16, 8)],
               windows=4, seq_len=4, ratio=0.5, batch=2, layers=2, layer_params=300, edge_params=100, vocab=10,
               intermediate=16, fisher=True, eval_tokens=8)
IDS = 8 * 16  # the calibration token ids, int64, on the host


def test_the_terms_by_hand():
    est = estimate(SMALL)
    assert est.inputs == 2 * 16 * 8 + 2 * 2 * 16 * 2 == 384  # hidden states + rotary cos/sin
    assert est.grams == 8 * (8 * 8 + 16 * 16) == 2560
    # break-even ranks: 8×8 → min(8, 8, ⌊64/16⌋) = 4; 16→8 → min(16, 8, ⌊128/24⌋) = 5
    assert est.factors == 4 * (4 * (8 + 8) + 5 * (16 + 8)) == 736
    # factoring the down group: L, 8·16² (below the in-place width), + 6·8·8·16 = 8192 > the forward over
    # 8 rows: MLP 3·2·8·16 + 8·8·16 + 2·8·8, attention 8·2·8·8
    assert est.transient == 8192
    assert est.model_file == 2 * (1000 - 96) + MODEL_EXTRAS
    assert est.checkpoint == 736 + 2560 + 2 * 256 == 3808
    assert est.memory == 384 + 2560 + 736 + 8192

    # fisher: 4 bytes · 4 tokens · (3·10 + 2 layers · (20·8 + 4·16))
    assert fisher_activations(SMALL) == 4 * 4 * (30 + 2 * 224) == 7648
    assert fisher_activations(replace(SMALL, fisher=False)) == 0


def test_each_mode_places_the_terms_by_hand(monkeypatch):
    base = HOST_BASE + IDS
    none, cpu, disk = (setting(SMALL, mode) for mode in ("none", "cpu", "disk"))
    # none: everything on the device (weights 2000); the host holds the interpreter and the token ids
    assert none.phases["calibration"].device == 2000 + 384 + 2560 + 736 + 8192 == 13872
    assert none.phases["fisher"].device == 2000 + 736 + 7648
    assert none.phases["evaluation"].device == 2000 + 2 * 4 * 8 * 10  # logits and log-softmax, float32
    assert (none.device, none.host) == (13872, base)
    # offload: one layer (2·300 = 600) and one batch in + out (2·24·2·4 = 384) on the device
    assert cpu.phases["calibration"].device == disk.phases["calibration"].device == 600 + 384 + 2560 + 8192
    assert cpu.phases["calibration"].host == base + 2000 + 384 + 736 + 2560  # weights, inputs, factors, Grams
    # "disk": one layer, Grams and inputs; the factors are spilled to the work directory (disk)
    assert disk.phases["calibration"].host == base + 600 + 2560 + 384
    # fisher under offload runs only where the host is the device: its activations beside the host's share
    assert cpu.phases["fisher"] == Need(7648, cpu.phases["calibration"].host)
    assert disk.phases["evaluation"].host == base + 600
    assert (cpu.device, cpu.host) == (11736, base + 5680)
    assert (disk.device, disk.host) == (11736, base + 3544)
    assert none.disk == cpu.disk == 3808 + 1808 + MODEL_EXTRAS
    assert disk.disk == none.disk + 736 + 384  # the spilled factors and the parked inputs
    assert none.whole_model == ("fisher",)


def test_processes_split_the_inputs_but_each_holds_its_grams_and_every_factor():
    base = 2 * HOST_BASE + IDS
    none, cpu, disk = (setting(SMALL, mode, 2) for mode in ("none", "cpu", "disk"))
    # 2 of the 4 windows each (192 bytes of inputs); the factors are gathered into every process
    assert none.phases["calibration"].device == 2000 + 192 + 2560 + 736 + 8192
    assert none.phases["calibration"].host == base
    assert cpu.phases["calibration"].host == base + 2 * (2000 + 736 + 2560) + 384
    assert disk.phases["calibration"].host == base + 2 * (600 + 2560) + 384
    assert len(settings(SMALL)) == 3 * 4
    gpus = Machine(host=100 * HOST_BASE, disk=10**9, gpus=(10**9, 10**9))
    assert verdict(setting(replace(SMALL, fisher=False), "none", 2), gpus) is None
    assert verdict(setting(replace(SMALL, fisher=False), "cpu", 2), gpus) is None  # offload combines with torchrun
    # each process spills every factor under "disk" (and parks its share of the inputs) and keeps its
    # compressed layers under offload
    est = estimate(SMALL)
    assert none.disk == setting(SMALL, "none", 1).disk == est.model_file + est.checkpoint
    assert cpu.disk == 2 * est.model_file + est.checkpoint
    assert disk.disk == 2 * est.model_file + est.checkpoint + 2 * est.factors + est.inputs


def test_none_is_exactly_preflight_on_top_of_the_weights():
    for shapes in (SMALL, replace(SMALL, compensate=True, fisher=False, eval_tokens=0)):
        est = estimate(shapes)
        assert setting(shapes, "none").phases["calibration"].device == 2 * shapes.params + est.memory


def test_verdict_and_the_least_offload_that_fits():
    s = replace(SMALL, fisher=False, eval_tokens=0)
    roomy = Machine(host=10 * HOST_BASE, disk=10**9, gpus=(10**6,), gpu_names=("gpu",))
    assert verdict(setting(s, "none"), roomy) is None
    assert verdict(setting(s, "none", 2), roomy) == "needs 2 GPUs, 1 here"
    small_gpu = replace(roomy, gpus=(12_000,))  # offload's 11736 fits, none's 13872 does not
    assert verdict(setting(s, "none"), small_gpu) == "device memory"
    assert choose_offload(s, small_gpu).offload == "cpu"
    assert verdict(setting(s, "cpu"), replace(small_gpu, disk=100)) == "disk"
    # no GPU: the compute device is the host, so its figures add up
    cpu_only = Machine(host=HOST_BASE + IDS + 13872 - 1, disk=10**9)
    assert verdict(setting(s, "none"), cpu_only) == "host memory"
    assert verdict(setting(s, "none"), replace(cpu_only, host=cpu_only.host + 1)) is None
    assert choose_offload(s, Machine(host=0, disk=10**9)) is None
    with pytest.raises(ValueError, match="offload"):
        setting(s, "auto")


def test_what_needs_the_whole_model_is_refused_under_offload_except_cpu_on_a_cpu():
    s = replace(SMALL, compensate=True)
    gpu = Machine(host=10 * HOST_BASE, disk=10**9, gpus=(10**9,), gpu_names=("gpu",))
    assert verdict(setting(s, "disk"), gpu) == 'fisher and compensation need offload = "none"'
    assert verdict(setting(SMALL, "cpu"), gpu) == 'fisher needs offload = "none"'
    assert verdict(setting(SMALL, "none"), gpu) is None
    cpu_only = Machine(host=10 * HOST_BASE, disk=10**9)
    assert verdict(setting(SMALL, "cpu"), cpu_only) is None
    assert verdict(setting(SMALL, "disk"), cpu_only) == 'fisher needs offload = "none"'


# ------------------------------------------------------------------ from a config, through the CLI

LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float16"}
LLAMA_2_70B = {**LLAMA_7B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64, "num_key_value_heads": 8, "max_position_embeddings": 4096,
               "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16"}
GPU_40GB_HOST_128GB = Machine(host=128 * GB, disk=10**13, gpus=(40 * GB,), gpu_names=("a 40 GB GPU",))


def _config(tmp_path: Path, config: dict, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _profile(tmp_path: Path, allocator: str = "uniform") -> Path:
    path = tmp_path / "p.toml"
    path.write_text(f'[calibration]\nsamples = 32\nseq_len = 512\n[compression]\nallocator = "{allocator}"\n'
                    f'[output]\ndir = "{tmp_path / "out"}"\n')
    return path


def _plan(args: list[str], machine: Machine, monkeypatch) -> dict:
    monkeypatch.setattr(plan_config, "this_machine", lambda where: machine)
    result = runner.invoke(app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_llama_2_70b_fits_a_40_gb_gpu_and_a_128_gb_host_with_disk_offload(tmp_path, monkeypatch):
    folder = _config(tmp_path, LLAMA_2_70B, "llama-2-70b")
    data = _plan([str(_profile(tmp_path)), "--model", str(folder), "--dtype", "bfloat16"], GPU_40GB_HOST_128GB,
                 monkeypatch)
    assert data["terms_bytes"]["weights"] == 2 * 68_976_648_192  # Llama-2-70B's parameter count
    assert data["recommended"] == {"offload": "disk", "processes": 1}
    chosen = next(s for s in data["settings"] if (s["offload"], s["processes"]) == ("disk", 1))
    assert chosen["device_bytes"] <= 40 * GB and chosen["host_bytes"] <= 128 * GB and chosen["fits"]
    # Without offload the weights alone (138 GB) exceed the GPU; "cpu" puts them on a host too small.
    by_mode = {s["offload"]: s for s in data["settings"] if s["processes"] == 1}
    assert by_mode["none"]["why_not"] == "device memory" and by_mode["cpu"]["why_not"] == "host memory"


def test_the_table_names_the_setting_in_gib(tmp_path, monkeypatch):
    folder = _config(tmp_path, LLAMA_2_70B, "llama-2-70b")
    monkeypatch.setattr(plan_config, "this_machine", lambda where: GPU_40GB_HOST_128GB)
    result = runner.invoke(app, ["plan", str(_profile(tmp_path)), "--model", str(folder), "--dtype", "bfloat16"],
                           env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert 'use: [model] offload = "disk"' in result.output and "GiB = 1024³ bytes" in result.output
    assert "80 layers" in result.output and "68.98 B parameters" in result.output


def test_with_the_fisher_signal_70b_fits_nowhere_and_the_plan_says_what_would(tmp_path, monkeypatch):
    folder = _config(tmp_path, LLAMA_2_70B, "llama-2-70b")
    monkeypatch.setattr(plan_config, "this_machine", lambda where: GPU_40GB_HOST_128GB)
    args = ["plan", str(_profile(tmp_path, "loss-aware")), "--model", str(folder), "--dtype", "bfloat16"]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "needs the fisher signal" in result.output and "nothing fits with the fisher signal" in result.output
    assert 'allocator that needs no signal (uniform, drank): [model] offload = "disk"' in result.output


def test_llama_7b_from_a_config_json(tmp_path, monkeypatch):
    config = _config(tmp_path, LLAMA_7B, "llama-7b") / "config.json"
    machine = Machine(host=64 * 2**30, disk=10**12)  # a CPU box with 64 GiB
    data = _plan(["--model", str(config), "--dtype", "float16", "--ratio", "0.4"], machine, monkeypatch)
    assert data["terms_bytes"]["weights"] == 2 * 6_738_415_616
    assert data["ratio"] == 0.4 and data["calibration"] == {"windows": 32, "seq_len": 512}
    none = next(s for s in data["settings"] if (s["offload"], s["processes"]) == ("none", 1))
    terms = data["terms_bytes"]
    on_top = terms["inputs"] + terms["grams"] + terms["factors"] + terms["transient"]
    assert none["phases"]["calibration"]["device_bytes"] == terms["weights"] + on_top
    assert data["recommended"]["processes"] == 1


def test_tied_embeddings_are_counted_once(tmp_path, monkeypatch):
    folder = _config(tmp_path, {**LLAMA_7B, "tie_word_embeddings": True}, "tied")
    data = _plan(["--model", str(folder), "--dtype", "float16"], Machine(host=10**12, disk=10**12), monkeypatch)
    assert data["terms_bytes"]["weights"] == 2 * (6_738_415_616 - 32000 * 4096)


@pytest.mark.parametrize("args,words", [
    ([], ["give a PROFILE"]),
    (["--model", "missing-dir/config.json"], ["does not exist"]),
    (["--model", "{tmp}", "--dtype", "float8"], ["unknown dtype"]),
    (["--model", "{tmp}", "--ratio", "1.5"], ["--ratio", "outside [0, 1)"]),
])
def test_bad_input_is_a_usage_error(tmp_path, args, words):
    _config(tmp_path, LLAMA_7B, "m")
    args = [a.replace("{tmp}", str(tmp_path / "m")) for a in args]
    result = runner.invoke(app, ["plan", *args])
    assert result.exit_code == 2, result.output
    assert all(w in result.output for w in words) and "Traceback" not in result.output


def test_a_config_asking_to_run_code_is_refused(tmp_path):
    folder = _config(tmp_path, {**LLAMA_7B, "auto_map": {"AutoConfig": "x.Config"}}, "remote")
    for target in (folder, folder / "config.json"):
        result = runner.invoke(app, ["plan", "--model", str(target)])
        assert result.exit_code == 2 and "auto_map" in result.output, result.output


def llama_7b_shapes() -> Shapes:
    """LLaMA-7B, float16, 256 × 2048 tokens, group size 1 (tests/test_preflight.py's, with the whole model)."""
    d, m = 4096, 11008
    groups = [("attn_in", 1, d, d)] * 3 + [("o_in", 1, d, d)] + [("mlp_in", 1, d, m)] * 2 + [("down_in", 1, m, d)]
    return Shapes(params=6_738_415_616, dtype_bytes=2, hidden=d, head_dim=128, groups=groups * 32, windows=256,
                  seq_len=2048, ratio=0.2, layers=32, layer_params=202_383_360, edge_params=131_072_000)


def test_preflight_names_the_offload_that_fits_and_checks_an_offload_run_by_the_plan():
    shapes = llama_7b_shapes()
    est = estimate(shapes)
    cpu = torch.device("cpu")
    roomy_disk = lambda _: 10**13  # noqa: E731
    # 30 GB free with the model loaded: the model-on-the-device run needs ~36 GB on top of its weights.
    # Without them loaded (+13.5 GB, and this process's own HOST_BASE), "cpu" (weights, factors, inputs and
    # Grams on the host, ~52 GB with the device's share) does not fit; "disk" (~40 GB, factors on the host) does.
    with pytest.raises(UsageError) as caught:
        check(est, Path("o"), cpu, True, disk=roomy_disk, memory=lambda _: 30 * GB, shapes=shapes)
    assert 'With [model] offload = "disk" it needs about' in str(caught.value)
    room = 30 * GB + 2 * shapes.params + HOST_BASE
    on_disk, on_cpu = setting(shapes, "disk"), setting(shapes, "cpu")
    assert on_disk.host + on_disk.device < room < on_cpu.host + on_cpu.device
    summary = check(est, Path("o"), cpu, True, disk=roomy_disk, memory=lambda _: 45 * GB, shapes=shapes,
                    offload="disk")
    assert summary.startswith("preflight: needs about")
    with pytest.raises(UsageError, match='with offload = "disk" the calibration needs about'):
        check(est, Path("o"), cpu, True, disk=roomy_disk, memory=lambda _: 5 * GB, shapes=shapes, offload="disk")
    # Without the whole model's figures, the message is as before: no setting named.
    with pytest.raises(UsageError) as caught:
        check(est, Path("o"), cpu, True, disk=roomy_disk, memory=lambda _: 30 * GB)
    assert "offload" not in str(caught.value)


def test_the_forward_term_bounds_the_mlp_by_its_token_chunk_and_attention_by_the_layer_pass():
    batch = replace(SMALL, windows=64, batch=64)  # 256 rows per batch
    attention = 8 * 2 * 256 * 8
    whole = 3 * 2 * 256 * 16 + 8 * 256 * 16 + 2 * 256 * 8  # MLP activations, the hook's float64 rows, the output
    assert estimate(batch).transient == whole == 61440
    chunked = replace(batch, token_chunk=4)
    assert 3 * 2 * 4 * 16 + 8 * 4 * 16 + 2 * 256 * 8 < attention
    assert estimate(chunked).transient == attention == 32768
    # the layer over passes of whole sequences (16 of 4 tokens): attention holds a pass's 8 tensors
    # beside the batch's output, 12288 > the factoring's 8192 and the chunked MLP's 4992
    passes = replace(chunked, pass_tokens=64)
    assert 3 * 2 * 4 * 16 + 8 * 4 * 16 + 2 * 256 * 8 == 4992
    assert estimate(passes).transient == 8 * 2 * 64 * 8 + 2 * 256 * 8 == 12288
    assert estimate(replace(chunked, pass_tokens=3)).transient == 8192  # one sequence a pass: 512 + 4096 (attention), 4992 (MLP) < 8192
    # a batch wider than the hook's row chunk: its float64 copy is CHUNK_ROWS rows
    from workbench.engine.calibration import CHUNK_ROWS
    long = replace(SMALL, windows=1, seq_len=2 * CHUNK_ROWS, batch=1, hidden=1, groups=[("down_in", 1, 16, 8)])
    rows = 2 * CHUNK_ROWS
    assert estimate(long).transient == 3 * 2 * rows * 16 + 8 * CHUNK_ROWS * 16 + 2 * rows * 1


def test_a_wide_input_read_by_one_matrix_type_is_factored_in_its_grams_memory():
    layers = [("attn_in", 1, 8, 8), ("attn_in", 1, 8, 8), ("down_in", 1, 4096, 8)] * 3  # three layers
    wide = replace(SMALL, groups=layers, sole_inputs=frozenset({"down_in"}))
    # down: L takes its Gram's memory, so only the SVD's terms
    assert estimate(wide).transient == 6 * 8 * 8 * 4096
    assert estimate(replace(wide, sole_inputs=frozenset())).transient == 8 * 4096 ** 2 + 6 * 8 * 8 * 4096
    shared = replace(wide, groups=[("attn_in", 1, 8, 8), ("down_in", 2, 4096, 8)])
    assert estimate(shared).transient == 8 * 4096 ** 2 + 6 * 8 * 2 * 8 * 4096  # the summed Gram, then L in it


def test_the_sole_readers_of_an_input_come_from_the_plans():
    from conftest import tiny_llama
    from workbench.engine.grouping import plan_groups
    from workbench.registry import load_registry
    from workbench.run.preflight import _sole_inputs

    model = tiny_llama(layers=2)
    adapter = load_registry(strict=True).adapter_for(model)
    plans = plan_groups(model, adapter, None, [], lambda t: 1)
    assert _sole_inputs(plans) == {p.statistic for p in plans if p.site.path.endswith(("o_proj", "down_proj"))}


def test_an_output_gram_counts_out_squared_and_its_own_factoring():
    """down (16 → 8, one layer) from its output's Gram: 8·8² instead of 8·16²; factoring it holds
    C's copy, LAPACK's workspace (3·8·out²) and W, VᵀL⁻¹ (2·8·out·in), no L."""
    est = estimate(replace(SMALL, output_grams=frozenset({"down_in"})))
    assert est.grams == 8 * (8 * 8 + 8 * 8) == 1024
    # attn's factoring, 8·8² + 6·8·8·8 = 3584, equals down's 3·8·8² + 2·8·8·16 = 3584
    assert est.transient == 3584
    wide = replace(SMALL, groups=[("attn_in", 1, 8, 8), ("down_in", 1, 4096, 8)], output_grams=frozenset({"down_in"}))
    assert estimate(wide).transient == 3 * 8 * 8 * 8 + 2 * 8 * 8 * 4096  # not 8·4096² for L


def test_preflight_shapes_name_the_plans_output_grams():
    from conftest import tiny_llama
    from workbench.engine.grouping import plan_groups
    from workbench.profile.schema import parse_profile
    from workbench.registry import load_registry
    from workbench.run.preflight import shapes_of

    model = tiny_llama(layers=2)  # hidden 64, MLP 128
    adapter = load_registry(strict=True).adapter_for(model)
    plans = plan_groups(model, adapter, None, [], lambda t: 1)
    shapes = shapes_of(model, plans, parse_profile("", "p.toml"), 1000)
    assert shapes.output_grams == {"mlp.down_proj:output"}
    # per layer alive: attn_in, attn_out, mlp_in 64² each, down_proj's output 64² (its input: 128²)
    assert estimate(shapes).grams == 8 * 4 * 64 * 64
