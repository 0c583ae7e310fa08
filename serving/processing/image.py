"""Image kernels: batched bilinear resize and normalisation to model input.

Frames arrive as stacked uint8 batches (N, H, W, 3), one batch per source size
(the batch assembler groups them), so each kernel call is a handful of array
operations over the whole group rather than a Python loop over frames.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from serving.processing.backend import Array, ArrayBackend


@functools.lru_cache(maxsize=64)
def _axis_plan(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Source indices (lo, hi) and the weight of ``hi`` for each output position along one axis.

    Half-pixel centres ("align_corners=False", as cv2.INTER_LINEAR and
    torch.nn.functional.interpolate): output pixel ``o`` samples source
    coordinate ``(o + 0.5) * in/out - 0.5``, clamped to the image. Cached because
    a server sees the same few (in, out) pairs over and over.
    """
    scale = in_size / out_size
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    src = np.clip(src, 0.0, in_size - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    weight = (src - lo).astype(np.float32)
    for a in (lo, hi, weight):
        a.flags.writeable = False  # shared through the cache: nobody may modify them
    return lo, hi, weight


def resize_bilinear(images: Array, out_h: int, out_w: int, xp: ArrayBackend) -> Array:
    """Resize a uint8 batch (N, H, W, 3) to float32 (N, out_h, out_w, 3), values still in [0, 255].

    Separable: interpolate rows, then columns, each as two gathers and a lerp.
    The lerps run in place: on CPU, page-faulting fresh temporaries costs more
    than the arithmetic. There is no anti-aliasing filter (as cv2.INTER_LINEAR);
    for the modest downscales a robot camera needs that is the usual trade for speed.
    """
    n, in_h, in_w, c = images.shape
    if (in_h, in_w) == (out_h, out_w):
        return xp.astype(images, "float32")  # identity fast path: no interpolation needed
    y_lo, y_hi, wy = (xp.asarray(a) for a in _axis_plan(in_h, out_h))
    x_lo, x_hi = (xp.asarray(a) for a in _axis_plan(in_w, out_w)[:2])

    # Rows: gather on uint8 (a quarter of the bytes), convert, then top + (bottom - top) * wy.
    top = xp.astype(xp.take(images, y_lo, axis=1), "float32")  # (N, out_h, W, 3)
    rows = xp.astype(xp.take(images, y_hi, axis=1), "float32")
    rows -= top
    rows *= wy[None, :, None, None]
    rows += top

    # Columns: the same along axis 2. The weights are repeated per channel and the
    # last two axes merged, so numpy's inner loop runs over out_w * 3 values, not 3.
    left = xp.take(rows, x_lo, axis=2).reshape(n, out_h, out_w * c)
    out = xp.take(rows, x_hi, axis=2).reshape(n, out_h, out_w * c)
    out -= left
    out *= xp.asarray(_repeat_per_channel(in_w, out_w, c))
    out += left
    return out.reshape(n, out_h, out_w, c)


@functools.lru_cache(maxsize=64)
def _repeat_per_channel(in_w: int, out_w: int, channels: int) -> np.ndarray:
    """Column weights laid out like a row of interleaved channels (w0, w0, w0, w1, ...)."""
    weights = np.repeat(_axis_plan(in_w, out_w)[2], channels)
    weights.flags.writeable = False
    return weights


def normalize_images(
    x: Array,
    mean: Sequence[float],
    std: Sequence[float],
    xp: ArrayBackend,
) -> Array:
    """(N, H, W, 3) pixels in [0, 255] (uint8 or float) -> float32 (N, 3, H, W), ``(x/255 - mean)/std``.

    With mean = std = 0.5 per channel this maps pixels to [-1, 1]. The affine map
    is folded into one multiply-add; the result is channels-first and contiguous,
    which is what the convolution wants.
    """
    mean_arr = np.asarray(mean, dtype=np.float64)
    std_arr = np.asarray(std, dtype=np.float64)
    scale = xp.asarray((1.0 / (255.0 * std_arr)).astype(np.float32).reshape(1, -1, 1, 1))
    bias = xp.asarray((-mean_arr / std_arr).astype(np.float32).reshape(1, -1, 1, 1))
    # Permute first so the per-channel constants broadcast over whole planes (fast inner
    # loops); the multiply then makes a new float32 array, so the caller's x is untouched.
    out = xp.permute(x, (0, 3, 1, 2)) * scale
    out += bias
    return out


def resize_normalize(
    frames: Array,
    out_h: int,
    out_w: int,
    mean: Sequence[float],
    std: Sequence[float],
    xp: ArrayBackend,
) -> Array:
    """uint8 (N, H, W, 3) -> the model's float32 (N, 3, out_h, out_w): ``normalize_images(resize_bilinear(...))``.

    A backend with a fused kernel for this (``CupyBackend.resize_normalize``: one
    launch, reading host frames through its pinned staging buffers) gets to run
    it; every other backend runs the two seam kernels above. Both compute the
    same numbers (tests/test_array_backends.py), so callers never need to know
    which path ran.
    """
    fused = getattr(xp, "resize_normalize", None)
    if fused is not None:
        return fused(frames, out_h, out_w, mean, std)
    return normalize_images(resize_bilinear(xp.asarray(frames), out_h, out_w, xp), mean, std, xp)
