"""Which threads pay for a call: per-thread CPU per call, attributed to interleaved turns.

``superbrain bench --interleave --thread-cpu`` reads ``/proc/<pid>/task/<tid>/stat``
of every process of every system (and of the load generator) when each turn's
counting starts and ends, and divides each thread's CPU by the calls the turn
counted. Two systems then compare thread by thread under the same load: in
W1 this is how the cost of auth + quota + metering was found to land on the
replica's request loop (docs/benchmarks.md). Linux only; elsewhere it reports
nothing.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
LOAD_GENERATOR = "load generator"

# (owner, pid, tid) -> (CPU ticks, "process title / thread name")
Snapshot = dict[tuple[str, int, int], tuple[int, str]]


@functools.cache  # read once per process: snapshots run inside the measured turns
def _title(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return str(pid)
    return cmdline.strip()[:48] or str(pid)


def snapshot(owners: dict[int, str]) -> Snapshot:
    """CPU ticks of every thread of the given processes (``pid -> owner``), now."""
    out: Snapshot = {}
    for pid, owner in owners.items():
        title = _title(pid)
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue  # gone, or not Linux
        for tid in tids:
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            out[(owner, pid, int(tid))] = (int(fields[11]) + int(fields[12]), f"{title} / {comm}")
    return out


@dataclass
class ThreadCpu:
    """Per system: CPU ticks of each thread during that system's counted turns, and the calls counted."""

    ticks: dict[str, Counter] = field(default_factory=dict)
    names: dict[tuple[str, int, int], str] = field(default_factory=dict)
    calls: Counter = field(default_factory=Counter)

    def add_turn(self, system: str, before: Snapshot, after: Snapshot, calls: int) -> None:
        ticks = self.ticks.setdefault(system, Counter())
        for key, (now, name) in after.items():
            then = before.get(key, (now, name))[0]
            if now > then:
                ticks[key] += now - then
                self.names[key] = name
        self.calls[system] += calls

    def report(self, min_us: float = 2.0) -> dict[str, list[dict[str, object]]]:
        """Per system, its threads (and the load generator's) by CPU per counted call, largest first."""
        out: dict[str, list[dict[str, object]]] = {}
        for system, ticks in self.ticks.items():
            calls = self.calls[system]
            rows = []
            for (owner, pid, tid), n in ticks.most_common():
                us = n / _HZ / calls * 1e6 if calls else 0.0
                if us >= min_us and owner in (system, LOAD_GENERATOR):
                    rows.append(
                        {
                            "owner": owner,
                            "pid": pid,
                            "tid": tid,
                            "thread": self.names[(owner, pid, tid)],
                            "us_per_call": round(us, 1),
                        }
                    )
            out[system] = rows
        return out
