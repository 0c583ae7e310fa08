"""``superbrain bench``: run a workload against Superbrain (and, with --compare, the other systems).

Systems are loaded one at a time, never two at once; each is its own process
tree (``serving.bench.systems``) and each is driven by the same load generator
in its own process (``serving.bench.harness``). By default a system is started,
measured and stopped before the next; ``--alternate`` and ``--interleave`` keep
them all up and switch the load between them. Prints a table, then, with ``--json``,
exactly one JSON object as the last line. docs/benchmarks.md has the method and
the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from serving.bench import threadcpu
from serving.bench.systems import (
    ALL_SYSTEMS,
    CPUS_ENV,
    DESCRIPTIONS,
    RAW_MODEL,
    RunningSystem,
    parse_cpus,
    run_raw_model,
)
from serving.client._common import API_KEY_ENV

_MODEL_WORKLOAD_SYSTEMS = (
    "superbrain",
    "superbrain_unbatched",
    "superbrain_serve_batch",
    "grpc_limit",
    "ray_default_proxy",
    RAW_MODEL,
)
COMPARE_SYSTEMS = {
    "W1": (
        "superbrain",
        "superbrain_auth_off",
        "grpc_limit",
        "superbrain_no_ray",
        "ray_default_proxy",
        "ray_direct_ingress",
        "ray_throughput_optimized",
        "ray_haproxy",
    ),
    "W2": _MODEL_WORKLOAD_SYSTEMS,
    "W3": _MODEL_WORKLOAD_SYSTEMS,
}
SMOKE_SYSTEMS = ("superbrain", "grpc_limit")
HARNESS_TIMEOUT_S = 1800

# (name, comparison, threshold) per workload.
TARGETS = {
    "W1": (("ratio_vs_limit", ">=", 0.8), ("p50_ratio_at_1", "<=", 1.25), ("ratio_vs_superbrain_auth_off", ">=", 0.95)),
    "W2": (("ratio_vs_raw_model", ">=", 0.85), ("batching_gain_at_64", ">=", 4.0)),
    "W3": (),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=("W1", "W2", "W3"), default="W1", type=str.upper)
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run the gRPC limit and Ray Serve's ingress modes (W2/W3: unbatched Superbrain and the raw model)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--concurrency", default="1,8,32,64", help="robots per level, comma-separated")
    parser.add_argument("--calls", type=int, default=50, help="timed calls per robot per level")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per robot before each level")
    parser.add_argument(
        "--settle-s",
        type=float,
        default=5.0,
        help="idle seconds between a system being ready and its load (Ray's start-up work settles)",
    )
    parser.add_argument(
        "--systems", help=f"comma-separated subset to run (implies --compare); choose from: {', '.join(ALL_SYSTEMS)}"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="fast check: concurrency 1,4, 5 calls, superbrain + grpc_limit only"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the systems' processes, e.g. a Ray Serve flag to try (repeatable)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the whole list of systems this many times, interleaved; report each system's median round",
    )
    parser.add_argument(
        "--alternate",
        action="store_true",
        help="keep every system up at once and alternate their loads round by round (order flipped each "
        "round): pairs minutes apart become pairs seconds apart, and no round pays a start-up",
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="keep every system up and switch ONE continuous load between them every --phase-s (each round "
        "gives every system a turn, order flipped each round): the most precise ratios on a noisy machine; "
        "uses the highest --concurrency level only",
    )
    parser.add_argument("--phase-s", type=float, default=2.0, help="--interleave: seconds per turn")
    parser.add_argument(
        "--thread-cpu",
        action="store_true",
        help="--interleave: also report every thread's CPU per call during each system's turns (Linux /proc): "
        "which threads pay for a difference between two systems",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="--interleave: start every system afresh this many times, --rounds rounds each, and pool the "
        "rounds; two identical instances of one system differ by a few %% on a VM, so one instance per "
        "system cannot resolve a few %% (docs/benchmarks.md)",
    )
    parser.add_argument(
        "--cpus",
        metavar="SERVER:CLIENT",
        help="pin every system (with all the processes it starts) to the SERVER CPUs and the load generator to "
        "the CLIENT CPUs, as taskset lists them, e.g. 1:0 or 8-15:0-7 (Linux). Default: all share every core, "
        "as W1 is specified; pinned, the load generator no longer takes CPU time from the systems",
    )
    parser.add_argument(
        "--raw-repeats", type=int, default=5, help="in-process timings (raw model, --device): best of this many repeats"
    )
    device = parser.add_argument_group(
        "accelerators (W2)",
        "--device runs W2's in-process accelerator benchmark instead of the served-system sweep: preprocessing "
        "frames/s per array backend, model forward time per batch size, busy fraction at saturation",
    )
    device.add_argument("--device", choices=("cpu", "cuda"), help="measure on this device (W2 only)")
    device.add_argument(
        "--preprocess-batches", default="1,8,64,256", help="--device: preprocessing batch sizes, comma-separated"
    )
    device.add_argument(
        "--forward-max-batch", type=int, default=256, help="--device: model forward at batch 1, 2, 4, ... up to this"
    )
    device.add_argument(
        "--saturation-s", type=float, default=5.0, help="--device: seconds measured at saturation per mode"
    )
    device.add_argument(
        "--max-batch-size", type=int, default=32, help="--device: the engine's max batch size at saturation"
    )
    parser.add_argument("--workdir", help="where system logs go (default: a temporary directory)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the logs even when everything worked")


def _levels(text: str) -> list[int]:
    levels = [int(x) for x in str(text).split(",") if x.strip()]
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency: a comma-separated list of positive integers")
    return levels


def _plan(args: argparse.Namespace) -> tuple[list[str], list[int], int, int]:
    workload = args.workload.upper()
    if args.smoke:
        systems = list(SMOKE_SYSTEMS)
        levels, calls, warmup = [1, 4], 5, 1
    else:
        levels, calls, warmup = _levels(args.concurrency), args.calls, args.warmup
        if args.systems:
            systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        elif args.compare:
            systems = list(COMPARE_SYSTEMS[workload])
        else:
            systems = ["superbrain"]
    unknown = [s for s in systems if s not in ALL_SYSTEMS]
    if unknown:
        raise SystemExit(f"unknown system(s) {unknown}; choose from {list(ALL_SYSTEMS)}")
    return systems, levels, calls, warmup


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run_harness(
    running: RunningSystem, workload: str, levels: list[int], calls: int, warmup: int, log_dir: Path
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "serving.bench.harness", "--target", running.target, "--workload", workload]
    cmd += ["--concurrency", ",".join(map(str, levels)), "--calls", str(calls), "--warmup", str(warmup)]
    for item in running.metadata:
        cmd += ["--metadata", item]
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if running.api_key:
        env[API_KEY_ENV] = running.api_key  # not on the command line, where `ps` would show it
    err_path = log_dir / f"harness-{running.system}.log"
    cpu_before = running.cpu_seconds()
    with open(err_path, "w") as err:
        out = subprocess.run(
            cmd, stdout=subprocess.PIPE, stderr=err, text=True, timeout=HARNESS_TIMEOUT_S, check=False, env=env
        )
    cpu_s = running.cpu_seconds() - cpu_before
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"harness failed (rc {out.returncode}); see {err_path}")
    report = json.loads(lines[-1])
    # Server-side CPU per call (warm-up calls included): steadier than req/s on a
    # shared 2-core machine, where the load generator competes for the same cores.
    calls_made = sum(lv["calls"] + warmup * lv["concurrency"] for lv in report["levels"])
    report["server_cpu_us_per_call"] = round(cpu_s / max(1, calls_made) * 1e6, 1)
    return report


def _summarise_sweep(report: dict[str, Any]) -> dict[str, Any]:
    levels = report["levels"]
    first = min(levels, key=lambda lv: lv["concurrency"])
    peak = max(levels, key=lambda lv: lv["rps"])
    return {
        "rps": peak["rps"],
        "peak_concurrency": peak["concurrency"],
        "p99_at_peak_ms": peak["p99_ms"],
        "p50_ms": first["p50_ms"],
        "p99_ms": first["p99_ms"],
        "latency_at_concurrency": first["concurrency"],
        "errors": sum(lv["errors"] for lv in levels),
        "sweep": {str(lv["concurrency"]): {k: v for k, v in lv.items() if k != "concurrency"} for lv in levels},
        "server_cpu_us_per_call": report.get("server_cpu_us_per_call"),
    }


def _level(result: dict[str, Any] | None, concurrency: int) -> dict[str, Any] | None:
    if not result or "sweep" not in result:
        return None
    return result["sweep"].get(str(concurrency))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b:
        return None
    return round(a / b, 3)


def _paired_ratio(a: dict[str, Any], b: dict[str, Any], key: str = "rps") -> float | None:
    """Median over rounds of a/b, each round's two systems measured back to back.

    On a shared VM the machine's speed drifts by 10-20 % over minutes; a ratio of
    two runs minutes apart carries that drift, a ratio within one round mostly not.
    With one round (or missing rounds) it is the plain ratio of the two results.
    """
    field = "rounds_rps" if key == "rps" else "rounds_cpu_us_per_call"
    xs, ys = a.get(field), b.get(field)
    if not xs or not ys or len(xs) != len(ys) or any(v is None for v in (*xs, *ys)):
        return _ratio(a.get(key), b.get(key))
    ratios = sorted(x / y for x, y in zip(xs, ys, strict=True) if y)
    return round(statistics.median(ratios), 3) if ratios else None


def compute_ratios(workload: str, systems: dict[str, dict[str, Any]], levels: list[int]) -> dict[str, Any]:
    sb, limit = systems.get("superbrain"), systems.get("grpc_limit")
    out: dict[str, Any] = {}
    ok = lambda r: r is not None and "rps" in r  # noqa: E731
    if ok(sb) and ok(limit):
        out["ratio_vs_limit"] = _paired_ratio(sb, limit)
        if sb.get("latency_at_concurrency") == limit.get("latency_at_concurrency") == 1:
            out["p50_ratio_at_1"] = _ratio(sb["p50_ms"], limit["p50_ms"])
    raw, unbatched = systems.get(RAW_MODEL), systems.get("superbrain_unbatched")
    if ok(sb) and ok(raw):
        out["ratio_vs_raw_model"] = _ratio(sb["rps"], raw["rps"])
        # The raw model at the server's own max_batch_size (the largest batch it can run).
        same = raw["sweep"].get(str(sb.get("server", {}).get("max_batch_size")))
        if same:
            out["ratio_vs_raw_model_at_max_batch"] = _ratio(sb["rps"], same["obs_per_s"])
    top = 64 if 64 in levels else max(levels)
    if ok(sb) and ok(unbatched):
        a, b = _level(sb, top), _level(unbatched, top)
        out[f"batching_gain_at_{top}"] = _ratio(a and a["rps"], b and b["rps"])
    if ok(sb):
        for name in (
            "superbrain_auth_off",
            "superbrain_auth_off_key",
            "superbrain_bare",
            "superbrain_no_ray",
            "superbrain_serve_batch",
            "ray_default_proxy",
            "ray_direct_ingress",
            "ray_throughput_optimized",
            "ray_haproxy",
        ):
            if ok(systems.get(name)):
                out[f"ratio_vs_{name}"] = _paired_ratio(sb, systems[name])
        off = systems.get("superbrain_auth_off")
        if ok(off) and sb.get("server_cpu_us_per_call") and off.get("server_cpu_us_per_call"):
            # > 1: what auth + quota + metering add to the server's CPU per call.
            out["cpu_per_call_vs_superbrain_auth_off"] = _paired_ratio(sb, off, "server_cpu_us_per_call")
    off, keyed = systems.get("superbrain_auth_off"), systems.get("superbrain_auth_off_key")
    if ok(off) and ok(keyed):
        # What the authorization header alone costs (robots and gRPC), with the gate off;
        # ratio_vs_superbrain_auth_off_key is then the gate's own cost.
        out["ratio_key_only_vs_superbrain_auth_off"] = _paired_ratio(keyed, off)
    return out


def evaluate_targets(workload: str, ratios: dict[str, Any]) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for name, op, threshold in TARGETS[workload]:
        value = ratios.get(name)
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        targets[name] = {"target": f"{op} {threshold}", "value": value, "met": met}
    return targets


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    import grpc
    import ray

    info["ray"], info["grpcio"] = ray.__version__, grpc.__version__
    try:
        import torch

        info["torch"], info["torch_threads"] = torch.__version__, torch.get_num_threads()
    except ImportError:
        pass
    return info


def _loadavg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine shows up here."""
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except OSError:
        return None


def format_table(result: dict[str, Any]) -> str:
    rows = [("system", "robots", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "batch")]
    for name, res in result["systems"].items():
        if "error" in res:
            rows.append((name, "-", "FAILED", "", "", "", "", ""))
            continue
        for conc, lv in res["sweep"].items():
            if name == RAW_MODEL:
                rows.append(
                    (name, f"b={conc}", f"{lv['obs_per_s']:.0f}", f"{lv['batch_ms_best']:.2f}", "", "", "", conc)
                )
                continue
            rows.append(
                (
                    name,
                    conc,
                    f"{lv['rps']:.0f}",
                    _fmt(lv["p50_ms"]),
                    _fmt(lv["p90_ms"]),
                    _fmt(lv["p99_ms"]),
                    str(lv["errors"]),
                    f"{lv['mean_server_batch']:.1f}" if lv["mean_server_batch"] else "",
                )
            )
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = [f"workload {result['workload']}: {result['payload']['payload']} (policy {result['payload']['policy']})"]
    out += lines
    if result.get("ratios"):
        out.append("")
        for k, v in result["ratios"].items():
            out.append(f"{k}: {v}")
    for name, t in result.get("targets", {}).items():
        state = {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]]
        out.append(f"target {name} {t['target']}: {t['value']} -> {state}")
    for name, res in result["systems"].items():
        if "error" in res:
            out.append(f"{name} failed: {res['error']}")
        elif res.get("thread_cpu"):
            threads = res.get("thread_cpu_by_role") or res["thread_cpu"]
            top = ", ".join(
                f"{t['thread']} {t['us_per_call']} ({t.get('wait_us_per_call')} waiting for a core,"
                f" {t.get('off_us_per_call')} off)"
                for t in threads[:5]
            )
            out.append(f"{name}: CPU per call by thread (us): {top}")
    return "\n".join(out)


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}"


def _run_system(
    name: str,
    workload: str,
    policy: str,
    levels: list[int],
    calls: int,
    warmup: int,
    workdir: Path,
    server_env: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Start one system, drive it with the harness, stop it; its summary (or {"error": ...})."""
    t0 = time.monotonic()
    try:
        if name == RAW_MODEL:
            _log(f"{name}: policy.infer on batches of {levels} ({policy} policy)")
            raw = run_raw_model(workload, workdir, levels, args.raw_repeats)
            result = {
                "rps": raw["rps"],
                "sweep": {str(lv["batch_size"]): lv for lv in raw["levels"]},
                "description": DESCRIPTIONS[name],
            }
        else:
            _log(f"{name}: starting ({DESCRIPTIONS[name]})")
            with RunningSystem(name, workload, workdir, extra_env=server_env) as running:
                _log(f"{name}: ready on {running.target} after {time.monotonic() - t0:.1f}s; load {levels}")
                # Ray keeps starting things for a few seconds after the first answer; that
                # work is not serving cost, and it would land on whichever system is measured.
                time.sleep(0.0 if args.smoke else args.settle_s)
                return _drive(running, workload, levels, calls, warmup, workdir, t0)
        _log(f"{name}: peak {result['rps']:.0f}/s ({time.monotonic() - t0:.0f}s)")
        return result
    except Exception as exc:
        return _failed(name, exc)


def _drive(
    running: RunningSystem, workload: str, levels: list[int], calls: int, warmup: int, workdir: Path, t0: float
) -> dict[str, Any]:
    """Load a running system with the harness; its summary (or {"error": ...})."""
    name = running.system
    try:
        report = _run_harness(running, workload, levels, calls, warmup, workdir)
    except Exception as exc:
        return _failed(name, exc)
    result = {**_summarise_sweep(report), "description": DESCRIPTIONS[name], "server": running.info}
    _log(f"{name}: peak {result['rps']:.0f}/s ({time.monotonic() - t0:.0f}s)")
    return result


def _failed(name: str, exc: Exception) -> dict[str, Any]:
    _log(f"{name}: FAILED: {exc}")
    return {"error": str(exc).splitlines()[0], "description": DESCRIPTIONS[name]}


def _run_alternating(
    systems: list[str],
    workload: str,
    levels: list[int],
    calls: int,
    warmup: int,
    workdir: Path,
    server_env: dict[str, str],
    args: argparse.Namespace,
    n_rounds: int,
) -> dict[str, list[dict[str, Any]]]:
    """Every system up at once; each round loads them one after another, order flipped each round.

    On a shared VM whose speed drifts over minutes, the two halves of a pair are
    then seconds apart instead of a system start-up apart, and no round measures
    a freshly started system. The idle systems cost a little CPU in every
    measurement, the same for each. Server CPU per call counts only the loaded
    system's processes.
    """
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    with contextlib.ExitStack() as stack:
        running = _start_all(stack, systems, workload, workdir, server_env, args.settle_s)
        for r in range(n_rounds):
            _log(f"round {r + 1}/{n_rounds}")
            for name in systems if r % 2 == 0 else systems[::-1]:
                rounds[name].append(_drive(running[name], workload, levels, calls, warmup, workdir, time.monotonic()))
    return rounds


def _start_all(
    stack: contextlib.ExitStack,
    systems: list[str],
    workload: str,
    workdir: Path,
    server_env: dict[str, str],
    settle_s: float,
) -> dict[str, RunningSystem]:
    running: dict[str, RunningSystem] = {}
    for name in systems:
        t0 = time.monotonic()
        _log(f"{name}: starting ({DESCRIPTIONS[name]})")
        running[name] = stack.enter_context(RunningSystem(name, workload, workdir, extra_env=server_env))
        _log(f"{name}: ready on {running[name].target} after {time.monotonic() - t0:.1f}s")
    time.sleep(settle_s)
    return running


def _run_interleaved(
    systems: list[str],
    workload: str,
    concurrency: int,
    workdir: Path,
    server_env: dict[str, str],
    args: argparse.Namespace,
    n_rounds: int,
) -> dict[str, dict[str, Any]]:
    """Every system up at once, ONE harness switching its load between them (harness.run_interleaved).

    Compared with --alternate, a pair's two halves are --phase-s apart instead of a
    whole harness run apart, and the load never stops, so no turn pays for
    connections or a cold start. Server CPU per call is not measured here: the
    systems are all up and idle ones would blur it.
    """
    with contextlib.ExitStack() as stack:
        running = _start_all(stack, systems, workload, workdir, server_env, args.settle_s)
        targets = [
            {
                "name": name,
                "target": running[name].target,
                "metadata": [item.split("=", 1) for item in running[name].metadata]
                + ([["authorization", f"Bearer {running[name].api_key}"]] if running[name].api_key else []),
            }
            for name in systems
        ]
        cmd = [sys.executable, "-m", "serving.bench.harness", "--interleave", "--workload", workload]
        cmd += ["--concurrency", str(concurrency), "--phase-s", str(args.phase_s), "--cycles", str(n_rounds)]
        _log(f"interleaving {concurrency} robots over {systems}: {n_rounds} rounds of {args.phase_s:g}s turns")
        err_path = workdir / "harness-interleave.log"
        plan: dict[str, Any] = {"targets": targets}  # API keys on stdin, never on the command line
        if getattr(args, "thread_cpu", False):
            plan["pids"] = {name: running[name].server_pids() for name in systems}
        with open(err_path, "w") as err:
            out = subprocess.run(
                cmd,
                input=json.dumps(plan),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                timeout=HARNESS_TIMEOUT_S,
                check=False,
            )
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"interleaved harness failed (rc {out.returncode}); see {err_path}")
    report = json.loads(lines[-1])
    results = {}
    for name in systems:
        turns = report["systems"][name]["rounds"]
        median = sorted(turns, key=lambda t: t["rps"])[(len(turns) - 1) // 2]
        results[name] = {
            **_summarise_sweep({"levels": [median]}),
            "errors": sum(t["errors"] for t in turns),
            "rounds_rps": [t["rps"] for t in turns],
            **({"thread_cpu": report["thread_cpu"][name]} if report.get("thread_cpu") else {}),
            "description": DESCRIPTIONS[name],
            "server": running[name].info,
        }
        _log(f"{name}: median turn {median['rps']:.0f}/s")
    return results


def _interleaved_instance(systems: list[str], workload: str, concurrency: int, workdir: Path, *rest: Any) -> dict:
    """One interleaved instance, started afresh once more (in ``workdir/retry``) if it fails.

    A start can fail for reasons outside the systems under test (the gRPC port
    the runner picked taken by another process before the replica binds it), and
    one lost instance costs the whole run its pooled ratio. The failed attempt's
    logs stay where they are.
    """
    try:
        return _run_interleaved(systems, workload, concurrency, workdir, *rest)
    except Exception as exc:
        _log(f"instance failed ({exc}); starting it again")
    try:
        return _run_interleaved(systems, workload, concurrency, workdir / "retry", *rest)
    except Exception as exc:
        return {name: _failed(name, exc) for name in systems}


def _pool_instances(systems: list[str], instances: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One result per system from several interleaved instances: their rounds, pooled.

    Round i of an instance pairs with round i of the same instance only, so
    ``rounds_rps`` concatenated in instance order keeps every pair intact for
    ``_paired_ratio``. A system that failed in any instance counts as failed.
    ``rps`` is the median over all rounds; the rest (the table row, latencies,
    ``thread_cpu``) is the median instance's. ``thread_cpu_by_role`` averages
    every instance's per-thread figures (``threadcpu.pool_by_role``): the median
    instance of one system is seldom that of another, so only these compare
    systems thread by thread.
    """
    if len(instances) == 1:
        return instances[0]
    pooled: dict[str, dict[str, Any]] = {}
    for name in systems:
        runs = [inst[name] for inst in instances]
        failed = next((r for r in runs if "error" in r), None)
        if failed is not None:
            pooled[name] = failed
            continue
        rounds = [rps for r in runs for rps in r["rounds_rps"]]
        median_run = sorted(runs, key=lambda r: r["rps"])[(len(runs) - 1) // 2]
        pooled[name] = {
            **median_run,
            "rps": statistics.median(rounds),
            "errors": sum(r["errors"] for r in runs),
            "rounds_rps": rounds,
            "instances_rps": [r["rps"] for r in runs],
        }
        if all(r.get("thread_cpu") for r in runs):
            pooled[name]["thread_cpu_by_role"] = threadcpu.pool_by_role([r["thread_cpu"] for r in runs])
    return pooled


def _instance_spread(workload: str, instances: list[dict[str, dict[str, Any]]], levels: list[int]) -> dict[str, Any]:
    """Each ratio per instance, with their mean and its standard error: the instance-to-instance part of the noise."""
    per: dict[str, list[float]] = {}
    for inst in instances:
        for key, value in compute_ratios(workload, inst, levels).items():
            if key.startswith("ratio_") and value is not None:
                per.setdefault(key, []).append(value)
    out: dict[str, Any] = {}
    for key, values in per.items():
        out[f"{key}_per_instance"] = values
        if len(values) > 1:
            out[f"{key}_instance_mean"] = round(statistics.mean(values), 3)
            out[f"{key}_instance_sem"] = round(statistics.stdev(values) / len(values) ** 0.5, 3)
    return out


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median peak throughput (all of one run's figures, never mixed across runs)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    chosen = dict(sorted(ok, key=lambda r: r["rps"])[(len(ok) - 1) // 2])
    if len(runs) > 1:
        chosen["rounds_rps"] = [r.get("rps") for r in runs]
        chosen["rounds_cpu_us_per_call"] = [r.get("server_cpu_us_per_call") for r in runs]
    return chosen


def _pin(spec: str | None, server_env: dict[str, str]) -> dict[str, list[int]] | None:
    """Apply ``--cpus SERVER:CLIENT``: the systems pin themselves (through ``server_env``) and this
    process pins itself, so the load generators it starts inherit the CLIENT CPUs."""
    if not spec:
        return None
    server_text, sep, client_text = spec.partition(":")
    try:
        if not sep:
            raise ValueError("expected SERVER:CLIENT")
        server, client = parse_cpus(server_text), parse_cpus(client_text)
    except ValueError as exc:
        raise SystemExit(f"--cpus {spec!r}: {exc}") from None
    available = os.sched_getaffinity(0)
    if not (server | client) <= available:
        raise SystemExit(f"--cpus {spec!r}: this process may only use CPUs {sorted(available)}")
    server_env[CPUS_ENV] = ",".join(map(str, sorted(server)))
    os.sched_setaffinity(0, client)
    return {"server": sorted(server), "client": sorted(client)}


def main(args: argparse.Namespace) -> int:
    if getattr(args, "device", None):
        from serving.bench.device import main as device_main  # in-process: no systems, no harness

        return device_main(args)
    from serving.bench.workloads import build

    workload = args.workload.upper()
    systems, levels, calls, warmup = _plan(args)
    wl = build(workload)
    n_rounds = 1 if args.smoke else max(1, args.rounds)
    interleave = bool(getattr(args, "interleave", False) and not args.smoke)
    alternate = bool(args.alternate and not args.smoke)
    # Every refusal comes before anything is made that it would leave behind.
    if interleave and args.alternate:
        raise SystemExit("--interleave and --alternate are two ways to pair systems; pick one")
    if (getattr(args, "instances", 1) > 1 or getattr(args, "thread_cpu", False)) and not interleave:
        raise SystemExit("--instances and --thread-cpu apply to --interleave only")
    if (interleave or alternate) and RAW_MODEL in systems:
        mode = "--interleave" if interleave else "--alternate"
        raise SystemExit(f"{mode} drives running servers; leave {RAW_MODEL} out")
    server_env = dict(item.split("=", 1) for item in args.server_env if "=" in item)
    cpus = _pin(getattr(args, "cpus", None), server_env)
    own_workdir = not args.workdir
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="superbrain-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_start = _loadavg()
    started = time.monotonic()
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
    instances: list[dict[str, dict[str, Any]]] = []
    if interleave:
        levels = [max(levels)]
        n_instances = max(1, getattr(args, "instances", 1))
        for i in range(n_instances):
            if n_instances > 1:
                _log(f"instance {i + 1}/{n_instances}")
            # Start order flipped every other instance, like the turn order within one.
            order = systems if i % 2 == 0 else systems[::-1]
            # Each instance logs into its own directory, so a failure's cause survives the next one.
            where = workdir / f"instance-{i + 1}" if n_instances > 1 else workdir
            instances.append(_interleaved_instance(order, workload, levels[0], where, server_env, args, n_rounds))
        results = _pool_instances(systems, instances)
    elif alternate:
        rounds = _run_alternating(systems, workload, levels, calls, warmup, workdir, server_env, args, n_rounds)
    else:
        for r in range(n_rounds):
            if n_rounds > 1:
                _log(f"round {r + 1}/{n_rounds}")
            for name in systems:
                rounds[name].append(
                    _run_system(name, workload, wl.policy, levels, calls, warmup, workdir, server_env, args)
                )
    if not interleave:
        results = {name: _median_round(runs) for name, runs in rounds.items()}
    failed = any("error" in results.get(name, {}) for name in ("superbrain", "grpc_limit") if name in results)
    ratios = compute_ratios(workload, results, levels)
    if interleave and len(instances) > 1:
        ratios.update(_instance_spread(workload, instances, levels))
    result: dict[str, Any] = {
        "workload": workload,
        "payload": wl.summary(),
        "concurrency": levels,
        "calls_per_robot": calls,
        "warmup_calls_per_robot": warmup,
        "rounds": n_rounds,
        "alternate": alternate,
        "interleave": {"phase_s": args.phase_s, "instances": len(instances)} if interleave else None,
        "server_env": server_env,
        "cpus": cpus,
        "systems": results,
        **ratios,
        "ratios": ratios,
        "targets": evaluate_targets(workload, ratios) if not args.smoke else {},
        "machine": {**machine_info(), "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    met = [t["met"] for t in result["targets"].values()]
    result["all_targets_met"] = all(m is True for m in met) if met else None
    print(format_table(result), flush=True)
    result.pop("ratios")
    if failed or args.keep_logs or not own_workdir:
        print(f"logs: {workdir}", flush=True)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m serving.bench.runner", description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
