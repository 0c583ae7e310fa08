"""Partners at the front door, without Ray: keys, plans, quota errors and metering.

The real ingress (grpc.aio) runs with a real AccessGate: keys and plans from a
real ledger (SQLite and PostgreSQL), a QuotaBook in process, and a usage spool
flushed to the same ledger. The Ray path is tests/test_partners_e2e.py.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest

from serving.client import RobotClient
from serving.client._common import NO_RETRY
from serving.client.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unauthenticated
from serving.errors import RequestError
from serving.quota.coordinator import read_plans
from serving.quota.gate import BAD_KEY, AccessGate, KeyCache
from serving.quota.keys import new_key
from serving.quota.leases import LocalCoordinator, QuotaBook, ReplicaQuota
from serving.quota.model import Plan, Tenant
from serving.quota.spool import UsageSpool
from serving.quota.store import HeldStore, StoreError, open_store
from tests.policies import ARM, EchoPolicy
from tests.servers import IngressThread

OBS = {"images": {"front": np.zeros((8, 8, 3), np.uint8)}, "state": [1.0, 2.0, 3.0], "embodiment": ARM.name}


def add_tenant(url: str, name: str, plan: Plan) -> str:
    with open_store(url) as store:
        store.create_tenant(Tenant(name, plan))
        plaintext, record = new_key(name)
        store.add_key(record)
    return plaintext


class Partners:
    """An ingress with auth on, over one ledger, and helpers to look inside."""

    def __init__(self, url: str, spool_dir, refresh_s: float = 0.2):
        self.url = url
        self.book = QuotaBook(lease_ttl_s=1.0)
        self.spool_dir = spool_dir
        self.refresh_s = refresh_s

    async def make_gate(self) -> AccessGate:
        with open_store(self.url) as store:
            self.book.set_plans({t.name: t.plan for t in store.list_tenants()})
        gate = AccessGate(
            KeyCache(self.url, refresh_s=self.refresh_s),
            ReplicaQuota(LocalCoordinator(self.book, "r0")),
            UsageSpool(self.spool_dir, self.url, flush_interval_s=0.05),
        )
        await gate.start()
        return gate


@pytest.fixture()
def partners(ledger_url, tmp_path):
    acme = add_tenant(ledger_url, "acme", Plan(rate_per_s=1000, burst=1000, models=("echo",), max_streams=2))
    slow = add_tenant(ledger_url, "slowco", Plan(rate_per_s=5, burst=2))
    other = add_tenant(ledger_url, "otherco", Plan(models=("someone-elses-model",)))
    p = Partners(ledger_url, tmp_path / "spool")
    with IngressThread(EchoPolicy(), gate=p.make_gate) as srv:
        p.server = srv
        p.keys = {"acme": acme, "slowco": slow, "otherco": other}
        yield p


def usage(url: str, tenant: str | None = None):
    with open_store(url) as store:
        return store.list_usage(tenant)


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return predicate()


@pytest.mark.parametrize(
    "key",
    ["", "not-a-key", "sb_000000000000_wrongsecret", "Bearer-less"],
)
def test_bad_keys_are_unauthenticated_and_never_echoed(partners, key):
    with RobotClient(partners.server.address, api_key=key, retry=NO_RETRY) as robot:
        with pytest.raises(Unauthenticated) as info:
            robot.act(**OBS)
    assert info.value.details == BAD_KEY
    if key:
        assert key not in str(info.value)


def test_a_right_key_id_with_a_wrong_secret_is_refused(partners):
    real = partners.keys["acme"]
    forged = real[: real.rindex("_") + 1] + "x" * 43
    with RobotClient(partners.server.address, api_key=forged, retry=NO_RETRY) as robot:
        with pytest.raises(Unauthenticated):
            robot.act(**OBS)


def test_the_key_cache_is_keyed_by_the_header_as_sent_and_emptied_by_a_reload(ledger_url):
    """The hot path looks the raw authorization value up; only verified values get in."""
    import asyncio

    key = add_tenant(ledger_url, "acme", Plan())
    cache = KeyCache(ledger_url, refresh_s=60)

    async def scenario():
        await cache.start()
        try:
            for header in (f"Bearer {key}", f"bearer {key}", f"Bearer {key}".encode()):
                assert cache.cached(header) is None
                assert (await cache.authenticate(header)).tenant.name == "acme"
                assert cache.cached(header).key_id == key.split("_")[1]
            forged = f"Bearer {key[:-4]}xxxx"
            with pytest.raises(RequestError):
                await cache.authenticate(forged)
            assert cache.cached(forged) is None
            with open_store(ledger_url) as store:
                store.revoke_key(key.split("_")[1])
            await cache.refresh()
            assert cache.cached(f"Bearer {key}") is None
            with pytest.raises(RequestError):
                await cache.authenticate(f"Bearer {key}")
        finally:
            cache.stop()

    asyncio.run(scenario())


def test_stopping_the_key_cache_during_a_reload_closes_its_store_after_the_reload(ledger_url):
    """No ledger connection is left open, and none is closed under a reload still reading it."""
    import asyncio
    import threading

    add_tenant(ledger_url, "acme", Plan())
    hold, reading, release = threading.Event(), threading.Event(), threading.Event()
    stores = []

    class PausableStore:
        """The real store; with ``hold`` set, the next reload waits inside it for ``release``."""

        def __init__(self, url):
            self.inner = open_store(url)
            self.closed = False
            stores.append(self)

        def list_keys(self):
            if hold.is_set():
                hold.clear()
                reading.set()
                release.wait(10)
            return self.inner.list_keys()

        def list_tenants(self):
            assert not self.closed, "store closed under a reload"
            return self.inner.list_tenants()

        def close(self):
            self.closed = True
            self.inner.close()

    cache = KeyCache(ledger_url, refresh_s=60, store_factory=PausableStore)

    async def scenario():
        await cache.start()
        hold.set()
        reload = asyncio.ensure_future(cache.refresh())
        await asyncio.to_thread(reading.wait, 10)  # the reload is inside the store now
        cache.stop()
        assert not stores[0].closed
        release.set()
        await reload  # raises if the store was closed under it
        await asyncio.sleep(0)  # the reload task's done callbacks run
        assert [store.closed for store in stores] == [True]

    asyncio.run(scenario())


def test_a_key_pass_needs_a_verified_key_and_tokens_are_taken_per_batch(ledger_url, tmp_path):
    """The request loop only looks the key up; the batch takes a token per call, or hands the
    calls its slice has no token for back to the ingress, taking nothing for them."""
    import asyncio

    from serving.engine import Pending

    key = add_tenant(ledger_url, "acme", Plan(rate_per_s=1000, burst=1000, models=("echo",)))
    book = QuotaBook(lease_ttl_s=60.0)
    with open_store(ledger_url) as store:
        book.set_plans({t.name: t.plan for t in store.list_tenants()})
    # A long horizon, so the slow path's exchange leases more than the one token it takes.
    quota = ReplicaQuota(LocalCoordinator(book, "r0"), horizon_s=100.0)
    gate = AccessGate(KeyCache(ledger_url, refresh_s=60), quota, UsageSpool(tmp_path / "spool", ledger_url))
    metadata = (("user-agent", "test"), ("authorization", f"Bearer {key}"))

    def calls(n: int, **fields) -> list[Pending]:
        return [Pending(None, deadline=0.0, key=passed, request_id=f"r{i}", **fields) for i in range(n)]  # type: ignore[arg-type]

    async def scenario():
        nonlocal passed
        await gate.start()
        try:
            assert gate.key_pass(metadata) is None  # not verified on this replica yet
            passed = await gate.verify(metadata)
            assert gate.key_pass(metadata) is passed
            assert (passed.tenant, passed.caller.tenant.name) == ("acme", "acme")
            for refused_metadata in [
                (("authorization", f"Bearer {key[:-1]}x"),),
                (("user-agent", "test"),),
                None,
            ]:
                assert gate.key_pass(refused_metadata) is None
            with pytest.raises(RequestError) as denied:
                gate.authorize(passed, "someone-elses-model")
            assert denied.value.code == grpc.StatusCode.PERMISSION_DENIED
            gate.authorize(passed, "echo")

            # No tokens leased yet: the whole batch goes back, nothing taken.
            batch = calls(3)
            assert gate.admit_batch(batch) == batch
            assert not any(item.admitted for item in batch)
            await asyncio.sleep(0.2)  # the bucket refills
            await gate.admit(passed.caller)  # the slow path: waits for a lease
            held = quota._slices["acme"].tokens
            assert held > 5
            exported = {metric.name: value for metric, _, value in gate.metric_values()}
            assert exported["superbrain_quota_admission_waits"] == 1
            assert exported["superbrain_quota_exchanges"] >= 1
            assert gate.admit_batch(batch) == []
            assert all(item.admitted for item in batch)
            assert quota._slices["acme"].tokens == held - 3
            # Admitted already (the slow path, or an earlier batch), or its caller gone: no token.
            assert gate.admit_batch(batch + calls(2, cancelled=True)) == []
            assert quota._slices["acme"].tokens == held - 3

            # What is remembered per key goes with every reload: a revoked key is refused at once.
            with open_store(ledger_url) as store:
                store.revoke_key(key.split("_")[1])
            await gate.keys.refresh()
            assert gate.key_pass(metadata) is None
            with pytest.raises(RequestError) as revoked:
                await gate.verify(metadata)
            assert revoked.value.code == grpc.StatusCode.UNAUTHENTICATED
        finally:
            await gate.close()

    passed = None
    asyncio.run(scenario())


def test_describe_needs_a_key_too(partners):
    with RobotClient(partners.server.address, api_key="", retry=NO_RETRY) as robot:
        with pytest.raises(Unauthenticated):
            robot.describe()
    with RobotClient(partners.server.address, api_key=partners.keys["acme"]) as robot:
        assert robot.describe().models[0].name == "echo"


def test_model_outside_the_plan_is_permission_denied(partners):
    with RobotClient(partners.server.address, api_key=partners.keys["otherco"], retry=NO_RETRY) as robot:
        with pytest.raises(PermissionDenied) as info:
            robot.act(**OBS)
    assert "observation.model" in info.value.details and "echo" in info.value.details
    assert usage(partners.url, "otherco") == []  # refused before admission: not metered


def test_revoked_key_stops_working_within_the_refresh_interval(partners):
    with RobotClient(partners.server.address, api_key=partners.keys["acme"], retry=NO_RETRY) as robot:
        robot.act(**OBS)
        key_id = partners.keys["acme"].split("_")[1]
        with open_store(partners.url) as store:
            store.revoke_key(key_id)
        revoked_at = time.monotonic()
        while True:
            try:
                robot.act(**OBS)
            except Unauthenticated:
                break
            assert time.monotonic() - revoked_at < 3.0, "revocation did not take effect"
            time.sleep(0.02)


def test_a_key_issued_while_serving_works_at_once(partners):
    key = add_tenant(partners.url, "newco", Plan())
    partners.book.set_plans({"newco": Plan()})  # the real coordinator actor reloads plans itself
    with RobotClient(partners.server.address, api_key=key, retry=NO_RETRY) as robot:
        assert robot.act(**OBS).actions.shape == (ARM.chunk_length, ARM.action_dim)


def test_over_rate_is_resource_exhausted_with_quota_failure_and_retry_info(partners):
    time.sleep(0.5)  # buckets start nearly empty (leases.py): let slowco's refill to its burst
    with RobotClient(partners.server.address, api_key=partners.keys["slowco"], retry=NO_RETRY) as robot:
        ok, errors = 0, []
        for _ in range(20):
            try:
                robot.act(**OBS)
                ok += 1
            except ResourceExhausted as err:
                errors.append(err)
    assert ok >= 1 and errors
    err = errors[0]
    assert err.limit == "rate"
    assert err.quota_violations[0].subject == "tenant:slowco"
    assert "5 calls/s" in err.details
    assert 0 < err.retry_after_s <= 1.0


def test_sdk_waits_out_the_retry_hint_within_the_deadline(partners):
    with RobotClient(partners.server.address, api_key=partners.keys["slowco"], timeout=5.0) as robot:
        start = time.monotonic()
        for _ in range(6):
            robot.act(**OBS)  # at 5 calls/s, the SDK's honouring of RetryInfo paces us
    assert time.monotonic() - start >= 0.5


def test_stream_cap_and_step_errors_carry_quota_details(partners):
    address = partners.server.address
    obs = {"images": OBS["images"], "state": OBS["state"]}
    with RobotClient(address, api_key=partners.keys["acme"], retry=NO_RETRY) as robot:
        s1, s2, s3 = (robot.stream(ARM.name) for _ in range(3))
        s1.act(**obs)
        s2.act(**obs)
        with pytest.raises(ResourceExhausted) as info:
            s3.act(**obs)  # acme may hold 2 streams at once
        assert info.value.limit == "streams"
        s1.close()
        time.sleep(0.2)
        s3.act(**obs)  # a slot came free
        s2.close()
        s3.close()
    time.sleep(0.5)  # let slowco's bucket refill
    with RobotClient(address, api_key=partners.keys["slowco"], retry=NO_RETRY) as robot:
        session = robot.stream(ARM.name)
        errors = []
        for _ in range(10):
            try:
                session.act(**obs)
            except ResourceExhausted as err:
                errors.append(err)
        session.close()
    assert errors and errors[0].limit == "rate" and errors[0].retry_after_s > 0


def test_every_admitted_call_is_metered_once_with_its_fields(partners):
    key = partners.keys["acme"]
    with RobotClient(partners.server.address, api_key=key) as robot:
        with ThreadPoolExecutor(8) as pool:
            chunks = list(pool.map(lambda i: robot.act(**OBS, robot_id=f"bot-{i % 4}"), range(40)))
        with pytest.raises(InvalidArgument):  # admitted, then invalid: metered with its status
            robot.act(images=OBS["images"], state=[1.0], embodiment=ARM.name, robot_id="bot-bad")
    records = wait_for(lambda: len(usage(partners.url, "acme")) == 41 and usage(partners.url, "acme"))
    assert records, f"expected 41 usage records, got {len(usage(partners.url, 'acme'))}"
    assert len({r.id for r in records}) == 41
    ok = [r for r in records if r.status == "OK"]
    assert len(ok) == 40
    assert {r.request_id for r in ok} == {c.request_id for c in chunks}
    assert {r.robot_id for r in ok} == {"bot-0", "bot-1", "bot-2", "bot-3"}
    r = ok[0]
    assert r.key_id == key.split("_")[1] and r.model == "echo" and r.embodiment == ARM.name
    assert r.batch_size >= 1 and r.accel_ms >= 0 and r.finished_at >= r.received_at
    bad = [r for r in records if r.status != "OK"]
    assert [b.status for b in bad] == ["INVALID_ARGUMENT"] and bad[0].robot_id == "bot-bad"
    # No secret ever reaches the ledger.
    assert key.split("_", 2)[2] not in repr(records)


def test_auth_off_is_refused_on_a_public_address():
    from pydantic import ValidationError

    from serving.config import ServingConfig

    with pytest.raises(ValidationError, match="auth is off"):
        ServingConfig(host="0.0.0.0", auth=False)
    ServingConfig(host="127.0.0.1", auth=False)
    ServingConfig(host="0.0.0.0")  # auth on by default


def test_raw_grpc_gets_unauthenticated_status(partners):
    from serving.api import pb, pb_grpc

    with grpc.insecure_channel(partners.server.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.PolicyServiceStub(ch).Act(pb.ActRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_batch_is_metered_in_one_spool_write_before_its_answers(ledger_url, tmp_path):
    """The batcher's hook: each admitted call metered once, with its own status, in one write."""
    import asyncio

    from serving.engine import Pending, PolicyEngine
    from serving.policy.base import PolicyObservation

    key = add_tenant(ledger_url, "acme", Plan(rate_per_s=1000, burst=1000))
    p = Partners(ledger_url, tmp_path / "spool")

    async def scenario():
        gate = await p.make_gate()
        passed = await gate.verify((("authorization", f"Bearer {key}"),))
        await gate.admit(passed.caller)  # leases a slice
        # Its size follows the bucket's refill so far; the batch needs five tokens, so
        # that no call here takes the NOT_ADMITTED path (tested on its own below).
        passed.slice.tokens = max(passed.slice.tokens, 5)
        now = time.monotonic()
        items = []
        for i in range(7):
            obs = PolicyObservation(
                ARM.name, {"head": np.zeros((8, 8, 3), np.uint8)}, np.ones(3, np.float32), robot_id=f"bot-{i}"
            )
            # req-4 is already past its deadline. req-5's caller went away after its admission,
            # and the ingress recorded it; req-6's went away before: never admitted, never metered.
            deadline = now - 1 if i == 4 else now + 10
            items.append(
                Pending(obs, deadline=deadline, received=now, key=passed, request_id=f"req-{i}", cancelled=i >= 5)
            )
        items[5].admitted = True
        usage5 = gate.usage(passed, "bot-5", ARM.name, "req-5", now)
        gate.record(usage5, "echo", "CANCELLED", None, items[5])
        gate.record(usage5, "echo", "CANCELLED", None, items[5])  # a second try writes nothing
        writes = gate.spool.writes
        outcomes = await gate.metering(PolicyEngine(EchoPolicy(), offload=False).run_batch, "echo")(items)
        assert gate.spool.writes == writes + 1
        assert [item.metered for item in items] == [True] * 6 + [False]
        assert not items[6].admitted
        charged = gate.quota._slice("acme").accel_ms
        await gate.close()
        return outcomes, charged

    outcomes, charged = asyncio.run(scenario())
    records = {r.request_id: r for r in usage(ledger_url, "acme")}
    assert len(records) == 6
    assert {records[f"req-{i}"].status for i in range(4)} == {"OK"}
    assert records["req-4"].status == "DEADLINE_EXCEEDED" and records["req-5"].status == "CANCELLED"
    assert records["req-2"].robot_id == "bot-2" and records["req-2"].embodiment == ARM.name
    assert abs(records["req-2"].received_at - time.time()) < 60  # wall time, not the monotonic clock
    assert all(records[f"req-{i}"].batch_size == 4 for i in range(4))
    assert records["req-0"].accel_ms == pytest.approx(outcomes[0].compute_ms / 4)
    assert charged == pytest.approx(sum(r.accel_ms for r in records.values()))


def test_a_batch_runs_the_calls_it_admitted_and_hands_the_rest_back_in_order(ledger_url, tmp_path):
    """Calls the replica's slice has no token for do not run: they come back NOT_ADMITTED, in their
    places, unmetered, for their ingress to admit the slow way (or refuse)."""
    import asyncio

    from serving.engine import NOT_ADMITTED, Pending, PolicyEngine
    from serving.policy.base import PolicyObservation

    key = add_tenant(ledger_url, "acme", Plan(rate_per_s=1000, burst=1000))
    p = Partners(ledger_url, tmp_path / "spool")
    ran: list[list[str]] = []

    async def scenario():
        gate = await p.make_gate()
        passed = await gate.verify((("authorization", f"Bearer {key}"),))
        await gate.admit(passed.caller)  # leases a slice
        passed.slice.tokens = 2  # as if the rest had been spent
        engine = PolicyEngine(EchoPolicy(), offload=False)

        async def run_batch(items):
            ran.append([item.request_id for item in items])
            return await engine.run_batch(items)

        obs = PolicyObservation(ARM.name, {"head": np.zeros((8, 8, 3), np.uint8)}, np.ones(3, np.float32))
        now = time.monotonic()
        items = [Pending(obs, deadline=now + 10, received=now, key=passed, request_id=f"req-{i}") for i in range(4)]
        items[0].admitted = True  # admitted by its ingress already: takes no token
        outcomes = await gate.metering(run_batch, "echo")(items)
        await gate.close()
        return items, outcomes

    items, outcomes = asyncio.run(scenario())
    assert ran == [["req-0", "req-1", "req-2"]]
    assert [o is NOT_ADMITTED for o in outcomes] == [False, False, False, True]
    assert all(o.actions is not None for o in outcomes[:3])
    assert [(item.admitted, item.metered) for item in items] == [(True, True)] * 3 + [(False, False)]
    assert sorted(r.request_id for r in usage(ledger_url, "acme")) == ["req-0", "req-1", "req-2"]


class _FlakyStore:
    """A real store whose reads can be made to fail, as when the ledger restarts."""

    def __init__(self, store):
        self.store = store
        self.failing = False
        self.closed = False

    def list_tenants(self):
        if self.failing:
            raise StoreError("the ledger went away")
        return self.store.list_tenants()

    def usage_totals(self, since, until):
        return self.store.usage_totals(since, until)

    def close(self):
        self.closed = True
        self.store.close()


def test_polled_ledger_reads_share_one_store_and_reopen_it_after_a_failure(ledger_url):
    opened: list[_FlakyStore] = []

    def factory(url):
        opened.append(_FlakyStore(open_store(url)))
        return opened[-1]

    ledger = HeldStore(ledger_url, store_factory=factory)
    try:
        add_tenant(ledger_url, "acme", Plan(rate_per_s=5, burst=2))
        plans, totals = ledger.read(lambda store: read_plans(store, with_usage=True))
        assert plans["acme"].rate_per_s == 5
        assert totals is not None and "acme" not in totals  # nothing metered yet
        with open_store(ledger_url) as store:
            store.update_tenant("acme", Plan(rate_per_s=50, burst=2))
        plans, totals = ledger.read(lambda store: read_plans(store, with_usage=False))
        assert plans["acme"].rate_per_s == 50  # the held store sees the change
        assert totals is None
        assert len(opened) == 1  # no new connection (and schema check) per reread

        opened[0].failing = True
        with pytest.raises(StoreError):
            ledger.read(lambda store: read_plans(store, with_usage=False))
        assert opened[0].closed
        plans, _ = ledger.read(lambda store: read_plans(store, with_usage=False))  # a fresh store
        assert plans["acme"].rate_per_s == 50
        assert len(opened) == 2
    finally:
        ledger.close()
    assert opened[1].closed
