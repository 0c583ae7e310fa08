"""Whether CuPy can run here, for the GPU tests that skip in CI (one place, one reason text)."""

from __future__ import annotations

import pytest


def cupy_devices() -> int:
    try:
        import cupy

        return int(cupy.cuda.runtime.getDeviceCount())
    except Exception:  # not installed, no driver, no device
        return 0


def cupy_skip_reason() -> str:
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "cupy is not installed (pip install 'superbrain[cuda]')"
    return "cupy sees no CUDA/ROCm device"


needs_cupy = pytest.mark.skipif(cupy_devices() == 0, reason=cupy_skip_reason())
