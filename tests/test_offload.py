"""Offload (`[model] offload`): a model compressed a layer at a time gives the same answer as in memory.

Tiny random Llama models saved as safetensors (conftest.tiny_workspace). On a CPU the compute
device is the host, so "cpu" keeps layers in host memory and "disk" reads each layer from the
safetensors file when it is used; both must give the ranks of "none" and logits within float32
rounding.
"""

from __future__ import annotations

import json

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_llama, tiny_profile
from workbench.engine import offload
from workbench.engine.offload import Devices, HostInputs, OffloadPlacement, SafetensorsWeights, choose_offload
from workbench.errors import Interrupted, ProfileError, UsageError
from workbench.events import CancelToken, EventBus
from workbench.profile.schema import parse_profile
from workbench.run.pipeline import run
from workbench.storage import checkpoint
from workbench.storage.checkpoint import work_dir_for
from workbench.storage.saving import load_compressed

CPU = torch.device("cpu")
# float32 forward passes computed in a different order (per layer vs whole model) agree to this
LOGITS_ATOL = 1e-4


def _profile(root, out, offload_mode: str, allocator: str = "drank", group_size: int = 2, extra: str = ""):
    return parse_profile(tiny_profile(root, out, ratio=0.3, group_size=group_size, allocator=allocator, extra=extra,
                                      offload=offload_mode))


def _isolated_run(profile, tmp_path_factory, **kw):
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse cache isolation is not active yet
        mp.setenv("WORKBENCH_DENSE_CACHE", str(tmp_path_factory.mktemp("dense")))
        return run(profile, **kw)


@pytest.fixture(scope="module")
def runs(tiny_workspace, tmp_path_factory):
    """One run per mode, group size 2 (a basis shared by two layers), an allocator that reads the spectra."""
    done = {}
    for mode in ("none", "cpu", "disk"):
        out = tmp_path_factory.mktemp(mode) / "out"
        done[mode] = (_isolated_run(_profile(tiny_workspace, out, mode), tmp_path_factory), out)
    return done


def _logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids, use_cache=False).logits.float()


# ---------------------------------------------------------------------------------- the profile key


def test_offload_defaults_to_auto_and_rejects_an_unknown_mode(tiny_workspace, tmp_path):
    assert parse_profile(tiny_profile(tiny_workspace, tmp_path / "o")).model.offload == "auto"
    text = tiny_profile(tiny_workspace, tmp_path / "o", offload="gpu")
    with pytest.raises(ProfileError) as caught:
        parse_profile(text)
    message = str(caught.value)
    assert "model.offload" in message and "disk" in message and "auto" in message


# ---------------------------------------------------------------------------------- "auto"


def test_auto_takes_the_least_offload_whose_weights_fit():
    gpu = torch.device("cuda", 0)
    free = {"cuda": 10 << 30, "cpu": 100 << 30}
    memory = lambda device: free[device.type]  # noqa: E731
    assert choose_offload("auto", 7 << 30, gpu, memory) == "none"  # 7 GiB × 1.25 ≤ 10 GiB
    assert choose_offload("auto", 9 << 30, gpu, memory) == "cpu"  # not on the GPU, on the host
    assert choose_offload("auto", 90 << 30, gpu, memory) == "disk"  # 90 × 1.25 > 100
    assert choose_offload("auto", 9 << 30, CPU, lambda d: 10 << 30) == "disk"  # host = device: cpu cannot help
    assert choose_offload("auto", 7 << 30, CPU, lambda d: 10 << 30) == "none"
    assert choose_offload("disk", 1, CPU, memory) == "disk"  # asked for: taken as is
    with pytest.raises(UsageError, match="allowed: none, cpu, disk, auto"):
        choose_offload("ram", 1, CPU, memory)


# ---------------------------------------------------------------------------------- the pieces


def test_lazy_weights_read_each_tensor_from_its_shard(tmp_path):
    a, b = torch.randn(3, 4), torch.randn(5)
    save_file({"x.a": a}, str(tmp_path / "one.safetensors"))
    save_file({"x.b": b}, str(tmp_path / "two.safetensors"))
    weights = SafetensorsWeights(sorted(tmp_path.glob("*.safetensors")))
    assert set(weights) == {"x.a", "x.b"} and weights.numel() == 17
    assert torch.equal(weights["x.a"], a) and torch.equal(weights["x.b"], b)
    view = offload.Prefixed(weights, "x.")
    assert "a" in view and "c" not in view and torch.equal(view["b"], b)


def test_host_inputs_give_the_default_propagators_outputs(calib_ids, tmp_path, monkeypatch):
    """On a CPU the host is the device: HostInputs must be the default LayerInputs, bit for bit, also
    with its outputs parked in files between layers (offload "disk"); each runs a layer over passes
    of whole sequences (here one, as TOKEN_CHUNK is below a window's length)."""
    from workbench.engine import calibration
    from workbench.engine.walk import LayerInputs

    monkeypatch.setattr(calibration, "TOKEN_CHUNK", calib_ids.shape[1] - 1)
    model = tiny_llama()
    layers = model.model.layers
    sequences: list[int] = []  # per call of a layer past the first (whose hooks see the capture too)
    for layer in layers[1:]:
        layer.register_forward_pre_hook(lambda m, args, kwargs: sequences.append(
            (args[0] if args else kwargs["hidden_states"]).shape[0]), with_kwargs=True)
    results = []
    parked = HostInputs(Devices(CPU, "disk"), park=tmp_path / "spill")
    for propagator in (LayerInputs(), HostInputs(Devices(CPU, "cpu")), parked):
        propagator.capture(model, layers[0], calib_ids, 4, CPU, lambda: None)
        for i, layer in enumerate(layers):
            propagator.forward(i, layer, None)
            propagator.advance(i)
        results.append(torch.cat(propagator.inputs()))
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert set(sequences) == {1} and len(sequences) == 3 * (len(layers) - 1) * calib_ids.shape[0]
    files = sorted((tmp_path / "spill").glob("inputs-*.safetensors"))
    assert len(files) == len(parked.batches) > 1 and not list((tmp_path / "spill").glob("*.partial"))
    maps = Path("/proc/self/maps")
    if maps.exists():  # mapped from the files, not read into the process's own memory
        assert str(files[0]) in maps.read_text()
    # what a reader of the inputs (the checkpoint) maps is its own mapping, gone with it
    first = parked.batches[0].hidden
    fresh = parked.inputs()
    assert torch.equal(fresh[0], first) and fresh[0].data_ptr() != first.data_ptr()
    del fresh
    if maps.exists():  # each input file replaced by its output is unmapped: only the current files stay mapped
        spill = [line for line in maps.read_text().splitlines() if str(tmp_path / "spill") in line]
        assert spill and not any("(deleted)" in line for line in spill)
        assert {line.split()[-1] for line in spill} <= {str(f) for f in files}


def _file_mapped(tensor: torch.Tensor, folder: Path) -> bool:
    """Whether `tensor`'s memory is a mapping of a file in `folder` (Linux's /proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5].startswith(str(folder)):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= tensor.data_ptr() < end:
                return True
    return False


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_parked_outputs_are_written_as_each_batch_is_done(calib_ids, tmp_path):
    """Under "disk" a batch's output goes to its file before the next batch runs: while the last
    batch runs, every earlier one is already a file mapping, not host memory."""
    model = tiny_llama()
    layers = model.model.layers
    parked = HostInputs(Devices(CPU, "disk"), park=tmp_path / "spill")
    parked.capture(model, layers[0], calib_ids, 4, CPU, lambda: None)
    assert len(parked.batches) > 2
    seen: list[list[bool]] = []
    layers[0].register_forward_pre_hook(
        lambda m, args: seen.append([_file_mapped(b.hidden, tmp_path / "spill") for b in parked.batches]))
    parked.forward(0, layers[0], None)
    assert seen[0] == [False] * len(parked.batches)  # captured in host memory
    assert seen[-1] == [True] * (len(parked.batches) - 1) + [False]
    assert all(_file_mapped(b.hidden, tmp_path / "spill") for b in parked.batches)


# ---------------------------------------------------------------------------------- same answer


def test_every_mode_gives_the_same_ranks_and_metrics(runs):
    reference, _ = runs["none"]
    ranks = [(r["group"], r["rank"]) for r in reference["ranks"]]
    assert len({r for _, r in ranks}) > 1  # the allocator read the spectra: not all groups alike
    for mode in ("cpu", "disk"):
        report, _ = runs[mode]
        assert [(r["group"], r["rank"]) for r in report["ranks"]] == ranks, mode
        for ours, theirs in zip(report["metrics"], reference["metrics"]):
            assert ours["dense"] == pytest.approx(theirs["dense"], rel=1e-5), mode
            assert ours["compressed"] == pytest.approx(theirs["compressed"], rel=1e-5), mode


def test_an_offloaded_run_saves_shards_that_load_to_the_same_logits(runs, calib_ids):
    _, reference_out = runs["none"]
    _, out = runs["disk"]
    files = sorted(p.name for p in (out / "model").iterdir())
    assert "model.safetensors.index.json" in files and "model-00001-of-00005.safetensors" in files
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference_out.iterdir())  # no layer files
    index = json.loads((out / "model" / "model.safetensors.index.json").read_text())["weight_map"]
    assert sum(k.startswith("workbench.basis.") for k in index) == len(
        json.loads((out / "model" / "compression.json").read_text())["groups"])  # each shared basis once
    expected = _logits(load_compressed(reference_out), calib_ids[:2])
    got = _logits(load_compressed(out), calib_ids[:2])
    assert torch.allclose(got, expected, atol=LOGITS_ATOL, rtol=0)


def test_disk_never_has_every_layer_materialised_and_spills_the_factors(tiny_workspace, tmp_path, monkeypatch):
    seen, spilled = [], []
    original, write = OffloadPlacement.before, offload.FactorSpill.write

    def spy(self, index, layer):
        original(self, index, layer)
        seen.append(len(self.offloaded.materialised()))

    def spill_spy(self, key, factors):
        write(self, key, factors)
        spilled.append((key, self.files[key].exists()))

    monkeypatch.setattr(OffloadPlacement, "before", spy)
    monkeypatch.setattr(offload.FactorSpill, "write", spill_spy)
    out = tmp_path / "out"
    report = run(_profile(tiny_workspace, out, "disk", group_size=1))
    assert seen and max(seen) == 1 < 4  # calibration and assembly: one layer of four at a time
    assert sorted(k for k, _ in spilled) == sorted(r["group"] for r in report["ranks"]) and all(e for _, e in spilled)
    assert not work_dir_for(out).exists()  # the spill went with the work directory


def test_spilled_factors_read_back_what_was_written(tmp_path):
    from workbench.engine.factorize import GroupFactors

    u, vt = torch.randn(8, 3), torch.randn(3, 5)
    factors = GroupFactors(torch.rand(3), u.clone(), vt.clone(), 8, None)  # whitening is not touched
    spill = offload.FactorSpill(tmp_path / "spill")
    spill.write("g", factors)
    assert torch.equal(factors.u, u) and torch.equal(factors.vt_linv, vt)
    spill.remap({"g": factors})
    assert torch.equal(factors.u, u) and torch.equal(factors.vt_linv, vt)


def test_cpu_offload_on_a_cpu_keeps_the_fisher_signal_and_its_ranks(tiny_workspace, tmp_path):
    """Host memory is the device's here, so the whole-model backward pass costs nothing extra."""
    reports = [run(_profile(tiny_workspace, tmp_path / mode, mode, allocator="loss-aware", group_size=1))
               for mode in ("none", "cpu")]
    assert [r["rank"] for r in reports[0]["ranks"]] == [r["rank"] for r in reports[1]["ranks"]]


def test_disk_refuses_the_fisher_signal_naming_an_allocator_without_it(tiny_workspace, tmp_path):
    with pytest.raises(UsageError) as caught:
        run(_profile(tiny_workspace, tmp_path / "out", "disk", allocator="loss-aware"))
    message = str(caught.value)
    assert "fisher" in message and 'compression.allocator = "' in message and "drank" in message
    assert not (tmp_path / "out").exists()


def test_disk_refuses_a_model_without_safetensors(tmp_path):
    from workbench.sources.models import load_model

    with pytest.raises(UsageError, match="safetensors"):
        load_model("embedded:smollm2-135m-mha", device="cpu", offload="disk")


# ---------------------------------------------------------------------------------- resume


def test_an_interrupted_disk_run_resumes_to_the_same_result(tiny_workspace, tmp_path, runs, monkeypatch):
    monkeypatch.setattr(checkpoint, "COMMIT_SPACING", 0.0)
    out = tmp_path / "out"
    profile = _profile(tiny_workspace, out, "disk")
    cancel = CancelToken()

    def stop_inside_a_group(event):  # layers 2 and 3 share a basis: resumed with layer 2 gone home
        if event.stage == "calibrate" and event.current == 3:
            cancel.cancel("test interrupt")

    with pytest.raises(Interrupted):
        run(profile, events=EventBus([stop_inside_a_group]), cancel=cancel)
    assert (work_dir_for(out) / "state.json").exists() and not out.exists()
    report = run(profile, resume=True)
    assert "calibration (3 of 4 layers)" in report["resumed_from_checkpoint"]
    reference, _ = runs["disk"]
    assert [r["rank"] for r in report["ranks"]] == [r["rank"] for r in reference["ranks"]]
    assert report["metrics"][0]["compressed"] == pytest.approx(reference["metrics"][0]["compressed"], rel=1e-6)


# ---------------------------------------------------------------------------------- load_compressed


def test_load_compressed_with_a_tiny_max_memory_offloads_layers_to_disk(runs, tmp_path, calib_ids):
    _, out = runs["none"]
    expected = _logits(load_compressed(out), calib_ids[:2])
    model = load_compressed(out, max_memory={"cpu": 200_000}, offload_folder=tmp_path / "offload")
    assert any(p.device.type == "meta" for p in model.parameters())  # some layers live on disk
    assert list((tmp_path / "offload").iterdir())
    assert torch.allclose(_logits(model, calib_ids[:2]), expected, atol=LOGITS_ATOL, rtol=0)


def test_load_compressed_asks_for_an_offload_folder_when_max_memory_needs_disk(runs):
    _, out = runs["none"]
    with pytest.raises(UsageError, match="offload_folder"):
        load_compressed(out, max_memory={"cpu": 200_000})


def test_offload_fixes_glibcs_mmap_threshold_and_is_harmless_without_glibc(monkeypatch):
    import ctypes

    from workbench.engine import offload

    calls = []

    class Libc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Libc())
    assert offload.return_freed_host_memory() and calls == [(-3, offload.MMAP_THRESHOLD)]

    def missing(name):
        raise OSError("no such library")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert offload.return_freed_host_memory() is False

    class NoMallopt:
        pass

    monkeypatch.setattr(ctypes, "CDLL", lambda name: NoMallopt())
    assert offload.return_freed_host_memory() is False
