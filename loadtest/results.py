"""Read one Locust run back from its CSV files, judge it against a target, and print it.

Locust writes ``<prefix>_stats.csv`` (one row per call name plus "Aggregated") and
``<prefix>_failures.csv`` (one row per name and error); ``loadtest/locustfile.py``
adds ``<prefix>_meta.json`` (fleet mix, load-generator CPU).
"""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_ERROR_TYPE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\(")


@dataclass(frozen=True)
class CallStats:
    """One row of the stats CSV."""

    name: str
    requests: int
    failures: int
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    max_ms: float | None


@dataclass
class RunResult:
    robots: int
    rate_hz: float
    total: CallStats
    calls: list[CallStats]
    failures_by_type: dict[str, int]
    meta: dict = field(default_factory=dict)
    csv_prefix: str = ""
    exit_code: int | None = None

    @property
    def requested_rps(self) -> float:
        return self.robots * self.rate_hz

    @property
    def act_rps(self) -> float:
        """Achieved Act calls per second over the measured window (failed calls included)."""
        return sum(c.rps for c in self.calls if c.name.startswith("Act/"))

    @property
    def achieved_ratio(self) -> float:
        return self.act_rps / self.requested_rps if self.requested_rps else 0.0

    def meets(self, p99_ms: float = 100.0, min_ratio: float = 0.95) -> bool:
        """The capacity criterion: no failure, p99 within target, and the fleet kept its pace."""
        return (
            self.total.requests > 0
            and self.total.failures == 0
            and self.total.p99_ms is not None
            and self.total.p99_ms <= p99_ms
            and self.achieved_ratio >= min_ratio
        )

    def summary(self) -> str:
        t = self.total
        lines = [
            f"robots {self.robots} at {self.rate_hz:g} Hz: requested {self.requested_rps:.1f} req/s, "
            f"achieved {self.act_rps:.1f} req/s ({100 * self.achieved_ratio:.0f} %)",
            f"latency p50 {_ms(t.p50_ms)}  p99 {_ms(t.p99_ms)}  max {_ms(t.max_ms)}   "
            f"requests {t.requests}, failures {t.failures}",
        ]
        for c in self.calls:
            lines.append(
                f"  {c.name:<24} {c.requests:>7} calls {c.rps:>8.1f} req/s  p50 {_ms(c.p50_ms)}  p99 {_ms(c.p99_ms)}"
            )
        if self.failures_by_type:
            kinds = ", ".join(f"{name} {n}" for name, n in sorted(self.failures_by_type.items(), key=lambda kv: -kv[1]))
            lines.append(f"failures by type: {kinds}")
        cpu = self.meta.get("generator_cpu_mean")
        if cpu is not None:
            lines.append(
                f"load generator CPU: mean {cpu:.0f} %, max {self.meta.get('generator_cpu_max', 0):.0f} % of one core"
            )
        lines.append(f"CSV: {self.csv_prefix}_stats.csv")
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _float(value: str) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # "N/A" when a row has no requests
        return None


def _row(row: dict[str, str]) -> CallStats:
    return CallStats(
        name=row["Name"],
        requests=int(row["Request Count"]),
        failures=int(row["Failure Count"]),
        rps=_float(row["Requests/s"]) or 0.0,
        p50_ms=_float(row["50%"]),
        p99_ms=_float(row["99%"]),
        max_ms=_float(row["Max Response Time"]),
    )


def error_type(error: str) -> str:
    """``"Unauthenticated('...')"`` -> ``"Unauthenticated"`` (Locust writes repr(exception))."""
    m = _ERROR_TYPE.match(error)
    return m.group(1) if m else error.strip()[:60]


def read_run(prefix: str | Path, robots: int, rate_hz: float, exit_code: int | None = None) -> RunResult:
    """Parse ``<prefix>_stats.csv`` (must exist), ``_failures.csv`` and ``_meta.json`` (optional)."""
    prefix = str(prefix)
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = [_row(r) for r in csv.DictReader(f)]
    total = next((r for r in rows if r.name == "Aggregated"), None)
    if total is None:
        raise ValueError(f"{prefix}_stats.csv has no Aggregated row")
    failures: Counter[str] = Counter()
    failures_path = Path(f"{prefix}_failures.csv")
    if failures_path.exists():
        with failures_path.open(newline="") as f:
            for r in csv.DictReader(f):
                failures[error_type(r["Error"])] += int(r["Occurrences"])
    meta_path = Path(f"{prefix}_meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    # Rows emptied by the warm-up reset (the Describe before it) say nothing about the run.
    calls = [r for r in rows if r.name != "Aggregated" and r.requests > 0]
    return RunResult(robots, rate_hz, total, calls, dict(failures), meta, prefix, exit_code)
