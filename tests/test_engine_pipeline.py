"""The pipelined engine: batch N+1 preprocesses while batch N runs forward, in order, one bad request failing alone.

The policy here sleeps in each stage (sleep releases the GIL, as a device wait
or a torch kernel does) and records when each stage ran, so overlap is read
from the recorded intervals rather than guessed from wall time.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from serving import metrics as m
from serving.engine import CapacityBatcher, Outcome, Pending, PolicyEngine, default_pipeline, resolve_pipeline
from serving.policy.base import Policy, PolicyObservation
from serving.policy.noop import NoopPolicy
from tests.policies import ARM, DOG


@dataclass
class Interval:
    stage: str
    tag: str  # the robot ids of the batch, joined
    start: float
    end: float
    thread: str


class StagedSleepPolicy(Policy):
    """Sleeps ``pre_s`` in preprocess and ``fwd_s`` in forward; actions echo each observation's state.

    Instruction "bad-pre" makes preprocess raise, "bad-fwd" makes forward raise
    (only for a batch that contains it), to check per-request isolation in both stages.
    """

    name = "staged-sleep"

    def __init__(self, pre_s: float, fwd_s: float):
        self.pre_s, self.fwd_s = pre_s, fwd_s
        self.intervals: list[Interval] = []
        self._lock = threading.Lock()

    @property
    def embodiments(self):
        return {ARM.name: ARM, DOG.name: DOG}

    def _record(self, stage: str, observations: list[PolicyObservation], start: float) -> None:
        tag = ",".join(o.robot_id for o in observations)
        with self._lock:
            self.intervals.append(Interval(stage, tag, start, time.monotonic(), threading.current_thread().name))

    def preprocess(self, observations: list[PolicyObservation]) -> list[PolicyObservation]:
        start = time.monotonic()
        time.sleep(self.pre_s)
        self._record("pre", observations, start)
        if any(o.instruction == "bad-pre" for o in observations):
            raise ValueError("cannot preprocess this one")
        return observations

    def forward(self, batch: list[PolicyObservation]) -> list[PolicyObservation]:
        start = time.monotonic()
        time.sleep(self.fwd_s)
        self._record("fwd", batch, start)
        if any(o.instruction == "bad-fwd" for o in batch):
            raise RuntimeError("the model fell over")
        return batch

    def postprocess(self, outputs: list[PolicyObservation], observations: list[PolicyObservation]) -> list[np.ndarray]:
        out = []
        for obs in outputs:
            spec = self.embodiments[obs.embodiment]
            out.append(np.tile(obs.state[: spec.action_dim].astype(np.float32), (spec.chunk_length, 1)))
        return out

    def stage(self, stage: str, tag: str) -> Interval:
        (found,) = [i for i in self.intervals if i.stage == stage and i.tag == tag]
        return found


def _obs(i: int, instruction: str = "") -> PolicyObservation:
    state = np.array([i, i + 0.5, -i], np.float32)
    return PolicyObservation(ARM.name, {"front": np.zeros((8, 8, 3), np.uint8)}, state, instruction, robot_id=str(i))


def _pending(obs: PolicyObservation) -> Pending:
    return Pending(observation=obs, deadline=time.monotonic() + 30)


def _assert_echo(outcome: Outcome, i: int) -> None:
    assert outcome.error is None, outcome.error
    np.testing.assert_array_equal(outcome.actions, np.tile(np.array([i, i + 0.5], np.float32), (ARM.chunk_length, 1)))


async def _two_batches(engine: PolicyEngine) -> tuple[list[Outcome], list[Outcome]]:
    first = asyncio.ensure_future(engine.run_batch([_pending(_obs(i)) for i in (0, 1)]))
    await asyncio.sleep(0)  # batch 1 reaches the engine first
    second = asyncio.ensure_future(engine.run_batch([_pending(_obs(i)) for i in (2, 3)]))
    return await first, await second


def test_pipelined_engine_preprocesses_the_next_batch_during_the_forward_pass() -> None:
    policy = StagedSleepPolicy(pre_s=0.1, fwd_s=0.2)
    engine = PolicyEngine(policy, pipeline=True)
    assert engine.pipeline and engine.max_inflight_batches == 2
    try:
        t0 = time.monotonic()
        a, b = asyncio.run(_two_batches(engine))
        wall = time.monotonic() - t0
    finally:
        engine.close()
    for outcome, i in zip(a + b, range(4), strict=True):
        _assert_echo(outcome, i)
    fwd1, pre2 = policy.stage("fwd", "0,1"), policy.stage("pre", "2,3")
    # Batch 2's preprocessing ran while batch 1 was in its forward pass, on another thread.
    assert pre2.start < fwd1.end and pre2.end <= fwd1.end + 0.02
    assert pre2.thread != fwd1.thread
    # The forward stage took the batches in order, back to back.
    assert policy.stage("fwd", "2,3").start >= fwd1.end
    # pre1 + fwd1 + fwd2 = 0.5 s; one after the other it would be 0.6 s.
    assert wall < 0.56, wall


def test_sequential_engine_runs_one_batch_at_a_time() -> None:
    policy = StagedSleepPolicy(pre_s=0.03, fwd_s=0.05)
    engine = PolicyEngine(policy, pipeline=False)
    assert not engine.pipeline and engine.max_inflight_batches == 1
    try:
        a, b = asyncio.run(_two_batches(engine))
    finally:
        engine.close()
    for outcome, i in zip(a + b, range(4), strict=True):
        _assert_echo(outcome, i)
    assert policy.stage("pre", "2,3").start >= policy.stage("fwd", "0,1").end


def test_many_pipelined_batches_keep_their_order_and_their_own_results() -> None:
    policy = StagedSleepPolicy(pre_s=0.005, fwd_s=0.01)
    engine = PolicyEngine(policy, pipeline=True)

    async def main() -> list[list[Outcome]]:
        runs = []
        for b in range(8):
            runs.append(asyncio.ensure_future(engine.run_batch([_pending(_obs(3 * b + k)) for k in range(3)])))
            await asyncio.sleep(0)
        return list(await asyncio.gather(*runs))

    try:
        batches = asyncio.run(main())
    finally:
        engine.close()
    for b, outcomes in enumerate(batches):
        for k, outcome in enumerate(outcomes):
            _assert_echo(outcome, 3 * b + k)
    forward_order = [i.tag for i in sorted(policy.intervals, key=lambda i: i.start) if i.stage == "fwd"]
    assert forward_order == [f"{3 * b},{3 * b + 1},{3 * b + 2}" for b in range(8)]


@pytest.mark.parametrize("bad", ["bad-pre", "bad-fwd"])
def test_one_bad_request_fails_alone_in_either_stage(bad: str) -> None:
    policy = StagedSleepPolicy(pre_s=0.0, fwd_s=0.01)
    engine = PolicyEngine(policy, pipeline=True)

    async def main() -> tuple[list[Outcome], list[Outcome]]:
        poisoned = asyncio.ensure_future(
            engine.run_batch([_pending(_obs(0)), _pending(_obs(1, bad)), _pending(_obs(2))])
        )
        await asyncio.sleep(0)
        neighbour = asyncio.ensure_future(engine.run_batch([_pending(_obs(3)), _pending(_obs(4))]))
        return await poisoned, await neighbour

    try:
        poisoned, neighbour = asyncio.run(main())
    finally:
        engine.close()
    _assert_echo(poisoned[0], 0)
    _assert_echo(poisoned[2], 2)
    assert poisoned[1].error is not None and poisoned[1].error.code == grpc.StatusCode.INTERNAL
    for outcome, i in zip(neighbour, (3, 4), strict=True):
        _assert_echo(outcome, i)


def test_busy_seconds_is_the_forward_stages_time_and_feeds_the_metric() -> None:
    policy = StagedSleepPolicy(pre_s=0.02, fwd_s=0.03)
    label = (policy.name,)
    before = dict(m.METRICS._counters).get((m.FORWARD_BUSY_SECONDS.name, label), 0.0)
    for pipeline in (False, True):
        policy.intervals.clear()
        engine = PolicyEngine(policy, pipeline=pipeline)
        try:
            asyncio.run(_two_batches(engine))
        finally:
            engine.close()
        forward_s = sum(i.end - i.start for i in policy.intervals if i.stage == "fwd")
        preprocess_s = sum(i.end - i.start for i in policy.intervals if i.stage == "pre")
        assert engine.batches == 2
        # forward + postprocess: at least the recorded forward time, not the preprocessing too.
        assert forward_s <= engine.busy_seconds < forward_s + 0.01, (pipeline, engine.busy_seconds, forward_s)
        assert engine.busy_seconds < forward_s + preprocess_s - 0.03
    after = dict(m.METRICS._counters)[(m.FORWARD_BUSY_SECONDS.name, label)]
    assert after - before == pytest.approx(2 * 0.03 * 2, abs=0.03)


def _saturated_busy_fraction(pipeline: bool, seconds: float = 0.6) -> tuple[float, list[int]]:
    """Busy fraction with more callers than two batches hold, as ``superbrain bench --device`` measures it."""
    policy = StagedSleepPolicy(pre_s=0.02, fwd_s=0.04)
    engine = PolicyEngine(policy, pipeline=pipeline)
    batcher = CapacityBatcher(engine.run_batch, 4, 0.0, max_inflight=engine.max_inflight_batches)
    stop = asyncio.Event()

    async def robot(i: int) -> None:
        while not stop.is_set():
            _assert_echo(await batcher(_pending(_obs(i))), i)

    async def main() -> float:
        tasks = [asyncio.ensure_future(robot(i)) for i in range(12)]
        await asyncio.sleep(0.15)
        t0, busy0 = time.monotonic(), engine.busy_seconds
        await asyncio.sleep(seconds)
        fraction = (engine.busy_seconds - busy0) / (time.monotonic() - t0)
        stop.set()
        await asyncio.gather(*tasks)
        return fraction

    try:
        fraction = asyncio.run(main())
    finally:
        batcher.close()
        engine.close()
    sizes = [len(i.tag.split(",")) for i in policy.intervals if i.stage == "fwd"]
    return fraction, sizes


def test_busy_fraction_at_saturation_sequential_vs_pipelined() -> None:
    sequential, seq_sizes = _saturated_busy_fraction(pipeline=False)
    pipelined, pipe_sizes = _saturated_busy_fraction(pipeline=True)
    # One stage at a time: forward holds 0.04 of every 0.06 s.
    assert 0.5 < sequential < 0.8, sequential
    # Preprocessing (0.02 s) hides behind the forward pass (0.04 s): the forward stage never waits.
    assert pipelined > 0.85, pipelined
    # Saturated: full batches either way; the pipeline did not make them smaller.
    for sizes in (seq_sizes, pipe_sizes):
        assert sorted(sizes)[len(sizes) // 2] == 4, sizes


def test_capacity_batcher_overlaps_only_full_batches() -> None:
    sizes: list[int] = []
    running = [0]
    peak = [0]

    async def run_batch(items: list[Pending]) -> list[Outcome]:
        sizes.append(len(items))
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        await asyncio.sleep(0.05)
        running[0] -= 1
        return [Outcome(queue_ms=float(item.observation.robot_id)) for item in items]

    async def main() -> list[Outcome]:
        batcher = CapacityBatcher(run_batch, max_batch_size=4, wait_s=0.0, max_inflight=2)
        calls = [asyncio.ensure_future(batcher(_pending(_obs(0))))]
        await asyncio.sleep(0.01)  # batch [0] computing
        calls += [asyncio.ensure_future(batcher(_pending(_obs(i)))) for i in (1, 2)]
        await asyncio.sleep(0.01)  # two queued, not a full batch: they wait for the pipeline to drain
        assert sizes == [1]
        calls += [asyncio.ensure_future(batcher(_pending(_obs(i)))) for i in range(3, 12)]
        results = await asyncio.gather(*calls)
        batcher.close()
        return results

    results = asyncio.run(main())
    assert [int(r.queue_ms) for r in results] == list(range(12)), "each caller gets its own outcome"
    assert sizes[0] == 1 and sizes[1] == 4, sizes  # a full batch started while [0] computed
    assert sum(sizes) == 12 and max(sizes) == 4
    assert peak[0] == 2


def test_pipeline_default_per_device_and_setting() -> None:
    assert default_pipeline("cpu") is False
    assert default_pipeline("cuda") is True and default_pipeline("cuda:1") is True
    assert default_pipeline("musa:0") is True and default_pipeline("npu") is True
    assert resolve_pipeline("auto", "cpu") is False and resolve_pipeline("auto", "cuda") is True
    assert resolve_pipeline("on", "cpu") is True and resolve_pipeline("off", "cuda") is False
    with pytest.raises(ValueError, match="pipeline"):
        resolve_pipeline("sometimes", "cpu")


def test_a_policy_that_runs_inline_is_never_pipelined() -> None:
    engine = PolicyEngine(NoopPolicy(), pipeline=True)
    assert not engine.pipeline and engine.max_inflight_batches == 1
    engine.close()


def test_pipeline_is_a_config_setting() -> None:
    from serving.config import ServingConfig

    assert ServingConfig().pipeline == "auto"
    assert ServingConfig(pipeline="on").pipeline == "on"
    with pytest.raises(ValueError):
        ServingConfig(pipeline="maybe")
