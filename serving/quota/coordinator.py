"""The quota coordinator as a Ray Serve deployment, and the replicas' client for it.

One coordinator replica owns every tenant's buckets (``QuotaBook``); ingress
replicas reach it through a Serve handle only to renew their leases, a few
times a second per replica, never per request. Plans are reloaded from the
ledger store every ``refresh_s``; this month's metered usage is read at start so
budgets survive restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time

from ray import serve

from serving.quota.leases import Grant, QuotaBook, TenantReport, month_bounds
from serving.quota.store import open_store

log = logging.getLogger("ray.serve")


@serve.deployment(name="QuotaCoordinator", num_replicas=1, max_ongoing_requests=4096, health_check_period_s=5.0)
class QuotaCoordinator:
    async def __init__(self, ledger_url: str, lease_ttl_s: float = 1.0, refresh_s: float = 2.0) -> None:
        self.ledger_url = ledger_url
        self.refresh_s = refresh_s
        self.book = QuotaBook(lease_ttl_s=lease_ttl_s)
        await asyncio.to_thread(self._load, True)
        self._last_load = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())
        log.info("quota coordinator up (epoch %s)", self.book.epoch)

    def _load(self, with_usage: bool) -> None:
        with open_store(self.ledger_url) as store:
            plans = {t.name: t.plan for t in store.list_tenants()}
            totals = store.usage_totals(*month_bounds(time.time())) if with_usage else None
        self.book.set_plans(plans)
        if totals is not None:
            self.book.set_month_usage(totals)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await asyncio.to_thread(self._load, False)
                self._last_load = time.monotonic()
            except Exception:
                log.warning("quota coordinator: plan refresh failed", exc_info=True)

    async def _know(self, tenants) -> None:
        """A tenant created since the last refresh: reload now (at most every 0.25 s)."""
        if any(not self.book.knows(t) for t in tenants) and time.monotonic() - self._last_load > 0.25:
            await asyncio.to_thread(self._load, False)
            self._last_load = time.monotonic()

    async def exchange(self, replica: str, reports: dict[str, TenantReport]) -> dict[str, Grant]:
        await self._know(reports)
        return self.book.exchange(replica, reports)

    async def open_stream(self, replica: str, tenant: str) -> Grant:
        await self._know([tenant])
        return self.book.open_stream(replica, tenant)

    async def close_stream(self, replica: str, tenant: str) -> None:
        self.book.close_stream(replica, tenant)

    async def snapshot(self) -> dict[str, dict[str, float]]:
        return self.book.snapshot()

    async def exchanges(self) -> int:
        return self.book.exchanges


class ServeCoordinator:
    """``leases.Coordinator`` over a Serve handle, with a timeout so a stuck call cannot hang robots."""

    def __init__(self, handle, replica: str, timeout_s: float = 2.0):
        self.handle = handle
        self.replica = replica
        self.timeout_s = timeout_s

    async def exchange(self, reports: dict[str, TenantReport]) -> dict[str, Grant]:
        return await asyncio.wait_for(self.handle.exchange.remote(self.replica, reports), self.timeout_s)

    async def open_stream(self, tenant: str) -> Grant:
        return await asyncio.wait_for(self.handle.open_stream.remote(self.replica, tenant), self.timeout_s)

    async def close_stream(self, tenant: str) -> None:
        await asyncio.wait_for(self.handle.close_stream.remote(self.replica, tenant), self.timeout_s)
