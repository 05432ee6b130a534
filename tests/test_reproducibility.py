"""The same profile and seed give the same ranks and byte-identical weight files (CPU)."""

from __future__ import annotations

import json

from conftest import tiny_profile
from workbench.run.pipeline import run
from workbench.profile.schema import parse_profile


def test_two_runs_give_identical_ranks_and_model_files(tiny_workspace, tmp_path):
    results = []
    for name in ("first", "second"):
        out = tmp_path / name
        text = tiny_profile(tiny_workspace, out, group_size=2, allocator="loss-aware")
        run(parse_profile(text))
        files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "model").rglob("*")) if p.is_file()}
        results.append((json.loads((out / "report.json").read_text())["ranks"], files))
    (ranks_a, files_a), (ranks_b, files_b) = results
    assert ranks_a == ranks_b
    assert "model/model.safetensors" in files_a
    assert files_a.keys() == files_b.keys()
    assert [name for name in files_a if files_a[name] != files_b[name]] == []
