"""`superbrain serve` (what `make serve` runs) as a user runs it: its own Ray, a real port, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving.client import RobotClient
from serving.client.errors import Unauthenticated
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.ray
def test_serve_prints_address_answers_and_stops_cleanly_on_sigterm(tmp_path) -> None:
    port = free_port()
    env = dict(
        os.environ,
        SUPERBRAIN_GRPC_PORT=str(port),
        SUPERBRAIN_STATE_DIR=str(tmp_path),
        PYTHONPATH=str(ROOT),
        RAY_ADDRESS="",
    )
    env.pop("SUPERBRAIN_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "serving.cli", "serve", "--policy", "tests.policies:SlowEchoPolicy"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "export SUPERBRAIN_API_KEY" in line:
                break
        out = "".join(lines)
        assert f"listening on grpc://127.0.0.1:{port}" in out, out
        assert "superbrain act" in out
        # First run on an empty ledger: a dev tenant, its key printed once and kept in a 0600 file.
        key_file = tmp_path / "dev-api-key"
        assert "Created tenant 'dev'" in out
        assert key_file.stat().st_mode & 0o777 == 0o600
        key = key_file.read_text().strip()
        assert key in out
        with RobotClient(f"127.0.0.1:{port}", timeout=30, api_key="") as anonymous:
            with pytest.raises(Unauthenticated):
                anonymous.describe()

        ray_processes = _descendants(proc.pid)
        assert ray_processes, "the serve command should have started a local Ray"
        with RobotClient(f"127.0.0.1:{port}", timeout=30, api_key=key) as robot, ThreadPoolExecutor(1) as pool:
            frame = np.full((8, 8, 3), 3, np.uint8)
            inflight = pool.submit(robot.act, images={"front": frame}, state=[1, 2, 3], embodiment="arm")
            time.sleep(0.5)  # the request is now inside its 1.5 s batch
            proc.send_signal(signal.SIGTERM)
            chunk = inflight.result(timeout=30)
            np.testing.assert_allclose(chunk.actions[0], [4.0, 5.0])  # state[:2] + mean pixel 3
        rc = proc.wait(timeout=60)
        rest = proc.stdout.read()
        assert rc == 0, out + rest
        assert "stopped." in rest
        time.sleep(2)
        leftovers = [pid for pid in ray_processes if _alive(pid)]
        assert not leftovers, f"processes left running after shutdown: {leftovers}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
