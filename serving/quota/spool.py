"""Usage metering without a database write per request: a local spool, flushed in batches.

Each admitted call's usage is copied into this replica's spool segment, a file
mapped shared into memory, BEFORE its response is sent (a batch's calls as one
record): the bytes are in the kernel's page cache at once (no system call per
request) and survive the replica being killed. The record is also kept in
memory, and a flusher thread expands it into rows and hands them to the ledger
store in batches (every ``flush_interval_s``), idempotently: a row's ``id`` is
its primary key, so replaying a spool inserts nothing twice. Segments are only
read back after a crash.

A replica holds an exclusive ``flock`` on its own segments while it lives. At
start (and periodically) every replica looks for spool segments in the same
directory whose lock it can take: their owner has died, so it replays them
into the store and deletes them. Hence: every answered call is metered, none
twice, across replica kills and server restarts (tests/test_partners_e2e.py,
tests/test_spool.py). What is NOT covered is losing the machine itself before
the kernel writes the pages back (nothing is fsynced); put ``state_dir`` on a
volume that outlives the pod.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import marshal
import mmap
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from serving import metrics as m
from serving.quota.model import UsageRecord
from serving.quota.store import HeldStore, LedgerStore, open_store

log = logging.getLogger(__name__)

SUFFIX = ".usage.spool"


_LEN = 4  # little-endian length prefix of each record; a zero length ends a segment

# The flusher faults this much of the live segment in, writable, ahead of the request
# loop's writes. Untouched, a page of a shared file mapping faults on its first write:
# about 30 us, now and then milliseconds on ext4, every ~9 W1 batches, on the loop.
PREFAULT_BYTES = 1 << 20
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14; the constant is Python 3.13's

# A batch record: (BATCH, replica token, first sequence number, model, batch compute ms,
# finished_at, calls), each call a tuple in CALL_FIELDS order. What a batch's calls
# share is written once; call i's id is ``record_id(token, first + i)``.
BATCH = 1
CALL_FIELDS = (
    "tenant", "key_id", "robot_id", "embodiment", "request_id", "received_at", "status", "batch_size", "queue_ms"
)  # fmt: skip


def record_id(replica_token: str, seq: int) -> str:
    """The idempotency id of a replica's ``seq``-th admitted call: unique across the cluster."""
    return f"{replica_token}-{seq}"


def accel_share(compute_ms: float, batch_size: int) -> float:
    """A call's accelerator ms: its share of its batch's compute (0 if it never reached the policy)."""
    return compute_ms / batch_size if batch_size else 0.0


def batch_rows(record: tuple) -> list[tuple]:
    """A batch record's calls as rows in UsageRecord field order (each call its share of the compute)."""
    _, token, first, model, compute_ms, finished_at, calls = record
    return [
        (
            record_id(token, first + i),
            tenant,
            key_id,
            robot_id,
            model,
            embodiment,
            status,
            size,
            accel_share(compute_ms, size),
            queue,
            received_at,
            finished_at,
            request_id,
        )
        for i, (tenant, key_id, robot_id, embodiment, request_id, received_at, status, size, queue) in enumerate(calls)
    ]


def _rows(record: object) -> list[tuple]:
    """The rows in one spool record: a batch record, a list of rows, or a single row."""
    if isinstance(record, tuple) and record and record[0] == BATCH:
        return batch_rows(record)
    return record if isinstance(record, list) else [record]  # type: ignore[list-item]


def _parse_rows(data: bytes | mmap.mmap) -> list[UsageRecord]:
    """The complete records in a spool segment (a torn last record is ignored).

    A spool record is a 4-byte length and a ``marshal``-ed batch record (above)
    or, as written before batch records, a list of rows, each a tuple of plain
    str/int/float (UsageRecord.to_row). marshal is 10x cheaper than JSON on the
    request path, and is only ever used for this replica-local, 0600 file that we
    wrote ourselves; nothing received from the network is ever unmarshalled.
    """
    records = []
    pos, size = 0, len(data)
    while pos + _LEN <= size:
        n = int.from_bytes(data[pos : pos + _LEN], "little")
        if n == 0 or pos + _LEN + n > size:
            break
        try:
            records.extend(UsageRecord(*row) for row in _rows(marshal.loads(data[pos + _LEN : pos + _LEN + n])))
        except (EOFError, ValueError, TypeError):
            log.error("usage spool: stopping at an unreadable record at byte %d of %d", pos, size)
            break
        pos += _LEN + n
    return records


def _name_native_thread() -> None:
    """Give the calling thread its Python name for the OS too (``top -H``, /proc, ``bench --thread-cpu``).

    Python names threads only for itself before 3.14, and in a Ray worker every
    thread shows up as ``ray::IDLE``. Best effort: Linux only, 15 bytes at most.
    """
    name = threading.current_thread().name
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME


@dataclass
class _Segment:
    """One spool file, mapped shared: a record copied into it is in the page cache at once."""

    path: Path
    fd: int
    mm: mmap.mmap
    rows_before: int  # records appended to earlier segments
    rows: int = 0
    pos: int = 0
    prefaulted: int = 0  # bytes from the start already faulted in (see UsageSpool.prefault)

    def close(self, unlink: bool) -> None:
        self.mm.close()
        os.close(self.fd)
        if unlink:
            self.path.unlink(missing_ok=True)


class UsageSpool:
    """This replica's spool segments plus the thread that flushes them (and orphans) to the ledger."""

    def __init__(
        self,
        directory: str | Path,
        ledger_url: str,
        *,
        flush_interval_s: float = 0.5,
        segment_bytes: int = 16 << 20,
        store_factory: Callable[[str], LedgerStore] = open_store,
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ledger_url = ledger_url
        self.flush_interval_s = flush_interval_s
        self.segment_bytes = segment_bytes
        self._store_factory = store_factory
        self.replica_token = secrets.token_hex(6)
        self._seq = 0
        self._lock = threading.Lock()  # guards the segments, pending rows and counters
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Spool records not yet in the store: batch records and whole rows, as written.
        self._pending: list[tuple] = []
        self._appended = 0  # rows appended, ever
        self.writes = 0  # spool records written (a batch's rows are one)
        self._stored = 0  # rows handed to the store, ever
        self._sealed: list[_Segment] = []  # full segments, deleted once their rows are stored
        self.flushed = 0  # records this replica inserted (new rows)
        self.recovered = 0  # rows inserted from orphaned spools
        self.flush_failures = 0
        self._segment = self._new_segment()

    # -- hot path -------------------------------------------------------------

    def next_id(self) -> str:
        """A cluster-unique idempotency id for a call this replica admitted."""
        self._seq += 1
        return record_id(self.replica_token, self._seq)

    def append_row(self, row: tuple) -> None:
        self.append_rows([row])

    def append_rows(self, rows: list[tuple]) -> None:
        """Append records given as whole rows in UsageRecord field order, as one spool record."""
        self._write(marshal.dumps(rows), rows, len(rows))

    def append_batch(self, model: str, compute_ms: float, finished_at: float, calls: list[tuple]) -> None:
        """Append a batch's calls (tuples in CALL_FIELDS order) as one spool record: the hot path.

        What the calls share is written once and the ids are numbered here, so a
        call costs the request loop one small tuple; the flusher expands the rows.
        """
        first = self._seq + 1
        self._seq += len(calls)
        record = (BATCH, self.replica_token, first, model, compute_ms, finished_at, calls)
        self._write(marshal.dumps(record), [record], len(calls))

    def _write(self, data: bytes, pending: list[tuple], rows: int) -> None:
        """Copy one record into the segment (no syscall), and queue it for the flusher."""
        n = len(data)
        with self._lock:
            seg = self._segment
            if seg.pos + _LEN + n + _LEN > len(seg.mm):  # full (a zero length must still fit after)
                self._sealed.append(seg)
                seg = self._segment = self._new_segment(max(self.segment_bytes, _LEN + n + _LEN))
            end = seg.pos + _LEN + n
            seg.mm[seg.pos + _LEN : end] = data
            seg.mm[seg.pos : seg.pos + _LEN] = n.to_bytes(_LEN, "little")  # written last: commits it
            seg.pos = end
            seg.rows += rows
            self._pending.extend(pending)
            self._appended += rows
            self.writes += 1

    def metric_values(self) -> list[tuple[m.MetricDef, tuple[str, ...], float]]:
        """How far the ledger lags behind this replica (read by the metrics snapshot)."""
        pending = self._pending
        try:
            oldest = time.time() - _rows(pending[0])[0][10] if pending else 0.0  # received_at of the oldest row
        except IndexError:  # flushed meanwhile
            oldest = 0.0
        return [
            (m.USAGE_PENDING, (), float(self._appended - self._stored)),
            (m.USAGE_OLDEST_PENDING, (), max(0.0, oldest)),
            (m.USAGE_FLUSH_FAILURES, (), float(self.flush_failures)),
            (m.USAGE_STORED, (), float(self._stored + self.recovered)),
        ]

    # -- lifecycle ------------------------------------------------------------

    def prefault(self) -> None:
        """Fault the next ``PREFAULT_BYTES`` of the live segment in, writable, so that
        the request loop's copies into it do not fault (the flusher calls this).

        ``MADV_POPULATE_WRITE`` only maps the pages; it changes no byte, so it needs
        no lock against a concurrent append. Where the kernel lacks it, the loop
        faults its pages in itself, as it would without this.
        """
        seg = self._segment
        start = max(seg.prefaulted, seg.pos - seg.pos % mmap.PAGESIZE)
        end = min(len(seg.mm), seg.pos + PREFAULT_BYTES)
        if end <= start:
            return
        try:
            seg.mm.madvise(_MADV_POPULATE_WRITE, start, end - start)
        except (OSError, ValueError):  # a kernel before 5.14; or close() gave up waiting and unmapped it
            return
        seg.prefaulted = end

    def start(self) -> None:
        self.prefault()
        self._thread = threading.Thread(target=self._run, name="usage-flusher", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Final flush; spool segments are deleted once everything in them is in the store."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        store = self._store_factory(self.ledger_url)
        try:
            self._flush(store)
        finally:
            store.close()
            with self._lock:
                done = self._stored == self._appended
                for seg in [*self._sealed, self._segment]:
                    seg.close(unlink=done)
                self._sealed = []

    # -- flushing -----------------------------------------------------------------

    def _new_segment(self, size: int = 0) -> _Segment:
        size = size or self.segment_bytes
        path = self.directory / f"{self.replica_token}-{time.time_ns()}{SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(fd, size)
        return _Segment(path, fd, mmap.mmap(fd, size), rows_before=self._appended)

    def _run(self) -> None:
        _name_native_thread()
        ledger = HeldStore(self.ledger_url, self._store_factory)  # closed and reopened after a failure
        last_recovery = 0.0
        try:
            while not self._stop.wait(self.flush_interval_s):
                self.prefault()
                try:
                    ledger.read(self._flush)
                    if time.monotonic() - last_recovery > 10 * self.flush_interval_s:
                        ledger.read(self.recover_orphans)
                        last_recovery = time.monotonic()
                except Exception:
                    # The store is down or busy: records stay in the spool; try again next tick.
                    self.flush_failures += 1
                    log.warning("usage flush failed; will retry", exc_info=True)
        finally:
            ledger.close()

    def _flush(self, store: LedgerStore) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        rows = [row for record in pending for row in _rows(record)]
        try:
            if rows:
                self.flushed += store.insert_usage_rows(rows)
        except BaseException:
            with self._lock:
                self._pending[:0] = pending  # keep order; retried at the next tick
            raise
        with self._lock:
            self._stored += len(rows)
            # A full segment goes once every row in it is in the store.
            done = [seg for seg in self._sealed if self._stored >= seg.rows_before + seg.rows]
            self._sealed = [seg for seg in self._sealed if seg not in done]
        for seg in done:
            seg.close(unlink=True)

    def recover_orphans(self, store: LedgerStore | None = None) -> int:
        """Replay spool files whose owner died into the store, then delete them."""
        own_store = store is None
        store = store or self._store_factory(self.ledger_url)
        inserted = 0
        with self._lock:
            own = {seg.path for seg in [*self._sealed, self._segment]}
        try:
            for path in sorted(self.directory.glob(f"*{SUFFIX}")):
                if path in own:
                    continue
                inserted += self._recover_one(store, path)
        finally:
            if own_store:
                store.close()
        self.recovered += inserted
        return inserted

    def _recover_one(self, store: LedgerStore, path: Path) -> int:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0  # its replica is alive
            size = os.fstat(fd).st_size
            if size:
                with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
                    records = _parse_rows(mm)
            else:
                records = []
            inserted = store.insert_usage(records) if records else 0
            path.unlink(missing_ok=True)
            if records:
                log.info("recovered %d usage records (%d new) from %s", len(records), inserted, path.name)
            return inserted
        finally:
            os.close(fd)
