"""The accelerator exporter: real behaviour on this machine, vendor mappings through fake vendor modules.

Only the vendor libraries (pynvml, pymtml, pymxsml) are faked, because they
need a GPU and its driver; the collector, the registry and the exposition are
the real ones. The real-GPU tests at the end run wherever a driver is present.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving.accel_metrics import (
    AcceleratorCollector,
    BackendScrape,
    MetaxBackend,
    MooreThreadsBackend,
    NvidiaBackend,
    VendorBackend,
)

P = "superbrain_accelerator_"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(collector: AcceleratorCollector) -> Samples:
    """One collect(), as {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value for family in collector.collect() for s in family.samples
    }


def value(samples: Samples, metric: str, **labels: str) -> float | None:
    return samples.get((P + metric, tuple(sorted(labels.items()))))


def device_samples(samples: Samples) -> list[str]:
    per_device = ("utilization_ratio", "memory_used_bytes", "memory_total_bytes", "temperature_celsius", "power_watts")
    return [name for name, _ in samples if name in {P + m for m in (*per_device, "info")}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- fake vendor modules -----------------------------------------------------------------
# A device is a dict of readings; a reading may be Raise(code), which the fake raises as that
# library's own error class with that code (the way the ctypes bindings do), or any exception.


class Raise:
    def __init__(self, code: int) -> None:
        self.code = code


def _error_class(name: str) -> type[Exception]:
    def __init__(self: Any, value: int) -> None:
        Exception.__init__(self, value)
        self.value = value

    return type(name, (Exception,), {"__init__": __init__})


def _fake_module(name: str, error_name: str, constants: dict[str, int]) -> tuple[ModuleType, Callable[[Any], Any]]:
    module = ModuleType(name)
    error = _error_class(error_name)
    setattr(module, error_name, error)
    for key, val in constants.items():
        setattr(module, key, val)
    module.calls = []  # type: ignore[attr-defined]

    def give(reading: Any) -> Any:
        if isinstance(reading, Raise):
            raise error(reading.code)
        if isinstance(reading, Exception):
            raise reading
        return reading

    return module, give


NVML_NOT_SUPPORTED, NVML_DRIVER_NOT_LOADED, NVML_GPU_IS_LOST, NVML_UNKNOWN = 3, 9, 15, 999


def fake_pynvml(devices: list[dict[str, Any]], init_failures: int = 0) -> ModuleType:
    """pynvml as nvidia-ml-py shapes it: handles, structs with .gpu/.used/.total, str names, mW, percent."""
    m, give = _fake_module(
        "pynvml",
        "NVMLError",
        {
            "NVML_ERROR_NOT_SUPPORTED": NVML_NOT_SUPPORTED,
            "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
            "NVML_TEMPERATURE_GPU": 0,
        },
    )
    failures = [init_failures]

    def nvmlInit() -> None:
        m.calls.append("init")
        if failures[0] > 0:
            failures[0] -= 1
            raise m.NVMLError(NVML_DRIVER_NOT_LOADED)

    def handle(i: int) -> dict[str, Any]:
        give(devices[i].get("handle"))
        return devices[i]

    def temperature(h: dict[str, Any], sensor: int) -> Any:
        assert sensor == m.NVML_TEMPERATURE_GPU
        return give(h["temp"])

    m.nvmlInit = nvmlInit
    m.nvmlShutdown = lambda: m.calls.append("shutdown")
    m.nvmlDeviceGetCount = lambda: len(devices)
    m.nvmlDeviceGetHandleByIndex = handle
    m.nvmlDeviceGetName = lambda h: give(h["name"])
    m.nvmlDeviceGetUUID = lambda h: give(h["uuid"])
    m.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=give(h["util"]), memory=0)
    m.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(
        used=give(h["used"]), total=h["total"], free=h["total"] - h["used"]
    )
    m.nvmlDeviceGetTemperature = temperature
    m.nvmlDeviceGetPowerUsage = lambda h: give(h["mw"])
    return m


def nv_device(**overrides: Any) -> dict[str, Any]:
    device = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-aaaa",
        "util": 37,
        "used": 1 << 30,
        "total": 80 << 30,
        "temp": 41,
        "mw": 123_456,
    }
    return {**device, **overrides}


def collector_for(*backends: VendorBackend) -> AcceleratorCollector:
    return AcceleratorCollector(list(backends))


# -- this machine ------------------------------------------------------------------------------


def nvml_device_count() -> int | None:
    """Devices NVML sees here, or None when there is no library or driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


NVML_DEVICES = nvml_device_count()


def test_default_collector_runs_on_this_machine() -> None:
    collector = AcceleratorCollector()
    assert [b.vendor for b in collector.backends] == ["nvidia", "mthreads", "metax"]
    for _ in range(2):  # a second scrape (the retry gate closed) must be just as fine
        samples = scrape(collector)
        assert value(samples, "exporter_up") == 1
        assert value(samples, "scrape_duration_seconds") >= 0
        nvidia_up = value(samples, "backend_up", vendor="nvidia")
        if NVML_DEVICES is None:  # no GPU, no driver (or no nvidia-ml-py): down, nothing per device
            assert nvidia_up == 0
            assert value(samples, "devices", vendor="nvidia") == 0
        else:
            assert nvidia_up == 1
            assert value(samples, "devices", vendor="nvidia") == NVML_DEVICES
        for vendor in ("nvidia", "mthreads", "metax"):
            assert value(samples, "scrape_errors_total", vendor=vendor) == 0
    if NVML_DEVICES is None:
        assert device_samples(samples) == []


def test_exposition_through_generate_latest() -> None:
    registry = CollectorRegistry()
    registry.register(AcceleratorCollector())
    text = generate_latest(registry).decode()
    names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    assert {
        P + "exporter_up",
        P + "scrape_duration_seconds",
        P + "backend_up",
        P + "devices",
        P + "scrape_errors_total",
    } <= names
    assert 'superbrain_accelerator_backend_up{vendor="metax"}' in text
    assert "# TYPE superbrain_accelerator_scrape_errors_total counter" in text


def test_missing_library_is_down_and_import_is_retried_only_after_the_interval(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    clock = FakeClock()
    backend = NvidiaBackend(clock=clock)
    samples = scrape(collector_for(backend))
    assert value(samples, "backend_up", vendor="nvidia") == 0
    assert value(samples, "exporter_up") == 1
    assert device_samples(samples) == []

    # The library appears (installed, driver loaded): picked up, but only once the retry interval is over.
    fake = fake_pynvml([nv_device()])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    clock.now += 29
    assert value(scrape(collector_for(backend)), "backend_up", vendor="nvidia") == 0
    clock.now += 2
    samples = scrape(collector_for(backend))
    assert value(samples, "backend_up", vendor="nvidia") == 1
    assert value(samples, "memory_total_bytes", vendor="nvidia", device="0") == 80 << 30


def test_registering_does_not_touch_the_libraries() -> None:
    fake = fake_pynvml([nv_device()])
    registry = CollectorRegistry()
    registry.register(collector_for(NvidiaBackend(fake)))
    assert fake.calls == []
    generate_latest(registry)
    assert fake.calls == ["init"]


# -- NVIDIA mapping ------------------------------------------------------------------------------


def test_nvidia_readings_are_mapped_to_base_units_and_labels() -> None:
    fake = fake_pynvml([nv_device(), nv_device(name="NVIDIA L4", uuid="GPU-bbbb", util=100, mw=72_000, temp=60)])
    samples = scrape(collector_for(NvidiaBackend(fake)))

    assert value(samples, "backend_up", vendor="nvidia") == 1
    assert value(samples, "devices", vendor="nvidia") == 2
    assert value(samples, "utilization_ratio", vendor="nvidia", device="0") == pytest.approx(0.37)  # percent -> ratio
    assert value(samples, "utilization_ratio", vendor="nvidia", device="1") == pytest.approx(1.0)
    assert value(samples, "memory_used_bytes", vendor="nvidia", device="0") == 1 << 30
    assert value(samples, "memory_total_bytes", vendor="nvidia", device="0") == 80 << 30
    assert value(samples, "temperature_celsius", vendor="nvidia", device="0") == 41
    assert value(samples, "temperature_celsius", vendor="nvidia", device="1") == 60
    assert value(samples, "power_watts", vendor="nvidia", device="0") == pytest.approx(123.456)  # mW -> W
    assert value(samples, "power_watts", vendor="nvidia", device="1") == pytest.approx(72.0)
    info = dict(vendor="nvidia", device="1", name="NVIDIA L4", uuid="GPU-bbbb")
    assert value(samples, "info", **info) == 1
    assert value(samples, "scrape_errors_total", vendor="nvidia") == 0
    assert value(samples, "exporter_up") == 1


def test_unsupported_readings_are_omitted_without_errors() -> None:
    unsupported = Raise(NVML_NOT_SUPPORTED)
    fake = fake_pynvml([nv_device(util=unsupported, mw=unsupported, temp=unsupported)])  # e.g. a MIG or vGPU slice
    samples = scrape(collector_for(NvidiaBackend(fake)))
    assert value(samples, "utilization_ratio", vendor="nvidia", device="0") is None
    assert value(samples, "power_watts", vendor="nvidia", device="0") is None
    assert value(samples, "temperature_celsius", vendor="nvidia", device="0") is None
    assert value(samples, "memory_total_bytes", vendor="nvidia", device="0") == 80 << 30
    assert value(samples, "scrape_errors_total", vendor="nvidia") == 0


def test_a_failing_device_counts_an_error_and_the_others_are_still_reported() -> None:
    fake = fake_pynvml([nv_device(handle=Raise(NVML_GPU_IS_LOST)), nv_device(uuid="GPU-bbbb")])
    collector = collector_for(NvidiaBackend(fake))
    samples = scrape(collector)
    assert value(samples, "devices", vendor="nvidia") == 2
    assert value(samples, "scrape_errors_total", vendor="nvidia") == 1
    assert value(samples, "memory_total_bytes", vendor="nvidia", device="0") is None
    assert value(samples, "memory_total_bytes", vendor="nvidia", device="1") == 80 << 30
    assert value(samples, "exporter_up") == 1
    assert value(scrape(collector), "scrape_errors_total", vendor="nvidia") == 2  # a counter: it accumulates


def test_a_failing_reading_counts_an_error_and_the_device_keeps_its_other_readings() -> None:
    fake = fake_pynvml([nv_device(util=Raise(NVML_UNKNOWN)), nv_device(mw=RuntimeError("not even an NVMLError"))])
    samples = scrape(collector_for(NvidiaBackend(fake)))
    assert value(samples, "scrape_errors_total", vendor="nvidia") == 2
    assert value(samples, "utilization_ratio", vendor="nvidia", device="0") is None
    assert value(samples, "power_watts", vendor="nvidia", device="0") == pytest.approx(123.456)
    assert value(samples, "power_watts", vendor="nvidia", device="1") is None
    assert value(samples, "utilization_ratio", vendor="nvidia", device="1") == pytest.approx(0.37)


def test_failed_init_is_retried_after_the_interval_and_then_never_again() -> None:
    clock = FakeClock()
    fake = fake_pynvml([nv_device()], init_failures=2)
    collector = collector_for(NvidiaBackend(fake, clock=clock))

    assert value(scrape(collector), "backend_up", vendor="nvidia") == 0
    clock.now += 10
    assert value(scrape(collector), "backend_up", vendor="nvidia") == 0
    assert fake.calls == ["init"]  # not retried within 30 s
    clock.now += 25
    assert value(scrape(collector), "backend_up", vendor="nvidia") == 0  # retried, failed again
    assert fake.calls == ["init", "init"]
    clock.now += 30
    samples = scrape(collector)
    assert value(samples, "backend_up", vendor="nvidia") == 1
    assert value(samples, "scrape_errors_total", vendor="nvidia") == 0  # a missing driver is not a scrape error
    scrape(collector)
    assert fake.calls == ["init"] * 3


def test_shutdown_releases_the_library_and_the_next_scrape_initialises_again() -> None:
    fake = fake_pynvml([nv_device()])
    backend = NvidiaBackend(fake)
    scrape(collector_for(backend))
    backend.shutdown()
    assert fake.calls == ["init", "shutdown"]
    assert value(scrape(collector_for(backend)), "backend_up", vendor="nvidia") == 1
    assert fake.calls == ["init", "shutdown", "init"]


def test_a_backend_that_raises_does_not_break_the_scrape() -> None:
    class Broken(VendorBackend):
        vendor = "broken"

        def scrape(self) -> BackendScrape:
            raise RuntimeError("bug")

    collector = collector_for(Broken(), NvidiaBackend(fake_pynvml([nv_device()])))
    samples = scrape(collector)
    assert value(samples, "exporter_up") == 1
    assert value(samples, "scrape_errors_total", vendor="broken") == 1
    assert value(samples, "backend_up", vendor="nvidia") == 1


# -- Moore Threads (pymtml) -------------------------------------------------------------------------

MTML_NOT_SUPPORTED, MTML_UNKNOWN = 4, 999


def fake_pymtml(devices: list[dict[str, Any]], *, legacy: bool = False) -> ModuleType:
    """pymtml as mthreads-ml-py 2.4.3 shapes it: device / memory / gpu handles, bytes, percent, C, mW."""
    m, give = _fake_module(
        "pymtml",
        "MTMLError",
        {"MTML_ERROR_NOT_SUPPORTED": MTML_NOT_SUPPORTED, "MTML_ERROR_FUNCTION_NOT_FOUND": 667},
    )
    m.open_handles = []  # memory/gpu handles not yet freed

    def init_sub(kind: str, device: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        handle = (kind, device)
        m.open_handles.append(handle)
        return handle

    def free(handle: tuple[str, dict[str, Any]]) -> None:
        m.open_handles.remove(handle)

    def gpu_reading(key: str) -> Callable[[Any], Any]:
        def read(gpu: Any) -> Any:
            kind, device = gpu if not legacy else ("gpu", gpu)
            assert kind == "gpu", "GPU readings take the GPU handle"
            return give(device[key])

        return read

    m.mtmlLibraryInit = lambda: m.calls.append("init")
    m.mtmlLibraryShutDown = lambda: m.calls.append("shutdown")
    m.mtmlLibraryCountDevice = lambda: len(devices)
    m.mtmlLibraryInitDeviceByIndex = lambda i: give(devices[i].get("handle")) or devices[i]
    m.mtmlDeviceGetName = lambda d: give(d["name"])
    m.mtmlDeviceGetUUID = lambda d: give(d["uuid"])
    m.mtmlDeviceGetPowerUsage = lambda d: give(d["mw"])
    m.mtmlDeviceInitMemory = lambda d: init_sub("memory", d)
    m.mtmlMemoryGetUsed = lambda mem: give(mem[1]["used"])
    m.mtmlMemoryGetTotal = lambda mem: give(mem[1]["total"])
    m.mtmlDeviceFreeMemory = free
    m.mtmlGpuGetUtilization = gpu_reading("util")
    m.mtmlGpuGetTemperature = gpu_reading("temp")
    if not legacy:
        m.mtmlDeviceInitGpu = lambda d: init_sub("gpu", d)
        m.mtmlDeviceFreeGpu = free
    return m


def mt_device(**overrides: Any) -> dict[str, Any]:
    device = {"name": "MTT S4000", "uuid": "7de4d75b", "util": 55, "used": 3 << 30, "total": 48 << 30}
    return {**device, "temp": 47, "mw": 250_000, **overrides}


def test_moore_threads_readings_are_mapped_and_handles_released() -> None:
    fake = fake_pymtml([mt_device(), mt_device(uuid="a7257b94", name=b"MTT S4000", mw=Raise(MTML_NOT_SUPPORTED))])
    samples = scrape(collector_for(MooreThreadsBackend(fake)))
    labels = dict(vendor="mthreads", device="0")
    assert value(samples, "backend_up", vendor="mthreads") == 1
    assert value(samples, "devices", vendor="mthreads") == 2
    assert value(samples, "utilization_ratio", **labels) == pytest.approx(0.55)
    assert value(samples, "memory_used_bytes", **labels) == 3 << 30
    assert value(samples, "memory_total_bytes", **labels) == 48 << 30
    assert value(samples, "temperature_celsius", **labels) == 47
    assert value(samples, "power_watts", **labels) == pytest.approx(250.0)
    assert value(samples, "info", **labels, name="MTT S4000", uuid="7de4d75b") == 1
    assert value(samples, "info", vendor="mthreads", device="1", name="MTT S4000", uuid="a7257b94") == 1  # bytes
    assert value(samples, "power_watts", vendor="mthreads", device="1") is None  # not supported: omitted
    assert value(samples, "scrape_errors_total", vendor="mthreads") == 0
    assert fake.open_handles == []


def test_moore_threads_failures_are_isolated_and_handles_still_released() -> None:
    fake = fake_pymtml([mt_device(handle=Raise(MTML_UNKNOWN)), mt_device(util=Raise(MTML_UNKNOWN))])
    samples = scrape(collector_for(MooreThreadsBackend(fake)))
    assert value(samples, "scrape_errors_total", vendor="mthreads") == 2
    assert value(samples, "memory_total_bytes", vendor="mthreads", device="0") is None
    assert value(samples, "utilization_ratio", vendor="mthreads", device="1") is None
    assert value(samples, "temperature_celsius", vendor="mthreads", device="1") == 47
    assert fake.open_handles == []


def test_moore_threads_legacy_bindings_get_the_device_for_gpu_readings() -> None:
    fake = fake_pymtml([mt_device()], legacy=True)
    samples = scrape(collector_for(MooreThreadsBackend(fake)))
    assert value(samples, "utilization_ratio", vendor="mthreads", device="0") == pytest.approx(0.55)
    assert value(samples, "scrape_errors_total", vendor="mthreads") == 0


# -- MetaX (pymxsml) ------------------------------------------------------------------------------------

MXSML_NOT_SUPPORT, MXSML_SYSFS_ERROR, MXSML_INVALID_DEVICE_ID = 3, 4, 6


def fake_pymxsml(devices: list[dict[str, Any]], init_failures: int = 0) -> ModuleType:
    """pymxsml's core API as the MACA wheel shapes it: by index, KB, 1/100 C, percent, per-rail mW."""
    m, give = _fake_module(
        "pymxsml",
        "MXSMLError",
        {
            "MXSML_ERROR_OPERATION_NOT_SUPPORT": MXSML_NOT_SUPPORT,
            "MXSML_TEMPERATURE_HOTSPOT": 0,
            "MXSML_USAGE_XCORE": 4,
        },
    )
    failures = [init_failures]

    def init() -> None:
        m.calls.append("init")
        if failures[0] > 0:
            failures[0] -= 1
            raise m.MXSMLError(26)  # MXSML_ERROR_LOAD_DLL_FAILURE

    def ip_usage(i: int, ip: int) -> Any:
        assert ip == m.MXSML_USAGE_XCORE
        return give(devices[i]["util"])

    def temperature(i: int, sensor: int) -> Any:
        assert sensor == m.MXSML_TEMPERATURE_HOTSPOT
        return give(devices[i]["centi_c"])

    m.mxSmlInit = init
    m.mxSmlGetDeviceCount = lambda: len(devices)
    m.mxSmlGetDeviceInfo = lambda i: (
        give(devices[i].get("info_error"))
        or SimpleNamespace(deviceName=devices[i]["name"], uuid=devices[i]["uuid"], bdfId="0000:0a:00.0")
    )
    m.mxSmlGetMemoryInfo = lambda i: SimpleNamespace(
        vramUse=give(devices[i]["used_kb"]), vramTotal=devices[i]["total_kb"]
    )
    m.mxSmlGetDeviceIpUsage = ip_usage
    m.mxSmlGetTemperatureInfo = temperature
    m.mxSmlGetBoardPowerInfo = lambda i: [
        SimpleNamespace(voltage=12_000, current=0, power=p) for p in give(devices[i]["rails_mw"])
    ]
    return m


def mx_device(**overrides: Any) -> dict[str, Any]:
    device = {
        "name": "MXC500",
        "uuid": "GPU-mx-0",
        "util": 80,
        "used_kb": 2 * 1024 * 1024,
        "total_kb": 64 * 1024 * 1024,
    }
    return {**device, "centi_c": 4525, "rails_mw": [100_000, 50_000, 25_500], **overrides}


def test_metax_readings_are_mapped_to_base_units() -> None:
    fake = fake_pymxsml([mx_device(), mx_device(uuid="GPU-mx-1", util=Raise(MXSML_NOT_SUPPORT))])  # N-class: no XCORE
    samples = scrape(collector_for(MetaxBackend(fake)))
    labels = dict(vendor="metax", device="0")
    assert value(samples, "backend_up", vendor="metax") == 1
    assert value(samples, "devices", vendor="metax") == 2
    assert value(samples, "utilization_ratio", **labels) == pytest.approx(0.80)
    assert value(samples, "memory_used_bytes", **labels) == 2 << 30  # KB -> bytes
    assert value(samples, "memory_total_bytes", **labels) == 64 << 30
    assert value(samples, "temperature_celsius", **labels) == pytest.approx(45.25)  # 1/100 C -> C
    assert value(samples, "power_watts", **labels) == pytest.approx(175.5)  # rails summed, mW -> W
    assert value(samples, "info", **labels, name="MXC500", uuid="GPU-mx-0") == 1
    assert value(samples, "utilization_ratio", vendor="metax", device="1") is None
    assert value(samples, "memory_used_bytes", vendor="metax", device="1") == 2 << 30
    assert value(samples, "scrape_errors_total", vendor="metax") == 0


def test_metax_failures_are_isolated_and_init_is_retried() -> None:
    clock = FakeClock()
    fake = fake_pymxsml(
        [mx_device(info_error=Raise(MXSML_INVALID_DEVICE_ID)), mx_device(used_kb=Raise(MXSML_SYSFS_ERROR))],
        init_failures=1,
    )
    collector = collector_for(MetaxBackend(fake, clock=clock))
    assert value(scrape(collector), "backend_up", vendor="metax") == 0
    clock.now += 30
    samples = scrape(collector)
    assert value(samples, "backend_up", vendor="metax") == 1
    assert value(samples, "scrape_errors_total", vendor="metax") == 2
    assert value(samples, "power_watts", vendor="metax", device="0") is None
    assert value(samples, "memory_used_bytes", vendor="metax", device="1") is None
    assert value(samples, "power_watts", vendor="metax", device="1") == pytest.approx(175.5)


def test_vendors_side_by_side_in_one_exposition() -> None:
    registry = CollectorRegistry()
    registry.register(
        collector_for(
            NvidiaBackend(fake_pynvml([nv_device()])),
            MooreThreadsBackend(fake_pymtml([mt_device()])),
            MetaxBackend(fake_pymxsml([mx_device()])),
        )
    )
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    power = {s.labels["vendor"]: s.value for s in families[P + "power_watts"].samples}
    assert power == pytest.approx({"nvidia": 123.456, "mthreads": 250.0, "metax": 175.5})
    assert families[P + "scrape_errors"].type == "counter"
    assert 'superbrain_accelerator_utilization_ratio{device="0",vendor="metax"} 0.8' in text


# -- real hardware (runs where a driver is present) ------------------------------------------------


@pytest.mark.skipif(not NVML_DEVICES, reason="no NVIDIA GPU here (NVML init failed or reports 0 devices)")
def test_real_nvidia_gpu() -> None:
    backend = NvidiaBackend()
    result = backend.scrape()
    backend.shutdown()
    assert result.up and result.device_count == NVML_DEVICES
    assert result.errors_total == 0
    for reading in result.devices:
        assert reading.name and reading.uuid.startswith(("GPU-", "MIG-"))
        assert reading.memory_total_bytes and reading.memory_total_bytes > 1 << 30
        assert 0 <= reading.memory_used_bytes <= reading.memory_total_bytes
        if reading.utilization_ratio is not None:
            assert 0.0 <= reading.utilization_ratio <= 1.0
        if reading.temperature_celsius is not None:
            assert 0 < reading.temperature_celsius < 120
        if reading.power_watts is not None:
            assert 0 < reading.power_watts < 2000
    samples = scrape(collector_for(NvidiaBackend()))
    assert value(samples, "memory_total_bytes", vendor="nvidia", device="0") > 0


def _vendor_devices(backend: VendorBackend) -> int:
    try:
        return backend.scrape().device_count
    finally:
        backend.shutdown()


@pytest.mark.parametrize("backend_class", [MooreThreadsBackend, MetaxBackend], ids=["mthreads", "metax"])
def test_real_domestic_gpu(backend_class: type[VendorBackend]) -> None:
    pytest.importorskip(backend_class.module_name, reason=f"{backend_class.module_name} not installed")
    if not _vendor_devices(backend_class()):
        pytest.skip(f"no {backend_class.vendor} GPU here (init failed or 0 devices)")
    backend = backend_class()
    result = backend.scrape()
    backend.shutdown()
    assert result.up and result.devices
    for reading in result.devices:
        assert reading.memory_total_bytes and reading.memory_total_bytes > 1 << 30
        if reading.temperature_celsius is not None:
            assert 0 < reading.temperature_celsius < 120
        if reading.power_watts is not None:
            assert 0 < reading.power_watts < 2000
