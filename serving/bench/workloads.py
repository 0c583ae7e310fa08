"""The benchmark workloads (DESIGN.md, "Performance workloads"), as pre-serialised requests.

Every request is built and serialised once, before any timing starts, so the load
generator only hands bytes to gRPC and every system under test receives exactly
the same bytes.

* **W1, serving overhead** -- the ``noop`` policy; one 224x224x3 uint8 frame sent
  raw (150,528 bytes) + robot state + a short instruction. The design asks for
  7 floats of state, but no default embodiment has exactly one camera and a
  7-dim state, so W1 uses ``unitree_go2``, the one-camera embodiment ("head"
  camera, 18 float32 of state = 72 bytes instead of 28: the frame is 99.9 % of
  the payload either way).
* **W2, default model** -- exactly W1's requests, served by the ``default``
  policy (so W1 vs W2 isolates the model's cost).
* **W3, mixed fleet** -- the ``default`` policy; robots of all three default
  embodiments (franka_arm: 2 cameras, aloha_dual_arm: 3, unitree_go2: 1)
  interleaved, every frame a JPEG (quality 90) of a smooth synthetic scene.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np

from serving.api import pb
from serving.codec import encoded_image, numpy_to_tensor, raw_image
from serving.models.embodiments import default_embodiments
from serving.policy.base import EmbodimentSpec, PolicyObservation

WORKLOADS = ("W1", "W2", "W3")
INSTRUCTION = "pick up the red cup"
#: Distinct frames per workload (robots cycle through them), so no layer can
#: get away with caching one payload.
N_FRAMES = 4


@dataclass(frozen=True)
class Workload:
    name: str
    policy: str  # what every server under test must serve: "noop" or "default"
    description: str
    # One entry per distinct request; robot i sends requests[i % len(requests)].
    requests: tuple[bytes, ...] = field(repr=False)
    embodiments: tuple[str, ...]  # embodiment of each request, same order

    def request_for(self, robot: int) -> bytes:
        return self.requests[robot % len(self.requests)]

    def summary(self) -> dict[str, object]:
        sizes = [len(r) for r in self.requests]
        return {
            "workload": self.name,
            "policy": self.policy,
            "payload": self.description,
            "request_bytes": {"min": min(sizes), "max": max(sizes), "mean": round(sum(sizes) / len(sizes))},
            "embodiments": sorted(set(self.embodiments)),
        }


def embodiment_specs() -> dict[str, EmbodimentSpec]:
    return {spec.name: spec for spec in default_embodiments()}


def _noise_frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _scene_frame(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A smooth synthetic scene (gradient, a few boxes, mild sensor noise): JPEGs of realistic size."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack(
        [
            96 + 64 * np.sin(x / (17 + 9 * rng.random())),
            110 + 60 * np.cos(y / (23 + 9 * rng.random())),
            128 + 40 * np.sin((x + y) / (31 + 9 * rng.random())),
        ],
        axis=-1,
    )
    for _ in range(5):
        y0, x0 = rng.integers(0, h - 40), rng.integers(0, w - 40)
        dy, dx = rng.integers(16, 64), rng.integers(16, 64)
        base[y0 : y0 + dy, x0 : x0 + dx] = rng.integers(0, 256, 3)
    base += rng.normal(0, 4, base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def _state(rng: np.random.Generator, spec: EmbodimentSpec) -> np.ndarray:
    mean = np.asarray(spec.state_mean or (0.0,) * spec.state_dim, dtype=np.float32)
    std = np.asarray(spec.state_std or (1.0,) * spec.state_dim, dtype=np.float32)
    return (mean + 0.1 * std * rng.standard_normal(spec.state_dim)).astype(np.float32)


def _request(spec: EmbodimentSpec, images: dict[str, pb.Image], state: np.ndarray, index: int) -> bytes:
    req = pb.ActRequest(request_id=f"bench-{index}")
    obs = req.observation
    obs.embodiment = spec.name
    obs.instruction = INSTRUCTION
    obs.robot_id = f"bench-robot-{index}"
    obs.episode_id = "bench"
    for name, image in images.items():
        obs.images[name].CopyFrom(image)
    numpy_to_tensor(state, obs.state)
    return req.SerializeToString()


@cache
def build(name: str) -> Workload:
    """Build (once per process) the requests of workload ``name``."""
    name = name.upper()
    specs = embodiment_specs()
    rng = np.random.default_rng(1234)
    if name in ("W1", "W2"):
        spec = specs["unitree_go2"]
        cam = spec.cameras[0]
        requests = tuple(
            _request(spec, {cam.name: raw_image(_noise_frame(rng, cam.height, cam.width))}, _state(rng, spec), i)
            for i in range(N_FRAMES)
        )
        description = (
            f"unitree_go2: 1 raw uint8 frame {cam.height}x{cam.width}x3 ({cam.height * cam.width * 3:,} bytes) "
            f"+ {spec.state_dim} float32 state + instruction {INSTRUCTION!r}"
        )
        policy = "noop" if name == "W1" else "default"
        return Workload(name, policy, description, requests, (spec.name,) * len(requests))
    if name == "W3":
        order = ("franka_arm", "aloha_dual_arm", "unitree_go2")
        requests_l: list[bytes] = []
        embodied: list[str] = []
        for i in range(3 * N_FRAMES):
            spec = specs[order[i % len(order)]]
            images = {c.name: encoded_image(_scene_frame(rng, c.height, c.width), "jpeg", 90) for c in spec.cameras}
            requests_l.append(_request(spec, images, _state(rng, spec), i))
            embodied.append(spec.name)
        description = (
            "mixed fleet, robots interleaved franka_arm (2 cameras) / aloha_dual_arm (3) / unitree_go2 (1); "
            "every frame a 224x224 JPEG (quality 90, synthetic scene) + state + instruction"
        )
        return Workload(name, "default", description, tuple(requests_l), tuple(embodied))
    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")


def decode_fast(request: pb.ActRequest, specs: dict[str, EmbodimentSpec] | None = None) -> PolicyObservation:
    """The minimum work to turn a request into a PolicyObservation (no validation).

    What the gRPC limit server and the raw-model baseline do: ``np.frombuffer`` a
    raw frame (zero copy), decode a JPEG/PNG with Pillow, ``np.frombuffer`` the state.
    """
    obs = request.observation
    images: dict[str, np.ndarray] = {}
    for cam, image in obs.images.items():
        kind = image.WhichOneof("data")
        if kind == "raw":
            t = image.raw
            images[cam] = np.frombuffer(t.data, dtype=np.uint8).reshape(tuple(t.shape))
        else:
            images[cam] = _decode_encoded(getattr(image, kind))
    st = obs.state
    dtype = np.float64 if st.dtype == pb.FLOAT64 else np.float32
    state = np.frombuffer(st.data, dtype=dtype).astype(np.float32, copy=False)
    return PolicyObservation(
        embodiment=obs.embodiment, images=images, state=state, instruction=obs.instruction, robot_id=obs.robot_id
    )


def _decode_encoded(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.uint8)


def observations(workload: Workload, n: int) -> list[PolicyObservation]:
    """``n`` decoded observations, robot i's request for i in range(n) (for the raw-model baseline)."""
    decoded = [decode_fast(pb.ActRequest.FromString(r)) for r in workload.requests]
    return [decoded[i % len(decoded)] for i in range(n)]
