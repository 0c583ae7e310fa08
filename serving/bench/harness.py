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

import grpc

from serving.api import pb
from serving.bench.workloads import WORKLOADS, build

ACT_METHOD = "/superbrain.v1.PolicyService/Act"
CALL_TIMEOUT_S = 30.0


def _identity(b: bytes) -> bytes:
    return b


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
        self.call = self.channel.unary_unary(ACT_METHOD, request_serializer=None, response_deserializer=_identity)
        self.request = request
        self.metadata = metadata or None

    async def act(self, result: LevelResult | None) -> None:
        t0 = time.perf_counter()
        try:
            reply = await self.call(self.request, timeout=CALL_TIMEOUT_S, metadata=self.metadata)
            batch = _check_reply(reply)
        except grpc.aio.AioRpcError as err:
            if result is not None:
                result.calls += 1
                result.record_error(err.code().name, err.details() or "")
            return
        except Exception as err:  # a reply that does not parse, or no actions in it
            if result is not None:
                result.calls += 1
                result.record_error("BAD_REPLY", repr(err))
            return
        if result is not None:
            result.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            result.calls += 1
            result.ok += 1
            result.batch_sizes.append(batch)

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
    p.add_argument("--target", required=True, help="HOST:PORT of the server under test")
    p.add_argument("--workload", choices=WORKLOADS, default="W1")
    p.add_argument("--concurrency", type=parse_levels, default=parse_levels("1,8,32,64"))
    p.add_argument("--calls", type=int, default=50, help="timed calls per robot per level")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per robot before each level")
    p.add_argument("--metadata", action="append", default=[], help="key=value sent with every call (repeatable)")
    args = p.parse_args(argv)
    build(args.workload)  # before any timing
    metadata = parse_metadata(args.metadata)
    api_key = os.environ.get("SUPERBRAIN_API_KEY")
    if api_key:
        metadata += (("authorization", f"Bearer {api_key}"),)
    report = asyncio.run(run_sweep(args.target, args.workload, args.concurrency, args.calls, args.warmup, metadata))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
