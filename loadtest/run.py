"""One headless Locust run of the robot fleet, with CSV output and a short summary.

    .venv/bin/python -m loadtest.run --robots 200 --rate-hz 10 --duration 60s [--target host:port]
    make loadtest ROBOTS=200 RATE_HZ=10 DURATION=60s [TARGET=host:port]

The measured window is ``--duration``: robots are spawned over ``--spawn-s``, then
``--warmup`` seconds pass (connections, first batches) before the stats are reset,
so the whole run lasts spawn + warm-up + duration. The exit code is Locust's:
1 when any call failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loadtest.results import RunResult, read_run

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
_DURATION = re.compile(r"^\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*$")


def parse_duration(text: str | float) -> float:
    """``"60s"``, ``"2m"``, ``"1m30s"`` or a number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = _DURATION.match(text)
    if not m or not any(m.groups()):
        raise ValueError(f"bad duration {text!r} (expected e.g. 60s, 2m, 1m30s)")
    h, mi, s = (float(g) if g else 0.0 for g in m.groups())
    return h * 3600 + mi * 60 + s


@dataclass(frozen=True)
class RunSpec:
    """Everything one run needs; the defaults are what ``make loadtest`` uses."""

    robots: int
    rate_hz: float = 10.0
    duration_s: float = 60.0
    target: str = ""  # "" -> $TARGET -> 127.0.0.1:9000 (resolved by the locustfile)
    embodiments: str = ""
    image_format: str = "raw"
    warmup_s: float = 2.0
    spawn_s: float = 2.0
    act_timeout_s: float = 2.0
    csv_prefix: str = ""
    api_key: str | None = None  # None: $SUPERBRAIN_API_KEY or the dev key file

    def prefix(self) -> Path:
        if self.csv_prefix:
            return Path(self.csv_prefix)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return RESULTS_DIR / f"{stamp}_r{self.robots}_{self.rate_hz:g}hz"

    @property
    def run_time_s(self) -> int:
        return math.ceil(self.spawn_s + self.warmup_s + self.duration_s)


def locust_command(spec: RunSpec, prefix: Path, extra: list[str] | None = None) -> list[str]:
    """The Locust command line: headless, one process (see docs/capacity.md), CSV at ``prefix``."""
    cmd = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(LOCUSTFILE),
        "--headless",
        "--users",
        str(spec.robots),
        "--spawn-rate",
        f"{max(1.0, spec.robots / max(spec.spawn_s, 0.1)):g}",
        "--run-time",
        f"{spec.run_time_s}s",
        "--stop-timeout",
        "0",
        "--csv",
        str(prefix),
        "--only-summary",
        "--loglevel",
        "WARNING",
    ]
    if spec.target:
        cmd += ["--host", spec.target]
    return cmd + list(extra or [])


def locust_env(spec: RunSpec, prefix: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        RATE_HZ=f"{spec.rate_hz:g}",
        EMBODIMENTS=spec.embodiments,
        IMAGE_FORMAT=spec.image_format,
        ACT_TIMEOUT_S=f"{spec.act_timeout_s:g}",
        WARMUP_S=f"{spec.warmup_s:g}",
        LOADTEST_META=f"{prefix}_meta.json",
    )
    if spec.api_key is not None:
        env["SUPERBRAIN_API_KEY"] = spec.api_key
    return env


def run_locust(spec: RunSpec, *, quiet: bool = False, extra: list[str] | None = None) -> RunResult:
    """Run Locust once and read its CSV back. ``quiet`` keeps Locust's output unless the run breaks."""
    prefix = spec.prefix()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        locust_command(spec, prefix, extra),
        cwd=ROOT,
        env=locust_env(spec, prefix),
        capture_output=quiet,
        text=True,
        timeout=spec.run_time_s + 120,
    )
    if not Path(f"{prefix}_stats.csv").exists():
        tail = (proc.stdout or "")[-2000:] + (proc.stderr or "")[-4000:]
        raise RuntimeError(f"locust wrote no stats (exit {proc.returncode})\n{tail}")
    return read_run(prefix, spec.robots, spec.rate_hz, proc.returncode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--robots", type=int, default=int(os.environ.get("ROBOTS", "50")))
    parser.add_argument("--rate-hz", type=float, default=float(os.environ.get("RATE_HZ", "10")))
    parser.add_argument("--duration", default=os.environ.get("DURATION", "60s"), help="measured window, e.g. 60s")
    parser.add_argument("--target", default=os.environ.get("TARGET", ""), help="host:port (default 127.0.0.1:9000)")
    parser.add_argument("--embodiments", default=os.environ.get("EMBODIMENTS", ""), help="franka_arm:2,unitree_go2:1")
    parser.add_argument("--image-format", choices=("raw", "jpeg"), default=os.environ.get("IMAGE_FORMAT", "raw"))
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds after spawning before stats reset")
    parser.add_argument("--spawn-s", type=float, default=2.0, help="spread the robots' start over this long")
    parser.add_argument("--act-timeout", type=float, default=2.0, help="the SDK's per-call deadline, seconds")
    parser.add_argument("--csv-prefix", default="", help="default loadtest/results/<time>_r<robots>_<rate>hz")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    parser.add_argument("locust_args", nargs="*", help="extra Locust flags, after --")
    args = parser.parse_args(argv)
    if args.robots < 1 or args.rate_hz <= 0:
        parser.error("--robots must be >= 1 and --rate-hz > 0")
    spec = RunSpec(
        robots=args.robots,
        rate_hz=args.rate_hz,
        duration_s=parse_duration(args.duration),
        target=args.target,
        embodiments=args.embodiments,
        image_format=args.image_format,
        warmup_s=args.warmup,
        spawn_s=args.spawn_s,
        act_timeout_s=args.act_timeout,
        csv_prefix=args.csv_prefix,
    )
    result = run_locust(spec, extra=args.locust_args)
    print("\n" + result.summary(), flush=True)
    if args.json:
        print(json.dumps(result_json(result)))
    return result.exit_code or 0


def result_json(result: RunResult) -> dict:
    t = result.total
    return {
        "robots": result.robots,
        "rate_hz": result.rate_hz,
        "requested_rps": result.requested_rps,
        "rps": result.act_rps,
        "requests": t.requests,
        "failures": t.failures,
        "p50_ms": t.p50_ms,
        "p99_ms": t.p99_ms,
        "failures_by_type": result.failures_by_type,
        "csv_prefix": result.csv_prefix,
        "meta": result.meta,
    }


if __name__ == "__main__":
    sys.exit(main())
