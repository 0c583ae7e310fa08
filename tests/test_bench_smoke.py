"""`superbrain bench --smoke` runs end to end (numbers are for docs/benchmarks.md, not asserted here)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_bench_smoke_prints_one_json_summary_with_no_errors() -> None:
    env = dict(os.environ, RAY_ADDRESS="")
    proc = subprocess.run(
        [sys.executable, "-m", "serving.cli", "bench", "--smoke", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["workload"] == "W1"
    for system in ("superbrain", "grpc_limit"):
        result = summary["systems"][system]
        assert result["errors"] == 0
        assert result["rps"] > 0
        assert all(level["ok"] == level["calls"] for level in result["sweep"].values())
    assert summary["ratio_vs_limit"] > 0
