"""One configuration object for the whole app: defaults <- YAML file <- SUPERBRAIN_* env <- flags.

The same ``ServingConfig`` is what ``serving.app:build_app`` receives as Serve
``args`` (from a Serve config file, KubeRay's serveConfigV2 or ``superbrain
serve``), so every path to a running cluster reads the same fields.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from serving.accel import AcceleratorOverride

ENV_PREFIX = "SUPERBRAIN_"


class AutoscalingSettings(BaseModel):
    """Replica autoscaling, driven by each replica's requests in flight."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    # Requests in flight (queued + computing) per replica that we aim for.
    target_inflight_per_replica: float = Field(64.0, gt=0)
    upscale_delay_s: float = 5.0
    downscale_delay_s: float = 60.0


class ServingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Where robots connect. Every replica binds this address (SO_REUSEPORT),
    # so replicas on one node share the port and the kernel spreads connections.
    host: str = "127.0.0.1"
    grpc_port: int = Field(9000, ge=0, le=65535)

    # What to serve: "default" (the embedded VLA), "noop" (overhead benchmark) or
    # "module:Class" (a partner's Policy subclass); model_dir is a checkpoint.
    policy: str = "default"
    model_dir: str | None = None
    seed: int = 0
    # Which accelerator replicas use (docs/accelerators.md): "auto" picks what the
    # node has (CUDA/MetaX, ROCm, MUSA, Ascend NPU, else CPU), or name it: "cpu",
    # "cuda[:N]", "musa[:N]", "npu[:N]". ``device`` is the older name. The array
    # backend of the processing stage: "auto", "numpy", "torch" or "cupy".
    accelerator: str = Field("auto", validation_alias=AliasChoices("accelerator", "device"))
    array_backend: str = "auto"
    # Overlap preprocessing of the next batch with the forward pass of the current
    # one (serving/engine.py): "auto" is on for accelerators, off on CPU.
    pipeline: Literal["auto", "on", "off"] = "auto"
    torch_threads: int | None = None

    # Batching across robots. "local": capacity-aware (a batch is formed when the
    # policy is free); "serve": Ray Serve's @serve.batch. See docs/benchmarks.md.
    batcher: Literal["local", "serve"] = "local"
    max_batch_size: int = Field(32, ge=1, le=1024)
    batch_wait_timeout_ms: float = Field(2.0, ge=0)
    # Admission bound per replica: past it callers get a fast RESOURCE_EXHAUSTED.
    max_queued_requests: int = Field(256, ge=1)
    # Largest request message accepted (camera frames included).
    max_message_mb: float = Field(16.0, gt=0)
    # Used when a caller sets no deadline.
    default_timeout_s: float = Field(10.0, gt=0)

    # Replicas and their resources.
    num_replicas: int = Field(1, ge=1)
    autoscaling: AutoscalingSettings | None = None
    replica_num_cpus: float = Field(1.0, ge=0)
    replica_num_gpus: float = Field(0.0, ge=0)
    # On shutdown, in-flight requests get this long to finish.
    grace_period_s: float = Field(5.0, ge=0)

    # Partners: API keys, quota and usage metering (docs/partners.md). Auth can
    # be switched off only on a loopback address (the overhead benchmark does).
    auth: bool = True
    # Local state: the embedded SQLite ledger, usage spool files, the dev key file.
    state_dir: str = ".superbrain"
    # Ledger store: "sqlite:///path/ledger.db" or "postgresql://user@host/db";
    # unset means SQLite in state_dir.
    ledger_url: str | None = None
    # A revoked key stops working on every replica within about this long.
    key_refresh_s: float = Field(1.0, gt=0)
    # Usage records reach the ledger store in batches this often.
    usage_flush_s: float = Field(0.5, gt=0)
    # Quota leases: a replica's slice of a tenant's tokens expires after this, and
    # a replica asks for half of it worth of demand at a time. 2 s: a busy replica
    # then exchanges with the coordinator (a Ray actor call) about 1.5 times a
    # second, not 2.8, which W1 throughput with auth on feels (docs/benchmarks.md).
    lease_ttl_s: float = Field(2.0, gt=0)

    # Ops (docs/operations.md). One Prometheus endpoint per node on this port
    # (0: none), serving every process's superbrain_* metrics, the accelerators'
    # and Ray's own; metrics_host defaults to ``host``.
    metrics_port: int = Field(8080, ge=0, le=65535)
    metrics_host: str | None = None
    # Ray's node metrics (ray_serve_* and others) on the same endpoint.
    metrics_include_ray: bool = True
    # One JSON line per request: "file" (state_dir/logs/access-<pid>.jsonl),
    # "stdout", "stderr" or "off".
    access_log: Literal["file", "stdout", "stderr", "off"] = "file"

    # Ray cluster to join ("auto", "ray://..."); None starts a local one.
    ray_address: str | None = None
    app_name: str = "superbrain"

    @field_validator("policy")
    @classmethod
    def _policy_form(cls, v: str) -> str:
        if v not in ("default", "noop") and ":" not in v:
            raise ValueError("policy must be 'default', 'noop' or 'module:Class'")
        return v

    @model_validator(mode="after")
    def _accelerator_form(self) -> ServingConfig:
        from serving.accel import parse_override  # raises AcceleratorError (a ValueError) naming the field

        parse_override(self.accelerator, self.array_backend)
        return self

    @property
    def accelerator_override(self) -> AcceleratorOverride | None:
        """The accelerator settings as serving.accel wants them (None: decide from the node)."""
        from serving.accel import parse_override

        return parse_override(self.accelerator, self.array_backend)

    @model_validator(mode="after")
    def _auth_off_only_on_loopback(self) -> ServingConfig:
        if not self.auth and not is_loopback(self.host):
            raise ValueError(
                f"auth is off but host {self.host!r} is not a loopback address: robots from anywhere could call "
                "without a key. Keep auth on (the default), or bind 127.0.0.1 for local benchmarks."
            )
        return self

    @property
    def address(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir).expanduser().resolve()

    @property
    def metrics_bind_host(self) -> str:
        return self.metrics_host or self.host

    @property
    def resolved_ledger_url(self) -> str:
        """The ledger store URL, with the embedded SQLite default made absolute."""
        if self.ledger_url:
            return self.ledger_url
        return f"sqlite:///{self.state_path / 'ledger.db'}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """SUPERBRAIN_<FIELD> for every top-level scalar field (e.g. SUPERBRAIN_GRPC_PORT)."""
    out: dict[str, Any] = {}
    for name, field in ServingConfig.model_fields.items():
        if name == "autoscaling":
            continue
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None and value != "":
            out[name] = value
        elif value == "" and field.default is None:
            out[name] = None
    return out


def load_config(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ServingConfig:
    """Merge defaults, a YAML file, SUPERBRAIN_* env and explicit overrides (flags), in that order."""
    data: dict[str, Any] = {}
    path = path or (environ if environ is not None else os.environ).get(ENV_PREFIX + "CONFIG")
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of settings")
        data.update(loaded)
    data.update(_env_overrides(environ if environ is not None else os.environ))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return ServingConfig.model_validate(data)
