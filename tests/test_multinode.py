"""Replicas on separate Ray nodes (several raylets on one machine) serve robots through one port."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.ray
def test_replicas_on_two_nodes_serve_robots() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_ADDRESS="")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.multinode_check", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result == {"running_replicas": 2, "free_cpus": 0.0, "ok": 10}
