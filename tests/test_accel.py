"""Accelerator discovery: plan() for every vendor from fake probes, overrides, device claims, and doctor."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from serving import accel
from serving.accel import AcceleratorError, AcceleratorOverride, CupyInfo, DeviceSet, Found, parse_override, plan
from serving.cli import main

TORCH = "2.13.0"
NO_CUPY = CupyInfo()
CUPY = CupyInfo(version="13.6.0", device_count=2)
CUPY_ROCM = CupyInfo(version="13.6.0", device_count=1, hip=True)


def nvidia(cupy: CupyInfo = CUPY, count: int = 2) -> Found:
    return Found(
        torch_version=f"{TORCH}+cu128",
        torch_cuda="12.8",
        cuda=DeviceSet(True, ("NVIDIA H100 80GB HBM3",) * count),
        cupy=cupy,
        libs={"pynvml": True, "pymtml": False, "pymxsml": False},
    )


def metax(**changes) -> Found:
    """MetaX's MACA torch: torch.cuda works, the device name says MetaX."""
    found = Found(
        torch_version="2.4.0+metax2.32.0.6",
        torch_cuda="11.6",
        cuda=DeviceSet(True, ("MetaX C500",)),
        libs={"pynvml": False, "pymtml": False, "pymxsml": True},
        env={"MACA_PATH": "/opt/maca"},
    )
    return dataclasses.replace(found, **changes)


def mthreads(count: int = 8) -> Found:
    return Found(
        torch_version="2.2.0",
        musa=DeviceSet(True, ("MTT S4000",) * count, plugin_version="1.3.0"),
        libs={"pynvml": True, "pymtml": True, "pymxsml": False},
    )


def rocm(cupy: CupyInfo = CUPY_ROCM) -> Found:
    return Found(
        torch_version=f"{TORCH}+rocm6.3",
        torch_hip="6.3.42131",
        cuda=DeviceSet(True, ("AMD Instinct MI300X",)),
        cupy=cupy,
    )


def ascend() -> Found:
    return Found(torch_version="2.5.1", npu=DeviceSet(True, ("Ascend910B",) * 8, plugin_version="2.5.1"))


def cpu() -> Found:
    return Found(torch_version=f"{TORCH}+cpu", musa=DeviceSet(error="torch_musa is not installed"))


# --------------------------------------------------------------------------- every vendor, no override


@pytest.mark.parametrize(
    ("found", "expected"),
    [
        (nvidia(), ("cuda", "nvidia", "cuda", "cupy", "GPU", "CUDA_VISIBLE_DEVICES")),
        (nvidia(cupy=NO_CUPY), ("cuda", "nvidia", "cuda", "torch", "GPU", "CUDA_VISIBLE_DEVICES")),
        (
            nvidia(cupy=CupyInfo(version="13.6.0", error="CUDARuntimeError")),
            ("cuda", "nvidia", "cuda", "torch", "GPU", "CUDA_VISIBLE_DEVICES"),
        ),
        (metax(), ("cuda", "metax", "cuda", "torch", "GPU", "CUDA_VISIBLE_DEVICES")),
        (
            metax(cupy=CupyInfo(version="13.6.0", device_count=1)),
            ("cuda", "metax", "cuda", "cupy", "GPU", "CUDA_VISIBLE_DEVICES"),
        ),
        (mthreads(), ("musa", "mthreads", "musa", "torch", "mthreads_gpu", "MUSA_VISIBLE_DEVICES")),
        (rocm(), ("rocm", "amd", "cuda", "cupy", "GPU", "HIP_VISIBLE_DEVICES")),
        (rocm(cupy=NO_CUPY), ("rocm", "amd", "cuda", "torch", "GPU", "HIP_VISIBLE_DEVICES")),
        (ascend(), ("npu", "huawei", "npu", "torch", "NPU", "ASCEND_RT_VISIBLE_DEVICES")),
        (cpu(), ("cpu", "cpu", "cpu", "numpy", None, None)),
        (Found(), ("cpu", "cpu", "cpu", "numpy", None, None)),  # torch does not even import
    ],
    ids=[
        "nvidia",
        "nvidia-no-cupy",
        "nvidia-cupy-no-device",
        "metax",
        "metax-cupy",
        "mthreads",
        "rocm",
        "rocm-no-cupy",
        "ascend",
        "cpu",
        "nothing",
    ],
)
def test_plan_per_vendor(found, expected) -> None:
    p = plan(found)
    got = (p.platform, p.vendor, p.torch_device, p.array_backend, p.ray_resource, p.visible_devices_env)
    assert got == expected
    assert p.ray_amount == (0.0 if p.ray_resource is None else 1.0)
    assert p.select_device_per_replica == (p.platform == "musa")
    assert p.reasons  # doctor explains every plan


@pytest.mark.parametrize(
    ("found", "why"),
    [
        (metax(), "device name 'MetaX C500'"),
        (metax(cuda=DeviceSet(True, ("Device 4000",))), "MetaX's"),  # an unhelpful name: the torch build says it
        (metax(cuda=DeviceSet(True, ("Device 4000",)), torch_version="2.4.0"), "MACA_PATH"),
        (metax(cuda=DeviceSet(True, ("Device 4000",)), torch_version="2.4.0", env={}), "pymxsml"),
    ],
)
def test_metax_is_recognised_from_each_hint(found, why) -> None:
    vendor, reason = accel.cuda_vendor(found)
    assert vendor == "metax" and why in reason


def test_nvidia_device_name_beats_metax_environment_hints() -> None:
    found = dataclasses.replace(nvidia(), env={"MACA_PATH": "/opt/maca"}, libs={"pymxsml": True})
    assert accel.cuda_vendor(found)[0] == "nvidia"
    assert accel.cuda_vendor(dataclasses.replace(nvidia(), cuda=DeviceSet(True, ("Device 0",))))[0] == "nvidia"


def test_ray_actor_options_per_resource() -> None:
    assert plan(nvidia()).ray_actor_options() == {"num_gpus": 1.0}
    assert plan(metax()).ray_actor_options(0.5) == {"num_gpus": 0.5}
    assert plan(mthreads()).ray_actor_options() == {"resources": {"mthreads_gpu": 1.0}}
    assert plan(ascend()).ray_actor_options() == {"resources": {"NPU": 1.0}}
    assert plan(cpu()).ray_actor_options() == {}


def test_replica_actor_options_follow_config_not_the_drivers_hardware() -> None:
    # A CPU-only head node builds the app: a configured device type still asks for accelerators.
    assert accel.replica_actor_options(parse_override("cuda"), found=cpu()) == {"num_gpus": 1.0}
    assert accel.replica_actor_options(parse_override("cuda:1"), 0.5, found=cpu()) == {"num_gpus": 0.5}
    assert accel.replica_actor_options(parse_override("musa"), found=cpu()) == {"resources": {"mthreads_gpu": 1.0}}
    assert accel.replica_actor_options(parse_override("npu"), found=cpu()) == {"resources": {"NPU": 1.0}}
    assert accel.replica_actor_options(parse_override("cpu"), found=nvidia()) == {}
    # "auto" follows what this machine has (a single-machine deployment).
    assert accel.replica_actor_options(None, found=nvidia()) == {"num_gpus": 1.0}
    assert accel.replica_actor_options(parse_override("auto", "torch"), found=cpu()) == {}


# --------------------------------------------------------------------------- overrides


def test_parse_override() -> None:
    assert parse_override() is None and parse_override("auto", "auto") is None and parse_override(None, None) is None
    assert parse_override("CUDA:1") == AcceleratorOverride("cuda:1", None)
    assert parse_override("auto", "torch") == AcceleratorOverride(None, "torch")
    assert parse_override("musa", "torch").device_type == "musa"
    assert parse_override("npu:3").device_index == 3
    for bad in ("tpu", "gpu", "cpu:0", "cuda:x", "cuda:", "rocm"):
        with pytest.raises(AcceleratorError, match="accelerator"):
            parse_override(bad)
    with pytest.raises(AcceleratorError, match="array_backend"):
        parse_override("auto", "jax")


def test_overrides_that_the_node_can_meet() -> None:
    p = plan(nvidia(), parse_override("cpu"))
    assert (p.platform, p.torch_device, p.array_backend, p.ray_resource) == ("cpu", "cpu", "numpy", None)
    p = plan(nvidia(), parse_override("cuda:1"))
    assert (p.torch_device, p.array_backend, p.vendor) == ("cuda:1", "cupy", "nvidia")
    assert plan(nvidia(), parse_override("cuda", "torch")).array_backend == "torch"
    assert plan(cpu(), parse_override("auto", "torch")).array_backend == "torch"  # torch kernels on the CPU
    assert plan(cpu(), parse_override("cpu", "torch")).torch_device == "cpu"
    p = plan(mthreads(), parse_override("musa:3"))
    assert p.torch_device == "musa:3" and not p.select_device_per_replica  # the operator chose the device
    assert plan(ascend(), parse_override("npu:7")).torch_device == "npu:7"
    assert plan(rocm(), parse_override("cuda")).platform == "rocm"


@pytest.mark.parametrize(
    ("found", "override", "message"),
    [
        (cpu(), ("cuda", "auto"), "no usable cuda device"),
        (nvidia(count=2), ("cuda:2", "auto"), "only 2 cuda device"),
        (nvidia(), ("musa", "auto"), "no usable musa device"),
        (mthreads(), ("npu", "auto"), "no usable npu device"),
        (nvidia(), ("auto", "numpy"), "host only"),
        (nvidia(cupy=NO_CUPY), ("auto", "cupy"), "cupy is not installed"),
        (nvidia(cupy=CupyInfo(version="13.6.0")), ("auto", "cupy"), "sees no device"),
        (mthreads(), ("auto", "cupy"), "needs a CUDA or ROCm device"),
        (cpu(), ("auto", "cupy"), "needs a CUDA or ROCm device"),
    ],
)
def test_overrides_the_node_cannot_meet_are_errors(found, override, message) -> None:
    with pytest.raises(AcceleratorError, match=message):
        plan(found, parse_override(*override))


# --------------------------------------------------------------------------- per-replica devices (Moore Threads)


def test_claim_device_hands_out_distinct_devices_and_frees_them(tmp_path) -> None:
    first = accel.claim_device(2, tmp_path)
    second = accel.claim_device(2, tmp_path)
    assert (first.index, second.index) == (0, 1)
    with pytest.raises(RuntimeError, match="all 2 musa device"):
        accel.claim_device(2, tmp_path)
    first.release()  # a replica that exits (or dies) frees its device
    again = accel.claim_device(2, tmp_path)
    assert again.index == 0
    again.release()
    second.release()


def test_replica_device(tmp_path) -> None:
    p = plan(mthreads(count=4))
    device, claim = accel.replica_device(p, mthreads(count=4), tmp_path, environ={})
    assert device == "musa:0" and claim is not None
    device2, claim2 = accel.replica_device(p, mthreads(count=4), tmp_path, environ={})
    assert device2 == "musa:1"
    # The environment already narrowed this process to one device (ray-musa, or a one-device pod).
    assert accel.replica_device(p, mthreads(), tmp_path, environ={"MUSA_VISIBLE_DEVICES": "5"}) == ("musa:0", None)
    # Vendors whose devices Ray assigns keep the plain device string.
    assert accel.replica_device(plan(nvidia()), nvidia(), tmp_path, environ={}) == ("cuda", None)
    for c in (claim, claim2):
        c.release()


# --------------------------------------------------------------------------- this machine, and the doctor


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device; the test is for CPU machines")
def test_probe_on_this_machine_is_cpu_and_numpy() -> None:
    found = accel.probe()
    assert found.torch_version == torch.__version__
    assert not found.cuda.available
    assert set(found.libs) == set(accel.MANAGEMENT_LIBS)
    p = plan(found)
    assert (p.platform, p.torch_device, p.array_backend, p.ray_resource) == ("cpu", "cpu", "numpy", None)


def test_doctor_report_without_probing() -> None:
    report = accel.doctor_report(parse_override("cuda"), found=cpu(), metrics=False)
    assert report["plan"] is None and "no usable cuda device" in report["error"]
    text = accel.format_report(accel.doctor_report(found=mthreads(), metrics=False))
    assert "mthreads_gpu x 1 per replica" in text and "MTT S4000" in text and "each replica claims" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device; the test is for CPU machines")
def test_superbrain_doctor_json(capsys) -> None:
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["error"] is None
    assert report["found"]["torch_version"] == torch.__version__
    assert report["plan"]["torch_device"] == "cpu" and report["plan"]["array_backend"] == "numpy"
    assert report["plan"]["ray_resource"] is None and report["plan"]["ray_actor_options"] == {}
    assert {m["vendor"] for m in report["metrics"]} == {"nvidia", "mthreads", "metax"}


def test_superbrain_doctor_text_and_errors(capsys) -> None:
    assert main(["doctor", "--accelerator", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "Will use" in out and "torch device     cpu" in out and "array backend    numpy" in out
    assert main(["doctor", "--accelerator", "tpu"]) == 2
    assert "not one of" in capsys.readouterr().err
