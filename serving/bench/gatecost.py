"""What the partner gate costs the request loop per call, with caches warm and evicted.

    python -m serving.bench.gatecost [--batches 300] [--evict-mb 12] [--json]

Live in W1, every Python step on the replica's request loop costs five to ten
times its tight-loop time: between two calls the 150 KB frames of the others
(and the load generator next door) push the gate's code and objects out of the
caches. A tight loop cannot see that; a 12-minute W1 run resolves only about
2 %. This runs the real gate (SQLite ledger, spool, leases from an in-process
coordinator) on made-up calls and, with ``--evict-mb``, copies that many MB
between calls first. Calibration (docs/benchmarks.md): with 8 to 16 MB evicted
(this VM's L3 is 32 MB, shared), the steps cost about what they cost live, so
a change to the gate can be judged here in seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from serving.api import pb
from serving.engine import Outcome, Pending
from serving.policy.base import PolicyObservation
from serving.quota.gate import AccessGate, KeyCache
from serving.quota.keys import new_key
from serving.quota.leases import LocalCoordinator, QuotaBook, ReplicaQuota
from serving.quota.model import Plan, Tenant
from serving.quota.spool import UsageSpool
from serving.quota.store import open_store

MODEL = "noop"
UNLIMITED = Plan(rate_per_s=1e9, burst=10**9)
STEPS = ("key_pass", "pending", "admit_batch", "record_batch")


async def _gate(workdir: Path) -> tuple[AccessGate, str]:
    url = f"sqlite:///{workdir}/ledger.db"
    with open_store(url) as store:
        store.create_tenant(Tenant("bench", UNLIMITED))
        key, record = new_key("bench")
        store.add_key(record)
    book = QuotaBook()
    book.set_plans({"bench": UNLIMITED})
    gate = AccessGate(
        KeyCache(url, refresh_s=3600), ReplicaQuota(LocalCoordinator(book, "r0")), UsageSpool(workdir / "spool", url)
    )
    await gate.start()
    return gate, key


async def measure(batches: int, batch_size: int, evict_mb: int) -> dict[str, float]:
    """Microseconds per call of each step, over ``batches`` batches of ``batch_size`` calls."""
    with tempfile.TemporaryDirectory() as tmp:
        gate, key = await _gate(Path(tmp))
        try:
            key_pass = await gate.verify((("authorization", f"Bearer {key}"),))
            await gate.admit(key_pass.caller)  # leases the first slice
            requests = [
                pb.ActRequest(
                    request_id=f"req-{i:08d}", observation=pb.Observation(robot_id=f"robot-{i}", embodiment="arm")
                )
                for i in range(64)
            ]
            observations = [
                PolicyObservation("arm", {}, np.zeros(3, np.float32), robot_id=f"robot-{i}") for i in range(64)
            ]
            src = np.ones(evict_mb << 20, np.uint8)
            dst = np.empty_like(src)
            actions = np.zeros((8, 7), np.float32)
            spent = dict.fromkeys(STEPS, 0)
            for b in range(batches):
                items = []
                for i in range(batch_size):
                    np.copyto(dst, src)  # what the other calls do to the caches in between
                    n = (b * batch_size + i) % len(requests)
                    request = requests[n]
                    # A fresh header string per call, as grpc hands it over.
                    metadata = (("user-agent", "grpc-python"), ("authorization", "".join(["Bearer ", key])))
                    t0 = time.perf_counter_ns()
                    p = gate.key_pass(metadata)
                    t1 = time.perf_counter_ns()
                    # What the ingress adds to the Pending it makes for the call with auth on.
                    item = Pending(observations[n], deadline=0.0, received=0.0, key=p, request_id=request.request_id)
                    t2 = time.perf_counter_ns()
                    spent["key_pass"] += t1 - t0
                    spent["pending"] += t2 - t1
                    items.append(item)
                outcomes = [Outcome(actions, queue_ms=1.0, compute_ms=2.0, batch_size=batch_size) for _ in items]
                np.copyto(dst, src)
                t0 = time.perf_counter_ns()
                dry = gate.admit_batch(items)
                t1 = time.perf_counter_ns()
                gate.record_batch(items, outcomes, MODEL)
                spent["admit_batch"] += t1 - t0
                spent["record_batch"] += time.perf_counter_ns() - t1
                for _ in dry:  # the slice ran dry: refill it the slow way, outside the timing
                    await gate.admit(key_pass.caller)
            calls = batches * batch_size
            return {step: round(ns / calls / 1e3, 2) for step, ns in spent.items()}
        finally:
            await gate.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-sizes", default="6,24", help="W1 batches hold about 6 calls")
    parser.add_argument("--evict-mb", type=int, default=12, help="MB copied between calls (0: warm caches)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    for evict in sorted({0, args.evict_mb}):
        for size in (int(s) for s in args.batch_sizes.split(",")):
            label = f"batch {size}, {'warm' if evict == 0 else f'{evict} MB evicted'}"
            results[label] = asyncio.run(measure(args.batches, size, evict))
            print(f"{label:28s} " + "  ".join(f"{s} {results[label][s]:6.2f}" for s in STEPS) + "  (us per call)")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
