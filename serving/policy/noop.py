"""NoopPolicy: serves the default embodiments without a model, to measure serving overhead.

Everything around the model (gRPC, decoding, batching, Ray hops) costs the same
as with a real policy; this policy only skips the image work and the forward, so
``bench`` can subtract it out. Its actions are all-zero chunks clipped into the
limits (for a joint-delta arm that means "hold still").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.models.embodiments import default_embodiments
from serving.policy.base import EmbodimentSpec, Policy, PolicyObservation
from serving.processing.actions import float32_limits


class NoopPolicy(Policy):
    name = "noop"
    version = "0"
    compute_bound = False  # nothing to offload: runs on the event loop

    def __init__(self, embodiments: Sequence[EmbodimentSpec] | None = None):
        specs = tuple(embodiments) if embodiments is not None else default_embodiments()
        self._embodiments = {s.name: s for s in specs}
        self._chunks: dict[str, np.ndarray] = {}
        for s in specs:
            low, high = float32_limits(s.action_low, s.action_high)
            self._chunks[s.name] = np.clip(np.zeros((s.chunk_length, s.action_dim), np.float32), low, high)

    @property
    def embodiments(self) -> dict[str, EmbodimentSpec]:
        return self._embodiments

    def preprocess(self, observations: list[PolicyObservation]) -> list[str]:
        unknown = {o.embodiment for o in observations} - self._embodiments.keys()
        if unknown:
            raise ValueError(f"unknown embodiment {sorted(unknown)[0]!r}; known: {sorted(self._embodiments)}")
        return [o.embodiment for o in observations]

    def forward(self, batch: list[str]) -> list[str]:
        return batch

    def postprocess(self, outputs: list[str], observations: list[PolicyObservation]) -> list[np.ndarray]:
        # Copies: the caller owns what it gets back and may write into it.
        return [self._chunks[name].copy() for name in outputs]
