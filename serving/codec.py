"""Wire <-> numpy conversion with validation (no Ray, no model).

Tensors travel as dtype + shape + raw little-endian bytes; decoding a raw frame
is a zero-copy ``np.frombuffer``. Every check raises ``RequestError`` naming the
field, so one bad request is rejected before it can reach a batch.
"""

from __future__ import annotations

import io
import math

import numpy as np

from serving.api import pb
from serving.errors import invalid, not_found
from serving.policy.base import EmbodimentSpec, PolicyObservation

_TO_NUMPY: dict[int, np.dtype] = {
    pb.UINT8: np.dtype("<u1"),
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.INT32: np.dtype("<i4"),
    pb.INT64: np.dtype("<i8"),
    pb.FLOAT16: np.dtype("<f2"),
}
_FROM_NUMPY = {dt.newbyteorder("="): code for code, dt in _TO_NUMPY.items()}

#: Largest frame side we accept; anything bigger is a mistake or an attack.
MAX_IMAGE_SIDE = 4096


def tensor_to_numpy(t: pb.Tensor, field: str) -> np.ndarray:
    """Decode a Tensor message; the result may be a read-only view of the message bytes."""
    dtype = _TO_NUMPY.get(t.dtype)
    if dtype is None:
        raise invalid(f"{field}.dtype", f"unsupported dtype {t.dtype}")
    shape = tuple(int(d) for d in t.shape)
    if any(d < 0 for d in shape):
        raise invalid(f"{field}.shape", f"negative dimension in {list(shape)}")
    expected = math.prod(shape) * dtype.itemsize
    data = t.data  # each attribute read copies the bytes out of the message: read once
    if len(data) != expected:
        raise invalid(
            f"{field}.data",
            f"has {len(data)} bytes but dtype {dtype.name} and shape {list(shape)} need {expected}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def numpy_to_tensor(array: np.ndarray, out: pb.Tensor | None = None) -> pb.Tensor:
    """Encode an array as a Tensor (little-endian, C order)."""
    array = np.asarray(array)
    code = _FROM_NUMPY.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(f"cannot encode dtype {array.dtype}")
    t = out if out is not None else pb.Tensor()
    t.dtype = code
    t.shape[:] = array.shape
    t.data = np.ascontiguousarray(array, dtype=_TO_NUMPY[code]).tobytes()
    return t


def decode_image(image: pb.Image, field: str) -> np.ndarray:
    """A uint8 (H, W, 3) array from a raw tensor or JPEG/PNG bytes."""
    kind = image.WhichOneof("data")
    if kind is None:
        raise invalid(field, "image has no data (set raw, jpeg or png)")
    if kind == "raw":
        if image.raw.dtype != pb.UINT8:
            raise invalid(f"{field}.raw.dtype", "raw frames must be UINT8")
        shape = list(image.raw.shape)
        if len(shape) != 3:
            raise invalid(f"{field}.raw.shape", f"expected (H, W, 3), got {shape}")
        if shape[2] != 3:
            raise invalid(f"{field}.raw.shape", f"expected 3 channels (RGB), got {shape[2]}")
        _check_size(shape[0], shape[1], field)
        return tensor_to_numpy(image.raw, f"{field}.raw")
    data = getattr(image, kind)
    return _decode_encoded(data, kind, f"{field}.{kind}")


def _check_size(height: int, width: int, field: str) -> None:
    if not (0 < height <= MAX_IMAGE_SIDE and 0 < width <= MAX_IMAGE_SIDE):
        raise invalid(field, f"frame size {height}x{width} outside 1..{MAX_IMAGE_SIDE}")


def _decode_encoded(data: bytes, kind: str, field: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    expected = {"jpeg": "JPEG", "png": "PNG"}[kind]
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != expected:
                raise invalid(field, f"bytes are {img.format or 'unknown'}, not {expected}")
            _check_size(img.height, img.width, field)
            rgb = img.convert("RGB") if img.mode != "RGB" else img
            rgb.load()
            return np.asarray(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise invalid(field, f"cannot decode {expected}: {exc}") from None


def decode_observation(obs: pb.Observation, embodiments: dict[str, EmbodimentSpec]) -> PolicyObservation:
    """Validate an Observation against its embodiment and decode it for the policy."""
    spec = embodiments.get(obs.embodiment)
    if spec is None:
        if not obs.embodiment:
            raise invalid("observation.embodiment", "is required")
        raise not_found(
            "observation.embodiment",
            f"unknown embodiment {obs.embodiment!r}; served: {sorted(embodiments)}",
        )
    if not obs.HasField("state"):
        raise invalid("observation.state", "is required")
    state = tensor_to_numpy(obs.state, "observation.state")
    if state.dtype.kind != "f":
        raise invalid("observation.state.dtype", "must be FLOAT32 or FLOAT64")
    if state.ndim != 1 or state.shape[0] != spec.state_dim:
        raise invalid(
            "observation.state",
            f"embodiment {spec.name!r} needs shape ({spec.state_dim},), got {list(state.shape)}",
        )
    state = state.astype(np.float32)
    if not np.isfinite(state).all():
        bad = int(np.flatnonzero(~np.isfinite(state))[0])
        raise invalid("observation.state", f"contains NaN or inf (first at index {bad})")

    images: dict[str, np.ndarray] = {}
    for name in spec.camera_names:
        if name not in obs.images:
            raise invalid(f"observation.images[{name}]", f"camera is required for {spec.name!r}")
        images[name] = decode_image(obs.images[name], f"observation.images[{name}]")
    extra = sorted(set(obs.images) - set(spec.camera_names))
    if extra:
        raise invalid(
            f"observation.images[{extra[0]}]",
            f"embodiment {spec.name!r} has no such camera; expected {list(spec.camera_names)}",
        )
    return PolicyObservation(
        embodiment=spec.name,
        images=images,
        state=state,
        instruction=obs.instruction,
        robot_id=obs.robot_id,
    )


def raw_image(frame: np.ndarray) -> pb.Image:
    """Wrap a uint8 (H, W, 3) frame as an Image message (no compression)."""
    img = pb.Image()
    numpy_to_tensor(np.asarray(frame, dtype=np.uint8), img.raw)
    return img


def encoded_image(frame: np.ndarray, fmt: str = "jpeg", quality: int = 90) -> pb.Image:
    """Encode a uint8 (H, W, 3) frame as JPEG or PNG."""
    from PIL import Image

    buf = io.BytesIO()
    pil = Image.fromarray(np.asarray(frame, dtype=np.uint8))
    if fmt == "jpeg":
        pil.save(buf, format="JPEG", quality=quality)
        return pb.Image(jpeg=buf.getvalue())
    if fmt == "png":
        pil.save(buf, format="PNG")
        return pb.Image(png=buf.getvalue())
    raise ValueError(f"unknown image format {fmt!r}")
