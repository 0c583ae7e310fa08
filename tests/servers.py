"""Run the real ingress (grpc.aio + CapacityBatcher, no Ray) on a loopback port in a background thread."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Awaitable, Callable

from serving.access_log import AccessLog
from serving.engine import CapacityBatcher, PolicyEngine
from serving.ingress import GrpcFrontend, IngressLimits, PolicyServicer
from serving.policy.base import Policy
from serving.quota.gate import AccessGate


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class IngressThread:
    def __init__(
        self,
        policy: Policy,
        *,
        max_batch_size: int = 8,
        wait_s: float = 0.005,
        limits: IngressLimits | None = None,
        max_message_bytes: int = 4 << 20,
        gate: Callable[[], Awaitable[AccessGate]] | None = None,
        access_log: AccessLog | None = None,
    ):
        self.access_log = access_log
        self.policy = policy
        self.engine = PolicyEngine(policy)
        self.batcher = CapacityBatcher(self._run_batch, max_batch_size, wait_s)
        self.limits = limits
        self.max_message_bytes = max_message_bytes
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.frontend: GrpcFrontend | None = None
        self._make_gate = gate
        self.gate: AccessGate | None = None

    async def _run_batch(self, items):
        # As in the replica: with a gate, the batch is metered before its answers leave.
        run = self.gate.metering(self.engine.run_batch, self.policy.name) if self.gate else self.engine.run_batch
        return await run(items)

    def __enter__(self) -> IngressThread:
        self.thread.start()

        async def start() -> GrpcFrontend:
            self.gate = await self._make_gate() if self._make_gate else None
            servicer = PolicyServicer(
                self.policy,
                self.batcher,
                self.limits,
                max_batch_size=self.batcher.max_batch_size,
                gate=self.gate,
                access_log=self.access_log,
            )
            frontend = GrpcFrontend(servicer, "127.0.0.1", 0, self.max_message_bytes)
            await frontend.start()
            return frontend

        self.frontend = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        return self

    @property
    def address(self) -> str:
        assert self.frontend is not None
        return f"127.0.0.1:{self.frontend.port}"

    def stop(self, grace_s: float = 1.0) -> None:
        if self.frontend is not None:
            asyncio.run_coroutine_threadsafe(self.frontend.stop(grace_s), self.loop).result(grace_s + 10)
            self.frontend = None

    def run(self, coro, timeout: float = 30):
        """Run a coroutine on the server's loop (e.g. to inspect the gate) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self.gate is not None:
            self.run(self.gate.close())
        self.batcher.close()
        self.engine.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
