"""The ledger in one SQLite file (the embedded default: ``sqlite:///<state_dir>/ledger.db``).

Several processes write the same file at once (every replica's usage flusher,
the admin CLI), so: WAL (readers never block the writer), a long busy timeout
(a writer waits for the lock instead of failing), and short write transactions
that take the lock up front (``BEGIN IMMEDIATE``), so no transaction has to be
upgraded from read to write half-way, which SQLite can only refuse.
"""

from __future__ import annotations

import functools
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serving.quota.store import USAGE_COLS, USAGE_COLUMNS, SqlLedgerStore, StoreError

BUSY_TIMEOUT_MS = 30_000


# Rows per INSERT statement: 13 columns x 64 rows stays far under SQLite's limit of
# 32766 bound variables. A flush is cut into statements of 64, 32, ... 1 rows, so
# only seven distinct statements exist and sqlite3 keeps each prepared in its cache:
# parsing a fresh many-row statement every flush cost up to a third of the insert.
_ROWS_PER_INSERT = 64


class SqliteLedgerStore(SqlLedgerStore):
    REAL_TYPE = "REAL"
    TEXT_TYPE = "TEXT"
    # The id primary key is the table itself: one b-tree less per inserted record.
    USAGE_TABLE_OPTIONS = " WITHOUT ROWID"

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.path = str(Path(self.path).expanduser())
        try:
            # Autocommit mode at the driver level: transactions are ours (BEGIN ... COMMIT).
            # A store is used by one thread at a time, not necessarily the one that opened it.
            self._conn = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False
            )
            self._conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self._use_wal()
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.Error as e:
            raise StoreError(f"cannot open the SQLite ledger {self.path}: {e}") from e

    def _use_wal(self) -> None:
        """Switch the file to WAL (once per file; the mode is persistent).

        The switch needs the file to itself and SQLite reports "locked" at once
        rather than calling the busy handler, so when several processes open a new
        ledger together, retry until the busy timeout.
        """
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                if self._conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))

    def close(self) -> None:
        self._conn.close()

    @contextmanager
    def _transaction(self, write: bool) -> Iterator[Any]:
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            cur = conn.cursor()
            try:
                yield cur
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"SQLite ledger {self.path}: {e}") from e

    def _has_relation(self, cur: Any, name: str) -> bool:
        cur.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (name,))
        return cur.fetchone() is not None

    def _create_schema(self, cur: Any, statements: Sequence[str]) -> None:
        # BEGIN IMMEDIATE already serializes this against every other writer of the file.
        for statement in statements:
            cur.execute(statement)

    def _insert_usage_rows(self, cur: Any, rows: Sequence[tuple[Any, ...]]) -> int:
        # Many rows per statement: sqlite3 releases the GIL around every statement
        # step, and executemany's one step per row made the replica's flusher thread
        # fight the request loop for the GIL ~1000 times per flush.
        before = self._conn.total_changes
        start = 0
        while start < len(rows):
            n = min(_ROWS_PER_INSERT, 1 << ((len(rows) - start).bit_length() - 1))  # 64, or the largest power of 2 left
            chunk = rows[start : start + n]
            cur.execute(_insert_statement(n), [value for row in chunk for value in row])
            start += n
        return self._conn.total_changes - before

    def _floor_div(self, expr: str, divisor: int) -> str:
        # Timestamps are non-negative, so truncation is floor.
        return f"CAST({expr} / {int(divisor)} AS INTEGER)"


@functools.cache
def _insert_statement(rows: int) -> str:
    one = f"({', '.join('?' * len(USAGE_COLUMNS))})"
    return f"INSERT INTO usage_records ({USAGE_COLS}) VALUES {', '.join([one] * rows)} ON CONFLICT (id) DO NOTHING"
