"""The quota coordinator: one Ray actor holding every tenant's buckets, and the replicas' client for it.

``QuotaBookActor`` owns the ``QuotaBook``. Plans are reloaded from the ledger
store every ``refresh_s``, and this month's metered usage is read at start, so
budgets survive restarts. Ingress replicas call it only to renew their leases,
a few times a second per replica, never per request.

Why two layers: the ``QuotaCoordinator`` Serve deployment gives the actor its
lifecycle (deployed, health-checked, restarted and deleted with the app, by
import path like the rest). Replicas, however, call the plain actor by name,
not through a Serve DeploymentHandle: a handle starts Serve's router machinery
in every replica, and on W1 that alone cost ~15-20 % of throughput
(docs/benchmarks.md). A restarted coordinator is a new actor with a new epoch,
which the lease protocol already handles (serving.quota.leases).
"""

from __future__ import annotations

import asyncio
import logging
import time

import ray
from ray import serve

from serving.quota.leases import Grant, QuotaBook, TenantReport, month_bounds
from serving.quota.store import open_store

log = logging.getLogger("ray.serve")

NAMESPACE = "superbrain"


def actor_name(app_name: str) -> str:
    return f"quota-coordinator::{app_name}"


@ray.remote(num_cpus=0, max_concurrency=1000)
class QuotaBookActor:
    async def __init__(self, ledger_url: str, lease_ttl_s: float = 1.0, refresh_s: float = 2.0) -> None:
        self.ledger_url = ledger_url
        self.refresh_s = refresh_s
        self.book = QuotaBook(lease_ttl_s=lease_ttl_s)
        await asyncio.to_thread(self._load, True)
        self._last_load = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

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

    async def stats(self) -> dict:
        return {"epoch": self.book.epoch, "exchanges": self.book.exchanges, "tenants": self.book.snapshot()}


@serve.deployment(name="QuotaCoordinator", num_replicas=1, health_check_period_s=5.0)
class QuotaCoordinator:
    """Owns the QuotaBookActor's lifetime: it lives and dies with this Serve replica."""

    async def __init__(self, ledger_url: str, lease_ttl_s: float = 1.0, refresh_s: float = 2.0) -> None:
        name = actor_name(serve.get_replica_context().app_name)
        self.actor = QuotaBookActor.options(name=name, namespace=NAMESPACE).remote(ledger_url, lease_ttl_s, refresh_s)
        stats = await self.actor.stats.remote()
        log.info("quota coordinator %s up (epoch %s)", name, stats["epoch"])

    async def check_health(self) -> None:
        await asyncio.wait_for(self.actor.stats.remote(), 10.0)

    async def stats(self) -> dict:
        return await self.actor.stats.remote()


class ActorCoordinator:
    """``leases.Coordinator`` over the named actor, with a timeout so a stuck call cannot hang robots."""

    def __init__(self, app_name: str, replica: str, timeout_s: float = 2.0):
        self.name = actor_name(app_name)
        self.replica = replica
        self.timeout_s = timeout_s
        self._actor = None

    def _handle(self):
        # Looked up lazily and again after a failure: the coordinator may start after
        # this replica, or be restarted (as a new actor under the same name).
        if self._actor is None:
            self._actor = ray.get_actor(self.name, namespace=NAMESPACE)
        return self._actor

    async def _call(self, method: str, *args):
        try:
            return await asyncio.wait_for(getattr(self._handle(), method).remote(self.replica, *args), self.timeout_s)
        except Exception:
            self._actor = None
            raise

    async def exchange(self, reports: dict[str, TenantReport]) -> dict[str, Grant]:
        return await self._call("exchange", reports)

    async def open_stream(self, tenant: str) -> Grant:
        return await self._call("open_stream", tenant)

    async def close_stream(self, tenant: str) -> None:
        await self._call("close_stream", tenant)
