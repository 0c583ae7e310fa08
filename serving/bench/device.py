"""``superbrain bench --workload W2 --device cpu|cuda``: the accelerator side of W2, in one process.

Three measurements on W2's observations (``unitree_go2``, one 224x224 uint8
frame each), all in the same run so their ratios are comparable:

1. **Preprocessing**, per array backend that this machine has (numpy,
   torch on the CPU, and with ``--device cuda`` torch on the GPU and CuPy):
   ``kernel`` is B decoded uint8 frames (224, 224, 3) in host memory to the
   model's normalised float32 (B, 3, 96, 96) on the backend's device: stacked
   and uploaded, then ``serving.processing.resize_normalize`` (CuPy's fused
   kernel, the seam's resize + normalise elsewhere), as the assembler does it
   (in groups of 8 frames on a CPU, all at once on a device); ``assemble`` is the
   whole batch assembly (``BatchAssembler.assemble``: frames, state, tokens,
   masks). Frames/s, best of ``--raw-repeats``.
2. **Model forward** of the default model (``VLAPolicy.forward``, on the
   device's default backend) at batch 1, 2, 4, ... up to ``--forward-max-batch``,
   the device synchronised after each call.
3. **Busy fraction at saturation**: ``PolicyEngine`` + ``CapacityBatcher`` with
   the default model in-process, three times ``--max-batch-size`` closed-loop
   callers (always more queued than two stages hold), once sequential and once
   pipelined. Busy fraction = seconds the forward stage held a batch / wall
   seconds, over ``--saturation-s`` after a warm-up.

Prints a table; with ``--json`` the last line is one JSON object. Targets (GPU
only, issue 5): CuPy preprocessing >= 10x numpy at batch 64 (the ``kernel``
figure), busy fraction >= 0.8 at saturation in the device's default mode.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

#: Issue 5's GPU targets: (name, comparison, threshold).
GPU_TARGETS = (("cupy_vs_numpy_kernel_at_64", ">=", 10.0), ("busy_fraction", ">=", 0.8))
#: Each timed repeat runs the call at least this long (short calls are looped).
MIN_REPEAT_S = 0.2
#: Callers per max_batch_size at saturation: one batch in each stage plus one full batch queued.
ROBOTS_PER_BATCH = 3
#: Seconds between NVML utilisation readings at saturation (NVML averages over its own 1/6-1 s period).
UTILIZATION_SAMPLE_S = 0.25


class DeviceUnavailable(RuntimeError):
    """The requested device is not usable here; the message says why and what to do."""


@dataclass(frozen=True)
class Options:
    device: str
    preprocess_batches: tuple[int, ...]
    forward_batches: tuple[int, ...]
    saturation_s: float
    warmup_s: float
    max_batch_size: int
    repeats: int


def options_from_args(args: argparse.Namespace) -> Options:
    batches = tuple(int(x) for x in str(args.preprocess_batches).split(",") if x.strip())
    if not batches or min(batches) < 1:
        raise SystemExit("--preprocess-batches: a comma-separated list of positive integers")
    if args.forward_max_batch < 1 or args.max_batch_size < 1 or args.saturation_s <= 0:
        raise SystemExit("--forward-max-batch and --max-batch-size must be >= 1, --saturation-s > 0")
    forward = tuple(1 << i for i in range(args.forward_max_batch.bit_length()) if 1 << i <= args.forward_max_batch)
    return Options(
        device=args.device,
        preprocess_batches=batches,
        forward_batches=forward,
        saturation_s=args.saturation_s,
        warmup_s=min(2.0, max(0.2, args.saturation_s / 2)),
        max_batch_size=args.max_batch_size,
        repeats=max(1, args.raw_repeats),
    )


def check_device(device: str) -> str:
    """A description of ``device`` ("cpu", "cuda"), or DeviceUnavailable saying why it cannot be used."""
    import torch

    if device == "cpu":
        return _cpu_name()
    if device != "cuda":
        raise DeviceUnavailable(f"--device {device!r}: the W2 accelerator benchmark runs on 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + (
            f" (CUDA {torch.version.cuda})" if torch.version.cuda else ", a build without CUDA"
        )
        raise DeviceUnavailable(
            f"--device cuda: torch sees no CUDA device here ({build}). Run it on a GPU node in the CUDA image "
            "(docs/accelerators.md; `superbrain doctor` shows what the node has), or use --device cpu."
        )
    return torch.cuda.get_device_name(0)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or 'CPU'} ({os.cpu_count()} CPUs)"


# --------------------------------------------------------------------------- timing


def _synchronizer(device: str, backend: str) -> Callable[[], None]:
    """A function that waits for the device's queued work (a no-op on the host)."""
    if device.split(":")[0] != "cuda":
        return lambda: None
    if backend == "cupy":
        import cupy

        return lambda: cupy.cuda.Device().synchronize()
    import torch

    return lambda: torch.cuda.synchronize()


def best_seconds(call: Callable[[], object], sync: Callable[[], None], repeats: int) -> float:
    """Seconds per call: best of ``repeats`` timed loops, each at least MIN_REPEAT_S, after two warm-up calls."""
    for _ in range(2):
        call()
    sync()
    t0 = time.perf_counter()
    call()
    sync()
    once = max(time.perf_counter() - t0, 1e-6)
    loops = max(1, int(MIN_REPEAT_S / once))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            call()
        sync()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


# --------------------------------------------------------------------------- 1. preprocessing


def preprocess_backends(device: str) -> tuple[list[tuple[str, Any]], dict[str, str]]:
    """(label, backend) for every array backend this machine runs, and why the others were left out."""
    from serving.processing import get_backend

    backends: list[tuple[str, Any]] = [("numpy", get_backend("numpy")), ("torch-cpu", get_backend("torch", "cpu"))]
    skipped: dict[str, str] = {}
    if device == "cuda":
        backends.append(("torch-cuda", get_backend("torch", "cuda")))
        try:
            backends.append(("cupy", get_backend("cupy", "cuda")))
        except Exception as exc:  # CupyUnavailable: not installed, or sees no device
            skipped["cupy"] = str(exc)
    else:
        skipped["torch-cuda"] = skipped["cupy"] = "needs --device cuda"
    return backends, skipped


def bench_preprocess(opts: Options, policy: Any) -> dict[str, Any]:
    """Frames/s of the preprocessing kernels and of the whole batch assembly, per backend and batch size."""
    from serving.batching import BatchAssembler
    from serving.bench.workloads import build, observations
    from serving.processing import resize_normalize

    dims = policy.dims  # the default model's input sizes and image statistics
    obs = observations(build("W2"), max(opts.preprocess_batches))
    frames_all = [next(iter(o.images.values())) for o in obs]  # one frame per request, as decoded
    backends, skipped = preprocess_backends(opts.device)
    measured = []
    for label, xp in backends:
        assembler = BatchAssembler(policy.meta.embodiments, dims, xp)
        sync = _synchronizer(xp.device, xp.name)
        # As the assembler calls it: the requests' frames stacked into one host array (on a CPU
        # in cache-sized groups, on a device all at once), then resize_normalize on each group.
        chunk = assembler.frames_per_call

        def kernel(frames: list[np.ndarray], xp: Any = xp, chunk: int | None = chunk) -> None:
            step = chunk or len(frames)
            for start in range(0, len(frames), step):
                stacked = xp.stack_frames(frames[start : start + step])
                resize_normalize(stacked, dims.image_size, dims.image_size, dims.image_mean, dims.image_std, xp)

        for b in opts.preprocess_batches:
            frames, batch = frames_all[:b], obs[:b]
            measured.append(
                (
                    label,
                    b,
                    lambda frames=frames, kernel=kernel: kernel(frames),
                    lambda batch=batch, a=assembler: a.assemble(batch),
                    sync,
                )
            )
    # One untimed pass over everything first. Until a process has freed one large block, glibc's
    # dynamic mmap/trim thresholds are low: the kernels' megabyte temporaries go back to the
    # kernel after every call and page-fault in again on the next (measured here: numpy at
    # batch 64 took 23 ms before, 8 ms after freeing one 20 MB array). A replica is past that
    # after its first batch; the benchmark should measure that state, for every backend alike.
    for _, _, kernel_call, assemble_call, sync in measured:
        kernel_call(), assemble_call(), sync()
    rows = []
    for label, b, kernel_call, assemble_call, sync in measured:
        kernel_s = best_seconds(kernel_call, sync, opts.repeats)
        assemble_s = best_seconds(assemble_call, sync, opts.repeats)
        rows.append(
            {
                "backend": label,
                "batch": b,
                "kernel_ms": round(kernel_s * 1e3, 3),
                "kernel_frames_per_s": round(b / kernel_s, 1),
                "assemble_ms": round(assemble_s * 1e3, 3),
                "assemble_frames_per_s": round(b / assemble_s, 1),
            }
        )
    h, w, _ = frames_all[0].shape
    return {
        "frames": f"{h}x{w}x3 uint8 (host) -> 3x{dims.image_size}x{dims.image_size} float32 on the backend's device",
        "results": rows,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- 2. model forward


def _policy(device: str) -> Any:
    from serving.policy.vla_policy import VLAPolicy

    policy = VLAPolicy.default(seed=0)
    policy.setup(device)  # the device's default array backend, as a replica would pick
    return policy


def bench_forward(opts: Options, policy: Any) -> list[dict[str, Any]]:
    """Milliseconds per ``policy.forward`` (inputs already on the device) at each batch size."""
    from serving.bench.workloads import build, observations

    obs = observations(build("W2"), max(opts.forward_batches))
    sync = _synchronizer(str(policy.device), "torch")
    rows = []
    for b in opts.forward_batches:
        batch = policy.preprocess(obs[:b])
        seconds = best_seconds(lambda batch=batch: policy.forward(batch), sync, opts.repeats)
        rows.append({"batch": b, "ms": round(seconds * 1e3, 3), "obs_per_s": round(b / seconds, 1)})
    return rows


# --------------------------------------------------------------------------- 3. busy fraction at saturation


async def _saturate(policy: Any, pipeline: bool, opts: Options) -> dict[str, Any]:
    from serving.bench.workloads import build, observations
    from serving.engine import CapacityBatcher, Pending, PolicyEngine

    engine = PolicyEngine(policy, pipeline=pipeline)
    batcher = CapacityBatcher(engine.run_batch, opts.max_batch_size, 0.002, max_inflight=engine.max_inflight_batches)
    robots = ROBOTS_PER_BATCH * opts.max_batch_size
    obs = observations(build("W2"), robots)
    done = [0]
    errors = [0]
    stop = asyncio.Event()

    async def robot(i: int) -> None:
        while not stop.is_set():
            outcome = await batcher(Pending(observation=obs[i], deadline=time.monotonic() + 60.0))
            done[0] += 1
            errors[0] += outcome.error is not None

    tasks = [asyncio.ensure_future(robot(i)) for i in range(robots)]
    utilization = DeviceUtilization.for_device(opts.device)
    try:
        await asyncio.sleep(opts.warmup_s)
        t0, busy0, calls0 = time.monotonic(), engine.busy_seconds, done[0]
        batches0, requests0 = engine.batches, engine.requests
        if utilization is None:
            readings = None
            await asyncio.sleep(opts.saturation_s)
        else:
            readings = await utilization.sample(opts.saturation_s)
        wall = time.monotonic() - t0
        busy, calls = engine.busy_seconds - busy0, done[0] - calls0
        batches, requests = engine.batches - batches0, engine.requests - requests0
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        batcher.close()
        engine.close()
    return {
        "pipeline": pipeline,
        "busy_fraction": round(busy / wall, 3),
        "device_utilization": round(sum(readings) / len(readings), 3) if readings else None,
        "obs_per_s": round(calls / wall, 1),
        "mean_batch": round(requests / batches, 1) if batches else 0.0,
        "batches": batches,
        "wall_s": round(wall, 2),
        "errors": errors[0],
    }


class DeviceUtilization:
    """NVML's utilisation of the benchmarked GPU: the share of time one or more kernels ran.

    The busy fraction counts the forward *stage*'s seconds, which include the host
    launching kernels and waiting for the copy back; this is the device's own view
    of the same window, the cross-check docs/accelerators.md promises.
    """

    def __init__(self, backend: Any, index: int):
        self._backend = backend
        self._index = index

    @classmethod
    def for_device(cls, device: str) -> DeviceUtilization | None:
        """For the GPU that torch calls ``cuda`` here, or None (not CUDA, no NVML, no matching device)."""
        if device != "cuda":
            return None
        import torch

        from serving.accel_metrics import NvidiaBackend

        return cls.matching(NvidiaBackend(), str(getattr(torch.cuda.get_device_properties(0), "uuid", "")))

    @classmethod
    def matching(cls, backend: Any, uuid: str) -> DeviceUtilization | None:
        """NVML numbers devices its own way: pick torch's by UUID, or the only one; None when unsure."""
        devices = backend.scrape().devices
        for reading in devices:
            if uuid and reading.uuid.removeprefix("GPU-") == uuid:
                return cls(backend, reading.index)
        return cls(backend, devices[0].index) if len(devices) == 1 else None

    async def sample(self, seconds: float) -> list[float]:
        """Readings every UTILIZATION_SAMPLE_S for ``seconds`` (NVML is read off the event loop)."""
        end = time.monotonic() + seconds
        readings = []
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(UTILIZATION_SAMPLE_S, left))
            scrape = await asyncio.to_thread(self._backend.scrape)
            for reading in scrape.devices:
                if reading.index == self._index and reading.utilization_ratio is not None:
                    readings.append(reading.utilization_ratio)
        return readings


def bench_saturation(opts: Options, policy: Any) -> dict[str, Any]:
    """The engine at saturation, sequential then pipelined, and which of the two is this device's default."""
    from serving.engine import default_pipeline

    modes = {
        name: asyncio.run(_saturate(policy, pipeline, opts))
        for name, pipeline in (("sequential", False), ("pipelined", True))
    }
    default = "pipelined" if default_pipeline(opts.device) else "sequential"
    return {
        "max_batch_size": opts.max_batch_size,
        "robots": ROBOTS_PER_BATCH * opts.max_batch_size,
        "default_mode": default,
        "modes": modes,
    }


# --------------------------------------------------------------------------- report


def compute_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios between figures of this one run (the only comparisons worth making on a noisy machine)."""
    rows = result["preprocess"]["results"]
    batches = sorted({r["batch"] for r in rows})
    at = 64 if 64 in batches else batches[-1]
    by = {(r["backend"], r["batch"]): r for r in rows}
    out: dict[str, Any] = {"preprocess_ratio_batch": at}
    base = by.get(("numpy", at))
    for label in ("torch-cpu", "torch-cuda", "cupy"):
        row = by.get((label, at))
        if base and row:
            key = label.replace("-", "_")
            out[f"{key}_vs_numpy_kernel_at_{at}"] = round(row["kernel_frames_per_s"] / base["kernel_frames_per_s"], 3)
            out[f"{key}_vs_numpy_assemble_at_{at}"] = round(
                row["assemble_frames_per_s"] / base["assemble_frames_per_s"], 3
            )
    fwd = result["forward"]
    if len(fwd) > 1:
        out[f"forward_obs_per_s_{fwd[-1]['batch']}_vs_1"] = round(fwd[-1]["obs_per_s"] / fwd[0]["obs_per_s"], 3)
    sat = result["saturation"]
    modes = sat["modes"]
    out["busy_fraction"] = modes[sat["default_mode"]]["busy_fraction"]
    if modes["sequential"]["obs_per_s"]:
        out["pipelined_vs_sequential_obs_per_s"] = round(
            modes["pipelined"]["obs_per_s"] / modes["sequential"]["obs_per_s"], 3
        )
    return out


def evaluate_targets(device: str, ratios: dict[str, Any]) -> dict[str, Any]:
    """Issue 5's GPU targets; on the CPU they do not apply (value still shown where it exists)."""
    targets = {}
    for name, op, threshold in GPU_TARGETS:
        value = ratios.get(name)
        met = None
        if device == "cuda" and value is not None:
            met = value >= threshold if op == ">=" else value <= threshold
        targets[name] = {"target": f"{op} {threshold}", "value": value, "met": met}
    return targets


def format_report(result: dict[str, Any]) -> str:
    out = [
        f"workload W2 on {result['device']} ({result['device_name']}); "
        f"default array backend {result['array_backend']}, torch {result['torch']} with {result['torch_threads']} "
        "thread(s)",
        "",
        f"preprocessing: {result['preprocess']['frames']}",
    ]
    rows = [("backend", "batch", "kernel ms", "kernel frames/s", "assemble ms", "assemble frames/s")]
    for r in result["preprocess"]["results"]:
        rows.append(
            (
                r["backend"],
                str(r["batch"]),
                f"{r['kernel_ms']:.3f}",
                f"{r['kernel_frames_per_s']:.0f}",
                f"{r['assemble_ms']:.3f}",
                f"{r['assemble_frames_per_s']:.0f}",
            )
        )
    out += _table(rows)
    for name, why in result["preprocess"]["skipped"].items():
        out.append(f"  {name}: not run ({why})")
    out += ["", f"model forward ({result['array_backend']} inputs, device synchronised after each call)"]
    out += _table(
        [("batch", "ms", "obs/s")]
        + [(str(r["batch"]), f"{r['ms']:.3f}", f"{r['obs_per_s']:.0f}") for r in result["forward"]]
    )
    sat = result["saturation"]
    out += [
        "",
        f"saturation: engine + CapacityBatcher, {sat['robots']} closed-loop callers, max batch {sat['max_batch_size']} "
        f"(default here: {sat['default_mode']})",
    ]
    mode_rows = [("mode", "busy fraction", "NVML utilization", "obs/s", "mean batch", "errors")]
    for name, r in sat["modes"].items():
        util = r.get("device_utilization")
        mode_rows.append(
            (
                name,
                f"{r['busy_fraction']:.3f}",
                "n/a" if util is None else f"{util:.3f}",
                f"{r['obs_per_s']:.0f}",
                f"{r['mean_batch']:.1f}",
                str(r["errors"]),
            )
        )
    out += _table(mode_rows)
    out.append("")
    for k, v in result["ratios"].items():
        out.append(f"{k}: {v}")
    for name, t in result["targets"].items():
        state = {True: "MET", False: "NOT MET", None: "n/a (a GPU target)"}[t["met"]]
        out.append(f"target {name} {t['target']}: {t['value']} -> {state}")
    return "\n".join(out)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return ["  " + line for line in lines]


def run(opts: Options) -> dict[str, Any]:
    """All three measurements; DeviceUnavailable before anything runs if the device is not there."""
    device_name = check_device(opts.device)
    import torch

    started = time.monotonic()
    policy = _policy(opts.device)
    result: dict[str, Any] = {
        "workload": "W2",
        "device": opts.device,
        "device_name": device_name,
        "array_backend": policy.array_backend,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "preprocess": bench_preprocess(opts, policy),
        "forward": bench_forward(opts, policy),
        "saturation": bench_saturation(opts, policy),
    }
    result["ratios"] = compute_ratios(result)
    result["targets"] = evaluate_targets(opts.device, result["ratios"])
    met = [t["met"] for t in result["targets"].values()]
    result["all_targets_met"] = all(m is True for m in met) if all(m is not None for m in met) else None
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg": _loadavg()}
    result["elapsed_s"] = round(time.monotonic() - started, 1)
    return result


def _loadavg() -> list[float] | None:
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def main(args: argparse.Namespace) -> int:
    """Entry point from ``superbrain bench --device``: 0 when it ran, 2 when the device or the arguments are wrong."""
    if args.workload.upper() != "W2":
        print(
            f"--device runs W2's accelerator benchmark (the default model); got --workload {args.workload}",
            file=sys.stderr,
        )
        return 2
    if args.compare or args.systems or args.smoke:
        print("--device measures in-process; it does not take --compare, --systems or --smoke", file=sys.stderr)
        return 2
    opts = options_from_args(args)
    try:
        result = run(opts)
    except DeviceUnavailable as exc:
        print(f"superbrain bench: {exc}", file=sys.stderr)
        return 2
    print(format_report(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    errors = sum(m["errors"] for m in result["saturation"]["modes"].values())
    return 1 if errors else 0
