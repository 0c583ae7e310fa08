"""`superbrain bench --workload W2 --device cpu|cuda`: runs on the CPU with tiny sizes, refuses a missing GPU clearly.

The numbers themselves are for docs/benchmarks.md; here only their presence,
their consistency and the ratio arithmetic are checked.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from serving.bench import device as bench_device
from serving.cli import build_parser, main

TINY = [
    "bench",
    "--workload",
    "W2",
    "--device",
    "cpu",
    "--preprocess-batches",
    "1,3",
    "--forward-max-batch",
    "4",
    "--saturation-s",
    "0.3",
    "--max-batch-size",
    "2",
    "--raw-repeats",
    "1",
    "--json",
]


def test_w2_device_bench_on_cpu_prints_a_table_and_one_json_object(capsys) -> None:
    assert main(TINY) == 0
    out = capsys.readouterr().out
    assert "preprocessing:" in out and "model forward" in out and "saturation:" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert result["workload"] == "W2" and result["device"] == "cpu" and result["array_backend"] == "numpy"

    rows = result["preprocess"]["results"]
    assert {(r["backend"], r["batch"]) for r in rows} == {(b, n) for b in ("numpy", "torch-cpu") for n in (1, 3)}
    for r in rows:
        assert r["kernel_frames_per_s"] > 0 and r["assemble_frames_per_s"] > 0
        assert r["kernel_frames_per_s"] == pytest.approx(r["batch"] / (r["kernel_ms"] / 1e3), rel=0.01)
    assert set(result["preprocess"]["skipped"]) == {"torch-cuda", "cupy"}

    assert [r["batch"] for r in result["forward"]] == [1, 2, 4]
    assert all(r["ms"] > 0 for r in result["forward"])

    sat = result["saturation"]
    assert sat["default_mode"] == "sequential" and sat["robots"] == 6
    for mode in ("sequential", "pipelined"):
        r = sat["modes"][mode]
        assert r["errors"] == 0 and r["obs_per_s"] > 0 and r["batches"] > 0
        assert 0.0 < r["busy_fraction"] <= 1.05  # forward-stage seconds over wall seconds
        assert r["device_utilization"] is None  # NVML's view: only with --device cuda
        assert r["mean_batch"] <= 2

    ratios = result["ratios"]
    assert ratios["preprocess_ratio_batch"] == 3  # no 64 here: the largest batch measured
    by = {(r["backend"], r["batch"]): r for r in rows}
    expected = by[("torch-cpu", 3)]["kernel_frames_per_s"] / by[("numpy", 3)]["kernel_frames_per_s"]
    assert ratios["torch_cpu_vs_numpy_kernel_at_3"] == pytest.approx(expected, rel=1e-3)
    assert ratios["busy_fraction"] == sat["modes"]["sequential"]["busy_fraction"]
    assert ratios["pipelined_vs_sequential_obs_per_s"] > 0
    assert all(t["met"] is None for t in result["targets"].values())  # GPU targets: n/a on the CPU
    assert result["all_targets_met"] is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu_fails_with_a_clear_message(capsys) -> None:
    argv = ["bench", "--workload", "W2", "--device", "cuda", "--json"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "--device cuda: torch sees no CUDA device" in captured.err
    assert "--device cpu" in captured.err and "Traceback" not in captured.err
    assert captured.out == ""  # nothing half-measured


def test_device_is_for_w2_only_and_not_with_systems(capsys) -> None:
    assert main(["bench", "--workload", "W1", "--device", "cpu"]) == 2
    assert "W2" in capsys.readouterr().err
    assert main(["bench", "--workload", "W2", "--device", "cpu", "--compare"]) == 2
    assert "--compare" in capsys.readouterr().err


def test_the_system_benchmark_arguments_are_unchanged() -> None:
    args = build_parser().parse_args(["bench", "--workload", "W1", "--systems", "superbrain,grpc_limit"])
    assert args.device is None and args.systems == "superbrain,grpc_limit" and args.workload == "W1"


def _result(numpy_fps: float, cupy_fps: float | None, busy: float, device: str) -> dict:
    rows = [{"backend": "numpy", "batch": 64, "kernel_frames_per_s": numpy_fps, "assemble_frames_per_s": numpy_fps / 2}]
    if cupy_fps is not None:
        rows.append(
            {"backend": "cupy", "batch": 64, "kernel_frames_per_s": cupy_fps, "assemble_frames_per_s": cupy_fps}
        )
    mode = {"busy_fraction": busy, "obs_per_s": 100.0}
    return {
        "device": device,
        "preprocess": {"results": rows},
        "forward": [{"batch": 1, "obs_per_s": 50.0}, {"batch": 256, "obs_per_s": 1000.0}],
        "saturation": {
            "default_mode": "pipelined" if device == "cuda" else "sequential",
            "modes": {"sequential": {**mode, "busy_fraction": 0.5}, "pipelined": {**mode, "obs_per_s": 150.0}},
        },
    }


def test_ratios_and_gpu_targets() -> None:
    gpu = _result(1000.0, 12000.0, 0.83, "cuda")
    ratios = bench_device.compute_ratios(gpu)
    assert ratios["cupy_vs_numpy_kernel_at_64"] == 12.0
    assert ratios["cupy_vs_numpy_assemble_at_64"] == 24.0
    assert ratios["forward_obs_per_s_256_vs_1"] == 20.0
    assert ratios["busy_fraction"] == 0.83  # the device's default mode: pipelined on CUDA
    assert ratios["pipelined_vs_sequential_obs_per_s"] == 1.5
    targets = bench_device.evaluate_targets("cuda", ratios)
    assert targets["cupy_vs_numpy_kernel_at_64"]["met"] is True and targets["busy_fraction"]["met"] is True

    slow = bench_device.compute_ratios(_result(1000.0, 9000.0, 0.7, "cuda"))
    targets = bench_device.evaluate_targets("cuda", slow)
    assert targets["cupy_vs_numpy_kernel_at_64"]["met"] is False and targets["busy_fraction"]["met"] is False

    no_cupy = bench_device.compute_ratios(_result(1000.0, None, 0.9, "cuda"))
    assert "cupy_vs_numpy_kernel_at_64" not in no_cupy
    assert bench_device.evaluate_targets("cuda", no_cupy)["cupy_vs_numpy_kernel_at_64"]["met"] is None
    cpu = bench_device.compute_ratios(_result(1000.0, None, 0.9, "cpu"))
    assert cpu["busy_fraction"] == 0.5  # sequential is the CPU's default
    assert all(t["met"] is None for t in bench_device.evaluate_targets("cpu", cpu).values())


def test_device_utilization_reads_the_benchmarked_gpu_from_nvml() -> None:
    from serving.accel_metrics import NvidiaBackend
    from serving.bench.device import DeviceUtilization
    from tests.test_accel_metrics import fake_pynvml, nv_device

    two = fake_pynvml([nv_device(uuid="GPU-aaaa", util=37), nv_device(uuid="GPU-bbbb", util=80)])
    utilization = DeviceUtilization.matching(NvidiaBackend(two), "bbbb")  # torch's UUID has no "GPU-"
    assert utilization is not None
    readings = asyncio.run(utilization.sample(0.6))
    assert len(readings) >= 2 and set(readings) == {0.8}
    assert DeviceUtilization.matching(NvidiaBackend(two), "cccc") is None  # two GPUs, neither is torch's
    one = fake_pynvml([nv_device(uuid="GPU-aaaa", util=37)])
    only = DeviceUtilization.matching(NvidiaBackend(one), "")
    assert only is not None and set(asyncio.run(only.sample(0.3))) == {0.37}
