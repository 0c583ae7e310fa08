"""The partner-facing records: plans, tenants, API keys and usage.

Plain frozen dataclasses so every layer (stores, leases, ingress, CLI) shares
one vocabulary and nothing Ray- or database-specific leaks across.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ANY_MODEL = "*"


@dataclass(frozen=True)
class Plan:
    """What a partner bought. ``None`` budgets are unlimited."""

    # Sustained calls per second and the bucket size a fleet may burst to.
    rate_per_s: float = 100.0
    burst: int = 200
    # Monthly budgets (UTC calendar month): calls, and accelerator milliseconds
    # (each call is charged its share of its batch's compute time).
    monthly_calls: int | None = None
    monthly_accel_ms: float | None = None
    # Models this plan may call; "*" means any served model.
    models: tuple[str, ...] = (ANY_MODEL,)
    # Concurrent ActStream sessions across the whole cluster.
    max_streams: int = 64

    def __post_init__(self) -> None:
        if self.rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        if self.burst < 1:
            raise ValueError("burst must be >= 1")
        if self.monthly_calls is not None and self.monthly_calls < 0:
            raise ValueError("monthly_calls must be >= 0")
        if self.monthly_accel_ms is not None and self.monthly_accel_ms < 0:
            raise ValueError("monthly_accel_ms must be >= 0")
        if self.max_streams < 0:
            raise ValueError("max_streams must be >= 0")
        if not self.models:
            raise ValueError("a plan needs at least one model (or '*')")
        object.__setattr__(self, "models", tuple(self.models))

    def allowed_models(self) -> frozenset[str] | None:
        """The models this plan allows, as a set to test against (None: any model)."""
        return None if ANY_MODEL in self.models else frozenset(self.models)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = list(self.models)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        d = dict(d)
        if "models" in d:
            d["models"] = tuple(d["models"])
        return cls(**d)


@dataclass(frozen=True)
class Tenant:
    """A partner company. ``name`` is its stable id (lowercase, digits, '-', '_')."""

    name: str
    plan: Plan = field(default_factory=Plan)
    created_at: float = 0.0

    def __post_init__(self) -> None:
        if not TENANT_NAME.match(self.name):
            raise ValueError(f"tenant name {self.name!r}: use 1-63 of a-z, 0-9, '-', '_' (starting alphanumeric)")

    def with_plan(self, plan: Plan) -> Tenant:
        return replace(self, plan=plan)


@dataclass(frozen=True)
class ApiKey:
    """A stored key: never the secret itself, only its SHA-256 (see serving.quota.keys)."""

    key_id: str
    tenant: str
    secret_hash: str
    label: str = ""
    created_at: float = 0.0
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class UsageRecord:
    """One admitted call, metered exactly once (``id`` is the idempotency id).

    ``accel_ms`` is this call's share of its batch's compute time
    (batch compute / batch size), which is what accelerator budgets charge.
    """

    id: str
    tenant: str
    key_id: str
    robot_id: str
    model: str
    embodiment: str
    status: str  # gRPC status name: "OK", "DEADLINE_EXCEEDED", ...
    batch_size: int
    accel_ms: float
    queue_ms: float
    received_at: float  # unix seconds
    finished_at: float  # unix seconds
    request_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> UsageRecord:
        return cls(**d)

    def to_row(self) -> tuple[Any, ...]:
        """The fields in declaration order: the spool's compact line format (asdict is ~5x slower)."""
        return (
            self.id,
            self.tenant,
            self.key_id,
            self.robot_id,
            self.model,
            self.embodiment,
            self.status,
            self.batch_size,
            self.accel_ms,
            self.queue_ms,
            self.received_at,
            self.finished_at,
            self.request_id,
        )


@dataclass(frozen=True)
class ReportRow:
    """One line of a usage report / billing export."""

    tenant: str
    window_start: str  # ISO 8601 UTC, the start of the hour/day (or of the report range for by=model)
    window_end: str
    model: str
    calls: int
    errors: int  # calls whose status was not OK
    accel_ms: float


@dataclass(frozen=True)
class TenantTotals:
    """A tenant's metered usage over some range (what monthly budgets are checked against)."""

    calls: int = 0
    accel_ms: float = 0.0
