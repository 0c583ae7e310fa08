"""The Locust robot fleet (loadtest/) against the real app: paced calls, no failures, typed failures.

Real server (the session's Ray Serve app, auth on), real Locust in a subprocess,
the same entry point as ``make loadtest``. Short on purpose (~15 s of Locust).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.results import RunResult, read_run
from serving.client import RobotClient
from serving.config import ServingConfig

ROOT = Path(__file__).resolve().parents[1]
ROBOTS, RATE_HZ = 4, 5.0

pytestmark = pytest.mark.ray


def run_fleet(cfg: ServingConfig, prefix: Path, api_key: str, duration_s: float) -> tuple[int, str, RunResult]:
    cmd = [
        sys.executable,
        "-m",
        "loadtest.run",
        "--robots",
        str(ROBOTS),
        "--rate-hz",
        f"{RATE_HZ:g}",
        "--duration",
        f"{duration_s:g}s",
        "--warmup",
        "1",
        "--spawn-s",
        "0.5",
        "--target",
        cfg.address,
        "--csv-prefix",
        str(prefix),
    ]
    env = dict(os.environ, SUPERBRAIN_API_KEY=api_key, EMBODIMENTS="", IMAGE_FORMAT="raw")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert Path(f"{prefix}_stats.csv").exists(), output
    return proc.returncode, output, read_run(prefix, ROBOTS, RATE_HZ, proc.returncode)


def test_fleet_is_paced_and_every_call_succeeds(superbrain: ServingConfig, tmp_path: Path) -> None:
    with RobotClient(superbrain.address) as robot:
        served = {e.name for e in robot.describe().model().embodiments}

    code, output, result = run_fleet(superbrain, tmp_path / "fleet", os.environ["SUPERBRAIN_API_KEY"], 8)

    assert code == 0, output
    total = result.total
    assert total.requests > 0, output
    assert total.failures == 0 and not result.failures_by_type, output
    requested = ROBOTS * RATE_HZ
    assert 0.4 * requested <= result.act_rps <= 1.1 * requested, output  # paced, not closed-loop
    # Default mix: every served embodiment, each call named after its robot's embodiment.
    assert {c.name for c in result.calls} == {f"Act/{name}" for name in served}, output
    assert result.meta["robots"] == ROBOTS
    assert "achieved" in output and "p99" in output  # the printed summary


def test_bad_key_fails_fast_as_unauthenticated(superbrain: ServingConfig, tmp_path: Path) -> None:
    code, output, result = run_fleet(superbrain, tmp_path / "badkey", "sb-not-a-key", 1)

    assert code != 0, output
    assert result.failures_by_type and set(result.failures_by_type) == {"Unauthenticated"}, output
    assert result.total.requests == result.total.failures, output
    assert "Unauthenticated" in output
