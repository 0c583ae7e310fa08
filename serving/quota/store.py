"""The usage ledger: tenants, API keys and metered usage, in SQLite or PostgreSQL.

``open_store(url)`` gives a ``LedgerStore``; every layer (ingress auth, quota
leases, the usage flusher, the admin CLI) talks to the ledger through that
interface only. A store object holds one database connection and is used by one
thread at a time. Opening one also checks the schema, so code that polls the
ledger holds one open (``HeldStore``); the rest opens one per thread/process.

Both backends share the SQL below (``SqlLedgerStore``); the subclasses in
``sqlite_store`` and ``postgres_store`` supply the connection, transactions,
column types and the bulk insert.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

from serving.quota.model import ApiKey, Plan, ReportRow, Tenant, TenantTotals, UsageRecord

ReportBy = Literal["hour", "day", "model"]
URL_FORMS = "sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://user@host:port/dbname"

# Seconds per report window; UTC hours and days are whole multiples of these in unix time.
WINDOW_S = {"hour": 3600, "day": 86400}


class StoreError(Exception):
    """The ledger could not do what was asked (also wraps database driver errors)."""


class AlreadyExists(StoreError):
    pass


class NotFound(StoreError):
    pass


@runtime_checkable
class LedgerStore(Protocol):
    """What every ledger backend provides (see ``SqlLedgerStore`` for the semantics)."""

    def migrate(self) -> None: ...

    def create_tenant(self, tenant: Tenant) -> Tenant: ...
    def update_tenant(self, name: str, plan: Plan) -> Tenant: ...
    def get_tenant(self, name: str) -> Tenant | None: ...
    def list_tenants(self) -> list[Tenant]: ...

    def add_key(self, key: ApiKey) -> None: ...
    def revoke_key(self, key_id: str, now: float | None = None) -> ApiKey: ...
    def get_key(self, key_id: str) -> ApiKey | None: ...
    def list_keys(self, tenant: str | None = None) -> list[ApiKey]: ...

    def insert_usage(self, records: Sequence[UsageRecord]) -> int: ...
    def insert_usage_rows(self, rows: Sequence[tuple[Any, ...]]) -> int: ...
    def usage_totals(self, since: float, until: float) -> dict[str, TenantTotals]: ...
    def list_usage(
        self, tenant: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[UsageRecord]: ...
    def usage_report(self, tenant: str | None, since: float, until: float, by: ReportBy) -> list[ReportRow]: ...

    def close(self) -> None: ...
    def __enter__(self) -> LedgerStore: ...
    def __exit__(self, *exc: object) -> None: ...


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (safe for messages and logs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparseable ledger URL>"


def open_store(url: str) -> LedgerStore:
    """Open (and migrate) the ledger at ``url``: ``sqlite:///...`` or ``postgresql://...``."""
    if url.startswith("sqlite:///"):
        from serving.quota.sqlite_store import SqliteLedgerStore

        path = url[len("sqlite:///") :]
        if not path:
            raise ValueError(f"ledger URL {redact_url(url)!r} names no file; use {URL_FORMS}")
        store: SqlLedgerStore = SqliteLedgerStore(path)
    elif url.startswith(("postgresql://", "postgres://")):
        from serving.quota.postgres_store import PostgresLedgerStore

        store = PostgresLedgerStore(url)
    else:
        raise ValueError(f"unsupported ledger URL {redact_url(url)!r}; use {URL_FORMS}")
    try:
        store.migrate()
    except BaseException:
        store.close()
        raise
    return store


T = TypeVar("T")


class HeldStore:
    """A store kept open for a reader that polls the ledger, and reopened after a failed read.

    The key cache rereads keys every second and the quota coordinator plans
    every two. Opening a store each time costs a connection and a schema check
    (on PostgreSQL a new backend process and an advisory lock), about 20 times
    the queries themselves. Reads may come from several worker threads, so one
    read at a time uses the store.
    """

    def __init__(self, url: str, store_factory: Callable[[str], LedgerStore] = open_store):
        self.url = url
        self._store_factory = store_factory
        self._store: LedgerStore | None = None
        self._lock = threading.Lock()

    def read(self, query: Callable[[LedgerStore], T]) -> T:
        """``query(store)`` on the held store (opened now if need be); a failure closes it."""
        with self._lock:
            if self._store is None:
                self._store = self._store_factory(self.url)
            try:
                return query(self._store)
            except BaseException:
                self._close()  # reopened at the next read: the ledger may have restarted
                raise

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            with contextlib.suppress(Exception):
                store.close()


def iso(ts: float) -> str:
    """Unix seconds as ISO 8601 UTC: ``2026-11-21T13:00:00Z`` (microseconds only when present)."""
    dt = datetime.fromtimestamp(ts, timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ" if dt.microsecond else "%Y-%m-%dT%H:%M:%SZ")


# -- the shared SQL ---------------------------------------------------------

# Column types are filled in per backend: {real} is a double, {text} a string
# (PostgreSQL gets COLLATE "C" so that ORDER BY matches SQLite's and Python's).
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS tenants (
        name {text} PRIMARY KEY,
        plan {text} NOT NULL,
        created_at {real} NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id {text} PRIMARY KEY,
        tenant {text} NOT NULL REFERENCES tenants (name),
        secret_hash {text} NOT NULL,
        label {text} NOT NULL DEFAULT '',
        created_at {real} NOT NULL,
        revoked_at {real}
    )""",
    "CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys (tenant)",
    """CREATE TABLE IF NOT EXISTS usage_records (
        id {text} PRIMARY KEY,
        tenant {text} NOT NULL,
        key_id {text} NOT NULL,
        robot_id {text} NOT NULL,
        model {text} NOT NULL,
        embodiment {text} NOT NULL,
        status {text} NOT NULL,
        batch_size INTEGER NOT NULL,
        accel_ms {real} NOT NULL,
        queue_ms {real} NOT NULL,
        received_at {real} NOT NULL,
        finished_at {real} NOT NULL,
        request_id {text} NOT NULL DEFAULT ''
    ){table_options}""",
    # Every replica inserts here all the time, so one secondary index only: reports
    # filter by tenant and time; the monthly totals scan is rare (coordinator start).
    "CREATE INDEX IF NOT EXISTS usage_records_tenant_received ON usage_records (tenant, received_at)",
)
# Created last, in the same transaction as the rest: if it exists, the schema is complete.
SCHEMA_SENTINEL = "usage_records_tenant_received"

# Columns in UsageRecord field order: the order of UsageRecord.to_row and of spool rows.
USAGE_COLUMNS = tuple(f.name for f in dataclasses.fields(UsageRecord))
USAGE_COLS = ", ".join(USAGE_COLUMNS)
KEY_COLS = "key_id, tenant, secret_hash, label, created_at, revoked_at"


def _usage(row: Sequence[Any]) -> UsageRecord:
    return UsageRecord(**dict(zip(USAGE_COLUMNS, row, strict=True)))


def _tenant(row: Sequence[Any]) -> Tenant:
    return Tenant(name=row[0], plan=Plan.from_dict(json.loads(row[1])), created_at=float(row[2]))


def _key(row: Sequence[Any]) -> ApiKey:
    return ApiKey(
        key_id=row[0],
        tenant=row[1],
        secret_hash=row[2],
        label=row[3],
        created_at=float(row[4]),
        revoked_at=None if row[5] is None else float(row[5]),
    )


def _plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), sort_keys=True)


def _where(clauses: list[tuple[str, Any]]) -> tuple[str, tuple[Any, ...]]:
    """`` WHERE a AND b`` (or nothing) and its parameters, from (condition, value) pairs."""
    if not clauses:
        return "", ()
    return " WHERE " + " AND ".join(c for c, _ in clauses), tuple(v for _, v in clauses)


class SqlLedgerStore(ABC):
    """The ledger in SQL, written once for both backends.

    SQL here uses ``?`` placeholders; a backend whose driver wants another style
    rewrites them in ``_sql``. Every operation runs in one explicit transaction
    (``_tx``); driver errors surface as ``StoreError``.
    """

    # Filled into SCHEMA's {real} / {text} / {table_options}.
    REAL_TYPE = "DOUBLE PRECISION"
    TEXT_TYPE = "TEXT"
    USAGE_TABLE_OPTIONS = ""

    # -- what a backend provides

    @abstractmethod
    def _transaction(self, write: bool) -> AbstractContextManager[Any]:
        """A context manager yielding a DB-API cursor inside one transaction (committed on success)."""

    @abstractmethod
    def _has_relation(self, cur: Any, name: str) -> bool: ...

    @abstractmethod
    def _create_schema(self, cur: Any, statements: Sequence[str]) -> None:
        """Run the DDL, serialized against other processes migrating the same ledger."""

    @abstractmethod
    def _insert_usage_rows(self, cur: Any, rows: Sequence[tuple[Any, ...]]) -> int:
        """Insert rows, skipping ids already present; return how many were new."""

    @abstractmethod
    def _floor_div(self, expr: str, divisor: int) -> str:
        """SQL for floor(expr / divisor) of a non-negative double, as a number."""

    @abstractmethod
    def close(self) -> None: ...

    def _sql(self, sql: str) -> str:
        return sql

    # -- plumbing

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[_Cursor]:
        with self._transaction(write) as cur:
            yield _Cursor(cur, self._sql)

    def __enter__(self) -> SqlLedgerStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema

    def migrate(self) -> None:
        with self._tx() as cur:
            if self._has_relation(cur.raw, SCHEMA_SENTINEL):
                return
        statements = [
            s.format(real=self.REAL_TYPE, text=self.TEXT_TYPE, table_options=self.USAGE_TABLE_OPTIONS) for s in SCHEMA
        ]
        with self._tx(write=True) as cur:
            self._create_schema(cur.raw, statements)

    # -- tenants

    def create_tenant(self, tenant: Tenant) -> Tenant:
        with self._tx(write=True) as cur:
            cur.execute(
                "INSERT INTO tenants (name, plan, created_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
                (tenant.name, _plan_json(tenant.plan), float(tenant.created_at)),
            )
            if cur.rowcount == 0:
                raise AlreadyExists(f"tenant {tenant.name!r} already exists")
        return tenant

    def update_tenant(self, name: str, plan: Plan) -> Tenant:
        with self._tx(write=True) as cur:
            cur.execute("UPDATE tenants SET plan = ? WHERE name = ?", (_plan_json(plan), name))
            if cur.rowcount == 0:
                raise NotFound(f"no tenant {name!r}")
            cur.execute("SELECT name, plan, created_at FROM tenants WHERE name = ?", (name,))
            return _tenant(cur.fetchone())

    def get_tenant(self, name: str) -> Tenant | None:
        with self._tx() as cur:
            cur.execute("SELECT name, plan, created_at FROM tenants WHERE name = ?", (name,))
            row = cur.fetchone()
        return None if row is None else _tenant(row)

    def list_tenants(self) -> list[Tenant]:
        with self._tx() as cur:
            cur.execute("SELECT name, plan, created_at FROM tenants ORDER BY name")
            return [_tenant(r) for r in cur.fetchall()]

    # -- keys

    def add_key(self, key: ApiKey) -> None:
        with self._tx(write=True) as cur:
            cur.execute("SELECT 1 FROM tenants WHERE name = ?", (key.tenant,))
            if cur.fetchone() is None:
                raise NotFound(f"no tenant {key.tenant!r}")
            cur.execute(
                f"INSERT INTO api_keys ({KEY_COLS}) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (key_id) DO NOTHING",
                (
                    key.key_id,
                    key.tenant,
                    key.secret_hash,
                    key.label,
                    float(key.created_at),
                    None if key.revoked_at is None else float(key.revoked_at),
                ),
            )
            if cur.rowcount == 0:
                raise AlreadyExists(f"key {key.key_id!r} already exists")

    def revoke_key(self, key_id: str, now: float | None = None) -> ApiKey:
        with self._tx(write=True) as cur:
            cur.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
                (time.time() if now is None else float(now), key_id),
            )
            cur.execute(f"SELECT {KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,))
            row = cur.fetchone()
            if row is None:
                raise NotFound(f"no key {key_id!r}")
        return _key(row)

    def get_key(self, key_id: str) -> ApiKey | None:
        with self._tx() as cur:
            cur.execute(f"SELECT {KEY_COLS} FROM api_keys WHERE key_id = ?", (key_id,))
            row = cur.fetchone()
        return None if row is None else _key(row)

    def list_keys(self, tenant: str | None = None) -> list[ApiKey]:
        where, params = _where([("tenant = ?", tenant)] if tenant is not None else [])
        with self._tx() as cur:
            cur.execute(f"SELECT {KEY_COLS} FROM api_keys{where} ORDER BY tenant, created_at, key_id", params)
            return [_key(r) for r in cur.fetchall()]

    # -- usage

    def insert_usage(self, records: Sequence[UsageRecord]) -> int:
        """Store records in one transaction, once per ``id``; returns how many were new.

        Concurrent writers never deadlock: SQLite takes one write lock per
        transaction, and PostgreSQL inserts in id order (so overlapping batches take
        row locks in the same order).
        """
        return self.insert_usage_rows([r.to_row() for r in records])

    def insert_usage_rows(self, rows: Sequence[tuple[Any, ...]]) -> int:
        """``insert_usage`` for rows already in UsageRecord field order (``UsageRecord.to_row``).

        The replicas' flusher uses this: no per-record Python objects on the way to the store.
        """
        if not rows:
            return 0
        with self._tx(write=True) as cur:
            return self._insert_usage_rows(cur.raw, rows)

    def usage_totals(self, since: float, until: float) -> dict[str, TenantTotals]:
        with self._tx() as cur:
            cur.execute(
                "SELECT tenant, COUNT(*), COALESCE(SUM(accel_ms), 0) FROM usage_records"
                " WHERE received_at >= ? AND received_at < ? GROUP BY tenant",
                (float(since), float(until)),
            )
            return {t: TenantTotals(calls=int(n), accel_ms=float(ms)) for t, n, ms in cur.fetchall()}

    def list_usage(
        self, tenant: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[UsageRecord]:
        clauses: list[tuple[str, Any]] = []
        if tenant is not None:
            clauses.append(("tenant = ?", tenant))
        if since is not None:
            clauses.append(("received_at >= ?", float(since)))
        if until is not None:
            clauses.append(("received_at < ?", float(until)))
        where, params = _where(clauses)
        with self._tx() as cur:
            cur.execute(f"SELECT {USAGE_COLS} FROM usage_records{where} ORDER BY received_at, id", params)
            return [_usage(r) for r in cur.fetchall()]

    def usage_report(self, tenant: str | None, since: float, until: float, by: ReportBy) -> list[ReportRow]:
        """Calls, errors (status != OK) and accelerator ms per tenant, window and model.

        ``by="hour"``/``"day"``: one row per UTC hour/day that has records in
        [since, until); ``by="model"``: one row per tenant and model over the range.
        """
        if by == "model":
            bucket = "0"
        elif by in WINDOW_S:
            bucket = self._floor_div("received_at", WINDOW_S[by])
        else:
            raise ValueError(f"by must be 'hour', 'day' or 'model', not {by!r}")
        clauses: list[tuple[str, Any]] = [("received_at >= ?", float(since)), ("received_at < ?", float(until))]
        if tenant is not None:
            clauses.append(("tenant = ?", tenant))
        where, params = _where(clauses)
        with self._tx() as cur:
            cur.execute(
                f"SELECT tenant, {bucket}, model, COUNT(*),"
                " SUM(CASE WHEN status <> 'OK' THEN 1 ELSE 0 END), COALESCE(SUM(accel_ms), 0)"
                f" FROM usage_records{where} GROUP BY 1, 2, 3",
                params,
            )
            groups = cur.fetchall()
        rows = []
        for t, b, model, calls, errors, accel_ms in sorted(groups, key=lambda g: (g[0], int(g[1]), g[2])):
            if by == "model":
                start, end = iso(since), iso(until)
            else:
                window = WINDOW_S[by]
                start, end = iso(int(b) * window), iso((int(b) + 1) * window)
            rows.append(
                ReportRow(
                    tenant=t,
                    window_start=start,
                    window_end=end,
                    model=model,
                    calls=int(calls),
                    errors=int(errors),
                    accel_ms=float(accel_ms),
                )
            )
        return rows


class _Cursor:
    """A DB-API cursor that rewrites ``?`` placeholders for its backend."""

    def __init__(self, raw: Any, sql: Any):
        self.raw = raw
        self._rewrite = sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        self.raw.execute(self._rewrite(sql), tuple(params))

    def fetchone(self) -> Any:
        return self.raw.fetchone()

    def fetchall(self) -> list[Any]:
        return list(self.raw.fetchall())

    @property
    def rowcount(self) -> int:
        return self.raw.rowcount
