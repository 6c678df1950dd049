"""``--executor ray``: a local Ray cluster runs the same sweep and gathers the same rows into results.jsonl."""

from __future__ import annotations

import pytest
import ray
from typer.testing import CliRunner

from longreach.cli import app
from longreach.eval.results import read_rows, row_key


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path, tiny_lm_folder):
    common = ["eval", "--model", str(tiny_lm_folder), "--tasks", "passkey,kvret", "--methods",
              "dense,streaming:window=64", "--lengths", "256", "--samples", "2", "--corpus", "synthetic", "--quiet"]
    local = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    try:
        distributed = CliRunner().invoke(app, [*common, "--out", str(tmp_path / "ray"), "--executor", "ray",
                                               "--workers", "2"])
    finally:
        ray.shutdown()
    assert distributed.exit_code == 0, distributed.output
    a, _ = read_rows(tmp_path / "local" / "results.jsonl")
    b, bad = read_rows(tmp_path / "ray" / "results.jsonl")
    assert not bad and len(b) == len(a) == 8
    same = ("prompt_sha", "gold", "tokens", "density")
    assert {row_key(r): [r[f] for f in same] for r in b} == {row_key(r): [r[f] for f in same] for r in a}
    assert "| dense | 256 | 2 |" in distributed.output
