"""Quota that holds across replicas: a coordinator's token buckets, leased out in slices.

Every ingress replica admits calls from a local slice of each tenant's tokens,
so the hot path never waits on a central round trip; only when a slice runs
low does it ask the coordinator for more (Doorman-style capacity leases, Envoy's
local + global rate limiting). ``QuotaBook`` is the coordinator's state and
``ReplicaQuota`` a replica's side; both are plain Python (time is injected), and
``serving.quota.coordinator`` puts the book behind a Ray Serve deployment.

The overshoot bound (docs/partners.md)
--------------------------------------
Each tenant has one bucket of ``burst`` tokens refilled at ``rate_per_s``.
Tokens only move bucket -> lease -> admitted call, or lease -> bucket when a
replica hands unused ones back, and the bucket refills only while
``bucket + leased <= burst``. So in ANY window of length T, the whole cluster
admits at most ``burst + rate_per_s * T`` calls, however many replicas there
are. Leases expire after ``lease_ttl_s``: a replica never spends a token past
its expiry (measured from when it asked, so before the coordinator's own
expiry), and the coordinator reclaims slices of replicas that went silent.
A restarted coordinator has a new ``epoch`` and starts every bucket with a
single token (so a tenant's first call is not refused); replicas drop tokens
from an older epoch as soon as they hear the new one, so a restart adds at most
one call, not a burst. Monthly call budgets hold the same way
(leased tokens count against them); accelerator-time budgets are charged after
the fact, so they can overshoot by what is leased out when the budget runs out.
"""

from __future__ import annotations

import asyncio
import calendar
import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from serving.quota.model import Plan, TenantTotals

log = logging.getLogger(__name__)

# Which limit refused a call; sent to robots in google.rpc.QuotaFailure.
RATE = "rate"
MONTHLY_CALLS = "monthly_calls"
MONTHLY_ACCEL_MS = "monthly_accel_ms"
STREAMS = "streams"
UNKNOWN_TENANT = "unknown_tenant"


@dataclass
class TenantReport:
    """What a replica tells the coordinator about one tenant at an exchange."""

    want: int = 0  # tokens it would like added to its slice
    held: int = 0  # tokens it keeps (their lease is renewed)
    used: int = 0  # calls admitted since its last report
    returned: int = 0  # tokens it gives back (expired or unneeded)
    accel_ms: float = 0.0  # accelerator time charged since its last report
    streams: int = 0  # streams open on this replica now


@dataclass
class Grant:
    """The coordinator's answer for one tenant."""

    granted: int = 0
    ttl_s: float = 1.0
    epoch: str = ""
    retry_after_s: float = 0.0
    limit: str = ""  # set when granted < want: which limit held it back


def month_bounds(wall: float) -> tuple[float, float]:
    """Start and end (unix seconds) of the UTC calendar month containing ``wall``."""
    t = time.gmtime(wall)
    start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(start), float(calendar.timegm((year, month, 1, 0, 0, 0)))


@dataclass
class _Lease:
    outstanding: int = 0
    expires: float = 0.0
    streams: int = 0
    last_want: float = 0.0


@dataclass
class _TenantBook:
    plan: Plan
    tokens: float = 1.0  # one token, not a full burst: see "A restarted coordinator" above
    refilled: float = 0.0
    calls_used: int = 0  # this month, metered + reported
    accel_ms_used: float = 0.0
    leases: dict[str, _Lease] = field(default_factory=dict)

    @property
    def outstanding(self) -> int:
        return sum(lease.outstanding for lease in self.leases.values())


class QuotaBook:
    """The coordinator's buckets, leases and monthly counters for every tenant."""

    def __init__(
        self,
        *,
        lease_ttl_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.lease_ttl_s = lease_ttl_s
        self.epoch = secrets.token_hex(4)
        self._clock = clock
        self._wall = wall
        self._tenants: dict[str, _TenantBook] = {}
        self._month = month_bounds(wall())
        self.exchanges = 0  # lease exchanges served (a replica's calls per second show up here)

    # -- configuration from the store ------------------------------------------

    def set_plans(self, plans: dict[str, Plan]) -> None:
        now = self._clock()
        for name, plan in plans.items():
            book = self._tenants.get(name)
            if book is None:
                self._tenants[name] = _TenantBook(plan=plan, refilled=now)
            else:
                self._refill(book, now)
                book.plan = plan

    def set_month_usage(self, totals: dict[str, TenantTotals]) -> None:
        """Metered usage so far this month (from the ledger), e.g. at start-up."""
        for name, t in totals.items():
            if name in self._tenants:
                self._tenants[name].calls_used = t.calls
                self._tenants[name].accel_ms_used = t.accel_ms

    def knows(self, tenant: str) -> bool:
        return tenant in self._tenants

    @property
    def month_start(self) -> float:
        return self._month[0]

    # -- the exchange -------------------------------------------------------------

    def exchange(self, replica: str, reports: dict[str, TenantReport]) -> dict[str, Grant]:
        now = self._clock()
        self._roll_month()
        self.exchanges += 1
        return {tenant: self._exchange_one(replica, tenant, report, now) for tenant, report in reports.items()}

    def _exchange_one(self, replica: str, tenant: str, report: TenantReport, now: float) -> Grant:
        book = self._tenants.get(tenant)
        if book is None:
            return Grant(epoch=self.epoch, retry_after_s=1.0, limit=UNKNOWN_TENANT)
        self._expire(book, now)
        lease = book.leases.setdefault(replica, _Lease())
        # Settle what the replica reports against what we leased it.
        used = min(report.used, lease.outstanding)
        book.calls_used += report.used
        book.accel_ms_used += report.accel_ms
        lease.outstanding -= used
        back = min(report.returned, lease.outstanding)
        lease.outstanding -= back
        self._refill(book, now)
        book.tokens += back
        # A replica can only hold what we leased it (an older epoch's tokens are not ours).
        lease.outstanding = min(lease.outstanding, report.held)
        lease.expires = now + self.lease_ttl_s
        lease.streams = report.streams
        if report.want > 0:
            lease.last_want = now
        grant = self._grant(book, report.want, now)
        lease.outstanding += grant.granted
        return grant

    def _grant(self, book: _TenantBook, want: int, now: float) -> Grant:
        grant = Grant(ttl_s=self.lease_ttl_s, epoch=self.epoch)
        if want <= 0:
            return grant
        plan = book.plan
        room = want
        if plan.monthly_calls is not None:
            left = plan.monthly_calls - book.calls_used - book.outstanding
            if left < room:
                room = max(0, left)
                grant.limit = MONTHLY_CALLS
        if plan.monthly_accel_ms is not None and book.accel_ms_used >= plan.monthly_accel_ms:
            room, grant.limit = 0, MONTHLY_ACCEL_MS
        if room == 0:
            grant.retry_after_s = max(1.0, self._month[1] - self._wall())
            return grant
        # Share the bucket fairly between replicas that are asking right now.
        askers = sum(1 for lease in book.leases.values() if now - lease.last_want <= self.lease_ttl_s)
        available = math.floor(book.tokens)
        share = max(1, available // max(1, askers)) if available > 0 else 0
        granted = min(room, available, share)
        book.tokens -= granted
        grant.granted = granted
        if granted < room and not grant.limit:
            grant.limit = RATE
        if grant.limit == RATE:
            grant.retry_after_s = max(0.001, (1.0 - book.tokens) / plan.rate_per_s)
        return grant

    # -- streams ------------------------------------------------------------------

    def open_stream(self, replica: str, tenant: str) -> Grant:
        """Reserve one of the tenant's concurrent stream slots for ``replica``."""
        book = self._tenants.get(tenant)
        if book is None:
            return Grant(epoch=self.epoch, limit=UNKNOWN_TENANT, retry_after_s=1.0)
        now = self._clock()
        self._expire(book, now)
        open_now = sum(lease.streams for lease in book.leases.values())
        if open_now >= book.plan.max_streams:
            return Grant(epoch=self.epoch, limit=STREAMS, retry_after_s=1.0)
        lease = book.leases.setdefault(replica, _Lease(expires=now + self.lease_ttl_s))
        lease.streams += 1
        return Grant(granted=1, epoch=self.epoch, ttl_s=self.lease_ttl_s)

    def close_stream(self, replica: str, tenant: str) -> None:
        book = self._tenants.get(tenant)
        lease = book.leases.get(replica) if book else None
        if lease is not None and lease.streams > 0:
            lease.streams -= 1

    # -- bookkeeping ------------------------------------------------------------

    def _refill(self, book: _TenantBook, now: float) -> None:
        room = book.plan.burst - book.outstanding
        if book.tokens < room:
            book.tokens = min(room, book.tokens + (now - book.refilled) * book.plan.rate_per_s)
        book.refilled = now

    def _expire(self, book: _TenantBook, now: float) -> None:
        """Forget leases of replicas that went silent (their tokens have expired on their side too).

        Their stream slots stay reserved a little longer, so a replica that is merely
        slow to report does not lose them: it re-reports its open streams at every exchange.
        """
        for replica, lease in list(book.leases.items()):
            if now > lease.expires:
                self._refill(book, now)
                book.tokens += lease.outstanding
                lease.outstanding = 0
                if now > lease.expires + 10 * self.lease_ttl_s:
                    del book.leases[replica]

    def _roll_month(self) -> None:
        wall = self._wall()
        if wall >= self._month[1]:
            self._month = month_bounds(wall)
            for book in self._tenants.values():
                book.calls_used, book.accel_ms_used = 0, 0.0

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per tenant: tokens, leased, calls and accel-ms used this month (for tests and ops)."""
        return {
            name: {
                "tokens": book.tokens,
                "leased": book.outstanding,
                "calls_used": book.calls_used,
                "accel_ms_used": book.accel_ms_used,
                "streams": sum(lease.streams for lease in book.leases.values()),
            }
            for name, book in self._tenants.items()
        }


# --------------------------------------------------------------------------------------
# Replica side


class QuotaDenied(Exception):
    """A call refused by a tenant's limit; ``limit`` names it, ``retry_after_s`` says when to retry."""

    def __init__(self, tenant: str, limit: str, retry_after_s: float):
        self.tenant = tenant
        self.limit = limit
        self.retry_after_s = retry_after_s
        super().__init__(f"tenant {tenant!r} is over its {limit} limit; retry in {retry_after_s:.3f} s")


class QuotaUnavailable(Exception):
    """The coordinator could not be reached and this replica holds no tokens for the tenant."""


class Coordinator(Protocol):
    """How a replica reaches the coordinator (a Serve handle in production, a QuotaBook in tests)."""

    async def exchange(self, reports: dict[str, TenantReport]) -> dict[str, Grant]: ...

    async def open_stream(self, tenant: str) -> Grant: ...

    async def close_stream(self, tenant: str) -> None: ...


@dataclass
class _Slice:
    tokens: int = 0
    expires: float = 0.0
    epoch: str = ""
    deny_until: float = 0.0
    deny_limit: str = ""
    deny_mark: int = 0  # exchange number that set the denial
    # The limit that held back the last grant (even a partial one), and its retry hint.
    short_limit: str = ""
    short_retry_s: float = 0.0
    # Since the last report:
    used: int = 0
    returned: int = 0
    accel_ms: float = 0.0
    attempts: int = 0
    # Demand estimate (calls/s) and requests waiting for tokens now.
    rate: float = 0.0
    waiting: int = 0
    streams: int = 0
    low_water: int = 0


class ReplicaQuota:
    """A replica's slices of every tenant's tokens, refilled by exchanges with the coordinator.

    ``take`` is the hot path (the gate calls it for each call of a batch): a
    decrement when the slice has tokens. When it runs low a background exchange
    fetches ``horizon_s`` worth of the tenant's recent demand; ``admit``, for a
    call that found the slice empty, waits for one exchange (shared with every
    other caller waiting at that moment). A periodic exchange reports usage,
    renews held tokens' leases and returns what expired.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        *,
        # Half the lease TTL (the app passes ``lease_ttl_s / 2``). An exchange is a Ray
        # actor call, a millisecond or two of CPU across both processes, so a longer
        # horizon means fewer of them; tokens still need slack to be spent before
        # they expire, which half the TTL leaves.
        horizon_s: float = 0.5,
        sync_interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._coordinator = coordinator
        self.horizon_s = horizon_s
        self.sync_interval_s = sync_interval_s
        self._clock = clock
        self._slices: dict[str, _Slice] = {}
        self._inflight: asyncio.Future[None] | None = None
        self.exchanges = 0  # completed exchanges with the coordinator
        self._last_sync = clock()
        self._task: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()
        self.failures = 0
        self.waits = 0  # admissions that had to wait for an exchange (the slice was empty)

    def _slice(self, tenant: str) -> _Slice:
        s = self._slices.get(tenant)
        if s is None:
            s = self._slices[tenant] = _Slice()
        return s

    # -- hot path -------------------------------------------------------------

    def slice_of(self, tenant: str) -> _Slice:
        """The tenant's slice (the same object for the replica's life), for ``take``."""
        return self._slice(tenant)

    def take(self, s: _Slice, *, counted: bool = False) -> bool:
        """A token from a slice at hand (``slice_of``), if it has an unexpired one; False takes nothing.

        A token taken counts the attempt (the demand the next exchange reports),
        unless the caller ``counted`` it already.
        """
        if s.tokens <= 0:
            return False
        if self._clock() >= s.expires:
            s.returned += s.tokens
            s.tokens = 0
            return False
        s.tokens -= 1
        s.used += 1
        if not counted:
            s.attempts += 1
        if s.tokens <= s.low_water and self._inflight is None:
            self._start_exchange()  # prefetch in the background
        return True

    async def admit(self, tenant: str) -> None:
        """Take one token for ``tenant``, or raise QuotaDenied / QuotaUnavailable."""
        s = self._slice(tenant)
        if self.take(s):
            return
        s.attempts += 1  # counted now, so that the exchange it waits for sees the demand
        now = self._clock()
        if now < s.deny_until:
            raise QuotaDenied(tenant, s.deny_limit, s.deny_until - now)
        s.waiting += 1
        self.waits += 1
        failures = self.failures
        try:
            for _ in range(2):  # an exchange already in flight may not have asked for us
                mark = self.exchanges
                await self._sync()
                if self.take(s, counted=True):
                    return
                if s.deny_mark > mark:
                    break
        finally:
            s.waiting -= 1
        now = self._clock()
        if s.deny_limit and now < s.deny_until:
            raise QuotaDenied(tenant, s.deny_limit, s.deny_until - now)
        if self.failures > failures:
            raise QuotaUnavailable(f"quota coordinator unreachable; no tokens held for tenant {tenant!r}")
        # The coordinator granted less than this moment's demand; others took the rest.
        raise QuotaDenied(tenant, s.short_limit or RATE, s.short_retry_s or 0.01)

    def charge(self, tenant: str, accel_ms: float) -> None:
        """Accelerator time a finished call used (reported at the next exchange)."""
        self._slice(tenant).accel_ms += accel_ms

    # -- streams ----------------------------------------------------------------

    async def open_stream(self, tenant: str) -> None:
        """Reserve one of the tenant's cluster-wide stream slots, or raise QuotaDenied.

        Counted locally first, so a periodic exchange racing this call reports the
        slot (briefly over-counting, never under-counting).
        """
        s = self._slice(tenant)
        s.streams += 1
        try:
            grant = await self._coordinator.open_stream(tenant)
        except Exception as err:
            s.streams -= 1
            raise QuotaUnavailable(f"quota coordinator unreachable: {err}") from err
        if not grant.granted:
            s.streams -= 1
            raise QuotaDenied(tenant, grant.limit or STREAMS, grant.retry_after_s)

    async def close_stream(self, tenant: str) -> None:
        s = self._slice(tenant)
        s.streams = max(0, s.streams - 1)
        try:
            await self._coordinator.close_stream(tenant)
        except Exception:  # the next exchange re-reports our open streams anyway
            log.debug("close_stream for %s not delivered", tenant, exc_info=True)

    # -- exchanges ----------------------------------------------------------------

    def _start_exchange(self) -> asyncio.Future[None]:
        """Start an exchange now; marked in flight at once, so callers in this same
        loop iteration share it instead of each starting one."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._inflight = fut

        async def run() -> None:
            try:
                await self._do_exchange()
            finally:
                self._inflight = None
                fut.set_result(None)

        task = loop.create_task(run())
        self._running.add(task)  # a strong reference until it is done (asyncio keeps only weak ones)
        task.add_done_callback(self._running.discard)
        return fut

    async def _sync(self) -> None:
        """Run one exchange, or wait for the one in flight."""
        fut = self._inflight if self._inflight is not None else self._start_exchange()
        await asyncio.shield(fut)

    async def _do_exchange(self) -> None:
        sent = self._clock()
        elapsed = max(1e-3, sent - self._last_sync)
        reports: dict[str, TenantReport] = {}
        for tenant, s in self._slices.items():
            if not (s.tokens or s.used or s.returned or s.accel_ms or s.attempts or s.waiting or s.streams):
                continue
            if s.tokens and sent >= s.expires:
                s.returned += s.tokens
                s.tokens = 0
            s.rate = 0.5 * s.rate + 0.5 * (s.attempts / elapsed) if s.rate else s.attempts / elapsed
            s.attempts = 0
            want = max(math.ceil(s.rate * self.horizon_s) - s.tokens, s.waiting)
            reports[tenant] = TenantReport(
                want=max(0, want),
                held=s.tokens,
                used=s.used,
                returned=s.returned,
                accel_ms=s.accel_ms,
                streams=s.streams,
            )
        self._last_sync = sent
        if not reports:
            return
        snapshot = {t: (self._slices[t].used, self._slices[t].returned, self._slices[t].accel_ms) for t in reports}
        try:
            grants = await self._coordinator.exchange(reports)
        except Exception:
            # Keep admitting from held tokens; usage stays queued for the next exchange.
            self.failures += 1
            log.warning("quota exchange failed (%d so far)", self.failures, exc_info=True)
            return
        self.exchanges += 1
        for tenant, grant in grants.items():
            s = self._slices[tenant]
            used, returned, accel = snapshot[tenant]
            s.used -= used
            s.returned -= returned
            s.accel_ms -= accel
            if s.epoch != grant.epoch:
                s.tokens = 0  # a restarted coordinator does not know our old tokens
                s.epoch = grant.epoch
            s.tokens += grant.granted
            s.expires = sent + grant.ttl_s
            s.low_water = max(0, (reports[tenant].want + reports[tenant].held) // 4)
            s.short_limit, s.short_retry_s = grant.limit, grant.retry_after_s
            if grant.granted == 0 and grant.limit:
                s.deny_until = self._clock() + grant.retry_after_s
                s.deny_limit = grant.limit
                s.deny_mark = self.exchanges
            elif grant.granted:
                s.deny_until, s.deny_limit = 0.0, ""

    async def run(self) -> None:
        """Periodic exchanges: report usage, renew leases, return expired tokens."""
        while True:
            await asyncio.sleep(self.sync_interval_s)
            if self._clock() - self._last_sync >= self.sync_interval_s * 0.9:
                await self._sync()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    async def close(self) -> None:
        """Hand every held token back and report the last usage."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for s in self._slices.values():
            s.returned += s.tokens
            s.tokens = 0
            s.waiting = 0
            s.rate = 0.0
            s.attempts = 0
        await self._sync()


class LocalCoordinator:
    """A QuotaBook in this process, as one replica sees it (single-process servers and tests)."""

    def __init__(self, book: QuotaBook, replica: str):
        self.book = book
        self.replica = replica

    async def exchange(self, reports: dict[str, TenantReport]) -> dict[str, Grant]:
        return self.book.exchange(self.replica, reports)

    async def open_stream(self, tenant: str) -> Grant:
        return self.book.open_stream(self.replica, tenant)

    async def close_stream(self, tenant: str) -> None:
        self.book.close_stream(self.replica, tenant)
