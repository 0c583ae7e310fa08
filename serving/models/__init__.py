"""The default model (TinyVLA), its embodiments and the checkpoint format.

``serving.models.embodiments`` is plain Python; ``vla`` and ``checkpoint`` need
torch. The torch-backed names below are imported on first use, so importing
this package (or the embodiments) stays cheap for clients and tools.
"""

from __future__ import annotations

import importlib
from typing import Any

from serving.models.embodiments import default_embodiments

_LAZY = {
    "TinyVLA": "serving.models.vla",
    "VLAConfig": "serving.models.vla",
    "Checkpoint": "serving.models.checkpoint",
    "CheckpointError": "serving.models.checkpoint",
    "CheckpointMeta": "serving.models.checkpoint",
    "build_default_model": "serving.models.checkpoint",
    "load_checkpoint": "serving.models.checkpoint",
    "save_checkpoint": "serving.models.checkpoint",
    "write_default_checkpoint": "serving.models.checkpoint",
}

__all__ = ["default_embodiments", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'serving.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
