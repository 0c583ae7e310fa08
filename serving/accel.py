"""Accelerator discovery: what a node has, and what a replica on it will use.

Two halves, kept apart so that the decision can be tested without hardware:

- ``probe()`` touches torch, torch_musa, torch_npu, cupy and the vendor
  management libraries, and returns a ``Found``: plain data, no live objects.
- ``plan(found, override)`` is a pure function from that data (and an optional
  operator override) to an ``AcceleratorPlan``: the torch device string, the
  array backend for pre/post-processing, and the Ray resource a replica asks for.

Vendors and what they look like from Python:

| vendor | how it shows | torch device | array backend | Ray resource |
| --- | --- | --- | --- | --- |
| NVIDIA | ``torch.cuda`` | ``cuda`` | cupy, else torch | ``GPU`` |
| MetaX (MACA) | ``torch.cuda`` of MetaX's torch build (see ``cuda_vendor``) | ``cuda`` | cupy, else torch | ``GPU`` |
| AMD (ROCm) | ``torch.version.hip`` + ``torch.cuda`` | ``cuda`` | cupy (ROCm build), else torch | ``GPU`` |
| Moore Threads | ``torch_musa``, ``torch.musa`` | ``musa`` | torch | ``mthreads_gpu`` (custom) |
| Ascend | ``torch_npu``, ``torch.npu`` | ``npu`` | torch | ``NPU`` |
| none | | ``cpu`` | numpy | none |

Upstream Ray knows NVIDIA, MetaX, AMD and Ascend devices and sets each actor's
``*_VISIBLE_DEVICES``. Moore Threads is only in a vendor fork, so replicas ask
for a custom resource and pick their own device (``claim_device``).
"""

from __future__ import annotations

import dataclasses
import fcntl
import importlib
import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

#: Platforms (how the device is driven) a plan can name.
PLATFORMS = ("cpu", "cuda", "rocm", "musa", "npu")
#: Array backends the processing stage has (serving/processing/backend.py).
ARRAY_BACKENDS = ("numpy", "torch", "cupy")
#: Torch device types an override may name (ROCm builds of torch call their device "cuda" too).
DEVICE_TYPES = ("cpu", "cuda", "musa", "npu")
#: Vendor management libraries the accelerator metrics use (serving/accel_metrics.py).
MANAGEMENT_LIBS = ("pynvml", "pymtml", "pymxsml")
#: Environment variables that say something about the node; probe() records the ones that are set.
HINT_ENV = (
    "MACA_PATH",
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "MUSA_VISIBLE_DEVICES",
    "ASCEND_RT_VISIBLE_DEVICES",
)

#: The Ray custom resource Moore Threads nodes declare (ray start --resources='{"mthreads_gpu": N}').
MTHREADS_RESOURCE = "mthreads_gpu"


class AcceleratorError(ValueError):
    """An override cannot be met on this node (or is malformed); the message says why."""


# --------------------------------------------------------------------------- what was found


@dataclass(frozen=True)
class DeviceSet:
    """One torch device family as probed: is it usable, and which devices are there."""

    available: bool = False
    names: tuple[str, ...] = ()
    #: The plugin's version (torch_musa, torch_npu); None for torch.cuda or when not installed.
    plugin_version: str | None = None
    #: Why it is not available, when probing failed in an interesting way (missing plugin, driver error).
    error: str | None = None


@dataclass(frozen=True)
class CupyInfo:
    """Whether CuPy imports, which build it is, and how many devices it sees."""

    version: str | None = None  # None: not importable
    device_count: int = 0
    hip: bool = False  # a ROCm build of CuPy
    error: str | None = None

    @property
    def usable(self) -> bool:
        return self.version is not None and self.device_count > 0


@dataclass(frozen=True)
class Found:
    """Everything ``plan`` decides from; built by ``probe`` or, in tests, by hand."""

    torch_version: str | None = None  # None: torch does not import
    torch_cuda: str | None = None  # torch.version.cuda: the CUDA toolkit torch was built with
    torch_hip: str | None = None  # torch.version.hip: set on ROCm builds
    cuda: DeviceSet = DeviceSet()
    musa: DeviceSet = DeviceSet()
    npu: DeviceSet = DeviceSet()
    cupy: CupyInfo = CupyInfo()
    #: Management library -> importable (find_spec; nothing is initialised).
    libs: Mapping[str, bool] = field(default_factory=dict)
    #: The HINT_ENV variables that were set, with their values.
    env: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- overrides


@dataclass(frozen=True)
class AcceleratorOverride:
    """What the operator pinned; ``None`` fields are decided automatically.

    ``device`` is a torch device string ("cpu", "cuda", "cuda:1", "musa", "npu:0");
    ``array_backend`` one of ARRAY_BACKENDS.
    """

    device: str | None = None
    array_backend: str | None = None

    @property
    def device_type(self) -> str | None:
        return None if self.device is None else self.device.split(":")[0]

    @property
    def device_index(self) -> int | None:
        if self.device is None or ":" not in self.device:
            return None
        return int(self.device.split(":")[1])


_DEVICE_RE = re.compile(r"^(cpu|cuda|musa|npu)(?::(\d+))?$")


def parse_override(accelerator: str | None = "auto", array_backend: str | None = "auto") -> AcceleratorOverride | None:
    """Config strings -> an override, or None when both are "auto".

    ``accelerator``: "auto" | "cpu" | "cuda" | "cuda:N" | "musa" | "musa:N" | "npu" | "npu:N".
    ``array_backend``: "auto" | "numpy" | "torch" | "cupy". Malformed values raise
    ``AcceleratorError`` here, at config time, rather than on the first request.
    """
    device = (accelerator or "auto").strip().lower()
    backend = (array_backend or "auto").strip().lower()
    if device == "auto":
        device_out = None
    else:
        match = _DEVICE_RE.match(device)
        if match is None:
            raise AcceleratorError(
                f"accelerator {accelerator!r} is not one of auto, cpu, cuda[:N], musa[:N], npu[:N] "
                "(ROCm and MetaX builds of torch use 'cuda')"
            )
        if match.group(1) == "cpu" and match.group(2) is not None:
            raise AcceleratorError(f"accelerator {accelerator!r}: 'cpu' takes no device index")
        device_out = device
    if backend == "auto":
        backend_out = None
    elif backend in ARRAY_BACKENDS:
        backend_out = backend
    else:
        raise AcceleratorError(f"array_backend {array_backend!r} is not one of auto, {', '.join(ARRAY_BACKENDS)}")
    if device_out is None and backend_out is None:
        return None
    return AcceleratorOverride(device_out, backend_out)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class AcceleratorPlan:
    """What a replica will use, and why."""

    platform: str  # one of PLATFORMS
    vendor: str  # "nvidia", "metax", "amd", "mthreads", "huawei" or "cpu"
    torch_device: str  # what Policy.setup() gets
    array_backend: str  # what serving.processing.get_backend() gets, with torch_device
    #: The Ray resource one replica asks for (None on CPU), and how much of it.
    ray_resource: str | None
    ray_amount: float
    #: The variable through which the device is restricted per process (Ray sets it, except for MUSA).
    visible_devices_env: str | None
    #: True where Ray does not assign devices (Moore Threads): each replica claims one (claim_device).
    select_device_per_replica: bool
    #: Human-readable reasons for each choice; `superbrain doctor` prints them.
    reasons: tuple[str, ...] = ()

    def ray_actor_options(self, amount: float | None = None) -> dict[str, Any]:
        """The Serve ``ray_actor_options`` fragment for this plan (``amount`` replaces ray_amount, e.g. 0.5)."""
        amount = self.ray_amount if amount is None else amount
        if self.ray_resource is None or amount <= 0:
            return {}
        if self.ray_resource == "GPU":
            return {"num_gpus": amount}
        return {"resources": {self.ray_resource: amount}}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def cuda_vendor(found: Found) -> tuple[str, str]:
    """Who made the device behind ``torch.cuda``, and the evidence; MetaX's MACA torch also says "cuda".

    Device names are the strongest evidence, then the torch build, then weaker
    hints from the environment (MACA_PATH is set in MetaX's images, pymxsml comes
    with the MACA SDK). With no hint at all it is NVIDIA, the common case.
    """
    if found.torch_hip:
        return "amd", f"torch is a ROCm build (HIP {found.torch_hip})"
    names = " ".join(found.cuda.names).lower()
    if "nvidia" in names:
        return "nvidia", f"device name {found.cuda.names[0]!r}"
    if "metax" in names or "muxi" in names:
        return "metax", f"device name {found.cuda.names[0]!r}"
    build = (found.torch_version or "").lower()
    if "metax" in build or "maca" in build:
        return "metax", f"torch build {found.torch_version!r} is MetaX's"
    if found.env.get("MACA_PATH"):
        return "metax", f"MACA_PATH={found.env['MACA_PATH']} is set"
    if found.libs.get("pymxsml"):
        return "metax", "pymxsml (the MetaX management library) is installed"
    return "nvidia", "CUDA device without MetaX hints"


def plan(found: Found, override: AcceleratorOverride | None = None) -> AcceleratorPlan:
    """Decide device, array backend and Ray resource from what was found (pure; raises AcceleratorError).

    Without an override the first usable family wins: MUSA and NPU (their own
    plugins, never present by accident), then CUDA/ROCm, then CPU. An override
    that the node cannot meet is an error, not a silent fallback to CPU: a
    replica that should run on a GPU but computes on a CPU is much harder to spot
    than one that fails at start-up.
    """
    override = override or AcceleratorOverride()
    reasons: list[str] = []
    kind = override.device_type
    if kind is None:
        kind = _auto_device_type(found, reasons)
    else:
        reasons.append(f"accelerator {override.device!r} set by config")
        _check_available(found, kind, override.device_index)

    if kind == "cpu":
        platform, vendor = "cpu", "cpu"
    elif kind == "cuda":
        vendor, why = cuda_vendor(found)
        platform = "rocm" if vendor == "amd" else "cuda"
        reasons.append(f"vendor {vendor}: {why}")
    elif kind == "musa":
        platform, vendor = "musa", "mthreads"
    else:
        platform, vendor = "npu", "huawei"

    torch_device = override.device or kind
    backend = _array_backend(found, platform, override.array_backend, reasons)
    resource, env_var = _RAY_PLACEMENT[platform]
    per_replica = platform == "musa" and override.device_index is None
    if per_replica:
        reasons.append(f"Ray does not assign Moore Threads devices: each replica claims one ({env_var} or musa:N)")
    return AcceleratorPlan(
        platform=platform,
        vendor=vendor,
        torch_device=torch_device,
        array_backend=backend,
        ray_resource=resource,
        ray_amount=0.0 if resource is None else 1.0,
        visible_devices_env=env_var,
        select_device_per_replica=per_replica,
        reasons=tuple(reasons),
    )


def replica_actor_options(
    override: AcceleratorOverride | None,
    amount: float | None = None,
    *,
    found: Found | None = None,
) -> dict[str, Any]:
    """The accelerator part of ``ray_actor_options`` for replicas, as decided where the app is built.

    The app is built on the Ray driver, often a head node without accelerators.
    A configured device type decides the resource without probing, so a CPU-only
    head still asks for GPUs for its replicas; only "auto" probes, which is right
    on a single machine (``make serve`` on a workstation) and asks for nothing on
    a CPU-only head. ``amount`` replaces the default of one device per replica.
    """
    kind = override.device_type if override is not None else None
    if kind is None:
        return plan(probe() if found is None else found, override).ray_actor_options(amount)
    resource, _ = _RAY_PLACEMENT[kind]  # "cuda" covers ROCm too: both are Ray's GPU
    amount = 1.0 if amount is None else amount
    if resource is None or amount <= 0:
        return {}
    return {"num_gpus": amount} if resource == "GPU" else {"resources": {resource: amount}}


#: platform -> (Ray resource per replica, the per-process visible-devices variable).
_RAY_PLACEMENT: dict[str, tuple[str | None, str | None]] = {
    "cpu": (None, None),
    "cuda": ("GPU", "CUDA_VISIBLE_DEVICES"),  # NVIDIA, and MetaX (Ray's MetaX manager uses the same variable)
    "rocm": ("GPU", "HIP_VISIBLE_DEVICES"),
    "musa": (MTHREADS_RESOURCE, "MUSA_VISIBLE_DEVICES"),
    "npu": ("NPU", "ASCEND_RT_VISIBLE_DEVICES"),
}


def _auto_device_type(found: Found, reasons: list[str]) -> str:
    for kind, devices, label in (
        ("musa", found.musa, "torch_musa"),
        ("npu", found.npu, "torch_npu"),
        ("cuda", found.cuda, "torch.cuda"),
    ):
        if devices.available and devices.names:
            reasons.append(f"{label} sees {len(devices.names)} device(s): {device_names(devices.names)}")
            return kind
    reasons.append("no accelerator found: CPU")
    return "cpu"


def device_names(names: tuple[str, ...] | list[str]) -> str:
    """'MTT S4000 x 8' rather than the same name eight times (first-seen order)."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(name if n == 1 else f"{name} x {n}" for name, n in counts.items())


def _check_available(found: Found, kind: str, index: int | None) -> None:
    if kind == "cpu":
        return
    devices = {"cuda": found.cuda, "musa": found.musa, "npu": found.npu}[kind]
    if not (devices.available and devices.names):
        detail = f" ({devices.error})" if devices.error else ""
        raise AcceleratorError(f"accelerator {kind!r} is configured but this node has no usable {kind} device{detail}")
    if index is not None and index >= len(devices.names):
        raise AcceleratorError(
            f"accelerator '{kind}:{index}' is configured but only {len(devices.names)} {kind} device(s) are visible"
        )


def _array_backend(found: Found, platform: str, wanted: str | None, reasons: list[str]) -> str:
    if wanted is not None:
        if wanted == "numpy" and platform != "cpu":
            raise AcceleratorError(f"array_backend 'numpy' runs on the host only, not on {platform}")
        if wanted == "cupy":
            if platform not in ("cuda", "rocm"):
                raise AcceleratorError(f"array_backend 'cupy' needs a CUDA or ROCm device, not {platform}")
            if not found.cupy.usable:
                raise AcceleratorError(f"array_backend 'cupy' is configured but {_cupy_state(found.cupy)}")
        reasons.append(f"array backend {wanted!r} set by config")
        return wanted
    if platform == "cpu":
        reasons.append("array backend numpy: host arrays, handed to torch without a copy")
        return "numpy"
    if platform in ("cuda", "rocm") and found.cupy.usable:
        reasons.append(f"array backend cupy {found.cupy.version}: fused kernels, pinned uploads")
        return "cupy"
    why = f" ({_cupy_state(found.cupy)})" if platform in ("cuda", "rocm") else ""
    reasons.append(f"array backend torch on the device{why}")
    return "torch"


def _cupy_state(info: CupyInfo) -> str:
    if info.version is None:
        return "cupy is not installed" + (f": {info.error}" if info.error else "")
    return f"cupy {info.version} sees no device" + (f": {info.error}" if info.error else "")


# --------------------------------------------------------------------------- probing


def probe(environ: Mapping[str, str] | None = None) -> Found:
    """Look at this process's torch, device plugins, cupy and vendor libraries; never raises.

    Importing torch_musa / torch_npu registers their device types with torch, so
    after probing, ``torch.device("musa")`` works in this process.
    """
    environ = os.environ if environ is None else environ
    try:
        import torch
    except Exception as exc:  # a broken install is something to report, not to crash on
        return Found(cuda=DeviceSet(error=_err(exc)), cupy=_probe_cupy(), libs=_probe_libs(), env=_hints(environ))
    return Found(
        torch_version=str(torch.__version__),
        torch_cuda=getattr(torch.version, "cuda", None),
        torch_hip=getattr(torch.version, "hip", None),
        cuda=_probe_torch_family(torch, "cuda", plugin=None),
        musa=_probe_torch_family(torch, "musa", plugin="torch_musa"),
        npu=_probe_torch_family(torch, "npu", plugin="torch_npu"),
        cupy=_probe_cupy(),
        libs=_probe_libs(),
        env=_hints(environ),
    )


def detect(override: AcceleratorOverride | None = None) -> AcceleratorPlan:
    """``plan(probe(), override)``: what a replica on this node will use."""
    return plan(probe(), override)


def _probe_torch_family(torch: Any, kind: str, plugin: str | None) -> DeviceSet:
    version = None
    if plugin is not None:
        if importlib.util.find_spec(plugin) is None:
            return DeviceSet(error=f"{plugin} is not installed")
        try:
            module = importlib.import_module(plugin)
        except Exception as exc:
            return DeviceSet(error=f"import {plugin}: {_err(exc)}")
        version = getattr(module, "__version__", None)
    api = getattr(torch, kind, None)
    if api is None:
        return DeviceSet(plugin_version=version, error=f"torch.{kind} is missing")
    try:
        if not api.is_available():
            return DeviceSet(plugin_version=version)
        names = tuple(str(api.get_device_name(i)) for i in range(api.device_count()))
    except Exception as exc:
        return DeviceSet(plugin_version=version, error=_err(exc))
    return DeviceSet(available=True, names=names, plugin_version=version)


def _probe_cupy() -> CupyInfo:
    if importlib.util.find_spec("cupy") is None:
        return CupyInfo()
    try:
        import cupy
    except Exception as exc:  # e.g. a CUDA 12 wheel on a machine without libcudart
        return CupyInfo(error=f"import cupy: {_err(exc)}")
    version = str(cupy.__version__)
    hip = bool(getattr(cupy.cuda.runtime, "is_hip", False))
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # no driver, or no device: CUDARuntimeError
        return CupyInfo(version=version, hip=hip, error=_err(exc))
    return CupyInfo(version=version, device_count=count, hip=hip)


def _probe_libs() -> dict[str, bool]:
    return {name: _spec_exists(name) for name in MANAGEMENT_LIBS}


def _spec_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _hints(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: environ[k] for k in HINT_ENV if environ.get(k) is not None}


def _err(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def import_device_plugin(torch_device: str) -> None:
    """Import the torch plugin that defines ``torch_device``'s type (musa, npu); a no-op for cpu/cuda.

    A replica must do this before ``torch.device("musa")`` means anything; ``probe``
    does it as a side effect, this does it without probing.
    """
    plugin = {"musa": "torch_musa", "npu": "torch_npu"}.get(torch_device.split(":")[0])
    if plugin is not None:
        importlib.import_module(plugin)


# --------------------------------------------------------------------------- per-replica device choice (MUSA)


@dataclass
class DeviceClaim:
    """A device index this process holds through an exclusive ``flock`` on a per-device lock file.

    The kernel drops the lock when the process dies, however it dies, so a
    crashed replica's device is free again for its successor with no clean-up.
    """

    index: int
    path: Path
    _file: IO[str] | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor releases the flock
            self._file = None


def claim_device(device_count: int, lock_dir: str | os.PathLike[str], prefix: str = "musa") -> DeviceClaim:
    """Claim the lowest free device index on this node among ``device_count``; RuntimeError if none is free.

    For Moore Threads, where Ray has no accelerator manager: replicas ask for the
    custom resource ``mthreads_gpu`` (which bounds how many land on a node) and
    then claim distinct devices here. One replica per device.
    """
    directory = Path(lock_dir)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(device_count):
        path = directory / f"{prefix}-{index}.lock"
        handle = path.open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            continue
        return DeviceClaim(index, path, handle)
    raise RuntimeError(f"all {device_count} {prefix} device(s) on this node are claimed by other replicas")


def replica_device(
    chosen: AcceleratorPlan,
    found: Found,
    lock_dir: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
) -> tuple[str, DeviceClaim | None]:
    """The torch device this replica should use, claiming one where Ray does not assign devices.

    Keep the returned claim for the replica's lifetime. If ``MUSA_VISIBLE_DEVICES``
    already names a single device (the ray-musa fork, or a one-device pod), that
    is the replica's device. Otherwise the claimed index goes into the device
    string ("musa:2") rather than into MUSA_VISIBLE_DEVICES: the variable only
    takes effect before the MUSA runtime starts, and probing has started it.
    """
    if not chosen.select_device_per_replica:
        return chosen.torch_device, None
    environ = os.environ if environ is None else environ
    visible = environ.get(chosen.visible_devices_env or "", "")
    if visible and "," not in visible:
        return f"{chosen.torch_device}:0", None
    claim = claim_device(len(found.musa.names), lock_dir, prefix=chosen.platform)
    return f"{chosen.torch_device}:{claim.index}", claim


# --------------------------------------------------------------------------- `superbrain doctor`


def doctor_report(
    override: AcceleratorOverride | None = None,
    *,
    found: Found | None = None,
    metrics: bool = True,
) -> dict[str, Any]:
    """What ``superbrain doctor --json`` prints: what was found, the plan (or why there is none), metrics libs.

    ``metrics`` also initialises each vendor's management library once, the way
    the Prometheus exporter will, so ops see whether accelerator metrics will work.
    """
    found = probe() if found is None else found
    report: dict[str, Any] = {"found": found.to_dict(), "plan": None, "error": None}
    try:
        chosen = plan(found, override)
    except AcceleratorError as exc:
        report["error"] = str(exc)
    else:
        report["plan"] = {**chosen.to_dict(), "ray_actor_options": chosen.ray_actor_options()}
    if metrics:
        report["metrics"] = _metrics_backends()
    return report


def _metrics_backends() -> list[dict[str, Any]]:
    from serving.accel_metrics import default_backends

    out = []
    for backend in default_backends():
        try:
            scrape = backend.scrape()
            out.append(
                {
                    "vendor": scrape.vendor,
                    "library": backend.module_name,
                    "up": scrape.up,
                    "devices": scrape.device_count,
                }
            )
        finally:
            backend.shutdown()
    return out


def format_report(report: Mapping[str, Any]) -> str:
    """``doctor_report`` as the text ``superbrain doctor`` prints."""
    found = report["found"]
    lines = ["Found"]

    def row(label: str, text: str) -> None:
        lines.append(f"  {label:<16} {text}")

    if found["torch_version"] is None:
        row("torch", f"does not import ({found['cuda']['error']})")
    else:
        build = "ROCm " + found["torch_hip"] if found["torch_hip"] else None
        build = build or ("CUDA " + found["torch_cuda"] if found["torch_cuda"] else "no CUDA or ROCm in this build")
        row("torch", f"{found['torch_version']} ({build})")
    for kind in ("cuda", "musa", "npu"):
        row(kind, _describe_devices(found[kind]))
    cupy = found["cupy"]
    if cupy["version"] is None:
        row("cupy", "not installed" + (f" ({cupy['error']})" if cupy["error"] else ""))
    else:
        hip = " (ROCm build)" if cupy["hip"] else ""
        seen = f"{cupy['device_count']} device(s)" + (f" ({cupy['error']})" if cupy["error"] else "")
        row("cupy", f"{cupy['version']}{hip}, {seen}")
    row("vendor libs", ", ".join(f"{k} {'installed' if v else 'missing'}" for k, v in found["libs"].items()))
    if "metrics" in report:
        parts = [
            f"{m['vendor']} " + (f"up ({m['devices']} device(s))" if m["up"] else "down") for m in report["metrics"]
        ]
        row("metrics", ", ".join(parts))
    row("env", ", ".join(f"{k}={v}" for k, v in found["env"].items()) or "no hints set")

    lines.append("Will use")
    chosen = report["plan"]
    if chosen is None:
        row("error", str(report["error"]))
        return "\n".join(lines)
    row("platform", f"{chosen['platform']} (vendor {chosen['vendor']})")
    row(
        "torch device",
        chosen["torch_device"] + (" (each replica claims musa:N)" if chosen["select_device_per_replica"] else ""),
    )
    row("array backend", chosen["array_backend"])
    if chosen["ray_resource"] is None:
        row("Ray resource", "none (CPU only)")
    else:
        custom = " (custom: declare it on the node)" if chosen["ray_resource"] == MTHREADS_RESOURCE else ""
        row("Ray resource", f"{chosen['ray_resource']} x {chosen['ray_amount']:g} per replica{custom}")
        row("actor options", str(chosen["ray_actor_options"]))
        row("visible devices", str(chosen["visible_devices_env"]))
    for i, reason in enumerate(chosen["reasons"]):
        row("why" if i == 0 else "", reason)
    return "\n".join(lines)


def _describe_devices(devices: Mapping[str, Any]) -> str:
    plugin = f" ({devices['plugin_version']})" if devices["plugin_version"] else ""
    if devices["available"]:
        return f"{len(devices['names'])} device(s){plugin}: {device_names(devices['names'])}"
    return "not available" + plugin + (f": {devices['error']}" if devices["error"] else "")
