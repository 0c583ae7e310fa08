"""Action kernels over padded batches (B, T, A) with one row of statistics per sample.

A batch mixes embodiments, so means, stds and limits differ per sample: they come
as (B, A) arrays (padded action dimensions carry mean 0, std 1, limits 0) and
broadcast over the time axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from serving.processing.backend import Array, ArrayBackend, backend_for


def unnormalize_actions(a: Array, mean: Array, std: Array) -> Array:
    """Model-space actions (B, T, A) -> robot units: ``a * std + mean`` per sample and dimension.

    Plain arithmetic, so it works on any backend's arrays unchanged.
    """
    return a * std[:, None, :] + mean[:, None, :]


def clip_actions(a: Array, low: Array, high: Array, xp: ArrayBackend | None = None) -> Array:
    """Clip actions (B, T, A) into per-sample limits ``low``/``high`` (B, A)."""
    xp = xp if xp is not None else backend_for(a)
    return xp.clip(a, low[:, None, :], high[:, None, :])


def float32_limits(low: Sequence[float], high: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Limits as float32, rounded inward where float32 cannot hold them exactly.

    Actions go out as float32. ``np.float32(-0.84)`` is -0.83999997, which is above
    a high limit of -0.84; rounding each bound toward the inside of its interval
    keeps every clipped float32 action within the limits as written.
    """
    low64 = np.asarray(low, dtype=np.float64)
    high64 = np.asarray(high, dtype=np.float64)
    low32 = low64.astype(np.float32)
    high32 = high64.astype(np.float32)
    low32 = np.where(low32 < low64, np.nextafter(low32, np.float32(np.inf)), low32)
    high32 = np.where(high32 > high64, np.nextafter(high32, np.float32(-np.inf)), high32)
    return low32.astype(np.float32), high32.astype(np.float32)
