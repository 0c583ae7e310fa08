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


@pytest.mark.ray
def test_bench_alternate_keeps_both_systems_up_and_pairs_every_round() -> None:
    env = dict(os.environ, RAY_ADDRESS="")
    cmd = [sys.executable, "-m", "serving.cli", "bench", "--systems", "superbrain_auth_off,grpc_limit", "--alternate"]
    cmd += ["--rounds", "2", "--concurrency", "2", "--calls", "3", "--warmup", "1", "--settle-s", "0", "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["alternate"] is True and summary["rounds"] == 2
    for system in ("superbrain_auth_off", "grpc_limit"):
        result = summary["systems"][system]
        assert result["errors"] == 0
        assert len(result["rounds_rps"]) == 2 and all(rps > 0 for rps in result["rounds_rps"])
    # Both systems were started once, before the first round, and stopped after the last.
    starts = [line for line in proc.stderr.splitlines() if ": starting (" in line]
    assert len(starts) == 2
    assert proc.stderr.index("round 1/2") > max(proc.stderr.index(line) for line in starts)
