"""The quota coordinator: one Ray actor holding every tenant's buckets, and the replicas' client for it.

``QuotaBookActor`` owns the ``QuotaBook``. Plans are reloaded from the ledger
store every ``refresh_s``, and this month's metered usage is read at start, so
budgets survive restarts. Ingress replicas call it only to renew their leases,
a few times a second per replica, never per request.

Its lifetime is a lease too, which keeps it to one process: the replicas create
it as they start (a named, detached actor; ``get_if_exists`` makes concurrent
creation safe) and it exits by itself once no replica has called for
``idle_exit_s``. So it lives exactly as long as the app's replicas do, however
the app was deployed (``serve run``, ``serve deploy``, KubeRay), and a quick
redeploy finds it still holding the buckets. (An earlier version gave it a
Serve deployment as owner: one more process, ~1 % of W1 on two cores.)
Replicas call the plain actor, never a Serve DeploymentHandle: a handle starts
Serve's router machinery in every replica, which cost ~15-20 % of W1
(docs/benchmarks.md). A crashed coordinator is restarted by Ray as a new actor
with a new epoch, which the lease protocol already handles (serving.quota.leases).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time

import ray

from serving.quota.leases import Grant, QuotaBook, TenantReport, month_bounds
from serving.quota.model import Plan, TenantTotals
from serving.quota.store import HeldStore, LedgerStore

log = logging.getLogger("ray.serve")

NAMESPACE = "superbrain"


# With no replica calling for this long, the coordinator exits (the app is gone).
IDLE_EXIT_S = 60.0


def actor_name(app_name: str, ledger_url: str, lease_ttl_s: float) -> str:
    """One coordinator per app and ledger: a redeploy onto another ledger never reuses the old one."""
    digest = hashlib.sha256(f"{ledger_url}|{lease_ttl_s}".encode()).hexdigest()[:12]
    return f"quota-coordinator::{app_name}::{digest}"


def read_plans(store: LedgerStore, with_usage: bool) -> tuple[dict[str, Plan], dict[str, TenantTotals] | None]:
    """The plans by tenant, and (``with_usage``) this month's usage totals, else None."""
    plans = {t.name: t.plan for t in store.list_tenants()}
    return plans, store.usage_totals(*month_bounds(time.time())) if with_usage else None


@ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=-1)
class QuotaBookActor:
    async def __init__(
        self, ledger_url: str, lease_ttl_s: float = 1.0, refresh_s: float = 2.0, idle_exit_s: float = IDLE_EXIT_S
    ) -> None:
        self.refresh_s = refresh_s
        self.idle_exit_s = idle_exit_s
        self.book = QuotaBook(lease_ttl_s=lease_ttl_s)
        self._ledger = HeldStore(ledger_url)  # reread every refresh_s: one connection, not one each time
        await self._load(with_usage=True)
        self._last_call = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _load(self, with_usage: bool = False) -> None:
        # The store is read on a worker thread; the book changes only here, on the loop.
        plans, totals = await asyncio.to_thread(self._ledger.read, functools.partial(read_plans, with_usage=with_usage))
        self.book.set_plans(plans)
        if totals is not None:
            self.book.set_month_usage(totals)
        self._last_load = time.monotonic()

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            if time.monotonic() - self._last_call > self.idle_exit_s:
                log.info("quota coordinator: no replica called for %.0f s; exiting", self.idle_exit_s)
                # exit_actor() only works inside an actor method; from this task, kill ourselves.
                await asyncio.to_thread(self._ledger.close)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
            try:
                await self._load()
            except Exception:
                log.warning("quota coordinator: plan refresh failed", exc_info=True)

    async def _know(self, tenants) -> None:
        """A tenant created since the last refresh: reload now (at most every 0.25 s)."""
        if any(not self.book.knows(t) for t in tenants) and time.monotonic() - self._last_load > 0.25:
            await self._load()

    async def exchange(self, replica: str, reports: dict[str, TenantReport]) -> dict[str, Grant]:
        self._last_call = time.monotonic()
        await self._know(reports)
        return self.book.exchange(replica, reports)

    async def open_stream(self, replica: str, tenant: str) -> Grant:
        self._last_call = time.monotonic()
        await self._know([tenant])
        return self.book.open_stream(replica, tenant)

    async def close_stream(self, replica: str, tenant: str) -> None:
        self._last_call = time.monotonic()
        self.book.close_stream(replica, tenant)

    async def stats(self) -> dict:
        return {"epoch": self.book.epoch, "exchanges": self.book.exchanges, "tenants": self.book.snapshot()}


class ActorCoordinator:
    """``leases.Coordinator`` over the named actor, with a timeout so a stuck call cannot hang robots."""

    def __init__(
        self,
        app_name: str,
        replica: str,
        ledger_url: str,
        *,
        lease_ttl_s: float = 1.0,
        timeout_s: float = 2.0,
        idle_exit_s: float = IDLE_EXIT_S,
    ):
        self.name = actor_name(app_name, ledger_url, lease_ttl_s)
        self.replica = replica
        self.timeout_s = timeout_s
        self._args = (ledger_url, lease_ttl_s, 2.0, idle_exit_s)
        self._actor = None

    def _handle(self):
        # Got (or created: the first replica to ask does) lazily, and again after a
        # failure: the coordinator may have been restarted, or exited while idle.
        if self._actor is None:
            self._actor = QuotaBookActor.options(
                name=self.name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
            ).remote(*self._args)
        return self._actor

    async def stats(self) -> dict:
        return await asyncio.wait_for(self._handle().stats.remote(), self.timeout_s)

    async def ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the coordinator answers (creating it if no replica has yet)."""
        await asyncio.wait_for(self._handle().stats.remote(), timeout_s)

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
