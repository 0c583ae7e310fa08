"""Typed results: what ``act()`` and ``describe()`` return (plain Python + numpy, no protobuf)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from serving.api import pb

__all__ = [
    "ServerTiming",
    "ActionChunk",
    "CameraInfo",
    "EmbodimentInfo",
    "ModelInfo",
    "ServerInfo",
]


@dataclass(frozen=True)
class ServerTiming:
    """Where the time went on the server for one call (milliseconds)."""

    queue_ms: float = 0.0
    compute_ms: float = 0.0
    batch_size: int = 0
    total_ms: float = 0.0

    @classmethod
    def from_proto(cls, t: pb.ServerTiming) -> ServerTiming:
        return cls(
            queue_ms=float(t.queue_ms),
            compute_ms=float(t.compute_ms),
            batch_size=int(t.batch_size),
            total_ms=float(t.total_ms),
        )


@dataclass(eq=False)
class ActionChunk:
    """One action chunk: ``actions[i]`` is meant for the i-th control tick after the observation.

    ``latency_ms`` is measured by the client: from the ``act()`` call to the decoded
    reply, including encoding and any retries (``attempts`` counts the tries).
    """

    actions: np.ndarray  # float32, (horizon, action_dim)
    model: str = ""
    model_version: str = ""
    embodiment: str = ""
    request_id: str = ""
    step: int = 0
    timing: ServerTiming = field(default_factory=ServerTiming)
    latency_ms: float = 0.0
    attempts: int = 1

    @property
    def horizon(self) -> int:
        return int(self.actions.shape[0])

    @property
    def action_dim(self) -> int:
        return int(self.actions.shape[1])

    def __len__(self) -> int:
        return self.horizon


@dataclass(frozen=True)
class CameraInfo:
    name: str
    height: int
    width: int


@dataclass(frozen=True, eq=False)
class EmbodimentInfo:
    """One robot type a model serves: dims, cameras (with native resolution), chunking, limits."""

    name: str
    description: str
    state_dim: int
    action_dim: int
    cameras: tuple[CameraInfo, ...]
    chunk_length: int
    control_rate_hz: float
    # Per-dimension safety limits (float32, (action_dim,)); None when the server sends none.
    action_low: np.ndarray | None = None
    action_high: np.ndarray | None = None

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)

    @property
    def chunk_duration_s(self) -> float:
        """Seconds of motion one chunk covers at the native control rate (0 if unknown)."""
        return self.chunk_length / self.control_rate_hz if self.control_rate_hz > 0 else 0.0

    @classmethod
    def from_proto(cls, e: pb.EmbodimentInfo) -> EmbodimentInfo:
        def limits(values) -> np.ndarray | None:
            return np.asarray(list(values), dtype=np.float32) if len(values) else None

        return cls(
            name=e.name,
            description=e.description,
            state_dim=int(e.state_dim),
            action_dim=int(e.action_dim),
            cameras=tuple(CameraInfo(c.name, int(c.height), int(c.width)) for c in e.cameras),
            chunk_length=int(e.chunk_length),
            control_rate_hz=float(e.control_rate_hz),
            action_low=limits(e.action_low),
            action_high=limits(e.action_high),
        )


@dataclass(frozen=True, eq=False)
class ModelInfo:
    name: str
    version: str
    embodiments: tuple[EmbodimentInfo, ...]
    max_batch_size: int = 0

    def embodiment(self, name: str) -> EmbodimentInfo:
        for e in self.embodiments:
            if e.name == name:
                return e
        raise KeyError(f"model {self.name!r} has no embodiment {name!r}; has {[e.name for e in self.embodiments]}")

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> ModelInfo:
        return cls(
            name=m.name,
            version=m.version,
            embodiments=tuple(EmbodimentInfo.from_proto(e) for e in m.embodiments),
            max_batch_size=int(m.max_batch_size),
        )


@dataclass(frozen=True, eq=False)
class ServerInfo:
    """The ``describe()`` answer."""

    models: tuple[ModelInfo, ...]
    default_model: str = ""
    server_version: str = ""

    def model(self, name: str | None = None) -> ModelInfo:
        """The named model, or the default one."""
        wanted = name or self.default_model
        for m in self.models:
            if m.name == wanted:
                return m
        if name is None and self.models:
            return self.models[0]
        raise KeyError(f"no model {wanted!r}; served: {[m.name for m in self.models]}")

    def embodiment(self, name: str, model: str | None = None) -> EmbodimentInfo:
        """An embodiment of the named (or default) model."""
        return self.model(model).embodiment(name)

    @property
    def embodiments(self) -> dict[str, EmbodimentInfo]:
        """Embodiments of the default model, by name."""
        if not self.models:
            return {}
        return {e.name: e for e in self.model().embodiments}

    @classmethod
    def from_proto(cls, d: pb.DescribeResponse) -> ServerInfo:
        return cls(
            models=tuple(ModelInfo.from_proto(m) for m in d.models),
            default_model=d.default_model,
            server_version=d.server_version,
        )
