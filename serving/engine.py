"""Runs batches through a Policy: deadlines, error isolation, timing (no Ray).

A batcher (``CapacityBatcher`` by default, or Ray Serve's ``@serve.batch``)
feeds ``PolicyEngine.run_batch``. Either way a batch is a list of
``Pending`` requests that were already validated by the codec, and the result is
one ``Outcome`` per request, in order, so every chunk returns to the robot that
asked for it.

Pipelining (``PolicyEngine(pipeline=True)``): a batch goes through two stages,
each on its own thread: *preprocess* (``policy.preprocess``) and *forward*
(``policy.forward`` + ``policy.postprocess``). While batch N is in the forward
stage, batch N+1 is being preprocessed, so an accelerator does not sit idle
while the host uploads and resizes the next batch's frames. Stages are FIFO:
batches leave in the order they came. ``CapacityBatcher(max_inflight=2)`` feeds
the second batch. The engine also counts how long the forward stage held a
batch (``busy_seconds``; the ``superbrain_forward_busy_seconds`` metric): over
wall time at saturation that is the accelerator's busy fraction.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np

from serving import metrics as m
from serving.errors import RequestError, deadline_exceeded
from serving.policy.base import Policy, PolicyObservation

if TYPE_CHECKING:
    from serving.quota.gate import KeyPass

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    """A validated request waiting for a batch. Times are ``time.monotonic()``."""

    observation: PolicyObservation
    deadline: float
    received: float = field(default_factory=time.monotonic)
    # Set when the caller has gone (cancelled, or its RPC ended): never compute for it.
    cancelled: bool = False
    # The partner gate's part (auth on; None and unused with auth off): the verified key
    # the call came with (serving.quota.gate.KeyPass) and its request id. The gate's
    # batch hook (AccessGate.metering) admits the calls of a batch (a quota token
    # each: ``admitted``) before it runs and meters them after (``metered``); the
    # ingress meters an admitted call that never got a batch result. Both run on the
    # event loop, so there is no race, and no call is metered twice.
    key: KeyPass | None = None
    request_id: str = ""
    admitted: bool = False
    metered: bool = False


@dataclass
class Outcome:
    actions: np.ndarray | None = None
    error: RequestError | None = None
    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0


#: What a batch hook answers for a call it would not run (the partner gate: no quota token
#: on this replica just now). The ingress deals with the call itself and may submit it again.
NOT_ADMITTED = Outcome()

Submit = Callable[[Pending], Awaitable[Outcome]]


def default_pipeline(device: str) -> bool:
    """Whether to overlap preprocessing with the forward pass on ``device`` (the "auto" setting).

    On an accelerator, yes: preprocessing is host work plus uploads and kernels
    on a second stream, and the forward pass is device work, so running both at
    once keeps the device fed (issue 5: the busy fraction). On a CPU, no: both
    stages compute on the same cores (torch's intra-op threads already use
    them), so overlap adds no compute, only a thread hand-off per batch and two
    batches' data competing for the caches (``superbrain bench --workload W2
    --device cpu`` measures both modes; docs/benchmarks.md has the figures).
    """
    return device.split(":")[0] != "cpu"


def resolve_pipeline(setting: str, device: str) -> bool:
    """The ``pipeline`` setting ("auto", "on", "off") for a replica on ``device``."""
    if setting == "auto":
        return default_pipeline(device)
    if setting in ("on", "off"):
        return setting == "on"
    raise ValueError(f"pipeline must be 'auto', 'on' or 'off', not {setting!r}")


#: Per-observation results of a batch: a chunk, or the error that request gets.
_Results = list[np.ndarray | RequestError]


class PolicyEngine:
    """Turns a list of pending requests into outcomes with one policy call.

    Requests whose caller is gone or whose deadline has passed are left out of the
    batch. If the policy raises on a batch, each request is retried alone so that
    one poisonous observation fails only itself.

    ``pipeline`` (compute-bound policies that do not override ``infer``):
    preprocess on one thread, forward + postprocess on another, so two batches
    overlap (module docstring). Off, one thread runs the whole batch, as
    ``Policy.infer`` would.
    """

    def __init__(self, policy: Policy, *, offload: bool | None = None, pipeline: bool = False):
        self.policy = policy
        self._model_label = (policy.name,)
        # Compute-bound policies run on one dedicated thread so the event loop keeps
        # accepting requests (and forming the next batch) while a forward pass runs.
        self._offload = getattr(policy, "compute_bound", True) if offload is None else offload
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy") if self._offload else None
        )
        # Stage by stage only when infer is the base class's preprocess -> forward -> postprocess;
        # a policy that overrides infer gets called through it (and its whole infer counts as busy).
        self._staged = type(policy).infer is Policy.infer
        #: Two stages need a thread each and a policy split into stages: one that runs inline,
        #: or that overrides infer, has nothing the engine could overlap.
        self.pipeline = bool(pipeline) and self._offload and self._staged
        self._pre_executor = (
            concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="preprocess")
            if self.pipeline
            else None
        )
        #: Seconds the forward stage has held a batch (forward + postprocess), and the batches and
        #: requests run, since start (the metrics carry the same; these are for in-process readers).
        self.busy_seconds = 0.0
        self.batches = 0
        self.requests = 0

    @property
    def max_inflight_batches(self) -> int:
        """How many batches a batcher should hand over at once: one per stage."""
        return 2 if self.pipeline else 1

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
        if self.pipeline:
            results, compute_s, busy_s = await self._pipelined_isolated(observations)
        else:
            if self._executor is not None:
                loop = asyncio.get_running_loop()
                results, busy_s = await loop.run_in_executor(self._executor, self._infer_isolated, observations)
            else:
                results, busy_s = self._infer_isolated(observations)
            compute_s = time.monotonic() - start
        self.busy_seconds += busy_s
        self.batches += 1
        self.requests += len(live)
        compute_ms = compute_s * 1e3
        m.METRICS.observe(m.COMPUTE_DURATION, label, compute_s)
        m.METRICS.observe(m.BATCH_SIZE, label, len(live))
        m.METRICS.inc(m.FORWARD_BUSY_SECONDS, label, busy_s)
        for i, result in zip(live, results, strict=True):
            out = outcomes[i]
            out.compute_ms, out.batch_size = compute_ms, len(live)
            if isinstance(result, RequestError):
                out.error = result
            else:
                out.actions = result
        return outcomes

    # -- one thread: the whole batch ------------------------------------------------------------

    def _infer_isolated(self, observations: list[PolicyObservation]) -> tuple[_Results, float]:
        """Results for ``observations`` and the forward-stage seconds spent, retrying one by one on failure."""
        busy = [0.0]
        try:
            return self._checked(observations, self._infer(observations, busy)), busy[0]
        except Exception:
            if len(observations) == 1:
                log.exception("policy failed on embodiment %s", observations[0].embodiment)
                return [_internal_error()], busy[0]
            log.warning("policy failed on a batch of %d; retrying one by one", len(observations))
            results: _Results = []
            for obs in observations:
                result, seconds = self._infer_isolated([obs])
                results.append(result[0])
                busy[0] += seconds
            return results, busy[0]

    def _infer(self, observations: list[PolicyObservation], busy: list[float]) -> list[np.ndarray]:
        if not self._staged:
            t0 = time.perf_counter()
            try:
                return self.policy.infer(observations)
            finally:
                busy[0] += time.perf_counter() - t0
        return self._forward_stage(self.policy.preprocess(observations), observations, busy)

    def _forward_stage(self, batch: object, observations: list[PolicyObservation], busy: list[float]) -> list:
        """forward + postprocess of one preprocessed batch, timed.

        Both count as busy: on an accelerator ``forward`` only queues kernels, and
        the host learns they have finished in ``postprocess``'s copy to the host.
        ``batch`` stays referenced until then (device memory it owns is still read).
        """
        t0 = time.perf_counter()
        try:
            return self.policy.postprocess(self.policy.forward(batch), observations)
        finally:
            busy[0] += time.perf_counter() - t0

    # -- two threads: preprocess, then forward --------------------------------------------------

    async def _pipelined_isolated(self, observations: list[PolicyObservation]) -> tuple[_Results, float, float]:
        """Results, compute seconds (both stages' own time) and forward-stage seconds; one by one on failure."""
        timing = [0.0, 0.0]  # [preprocess seconds, forward-stage seconds]
        try:
            assert self._pre_executor is not None
            queued = await asyncio.wrap_future(self._pre_executor.submit(self._preprocess_stage, observations, timing))
            results = await asyncio.wrap_future(queued)
            return self._checked(observations, results), timing[0] + timing[1], timing[1]
        except Exception:
            if len(observations) == 1:
                log.exception("policy failed on embodiment %s", observations[0].embodiment)
                return [_internal_error()], timing[0] + timing[1], timing[1]
            log.warning("policy failed on a batch of %d; retrying one by one", len(observations))
            # The singles go through the same two stages (each method stays on its own thread).
            parts = await asyncio.gather(*(self._pipelined_isolated([obs]) for obs in observations))
            compute = timing[0] + timing[1] + sum(p[1] for p in parts)
            return [p[0][0] for p in parts], compute, timing[1] + sum(p[2] for p in parts)

    def _preprocess_stage(
        self, observations: list[PolicyObservation], timing: list[float]
    ) -> concurrent.futures.Future[list]:
        """On the preprocess thread: preprocess, then queue the forward stage.

        Queuing from here (not from the event loop) makes the forward stage take
        batches in exactly the order they were preprocessed.
        """
        t0 = time.perf_counter()
        try:
            batch = self.policy.preprocess(observations)
        finally:
            timing[0] += time.perf_counter() - t0
        assert self._executor is not None
        busy = [0.0]

        def forward() -> list:
            try:
                return self._forward_stage(batch, observations, busy)
            finally:
                timing[1] += busy[0]

        return self._executor.submit(forward)

    def _checked(self, observations: list[PolicyObservation], results: list[np.ndarray]) -> _Results:
        if len(results) != len(observations):
            raise RuntimeError(f"policy returned {len(results)} chunks for {len(observations)} observations")
        specs = self.policy.embodiments
        checked: _Results = []
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
        for executor in (self._pre_executor, self._executor):
            if executor is not None:
                executor.shutdown(wait=True)


def _internal_error() -> RequestError:
    return RequestError(grpc.StatusCode.INTERNAL, "the policy failed on this observation")


class CapacityBatcher:
    """Capacity-aware batching: the next batch is formed only when the policy is free.

    While a batch computes, new requests queue up; when it finishes, everything
    queued (up to ``max_batch_size``) goes at once, so batches grow with load.
    Only when the batcher was idle, and the last batch showed that robots arrive
    together (more than one request), does it wait up to ``wait_s`` after the
    first request for others to join: a lone robot never pays the wait. (``@serve.batch`` instead forms batches eagerly
    and parks them behind its concurrency semaphore, so under load it runs many
    small batches back to back: docs/benchmarks.md has the figures.)

    ``max_inflight`` > 1 is for a pipelined engine (``PolicyEngine.max_inflight_batches``):
    a second batch may start while one computes, but only a *full* one. A
    partial batch waits until the pipeline is empty, as with one stage, so
    pipelining never splits the load into smaller batches than it would
    otherwise run; it only helps when requests are queued beyond a batch, i.e.
    at saturation, which is where the accelerator's idle gaps cost throughput.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Pending]], Awaitable[list[Outcome]]],
        max_batch_size: int,
        wait_s: float,
        *,
        max_inflight: int = 1,
    ):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be at least 1, got {max_inflight}")
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.max_inflight = max_inflight
        self._pending: collections.deque[tuple[Pending, asyncio.Future[Outcome]]] = collections.deque()
        #: Set on every arrival and every finished batch; the loop re-checks its conditions.
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: set[asyncio.Task[None]] = set()

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
        last_size = 1
        while True:
            while len(self._inflight) >= self.max_inflight:
                await self._changed(arrived)
            idle = not self._pending and not self._inflight
            while not self._pending:
                await self._changed(arrived)
            # A second batch only when it is full; otherwise wait for the pipeline to drain.
            while self._inflight and len(self._pending) < self.max_batch_size:
                await self._changed(arrived)
            if idle and last_size > 1:
                await self._gather_stragglers(arrived)
            n = last_size = min(len(self._pending), self.max_batch_size)
            batch = [self._pending.popleft() for _ in range(n)]
            if self.max_inflight == 1:
                await self._run(batch)  # inline: no task per batch on the single-stage path
            else:
                task = asyncio.get_running_loop().create_task(self._run(batch))
                self._inflight.add(task)
                task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        if self._arrived is not None:
            self._arrived.set()

    @staticmethod
    async def _changed(event: asyncio.Event) -> None:
        event.clear()
        await event.wait()

    async def _run(self, batch: list[tuple[Pending, asyncio.Future[Outcome]]]) -> None:
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
        for task in list(self._inflight):
            task.cancel()
