"""The partner gate around the batcher: keys and plans per call, quota and metering per batch.

``AccessGate`` is what the ingress calls for every request when auth is on:
the key is looked up (verified once per replica and snapshot) and the model
checked against the plan. Its batch hook (``metering``) then admits the calls
of each batch, a quota token each, before the batch runs, and meters them all
in one spool write before any answer leaves. It
puts together the three per-replica parts: ``KeyCache`` (keys and plans,
refreshed from the ledger store every ``refresh_s``, so a revoked key stops
working on every replica within that time), ``ReplicaQuota`` (leased slices of
each tenant's limits) and ``UsageSpool`` (a usage record per admitted call).
Nothing here touches the database on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from serving import metrics as m
from serving.engine import NOT_ADMITTED
from serving.errors import RequestError, permission_denied, quota_exceeded, unauthenticated, unavailable
from serving.quota import keys
from serving.quota.leases import QuotaDenied, QuotaUnavailable, ReplicaQuota
from serving.quota.model import ApiKey, Tenant
from serving.quota.spool import UsageSpool, accel_share
from serving.quota.store import HeldStore, LedgerStore, open_store

if TYPE_CHECKING:
    from serving.engine import Outcome, Pending
    from serving.quota.leases import _Slice

    RunBatch = Callable[[list[Pending]], Awaitable[list[Outcome]]]

log = logging.getLogger(__name__)

FORCED_RELOAD_S = 0.25
MAX_VERIFIED = 100_000

# The same message for every bad key, so a caller learns nothing about which keys exist.
BAD_KEY = "missing, unknown or revoked API key; send 'authorization: Bearer <key>' metadata"


@dataclass(frozen=True)
class Caller:
    """An authenticated caller: the tenant (with its plan) and the public id of the key used."""

    tenant: Tenant
    key_id: str


class KeyCache:
    """Keys and tenants from the ledger store, held in memory and refreshed in the background."""

    def __init__(
        self,
        ledger_url: str,
        *,
        refresh_s: float = 1.0,
        store_factory: Callable[[str], LedgerStore] = open_store,
    ):
        self.refresh_s = refresh_s
        self._ledger = HeldStore(ledger_url, store_factory)
        self._keys: dict[str, ApiKey] = {}
        self._tenants: dict[str, Tenant] = {}
        # Authorization values (``Bearer <key>``, as sent) already checked against this
        # snapshot: the hot path is one dict lookup, not even a parse. Rebuilt empty
        # at every reload, so revocation still applies.
        self._verified: dict[str | bytes, Caller] = {}
        # Called after every reload: whoever caches more per verified value empties it too.
        self.on_reload: Callable[[], None] | None = None
        self._loaded_at = 0.0
        self._refreshing: asyncio.Task[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def _load(self) -> tuple[dict[str, ApiKey], dict[str, Tenant]]:
        return self._ledger.read(_keys_and_tenants)

    async def refresh(self) -> None:
        """Reload now (coalesced: concurrent callers share one reload)."""
        if self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._reload())
        task = self._refreshing
        try:
            await asyncio.shield(task)
        finally:
            if task.done() and self._refreshing is task:
                self._refreshing = None

    async def _reload(self) -> None:
        self._keys, self._tenants = await asyncio.to_thread(self._load)
        self._verified = {}
        self._loaded_at = time.monotonic()
        if self.on_reload is not None:
            self.on_reload()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:
                log.warning("key refresh failed; serving from the last snapshot", exc_info=True)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._refreshing is None:
            self._ledger.close()
        else:  # a reload in flight still reads the store: close it once that reload ends
            self._refreshing.add_done_callback(lambda _: self._ledger.close())

    def cached(self, header: str | bytes | None) -> Caller | None:
        """The caller for an authorization value already verified against the current snapshot."""
        return self._verified.get(header) if header is not None else None

    async def authenticate(self, header: str | bytes | None) -> Caller:
        """The caller an authorization value (``Bearer <key>``) belongs to, or UNAUTHENTICATED."""
        caller = await self.caller(keys.token_of(header))
        if header is not None and len(self._verified) < MAX_VERIFIED:
            self._verified[header] = caller
        return caller

    async def caller(self, token: str | None) -> Caller:
        """The caller a bearer token belongs to, or UNAUTHENTICATED."""
        key_id = keys.key_id_of(token) if token else None
        if key_id is None:
            raise unauthenticated(BAD_KEY)
        record = self._keys.get(key_id)
        if record is None:
            # Maybe issued since our last refresh. Reloads are coalesced and at most
            # every FORCED_RELOAD_S, so a flood of made-up keys cannot flood the store.
            wait = self._loaded_at + FORCED_RELOAD_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.refresh()
            record = self._keys.get(key_id)
        if record is None or record.revoked or not keys.matches(token, record):  # type: ignore[arg-type]
            raise unauthenticated(BAD_KEY)
        tenant = self._tenants.get(record.tenant)
        if tenant is None:
            raise unauthenticated(BAD_KEY)
        return Caller(tenant=tenant, key_id=key_id)


def _keys_and_tenants(store: LedgerStore) -> tuple[dict[str, ApiKey], dict[str, Tenant]]:
    return {k.key_id: k for k in store.list_keys()}, {t.name: t for t in store.list_tenants()}


class AccessGate:
    """Authenticate, authorize, admit and meter; the ingress's only view of partners."""

    def __init__(self, key_cache: KeyCache, quota: ReplicaQuota, spool: UsageSpool):
        self.keys = key_cache
        self.quota = quota
        self.spool = spool
        # Keys verified against the current snapshot, keyed like KeyCache's, each with
        # what admitting its calls reads; emptied with the KeyCache at every reload.
        self._passes: dict[str | bytes, KeyPass] = {}
        key_cache.on_reload = self._passes.clear

    async def start(self) -> None:
        await self.keys.start()
        self.quota.start()
        self.spool.recover_orphans()
        self.spool.start()

    async def close(self) -> None:
        self.keys.stop()
        try:
            await self.quota.close()
        finally:
            await asyncio.to_thread(self.spool.close)

    def metric_values(self) -> list[tuple[m.MetricDef, tuple[str, ...], float]]:
        """Lease exchanges, waits and the ledger's lag (read by the metrics snapshot)."""
        quota = self.quota
        return [
            (m.QUOTA_EXCHANGES, (), float(quota.exchanges)),
            (m.QUOTA_EXCHANGE_FAILURES, (), float(quota.failures)),
            (m.QUOTA_ADMISSION_WAITS, (), float(quota.waits)),
            *self.spool.metric_values(),
        ]

    def key_pass(self, metadata) -> KeyPass | None:
        """The pass of a key this replica verified against the current snapshot (None: ``verify`` it).

        The request loop's only gate step per call: one scan of the metadata and
        one dict lookup. Admission (a token) and metering happen per batch, in
        ``metering``, where a loop over the batch's calls runs with warm caches;
        live in W1, each call or object per request costs several times its
        tight-loop time (docs/benchmarks.md, ``python -m serving.bench.gatecost``).
        """
        header = keys.authorization(metadata)
        p = self._passes.get(header)  # type: ignore[arg-type]
        if p is None:
            caller = self.keys.cached(header)
            if caller is None:
                return None
            p = self._passes[header] = self._pass_of(caller)
        return p

    async def verify(self, metadata) -> KeyPass:
        """``key_pass`` the slow way: the key is checked against the ledger's keys (UNAUTHENTICATED if bad)."""
        caller = await self.keys.authenticate(keys.authorization(metadata))
        # A reload between the two lookups empties the cache: the pass is then made afresh.
        return self.key_pass(metadata) or self._pass_of(caller)

    def _pass_of(self, caller: Caller) -> KeyPass:
        tenant = caller.tenant
        return KeyPass(
            caller, tenant.name, caller.key_id, tenant.plan.allowed_models(), self.quota.slice_of(tenant.name)
        )

    @staticmethod
    def authorize(key: KeyPass, model: str) -> None:
        if key.models is not None and model not in key.models:
            raise permission_denied("observation.model", f"model {model!r} is not in your plan")

    async def admit(self, caller: Caller) -> None:
        """Take a token for one call the slow way: wait for an exchange, or RESOURCE_EXHAUSTED / UNAVAILABLE."""
        with _as_request_errors(caller):
            await self.quota.admit(caller.tenant.name)

    def admit_batch(self, items: Sequence[Pending]) -> list[Pending]:
        """Admit a batch's calls not admitted yet: a token each from their tenant's slice on this replica.

        Returns the calls the slice had no token for (nearly always none): their
        ingress admits them the slow way and submits them again. A call whose
        caller has gone is not admitted, so it is neither charged nor metered.
        """
        dry: list[Pending] = []
        take = self.quota.take
        for item in items:
            p = item.key
            if p is not None and not item.admitted and not item.cancelled:
                if take(p.slice):
                    item.admitted = True
                else:
                    dry.append(item)
        return dry

    async def open_stream(self, caller: Caller) -> None:
        with _as_request_errors(caller):
            await self.quota.open_stream(caller.tenant.name)

    async def close_stream(self, caller: Caller) -> None:
        await self.quota.close_stream(caller.tenant.name)

    @staticmethod
    def usage(key: KeyPass, robot_id: str, embodiment: str, request_id: str, received: float) -> tuple:
        """The start of a call's usage record, in serving.quota.spool.CALL_FIELDS order:
        (tenant, key id, robot id, embodiment, request id, received_at as wall time;
        ``received`` is ``time.monotonic()``). Its outcome adds status, batch size and
        queue ms. ``record_batch`` builds the same tuple inline.
        """
        wall = received + time.time() - time.monotonic()
        return (key.tenant, key.key_id, robot_id, embodiment, request_id, wall)

    def record(
        self, usage: tuple, model: str, status: str, outcome: Outcome | None, pending: Pending | None = None
    ) -> None:
        """Meter one admitted call that did not come back from a batch (refused, failed, cancelled).

        ``pending``, once the call has one, is marked metered first: a batch that
        still runs it (its caller cancelled) must not meter it again.
        """
        if pending is not None:
            if pending.metered:
                return
            pending.metered = True
        batch_size = outcome.batch_size if outcome else 0
        call = usage + (status, batch_size, outcome.queue_ms if outcome else 0.0)
        compute_ms = outcome.compute_ms if batch_size else 0.0  # type: ignore[union-attr]
        try:
            self.spool.append_batch(model, compute_ms, time.time(), [call])  # durable from here
        except BaseException:
            if pending is not None:
                pending.metered = False
            raise
        if batch_size:
            self._charge({usage[0]: accel_share(compute_ms, batch_size)}, model)

    def record_batch(self, items: Sequence[Pending], outcomes: Sequence[Outcome], model: str) -> None:
        """Meter the admitted calls of a batch of ``model`` at once, before any of its answers leaves.

        One spool record for the batch, its shared fields written once, and no
        function call per call: the replica's request loop is the W1 bottleneck,
        and live every step here costs several times its tight-loop time
        (docs/benchmarks.md).
        """
        calls: list[tuple] = []
        metered: list[Pending] = []
        charged: list[str] = []  # the tenant of each call that reached the policy
        compute_ms, size = 0.0, 0
        finished_at = time.time()
        to_wall = finished_at - time.monotonic()
        for item, outcome in zip(items, outcomes, strict=True):
            p = item.key
            if p is not None and item.admitted and not item.metered:
                error = outcome.error
                obs = item.observation
                calls.append(
                    (
                        p.tenant,
                        p.key_id,
                        obs.robot_id,
                        obs.embodiment,
                        item.request_id,
                        item.received + to_wall,
                        "OK" if error is None else error.code.name,
                        outcome.batch_size,
                        outcome.queue_ms,
                    )
                )
                metered.append(item)
                if outcome.batch_size:  # reached the policy: all such calls share one compute
                    compute_ms, size = outcome.compute_ms, outcome.batch_size
                    charged.append(p.tenant)
        if not calls:
            return
        self.spool.append_batch(model, compute_ms, finished_at, calls)  # durable from here
        for item in metered:
            item.metered = True
        if charged:
            share = accel_share(compute_ms, size)
            charges: dict[str, float] = {}
            for tenant in charged:
                charges[tenant] = charges.get(tenant, 0.0) + share
            self._charge(charges, model)

    def metering(self, run_batch: RunBatch, model: str) -> RunBatch:
        """``run_batch`` of ``model`` that first admits each call of the batch (``admit_batch``)
        and then meters every admitted one (``record_batch``)."""

        async def admit_run_and_meter(items: list[Pending]) -> list[Outcome]:
            dry = self.admit_batch(items)
            if dry:
                return await self._run_admitted(run_batch, items, dry, model)
            outcomes = await run_batch(items)
            self.record_batch(items, outcomes, model)
            return outcomes

        return admit_run_and_meter

    async def _run_admitted(
        self, run_batch: RunBatch, items: list[Pending], dry: list[Pending], model: str
    ) -> list[Outcome]:
        """A batch with calls ``admit_batch`` found no token for: the others run, and those
        go back to their ingress as ``NOT_ADMITTED``."""
        refused = {id(item) for item in dry}
        admitted = [item for item in items if id(item) not in refused]
        outcomes = await run_batch(admitted) if admitted else []
        self.record_batch(admitted, outcomes, model)
        ran = iter(outcomes)
        return [NOT_ADMITTED if id(item) in refused else next(ran) for item in items]

    def _charge(self, accel_ms_by_tenant: dict[str, float], model: str) -> None:
        for tenant, accel_ms in accel_ms_by_tenant.items():
            self.quota.charge(tenant, accel_ms)
            m.METRICS.inc(m.TENANT_ACCEL_SECONDS, (tenant, model), accel_ms / 1e3)


@dataclass(frozen=True, slots=True, eq=False)
class KeyPass:
    """A key verified on this replica, with what admitting and metering its calls reads, in one lookup."""

    caller: Caller
    tenant: str
    key_id: str
    models: frozenset[str] | None  # None: any model
    slice: _Slice  # the tenant's quota slice on this replica


_LIMIT_TEXT = {
    "rate": "call rate",
    "monthly_calls": "monthly call budget",
    "monthly_accel_ms": "monthly accelerator-time budget",
    "streams": "concurrent stream cap",
    "unknown_tenant": "plan (not loaded yet)",
}


@contextlib.contextmanager
def _as_request_errors(caller: Caller) -> Iterator[None]:
    """Quota refusals as the statuses robots get: RESOURCE_EXHAUSTED (with details) or UNAVAILABLE."""
    try:
        yield
    except QuotaDenied as err:
        m.METRICS.inc(m.QUOTA_REJECTIONS, (caller.tenant.name, err.limit))
        raise _quota_error(caller, err) from None
    except QuotaUnavailable as err:
        m.METRICS.inc(m.QUOTA_REJECTIONS, (caller.tenant.name, "unavailable"))
        raise unavailable(f"quota service unavailable, retry: {err}") from None


def _quota_error(caller: Caller, err: QuotaDenied) -> RequestError:
    plan = caller.tenant.plan
    what = _LIMIT_TEXT.get(err.limit, err.limit)
    limits = {
        "rate": f"{plan.rate_per_s:g} calls/s, burst {plan.burst}",
        "monthly_calls": f"{plan.monthly_calls} calls",
        "monthly_accel_ms": f"{plan.monthly_accel_ms} accelerator-ms",
        "streams": f"{plan.max_streams} streams",
    }
    detail = f"over the {what} of tenant {caller.tenant.name!r}"
    if err.limit in limits:
        detail += f" ({limits[err.limit]})"
    return quota_exceeded(f"tenant:{caller.tenant.name}", err.limit, detail, err.retry_after_s)
