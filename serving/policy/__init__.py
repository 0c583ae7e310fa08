"""Policies: the contract (``base``) and the backends that implement it.

The contract names are imported eagerly. The backends are imported on first use
(PEP 562 ``__getattr__``), because ``serving.policy.base`` is imported by code
that must not pull in torch: the wire codec, clients, tools.
"""

from __future__ import annotations

import importlib
from typing import Any

from serving.policy.base import CameraSpec, EmbodimentSpec, Policy, PolicyObservation

_LAZY = {
    "VLAPolicy": "serving.policy.vla_policy",
    "NoopPolicy": "serving.policy.noop",
    "load_policy": "serving.policy.loader",
}

__all__ = ["CameraSpec", "EmbodimentSpec", "Policy", "PolicyObservation", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'serving.policy' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
