"""The Policy interface every model backend implements.

The lifecycle mirrors LitServe/openpi: ``setup`` once per replica (load weights,
pick a device), then per batch ``preprocess`` -> ``forward`` -> ``postprocess``.
The serving engine owns batching, deadlines and error isolation; a Policy only
sees already-validated observations and must return one chunk per observation,
in order. Partners plug their own class in with ``--policy module:Class``.
"""

from __future__ import annotations

import abc
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CameraSpec:
    """A camera slot of an embodiment and the model's native resolution for it."""

    name: str
    height: int
    width: int


@dataclass(frozen=True)
class EmbodimentSpec:
    """Everything the server needs to validate, normalise and clip for one robot type."""

    name: str
    state_dim: int
    action_dim: int
    cameras: tuple[CameraSpec, ...]
    chunk_length: int
    control_rate_hz: float
    description: str = ""
    # Normalisation statistics (length state_dim / action_dim).
    state_mean: tuple[float, ...] = ()
    state_std: tuple[float, ...] = ()
    action_mean: tuple[float, ...] = ()
    action_std: tuple[float, ...] = ()
    # Safety limits (length action_dim): every returned action is clipped to them.
    action_low: tuple[float, ...] = ()
    action_high: tuple[float, ...] = ()

    @property
    def camera_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cameras)


@dataclass
class PolicyObservation:
    """One decoded, validated observation.

    ``images`` maps camera name -> uint8 array (H, W, 3), already decoded from
    JPEG/PNG but not resized; ``state`` is float32 (state_dim,), finite.
    """

    embodiment: str
    images: dict[str, np.ndarray]
    state: np.ndarray
    instruction: str = ""
    robot_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Policy(abc.ABC):
    """A servable policy: batches of observations in, one action chunk per observation out."""

    #: Model name and version reported to robots (Describe, every response).
    name: str = "policy"
    version: str = "0"
    #: True when ``infer`` holds the CPU/accelerator for a while: the engine then runs
    #: it on a worker thread so the event loop keeps admitting requests meanwhile.
    #: Trivial policies (the no-op benchmark policy) set False and run inline.
    compute_bound: bool = True

    @property
    @abc.abstractmethod
    def embodiments(self) -> dict[str, EmbodimentSpec]:
        """Embodiments this policy serves, by name."""

    def setup(self, device: str = "cpu", array_backend: str | None = None) -> None:  # noqa: B027 - optional hook
        """Load weights and move them to ``device``; called once per replica.

        ``array_backend`` ("numpy", "torch", "cupy"; None: the policy's own
        choice) is what the replica resolved for its pre/post-processing
        (serving/accel.py, the ``array_backend`` setting). A policy that does no
        array work of its own may ignore it. Policies written before it existed,
        with ``setup(self, device)``, keep working: ``setup_policy`` only passes
        it to a ``setup`` that takes it.
        """

    @abc.abstractmethod
    def preprocess(self, observations: list[PolicyObservation]) -> Any:
        """Turn a list of observations (mixed embodiments) into one model input batch."""

    @abc.abstractmethod
    def forward(self, batch: Any) -> Any:
        """Run the model on a batch from ``preprocess``."""

    @abc.abstractmethod
    def postprocess(self, outputs: Any, observations: list[PolicyObservation]) -> list[np.ndarray]:
        """Return, per observation, float32 actions (chunk_length, action_dim): un-normalised and clipped."""

    def infer(self, observations: list[PolicyObservation]) -> list[np.ndarray]:
        """preprocess -> forward -> postprocess; what the engine calls per batch."""
        return self.postprocess(self.forward(self.preprocess(observations)), observations)


def setup_policy(policy: Policy, device: str, array_backend: str | None = None) -> None:
    """``policy.setup(device, array_backend=...)``, or ``policy.setup(device)`` for a setup that does not take it.

    Partners' policies may override ``setup(self, device)`` only; they still get
    their device, and the log says that the array backend was left to them.
    """
    try:
        params = inspect.signature(policy.setup).parameters.values()
    except (TypeError, ValueError):  # a builtin or C-implemented setup: call it the old way
        params = ()
    takes_backend = any(p.name == "array_backend" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    if takes_backend:
        policy.setup(device, array_backend=array_backend)
        return
    if array_backend is not None:
        log.info("%s.setup takes no array_backend: %r is left to the policy", type(policy).__name__, array_backend)
    policy.setup(device)
