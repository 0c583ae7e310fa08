"""ChunkBroker / AsyncChunkBroker: prefetch timing, alignment, blending, stalls, latency model.

The bookkeeping is tested deterministically on ``_BrokerCore`` (no threads, no clock);
the threaded and asyncio brokers are run against a fake fetch with a controlled delay,
with margins wide enough for a loaded 2-core machine.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.client import ActionChunk, AsyncChunkBroker, ChunkBroker, LatencyEstimator
from serving.client.broker import _BrokerCore, blend_weights, crossfade
from serving.client.errors import Unavailable


def ramp(start: int, horizon: int, dim: int = 2) -> np.ndarray:
    """A chunk whose action for absolute tick t is t (the ideal plan for 'follow the clock')."""
    return np.repeat(np.arange(start, start + horizon, dtype=np.float32)[:, None], dim, axis=1)


def core(rate=10.0, latency_s=0.2, **kw) -> _BrokerCore:
    est = LatencyEstimator(initial_s=latency_s)
    return _BrokerCore(rate, latency=est, margin_s=kw.pop("margin_s", 0.0), **kw)


# -- latency model -----------------------------------------------------------------------


def test_latency_estimate_adapts():
    est = LatencyEstimator(alpha=0.2, k=2.0, initial_s=0.5)
    assert est.predict() == 0.5
    for _ in range(30):
        est.update(0.05)
    assert est.mean == pytest.approx(0.05, abs=1e-3)
    assert est.std < 0.005
    low = est.predict()
    for _ in range(30):
        est.update(0.2)
    assert est.mean == pytest.approx(0.2, abs=0.01)
    assert est.predict() > low + 0.1


def test_latency_variance_raises_the_prediction():
    steady, jittery = LatencyEstimator(), LatencyEstimator()
    rng = np.random.default_rng(0)
    for _ in range(200):
        steady.update(0.1)
        jittery.update(0.1 + rng.uniform(-0.05, 0.05))
    assert jittery.mean == pytest.approx(0.1, abs=0.02)
    assert jittery.std > 0.02 > steady.std
    assert jittery.predict() > steady.predict() + 0.03


# -- prefetch rule, alignment, staleness (deterministic) -------------------------------------------


def test_prefetch_starts_when_remaining_time_reaches_predicted_latency():
    c = core(rate=10.0, latency_s=0.3)  # predict 0.3 s = 3 ticks at 10 Hz, no margin
    t0, gen = c.begin_fetch()
    assert c.complete(t0, gen, 0.3, ramp(0, 10))
    c.latency.var = 0.0  # the first sample seeds a cautious variance: make the rule exact here
    started_at = None
    for _ in range(10):
        c.pop()
        if c.should_fetch():
            started_at = c.available()
            break
    assert started_at == 3  # 3 actions = 0.3 s left


def test_new_chunk_is_aligned_to_the_present():
    c = core(rate=10.0)
    t0, gen = c.begin_fetch()
    c.complete(t0, gen, 0.1, ramp(0, 10))
    served = [c.pop()[0] for _ in range(6)]
    t0, gen = c.begin_fetch()  # the observation is taken at tick 6
    assert t0 == 6
    served += [c.pop()[0] for _ in range(3)]  # 3 ticks pass while the request is in flight
    assert c.complete(t0, gen, 0.3, ramp(t0, 10))
    assert c.stats.skipped_actions == 3
    served += [c.pop()[0] for _ in range(5)]
    assert served == list(range(14))  # no jump, no repeat


def test_unaligned_broker_starts_at_the_chunk_head():
    c = core(rate=10.0, align=False)
    t0, gen = c.begin_fetch()
    c.complete(t0, gen, 0.1, ramp(0, 10))
    c.pop()
    t0, gen = c.begin_fetch()
    c.pop()
    c.complete(t0, gen, 0.1, ramp(100, 10))
    assert c.pop()[0] == 100


def test_stale_chunk_is_dropped():
    c = core(rate=10.0)
    t0, gen = c.begin_fetch()
    c.complete(t0, gen, 0.1, ramp(0, 20))
    t0, gen = c.begin_fetch()
    for _ in range(6):
        c.pop()
    assert not c.complete(t0, gen, 0.6, ramp(t0, 5))  # all 5 actions are in the past
    assert c.stats.stale_chunks == 1 and not c.in_flight
    assert c.pop()[0] == 6  # the old plan goes on


def test_reset_discards_fetch_in_flight():
    c = core()
    t0, gen = c.begin_fetch()
    c.reset()
    assert not c.complete(t0, gen, 0.1, ramp(0, 5))
    assert c.available() == 0 and c.stats.chunks == 0


def test_bad_chunk_shape_is_a_fetch_error():
    c = core()
    t0, gen = c.begin_fetch()
    assert not c.complete(t0, gen, 0.1, np.zeros(5))
    assert c.stats.fetch_errors == 1 and isinstance(c.take_error(), ValueError)


# -- blending -------------------------------------------------------------------------------


def test_blend_weights():
    np.testing.assert_allclose(blend_weights(4, "linear"), [0.2, 0.4, 0.6, 0.8], rtol=1e-6)
    w = blend_weights(6, "exp", rate=3.0)
    assert np.all(np.diff(w) > 0) and w[0] > 0 and w[-1] < 1
    assert np.all(np.diff(w, 2) < 0)  # concave: moves to the fresh chunk fast, then eases in
    assert w[0] > blend_weights(6, "linear")[0]
    with pytest.raises(ValueError):
        blend_weights(3, "cubic")


def test_crossfade_linear_is_smooth():
    old = np.zeros((6, 2), np.float32)
    new = np.ones((8, 2), np.float32)
    out = crossfade(old, new, 4)
    np.testing.assert_allclose(out[:, 0], [0.2, 0.4, 0.6, 0.8, 1, 1, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(crossfade(old[:2], new, 4)[:3, 0], [1 / 3, 2 / 3, 1], rtol=1e-6)
    np.testing.assert_array_equal(crossfade(old, new, 0), new)


def test_core_blends_overlapping_chunks():
    c = core(rate=10.0, blend_steps=4)
    t0, gen = c.begin_fetch()
    c.complete(t0, gen, 0.1, np.zeros((10, 2), np.float32))
    for _ in range(3):
        c.pop()
    t0, gen = c.begin_fetch()
    c.pop()  # one tick passes: the new chunk's first action is skipped
    c.complete(t0, gen, 0.1, np.ones((10, 2), np.float32) * 10)
    served = [c.pop()[0] for _ in range(6)]
    np.testing.assert_allclose(served, [2, 4, 6, 8, 10, 10], rtol=1e-6)
    assert max(np.abs(np.diff([0.0, *served]))) <= 2 + 1e-6  # a 10-unit jump spread over 5 ticks


def test_blending_exponential_in_broker_core():
    c = core(rate=10.0, blend_steps=5, blend="exp")
    t0, gen = c.begin_fetch()
    c.complete(t0, gen, 0.1, np.zeros((10, 1), np.float32))
    t0, gen = c.begin_fetch()
    c.complete(t0, gen, 0.1, np.ones((10, 1), np.float32))
    served = np.array([c.pop()[0] for _ in range(7)])
    np.testing.assert_allclose(served[:5], blend_weights(5, "exp"), rtol=1e-6)
    assert np.all(np.diff(served) >= 0) and served[-1] == 1


# -- threaded broker ----------------------------------------------------------------------------


class FakeFetch:
    """Returns a ramp starting at the broker's tick when called, after ``delay`` seconds."""

    def __init__(self, horizon: int, delay: float, dim: int = 2):
        self.horizon = horizon
        self.delay = delay
        self.dim = dim
        self.calls = 0
        self.broker = None
        self.fail_next = 0

    def __call__(self):
        self.calls += 1
        tick = self.broker._core.tick
        time.sleep(self.delay)
        if self.fail_next:
            self.fail_next -= 1
            raise Unavailable("server restarting")
        return ActionChunk(actions=ramp(tick, self.horizon, self.dim), request_id=str(self.calls))


def run_loop(broker, ticks: int, period: float) -> list[float]:
    out = []
    next_t = time.monotonic()
    for _ in range(ticks):
        out.append(float(broker.next_action(timeout=5)[0]))
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    return out


def test_prefetch_hides_latency():
    # 100 Hz, 25-action chunks (250 ms) and a 20 ms round trip: never a stall.
    fetch = FakeFetch(horizon=25, delay=0.02)
    with ChunkBroker(fetch, control_rate_hz=100, latency_k=3.0, margin_s=0.1, initial_latency_s=0.05) as broker:
        fetch.broker = broker
        served = run_loop(broker, 100, 0.01)
        stats = broker.stats
    assert stats.stalls == 0, stats
    assert stats.chunks >= 4 and stats.prefetches >= 3
    assert stats.latency_mean_s == pytest.approx(0.02, abs=0.05)
    assert stats.ticks == 100
    assert isinstance(broker.last_chunk, ActionChunk)
    assert np.all(np.diff(served) > 0)  # aligned chunks never replay the past


def test_stalls_counted_when_latency_exceeds_chunk():
    # 100 Hz, 4-action chunks (40 ms) but a 100 ms round trip: the plan runs dry every chunk.
    fetch = FakeFetch(horizon=4, delay=0.1)
    with ChunkBroker(fetch, control_rate_hz=100) as broker:
        fetch.broker = broker
        served = run_loop(broker, 12, 0.01)
        stats = broker.stats
    assert stats.stalls >= 2 and stats.stall_time_s > 0.1
    assert stats.startup_wait_s > 0.05
    assert stats.held_ticks == 0
    assert np.all(np.diff(served) > 0)  # waits, never repeats a stale action


def test_hold_last_repeats_instead_of_stalling():
    fetch = FakeFetch(horizon=4, delay=0.1)
    with ChunkBroker(fetch, control_rate_hz=100, hold_last=True) as broker:
        fetch.broker = broker
        served = run_loop(broker, 30, 0.01)
        stats = broker.stats
    assert stats.stalls == 0 and stats.held_ticks > 5
    assert np.all(np.diff(served) >= 0)


def test_latency_estimate_tracks_fetch_time():
    fetch = FakeFetch(horizon=5, delay=0.03)
    with ChunkBroker(fetch, control_rate_hz=200, latency_alpha=0.5) as broker:
        fetch.broker = broker
        run_loop(broker, 15, 0.005)
        first = broker.stats.latency_mean_s
        fetch.delay = 0.1
        run_loop(broker, 20, 0.005)
        later = broker.stats
    assert 0.025 <= first < 0.1
    assert later.latency_mean_s > first + 0.04
    assert later.predicted_latency_s >= later.latency_mean_s


def test_fetch_error_while_actions_remain_is_absorbed():
    fetch = FakeFetch(horizon=30, delay=0.005)
    with ChunkBroker(fetch, control_rate_hz=100, margin_s=0.2) as broker:
        fetch.broker = broker
        broker.next_action(timeout=5)
        fetch.fail_next = 1
        served = run_loop(broker, 40, 0.005)
        stats = broker.stats
    assert stats.fetch_errors == 1 and stats.chunks >= 2
    assert np.all(np.diff(served) > 0)


def test_a_retry_in_flight_supersedes_the_failed_fetch_before_it():
    """The plan runs out while the retry of a failed prefetch is still in flight: the robot
    waits for that retry's chunk, not for the stale error (a busy machine delays the retry)."""
    calls, slow_retry = [], threading.Event()

    def fetch():
        calls.append(len(calls))
        if len(calls) == 2:
            raise Unavailable("server restarting")
        if len(calls) == 3:
            slow_retry.wait(5)
        return ramp(10 * len(calls), 3)

    with ChunkBroker(fetch, control_rate_hz=100, margin_s=1.0, align=False) as broker:
        assert broker.next_action(timeout=5)[0] == 10  # the prefetch (call 2) starts now, and fails
        deadline = time.monotonic() + 5
        while broker.stats.fetch_errors == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert broker.next_action(timeout=5)[0] == 11  # the retry (call 3) starts, and is held up
        assert broker.next_action(timeout=5)[0] == 12  # the plan's last action
        threading.Timer(0.1, slow_retry.set).start()
        assert broker.next_action(timeout=5)[0] == 30  # waits for the retry's chunk
        assert broker.stats.fetch_errors == 1


def test_fetch_error_surfaces_when_plan_runs_out():
    def fetch():
        raise Unavailable("down")

    with ChunkBroker(fetch, control_rate_hz=50) as broker:
        with pytest.raises(Unavailable):
            broker.next_action(timeout=5)
        with pytest.raises(Unavailable):  # the next tick tries again
            broker.next_action(timeout=5)
        assert broker.stats.fetch_errors == 2


def test_next_action_timeout():
    gate = threading.Event()

    def fetch():
        gate.wait(5)
        return ramp(0, 3)

    broker = ChunkBroker(fetch, control_rate_hz=50)
    try:
        with pytest.raises(TimeoutError):
            broker.next_action(timeout=0.05)
        gate.set()
        assert broker.next_action(timeout=5)[0] == 0
    finally:
        broker.close()
    with pytest.raises(RuntimeError):
        broker.next_action()


def test_start_and_reset():
    fetch = FakeFetch(horizon=10, delay=0.01)
    with ChunkBroker(fetch, control_rate_hz=100) as broker:
        fetch.broker = broker
        broker.start()
        time.sleep(0.1)
        assert broker.available == 10  # the first chunk is ready before the first tick
        assert broker.next_action()[0] == 0
        broker.reset()
        assert broker.available == 0
        assert broker.next_action(timeout=5)[0] == 1  # a fresh chunk from the present tick


def test_sync_broker_rejects_coroutine_fetch():
    async def fetch():
        return ramp(0, 3)

    with pytest.raises(TypeError):
        ChunkBroker(fetch, control_rate_hz=10)


# -- asyncio broker --------------------------------------------------------------------------------


async def async_loop(broker, ticks: int, period: float) -> list[float]:
    out = []
    for _ in range(ticks):
        out.append(float((await broker.next_action(timeout=5))[0]))
        await asyncio.sleep(period)
    return out


def test_async_broker_prefetch_hides_latency():
    async def main():
        state = {"broker": None, "calls": 0}

        async def fetch():
            state["calls"] += 1
            tick = state["broker"]._core.tick
            await asyncio.sleep(0.02)
            return ActionChunk(actions=ramp(tick, 25))

        async with AsyncChunkBroker(fetch, control_rate_hz=100, latency_k=3.0, margin_s=0.1) as broker:
            state["broker"] = broker
            served = await async_loop(broker, 80, 0.01)
            return served, broker.stats

    served, stats = asyncio.run(main())
    assert stats.stalls == 0 and stats.chunks >= 3 and stats.prefetches >= 2
    assert np.all(np.diff(served) > 0)


def test_async_broker_with_blocking_fetch_and_stalls():
    async def main():
        fetch = FakeFetch(horizon=4, delay=0.08)
        async with AsyncChunkBroker(fetch, control_rate_hz=100, blend_steps=2) as broker:
            fetch.broker = broker
            served = await async_loop(broker, 12, 0.01)
            return served, broker.stats

    served, stats = asyncio.run(main())
    assert stats.stalls >= 2 and stats.latency_mean_s >= 0.07
    assert np.all(np.diff(served) > 0)


def test_async_broker_error_and_timeout():
    async def main():
        async def failing():
            raise Unavailable("down")

        async with AsyncChunkBroker(failing, control_rate_hz=50) as broker:
            with pytest.raises(Unavailable):
                await broker.next_action(timeout=5)

        async def slow():
            await asyncio.sleep(5)

        broker = AsyncChunkBroker(slow, control_rate_hz=50)
        with pytest.raises(TimeoutError):
            await broker.next_action(timeout=0.05)
        await broker.close()
        with pytest.raises(RuntimeError):
            await broker.next_action()

    asyncio.run(main())
