"""Runs batches through a Policy: deadlines, error isolation, timing (no Ray).

A batcher (``CapacityBatcher`` by default, or Ray Serve's ``@serve.batch``)
feeds ``PolicyEngine.run_batch``. Either way a batch is a list of
``Pending`` requests that were already validated by the codec, and the result is
one ``Outcome`` per request, in order, so every chunk returns to the robot that
asked for it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from serving import metrics as m
from serving.errors import RequestError, deadline_exceeded
from serving.policy.base import Policy, PolicyObservation

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    """A validated request waiting for a batch. Times are ``time.monotonic()``."""

    observation: PolicyObservation
    deadline: float
    received: float = field(default_factory=time.monotonic)
    # Set when the caller has gone (cancelled, or its RPC ended): never compute for it.
    cancelled: bool = False
    # The partner gate's usage stub for an admitted call (None with auth off); the
    # gate meters the whole batch from it (serving.quota.gate.AccessGate.metering).
    usage: Any = None


@dataclass
class Outcome:
    actions: np.ndarray | None = None
    error: RequestError | None = None
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0


Submit = Callable[[Pending], Awaitable[Outcome]]


class PolicyEngine:
    """Turns a list of pending requests into outcomes with one policy call.

    Requests whose caller is gone or whose deadline has passed are left out of the
    batch. If the policy raises on a batch, each request is retried alone so that
    one poisonous observation fails only itself.
    """

    def __init__(self, policy: Policy, *, offload: bool | None = None):
        self.policy = policy
        self._model_label = (policy.name,)
        # Compute-bound policies run on one dedicated thread so the event loop keeps
        # accepting requests (and forming the next batch) while a forward pass runs.
        self._offload = getattr(policy, "compute_bound", True) if offload is None else offload
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy") if self._offload else None
        )

    async def run_batch(self, items: list[Pending]) -> list[Outcome]:
        start = time.monotonic()
        outcomes: list[Outcome] = [Outcome() for _ in items]
        live: list[int] = []
        label = self._model_label
        for i, item in enumerate(items):
            queued_s = start - item.received
            outcomes[i].queue_ms = queued_s * 1e3
            m.METRICS.observe(m.QUEUE_DURATION, label, queued_s)
            if item.cancelled or item.deadline <= start:
                outcomes[i].error = deadline_exceeded()
            else:
                live.append(i)
        if not live:
            return outcomes

        observations = [items[i].observation for i in live]
        if self._executor is not None:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._executor, self._infer_isolated, observations)
        else:
            results = self._infer_isolated(observations)
        compute_s = time.monotonic() - start
        compute_ms = compute_s * 1e3
        m.METRICS.observe(m.COMPUTE_DURATION, label, compute_s)
        m.METRICS.observe(m.BATCH_SIZE, label, len(live))
        for i, result in zip(live, results, strict=True):
            out = outcomes[i]
            out.compute_ms, out.batch_size = compute_ms, len(live)
            if isinstance(result, RequestError):
                out.error = result
            else:
                out.actions = result
        return outcomes

    def _infer_isolated(self, observations: list[PolicyObservation]) -> list[np.ndarray | RequestError]:
        try:
            return self._checked(observations, self.policy.infer(observations))
        except Exception:
            if len(observations) == 1:
                log.exception("policy failed on embodiment %s", observations[0].embodiment)
                return [RequestError(grpc.StatusCode.INTERNAL, "the policy failed on this observation")]
            log.warning("policy failed on a batch of %d; retrying one by one", len(observations))
            return [self._infer_isolated([obs])[0] for obs in observations]

    def _checked(
        self, observations: list[PolicyObservation], results: list[np.ndarray]
    ) -> list[np.ndarray | RequestError]:
        if len(results) != len(observations):
            raise RuntimeError(f"policy returned {len(results)} chunks for {len(observations)} observations")
        specs = self.policy.embodiments
        checked: list[np.ndarray | RequestError] = []
        for obs, actions in zip(observations, results, strict=True):
            spec = specs[obs.embodiment]
            actions = np.asarray(actions, dtype=np.float32)
            if actions.shape != (spec.chunk_length, spec.action_dim) or not np.isfinite(actions).all():
                raise RuntimeError(
                    f"policy returned a bad chunk {actions.shape} for {spec.name} "
                    f"(expected ({spec.chunk_length}, {spec.action_dim}), finite)"
                )
            checked.append(actions)
        return checked

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)


class CapacityBatcher:
    """Capacity-aware batching: the next batch is formed only when the policy is free.

    While a batch computes, new requests queue up; when it finishes, everything
    queued (up to ``max_batch_size``) goes at once, so batches grow with load.
    Only when the batcher was idle, and the last batch showed that robots arrive
    together (more than one request), does it wait up to ``wait_s`` after the
    first request for others to join: a lone robot never pays the wait. (``@serve.batch`` instead forms batches eagerly
    and parks them behind its concurrency semaphore, so under load it runs many
    small batches back to back: docs/benchmarks.md has the figures.)
    """

    def __init__(
        self, run_batch: Callable[[list[Pending]], Awaitable[list[Outcome]]], max_batch_size: int, wait_s: float
    ):
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self._pending: collections.deque[tuple[Pending, asyncio.Future[Outcome]]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, item: Pending) -> Outcome:
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._arrived = asyncio.Event()
            self._task = loop.create_task(self._loop())
        fut: asyncio.Future[Outcome] = loop.create_future()
        self._pending.append((item, fut))
        assert self._arrived is not None
        self._arrived.set()
        return await fut

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def _loop(self) -> None:
        assert self._arrived is not None
        arrived = self._arrived
        idle, last_size = True, 1
        while True:
            if not self._pending:
                arrived.clear()
                await arrived.wait()
            if idle and last_size > 1:
                await self._gather_stragglers(arrived)
            n = last_size = min(len(self._pending), self.max_batch_size)
            batch = [self._pending.popleft() for _ in range(n)]
            try:
                outcomes = await self._run_batch([item for item, _ in batch])
                for (_, fut), outcome in zip(batch, outcomes, strict=True):
                    if not fut.done():
                        fut.set_result(outcome)
            except Exception as exc:  # run_batch isolates policy errors; this is a bug guard
                log.exception("batch failed")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
            # Requests that queued while this batch ran have waited long enough.
            idle = not self._pending

    async def _gather_stragglers(self, arrived: asyncio.Event) -> None:
        deadline = time.monotonic() + self.wait_s
        while len(self._pending) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            arrived.clear()
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
