"""The array-backend seam the processing kernels are written against.

Kernels use ordinary operators (``+``, ``*``, slicing, integer-array indexing),
which numpy arrays and torch tensors share. The few things that are spelled
differently (creating arrays, moving to host, dtypes, permuting axes, clipping)
go through an ``ArrayBackend``. Keep it that small: every method added here has
to be implemented, and tested to agree, on every backend.

CuPy is one more ``ArrayBackend`` subclass (serving/processing/cupy_backend.py),
registered below and imported only when asked for, so CuPy stays optional;
nothing in the kernels changed for it. ``to_torch`` is the hand-off to the model:
zero-copy on every backend (numpy: a view, cupy: DLPack).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: A backend array: ``np.ndarray`` for ``NumpyBackend``, ``torch.Tensor`` for ``TorchBackend``,
#: ``cupy.ndarray`` for ``CupyBackend``.
Array = Any

#: The dtypes the kernels use, by name (the seam speaks names, not library objects).
DTYPES = ("float32", "int64", "uint8", "bool")


class ArrayBackend(abc.ABC):
    """Array creation and the handful of operations numpy and torch spell differently."""

    name: str
    device: str

    @abc.abstractmethod
    def asarray(self, x: Any, dtype: str | None = None) -> Array:
        """``x`` (host array, nested lists, or a backend array) as a backend array on ``device``."""

    @abc.abstractmethod
    def to_host(self, x: Array) -> np.ndarray:
        """A numpy array with the values of ``x`` (no copy where the backend allows)."""

    @abc.abstractmethod
    def zeros(self, shape: Sequence[int], dtype: str) -> Array:
        """A zero-filled array on ``device``."""

    @abc.abstractmethod
    def take(self, x: Array, indices: Array, axis: int) -> Array:
        """Gather along one axis with an int64 index array (``np.take`` / ``index_select``)."""

    @abc.abstractmethod
    def astype(self, x: Array, dtype: str) -> Array:
        """``x`` converted to ``dtype`` (no copy if it already has it)."""

    @abc.abstractmethod
    def permute(self, x: Array, axes: Sequence[int]) -> Array:
        """``x`` with its axes reordered, laid out contiguously (the model wants dense inputs)."""

    @abc.abstractmethod
    def clip(self, x: Array, low: Array, high: Array) -> Array:
        """Elementwise ``min(max(x, low), high)``; ``low``/``high`` broadcast against ``x``."""

    @abc.abstractmethod
    def to_torch(self, x: Array) -> Any:
        """``x`` as a torch tensor on its own device, sharing memory (the model's input; no copy)."""

    def stack_frames(self, frames: Sequence[np.ndarray]) -> Array:
        """Host arrays of one shape and dtype (a batch's decoded frames) as one (N, ...) array on ``device``.

        Here: stack on the host, then ``asarray``. A device backend overrides it to
        gather the frames straight into its pinned upload buffer, which saves a
        host copy of the whole batch: that copy was half of CuPy's preprocessing
        time for 64 frames on an H100 (docs/benchmarks.md, W2 on a GPU).
        """
        frames_layout(frames)
        return self.asarray(np.stack(frames))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(device={self.device!r})"


def frames_layout(frames: Sequence[np.ndarray]) -> tuple[tuple[int, ...], np.dtype]:
    """The (N, ...) shape and the dtype of ``frames`` stacked; ValueError unless they share both."""
    if not frames:
        raise ValueError("no frames to stack")
    first = frames[0]
    for i, frame in enumerate(frames):
        if frame.shape != first.shape or frame.dtype != first.dtype:
            raise ValueError(
                f"frame {i} is {frame.dtype} {frame.shape}, frame 0 is {first.dtype} {first.shape}: "
                "frames stacked together need one shape and dtype"
            )
    return (len(frames), *first.shape), first.dtype


class NumpyBackend(ArrayBackend):
    """Host arrays. What CPU serving uses: torch later wraps the result without a copy."""

    name = "numpy"

    def __init__(self, device: str = "cpu"):
        if device != "cpu":
            raise ValueError(f"the numpy backend only runs on 'cpu', not {device!r}")
        self.device = "cpu"

    def asarray(self, x: Any, dtype: str | None = None) -> np.ndarray:
        # np.asarray on a CPU torch tensor is a zero-copy view (torch implements __array__).
        return np.asarray(x, dtype=dtype)

    def to_host(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)

    def zeros(self, shape: Sequence[int], dtype: str) -> np.ndarray:
        return np.zeros(tuple(shape), dtype=dtype)

    def take(self, x: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
        return np.take(x, indices, axis=axis)

    def astype(self, x: np.ndarray, dtype: str) -> np.ndarray:
        return x.astype(dtype, copy=False)

    def permute(self, x: np.ndarray, axes: Sequence[int]) -> np.ndarray:
        return np.ascontiguousarray(np.transpose(x, tuple(axes)))

    def clip(self, x: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
        return np.clip(x, low, high)

    def to_torch(self, x: np.ndarray) -> Any:
        import torch

        if not x.flags.writeable:
            x = x.copy()  # torch refuses to alias read-only memory (decoded request bytes)
        return torch.as_tensor(x)


class TorchBackend(ArrayBackend):
    """Torch tensors on any device string ("cpu", "cuda", "cuda:1", ...)."""

    name = "torch"

    def __init__(self, device: str = "cpu"):
        import torch  # imported here so numpy-only users (clients) never pay for torch

        self._torch = torch
        self.device = str(torch.device(device))
        self._dtypes = {name: getattr(torch, name) for name in DTYPES}

    def asarray(self, x: Any, dtype: str | None = None) -> Any:
        torch = self._torch
        if isinstance(x, np.ndarray) and not x.flags.writeable:
            # Decoded frames are read-only views of request bytes; torch refuses to alias those.
            x = x.copy()
        return torch.as_tensor(x, dtype=self._dtypes[dtype] if dtype else None, device=self.device)

    def to_host(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        return self._torch.zeros(tuple(shape), dtype=self._dtypes[dtype], device=self.device)

    def take(self, x: Any, indices: Any, axis: int) -> Any:
        return self._torch.index_select(x, axis, indices)

    def astype(self, x: Any, dtype: str) -> Any:
        return x.to(self._dtypes[dtype])

    def permute(self, x: Any, axes: Sequence[int]) -> Any:
        return x.permute(*axes).contiguous()

    def clip(self, x: Any, low: Any, high: Any) -> Any:
        return self._torch.clamp(x, low, high)

    def to_torch(self, x: Any) -> Any:
        return x

    def stack_frames(self, frames: Sequence[np.ndarray]) -> Any:
        if not self.device.startswith("cuda"):
            return super().stack_frames(frames)
        torch = self._torch
        shape, dtype = frames_layout(frames)
        # torch's pinned host memory is a caching allocator that records the copy below on its
        # stream, so the buffer is not handed out again before the copy has read it.
        pinned = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype, pin_memory=True)
        np.stack(frames, out=pinned.numpy())
        return pinned.to(self.device, non_blocking=True)


def _cupy_backend(device: str) -> ArrayBackend:
    from serving.processing.cupy_backend import CupyBackend  # here: CuPy is an optional extra

    return CupyBackend(device)


_BACKENDS: dict[str, Callable[[str], ArrayBackend]] = {
    "numpy": NumpyBackend,
    "torch": TorchBackend,
    "cupy": _cupy_backend,  # devices "cuda" / "cuda:N"; raises CupyUnavailable without CuPy or a device
}


def get_backend(name: str, device: str = "cpu") -> ArrayBackend:
    """The backend called ``name`` ("numpy", "torch" or "cupy") placed on ``device``."""
    cls = _BACKENDS.get(name)
    if cls is None:
        raise ValueError(f"unknown array backend {name!r}; available: {sorted(_BACKENDS)}")
    return cls(device)


def resolve_backend_name(name: str | None, device: str) -> str:
    """The array backend to use on ``device``: ``name`` itself, or for ``None``/"auto" what the node plan says.

    "auto" on a CPU device is numpy without probing anything (host arrays are
    handed to torch as views). On an accelerator it is ``serving.accel.plan``'s
    choice for that device (CuPy where CuPy sees the CUDA/ROCm device, else
    torch), so a policy set up outside a replica picks what a replica would.
    """
    if name not in (None, "auto"):
        return name
    if device.split(":")[0] == "cpu":
        return "numpy"
    from serving import accel  # here: probing imports device plugins and CuPy

    return accel.plan(accel.probe(), accel.AcceleratorOverride(device=device)).array_backend


def backend_for(x: Array) -> ArrayBackend:
    """The backend an existing array belongs to (numpy for ndarrays, torch or cupy on the array's device)."""
    if isinstance(x, np.ndarray):
        return NumpyBackend()
    device = getattr(x, "device", None)
    if device is not None and type(x).__module__.startswith("torch"):
        return TorchBackend(str(device))
    if device is not None and type(x).__module__.startswith("cupy"):
        from serving.processing.cupy_backend import backend_for_device

        return backend_for_device(device.id)
    raise TypeError(f"no array backend for {type(x).__name__}")


def to_torch(x: Array) -> Any:
    """Any backend array as a torch tensor on the same device, without a copy (see ``ArrayBackend.to_torch``)."""
    if type(x).__module__.startswith("torch"):
        return x
    return backend_for(x).to_torch(x)
