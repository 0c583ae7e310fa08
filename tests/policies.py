"""Small, real Policy implementations used by tests that exercise serving without the VLA.

``EchoPolicy`` answers with actions derived from each observation's own state,
so a test can tell whose chunk a robot got back; instruction "poison" makes it
raise, to check that one bad observation cannot fail its batch-mates.
"""

from __future__ import annotations

import time

import numpy as np

from serving.policy.base import CameraSpec, EmbodimentSpec, Policy, PolicyObservation

ARM = EmbodimentSpec(
    name="arm",
    state_dim=3,
    action_dim=2,
    cameras=(CameraSpec("front", 8, 8),),
    chunk_length=4,
    control_rate_hz=10.0,
    action_low=(-100.0, -100.0),
    action_high=(100.0, 100.0),
)
DOG = EmbodimentSpec(
    name="dog",
    state_dim=5,
    action_dim=3,
    cameras=(CameraSpec("head", 8, 8), CameraSpec("tail", 4, 6)),
    chunk_length=2,
    control_rate_hz=50.0,
    action_low=(-100.0,) * 3,
    action_high=(100.0,) * 3,
)


class EchoPolicy(Policy):
    name = "echo"
    version = "1"

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.batches: list[int] = []

    @property
    def embodiments(self) -> dict[str, EmbodimentSpec]:
        return {ARM.name: ARM, DOG.name: DOG}

    def preprocess(self, observations: list[PolicyObservation]) -> list[PolicyObservation]:
        if any(o.instruction == "poison" for o in observations):
            raise ValueError("poisoned observation")
        return observations

    def forward(self, batch: list[PolicyObservation]) -> list[np.ndarray]:
        self.batches.append(len(batch))
        if self.delay_s:
            time.sleep(self.delay_s)
        out = []
        for obs in batch:
            spec = self.embodiments[obs.embodiment]
            pixel = float(next(iter(obs.images.values())).mean())
            row = obs.state[: spec.action_dim] + pixel
            out.append(np.tile(row, (spec.chunk_length, 1)).astype(np.float32))
        return out

    def postprocess(self, outputs: list[np.ndarray], observations: list[PolicyObservation]) -> list[np.ndarray]:
        return outputs


def expected_echo(spec: EmbodimentSpec, state: np.ndarray, frame_mean: float) -> np.ndarray:
    return np.tile(state[: spec.action_dim].astype(np.float32) + frame_mean, (spec.chunk_length, 1))


class SlowEchoPolicy(EchoPolicy):
    """EchoPolicy taking 1.5 s per batch: long enough to shut a server down mid-request."""

    name = "slow-echo"

    def __init__(self) -> None:
        super().__init__(delay_s=1.5)
