"""CapacityBatcher: batches grow with load, and an idle batcher waits briefly for company."""

from __future__ import annotations

import asyncio
import time

from serving.engine import CapacityBatcher, Outcome, Pending
from serving.policy.base import PolicyObservation


def _pending(i: int) -> Pending:
    obs = PolicyObservation(embodiment="arm", images={}, state=None, robot_id=str(i))  # type: ignore[arg-type]
    return Pending(observation=obs, deadline=time.monotonic() + 10)


def test_requests_queued_during_a_batch_go_together_in_order() -> None:
    sizes: list[int] = []

    async def run_batch(items: list[Pending]) -> list[Outcome]:
        sizes.append(len(items))
        await asyncio.sleep(0.05)
        return [Outcome(batch_size=len(items), queue_ms=float(item.observation.robot_id)) for item in items]

    async def main() -> list[Outcome]:
        batcher = CapacityBatcher(run_batch, max_batch_size=16, wait_s=0.0)
        first = asyncio.ensure_future(batcher(_pending(0)))
        await asyncio.sleep(0.01)  # the first batch (of one) is now computing
        rest = [asyncio.ensure_future(batcher(_pending(i))) for i in range(1, 21)]
        results = await asyncio.gather(first, *rest)
        batcher.close()
        return results

    results = asyncio.run(main())
    assert sizes == [1, 16, 4]
    assert [int(r.queue_ms) for r in results] == list(range(21)), "each caller gets its own outcome"


def test_idle_batcher_waits_for_stragglers_only_when_robots_come_together() -> None:
    sizes: list[int] = []

    async def run_batch(items: list[Pending]) -> list[Outcome]:
        sizes.append(len(items))
        await asyncio.sleep(0.02)
        return [Outcome() for _ in items]

    async def staggered(batcher: CapacityBatcher, n: int) -> None:
        calls = [asyncio.ensure_future(batcher(_pending(0)))]
        for i in range(1, n):
            await asyncio.sleep(0.01)
            calls.append(asyncio.ensure_future(batcher(_pending(i))))
        await asyncio.gather(*calls)

    async def main() -> float:
        batcher = CapacityBatcher(run_batch, max_batch_size=8, wait_s=0.2)
        t0 = time.monotonic()
        await batcher(_pending(0))  # a lone robot: no straggler wait
        lone = time.monotonic() - t0
        await asyncio.gather(batcher(_pending(1)), batcher(_pending(2)))  # two arrive together
        await asyncio.sleep(0.05)  # idle again
        await staggered(batcher, 4)  # the last batch had company: wait for stragglers
        batcher.close()
        return lone

    lone = asyncio.run(main())
    assert lone < 0.15, "a lone robot must not wait for stragglers"
    assert sizes == [1, 2, 4]
