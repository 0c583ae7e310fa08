"""Usage reports as text: an aligned table (people), CSV (billing) or JSON (scripts)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Literal

from serving.quota.model import ReportRow

ReportFormat = Literal["table", "csv", "json"]
FORMATS = ("table", "csv", "json")
CSV_HEADER = ("tenant", "window_start", "window_end", "model", "calls", "errors", "accel_ms")


def format_report(rows: Sequence[ReportRow], fmt: ReportFormat = "table") -> str:
    """``rows`` as text ending in a newline. CSV: one line per tenant/window/model, accel_ms to 3 decimals."""
    if fmt == "csv":
        return _csv(rows)
    if fmt == "json":
        return json.dumps([{**asdict(r), "accel_ms": round(r.accel_ms, 3)} for r in rows], indent=2) + "\n"
    if fmt == "table":
        return _table(rows)
    raise ValueError(f"report format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def _csv(rows: Sequence[ReportRow]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_HEADER)
    for r in rows:
        writer.writerow((r.tenant, r.window_start, r.window_end, r.model, r.calls, r.errors, f"{r.accel_ms:.3f}"))
    return out.getvalue()


def _table(rows: Sequence[ReportRow]) -> str:
    total = ("total", "", "", "", str(sum(r.calls for r in rows)), str(sum(r.errors for r in rows)))
    total += (f"{sum(r.accel_ms for r in rows):.3f}",)
    body = [
        (r.tenant, r.window_start, r.window_end, r.model, str(r.calls), str(r.errors), f"{r.accel_ms:.3f}")
        for r in rows
    ]
    return format_table(CSV_HEADER, body, footer=total, numeric=(4, 5, 6))


def format_table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    footer: Sequence[str] | None = None,
    numeric: Sequence[int] = (),
) -> str:
    """Columns padded to their widest cell (``numeric`` ones right-aligned), a rule under the header."""
    lines = [list(header), *(list(r) for r in rows)]
    if footer is not None:
        lines.append(list(footer))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    text = [render(header), "  ".join("-" * w for w in widths)]
    text += [render(r) for r in rows]
    if footer is not None:
        text += ["  ".join("-" * w for w in widths), render(footer)]
    return "\n".join(text) + "\n"
