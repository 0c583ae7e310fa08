"""The ledger stores against real databases: every test runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import calendar
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from serving.quota.model import ApiKey, Plan, ReportRow, Tenant, TenantTotals, UsageRecord
from serving.quota.store import AlreadyExists, LedgerStore, NotFound, StoreError, open_store

# 2026-11-21T00:00:00Z
DAY0 = float(calendar.timegm((2026, 11, 21, 0, 0, 0)))
HOUR = 3600.0


def rec(
    i: int | str,
    tenant: str = "acme",
    at: float = DAY0,
    model: str = "vla",
    status: str = "OK",
    accel_ms: float = 1.0,
) -> UsageRecord:
    return UsageRecord(
        id=f"u{i:06d}" if isinstance(i, int) else i,
        tenant=tenant,
        key_id="k1",
        robot_id="robot-7",
        model=model,
        embodiment="franka_arm",
        status=status,
        batch_size=4,
        accel_ms=accel_ms,
        queue_ms=0.25,
        received_at=at,
        finished_at=at + 0.02,
        request_id=f"req-{i}",
    )


def test_open_store_accepts_the_documented_urls_only(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel/ledger.db") as store:
        assert isinstance(store, LedgerStore)
        assert store.list_tenants() == []
    assert (tmp_path / "rel" / "ledger.db").exists()
    with open_store(f"sqlite:///{tmp_path}/abs/deeper/ledger.db") as store:
        store.create_tenant(Tenant("acme"))
    assert (tmp_path / "abs" / "deeper" / "ledger.db").exists()

    for bad in ("mysql://admin:hunter2@db/ledger", "sqlite://ledger.db", "ledger.db", "sqlite:///"):
        with pytest.raises(ValueError, match="sqlite:///") as err:
            open_store(bad)
        assert "hunter2" not in str(err.value)
    # A server that is not there: a StoreError that does not leak the password.
    with pytest.raises(StoreError) as err:
        open_store("postgresql://admin:hunter2@127.0.0.1:1/ledger")
    assert "hunter2" not in str(err.value) and "***" in str(err.value)


def test_sqlite_store_uses_wal_and_waits_for_locks(sqlite_ledger_url) -> None:
    with open_store(sqlite_ledger_url) as store:
        conn: sqlite3.Connection = store._conn  # type: ignore[attr-defined]
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 10_000
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL


WRITER_PROCESS = """
import sys, time
from pathlib import Path
from serving.quota.model import UsageRecord
from serving.quota.store import open_store

url, k, sync = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
(sync / f"ready-{k}").touch()
while not (sync / "go").exists():
    time.sleep(0.001)
new = 0
with open_store(url) as store:
    for b in range(10):
        ids = range(k * 500 + b * 100, k * 500 + b * 100 + 200)
        new += store.insert_usage([
            UsageRecord(id=f"u{i:06d}", tenant="acme", key_id="k", robot_id="r", model="m", embodiment="e",
                        status="OK", batch_size=1, accel_ms=0.5, queue_ms=0.0, received_at=1.8e9 + i,
                        finished_at=1.8e9 + i)
            for i in ids
        ])
print(new)
"""


def test_sqlite_ledger_is_shared_by_processes(sqlite_ledger_url, tmp_path) -> None:
    """Replicas' flushers and the CLI are separate processes: a new file, opened and written by 4 at once."""
    n = 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER_PROCESS, sqlite_ledger_url, str(k), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(n)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < n and time.monotonic() < deadline:
        time.sleep(0.005)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * n, [err for _, err in results]
    unique = (n - 1) * 500 + 1100
    assert sum(int(out) for out, _ in results) == unique
    with open_store(sqlite_ledger_url) as store:
        assert store.usage_totals(0, 2e10) == {"acme": TenantTotals(calls=unique, accel_ms=unique * 0.5)}


def test_migrate_is_idempotent_and_safe_when_many_open_at_once(ledger_url) -> None:
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def opener() -> None:
        try:
            barrier.wait()
            with open_store(ledger_url) as store:
                store.migrate()
                store.list_tenants()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=opener) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with open_store(ledger_url) as store:
        store.migrate()
        assert store.list_tenants() == []


def test_tenant_crud(ledger_url) -> None:
    plan = Plan(rate_per_s=2.5, burst=10, monthly_calls=1000, monthly_accel_ms=12.5, models=("a", "b"), max_streams=3)
    with open_store(ledger_url) as store:
        assert store.get_tenant("acme") is None
        created = store.create_tenant(Tenant("acme", plan, created_at=1700000000.5))
        assert created == Tenant("acme", plan, created_at=1700000000.5)
        store.create_tenant(Tenant("beta"))
        with pytest.raises(AlreadyExists):
            store.create_tenant(Tenant("acme"))
        assert store.get_tenant("acme") == created
        assert [t.name for t in store.list_tenants()] == ["acme", "beta"]

        new_plan = Plan(rate_per_s=9.0, monthly_calls=None)
        updated = store.update_tenant("acme", new_plan)
        assert updated == Tenant("acme", new_plan, created_at=1700000000.5)
        with pytest.raises(NotFound):
            store.update_tenant("nobody", new_plan)
    # A second connection sees what the first committed.
    with open_store(ledger_url) as other:
        assert other.get_tenant("acme") == updated
        assert other.get_tenant("beta") == Tenant("beta")


def test_keys_add_revoke_list(ledger_url) -> None:
    with open_store(ledger_url) as store:
        store.create_tenant(Tenant("acme"))
        store.create_tenant(Tenant("beta"))
        k1 = ApiKey("aaaaaaaaaaaa", "acme", "h1", label="lab", created_at=100.0)
        k2 = ApiKey("bbbbbbbbbbbb", "acme", "h2", created_at=200.0)
        k3 = ApiKey("cccccccccccc", "beta", "h3", created_at=150.0)
        for k in (k1, k2, k3):
            store.add_key(k)
        with pytest.raises(NotFound):
            store.add_key(ApiKey("dddddddddddd", "nobody", "h4"))
        with pytest.raises(AlreadyExists):
            store.add_key(k1)

        assert store.get_key("aaaaaaaaaaaa") == k1
        assert store.get_key("nope") is None
        assert store.list_keys() == [k1, k2, k3]
        assert store.list_keys("acme") == [k1, k2]
        assert store.list_keys("nobody") == []

        revoked = store.revoke_key("aaaaaaaaaaaa", now=500.0)
        assert revoked.revoked_at == 500.0 and revoked.revoked
        assert store.revoke_key("aaaaaaaaaaaa", now=900.0).revoked_at == 500.0  # the first revocation stands
        assert store.revoke_key("bbbbbbbbbbbb").revoked_at == pytest.approx(time.time(), abs=60)
        with pytest.raises(NotFound):
            store.revoke_key("nope")
        assert store.get_key("aaaaaaaaaaaa").revoked_at == 500.0
        assert store.get_key("cccccccccccc").revoked_at is None


def test_insert_usage_is_idempotent_on_id(ledger_url) -> None:
    records = [rec(i, at=DAY0 + i) for i in range(1000)]
    with open_store(ledger_url) as store:
        assert store.insert_usage([]) == 0
        assert store.insert_usage(records) == 1000
        assert store.insert_usage(records) == 0
        # Overlapping batches count only the new ones, duplicates inside a batch once.
        assert store.insert_usage([rec(i, at=DAY0 + i) for i in range(900, 1200)]) == 200
        assert store.insert_usage([rec(5000, at=DAY0 + 9e4), rec(5000, at=DAY0 + 9e4), rec(5001, at=DAY0 + 9e4)]) == 2
        assert store.usage_totals(0, 2e10) == {"acme": TenantTotals(calls=1202, accel_ms=1202.0)}
        stored = store.list_usage()
    assert stored[:1000] == records


def test_insert_5000_records_is_fast(ledger_url) -> None:
    records = [rec(i, tenant=f"t{i % 7}", at=DAY0 + i * 0.01) for i in range(5000)]
    with open_store(ledger_url) as store:
        started = time.perf_counter()
        assert store.insert_usage(records) == 5000
        first = time.perf_counter() - started
        started = time.perf_counter()
        assert store.insert_usage(records) == 0
        again = time.perf_counter() - started
    assert first < 1.0 and again < 1.0, (first, again)


def test_concurrent_inserts_with_duplicates_count_each_record_once(ledger_url) -> None:
    # Thread k inserts ids [300k, 300k + 600) in batches of 50: every id but the
    # first and last 300 is inserted by two threads at about the same time.
    n_threads, stride, span, batch = 4, 300, 600, 50
    barrier = threading.Barrier(n_threads)
    new_counts = [0] * n_threads
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            with open_store(ledger_url) as store:
                ids = range(k * stride, k * stride + span)
                batches = [ids[i : i + batch] for i in range(0, span, batch)]
                barrier.wait()
                for b in batches:
                    new_counts[k] += store.insert_usage(
                        [rec(i, tenant=f"t{i % 3}", at=DAY0 + i, accel_ms=0.5) for i in b]
                    )
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    unique = (n_threads - 1) * stride + span
    assert sum(new_counts) == unique
    with open_store(ledger_url) as store:
        totals = store.usage_totals(0, 2e10)
        assert sum(t.calls for t in totals.values()) == unique
        assert sum(t.accel_ms for t in totals.values()) == unique * 0.5
        assert totals["t0"].calls == len([i for i in range(unique) if i % 3 == 0])
        assert len(store.list_usage()) == unique


def test_usage_totals_window_is_half_open(ledger_url) -> None:
    with open_store(ledger_url) as store:
        store.insert_usage(
            [
                rec("a1", "acme", DAY0 - 0.001, accel_ms=1.0),  # before
                rec("a2", "acme", DAY0, accel_ms=2.0),  # exactly at since: in
                rec("a3", "acme", DAY0 + HOUR - 0.001, accel_ms=4.0),
                rec("a4", "acme", DAY0 + HOUR, accel_ms=8.0),  # exactly at until: out
                rec("b1", "beta", DAY0 + 10, status="INTERNAL", accel_ms=0.5),
            ]
        )
        assert store.usage_totals(DAY0, DAY0 + HOUR) == {
            "acme": TenantTotals(calls=2, accel_ms=6.0),
            "beta": TenantTotals(calls=1, accel_ms=0.5),
        }
        assert store.usage_totals(DAY0 + HOUR, DAY0 + 2 * HOUR) == {"acme": TenantTotals(calls=1, accel_ms=8.0)}
        assert store.usage_totals(DAY0 + 5 * HOUR, DAY0 + 6 * HOUR) == {}


REPORT_RECORDS = [
    rec("r01", "acme", DAY0 + 13 * HOUR, "vla", accel_ms=1.5),  # exactly 13:00: hour 13
    rec("r02", "acme", DAY0 + 14 * HOUR - 0.5, "vla", "DEADLINE_EXCEEDED", accel_ms=2.25),  # still hour 13
    rec("r03", "acme", DAY0 + 14 * HOUR, "vla", accel_ms=4.0),  # exactly 14:00: hour 14
    rec("r04", "acme", DAY0 + 13 * HOUR + 10, "small", "INTERNAL", accel_ms=0.125),
    rec("r05", "beta", DAY0 + 24 * HOUR, "vla", accel_ms=8.0),  # exactly midnight: the next day
    rec("r06", "beta", DAY0 - 0.001, "vla", accel_ms=100.0),  # before the range
    rec("r07", "beta", DAY0 + 25 * HOUR, "vla", accel_ms=100.0),  # at the (exclusive) end
    rec("r08", "beta", DAY0 + 2 * HOUR + 1, "vla", "RESOURCE_EXHAUSTED", accel_ms=0.0),
]
UNTIL = DAY0 + 25 * HOUR


def test_usage_report_by_hour(ledger_url) -> None:
    with open_store(ledger_url) as store:
        store.insert_usage(REPORT_RECORDS)
        rows = store.usage_report(None, DAY0, UNTIL, "hour")
        assert rows == [
            ReportRow("acme", "2026-11-21T13:00:00Z", "2026-11-21T14:00:00Z", "small", 1, 1, 0.125),
            ReportRow("acme", "2026-11-21T13:00:00Z", "2026-11-21T14:00:00Z", "vla", 2, 1, 3.75),
            ReportRow("acme", "2026-11-21T14:00:00Z", "2026-11-21T15:00:00Z", "vla", 1, 0, 4.0),
            ReportRow("beta", "2026-11-21T02:00:00Z", "2026-11-21T03:00:00Z", "vla", 1, 1, 0.0),
            ReportRow("beta", "2026-11-22T00:00:00Z", "2026-11-22T01:00:00Z", "vla", 1, 0, 8.0),
        ]
        assert store.usage_report("beta", DAY0, DAY0 + 24 * HOUR, "hour") == [rows[3]]
        assert store.usage_report("nobody", DAY0, UNTIL, "hour") == []


def test_usage_report_by_day_and_by_model(ledger_url) -> None:
    with open_store(ledger_url) as store:
        store.insert_usage(REPORT_RECORDS)
        assert store.usage_report(None, DAY0, UNTIL, "day") == [
            ReportRow("acme", "2026-11-21T00:00:00Z", "2026-11-22T00:00:00Z", "small", 1, 1, 0.125),
            ReportRow("acme", "2026-11-21T00:00:00Z", "2026-11-22T00:00:00Z", "vla", 3, 1, 7.75),
            ReportRow("beta", "2026-11-21T00:00:00Z", "2026-11-22T00:00:00Z", "vla", 1, 1, 0.0),
            ReportRow("beta", "2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z", "vla", 1, 0, 8.0),
        ]
        # A range that starts mid-day still reports whole UTC days as windows (only its records).
        assert store.usage_report("acme", DAY0 + 13 * HOUR + 5, UNTIL, "day") == [
            ReportRow("acme", "2026-11-21T00:00:00Z", "2026-11-22T00:00:00Z", "small", 1, 1, 0.125),
            ReportRow("acme", "2026-11-21T00:00:00Z", "2026-11-22T00:00:00Z", "vla", 2, 1, 6.25),
        ]
        assert store.usage_report(None, DAY0, UNTIL, "model") == [
            ReportRow("acme", "2026-11-21T00:00:00Z", "2026-11-22T01:00:00Z", "small", 1, 1, 0.125),
            ReportRow("acme", "2026-11-21T00:00:00Z", "2026-11-22T01:00:00Z", "vla", 3, 1, 7.75),
            ReportRow("beta", "2026-11-21T00:00:00Z", "2026-11-22T01:00:00Z", "vla", 2, 1, 8.0),
        ]
        with pytest.raises(ValueError):
            store.usage_report(None, DAY0, UNTIL, "week")  # type: ignore[arg-type]


def test_list_usage_filters_and_orders(ledger_url) -> None:
    with open_store(ledger_url) as store:
        store.insert_usage(list(reversed(REPORT_RECORDS)) + [rec("r00", "acme", DAY0 + 13 * HOUR)])
        everything = store.list_usage()
        assert [r.id for r in everything] == ["r06", "r08", "r00", "r01", "r04", "r02", "r03", "r05", "r07"]
        assert set(everything) == {*REPORT_RECORDS, rec("r00", "acme", DAY0 + 13 * HOUR)}
        assert [r.id for r in store.list_usage(tenant="beta")] == ["r06", "r08", "r05", "r07"]
        assert [r.id for r in store.list_usage(since=DAY0 + 14 * HOUR)] == ["r03", "r05", "r07"]
        assert [r.id for r in store.list_usage(until=DAY0)] == ["r06"]
        assert [r.id for r in store.list_usage("acme", DAY0 + 13 * HOUR, DAY0 + 14 * HOUR)] == [
            "r00",
            "r01",
            "r04",
            "r02",
        ]
