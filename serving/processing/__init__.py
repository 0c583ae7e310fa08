"""Pre/post-processing kernels, vectorised over the batch.

Every kernel takes an ``ArrayBackend`` (``xp``) instead of calling numpy or torch
directly, so the same code runs on host arrays (CPU serving: no copies into torch
until the model needs them) and on device tensors (GPU serving: decode on host,
ship uint8 frames once, resize and normalise on the device).
"""

from serving.processing.actions import clip_actions, float32_limits, unnormalize_actions
from serving.processing.backend import ArrayBackend, NumpyBackend, TorchBackend, backend_for, get_backend
from serving.processing.image import normalize_images, resize_bilinear, resize_normalize
from serving.processing.text import tokenize

__all__ = [
    "ArrayBackend",
    "NumpyBackend",
    "TorchBackend",
    "backend_for",
    "clip_actions",
    "float32_limits",
    "get_backend",
    "normalize_images",
    "resize_bilinear",
    "resize_normalize",
    "tokenize",
    "unnormalize_actions",
]
