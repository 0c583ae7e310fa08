"""The ledger in PostgreSQL (``postgresql://user@host:port/dbname``), through psycopg 3.

One connection per store, autocommit off, one explicit transaction per
operation (no connection is left idle in a transaction). Usage batches go in
with COPY into a per-transaction temp table and one ``INSERT ... SELECT ... ON
CONFLICT (id) DO NOTHING``, whose row count is exactly the number of new records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg

from serving.quota.store import USAGE_COLS, SqlLedgerStore, StoreError, redact_url

# pg_advisory_xact_lock key that serializes concurrent migrations of one database ("SBLEDGER").
MIGRATE_LOCK = 0x5342_4C45_4447_4552
CONNECT_TIMEOUT_S = 10


class PostgresLedgerStore(SqlLedgerStore):
    REAL_TYPE = "DOUBLE PRECISION"
    TEXT_TYPE = 'TEXT COLLATE "C"'

    def __init__(self, url: str):
        self._url = url
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self._url,
                autocommit=False,
                connect_timeout=CONNECT_TIMEOUT_S,
                application_name="superbrain-ledger",
            )
        except psycopg.Error as e:
            raise StoreError(f"cannot connect to the ledger at {redact_url(self._url)}: {e}") from e

    def close(self) -> None:
        self._conn.close()

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        if self._conn.closed or self._conn.broken:
            # The server restarted or the network dropped since the last call: reconnect once.
            self._conn = self._connect()
        try:
            with self._conn.transaction(), self._conn.cursor() as cur:
                yield cur
        except psycopg.Error as e:
            raise StoreError(f"PostgreSQL ledger: {e}") from e

    def _has_relation(self, cur: Any, name: str) -> bool:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (name,))
        return bool(cur.fetchone()[0])

    def _create_schema(self, cur: Any, statements: Sequence[str]) -> None:
        # Concurrent CREATE ... IF NOT EXISTS can still collide in the catalogs; the
        # transaction-scoped advisory lock makes migrations of one database take turns.
        cur.execute("SET LOCAL client_min_messages = warning")
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
        for statement in statements:
            cur.execute(statement)

    def _insert_usage_rows(self, cur: Any, rows: Sequence[tuple[Any, ...]]) -> int:
        cur.execute("CREATE TEMP TABLE usage_incoming (LIKE usage_records INCLUDING DEFAULTS) ON COMMIT DROP")
        with cur.copy(f"COPY usage_incoming ({USAGE_COLS}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        cur.execute(
            f"INSERT INTO usage_records ({USAGE_COLS}) SELECT {USAGE_COLS} FROM usage_incoming"
            " ORDER BY id ON CONFLICT (id) DO NOTHING"
        )
        return cur.rowcount

    def _floor_div(self, expr: str, divisor: int) -> str:
        return f"floor({expr} / {int(divisor)})"
