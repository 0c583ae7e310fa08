"""Find the largest robot fleet a deployment serves within its latency target.

    .venv/bin/python -m loadtest.capacity --replicas 1 --rate-hz 10 --step-duration 30s
    make capacity REPLICAS=2 RATE_HZ=10 STEP_DURATION=30s

Starts ``superbrain serve`` itself (a free port, a throw-away state dir, the dev key
it writes there), or, with ``--target``, measures a server that is already running
(key from $SUPERBRAIN_API_KEY or the dev key file). Then one Locust run per step: the fleet doubles while
it meets the target and is bisected between the last passing and the first failing
size. A step passes when every call succeeded, p99 <= ``--p99-ms`` and the fleet
achieved >= ``--min-ratio`` of its requested rate (a fleet that cannot keep its pace
is not being served, even if its few calls are fast). docs/capacity.md has results.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from loadtest.results import RunResult
from loadtest.run import RESULTS_DIR, ROOT, RunSpec, parse_duration, run_locust

READY_TIMEOUT_S = 240.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    """A ``superbrain serve`` child process: its address, dev key and log."""

    address: str
    api_key: str
    proc: subprocess.Popen | None
    log_path: Path | None


def _wait_ready(proc: subprocess.Popen, address: str, key_path: Path, log_path: Path) -> str:
    """Poll until the dev key exists and Describe answers with it; returns the key."""
    from serving.client import RobotClient, SuperbrainError

    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"superbrain serve exited with {proc.returncode}; log:\n{log_path.read_text()[-3000:]}")
        if key_path.exists() and (key := key_path.read_text().strip()):
            try:
                with RobotClient(address, api_key=key, timeout=2.0) as robot:
                    robot.describe()
                return key
            except SuperbrainError:
                pass
        time.sleep(1.0)
    log_tail = log_path.read_text()[-3000:]
    raise TimeoutError(f"superbrain serve not ready within {READY_TIMEOUT_S:.0f} s; log:\n{log_tail}")


@contextlib.contextmanager
def local_server(replicas: int, serve_args: list[str], log_dir: Path) -> Iterator[Server]:
    """``superbrain serve --num-replicas N`` on a free port with its own Ray and state; stopped on exit.

    SIGTERM lets it drain and stop its Ray cluster; its process group (it is started
    in a session of its own) is killed only if that takes longer than a minute.
    """
    port = free_port()
    state_dir = Path(tempfile.mkdtemp(prefix="superbrain-capacity-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"capacity_server_{replicas}r_{time.strftime('%Y%m%d-%H%M%S')}.log"
    env = dict(os.environ, SUPERBRAIN_STATE_DIR=str(state_dir), RAY_ADDRESS="")
    cmd = [
        str(Path(sys.executable).parent / "superbrain"),
        "serve",
        "--grpc-port",
        str(port),
        "--num-replicas",
        str(replicas),
        *serve_args,
    ]
    address = f"127.0.0.1:{port}"
    print(f"starting: {' '.join(cmd)}  (state {state_dir}, log {log_path})", flush=True)
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        started = time.monotonic()
        key = _wait_ready(proc, address, state_dir / "dev-api-key", log_path)
        print(f"server ready on {address} in {time.monotonic() - started:.0f} s", flush=True)
        yield Server(address, key, proc, log_path)
    finally:
        _stop(proc)
        shutil.rmtree(state_dir, ignore_errors=True)  # a throw-away ledger; the log stays in results/


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # leftovers of the group we created, if any
    proc.wait()


@dataclass
class Step:
    robots: int
    result: RunResult
    machine_cpu: float  # % of all cores during the step
    conns: list[int]  # robots' connections per server process, mid-step (local servers only)

    def reasons(self, p99_ms: float, min_ratio: float) -> str:
        t = self.result.total
        why = []
        if t.failures:
            kinds = ", ".join(f"{k} {n}" for k, n in self.result.failures_by_type.items())
            why.append(f"{t.failures} failures ({kinds})")
        if t.p99_ms is None or t.p99_ms > p99_ms:
            why.append(f"p99 {t.p99_ms if t.p99_ms is not None else 'n/a'} ms")
        if self.result.achieved_ratio < min_ratio:
            why.append(f"rate {100 * self.result.achieved_ratio:.0f} %")
        return "; ".join(why) or "ok"


class Search:
    """Geometric growth from ``start``, then bisection, within ``max_steps`` runs."""

    def __init__(self, args: argparse.Namespace, target: str, api_key: str | None):
        self.args = args
        self.target = target
        self.api_key = api_key
        self.steps: list[Step] = []
        self.stamp = time.strftime("%Y%m%d-%H%M%S")

    def passes(self, robots: int) -> bool:
        a = self.args
        spec = RunSpec(
            robots=robots,
            rate_hz=a.rate_hz,
            duration_s=parse_duration(a.step_duration),
            target=self.target,
            embodiments=a.embodiments,
            image_format=a.image_format,
            warmup_s=a.warmup,
            spawn_s=min(5.0, max(1.0, robots / 50)),
            csv_prefix=str(RESULTS_DIR / f"capacity_{self.stamp}_{a.replicas}r_{robots}robots"),
            api_key=self.api_key,
        )
        spread: list[int] = []
        port = int(self.target.rsplit(":", 1)[1])
        probe = threading.Timer(spec.spawn_s + spec.warmup_s + spec.duration_s / 2 + 2, _count_conns, (port, spread))
        before = psutil.cpu_times()
        probe.start()
        try:
            result = run_locust(spec, quiet=True)
        finally:
            probe.cancel()
        step = Step(robots, result, _busy_percent(before, psutil.cpu_times()), spread)
        self.steps.append(step)
        ok = result.meets(a.p99_ms, a.min_ratio)
        t = result.total
        verdict = "PASS" if ok else "fail: " + step.reasons(a.p99_ms, a.min_ratio)
        print(
            f"  {robots:>5} robots: {result.act_rps:7.1f}/{result.requested_rps:.0f} req/s, p50 {t.p50_ms} ms, "
            f"p99 {t.p99_ms} ms, failures {t.failures} -> {verdict}",
            flush=True,
        )
        time.sleep(a.pause)  # let an overloaded server drain before the next step
        return ok

    def run(self) -> int:
        """The largest passing fleet size (0 if even ``start``/2**k down to 1 fails)."""
        a = self.args
        lo, hi, n = 0, None, a.start
        while hi is None and len(self.steps) < a.max_steps:  # grow
            if self.passes(n):
                lo = n
                if n >= a.max_robots:
                    return lo
                n = min(n * 2, a.max_robots)
            else:
                hi = n
        if hi is None:
            return lo
        while len(self.steps) < a.max_steps:  # bisect (lo passes, hi fails)
            if hi - lo <= max(1, int(a.resolution * max(lo, 1))):
                break
            mid = (lo + hi) // 2
            if self.passes(mid):
                lo = mid
            else:
                hi = mid
        return lo


def _count_conns(port: int, out: list[int]) -> None:
    """Connections accepted on ``port`` per listening process: SO_REUSEPORT spreads robots over
    replicas by a hash of each connection, not by load, so a small fleet can land unevenly."""
    try:
        conns = psutil.net_connections("tcp")
    except psutil.AccessDenied:  # other users' sockets need root; the column stays empty
        return
    per_pid = Counter(c.pid for c in conns if c.laddr and c.laddr.port == port and c.status == "ESTABLISHED")
    out.extend(sorted(per_pid.values(), reverse=True))


def _busy_percent(before, after) -> float:
    idle = (after.idle + getattr(after, "iowait", 0)) - (before.idle + getattr(before, "iowait", 0))
    total = sum(after) - sum(before)
    return 100.0 * (1 - idle / total) if total > 0 else 0.0


def table(search: Search) -> str:
    a = search.args
    rows = [
        "| robots | requested req/s | achieved req/s | p50 ms | p99 ms | failures | load gen CPU | machine CPU "
        "| conns per replica | verdict |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for s in sorted(search.steps, key=lambda s: s.robots):
        r, t = s.result, s.result.total
        gen = r.meta.get("generator_cpu_mean")
        verdict = "pass" if r.meets(a.p99_ms, a.min_ratio) else s.reasons(a.p99_ms, a.min_ratio)
        rows.append(
            f"| {s.robots} | {r.requested_rps:.0f} | {r.act_rps:.1f} | {_num(t.p50_ms)} | {_num(t.p99_ms)} "
            f"| {t.failures} | {_num(gen)} % | {s.machine_cpu:.0f} % | {'/'.join(map(str, s.conns)) or 'n/a'} "
            f"| {verdict} |"
        )
    return "\n".join(rows)


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.capacity", description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=1, help="replicas of the server it starts")
    p.add_argument("--rate-hz", type=float, default=10.0, help="control rate of every robot")
    p.add_argument("--step-duration", default="30s", help="measured window of each step")
    p.add_argument("--p99-ms", type=float, default=100.0)
    p.add_argument("--min-ratio", type=float, default=0.95, help="achieved / requested rate a step needs")
    p.add_argument("--start", type=int, default=8, help="first fleet size")
    p.add_argument("--max-robots", type=int, default=2048)
    p.add_argument("--max-steps", type=int, default=10)
    p.add_argument("--resolution", type=float, default=0.1, help="stop bisecting within this fraction")
    p.add_argument("--warmup", type=float, default=3.0)
    p.add_argument("--pause", type=float, default=3.0, help="seconds between steps")
    p.add_argument("--embodiments", default="", help="mix, e.g. franka_arm:2,unitree_go2:1 (default: all)")
    p.add_argument("--image-format", choices=("raw", "jpeg"), default="raw")
    p.add_argument("--target", default="", help="measure this running server instead of starting one")
    p.add_argument("--serve-args", default="", help="extra flags for superbrain serve, e.g. '--device cuda'")
    a = p.parse_args(argv)

    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        if a.target:
            key = None  # the locustfile's usual lookup: $SUPERBRAIN_API_KEY, else the dev key file
            target, where = a.target, f"the server at {a.target}"
        else:
            server = stack.enter_context(local_server(a.replicas, a.serve_args.split(), RESULTS_DIR))
            target, key, where = server.address, server.api_key, f"{a.replicas} replica(s), started here"
        print(
            f"capacity search: {where}; robots at {a.rate_hz:g} Hz, {a.step_duration} per step; "
            f"target p99 <= {a.p99_ms:g} ms, no failures, >= {100 * a.min_ratio:.0f} % of the requested rate",
            flush=True,
        )
        search = Search(a, target, key)
        best = search.run()
    print("\n" + table(search))
    print(
        f"\nlargest fleet: {best} robots at {a.rate_hz:g} Hz ({best * a.rate_hz:.0f} req/s) with {where}; "
        f"{len(search.steps)} steps in {time.monotonic() - started:.0f} s; "
        f"{os.cpu_count()} CPU cores shared with the load generator"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
