"""What each of test_distributed.py's spawned gloo processes runs (kept light to import: torch and
workbench only, no transformers, since every spawned process imports this module)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from workbench.engine.distributed import all_reduce_sum, process_share


def collectives(rank: int, world: int, port: int, folder: str) -> None:
    """One of two spawned gloo processes: sums, an error relayed from process 0, an agreed interrupt."""
    import torch.distributed as dist

    from workbench.engine.distributed import Processes, set_current
    from workbench.errors import Interrupted, UsageError
    from workbench.events import CancelToken
    from workbench.run.distributed import agree_on_interrupts, on_leader

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    processes = Processes(rank, world, rank)
    set_current(processes)
    token = agree_on_interrupts(processes, CancelToken())
    out: dict = {"share": list(process_share(5))}
    summed = all_reduce_sum({"x": 0.1 * (rank + 1), "n": rank + 1,
                             "t": torch.full((2,), float(rank + 1), dtype=torch.float64)})
    out["sum"] = [summed["x"], summed["n"], summed["t"].tolist()]

    def refuse():
        raise UsageError("output exists")

    try:
        on_leader(refuse)
    except UsageError as exc:
        out["relayed"] = str(exc)
    out["leader_value"] = on_leader(lambda: {"ranks": {"g": 3}, "t": torch.ones(1)})["ranks"]
    if rank == 1:
        token.cancel("SIGTERM received")  # what the signal handler does, in this process only
    token.check()  # no agreement yet: nothing is raised where the others could be waiting
    try:
        token.sync()
    except Interrupted as exc:
        out["stopped"] = str(exc)
    set_current(None)
    dist.destroy_process_group()
    Path(folder, f"{rank}.json").write_text(json.dumps(out))
