"""What a simulated robot fleet sends: embodiment mix, target, key, and observations made up front.

Kept free of Locust and gevent so that the test suite and ``capacity.py`` can use
it without monkey-patching anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from serving import codec
from serving.api import pb
from serving.client.types import EmbodimentInfo

DEFAULT_TARGET = "127.0.0.1:9000"
IMAGE_FORMATS = ("raw", "jpeg")

# A small, fixed set: the text encoder's cost depends on the length, so the mix
# holds short and longer instructions.
INSTRUCTIONS = (
    "pick up the red cup",
    "open the top drawer",
    "put the green block in the bin",
    "stack the blue cube on the yellow cube",
    "walk to the charging station",
    "fold the towel and place it on the table",
)


def resolve_target(host: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """``host:port`` to dial: Locust's ``--host`` if given, else $TARGET, else 127.0.0.1:9000.

    Locust does not validate ``--host`` for custom users, so ``127.0.0.1:9000`` works
    as is; a ``grpc://`` (or ``http://``) prefix and a trailing slash are tolerated.
    """
    value = (host or "").strip() or environ.get("TARGET", "").strip() or DEFAULT_TARGET
    for scheme in ("grpc://", "http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
    return value.rstrip("/")


def resolve_api_key(environ: Mapping[str, str] = os.environ) -> str | None:
    """$SUPERBRAIN_API_KEY, else the dev key `superbrain serve` wrote (as `superbrain act` does)."""
    key = environ.get("SUPERBRAIN_API_KEY")
    if key:
        return key
    from serving.config import load_config
    from serving.quota.bootstrap import read_dev_key

    return read_dev_key(load_config(environ=environ))


def parse_mix(spec: str) -> dict[str, float]:
    """``"franka_arm:2,unitree_go2:1"`` -> relative weights; a bare name weighs 1; "" -> {}."""
    weights: dict[str, float] = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, weight = part.partition(":")
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"EMBODIMENTS: bad weight in {part!r} (expected name:weight)") from None
        if w < 0:
            raise ValueError(f"EMBODIMENTS: negative weight in {part!r}")
        weights[name.strip()] = weights.get(name.strip(), 0.0) + w
    if weights and not any(weights.values()):
        raise ValueError("EMBODIMENTS: all weights are zero")
    return {name: w for name, w in weights.items() if w > 0}


def choose_mix(spec: str, served: Sequence[str]) -> dict[str, float]:
    """The fleet's mix, checked against what the server serves; an empty spec means all, equally."""
    weights = parse_mix(spec)
    if not weights:
        if not served:
            raise ValueError("the server describes no embodiments")
        return dict.fromkeys(served, 1.0)
    unknown = sorted(set(weights) - set(served))
    if unknown:
        raise ValueError(f"EMBODIMENTS names {unknown}, which the server does not serve; served: {list(served)}")
    return weights


def weighted_sequence(weights: Mapping[str, float]) -> Iterator[str]:
    """Endless names in proportion to ``weights``, interleaved (smooth weighted round robin).

    Deterministic, so the first N robots follow the requested ratio as closely as N
    allows, whatever N is: {a: 2, b: 1} gives a, b, a, a, b, a, ...
    """
    total = sum(weights.values())
    current = dict.fromkeys(weights, 0.0)
    while True:
        for name, w in weights.items():
            current[name] += w
        best = max(current, key=current.__getitem__)
        current[best] -= total
        yield best


def synthetic_frame(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A camera-like uint8 (H, W, 3) frame: lit background, a few objects, sensor noise.

    Not random noise: noise does not compress, so JPEG frames would be several
    times larger than a real camera's.
    """
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    base = rng.uniform(60, 190, 3).astype(np.float32)
    gx, gy = rng.uniform(-50, 50, (2, 3)).astype(np.float32)
    img = base + gx * x + gy * y
    for _ in range(int(rng.integers(2, 6))):
        h, w = int(rng.integers(height // 10, height // 3)), int(rng.integers(width // 10, width // 3))
        top, left = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        img[top : top + h, left : left + w] = rng.uniform(0, 255, 3)
    img += rng.normal(0.0, 3.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


@dataclass
class RobotKit:
    """One robot's observation, made once: encoded camera frames and a joint state to wander."""

    embodiment: EmbodimentInfo
    images: dict[str, pb.Image]
    state: np.ndarray  # float32 (state_dim,)
    image_bytes: int

    def next_state(self, rng: np.random.Generator) -> np.ndarray:
        """The joints drift a little each tick: cheap, and no two requests are identical."""
        self.state += rng.normal(0.0, 0.01, self.state.shape).astype(np.float32)
        np.clip(self.state, -3.0, 3.0, out=self.state)
        return self.state


def build_kit(
    embodiment: EmbodimentInfo, rng: np.random.Generator, image_format: str = "raw", jpeg_quality: int = 90
) -> RobotKit:
    """Frames for every camera of ``embodiment`` at its native size, already encoded as ``pb.Image``.

    The SDK passes a ready ``pb.Image`` through unchanged, so during the run the
    load generator only copies bytes: no image synthesis or JPEG encoding per call.
    """
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"IMAGE_FORMAT must be one of {IMAGE_FORMATS}, got {image_format!r}")
    images: dict[str, pb.Image] = {}
    for cam in embodiment.cameras:
        frame = synthetic_frame(rng, cam.height, cam.width)
        images[cam.name] = (
            codec.raw_image(frame) if image_format == "raw" else codec.encoded_image(frame, "jpeg", jpeg_quality)
        )
    state = rng.normal(0.0, 0.5, embodiment.state_dim).astype(np.float32)
    return RobotKit(embodiment, images, state, sum(img.ByteSize() for img in images.values()))
