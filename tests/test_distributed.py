"""Several processes (torchrun, gloo on the CPU) against one: same ranks, same numbers within the
rounding of the cross-process sums, interrupts that stop every process, and resume.

Tolerances (workbench/engine/distributed.py): each process runs the float32 layers over its own
batches, whose activations can differ from one process's in the last float32 bits (kernels are
chosen by batch shape), and the float64 sums are grouped differently; so the Grams agree to ~1e-7
relative, and the low-rank weights Q·P to ~1e-7·cond (measured: 7e-6 relative, Frobenius, on this
model; single factors may rotate within near-equal singular values, so their products are
compared). The tests allow 1e-4 for Q·P, nothing for the ranks and the weights that are not
factored, 1e-9 relative for the dense perplexity (the same model and batches; only the float64 NLL
sum is grouped differently) and 1e-5 for the compressed one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_model, tiny_profile, write_text_corpus
from workbench.engine.distributed import all_reduce_sum, process_share, share_bounds

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 180


# ---------------------------------------------------------------------------------- helpers


CACHE: dict[str, str] = {}  # the dense-metric cache of this module's torchrun jobs (set by `job`)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # one thread per process: two processes on a 2-core machine, and the same BLAS path in both runs
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), WORKBENCH_CHECKPOINT_SPACING="0")
    env.update(CACHE)
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(profile: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "workbench", "run", str(profile), "--output", str(out), "--log-format", "json",
            *extra]


def start_job(profile: Path, out: Path, n: int, *extra: str) -> list[subprocess.Popen]:
    """The n processes torchrun would start, with the variables it sets (so each exit code is seen)."""
    port = str(_free_port())
    procs = []
    for rank in range(n):
        env = _env(WORLD_SIZE=str(n), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)
        procs.append(subprocess.Popen(_command(profile, out, *extra), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        results.append((proc.returncode, stdout, stderr))
    return results


def report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def metric_values(rep: dict) -> list[tuple[float, float]]:
    return [(m["dense"], m["compressed"]) for m in rep["metrics"]]


def ranks(rep: dict) -> dict[str, int]:
    return {row["group"]: row["rank"] for row in rep["ranks"]}


def low_rank_weights(out: Path) -> dict[str, torch.Tensor]:
    """{module: Q·P in float64} of every low-rank module of a run's saved model."""
    from workbench import load_compressed
    from workbench.engine.lowrank import LowRankLinear

    model = load_compressed(out)
    return {name: (m.coef.weight.double() @ m.basis.weight.double()).detach() for name, m in model.named_modules()
            if isinstance(m, LowRankLinear)}


def model_tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted((out / "model").glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def resume_and_compare(profile: Path, out: Path, reference: Path) -> None:
    """Resume a stopped two-process job into `out`: it must say it resumed and equal `reference` bit for bit
    (same shares, same sums)."""
    resumed = finish(start_job(profile, out, 2, "--resume"))
    assert [code for code, _, _ in resumed] == [0, 0], [r[2][-1500:] for r in resumed]
    rep, ref = report(out), report(reference)
    assert rep.get("resumed_from_checkpoint"), "the second run did not resume"
    assert ranks(rep) == ranks(ref)
    assert metric_values(rep) == metric_values(ref)
    a, b = model_tensors(out), model_tensors(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A tiny Llama (4 layers, groups of 2, the Fisher-based default allocator) run in one process and
    as a torchrun job of two: the outputs the tests compare."""
    root = tmp_path_factory.mktemp("distributed")
    CACHE["WORKBENCH_DENSE_CACHE"] = str(root / "dense-cache")
    save_tiny_model(root / "tiny-llama", layers=4)
    write_text_corpus(root / "corpus.txt")
    profile = root / "tiny.toml"
    profile.write_text(tiny_profile(root, root / "unused", ratio=0.3, group_size=2, samples=10,
                                    extra="[signals.fisher]\nwindows = 5\n"))
    # its own dense-metric cache: the job must compute its dense perplexity, not find one process's
    one = subprocess.run(_command(profile, root / "one"), env=_env(WORKBENCH_DENSE_CACHE=str(root / "cache-one")),
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    port = str(_free_port())
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", port, "-m", "workbench", "run", str(profile),
                          "--output", str(root / "two"), "--log-format", "json"],
                         env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert two.returncode == 0, two.stderr[-3000:]
    return root, profile, two


# ---------------------------------------------------------------------------------- one process


def test_shares_are_contiguous_cover_every_window_and_differ_by_at_most_one():
    for n in (2, 5, 10, 33):
        for world in (1, 2, 3, 4):
            bounds = [share_bounds(n, world, r) for r in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_one_process_helpers_change_nothing():
    assert process_share(7) == range(7)
    value = {"nll": 1.25, "tokens": 3, "sums": [torch.tensor([1.0, 2.0], dtype=torch.float64)]}
    assert all_reduce_sum(value) is value


def test_a_profile_a_job_cannot_run_is_refused_before_joining(tmp_path):
    from workbench.run.distributed import check_profile
    from workbench.errors import UsageError
    from workbench.profile.schema import load_profile

    save_tiny_model(tmp_path / "tiny-llama")
    write_text_corpus(tmp_path / "corpus.txt")
    path = tmp_path / "p.toml"
    path.write_text(tiny_profile(tmp_path, tmp_path / "out", samples=2))
    profile = load_profile(path)
    check_profile(profile, 2)
    with pytest.raises(UsageError, match="fewer than the 4 processes"):
        check_profile(profile, 4)
    path.write_text(tiny_profile(tmp_path, tmp_path / "out", samples=2).replace("[compression]\n",
                                                                              "[compression]\nsequential = true\n"))
    profile = load_profile(path)
    with pytest.raises(UsageError, match="one process only"):
        check_profile(profile, 2)


def test_two_spawned_processes_sum_relay_errors_and_stop_together(tmp_path):
    import torch.multiprocessing as mp

    from distributed_worker import collectives  # a light module: each spawned process imports it

    mp.spawn(collectives, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    zero, one = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    assert zero["share"] == [0, 1, 2] and one["share"] == [3, 4]
    for out in (zero, one):
        assert out["sum"] == [0.1 + 0.2, 3, [3.0, 3.0]]
        assert out["leader_value"] == {"g": 3}
    assert zero["relayed"] == "output exists" and one["relayed"] == "process 0: output exists"
    assert zero["stopped"] == "another process of the run was interrupted"
    assert one["stopped"] == "SIGTERM received"


def test_saved_calibration_inputs_split_back_into_each_process_share():
    from workbench.engine.distributed import Processes
    from workbench.errors import RunFailed
    from workbench.run.distributed import SharedWorkDir

    work = SharedWorkDir(Processes(0, 2, 0))
    work._windows = 11  # shares 6 and 5, in batches of 4
    batches = [torch.full((n, 3), float(i)) for i, n in enumerate((4, 2, 4, 1))]
    parts = work._split(batches)
    assert [[int(b[0, 0]) for b in part] for part in parts] == [[0, 1], [2, 3]]
    with pytest.raises(RunFailed, match="do not split"):
        work._split([torch.zeros(5, 3), torch.zeros(6, 3)])  # made by another number of processes


# ---------------------------------------------------------------------------------- two processes


def test_two_processes_give_the_ranks_and_numbers_of_one(job):
    root, _, two = job
    one_report, two_report = report(root / "one"), report(root / "two")
    assert ranks(two_report) == ranks(one_report)
    assert two_report["calibration"]["tokens"] == one_report["calibration"]["tokens"]
    assert two_report["calibration"]["processes"] == 2 and "processes" not in one_report["calibration"]
    for (d1, c1), (d2, c2) in zip(metric_values(one_report), metric_values(two_report)):
        assert d2 == pytest.approx(d1, rel=1e-9) and c2 == pytest.approx(c1, rel=1e-5)
    one_model, two_model = model_tensors(root / "one"), model_tensors(root / "two")
    assert one_model.keys() == two_model.keys()
    for name, a in one_model.items():
        assert a.shape == two_model[name].shape and a.dtype == two_model[name].dtype, name
        if not (name.endswith(".coef") or name.startswith("workbench.basis.")):
            assert torch.equal(a, two_model[name]), name  # embeddings, norms, layers kept dense
    one_low, two_low = low_rank_weights(root / "one"), low_rank_weights(root / "two")
    assert one_low.keys() == two_low.keys() and len(one_low) > 0
    worst = max(float((one_low[k] - two_low[k]).norm() / one_low[k].norm()) for k in one_low)
    assert worst <= 1e-4, f"largest relative difference of Q·P: {worst:.2e}"
    # torchrun (the real launcher) ran both processes; process 0 alone wrote the output
    assert not list(root.glob("two.work")) and (root / "two" / "model").is_dir()


def test_process_0_shows_the_other_process_progress_and_memory(job):
    """Only process 0 prints; process 1's events reach its output through the relay, named rank 1."""
    _, _, two = job
    events = [json.loads(line) for line in two.stdout.splitlines() if line.startswith("{")]
    relayed = {e["kind"] for e in events if (e.get("data") or {}).get("rank") == 1}
    assert "memory" in relayed, sorted({e["kind"] for e in events})
    assert all((e.get("data") or {}).get("rank", 0) in (0, 1) for e in events)


def test_sigterm_to_one_process_stops_every_process_with_130_and_resume_matches(job):
    root, profile, _ = job
    out = root / "stopped"
    procs = start_job(profile, out, 2)
    leader, follower = procs
    for line in leader.stdout:  # process 0's JSON events, as they come
        event = json.loads(line)
        if event["kind"] == "stage_start" and event["stage"] == "calibrate":
            follower.send_signal(signal.SIGTERM)  # one process only, as a scheduler might
            break
    results = finish(procs)
    assert [code for code, _, _ in results] == [130, 130], [r[2][-1500:] for r in results]
    assert "interrupted" in results[0][2] and "nothing was written" in results[0][2]
    assert not out.exists()  # nothing published
    assert (root / "stopped.work" / "state.json").is_file()  # process 0 kept the checkpoint

    resume_and_compare(profile, out, root / "two")
    assert not (root / "stopped.work").exists()


def test_an_error_in_process_0_stops_every_process_with_its_exit_code(job):
    root, profile, _ = job
    started = time.monotonic()
    results = finish(start_job(profile, root / "one", 2))  # exists, no --force: a usage error
    assert [code for code, _, _ in results] == [2, 2], [r[2][-1500:] for r in results]
    assert "already exists" in results[0][2] and "already exists" in results[1][2]
    assert time.monotonic() - started < TIMEOUT


# ---------------------------------------------------------------------------------- offload under torchrun


@pytest.fixture(scope="module")
def offload_job(tmp_path_factory):
    """The tiny Llama with `drank` (no signal), in one process without offload and as two processes with
    offload = "disk" (each process's private folders under its own TMPDIR, to see them go)."""
    root = tmp_path_factory.mktemp("distributed-offload")
    save_tiny_model(root / "tiny-llama", layers=4)
    write_text_corpus(root / "corpus.txt")
    profiles = {}
    for mode in ("none", "disk"):
        profiles[mode] = root / f"{mode}.toml"
        profiles[mode].write_text(tiny_profile(root, root / "unused", ratio=0.3, group_size=2, samples=10,
                                               allocator="drank", offload=mode))
    one = subprocess.run(_command(profiles["none"], root / "one"),
                         env=_env(WORKBENCH_DENSE_CACHE=str(root / "cache-one")), capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    temp = root / "tmp"
    temp.mkdir()
    procs = []
    port = str(_free_port())
    for rank in range(2):
        env = _env(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   TMPDIR=str(temp), WORKBENCH_DENSE_CACHE=str(root / "cache-two"))
        procs.append(subprocess.Popen(_command(profiles["disk"], root / "two"), env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = finish(procs)
    assert [code for code, _, _ in results] == [0, 0], [r[2][-3000:] for r in results]
    return root, profiles["disk"], temp, results


def test_two_processes_under_disk_offload_give_the_ranks_and_numbers_of_one_without(offload_job):
    root, _, temp, results = offload_job
    one_report, two_report = report(root / "one"), report(root / "two")
    assert "offload: disk" in results[0][1]  # the job did offload
    assert ranks(two_report) == ranks(one_report) and two_report["calibration"]["processes"] == 2
    for (d1, c1), (d2, c2) in zip(metric_values(one_report), metric_values(two_report)):
        assert d2 == pytest.approx(d1, rel=1e-9) and c2 == pytest.approx(c1, rel=1e-5)
    one_low, two_low = low_rank_weights(root / "one"), low_rank_weights(root / "two")
    assert one_low.keys() == two_low.keys() and len(one_low) > 0
    worst = max(float((one_low[k] - two_low[k]).norm() / one_low[k].norm()) for k in one_low)
    assert worst <= 1e-4, f"largest relative difference of Q·P: {worst:.2e}"
    assert not list(temp.iterdir())  # process 1's spilled factors and layers went when it exited
    assert not (root / "two.work").exists() and not list((root / "two").glob(".offload-*"))


def test_a_disk_offload_job_stopped_mid_calibration_resumes_to_the_same_answer(offload_job):
    root, profile, _, _ = offload_job
    out = root / "stopped"
    leader, follower = procs = start_job(profile, out, 2)
    for line in leader.stdout:
        event = json.loads(line)
        if event["kind"] == "progress" and event["stage"] == "calibrate" and event["current"] == 2:
            follower.send_signal(signal.SIGTERM)  # after two of the four layers are checkpointed
            break
    results = finish(procs)
    assert [code for code, _, _ in results] == [130, 130], [r[2][-1500:] for r in results]
    assert not out.exists()
    resume_and_compare(profile, out, root / "two")
