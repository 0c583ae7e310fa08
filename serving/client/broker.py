"""Action-chunk brokers: one action per control tick, the next chunk fetched early enough.

A policy returns a chunk of ``horizon`` actions per observation. A control loop
at ``control_rate_hz`` wants one action per tick and must never wait for the
network. The broker:

* **prefetches with a latency model**: it keeps an exponentially weighted mean and
  variance of the observed fetch round trip and starts the next request as soon as
  ``remaining_actions / control_rate_hz <= mean + k * std + margin``. With a fast
  link it asks late (fresh observations), with a slow or jittery one early.
* **aligns** each new chunk to the present: the chunk was computed from an
  observation taken when its request started, and the robot has executed ``d``
  actions since, so the first ``d`` actions of the new chunk are in the past and
  skipped (a chunk entirely in the past is dropped and a new one requested).
* **blends** (optional, ``blend_steps > 0``): the first steps of the new chunk are
  crossfaded with what the old chunk still had planned for the same ticks, with
  linear or exponential weights, so the commanded trajectory has no jump.
* **never replays stale actions**: when the plan runs out before the next chunk
  arrives the tick waits (a *stall*, counted), unless ``hold_last=True``, which
  repeats the last action instead (counted as ``held_ticks``).

``fetch`` is a callable the robot supplies: read the latest observation, call the
policy, return an ``ActionChunk`` (or a float (horizon, action_dim) array)::

    with RobotClient(addr) as robot, ChunkBroker(
        lambda: robot.act(**camera_and_joints(), embodiment="franka_arm"), control_rate_hz=30, blend_steps=4
    ) as broker:
        while running:
            send_to_motors(broker.next_action())
            sleep_until_next_tick()

``ChunkBroker`` runs ``fetch`` on a background thread; ``AsyncChunkBroker`` runs
an async ``fetch`` as a task (a plain callable goes to a worker thread).
A fetch that fails is counted (``fetch_errors``); while actions remain the broker
keeps serving them and tries again on the next tick, and when the plan runs out
the error is raised from ``next_action``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from serving.client.types import ActionChunk

log = logging.getLogger("serving.client.broker")

__all__ = [
    "BrokerStats",
    "LatencyEstimator",
    "ChunkBroker",
    "AsyncChunkBroker",
    "blend_weights",
    "crossfade",
]

BLEND_MODES = ("linear", "exp")


class LatencyEstimator:
    """Exponentially weighted mean and variance of round-trip latency (seconds).

    ``predict() = mean + k * std``; before the first sample it is ``initial_s``.
    The first sample seeds the variance at ``(sample / 2) ** 2`` so the estimate
    starts cautious and tightens as samples agree.
    """

    def __init__(self, alpha: float = 0.2, k: float = 2.0, initial_s: float = 0.1):
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.alpha = alpha
        self.k = k
        self.initial_s = initial_s
        self.count = 0
        self.mean = 0.0
        self.var = 0.0

    def update(self, sample_s: float) -> None:
        x = max(0.0, float(sample_s))
        if self.count == 0:
            self.mean = x
            self.var = (x / 2) ** 2
        else:
            diff = x - self.mean
            incr = self.alpha * diff
            self.mean += incr
            self.var = (1 - self.alpha) * (self.var + diff * incr)
        self.count += 1

    @property
    def std(self) -> float:
        return math.sqrt(max(self.var, 0.0))

    def predict(self) -> float:
        if self.count == 0:
            return self.initial_s
        return self.mean + self.k * self.std


@dataclass
class BrokerStats:
    ticks: int = 0  # actions handed out (held ones included)
    chunks: int = 0  # chunks that became the plan
    fetches: int = 0  # fetches started
    prefetches: int = 0  # fetches started while the plan still had actions
    stalls: int = 0  # ticks that had to wait for a chunk (the very first chunk not counted)
    stall_time_s: float = 0.0
    startup_wait_s: float = 0.0  # time the first tick waited for the first chunk
    held_ticks: int = 0  # ticks that repeated the last action (hold_last=True)
    stale_chunks: int = 0  # chunks dropped because all their actions were already in the past
    skipped_actions: int = 0  # actions skipped to align new chunks to the present
    fetch_errors: int = 0
    latency_mean_s: float | None = None
    latency_std_s: float | None = None
    predicted_latency_s: float = 0.0


def blend_weights(n: int, mode: str = "linear", rate: float = 3.0) -> np.ndarray:
    """Weights of the *new* chunk over an ``n``-step crossfade, strictly increasing in (0, 1).

    ``linear``: ``(i + 1) / (n + 1)``. ``exp``: ``(1 - e^(-rate (i+1)/(n+1))) / (1 - e^(-rate))``,
    which moves to the fresher chunk quickly and then eases in.
    """
    if n <= 0:
        return np.zeros(0, dtype=np.float32)
    x = np.arange(1, n + 1, dtype=np.float64) / (n + 1)
    if mode == "linear":
        w = x
    elif mode == "exp":
        if rate <= 0:
            raise ValueError("exp blend rate must be > 0")
        w = (1 - np.exp(-rate * x)) / (1 - np.exp(-rate))
    else:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {mode!r}")
    return w.astype(np.float32)


def crossfade(old: np.ndarray, new: np.ndarray, steps: int, mode: str = "linear", rate: float = 3.0) -> np.ndarray:
    """``new`` with its first ``min(steps, len(old), len(new))`` rows blended from ``old`` (same ticks)."""
    n = min(steps, len(old), len(new))
    if n <= 0 or old.shape[1:] != new.shape[1:]:
        return new
    out = new.copy()
    w = blend_weights(n, mode, rate)[:, None]
    out[:n] = (1 - w) * old[:n] + w * new[:n]
    return out


def _as_actions(result) -> tuple[np.ndarray, ActionChunk | None]:
    if isinstance(result, ActionChunk):
        actions, chunk = result.actions, result
    else:
        actions, chunk = result, None
    actions = np.asarray(actions, dtype=np.float32)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise ValueError(f"fetch must return a (horizon >= 1, action_dim) chunk, got shape {actions.shape}")
    return actions, chunk


class _BrokerCore:
    """The bookkeeping, no threads or clocks: the wrappers own concurrency and time.

    ``tick`` counts plan actions executed; a fetch started at tick ``t0`` whose
    chunk is installed at tick ``t`` skips ``t - t0`` actions (``align``).
    """

    def __init__(
        self,
        control_rate_hz: float,
        *,
        blend_steps: int = 0,
        blend: str = "linear",
        blend_rate: float = 3.0,
        hold_last: bool = False,
        align: bool = True,
        latency: LatencyEstimator | None = None,
        margin_s: float | None = None,
    ):
        if not control_rate_hz > 0:
            raise ValueError("control_rate_hz must be > 0")
        if blend not in BLEND_MODES:
            raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")
        if blend_steps < 0:
            raise ValueError("blend_steps must be >= 0")
        self.rate = float(control_rate_hz)
        self.blend_steps = int(blend_steps)
        self.blend = blend
        self.blend_rate = blend_rate
        self.hold_last = hold_last
        self.align = align
        self.latency = latency or LatencyEstimator()
        self.margin_s = 1.0 / self.rate if margin_s is None else float(margin_s)
        self.plan: np.ndarray | None = None
        self.index = 0
        self.tick = 0
        self.last_action: np.ndarray | None = None
        self.last_chunk: ActionChunk | None = None
        self.in_flight = False
        self.generation = 0
        self.error: BaseException | None = None
        self.started = False  # a first chunk has been installed
        self.stats = BrokerStats(predicted_latency_s=self.latency.predict())

    # -- queries ----------------------------------------------------------------

    def available(self) -> int:
        return 0 if self.plan is None else len(self.plan) - self.index

    def should_fetch(self) -> bool:
        """True when no fetch is in flight and the plan runs out within the predicted latency."""
        if self.in_flight:
            return False
        return self.available() / self.rate <= self.latency.predict() + self.margin_s

    # -- transitions --------------------------------------------------------------

    def begin_fetch(self) -> tuple[int, int]:
        """Mark a fetch as started now; returns (t0, generation) for ``complete``.

        A new fetch supersedes the failure of the one before it: if the plan runs
        out while it is in flight, the robot waits for it rather than getting an
        error that a retry may already have mended.
        """
        self.in_flight = True
        self.error = None
        self.stats.fetches += 1
        if self.available() > 0:
            self.stats.prefetches += 1
        return self.tick, self.generation

    def complete(self, t0: int, generation: int, duration_s: float, result=None, error=None) -> bool:
        """A fetch finished. Returns True if its chunk became the plan."""
        if generation != self.generation:
            return False  # started before reset(): its observation belongs to the past
        self.in_flight = False
        if error is not None:
            self.stats.fetch_errors += 1
            self.error = error
            return False
        self.latency.update(duration_s)
        self._update_latency_stats()
        try:
            actions, chunk = _as_actions(result)
        except (TypeError, ValueError) as exc:
            self.stats.fetch_errors += 1
            self.error = exc
            return False
        self.error = None
        return self.install(actions, t0, chunk)

    def install(self, actions: np.ndarray, t0: int, chunk: ActionChunk | None = None) -> bool:
        skip = max(0, self.tick - t0) if self.align else 0
        if skip >= len(actions):
            self.stats.stale_chunks += 1
            log.debug("dropping a chunk of %d actions: %d ticks passed since its observation", len(actions), skip)
            return False
        new = actions[skip:]
        self.stats.skipped_actions += skip
        if self.blend_steps and self.plan is not None and self.available() > 0:
            new = crossfade(self.plan[self.index :], new, self.blend_steps, self.blend, self.blend_rate)
        self.plan = new
        self.index = 0
        self.last_chunk = chunk
        self.started = True
        self.stats.chunks += 1
        return True

    def pop(self) -> np.ndarray:
        assert self.plan is not None and self.index < len(self.plan)
        action = self.plan[self.index].copy()
        self.index += 1
        self.tick += 1
        self.stats.ticks += 1
        self.last_action = action
        return action

    def hold(self) -> np.ndarray:
        assert self.last_action is not None
        self.stats.ticks += 1
        self.stats.held_ticks += 1
        return self.last_action.copy()

    def take_error(self) -> BaseException | None:
        err, self.error = self.error, None
        return err

    def reset(self) -> None:
        self.generation += 1
        self.in_flight = False
        self.plan = None
        self.index = 0
        self.last_action = None
        self.error = None
        self.started = False

    def _update_latency_stats(self) -> None:
        est = self.latency
        self.stats.latency_mean_s = est.mean if est.count else None
        self.stats.latency_std_s = est.std if est.count else None
        self.stats.predicted_latency_s = est.predict()


class _BrokerBase:
    def __init__(
        self,
        fetch: Callable,
        control_rate_hz: float,
        *,
        blend_steps: int = 0,
        blend: str = "linear",
        blend_rate: float = 3.0,
        hold_last: bool = False,
        align: bool = True,
        latency_alpha: float = 0.2,
        latency_k: float = 2.0,
        initial_latency_s: float = 0.1,
        margin_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._fetch = fetch
        self._clock = clock
        self._core = _BrokerCore(
            control_rate_hz,
            blend_steps=blend_steps,
            blend=blend,
            blend_rate=blend_rate,
            hold_last=hold_last,
            align=align,
            latency=LatencyEstimator(latency_alpha, latency_k, initial_latency_s),
            margin_s=margin_s,
        )

    @property
    def control_rate_hz(self) -> float:
        return self._core.rate

    @property
    def latency(self) -> LatencyEstimator:
        return self._core.latency

    @property
    def last_chunk(self) -> ActionChunk | None:
        """The ActionChunk the current plan came from (None for array fetches)."""
        return self._core.last_chunk

    @property
    def available(self) -> int:
        """Actions left in the plan."""
        return self._core.available()


class ChunkBroker(_BrokerBase):
    """Blocking broker: call ``next_action()`` once per control tick (fetches run on a thread).

    Arguments: ``fetch`` (no-arg callable returning an ActionChunk or (T, A) array),
    ``control_rate_hz``; ``blend_steps`` / ``blend`` ("linear" | "exp") / ``blend_rate``
    for crossfading; ``hold_last`` to repeat the last action instead of stalling;
    ``align`` to skip actions already in the past; ``latency_alpha`` (EWMA weight),
    ``latency_k`` (std multiplier), ``initial_latency_s`` (before any sample) and
    ``margin_s`` (default one control period) for the prefetch rule; ``clock``.
    """

    def __init__(self, fetch: Callable[[], ActionChunk | np.ndarray], control_rate_hz: float, **kw):
        if inspect.iscoroutinefunction(fetch):
            raise TypeError("ChunkBroker needs a blocking fetch; use AsyncChunkBroker for a coroutine")
        super().__init__(fetch, control_rate_hz, **kw)
        self._cond = threading.Condition()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-broker")
        self._closed = False

    def __enter__(self) -> ChunkBroker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop fetching; a fetch in flight finishes in the background and is discarded."""
        with self._cond:
            self._closed = True
            self._core.reset()
            self._cond.notify_all()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def start(self) -> None:
        """Request the first chunk now, so the first ``next_action()`` waits less."""
        with self._cond:
            self._check_open()
            if not self._core.in_flight and self._core.available() == 0:
                self._start_fetch()

    def reset(self) -> None:
        """Forget the plan (new episode); a fetch in flight is discarded."""
        with self._cond:
            self._core.reset()
            self._cond.notify_all()

    @property
    def stats(self) -> BrokerStats:
        with self._cond:
            return BrokerStats(**vars(self._core.stats))

    def next_action(self, timeout: float | None = None) -> np.ndarray:
        """The action for this tick. Waits for a chunk only when the plan is empty.

        Raises the fetch's exception if the plan ran out and the last fetch failed,
        ``TimeoutError`` if no chunk came within ``timeout`` seconds.
        """
        core = self._core
        with self._cond:
            self._check_open()
            if core.available() == 0:
                if core.hold_last and core.last_action is not None and core.error is None:
                    if not core.in_flight:
                        self._start_fetch()
                    return core.hold()
                self._wait_for_plan(timeout)
            action = core.pop()
            if core.should_fetch():
                self._start_fetch()
            return action

    def _wait_for_plan(self, timeout: float | None) -> None:
        core = self._core
        stalled = core.started
        t_start = self._clock()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while core.available() == 0:
                err = core.take_error()
                if err is not None:
                    raise err
                if not core.in_flight:
                    self._start_fetch()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no action chunk within {timeout:.3g} s")
                self._cond.wait(remaining)
                self._check_open()
        finally:
            waited = self._clock() - t_start
            if stalled:
                core.stats.stalls += 1
                core.stats.stall_time_s += waited
            elif core.started:
                core.stats.startup_wait_s += waited

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ChunkBroker is closed")

    def _start_fetch(self) -> None:
        _, gen = self._core.begin_fetch()
        self._executor.submit(self._run_fetch, gen)

    def _run_fetch(self, gen: int) -> None:
        # The observation is taken when fetch() runs, which on a busy machine can be a
        # few ticks after it was submitted: align the chunk to that tick, not the earlier one.
        with self._cond:
            t0 = self._core.tick
        started = self._clock()
        result = error = None
        try:
            result = self._fetch()
        except BaseException as exc:  # handed to the control loop, never lost in the thread
            error = exc
            log.warning("fetch failed: %s", exc)
        duration = self._clock() - started
        with self._cond:
            self._core.complete(t0, gen, duration, result, error)
            self._cond.notify_all()


class AsyncChunkBroker(_BrokerBase):
    """asyncio broker: ``await next_action()`` once per tick. ``fetch`` may be async or blocking
    (a blocking one runs in a worker thread). Same options as ``ChunkBroker``."""

    def __init__(self, fetch: Callable, control_rate_hz: float, **kw):
        super().__init__(fetch, control_rate_hz, **kw)
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncChunkBroker:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        self._core.reset()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # the cancelled fetch's outcome is irrelevant now
        self._notify()

    def start(self) -> None:
        self._check_open()
        if not self._core.in_flight and self._core.available() == 0:
            self._start_fetch()

    def reset(self) -> None:
        self._core.reset()
        self._notify()

    @property
    def stats(self) -> BrokerStats:
        return BrokerStats(**vars(self._core.stats))

    async def next_action(self, timeout: float | None = None) -> np.ndarray:
        core = self._core
        self._check_open()
        if core.available() == 0:
            if core.hold_last and core.last_action is not None and core.error is None:
                if not core.in_flight:
                    self._start_fetch()
                return core.hold()
            await self._wait_for_plan(timeout)
        action = core.pop()
        if core.should_fetch():
            self._start_fetch()
        return action

    async def _wait_for_plan(self, timeout: float | None) -> None:
        core = self._core
        stalled = core.started
        t_start = self._clock()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while core.available() == 0:
                err = core.take_error()
                if err is not None:
                    raise err
                if not core.in_flight:
                    self._start_fetch()
                event = self._event()
                event.clear()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no action chunk within {timeout:.3g} s")
                try:
                    await asyncio.wait_for(event.wait(), remaining)
                except asyncio.TimeoutError:
                    raise TimeoutError(f"no action chunk within {timeout:.3g} s") from None
                self._check_open()
        finally:
            waited = self._clock() - t_start
            if stalled:
                core.stats.stalls += 1
                core.stats.stall_time_s += waited
            elif core.started:
                core.stats.startup_wait_s += waited

    def _event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("AsyncChunkBroker is closed")

    def _start_fetch(self) -> None:
        _, gen = self._core.begin_fetch()
        self._task = asyncio.get_running_loop().create_task(self._run_fetch(gen))

    async def _run_fetch(self, gen: int) -> None:
        t0, started = self._core.tick, self._clock()  # when the observation is taken (see ChunkBroker)
        result = error = None
        try:
            if inspect.iscoroutinefunction(self._fetch):
                result = await self._fetch()
            else:
                result = await asyncio.to_thread(self._fetch)
                if inspect.isawaitable(result):
                    result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = exc
            log.warning("fetch failed: %s", exc)
        self._core.complete(t0, gen, self._clock() - started, result, error)
        self._notify()
