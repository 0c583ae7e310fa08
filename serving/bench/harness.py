"""Closed-loop load generator: N robots, each sending its next call when the previous returns.

Always run as its own process, so the server under test never shares an
interpreter (or a GIL) with the client::

    python -m serving.bench.harness --target 127.0.0.1:9000 --workload W1 --concurrency 1,8,32,64 --calls 50

and it prints one JSON line. What the client does per call is the same for every
system: hand the pre-serialised ``ActRequest`` bytes to a generic grpc.aio
unary-unary call (no serialisation on the client), and parse the reply as an
``ActResponse`` whose action tensor must be non-empty. A failed call (any
non-OK status, a timeout, an empty or unparsable reply) is counted as an error,
with its status code, and the robot carries on with its next call.

Each robot has its own channel and TCP connection (a local subchannel pool), as
real robots do. Per concurrency level: a short warm-up (every robot makes a few
untimed calls), then all robots start together and make ``--calls`` timed calls
each; throughput is successful calls / wall time of that phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import grpc

from serving.api import pb
from serving.bench import threadcpu
from serving.bench.workloads import WORKLOADS, build

ACT_METHOD = "/superbrain.v1.PolicyService/Act"
CALL_TIMEOUT_S = 30.0


def _identity(b: bytes) -> bytes:
    return b


@dataclass
class CallOutcome:
    """One call as the robot saw it: latency, the server's batch size, or an error code."""

    latency_ms: float
    batch_size: int = 0
    error_code: str = ""
    error_detail: str = ""


@dataclass
class LevelResult:
    concurrency: int
    calls: int = 0
    ok: int = 0
    errors: int = 0
    error_codes: Counter[str] = field(default_factory=Counter)
    error_sample: str = ""
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    batch_sizes: list[int] = field(default_factory=list, repr=False)
    duration_s: float = 0.0

    def add(self, outcome: CallOutcome) -> None:
        self.calls += 1
        if outcome.error_code:
            self.record_error(outcome.error_code, outcome.error_detail)
        else:
            self.ok += 1
            self.latencies_ms.append(outcome.latency_ms)
            self.batch_sizes.append(outcome.batch_size)

    def record_error(self, code: str, detail: str) -> None:
        self.errors += 1
        self.error_codes[code] += 1
        if not self.error_sample:
            self.error_sample = f"{code}: {detail}"[:300]

    def to_json(self) -> dict[str, object]:
        lat = sorted(self.latencies_ms)
        out: dict[str, object] = {
            "concurrency": self.concurrency,
            "calls": self.calls,
            "ok": self.ok,
            "errors": self.errors,
            "rps": round(self.ok / self.duration_s, 1) if self.duration_s > 0 else 0.0,
            "p50_ms": _pct(lat, 50),
            "p90_ms": _pct(lat, 90),
            "p99_ms": _pct(lat, 99),
            "mean_ms": round(sum(lat) / len(lat), 3) if lat else None,
            "max_ms": round(lat[-1], 3) if lat else None,
            "duration_s": round(self.duration_s, 3),
            # As the server reported it in ActResponse.timing (0 where a server does not fill it).
            "mean_server_batch": round(sum(self.batch_sizes) / len(self.batch_sizes), 2) if self.batch_sizes else 0,
        }
        if self.errors:
            out["error_codes"] = dict(self.error_codes)
            out["error_sample"] = self.error_sample
        return out


def _pct(sorted_values: list[float], p: float) -> float | None:
    """Percentile by linear interpolation between closest ranks (numpy's default)."""
    if not sorted_values:
        return None
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return round(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo), 3)


def _check_reply(reply: bytes) -> int:
    """Parse a reply; returns the server's batch size. Raises ValueError if it is not a usable action chunk."""
    if not reply:
        raise ValueError("empty reply")
    resp = pb.ActResponse.FromString(reply)
    if not resp.actions.data or not resp.actions.shape:
        raise ValueError("reply has no actions")
    return resp.timing.batch_size


class Robot:
    def __init__(self, target: str, request: bytes, metadata: tuple[tuple[str, str], ...]):
        self.channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.use_local_subchannel_pool", 1),  # one connection per robot
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
            ],
        )
        self.call_act = self.channel.unary_unary(ACT_METHOD, request_serializer=None, response_deserializer=_identity)
        self.request = request
        self.metadata = metadata or None

    async def act(self, result: LevelResult | None) -> None:
        outcome = await self.call()
        if result is not None:
            result.add(outcome)

    async def call(self) -> CallOutcome:
        t0 = time.perf_counter()
        try:
            reply = await self.call_act(self.request, timeout=CALL_TIMEOUT_S, metadata=self.metadata)
            batch = _check_reply(reply)
        except grpc.aio.AioRpcError as err:
            return CallOutcome(0.0, error_code=err.code().name, error_detail=err.details() or "")
        except Exception as err:  # a reply that does not parse, or no actions in it
            return CallOutcome(0.0, error_code="BAD_REPLY", error_detail=repr(err))
        return CallOutcome((time.perf_counter() - t0) * 1e3, batch)

    async def close(self) -> None:
        await self.channel.close()


async def run_level(
    target: str, workload: str, concurrency: int, calls: int, warmup: int, metadata: tuple[tuple[str, str], ...]
) -> LevelResult:
    wl = build(workload)
    robots = [Robot(target, wl.request_for(i), metadata) for i in range(concurrency)]
    result = LevelResult(concurrency)
    try:
        # Warm-up: connections up, server-side caches and batchers primed; untimed.
        warm = LevelResult(concurrency)

        async def warm_robot(robot: Robot) -> None:
            for _ in range(warmup):
                await robot.act(warm)

        await asyncio.gather(*(warm_robot(r) for r in robots))
        if warm.ok == 0 and warmup > 0:
            # Nothing works: say why instead of timing errors.
            result.calls = warm.calls
            result.errors = warm.errors
            result.error_codes = warm.error_codes
            result.error_sample = "during warm-up: " + warm.error_sample
            return result

        start = asyncio.Event()

        async def timed_robot(robot: Robot) -> None:
            await start.wait()
            for _ in range(calls):
                await robot.act(result)

        tasks = [asyncio.ensure_future(timed_robot(r)) for r in robots]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        result.duration_s = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(r.close() for r in robots), return_exceptions=True)
    return result


async def run_sweep(
    target: str,
    workload: str,
    levels: list[int],
    calls: int,
    warmup: int,
    metadata: tuple[tuple[str, str], ...] = (),
) -> dict[str, object]:
    out_levels = []
    for c in levels:
        res = await run_level(target, workload, c, calls, warmup, metadata)
        out_levels.append(res.to_json())
    return {"target": target, **build(workload).summary(), "calls_per_robot": calls, "levels": out_levels}


@dataclass
class Phase:
    """One system's turn in an interleaved run: calls that end inside it, after its settle time, count."""

    system: int
    result: LevelResult
    counted_from: float


async def run_interleaved(
    targets: list[dict[str, Any]],
    workload: str,
    concurrency: int,
    phase_s: float,
    cycles: int,
    settle_s: float,
    pids: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """Continuous closed-loop load that switches between systems every ``phase_s``.

    Every robot holds a connection to every system and always calls the system
    whose turn it is. Each cycle gives every system one turn, in reversed order
    every other cycle, so turn i of two systems are adjacent seconds: a ratio per
    cycle sees the same machine, and the machine's drift cancels. A call counts
    for a turn if it was sent to that turn's system and ended in the turn, after
    ``settle_s`` (the previous system's last calls are still draining then).
    With ``pids`` (system name -> its process ids), each counted turn also
    measures every thread's CPU per call (serving.bench.threadcpu).
    """
    wl = build(workload)
    owners = {pid: name for name, ids in (pids or {}).items() for pid in ids}
    owners[os.getpid()] = threadcpu.LOAD_GENERATOR
    thread_cpu = threadcpu.ThreadCpu() if pids else None
    robots = [
        [Robot(t["target"], wl.request_for(i), tuple(tuple(kv) for kv in t.get("metadata", ()))) for t in targets]
        for i in range(concurrency)
    ]
    phase = Phase(0, LevelResult(concurrency), counted_from=float("inf"))
    stopping = False

    async def robot_loop(mine: list[Robot]) -> None:
        while not stopping:
            current = phase
            outcome = await mine[current.system].call()
            if current is phase and time.perf_counter() >= current.counted_from:
                current.result.add(outcome)

    async def take_turn(system: int, counted: bool) -> Phase:
        nonlocal phase
        start = time.perf_counter()
        phase = Phase(system, LevelResult(concurrency), start + settle_s if counted else float("inf"))
        current = phase
        if counted and thread_cpu is not None:
            await asyncio.sleep(settle_s)
            before, calls_before, since = threadcpu.snapshot(owners), current.result.calls, time.perf_counter()
            await asyncio.sleep(max(0.0, start + phase_s - time.perf_counter()))
            after = threadcpu.snapshot(owners)
            calls = current.result.calls - calls_before
            thread_cpu.add_turn(targets[system]["name"], before, after, calls, time.perf_counter() - since)
        else:
            await asyncio.sleep(phase_s)
        current.result.duration_s = time.perf_counter() - current.counted_from if counted else 0.0
        return current

    rounds: list[list[dict[str, object]]] = [[] for _ in targets]
    tasks = [asyncio.ensure_future(robot_loop(mine)) for mine in robots]
    try:
        for system in range(len(targets)):  # warm-up turn: connections up, caches and leases primed
            await take_turn(system, counted=False)
        for cycle in range(cycles):
            order = range(len(targets)) if cycle % 2 == 0 else reversed(range(len(targets)))
            for system in order:
                done = await take_turn(system, counted=True)
                rounds[system].append(done.result.to_json())
    finally:
        stopping = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(r.close() for mine in robots for r in mine), return_exceptions=True)
    return {
        **wl.summary(),
        "interleave": {"concurrency": concurrency, "phase_s": phase_s, "settle_s": settle_s, "cycles": cycles},
        "systems": {t["name"]: {"target": t["target"], "rounds": rounds[i]} for i, t in enumerate(targets)},
        "thread_cpu": thread_cpu.report() if thread_cpu is not None else None,
    }


def parse_levels(text: str) -> list[int]:
    levels = [int(x) for x in text.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency: a comma-separated list of positive integers")
    return levels


def parse_metadata(items: list[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--metadata {item!r}: expected key=value")
        pairs.append((key.lower(), value))
    return tuple(pairs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.bench.harness", description=__doc__.split("\n")[0])
    p.add_argument("--target", help="HOST:PORT of the server under test")
    p.add_argument(
        "--interleave",
        action="store_true",
        help='switch one continuous load between systems; reads {"targets": [{"name", "target", "metadata"}]} '
        "as JSON on stdin (keys stay off the command line) and loads at the first --concurrency level",
    )
    p.add_argument("--phase-s", type=float, default=2.0, help="--interleave: seconds per system turn")
    p.add_argument("--cycles", type=int, default=20, help="--interleave: turns per system")
    p.add_argument("--settle-s", type=float, default=0.25, help="--interleave: uncounted start of every turn")
    p.add_argument("--workload", choices=WORKLOADS, default="W1")
    p.add_argument("--concurrency", type=parse_levels, default=parse_levels("1,8,32,64"))
    p.add_argument("--calls", type=int, default=50, help="timed calls per robot per level")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per robot before each level")
    p.add_argument("--metadata", action="append", default=[], help="key=value sent with every call (repeatable)")
    args = p.parse_args(argv)
    build(args.workload)  # before any timing
    if args.interleave:
        plan = json.loads(sys.stdin.read())
        interleaved = run_interleaved(
            plan["targets"],
            args.workload,
            args.concurrency[0],
            args.phase_s,
            args.cycles,
            args.settle_s,
            plan.get("pids"),
        )
        print(json.dumps(asyncio.run(interleaved)), flush=True)
        return 0
    if not args.target:
        p.error("--target is required (or --interleave with targets on stdin)")
    metadata = parse_metadata(args.metadata)
    api_key = os.environ.get("SUPERBRAIN_API_KEY")
    if api_key:
        metadata += (("authorization", f"Bearer {api_key}"),)
    report = asyncio.run(run_sweep(args.target, args.workload, args.concurrency, args.calls, args.warmup, metadata))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
