"""Accelerator metrics for Prometheus, for every vendor we run on.

One custom ``prometheus_client`` collector asks each vendor's management library
for utilisation, memory, temperature and power *at scrape time* (no polling
thread, so a reading is never older than the scrape), labelled by ``vendor`` and
``device``:

- NVIDIA through NVML (``pynvml``, from the ``nvidia-ml-py`` package);
- Moore Threads through MTML (``pymtml``, from the ``mthreads-ml-py`` package);
- MetaX through MXSML (``pymxsml``, the wheel shipped in the MACA SDK under
  ``/opt/maca/share/mxsml/``).

A node without a GPU, a driver or a library is normal (CPU nodes, the other
vendors' nodes): that backend reports ``backend_up{vendor} 0`` and no devices,
and tries again at most every 30 s, so installing a driver needs no restart and
a CPU node does not pay for a failing ``dlopen`` on every scrape.
``superbrain_accelerator_exporter_up`` says the collector itself ran.

A reading a device does not support (NVML ``NotSupported`` and the like) is
simply left out. Any other failure counts one
``superbrain_accelerator_scrape_errors_total{vendor}`` and never takes down the
other readings, the other devices or the scrape.

Run ``python -m serving.accel_metrics --once`` to print one scrape, or
``--port 9400`` to serve ``/metrics``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, ClassVar, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

T = TypeVar("T")

INIT_RETRY_INTERVAL_S = 30.0
PREFIX = "superbrain_accelerator"


@dataclass(frozen=True)
class DeviceReading:
    """What one device reported in one scrape, in base units; ``None`` = not available."""

    index: int
    name: str = ""
    uuid: str = ""
    utilization_ratio: float | None = None
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None


@dataclass
class BackendScrape:
    """One backend's part of a scrape."""

    vendor: str
    up: bool
    devices: list[DeviceReading] = field(default_factory=list)
    device_count: int = 0
    errors_total: int = 0


class VendorBackend:
    """A vendor management library: lazily imported and initialised once, read at scrape time.

    Subclasses name the module and implement ``_init``, ``_count`` and ``_read_device``;
    this class owns the parts that must behave the same for every vendor: the
    retry gate for a library or driver that is missing, error counting, and
    "not supported" readings being dropped silently.
    """

    vendor: ClassVar[str]
    module_name: ClassVar[str]
    error_class_name: ClassVar[str]
    # Module constants naming the error codes that mean "this device cannot give that reading".
    unsupported_code_names: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        module: ModuleType | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_interval_s: float = INIT_RETRY_INTERVAL_S,
    ) -> None:
        """``module`` replaces the import (tests; a vendor wheel on an odd path); ``clock`` drives the retry."""
        self._module = module
        self._clock = clock
        self._retry_interval_s = retry_interval_s
        self._lib: Any = None  # the initialised module, once up
        self._next_init_at = float("-inf")
        self._errors_total = 0
        self._lock = threading.Lock()  # scrapes may come from several HTTP threads

    @property
    def up(self) -> bool:
        return self._lib is not None

    @property
    def errors_total(self) -> int:
        return self._errors_total

    def scrape(self) -> BackendScrape:
        """Read every device now. Never raises: failures become error counts or ``up=False``."""
        with self._lock:
            lib = self._ensure_up()
            if lib is None:
                return BackendScrape(self.vendor, up=False, errors_total=self._errors_total)
            try:
                count = int(self._count(lib))
            except Exception:
                self._count_error("device count")
                return BackendScrape(self.vendor, up=True, errors_total=self._errors_total)
            devices = []
            for index in range(count):
                try:
                    devices.append(self._read_device(lib, index))
                except Exception:
                    self._count_error(f"device {index}")
            return BackendScrape(self.vendor, True, devices, count, self._errors_total)

    def count_error(self) -> None:
        """Count a failure found outside this backend (the collector's last-resort guard)."""
        with self._lock:
            self._errors_total += 1

    def shutdown(self) -> None:
        """Release the library (best effort); the next scrape initialises it again."""
        with self._lock:
            if self._lib is not None:
                try:
                    self._shutdown(self._lib)
                except Exception:
                    logger.debug("%s shutdown failed", self.vendor, exc_info=True)
            self._lib = None
            self._next_init_at = float("-inf")

    # -- vendor hooks -------------------------------------------------------------

    def _init(self, lib: Any) -> None:
        raise NotImplementedError

    def _count(self, lib: Any) -> int:
        raise NotImplementedError

    def _read_device(self, lib: Any, index: int) -> DeviceReading:
        """Read one device; raising means the whole device is unreadable this scrape."""
        raise NotImplementedError

    def _shutdown(self, lib: Any) -> None:
        pass

    # -- shared machinery ------------------------------------------------------------

    def _ensure_up(self) -> Any:
        if self._lib is not None:
            return self._lib
        now = self._clock()
        if now < self._next_init_at:
            return None
        self._next_init_at = now + self._retry_interval_s
        try:
            lib = self._module if self._module is not None else importlib.import_module(self.module_name)
            self._init(lib)
        except Exception as exc:  # ImportError, OSError from dlopen, the library's own error when no driver
            logger.debug("%s backend down (%s): %s", self.vendor, self.module_name, exc)
            return None
        logger.info("%s backend up (%s)", self.vendor, self.module_name)
        self._lib = lib
        return lib

    def _probe(self, read: Callable[[], T], what: str) -> T | None:
        """One reading: its value, ``None`` if the device does not support it, ``None`` + an error otherwise."""
        try:
            return read()
        except Exception as exc:
            if not self._is_unsupported(exc):
                self._count_error(what)
            return None

    def _is_unsupported(self, exc: Exception) -> bool:
        lib = self._lib
        error_class = getattr(lib, self.error_class_name, None)
        if not isinstance(error_class, type) or not isinstance(exc, error_class):
            return False
        codes = {getattr(lib, name) for name in self.unsupported_code_names if hasattr(lib, name)}
        return getattr(exc, "value", None) in codes

    def _count_error(self, what: str) -> None:
        """Count one failure; called from an ``except`` block, so the log carries the traceback."""
        self._errors_total += 1
        logger.debug("%s: reading %s failed", self.vendor, what, exc_info=True)


class NvidiaBackend(VendorBackend):
    """NVML through ``pynvml`` (package ``nvidia-ml-py``, NVIDIA's own bindings)."""

    vendor = "nvidia"
    module_name = "pynvml"
    error_class_name = "NVMLError"
    unsupported_code_names = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_FUNCTION_NOT_FOUND")

    def _init(self, lib: Any) -> None:
        lib.nvmlInit()

    def _count(self, lib: Any) -> int:
        return lib.nvmlDeviceGetCount()

    def _read_device(self, lib: Any, index: int) -> DeviceReading:
        handle = lib.nvmlDeviceGetHandleByIndex(index)
        what = f"device {index}"
        memory = self._probe(lambda: lib.nvmlDeviceGetMemoryInfo(handle), f"{what} memory")
        util = self._probe(lambda: lib.nvmlDeviceGetUtilizationRates(handle), f"{what} utilization")
        temperature = self._probe(
            lambda: lib.nvmlDeviceGetTemperature(handle, lib.NVML_TEMPERATURE_GPU), f"{what} temperature"
        )
        milliwatts = self._probe(lambda: lib.nvmlDeviceGetPowerUsage(handle), f"{what} power")
        return DeviceReading(
            index=index,
            name=_text(self._probe(lambda: lib.nvmlDeviceGetName(handle), f"{what} name")),
            uuid=_text(self._probe(lambda: lib.nvmlDeviceGetUUID(handle), f"{what} uuid")),
            utilization_ratio=None if util is None else util.gpu / 100.0,  # percent
            memory_used_bytes=None if memory is None else float(memory.used),
            memory_total_bytes=None if memory is None else float(memory.total),
            temperature_celsius=_scaled(temperature, 1.0),
            power_watts=_scaled(milliwatts, 1e-3),
        )

    def _shutdown(self, lib: Any) -> None:
        lib.nvmlShutdown()


class MooreThreadsBackend(VendorBackend):
    """MTML through ``pymtml`` (package ``mthreads-ml-py``, Moore Threads' bindings).

    Coded against mthreads-ml-py 2.4.3 from PyPI: GPU readings take a GPU handle
    from ``mtmlDeviceInitGpu`` and memory readings a memory handle from
    ``mtmlDeviceInitMemory``, each released with ``mtmlDeviceFree*``. Earlier
    bindings (no ``mtmlDeviceFreeGpu``) took the device itself in
    ``mtmlGpuGetUtilization``/``mtmlGpuGetTemperature``; that case is kept
    here so an old binding never receives the wrong pointer. Units as the
    bindings document them: bytes, percent, degrees C, milliwatts. Not yet run
    on a Moore Threads card.
    """

    vendor = "mthreads"
    module_name = "pymtml"
    error_class_name = "MTMLError"
    unsupported_code_names = ("MTML_ERROR_NOT_SUPPORTED", "MTML_ERROR_FUNCTION_NOT_FOUND")

    def _init(self, lib: Any) -> None:
        lib.mtmlLibraryInit()

    def _count(self, lib: Any) -> int:
        return lib.mtmlLibraryCountDevice()

    def _read_device(self, lib: Any, index: int) -> DeviceReading:
        device = lib.mtmlLibraryInitDeviceByIndex(index)
        what = f"device {index}"
        memory = self._probe(lambda: self._memory(lib, device, what), f"{what} memory")
        gpu = self._probe(lambda: self._gpu(lib, device, what), f"{what} gpu")
        milliwatts = self._probe(lambda: lib.mtmlDeviceGetPowerUsage(device), f"{what} power")
        used, total = memory if memory is not None else (None, None)
        percent, temperature = gpu if gpu is not None else (None, None)
        return DeviceReading(
            index=index,
            name=_text(self._probe(lambda: lib.mtmlDeviceGetName(device), f"{what} name")),
            uuid=_text(self._probe(lambda: lib.mtmlDeviceGetUUID(device), f"{what} uuid")),
            utilization_ratio=_scaled(percent, 1e-2),
            memory_used_bytes=_scaled(used, 1.0),
            memory_total_bytes=_scaled(total, 1.0),
            temperature_celsius=_scaled(temperature, 1.0),
            power_watts=_scaled(milliwatts, 1e-3),
        )

    def _memory(self, lib: Any, device: Any, what: str) -> tuple[float | None, float | None]:
        memory = lib.mtmlDeviceInitMemory(device)
        try:
            return (
                self._probe(lambda: lib.mtmlMemoryGetUsed(memory), f"{what} memory used"),
                self._probe(lambda: lib.mtmlMemoryGetTotal(memory), f"{what} memory total"),
            )
        finally:
            if hasattr(lib, "mtmlDeviceFreeMemory"):
                lib.mtmlDeviceFreeMemory(memory)

    def _gpu(self, lib: Any, device: Any, what: str) -> tuple[float | None, float | None]:
        """(utilisation percent, temperature C) from the device's GPU handle."""
        legacy = not hasattr(lib, "mtmlDeviceFreeGpu")  # pre-2.4 bindings took the device and made the handle
        gpu = device if legacy else lib.mtmlDeviceInitGpu(device)
        try:
            return (
                self._probe(lambda: lib.mtmlGpuGetUtilization(gpu), f"{what} utilization"),
                self._probe(lambda: lib.mtmlGpuGetTemperature(gpu), f"{what} temperature"),
            )
        finally:
            if not legacy:
                lib.mtmlDeviceFreeGpu(gpu)

    def _shutdown(self, lib: Any) -> None:
        lib.mtmlLibraryShutDown()


class MetaxBackend(VendorBackend):
    """MXSML through ``pymxsml`` (MetaX's bindings, shipped as a wheel with the MACA SDK).

    Uses the index-based core API (``mxSmlInit``, ``mxSmlGetDeviceCount``,
    ``mxSmlGetDeviceInfo``, ``mxSmlGetMemoryInfo``, ``mxSmlGetTemperatureInfo``,
    ``mxSmlGetDeviceIpUsage``, ``mxSmlGetBoardPowerInfo``), whose units mxsml.h
    documents: memory in KB, temperature in 1/100 degree C, board power per
    supply rail in mW (summed here). Utilisation is the XCORE (compute) usage in
    percent, valid on C-class cards; elsewhere it is "not supported" and omitted.
    Ray's own MetaX detection uses the NVML-like ``pymxsml.mxsml_extension``
    instead; both come from the same wheel. Not yet run on a MetaX card.
    """

    vendor = "metax"
    module_name = "pymxsml"
    error_class_name = "MXSMLError"
    unsupported_code_names = ("MXSML_ERROR_OPERATION_NOT_SUPPORT",)

    def _init(self, lib: Any) -> None:
        lib.mxSmlInit()

    def _count(self, lib: Any) -> int:
        return lib.mxSmlGetDeviceCount()

    def _read_device(self, lib: Any, index: int) -> DeviceReading:
        info = lib.mxSmlGetDeviceInfo(index)
        what = f"device {index}"
        memory = self._probe(lambda: lib.mxSmlGetMemoryInfo(index), f"{what} memory")
        percent = self._probe(lambda: lib.mxSmlGetDeviceIpUsage(index, lib.MXSML_USAGE_XCORE), f"{what} utilization")
        centi_celsius = self._probe(
            lambda: lib.mxSmlGetTemperatureInfo(index, lib.MXSML_TEMPERATURE_HOTSPOT), f"{what} temperature"
        )
        rails = self._probe(lambda: lib.mxSmlGetBoardPowerInfo(index), f"{what} power")
        return DeviceReading(
            index=index,
            name=_text(getattr(info, "deviceName", "")),
            uuid=_text(getattr(info, "uuid", "")),
            utilization_ratio=_scaled(percent, 1e-2),
            memory_used_bytes=None if memory is None else memory.vramUse * 1024.0,
            memory_total_bytes=None if memory is None else memory.vramTotal * 1024.0,
            temperature_celsius=_scaled(centi_celsius, 1e-2),
            power_watts=None if not rails else sum(rail.power for rail in rails) / 1000.0,
        )

    def _shutdown(self, lib: Any) -> None:
        if hasattr(lib, "mxSmlShutdown"):
            lib.mxSmlShutdown()


def default_backends() -> list[VendorBackend]:
    return [NvidiaBackend(), MooreThreadsBackend(), MetaxBackend()]


class AcceleratorCollector(Collector):
    """Prometheus collector over all vendor backends; register it once per process."""

    def __init__(self, backends: Sequence[VendorBackend] | None = None) -> None:
        self.backends = list(backends) if backends is not None else default_backends()

    def describe(self) -> Iterable[Metric]:
        # Lets ``registry.register`` learn the names without a scrape (which would initialise the libraries).
        return _Families().all()

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        families = _Families()
        for backend in self.backends:
            try:
                result = backend.scrape()
            except Exception:  # scrape() does not raise; this guard keeps a bug from breaking the scrape
                logger.exception("%s backend scrape failed", backend.vendor)
                backend.count_error()
                result = BackendScrape(backend.vendor, up=backend.up, errors_total=backend.errors_total)
            families.add(result)
        families.exporter_up.add_metric([], 1)
        families.duration.add_metric([], time.perf_counter() - started)
        yield from families.all()


class _Families:
    """The metric families of one scrape, with the exact names the dashboards and alerts use."""

    def __init__(self) -> None:
        dev = ["vendor", "device"]
        self.utilization = GaugeMetricFamily(
            f"{PREFIX}_utilization_ratio", "Busy fraction of the accelerator's compute (0..1).", labels=dev
        )
        self.memory_used = GaugeMetricFamily(f"{PREFIX}_memory_used_bytes", "Device memory in use.", labels=dev)
        self.memory_total = GaugeMetricFamily(f"{PREFIX}_memory_total_bytes", "Device memory size.", labels=dev)
        self.temperature = GaugeMetricFamily(f"{PREFIX}_temperature_celsius", "Chip temperature.", labels=dev)
        self.power = GaugeMetricFamily(f"{PREFIX}_power_watts", "Power draw.", labels=dev)
        self.info = GaugeMetricFamily(
            f"{PREFIX}_info", "Accelerator identity (always 1).", labels=[*dev, "name", "uuid"]
        )
        self.exporter_up = GaugeMetricFamily(f"{PREFIX}_exporter_up", "1 when the accelerator collector ran.")
        self.backend_up = GaugeMetricFamily(
            f"{PREFIX}_backend_up", "1 when the vendor's management library loaded and initialised.", labels=["vendor"]
        )
        self.devices = GaugeMetricFamily(f"{PREFIX}_devices", "Accelerators the library reports.", labels=["vendor"])
        self.errors = CounterMetricFamily(
            f"{PREFIX}_scrape_errors", "Device readings that failed (unsupported ones excluded).", labels=["vendor"]
        )
        self.duration = GaugeMetricFamily(
            f"{PREFIX}_scrape_duration_seconds", "Time this collection of accelerator metrics took."
        )

    def add(self, result: BackendScrape) -> None:
        vendor = result.vendor
        self.backend_up.add_metric([vendor], 1 if result.up else 0)
        self.devices.add_metric([vendor], result.device_count)
        self.errors.add_metric([vendor], result.errors_total)
        for d in result.devices:
            labels = [vendor, str(d.index)]
            self.info.add_metric([*labels, d.name, d.uuid], 1)
            for family, value in (
                (self.utilization, d.utilization_ratio),
                (self.memory_used, d.memory_used_bytes),
                (self.memory_total, d.memory_total_bytes),
                (self.temperature, d.temperature_celsius),
                (self.power, d.power_watts),
            ):
                if value is not None:
                    family.add_metric(labels, value)

    def all(self) -> list[Metric]:
        return [
            self.exporter_up,
            self.duration,
            self.backend_up,
            self.devices,
            self.errors,
            self.info,
            self.utilization,
            self.memory_used,
            self.memory_total,
            self.temperature,
            self.power,
        ]


def _text(value: Any) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else float(value) * factor


def main(argv: Sequence[str] | None = None) -> None:
    """Standalone exporter: ``--once`` prints one scrape; otherwise serve ``/metrics`` on ``--port``."""
    from prometheus_client import CollectorRegistry, generate_latest, start_http_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9400)
    parser.add_argument("--addr", default="0.0.0.0")
    parser.add_argument("--once", action="store_true", help="print one scrape and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    registry = CollectorRegistry()
    registry.register(AcceleratorCollector())
    if args.once:
        print(generate_latest(registry).decode(), end="")
        return
    start_http_server(args.port, addr=args.addr, registry=registry)
    threading.Event().wait()


if __name__ == "__main__":
    main()
