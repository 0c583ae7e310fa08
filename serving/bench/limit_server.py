"""The "limit": a plain grpc.aio server with in-process batching and nothing else.

No Ray, no validation, no admission control, no metrics: parse the request,
``np.frombuffer`` the frame, build the ``PolicyObservation`` directly, batch,
``policy.infer``, encode the chunk. It is the ceiling the Superbrain stack is
measured against (DESIGN.md's "plain grpc.aio server, in-process batching")::

    python -m serving.bench.limit_server --port 50051 --policy noop

The batcher batches the way Superbrain's default one does, with the same
defaults (``ServingConfig``): one batch computes at a time; when it finishes,
everything that queued meanwhile (up to ``max_batch_size``) forms the next batch
at once, and only a request arriving at an idle server waits up to
``batch_wait_ms`` for others to join. Compute-bound policies run on one worker
thread (as in ``serving.engine``) so the loop keeps receiving while a forward
pass runs; trivial ones (``compute_bound = False``) run inline.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import signal
import sys
import time

import grpc
import numpy as np

from serving.api import pb, pb_grpc
from serving.bench.workloads import decode_fast
from serving.codec import numpy_to_tensor
from serving.config import ServingConfig
from serving.policy.base import Policy, PolicyObservation

_DEFAULTS = ServingConfig()


class SimpleBatcher:
    """Queue + one consumer task; waits up to ``wait_s`` for stragglers only when coming out of idle."""

    def __init__(self, policy: Policy, max_batch_size: int, wait_s: float):
        self.policy = policy
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.queue: asyncio.Queue[tuple[PolicyObservation, asyncio.Future]] = asyncio.Queue()
        self.executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
            if getattr(policy, "compute_bound", True)
            else None
        )
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, obs: PolicyObservation) -> tuple[np.ndarray, int]:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((obs, fut))
        return await fut

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        q = self.queue
        backlog = False  # did requests queue up while the previous batch computed?
        while True:
            batch = [await q.get()]
            if not backlog:
                # Coming out of idle: give other robots up to wait_s to join.
                deadline = loop.time() + self.wait_s
                while len(batch) < self.max_batch_size:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(q.get(), remaining))
                    except asyncio.TimeoutError:
                        break
            while len(batch) < self.max_batch_size and not q.empty():
                batch.append(q.get_nowait())
            observations = [obs for obs, _ in batch]
            try:
                if self.executor is not None:
                    results = await loop.run_in_executor(self.executor, self.policy.infer, observations)
                else:
                    results = self.policy.infer(observations)
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                backlog = not q.empty()
                continue
            n = len(batch)
            for (_, fut), actions in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result((actions, n))
            backlog = not q.empty()


class LimitServicer(pb_grpc.PolicyServiceServicer):
    def __init__(self, batcher: SimpleBatcher):
        self.batcher = batcher

    async def Act(self, request: pb.ActRequest, context: grpc.aio.ServicerContext) -> pb.ActResponse:
        received = time.perf_counter()
        actions, batch_size = await self.batcher.submit(decode_fast(request))
        resp = pb.ActResponse(request_id=request.request_id, step=request.observation.step)
        numpy_to_tensor(actions, resp.actions)
        resp.timing.batch_size = batch_size
        resp.timing.total_ms = (time.perf_counter() - received) * 1e3
        return resp


async def start_server(
    host: str, port: int, policy_spec: str, max_batch_size: int, wait_ms: float
) -> tuple[grpc.aio.Server, SimpleBatcher, int]:
    """Load the policy and start the server on the running loop; returns (server, batcher, bound port)."""
    from serving.policy.loader import load_policy

    policy = load_policy(policy_spec, seed=0)
    policy.setup("cpu")
    batcher = SimpleBatcher(policy, max_batch_size, wait_ms / 1e3)
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    pb_grpc.add_PolicyServiceServicer_to_server(LimitServicer(batcher), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind {host}:{port}")
    await server.start()
    return server, batcher, bound


async def stop_server(server: grpc.aio.Server, batcher: SimpleBatcher) -> None:
    await server.stop(1.0)
    batcher.task.cancel()
    if batcher.executor is not None:
        batcher.executor.shutdown(wait=True)


async def serve(host: str, port: int, policy_spec: str, max_batch_size: int, wait_ms: float) -> None:
    server, batcher, bound = await start_server(host, port, policy_spec, max_batch_size, wait_ms)
    print(f"limit server ({policy_spec}) listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await stop_server(server, batcher)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serving.bench.limit_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--policy", default="noop", help="'noop', 'default' or 'module:Class'")
    p.add_argument("--max-batch-size", type=int, default=_DEFAULTS.max_batch_size)
    p.add_argument("--batch-wait-ms", type=float, default=_DEFAULTS.batch_wait_timeout_ms)
    args = p.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.policy, args.max_batch_size, args.batch_wait_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
