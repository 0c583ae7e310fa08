"""CuPy array backend: the processing kernels on CUDA (and ROCm) devices, plus a fused image kernel.

The generic seam (``asarray``, ``take``, ...) lets every kernel in
serving/processing run unchanged on CuPy arrays. Where CuPy pays beyond that:

- ``resize_normalize``: one ``RawKernel`` launch turns a uint8 (N, H, W, 3) batch
  into the model's normalised float32 (N, 3, h, w) input. The generic path is
  about fifteen launches and several full-size float32 temporaries; the fused
  kernel reads each source byte it needs once and writes each output value once.
- Uploads of frames go through pinned (page-locked) host buffers and run on a
  copy stream, so the copy is a DMA the host does not wait for.
  ``stack_frames`` gathers a batch's separate frames straight into that buffer:
  the host then copies each byte once. Stacking first and staging the stack
  copied it twice, and for 64 camera frames that second 9.6 MB copy cost as much
  as the DMA and the kernel together (H100: 2.3 -> 1.3 ms, docs/benchmarks.md).
- ``to_torch`` hands arrays to the model through DLPack, without a copy.

Importing this module does not import CuPy: it is an optional extra
(``pip install 'superbrain[cuda]'``), and ``CupyBackend()`` says clearly when
it is missing or sees no device.

Streams: kernels run on CuPy's *current* stream (the legacy default stream
unless someone changed it, which is also torch's), like any CuPy operator. The
copy stream is tied to it with events only (no host synchronisation): the copy
starts after the work already queued on the current stream (the destination
memory may have been in use there), and later work on the current stream
waits for the copy.
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serving.processing.backend import ArrayBackend, frames_layout
from serving.processing.image import _axis_plan

#: Host arrays smaller than this are copied directly: staging them costs more than it saves.
STAGING_MIN_BYTES = 64 * 1024
#: Pinned staging buffers used in turn, so filling one overlaps the copy out of the other.
STAGING_SLOTS = 2
#: Threads per block for the fused kernel; it loops (grid-stride) over whatever the grid does not cover.
BLOCK = 256
MAX_BLOCKS = 65535

#: The fused resize + normalise kernel. One thread per output pixel (all three channels).
#:
#: It computes exactly what ``resize_bilinear`` followed by ``normalize_images``
#: computes: the same source indices and float32 weights (``_axis_plan``), the same
#: operations in the same order (rows lerp, columns lerp, then ``x * scale + bias``),
#: each rounded to nearest (the ``__f*_rn`` intrinsics stop the compiler fusing them
#: into FMAs), so the result equals the numpy path bit for bit.
RESIZE_NORMALIZE_SOURCE = r"""
__device__ __forceinline__ float lerp_rn(float a, float b, float w) {
    return __fadd_rn(__fmul_rn(__fsub_rn(b, a), w), a);
}

extern "C" __global__ void resize_normalize_nchw(
    const unsigned char* __restrict__ src,  // (n, in_h, in_w, 3) uint8, C-contiguous
    float* __restrict__ dst,                // (n, 3, out_h, out_w) float32, C-contiguous
    const long long* __restrict__ y_lo, const long long* __restrict__ y_hi, const float* __restrict__ wy,
    const long long* __restrict__ x_lo, const long long* __restrict__ x_hi, const float* __restrict__ wx,
    const float* __restrict__ scale, const float* __restrict__ bias,  // per channel (3)
    const int n, const int in_h, const int in_w, const int out_h, const int out_w)
{
    const long long plane = (long long)out_h * out_w;
    const long long total = plane * n;
    const long long row_bytes = (long long)in_w * 3;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)blockDim.x * gridDim.x) {
        const long long image = i / plane;
        const long long pixel = i - image * plane;
        const int oy = (int)(pixel / out_w);
        const int ox = (int)(pixel - (long long)oy * out_w);
        const unsigned char* frame = src + image * in_h * row_bytes;
        const unsigned char* top = frame + y_lo[oy] * row_bytes;
        const unsigned char* bottom = frame + y_hi[oy] * row_bytes;
        const long long left = x_lo[ox] * 3;
        const long long right = x_hi[ox] * 3;
        const float fy = wy[oy];
        const float fx = wx[ox];
        float* out = dst + image * 3 * plane + pixel;
        for (int c = 0; c < 3; ++c) {
            const float l = lerp_rn((float)top[left + c], (float)bottom[left + c], fy);
            const float r = lerp_rn((float)top[right + c], (float)bottom[right + c], fy);
            out[c * plane] = __fadd_rn(__fmul_rn(lerp_rn(l, r, fx), scale[c]), bias[c]);
        }
    }
}
"""


class CupyUnavailable(RuntimeError):
    """CuPy is not installed, or sees no device; the message says which and what to do."""


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise CupyUnavailable(
            f"the cupy array backend needs CuPy (pip install 'superbrain[cuda]' or cupy for ROCm): {exc}"
        ) from exc
    return cupy


_DEVICE_RE = re.compile(r"^cuda(?::(\d+))?$")


def _device_index(device: str) -> int:
    match = _DEVICE_RE.match(device)
    if match is None:
        raise ValueError(f"the cupy backend runs on CUDA/ROCm devices ('cuda', 'cuda:N'), not {device!r}")
    return int(match.group(1) or 0)


@dataclass
class _StagingSlot:
    buffer: np.ndarray | None = None  # pinned uint8 bytes
    done: Any = None  # cupy.cuda.Event recorded after the last copy out of buffer


class CupyBackend(ArrayBackend):
    """CuPy arrays on one CUDA (or ROCm) device: ``cuda`` or ``cuda:N``."""

    name = "cupy"

    def __init__(self, device: str = "cuda"):
        index = _device_index(device)  # validate before importing anything
        cp = _import_cupy()
        try:
            count = cp.cuda.runtime.getDeviceCount()
        except Exception as exc:  # CUDARuntimeError: no driver or no device
            raise CupyUnavailable(f"cupy {cp.__version__} sees no device: {exc}") from exc
        if index >= count:
            raise CupyUnavailable(f"cupy sees {count} device(s); {device!r} is not one of them")
        self._cp = cp
        self.device = f"cuda:{index}"
        self._device = cp.cuda.Device(index)
        with self._device:
            self._copy_stream = cp.cuda.Stream(non_blocking=True)
        self._slots = [_StagingSlot() for _ in range(STAGING_SLOTS)]
        self._next_slot = 0
        self._staging_lock = threading.Lock()  # the ring is shared by whichever threads preprocess
        self._plans: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        self._kernel = cp.RawKernel(RESIZE_NORMALIZE_SOURCE, "resize_normalize_nchw")

    # -- the seam --------------------------------------------------------------------------------

    def asarray(self, x: Any, dtype: str | None = None) -> Any:
        cp = self._use_device()
        if isinstance(x, cp.ndarray):
            if x.device.id != self._device.id:
                x = cp.asarray(x)  # peer copy onto this backend's device
            return x if dtype is None else x.astype(dtype, copy=False)
        if _is_torch_tensor(x):
            if x.device.type == "cuda":
                out = cp.from_dlpack(x.detach())  # zero-copy; DLPack orders torch's stream before ours
                return out if dtype is None else out.astype(dtype, copy=False)
            x = x.detach().numpy()
        host = np.asarray(x, dtype=dtype)
        if host.nbytes < STAGING_MIN_BYTES:
            return cp.asarray(host)
        return self._upload(host)

    def stack_frames(self, frames: Sequence[np.ndarray]) -> Any:
        """The frames gathered straight into a pinned staging buffer, then one DMA (no ``np.stack`` copy)."""
        shape, dtype = frames_layout(frames)
        if int(np.prod(shape)) * dtype.itemsize < STAGING_MIN_BYTES:
            return self.asarray(np.stack(frames))  # already checked: no need for the base class's check
        self._use_device()
        with self._staging_lock:
            return self._upload_locked(shape, dtype, lambda staged: np.stack(frames, out=staged))

    def to_host(self, x: Any) -> np.ndarray:
        if isinstance(x, np.ndarray):
            return x
        return self._cp.asnumpy(x)

    def zeros(self, shape: Sequence[int], dtype: str) -> Any:
        return self._use_device().zeros(tuple(shape), dtype=dtype)

    def take(self, x: Any, indices: Any, axis: int) -> Any:
        return self._use_device().take(x, indices, axis=axis)

    def astype(self, x: Any, dtype: str) -> Any:
        self._use_device()
        return x.astype(dtype, copy=False)

    def permute(self, x: Any, axes: Sequence[int]) -> Any:
        cp = self._use_device()
        return cp.ascontiguousarray(cp.transpose(x, tuple(axes)))

    def clip(self, x: Any, low: Any, high: Any) -> Any:
        return self._use_device().clip(x, low, high)

    def to_torch(self, x: Any) -> Any:
        import torch

        if isinstance(x, torch.Tensor):
            return x
        # torch passes its current stream to __dlpack__ and CuPy makes it wait for ours.
        return torch.from_dlpack(x)

    # -- fused kernels ---------------------------------------------------------------------------

    def resize_normalize(
        self,
        frames: Any,
        out_h: int,
        out_w: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> Any:
        """uint8 (N, H, W, 3), host or device -> float32 (N, 3, out_h, out_w) on the device, in one launch.

        The same function as ``normalize_images(resize_bilinear(frames, out_h, out_w), mean, std)``.
        """
        cp = self._use_device()
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (one per channel), got {len(mean)} and {len(std)}")
        src = self.asarray(frames)
        if src.dtype != cp.uint8 or src.ndim != 4 or src.shape[3] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3) frames, got {src.dtype} {tuple(src.shape)}")
        src = cp.ascontiguousarray(src)
        n, in_h, in_w, _ = src.shape
        out = cp.empty((n, 3, out_h, out_w), dtype=cp.float32)
        total = n * out_h * out_w
        if total == 0:
            return out
        y_lo, y_hi, wy = self._plan(in_h, out_h)
        x_lo, x_hi, wx = self._plan(in_w, out_w)
        scale, bias = self._affine(tuple(float(m) for m in mean), tuple(float(s) for s in std))
        blocks = min((total + BLOCK - 1) // BLOCK, MAX_BLOCKS)
        self._kernel(
            (blocks,),
            (BLOCK,),
            (src, out, y_lo, y_hi, wy, x_lo, x_hi, wx, scale, bias, *map(np.int32, (n, in_h, in_w, out_h, out_w))),
        )
        return out

    # -- internals -------------------------------------------------------------------------------

    def _use_device(self) -> Any:
        """Make this backend's device current on the calling thread, and return the cupy module.

        CuPy launches on the *current* device, which is per thread; the kernels'
        own operators (``rows -= top``) run between seam calls, so every seam call
        re-asserts the device (cheap when it is already current).
        """
        self._device.use()
        return self._cp

    def _upload(self, host: np.ndarray) -> Any:
        """Host -> device through a pinned staging buffer, on the copy stream (see the module docstring)."""
        with self._staging_lock:
            return self._upload_locked(host.shape, host.dtype, lambda staged: np.copyto(staged, host))

    def _upload_locked(self, shape: tuple[int, ...], dtype: np.dtype, fill: Callable[[np.ndarray], object]) -> Any:
        """A device array of ``shape``/``dtype`` holding what ``fill`` writes into the staging view it is given."""
        cp = self._cp
        nbytes = int(np.prod(shape)) * dtype.itemsize
        slot = self._slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self._slots)
        if slot.done is not None:
            slot.done.synchronize()  # the previous copy out of this buffer has finished reading it
        if slot.buffer is None or slot.buffer.nbytes < nbytes:
            import cupyx

            size = 1 << (nbytes - 1).bit_length()  # powers of two: a few sizes, reused across batches
            slot.buffer = cupyx.empty_pinned((size,), dtype=np.uint8)
        staged = slot.buffer[:nbytes].view(dtype).reshape(shape)
        fill(staged)
        out = cp.empty(shape, dtype=dtype)
        current = cp.cuda.get_current_stream()
        self._copy_stream.wait_event(current.record())
        out.set(staged, stream=self._copy_stream)
        slot.done = self._copy_stream.record()
        current.wait_event(slot.done)
        return out

    def _plan(self, in_size: int, out_size: int) -> tuple[Any, Any, Any]:
        """``_axis_plan`` on the device, cached: the same few (in, out) pairs recur for every batch."""
        key = (in_size, out_size)
        if key not in self._plans:
            lo, hi, weight = _axis_plan(in_size, out_size)
            cp = self._cp
            self._plans[key] = (cp.asarray(lo), cp.asarray(hi), cp.asarray(weight))
        return self._plans[key]

    def _affine(self, mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[Any, Any]:
        scale, bias = affine_constants(mean, std)
        return self._cp.asarray(scale), self._cp.asarray(bias)


@functools.lru_cache(maxsize=16)
def affine_constants(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """float32 per-channel ``scale`` and ``bias`` with ``(x/255 - mean)/std == x * scale + bias``.

    Computed exactly as ``normalize_images`` computes them (float64, then rounded
    to float32), which is what makes the fused kernel agree with it bit for bit.
    """
    mean64 = np.asarray(mean, dtype=np.float64)
    std64 = np.asarray(std, dtype=np.float64)
    scale = (1.0 / (255.0 * std64)).astype(np.float32)
    bias = (-mean64 / std64).astype(np.float32)
    scale.flags.writeable = bias.flags.writeable = False
    return scale, bias


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "__dlpack__")


@functools.cache
def backend_for_device(index: int) -> CupyBackend:
    """One shared backend per device, for ``backend_for(cupy_array)`` (a backend owns a stream and buffers)."""
    return CupyBackend(f"cuda:{index}")
