"""Processing kernels: numpy and torch backends agree, and resize matches independent references.

Inputs are fresh random draws on every run; the seed is printed, so a failure
can be replayed (pytest shows captured output for failing tests).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from serving.processing import (
    backend_for,
    clip_actions,
    float32_limits,
    get_backend,
    normalize_images,
    resize_bilinear,
    tokenize,
    unnormalize_actions,
)

NP = get_backend("numpy")
TORCH = get_backend("torch")  # CPU
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

#: Pixel values are 0..255; float32 lerps in slightly different op orders stay far below this.
PIXEL_ATOL = 1e-3


@pytest.fixture
def rng() -> np.random.Generator:
    seed = np.random.SeedSequence().entropy
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


def _frames(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _reference_resize(frame: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Textbook bilinear with half-pixel centres, one output pixel at a time (float64)."""
    in_h, in_w, _ = frame.shape
    src = frame.astype(np.float64)
    out = np.empty((out_h, out_w, 3))
    for i in range(out_h):
        y = min(max((i + 0.5) * in_h / out_h - 0.5, 0.0), in_h - 1)
        y0 = int(np.floor(y))
        y1, fy = min(y0 + 1, in_h - 1), y - y0
        for j in range(out_w):
            x = min(max((j + 0.5) * in_w / out_w - 0.5, 0.0), in_w - 1)
            x0 = int(np.floor(x))
            x1, fx = min(x0 + 1, in_w - 1), x - x0
            top = src[y0, x0] * (1 - fx) + src[y0, x1] * fx
            bottom = src[y1, x0] * (1 - fx) + src[y1, x1] * fx
            out[i, j] = top * (1 - fy) + bottom * fy
    return out


SIZES = [
    (37, 53, 96, 96),  # odd source, upscale
    (224, 224, 96, 96),  # the usual downscale
    (300, 211, 96, 96),  # odd source, downscale
    (37, 53, 20, 71),  # down in one axis, up in the other
    (1, 1, 5, 4),  # degenerate source
    (96, 96, 96, 96),  # identity fast path
]


@pytest.mark.parametrize(("in_h", "in_w", "out_h", "out_w"), SIZES)
def test_resize_numpy_and_torch_agree(rng, in_h, in_w, out_h, out_w) -> None:
    frames = _frames(rng, 3, in_h, in_w)
    a = resize_bilinear(frames, out_h, out_w, NP)
    b = resize_bilinear(TORCH.asarray(frames), out_h, out_w, TORCH)
    assert a.shape == (3, out_h, out_w, 3) and a.dtype == np.float32
    assert tuple(b.shape) == a.shape and b.dtype == torch.float32
    np.testing.assert_allclose(TORCH.to_host(b), a, atol=PIXEL_ATOL, rtol=0)


@pytest.mark.parametrize(("in_h", "in_w", "out_h", "out_w"), [(13, 17, 9, 21), (37, 53, 23, 31), (7, 5, 16, 16)])
def test_resize_matches_reference_loop(rng, in_h, in_w, out_h, out_w) -> None:
    frames = _frames(rng, 2, in_h, in_w)
    out = resize_bilinear(frames, out_h, out_w, NP)
    for frame, got in zip(frames, out, strict=True):
        np.testing.assert_allclose(got, _reference_resize(frame, out_h, out_w), atol=PIXEL_ATOL, rtol=0)


@pytest.mark.parametrize(("in_h", "in_w", "out_h", "out_w"), SIZES[:4])
def test_resize_matches_torch_interpolate(rng, in_h, in_w, out_h, out_w) -> None:
    """torch's bilinear (align_corners=False, no antialias) is an independent implementation of the same maths."""
    frames = _frames(rng, 2, in_h, in_w)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(frames).permute(0, 3, 1, 2).double(),
        size=(out_h, out_w),
        mode="bilinear",
        align_corners=False,
        antialias=False,
    ).permute(0, 2, 3, 1)
    np.testing.assert_allclose(resize_bilinear(frames, out_h, out_w, NP), expected.numpy(), atol=PIXEL_ATOL, rtol=0)


def test_resize_keeps_constant_frames_constant() -> None:
    frames = np.full((2, 37, 53, 3), 200, np.uint8)
    np.testing.assert_allclose(resize_bilinear(frames, 96, 96, NP), 200.0, atol=1e-4)


def test_identity_resize_is_exact(rng) -> None:
    frames = _frames(rng, 2, 16, 24)
    out = resize_bilinear(frames, 16, 24, NP)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, frames.astype(np.float32))


def test_normalize_layout_range_and_backends(rng) -> None:
    frames = _frames(rng, 4, 11, 13)
    frames[0, 0, 0] = (0, 255, 128)
    before = frames.copy()
    a = normalize_images(frames, MEAN, STD, NP)
    b = TORCH.to_host(normalize_images(TORCH.asarray(frames), MEAN, STD, TORCH))
    assert a.shape == (4, 3, 11, 13) and a.dtype == np.float32 and a.flags.c_contiguous
    np.testing.assert_array_equal(frames, before)  # input untouched
    expected = (frames.astype(np.float64) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(a, expected.transpose(0, 3, 1, 2), atol=1e-6)
    np.testing.assert_allclose(b, a, atol=1e-6)
    assert a.min() >= -1 - 1e-6 and a.max() <= 1 + 1e-6
    np.testing.assert_allclose(a[0, :, 0, 0], [-1.0, 1.0, 128 / 127.5 - 1], atol=1e-6)


def test_normalize_per_channel_statistics(rng) -> None:
    frames = _frames(rng, 2, 5, 6).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = normalize_images(frames, mean, std, NP)
    expected = (frames / 255 - np.array(mean)) / np.array(std)
    np.testing.assert_allclose(out, expected.transpose(0, 3, 1, 2), atol=1e-5)


def _action_stats(rng: np.random.Generator, b: int, a: int) -> tuple[np.ndarray, ...]:
    mean = rng.normal(size=(b, a)).astype(np.float32)
    std = rng.uniform(0.01, 2.0, size=(b, a)).astype(np.float32)
    low = rng.uniform(-3, -0.1, size=(b, a)).astype(np.float32)
    high = rng.uniform(0.1, 3, size=(b, a)).astype(np.float32)
    return mean, std, low, high


def test_unnormalize_and_clip_per_row(rng) -> None:
    b, t, a = 5, 7, 4
    actions = (rng.normal(size=(b, t, a)) * 3).astype(np.float32)
    mean, std, low, high = _action_stats(rng, b, a)

    un = unnormalize_actions(actions, mean, std)
    clipped = clip_actions(un, low, high, NP)
    for row in range(b):  # reference: one sample at a time
        ref = np.clip(actions[row] * std[row] + mean[row], low[row], high[row])
        np.testing.assert_allclose(clipped[row], ref, atol=1e-6)
    assert (clipped >= low[:, None]).all() and (clipped <= high[:, None]).all()

    tt = [TORCH.asarray(x) for x in (actions, mean, std, low, high)]
    t_clipped = clip_actions(unnormalize_actions(tt[0], tt[1], tt[2]), tt[3], tt[4])  # backend inferred
    np.testing.assert_allclose(TORCH.to_host(t_clipped), clipped, atol=1e-6)


def test_float32_limits_round_inward() -> None:
    low, high = float32_limits([-0.84, 0.1, 0.0, -2.72], [-0.84, 0.1, 1.0, 3.49])
    assert low.dtype == high.dtype == np.float32
    assert (low.astype(np.float64) >= [-0.84, 0.1, 0.0, -2.72]).all()
    assert (high.astype(np.float64) <= [-0.84, 0.1, 1.0, 3.49]).all()
    assert low[2] == 0.0 and high[2] == 1.0  # exact values stay exact
    np.testing.assert_allclose(low, [-0.84, 0.1, 0.0, -2.72], rtol=1e-6)


def test_tokenize_is_deterministic_and_masked() -> None:
    ids, mask = tokenize(["Pick up the RED cup.", "", "a b c d e f"], max_tokens=4, vocab_size=100)
    assert ids.shape == mask.shape == (3, 4) and ids.dtype == np.int64
    assert mask.tolist() == [[True] * 4, [False] * 4, [True] * 4]  # long texts truncate
    assert ids[0, 0] == 1 + zlib.crc32(b"pick") % 99  # lower-cased, punctuation dropped
    assert (ids[mask] >= 1).all() and (ids[mask] < 100).all() and (ids[~mask] == 0).all()
    again, _ = tokenize(["pick up the red cup"], max_tokens=4, vocab_size=100)
    np.testing.assert_array_equal(again[0], ids[0])


def test_backend_lookup() -> None:
    assert get_backend("numpy").name == "numpy"
    assert get_backend("torch", "cpu").device == "cpu"
    with pytest.raises(ValueError, match="unknown array backend"):
        get_backend("jax")
    with pytest.raises(ValueError, match="only runs on 'cpu'"):
        get_backend("numpy", "cuda")
    assert backend_for(np.zeros(2)).name == "numpy"
    assert backend_for(torch.zeros(2)).name == "torch"
    with pytest.raises(TypeError):
        backend_for([1, 2])


def test_torch_backend_accepts_read_only_frames() -> None:
    frame = np.frombuffer(bytes(range(12)), np.uint8).reshape(1, 2, 2, 3)  # as the codec decodes raw frames
    assert not frame.flags.writeable
    np.testing.assert_array_equal(TORCH.to_host(TORCH.asarray(frame)), frame)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_backend_matches_numpy(rng) -> None:
    cuda = get_backend("torch", "cuda")
    frames = _frames(rng, 4, 37, 53)
    a = normalize_images(resize_bilinear(frames, 96, 96, NP), MEAN, STD, NP)
    b = normalize_images(resize_bilinear(cuda.asarray(frames), 96, 96, cuda), MEAN, STD, cuda)
    assert b.device.type == "cuda"
    np.testing.assert_allclose(cuda.to_host(b), a, atol=1e-5)
