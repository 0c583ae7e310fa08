"""Which threads pay for a call, and where their time goes, attributed to interleaved turns.

``superbrain bench --interleave --thread-cpu`` reads every thread of every
system (and of the load generator) when each turn's counting starts and ends,
and divides what each thread did by the calls the turn counted. Two systems
then compare thread by thread under the same load: in W1 this is how the cost
of auth + quota + metering was found to land on the replica's request loop
(docs/benchmarks.md).

CPU alone missed what cost the most there: a page fault that waits on the
filesystem costs the bottleneck thread wall time, not CPU. So besides CPU each
thread also reports, per call, its time runnable but waiting for a core
(``wait_us_per_call``, from ``schedstat``), its time neither running nor
runnable (``off_us_per_call``: blocked on the GIL, a lock, a fault or simply
idle) and its page faults. Linux only; elsewhere it reports nothing.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LOAD_GENERATOR = "load generator"


class Sample(NamedTuple):
    """One thread's cumulative counters at one moment."""

    cpu_ns: int  # time on a CPU
    wait_ns: int  # time runnable, waiting for a CPU (0 where the kernel keeps no schedstat)
    minflt: int  # page faults served without I/O
    majflt: int  # page faults that read from disk


# (owner, pid, tid) -> (counters, "process title / thread name")
Snapshot = dict[tuple[str, int, int], tuple[Sample, str]]


@functools.cache  # read once per process: snapshots run inside the measured turns
def _title(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return str(pid)
    return cmdline.strip()[:48] or str(pid)


def _sample(task: str) -> tuple[Sample, str] | None:
    try:
        stat = Path(f"{task}/stat").read_text()
    except OSError:
        return None
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu_ns, wait_ns = (int(fields[11]) + int(fields[12])) * 1_000_000_000 // _HZ, 0
    try:  # nanoseconds on CPU and waiting for one, where the kernel keeps them
        run, wait, _ = Path(f"{task}/schedstat").read_text().split()
        if int(run):
            cpu_ns, wait_ns = int(run), int(wait)
    except (OSError, ValueError):
        pass
    return Sample(cpu_ns, wait_ns, int(fields[7]), int(fields[9])), comm


def snapshot(owners: dict[int, str]) -> Snapshot:
    """The counters of every thread of the given processes (``pid -> owner``), now."""
    out: Snapshot = {}
    for pid, owner in owners.items():
        title = _title(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone, or not Linux
        for tid in tids:
            sampled = _sample(f"/proc/{pid}/task/{tid}")
            if sampled is not None:
                out[(owner, pid, int(tid))] = (sampled[0], f"{title} / {sampled[1]}")
    return out


@dataclass
class ThreadCpu:
    """Per system: each thread's counters over that system's counted turns, and the calls and time counted."""

    totals: dict[str, dict[tuple[str, int, int], list[int]]] = field(default_factory=dict)
    names: dict[tuple[str, int, int], str] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)
    seconds: Counter = field(default_factory=Counter)

    def add_turn(self, system: str, before: Snapshot, after: Snapshot, calls: int, seconds: float = 0.0) -> None:
        totals = self.totals.setdefault(system, {})
        for key, (now, name) in after.items():
            then = before.get(key, (now, name))[0]
            if now.cpu_ns > then.cpu_ns:
                row = totals.setdefault(key, [0] * len(Sample._fields))
                for i, (a, b) in enumerate(zip(now, then, strict=True)):
                    row[i] += a - b
                self.names[key] = name
        self.calls[system] += calls
        self.seconds[system] += seconds

    def report(self, min_us: float = 2.0) -> dict[str, list[dict[str, object]]]:
        """Per system, its threads (and the load generator's) by CPU per counted call, largest first.

        ``off_us_per_call`` is the counted time not spent running or waiting to
        run, per call; None when the turns' durations are unknown.
        """
        out: dict[str, list[dict[str, object]]] = {}
        for system, totals in self.totals.items():
            calls, seconds = self.calls[system], self.seconds[system]
            rows = []
            by_cpu = sorted(totals.items(), key=lambda kv: -kv[1][0])
            for (owner, pid, tid), (cpu_ns, wait_ns, minflt, majflt) in by_cpu:
                us = cpu_ns / 1e3 / calls if calls else 0.0
                if us < min_us or owner not in (system, LOAD_GENERATOR):
                    continue
                off = (seconds * 1e9 - cpu_ns - wait_ns) / 1e3 / calls if calls and seconds else None
                rows.append(
                    {
                        "owner": owner,
                        "pid": pid,
                        "tid": tid,
                        "thread": self.names[(owner, pid, tid)],
                        "us_per_call": round(us, 1),
                        "wait_us_per_call": round(wait_ns / 1e3 / calls, 1),
                        "off_us_per_call": None if off is None else round(max(0.0, off), 1),
                        "minflt_per_call": round(minflt / calls, 3),
                        "majflt_per_call": round(majflt / calls, 4),
                    }
                )
            out[system] = rows
        return out


# The per-call figures of a ``ThreadCpu.report`` row that pooling averages.
_POOLED_FIGURES = ("us_per_call", "wait_us_per_call", "off_us_per_call", "minflt_per_call")


def pool_by_role(instances: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Report rows of several instances (fresh systems, fresh thread ids), each averaged over the instances.

    Threads are told apart by role, not id: owner, "process / thread" name and
    rank by CPU among the threads of that name (``ray::IDLE #1`` is a replica's
    request loop, the busiest of Ray's unnamed threads). Largest CPU first.
    """
    sums: dict[tuple[str, str], dict[str, float]] = {}
    for rows in instances:
        seen: dict[tuple[str, str], int] = {}
        for row in sorted(rows, key=lambda r: -float(r["us_per_call"])):
            name = (str(row["owner"]), str(row["thread"]))
            seen[name] = seen.get(name, 0) + 1
            acc = sums.setdefault((name[0], f"{name[1]} #{seen[name]}"), dict.fromkeys(_POOLED_FIGURES, 0.0))
            for figure in _POOLED_FIGURES:
                acc[figure] += float(row.get(figure) or 0.0) / len(instances)
    out = [
        {"owner": owner, "thread": thread, **{f: round(v, 3 if f == "minflt_per_call" else 1) for f, v in acc.items()}}
        for (owner, thread), acc in sums.items()
    ]
    return sorted(out, key=lambda row: -row["us_per_call"])
