"""Where each stage of a pipelined policy queues its device work: one stream to preprocess, one to run the model.

The engine can overlap two batches (serving/engine.py): batch N+1 is
preprocessed on one thread while batch N runs forward on another. On a CUDA
device that overlap only reaches the device if the two stages queue their work
on different streams; on one stream the device would still run them back to
back. ``CudaStages`` gives each stage its own torch stream (and, when the array
backend is CuPy, the *same* stream as CuPy's current stream, so CuPy kernels,
its pinned uploads and the DLPack hand-off to torch are all ordered on it), and
ties them with an event: the forward stream waits for the event recorded after
the batch's inputs are written, never the host.

Torch and CuPy keep their current stream per thread, so each stage's thread
sets its own and neither disturbs the other.

Memory: tensors written on the preprocess stream and read on the forward stream
must not be reused by the preprocess stream before the forward pass is done
with them. ``keep_for_forward`` tells torch's caching allocator so; CuPy's pool
has no such hook, so the caller keeps the batch alive until its outputs are on
the host (PolicyEngine's forward stage and ``Policy.infer`` both do).

``HostStages`` is the no-op for CPU serving (there is nothing to queue) and for
devices whose stream API is not wired here (MUSA, Ascend): their stages run on
the default stream, which keeps them correct and still overlaps the host-side
work of the two stages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

from serving.processing.backend import ArrayBackend


class HostStages:
    """No streams: every stage's work runs where it is issued, in order."""

    @contextlib.contextmanager
    def preprocess(self) -> Iterator[None]:
        yield

    def record_ready(self) -> Any:
        """An event marking the end of the preprocessing queued so far (None: nothing to wait for)."""
        return None

    @contextlib.contextmanager
    def forward(self, ready: Any = None) -> Iterator[None]:
        yield

    def keep_for_forward(self, tensors: Iterable[Any]) -> None:
        """Tell the allocator that ``tensors`` are still read by the forward stream (a no-op here)."""

    def synchronize(self) -> None:
        """Wait until all queued work is done (after setup: weights and tables are on the device)."""


class CudaStages(HostStages):
    """Two CUDA streams (preprocess, forward) on one device, ordered by events."""

    def __init__(self, device: str, *, with_cupy: bool):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self._pre = torch.cuda.Stream(device=self.device)
        self._fwd = torch.cuda.Stream(device=self.device)
        self._cupy: Any = None
        self._cupy_index = 0
        self._cupy_pre = self._cupy_fwd = None
        if with_cupy:
            import cupy

            self._cupy = cupy

            index = self._pre.device.index if self._pre.device.index is not None else torch.cuda.current_device()
            # The same CUDA streams seen from CuPy: its kernels, copies and DLPack exports then
            # order with torch's work on each stage's stream without any extra synchronisation.
            self._cupy_index = index
            self._cupy_pre = _as_cupy_stream(cupy, self._pre, index)
            self._cupy_fwd = _as_cupy_stream(cupy, self._fwd, index)

    def _enter(self, stack: contextlib.ExitStack, torch_stream: Any, cupy_stream: Any) -> None:
        stack.enter_context(self._torch.cuda.stream(torch_stream))  # switches torch's device too
        if cupy_stream is not None:
            # CuPy refuses a stream of another device; a Device per entry (its context keeps a stack).
            stack.enter_context(self._cupy.cuda.Device(self._cupy_index))
            stack.enter_context(cupy_stream)

    @contextlib.contextmanager
    def preprocess(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            self._enter(stack, self._pre, self._cupy_pre)
            yield

    def record_ready(self) -> Any:
        event = self._torch.cuda.Event()
        event.record(self._pre)
        return event

    @contextlib.contextmanager
    def forward(self, ready: Any = None) -> Iterator[None]:
        if ready is not None:
            self._fwd.wait_event(ready)  # device-side wait: the host goes straight on
        with contextlib.ExitStack() as stack:
            self._enter(stack, self._fwd, self._cupy_fwd)
            yield

    def keep_for_forward(self, tensors: Iterable[Any]) -> None:
        if self._cupy_pre is not None:
            return  # CuPy's memory, not torch's allocator: the caller keeps the batch alive instead
        for tensor in tensors:
            tensor.record_stream(self._fwd)

    def synchronize(self) -> None:
        self._torch.cuda.synchronize(self.device)


def _as_cupy_stream(cupy: Any, stream: Any, index: int) -> Any:
    """A torch CUDA stream as a CuPy stream object (the same stream, not a new one).

    CuPy 14 deprecates ``ExternalStream`` for ``Stream.from_external``, which reads
    the stream through the ``__cuda_stream__`` protocol that torch's streams speak;
    CuPy 13 has only ``ExternalStream``.
    """
    from_external = getattr(getattr(cupy.cuda, "Stream", None), "from_external", None)
    if from_external is not None and hasattr(stream, "__cuda_stream__"):
        return from_external(stream)
    return cupy.cuda.ExternalStream(stream.cuda_stream, index)


def stage_streams(device: str, xp: ArrayBackend) -> HostStages:
    """The stage streams for a policy on ``device`` whose processing runs on ``xp``."""
    if device.split(":")[0] != "cuda":
        return HostStages()
    return CudaStages(device, with_cupy=xp.name == "cupy")
