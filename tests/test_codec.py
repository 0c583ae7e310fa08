import grpc
import numpy as np
import pytest

from serving import codec
from serving.api import pb
from serving.errors import RequestError
from tests.policies import ARM, DOG

SPECS = {ARM.name: ARM, DOG.name: DOG}


def _obs(embodiment: str = "arm", state=None, images=None) -> pb.Observation:
    spec = SPECS[embodiment]
    state = np.arange(spec.state_dim, dtype=np.float32) if state is None else state
    if images is None:
        images = {c.name: codec.raw_image(np.full((c.height, c.width, 3), 7, np.uint8)) for c in spec.cameras}
    return pb.Observation(
        embodiment=embodiment, state=codec.numpy_to_tensor(np.asarray(state)), images=images, instruction="go"
    )


def _error(obs: pb.Observation) -> RequestError:
    with pytest.raises(RequestError) as info:
        codec.decode_observation(obs, SPECS)
    return info.value


@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.float64, np.int32, np.int64, np.float16])
def test_tensor_round_trip(dtype) -> None:
    a = (np.random.default_rng(0).normal(size=(3, 4, 5)) * 50).astype(dtype)
    np.testing.assert_array_equal(codec.tensor_to_numpy(codec.numpy_to_tensor(a), "t"), a)


def test_valid_observation_decodes_raw_jpeg_and_png() -> None:
    frame = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for image in (codec.raw_image(frame), codec.encoded_image(frame, "png")):
        obs = codec.decode_observation(_obs(images={"front": image}), SPECS)
        np.testing.assert_array_equal(obs.images["front"], frame)
        assert obs.state.dtype == np.float32
    jpeg = codec.decode_observation(_obs(images={"front": codec.encoded_image(frame, "jpeg")}), SPECS)
    assert jpeg.images["front"].shape == (8, 8, 3)


def test_float64_state_is_accepted_as_float32() -> None:
    obs = codec.decode_observation(_obs(state=np.ones(3, np.float64)), SPECS)
    assert obs.state.dtype == np.float32


@pytest.mark.parametrize(
    "mutate, code, field",
    [
        (lambda o: o.images["front"].raw.__setattr__("data", b"\0" * 10), "INVALID_ARGUMENT", "images[front].raw.data"),
        (
            lambda o: o.images["front"].CopyFrom(codec.raw_image(np.zeros((8, 8, 4), np.uint8))),
            "INVALID_ARGUMENT",
            "images[front].raw.shape",
        ),
        (lambda o: o.images["front"].CopyFrom(pb.Image(jpeg=b"not a jpeg")), "INVALID_ARGUMENT", "images[front].jpeg"),
        (
            lambda o: o.images["front"].CopyFrom(pb.Image(jpeg=codec.encoded_image(np.zeros((4, 4, 3)), "png").png)),
            "INVALID_ARGUMENT",
            "images[front].jpeg",
        ),
        (
            lambda o: o.state.CopyFrom(codec.numpy_to_tensor(np.array([1, np.nan, 0], np.float32))),
            "INVALID_ARGUMENT",
            "observation.state",
        ),
        (
            lambda o: o.state.CopyFrom(codec.numpy_to_tensor(np.array([1, np.inf, 0], np.float32))),
            "INVALID_ARGUMENT",
            "observation.state",
        ),
        (
            lambda o: o.state.CopyFrom(codec.numpy_to_tensor(np.zeros(4, np.float32))),
            "INVALID_ARGUMENT",
            "observation.state",
        ),
        (
            lambda o: o.state.CopyFrom(codec.numpy_to_tensor(np.zeros(3, np.int32))),
            "INVALID_ARGUMENT",
            "observation.state.dtype",
        ),
        (lambda o: o.ClearField("state"), "INVALID_ARGUMENT", "observation.state"),
        (lambda o: o.images.pop("front"), "INVALID_ARGUMENT", "images[front]"),
        (
            lambda o: o.images["rear"].CopyFrom(codec.raw_image(np.zeros((8, 8, 3), np.uint8))),
            "INVALID_ARGUMENT",
            "images[rear]",
        ),
        (lambda o: o.images["front"].CopyFrom(pb.Image()), "INVALID_ARGUMENT", "images[front]"),
        (lambda o: o.__setattr__("embodiment", "spaceship"), "NOT_FOUND", "observation.embodiment"),
        (lambda o: o.__setattr__("embodiment", ""), "INVALID_ARGUMENT", "observation.embodiment"),
    ],
)
def test_bad_observation_names_the_field(mutate, code, field) -> None:
    obs = _obs()
    mutate(obs)
    err = _error(obs)
    assert err.code == getattr(grpc.StatusCode, code)
    assert field in err.detail


def test_oversized_frame_is_rejected_before_decoding() -> None:
    big = pb.Image(raw=pb.Tensor(dtype=pb.UINT8, shape=[5000, 10, 3], data=b""))
    err = _error(_obs(images={"front": big}))
    assert "images[front]" in err.detail and "4096" in err.detail
