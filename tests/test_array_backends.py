"""Every array backend computes the same function: numpy vs torch (CPU) here, CuPy vs numpy on a GPU.

Each test draws fresh inputs from its own seeded Generator (seeded from the test's
id, so sizes and draws differ between tests but a failure replays exactly).
The fused CuPy kernel is also checked here without a GPU: its CUDA source is
compiled as C++ with the few CUDA names it uses defined, and run on the CPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.batching import BatchAssembler, BatchDims
from serving.models.embodiments import default_embodiments
from serving.models.vla import VLAConfig
from serving.policy.base import EmbodimentSpec, PolicyObservation
from serving.processing import clip_actions, get_backend, normalize_images, resize_bilinear, unnormalize_actions
from serving.processing.backend import backend_for, to_torch
from serving.processing.cupy_backend import RESIZE_NORMALIZE_SOURCE, affine_constants
from serving.processing.image import _axis_plan
from tests.gpu_support import cupy_devices, needs_cupy

# Tolerances, and why they are what they are.
#: Resized pixels lie in [0, 255]. numpy and torch run the same float32 operations,
#: but torch may vectorise them differently; a few float32 ulps at 255 is ~3e-5, and
#: 1e-3 of a grey level is still far below anything a model can see.
PIXEL_ATOL = 1e-3
#: Normalised pixels are (x/255 - mean)/std, about [-2.2, 2.7] with ImageNet statistics:
#: a pixel error of e becomes e/(255*std) <= 2e-5 for PIXEL_ATOL-sized float noise.
NORMALISED_ATOL = 2e-5
#: Actions (a*std + mean, then clip) are at most ~5 in magnitude: two float32 roundings
#: there are < 1e-6, and clipping is exact.
ACTION_ATOL = 1e-6
#: The fused kernel uses the same weights, the same operations in the same order and no
#: FMA contraction (``__f*_rn``), so it must match the numpy path exactly.
FUSED_ATOL = 0.0

NP = get_backend("numpy")
TORCH = get_backend("torch", "cpu")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
EMBODIMENTS = default_embodiments()
_MODEL = VLAConfig.for_embodiments(EMBODIMENTS)  # the default model's sizes (96x96 images)
DIMS = BatchDims(
    image_size=_MODEL.image_size,
    max_cameras=_MODEL.max_cameras,
    max_state_dim=_MODEL.max_state_dim,
    max_action_dim=_MODEL.max_action_dim,
    horizon=_MODEL.horizon,
    max_tokens=_MODEL.max_tokens,
    vocab_size=_MODEL.vocab_size,
    image_mean=_MODEL.image_mean,
    image_std=_MODEL.image_std,
)

#: (frames, in_h, in_w, out_h, out_w): degenerate, odd and camera-sized sources, up and down.
SIZES = [
    (2, 1, 1, 96, 96),
    (3, 3, 5, 96, 96),
    (2, 223, 224, 96, 96),
    (2, 224, 224, 96, 96),
    (1, 224, 224, 224, 224),  # identity
    (2, 37, 53, 7, 129),  # down one axis, up the other, odd output
    (1, 480, 640, 96, 96),
    (4, 5, 3, 1, 1),
]


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def _frames(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _observation(rng: np.random.Generator, spec: EmbodimentSpec, size: tuple[int, int] | None = None):
    images = {c.name: rng.integers(0, 256, (*(size or (c.height, c.width)), 3), dtype=np.uint8) for c in spec.cameras}
    state = (np.array(spec.state_mean) + np.array(spec.state_std) * rng.normal(size=spec.state_dim) * 3).astype(
        np.float32
    )
    return PolicyObservation(spec.name, images, state, "pick up the red cup")


def _model_outputs(rng: np.random.Generator, b: int) -> np.ndarray:
    # Normalised actions, wide enough that clipping to the safety limits happens.
    return (rng.normal(size=(b, DIMS.horizon, DIMS.max_action_dim)) * 4).astype(np.float32)


def _postprocess(xp, assembler: BatchAssembler, outputs: np.ndarray, observations) -> np.ndarray:
    """What VLAPolicy.postprocess computes before splitting, on backend ``xp``."""
    table = assembler.table
    ids = xp.asarray(table.ids(observations))
    per_sample = [
        xp.asarray(a)[ids] for a in (table.action_mean, table.action_std, table.action_low, table.action_high)
    ]
    actions = unnormalize_actions(xp.asarray(outputs), per_sample[0], per_sample[1])
    return xp.to_host(clip_actions(actions, per_sample[2], per_sample[3], xp))


# --------------------------------------------------------------------------- numpy vs torch (CPU)


@pytest.mark.parametrize(("n", "in_h", "in_w", "out_h", "out_w"), SIZES)
@pytest.mark.parametrize(("mean", "std"), [HALF, IMAGENET], ids=["half", "imagenet"])
def test_resize_normalize_numpy_vs_torch(rng, n, in_h, in_w, out_h, out_w, mean, std) -> None:
    frames = _frames(rng, n, in_h, in_w)
    resized_np = resize_bilinear(frames, out_h, out_w, NP)
    resized_t = resize_bilinear(TORCH.asarray(frames), out_h, out_w, TORCH)
    np.testing.assert_allclose(TORCH.to_host(resized_t), resized_np, atol=PIXEL_ATOL, rtol=0)
    a = normalize_images(resized_np, mean, std, NP)
    b = TORCH.to_host(normalize_images(resized_t, mean, std, TORCH))
    assert a.shape == b.shape == (n, 3, out_h, out_w)
    np.testing.assert_allclose(b, a, atol=NORMALISED_ATOL, rtol=0)


@pytest.mark.parametrize("spec", EMBODIMENTS, ids=lambda s: s.name)
@pytest.mark.parametrize("frame_size", [None, (223, 224), (3, 5)], ids=["native", "223x224", "3x5"])
def test_assembly_and_postprocess_numpy_vs_torch(rng, spec, frame_size) -> None:
    observations = [_observation(rng, spec, frame_size) for _ in range(int(rng.integers(1, 5)))]
    a = BatchAssembler(EMBODIMENTS, DIMS, NP)
    b = BatchAssembler(EMBODIMENTS, DIMS, TORCH)
    batch_np, batch_t = a.assemble(observations), b.assemble(observations)
    np.testing.assert_allclose(TORCH.to_host(batch_t.images), batch_np.images, atol=NORMALISED_ATOL, rtol=0)
    np.testing.assert_allclose(TORCH.to_host(batch_t.state), batch_np.state, atol=ACTION_ATOL, rtol=0)
    for field in ("camera_mask", "state_mask", "embodiment_ids", "token_ids", "token_mask"):
        np.testing.assert_array_equal(TORCH.to_host(getattr(batch_t, field)), getattr(batch_np, field))

    outputs = _model_outputs(rng, len(observations))
    host_np = _postprocess(NP, a, outputs, observations)
    host_t = _postprocess(TORCH, b, outputs, observations)
    np.testing.assert_allclose(host_t, host_np, atol=ACTION_ATOL, rtol=0)
    low, high = a.table.action_low[a.table.ids(observations)], a.table.action_high[a.table.ids(observations)]
    assert (host_np >= low[:, None]).all() and (host_np <= high[:, None]).all()


def test_seam_operations_agree(rng) -> None:
    x = rng.normal(size=(3, 4, 5)).astype(np.float32)
    idx = np.array([2, 0, 2], dtype=np.int64)
    for xp in (NP, TORCH):
        got = xp.asarray(x)
        np.testing.assert_array_equal(xp.to_host(xp.take(got, xp.asarray(idx), axis=1)), np.take(x, idx, axis=1))
        np.testing.assert_array_equal(xp.to_host(xp.permute(got, (2, 0, 1))), x.transpose(2, 0, 1))
        np.testing.assert_array_equal(xp.to_host(xp.clip(got, xp.asarray(-0.5), xp.asarray(0.5))), x.clip(-0.5, 0.5))
        np.testing.assert_array_equal(xp.to_host(xp.astype(got, "int64")), x.astype(np.int64))
        assert xp.to_host(xp.zeros((2, 3), "bool")).dtype == np.bool_


def _read_only_frames(rng: np.random.Generator, n: int, h: int, w: int) -> list[np.ndarray]:
    """Frames as a replica holds them: read-only views of request bytes, each its own buffer."""
    return [np.frombuffer(f.tobytes(), np.uint8).reshape(h, w, 3) for f in _frames(rng, n, h, w)]


def _check_stack_frames(xp, rng: np.random.Generator) -> None:
    """``stack_frames`` is ``np.stack`` onto the backend's device, and refuses frames that do not stack."""
    for n, h, w in ((1, 1, 1), (3, 5, 7), (8, 224, 224), (2, 480, 640)):  # below and above the staging size
        frames = _read_only_frames(rng, n, h, w)
        got = xp.stack_frames(frames)
        assert tuple(got.shape) == (n, h, w, 3)
        np.testing.assert_array_equal(xp.to_host(got), np.stack(frames))
    with pytest.raises(ValueError, match="frame 1 is uint8 \\(4, 5, 3\\)"):
        xp.stack_frames([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8)])
    with pytest.raises(ValueError, match="frame 1 is float32"):
        xp.stack_frames([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4, 3), np.float32)])
    with pytest.raises(ValueError, match="no frames"):
        xp.stack_frames([])


def test_stack_frames_is_np_stack_on_every_cpu_backend(rng) -> None:
    for xp in (NP, TORCH):
        _check_stack_frames(xp, rng)


def test_to_torch_is_zero_copy(rng) -> None:
    x = rng.normal(size=(4, 3)).astype(np.float32)
    t = to_torch(x)
    assert isinstance(t, torch.Tensor) and t.data_ptr() == x.ctypes.data  # a view, not a copy
    assert NP.to_torch(x).data_ptr() == x.ctypes.data
    tensor = torch.zeros(3)
    assert to_torch(tensor) is tensor and TORCH.to_torch(tensor) is tensor
    read_only = np.frombuffer(bytes(12), np.uint8)  # like a decoded request frame
    np.testing.assert_array_equal(to_torch(read_only).numpy(), read_only)  # copied: torch cannot alias it


def test_cupy_backend_is_registered_but_optional() -> None:
    with pytest.raises(ValueError, match="CUDA/ROCm devices"):
        get_backend("cupy", "cpu")
    if cupy_devices() == 0:
        from serving.processing.cupy_backend import CupyUnavailable

        with pytest.raises(CupyUnavailable):
            get_backend("cupy", "cuda")


# --------------------------------------------------------------------------- the fused kernel, emulated on the CPU

_SHIM = r"""
struct dim3_ { unsigned int x, y, z; };
static dim3_ blockIdx, threadIdx, blockDim, gridDim;
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fmul_rn(float a, float b) { return a * b; }
"""

_LAUNCH = r"""
extern "C" void launch(unsigned grid, unsigned block, const unsigned char* src, float* dst,
    const long long* y_lo, const long long* y_hi, const float* wy,
    const long long* x_lo, const long long* x_hi, const float* wx,
    const float* scale, const float* bias, int n, int in_h, int in_w, int out_h, int out_w) {
    gridDim.x = grid; blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b)
        for (unsigned t = 0; t < block; ++t) {
            blockIdx.x = b; threadIdx.x = t;
            resize_normalize_nchw(src, dst, y_lo, y_hi, wy, x_lo, x_hi, wx, scale, bias, n, in_h, in_w, out_h, out_w);
        }
}
"""

_CXX = shutil.which("g++") or shutil.which("c++")


@pytest.fixture(scope="module")
def emulated_kernel(tmp_path_factory: pytest.TempPathFactory):
    """The CUDA source, compiled as C++ (IEEE float32, no FMA contraction) and launched serially."""
    work = tmp_path_factory.mktemp("kernel")
    source, library = work / "kernel.cpp", work / "kernel.so"
    source.write_text(_SHIM + RESIZE_NORMALIZE_SOURCE + _LAUNCH)
    subprocess.run([_CXX, "-O1", "-ffp-contract=off", "-fPIC", "-shared", str(source), "-o", str(library)], check=True)
    return ctypes.CDLL(str(Path(library)))


@pytest.mark.skipif(_CXX is None, reason="needs a C++ compiler (g++) to emulate the CUDA kernel on the CPU")
@pytest.mark.parametrize(("n", "in_h", "in_w", "out_h", "out_w"), SIZES)
def test_fused_kernel_source_matches_numpy_on_cpu(emulated_kernel, rng, n, in_h, in_w, out_h, out_w) -> None:
    frames = _frames(rng, n, in_h, in_w)
    mean, std = IMAGENET
    expected = normalize_images(resize_bilinear(frames, out_h, out_w, NP), mean, std, NP)
    out = np.full((n, 3, out_h, out_w), np.nan, np.float32)
    y_lo, y_hi, wy = _axis_plan(in_h, out_h)
    x_lo, x_hi, wx = _axis_plan(in_w, out_w)
    scale, bias = affine_constants(mean, std)

    def ptr(a: np.ndarray) -> ctypes.c_void_p:
        return a.ctypes.data_as(ctypes.c_void_p)

    # An odd grid (3 blocks of 7 threads) exercises the grid-stride loop.
    emulated_kernel.launch(
        ctypes.c_uint(3),
        ctypes.c_uint(7),
        *(ptr(a) for a in (frames, out, y_lo, y_hi, wy, x_lo, x_hi, wx, scale, bias)),
        *(ctypes.c_int(v) for v in (n, in_h, in_w, out_h, out_w)),
    )
    np.testing.assert_allclose(out, expected, atol=FUSED_ATOL, rtol=0)


# --------------------------------------------------------------------------- CuPy vs numpy (needs a GPU)


@pytest.fixture(scope="module")
def cupy_xp():
    return get_backend("cupy", "cuda")


@needs_cupy
@pytest.mark.gpu
@pytest.mark.parametrize(("n", "in_h", "in_w", "out_h", "out_w"), SIZES)
def test_cupy_generic_kernels_match_numpy(cupy_xp, rng, n, in_h, in_w, out_h, out_w) -> None:
    frames = _frames(rng, n, in_h, in_w)
    mean, std = IMAGENET
    expected = normalize_images(resize_bilinear(frames, out_h, out_w, NP), mean, std, NP)
    got = normalize_images(resize_bilinear(cupy_xp.asarray(frames), out_h, out_w, cupy_xp), mean, std, cupy_xp)
    np.testing.assert_allclose(cupy_xp.to_host(got), expected, atol=NORMALISED_ATOL, rtol=0)


@needs_cupy
@pytest.mark.gpu
@pytest.mark.parametrize(("n", "in_h", "in_w", "out_h", "out_w"), SIZES)
@pytest.mark.parametrize(("mean", "std"), [HALF, IMAGENET], ids=["half", "imagenet"])
def test_cupy_fused_kernel_matches_numpy(cupy_xp, rng, n, in_h, in_w, out_h, out_w, mean, std) -> None:
    frames = _frames(rng, n, in_h, in_w)
    expected = normalize_images(resize_bilinear(frames, out_h, out_w, NP), mean, std, NP)
    from_host = cupy_xp.resize_normalize(frames, out_h, out_w, mean, std)  # pinned upload + kernel
    from_device = cupy_xp.resize_normalize(cupy_xp.asarray(frames), out_h, out_w, mean, std)
    for got in (from_host, from_device):
        assert got.shape == (n, 3, out_h, out_w) and str(got.dtype) == "float32"
        np.testing.assert_allclose(cupy_xp.to_host(got), expected, atol=FUSED_ATOL, rtol=0)


@needs_cupy
@pytest.mark.gpu
@pytest.mark.parametrize("spec", EMBODIMENTS, ids=lambda s: s.name)
def test_cupy_assembly_and_postprocess_match_numpy(cupy_xp, rng, spec) -> None:
    observations = [_observation(rng, spec) for _ in range(int(rng.integers(1, 9)))]
    a = BatchAssembler(EMBODIMENTS, DIMS, NP)
    b = BatchAssembler(EMBODIMENTS, DIMS, cupy_xp)
    batch_np, batch_cp = a.assemble(observations), b.assemble(observations)
    np.testing.assert_allclose(cupy_xp.to_host(batch_cp.images), batch_np.images, atol=NORMALISED_ATOL, rtol=0)
    np.testing.assert_array_equal(cupy_xp.to_host(batch_cp.camera_mask), batch_np.camera_mask)
    outputs = _model_outputs(rng, len(observations))
    np.testing.assert_allclose(
        _postprocess(cupy_xp, b, outputs, observations), _postprocess(NP, a, outputs, observations), atol=ACTION_ATOL
    )


@needs_cupy
@pytest.mark.gpu
def test_cupy_hand_off_to_torch_is_zero_copy(cupy_xp, rng) -> None:
    frames = _frames(rng, 8, 224, 224)  # large enough to go through the pinned staging buffers
    on_device = cupy_xp.asarray(frames)
    np.testing.assert_array_equal(cupy_xp.to_host(on_device), frames)
    tensor = to_torch(on_device)
    assert tensor.device.type == "cuda" and tensor.data_ptr() == on_device.data.ptr
    np.testing.assert_array_equal(tensor.cpu().numpy(), frames)
    back = cupy_xp.asarray(tensor)  # torch -> cupy through DLPack, no copy either
    assert back.data.ptr == tensor.data_ptr()
    assert backend_for(on_device).name == "cupy"


@needs_cupy
@pytest.mark.gpu
def test_cupy_stack_frames_gathers_into_staging_without_overwriting_earlier_uploads(cupy_xp, rng) -> None:
    _check_stack_frames(cupy_xp, rng)
    # More uploads than staging slots, all kept alive and checked only at the end: a slot
    # refilled before its copy had finished would show up as another batch's pixels.
    batches = [_read_only_frames(rng, 16, 224, 224) for _ in range(5)]
    on_device = [cupy_xp.stack_frames(frames) for frames in batches]
    for frames, got in zip(batches, on_device, strict=True):
        np.testing.assert_array_equal(cupy_xp.to_host(got), np.stack(frames))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
def test_torch_cuda_stack_frames_uploads_through_pinned_memory(rng) -> None:
    xp = get_backend("torch", "cuda")
    _check_stack_frames(xp, rng)
    batches = [_read_only_frames(rng, 16, 224, 224) for _ in range(5)]
    on_device = [xp.stack_frames(frames) for frames in batches]  # pinned buffers freed while copies run
    for frames, got in zip(batches, on_device, strict=True):
        assert got.device.type == "cuda"
        np.testing.assert_array_equal(xp.to_host(got), np.stack(frames))
