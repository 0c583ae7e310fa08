"""The usage spool: rows survive a crash of their replica and are replayed exactly once."""

from __future__ import annotations

import mmap
import os
import shutil
import time
from pathlib import Path

import pytest

from serving.quota.model import Plan, Tenant, UsageRecord
from serving.quota.spool import SUFFIX, UsageSpool
from serving.quota.store import open_store


def row(spool: UsageSpool, i: int) -> tuple:
    now = time.time()
    return UsageRecord(
        id=spool.next_id(),
        tenant="acme",
        key_id="k",
        robot_id=f"r{i % 3}",
        model="m",
        embodiment="e",
        status="OK",
        batch_size=2,
        accel_ms=0.5,
        queue_ms=0.1,
        received_at=now,
        finished_at=now,
        request_id=f"req-{i}",
    ).to_row()


@pytest.fixture()
def url(ledger_url):
    with open_store(ledger_url) as store:
        store.create_tenant(Tenant("acme", Plan()))
    return ledger_url


def stored(url: str) -> list[UsageRecord]:
    with open_store(url) as store:
        return store.list_usage("acme")


def crash(spool: UsageSpool) -> None:
    """What SIGKILL leaves behind: the mapped pages, and the locks released."""
    for seg in [*spool._sealed, spool._segment]:
        seg.mm.close()
        os.close(seg.fd)


def test_flush_stores_every_row_and_deletes_full_segments(url, tmp_path):
    spool = UsageSpool(tmp_path, url, segment_bytes=4096)
    for i in range(500):  # ~150 bytes each: many segments
        spool.append_row(row(spool, i))
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) > 5
    store = open_store(url)
    spool._flush(store)
    store.close()
    assert len(list(tmp_path.glob(f"*{SUFFIX}"))) == 1  # only the one still being written
    spool.close()
    assert list(tmp_path.glob(f"*{SUFFIX}")) == []
    rows = stored(url)
    assert sorted(r.request_id for r in rows) == sorted(f"req-{i}" for i in range(500))


def test_a_crashed_replicas_spool_is_replayed_once_by_another(url, tmp_path):
    dead = UsageSpool(tmp_path, url, segment_bytes=8192)
    for i in range(120):
        dead.append_row(row(dead, i))
    store = open_store(url)
    dead._flush(store)  # some rows reached the store before the crash ...
    store.close()
    for i in range(120, 200):
        dead.append_row(row(dead, i))  # ... and these did not
    crash(dead)

    alive = UsageSpool(tmp_path, url)
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in tmp_path.glob(f"*{SUFFIX}"):
        if path.name.startswith(dead.replica_token):
            shutil.copy(path, copy / path.name)
    assert alive.recover_orphans() == 80  # only the rows the store did not have yet
    assert not [p for p in tmp_path.glob(f"*{SUFFIX}") if p.name.startswith(dead.replica_token)]
    # Replaying the same segments again (a second recoverer) changes nothing.
    again = UsageSpool(copy, url)
    assert again.recover_orphans() == 0
    again.close()
    alive.close()
    rows = stored(url)
    assert len(rows) == 200 and len({r.request_id for r in rows}) == 200


def test_a_live_replicas_spool_is_left_alone(url, tmp_path):
    first = UsageSpool(tmp_path, url)
    first.append_row(row(first, 0))
    second = UsageSpool(tmp_path, url)
    assert second.recover_orphans() == 0  # first still holds its lock
    assert stored(url) == []
    first.close()
    second.close()
    assert len(stored(url)) == 1


def test_a_torn_last_record_is_ignored(url, tmp_path):
    spool = UsageSpool(tmp_path, url)
    for i in range(3):
        spool.append_row(row(spool, i))
    seg = spool._segment
    seg.mm[seg.pos : seg.pos + 4] = (500).to_bytes(4, "little")  # a length whose bytes never came
    crash(spool)
    other = UsageSpool(tmp_path, url)
    assert other.recover_orphans() == 3
    other.close()


def test_rows_round_trip_in_field_order(tmp_path):
    spool = UsageSpool(tmp_path, "sqlite:///" + str(tmp_path / "unused.db"))
    record = UsageRecord(*row(spool, 7))
    assert UsageRecord(*record.to_row()) == record
    spool.close()


def test_a_batch_is_one_spool_record_and_is_replayed_row_by_row(url, tmp_path):
    dead = UsageSpool(tmp_path, url, segment_bytes=4096)
    dead.append_rows([row(dead, i) for i in range(10)])
    dead.append_row(row(dead, 10))
    # A batch bigger than a whole segment gets a segment of its own.
    dead.append_rows([row(dead, i) for i in range(11, 111)])
    assert dead.writes == 3
    crash(dead)
    alive = UsageSpool(tmp_path, url)
    assert alive.recover_orphans() == 111
    alive.close()
    assert sorted(r.request_id for r in stored(url)) == sorted(f"req-{i}" for i in range(111))


def test_batch_records_expand_to_full_rows_after_a_flush_and_after_a_crash(url, tmp_path):
    """A batch record writes the shared fields once; both readers get every call's full row back."""
    now = time.time()

    def calls(first: int, n: int, status: str = "OK", batch_size: int = 4) -> list[tuple]:
        return [
            ("acme", "k", f"r{i % 3}", "e", f"req-{i}", now - 1, status, batch_size, 0.25)
            for i in range(first, first + n)
        ]

    live = UsageSpool(tmp_path / "live", url)
    live.append_batch("m", 8.0, now, calls(0, 4))
    live.append_batch("m", 0.0, now, calls(4, 1, "DEADLINE_EXCEEDED", 0))  # never reached the policy
    assert live.writes == 2
    live.close()  # the flusher's path
    dead = UsageSpool(tmp_path / "dead", url)
    dead.append_row(row(dead, 5))  # the row format written before batch records still replays
    dead.append_batch("m", 6.0, now, calls(6, 3, batch_size=3))
    crash(dead)
    recoverer = UsageSpool(tmp_path / "dead", url)
    assert recoverer.recover_orphans() == 4  # the recovery path
    recoverer.close()

    rows = {r.request_id: r for r in stored(url)}
    assert sorted(rows) == sorted(f"req-{i}" for i in range(9))
    assert len({r.id for r in rows.values()}) == 9  # idempotency ids stay unique
    assert rows["req-0"] == UsageRecord(
        id=rows["req-0"].id, tenant="acme", key_id="k", robot_id="r0", model="m", embodiment="e", status="OK",
        batch_size=4, accel_ms=2.0, queue_ms=0.25, received_at=now - 1, finished_at=now, request_id="req-0",
    )  # fmt: skip
    assert (rows["req-4"].status, rows["req-4"].accel_ms, rows["req-4"].batch_size) == ("DEADLINE_EXCEEDED", 0.0, 0)
    assert [rows[f"req-{i}"].accel_ms for i in (6, 7, 8)] == [2.0, 2.0, 2.0]


@pytest.mark.skipif(not hasattr(__import__("resource"), "RUSAGE_THREAD"), reason="needs per-thread faults (Linux)")
def test_appends_do_not_fault_once_the_flusher_prefaulted_the_segment(tmp_path):
    """The request loop's copies into the spool must not take page faults (each ~30 us, or ms)."""
    import resource

    batch = [("acme", "k", f"robot-{i}", "arm", f"req-{i:08d}", time.time(), "OK", 6, 1.0) for i in range(6)]

    def faults_while_appending(spool: UsageSpool) -> tuple[int, int]:
        """Faults taken and pages written by 2,000 appends (a W1 batch each)."""
        spool.append_batch("m", 2.0, time.time(), batch)  # allocations of a first append, not measured
        before, start = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, spool._segment.pos
        for _ in range(2000):
            spool.append_batch("m", 2.0, time.time(), batch)
            spool._pending.clear()  # as if flushed: only the segment's pages are new memory
        pages = (spool._segment.pos - start) // mmap.PAGESIZE
        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before, pages

    cold = UsageSpool(tmp_path / "cold", "sqlite:///unused.db")
    warm = UsageSpool(tmp_path / "warm", "sqlite:///unused.db")
    warm.prefault()  # what start() and every flusher tick do
    # Without it every new page faults; with it, none does (a few for the allocator's own pages).
    faults, pages = faults_while_appending(cold)
    assert pages >= 100 and faults >= 0.9 * pages
    faults, pages = faults_while_appending(warm)
    assert pages >= 100 and faults <= 10
    assert warm._segment.prefaulted >= warm._segment.pos
    crash(cold), crash(warm)  # unmapped, unlocked; never flushed: there is no ledger here


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread names from Linux's /proc")
def test_the_flusher_thread_carries_its_name_for_the_os(url, tmp_path):
    """In a Ray worker every thread is otherwise ``ray::IDLE`` in top -H and in ``bench --thread-cpu``."""
    spool = UsageSpool(tmp_path / "spool", url, flush_interval_s=0.01)
    spool.start()
    try:
        assert spool._thread is not None
        deadline = time.monotonic() + 5
        comm = Path(f"/proc/self/task/{spool._thread.native_id}/comm")
        while comm.read_text().strip() != "usage-flusher" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert comm.read_text().strip() == "usage-flusher"
    finally:
        spool.close()
