"""Pick the Policy a server runs from a ``--policy`` spec string.

"default"       VLAPolicy: the checkpoint in ``model_dir`` if given (or the Policy
                class that checkpoint names in ``policy_class``), else the
                default model built from ``seed``
"noop"          NoopPolicy, for measuring serving overhead
"module:Class"  any importable Policy subclass, constructed with ``model_dir=``
                when a model_dir is given, else with no arguments
"""

from __future__ import annotations

import importlib

from serving.policy.base import Policy


def load_policy(spec: str = "default", model_dir: str | None = None, seed: int = 0) -> Policy:
    """Construct the policy named by ``spec`` (see the module docstring)."""
    if spec == "default":
        if model_dir is None:
            from serving.policy.vla_policy import VLAPolicy

            return VLAPolicy(seed=seed)
        return _load_checkpoint_policy(model_dir)
    if spec == "noop":
        from serving.policy.noop import NoopPolicy

        return NoopPolicy()
    if ":" in spec:
        cls = import_policy_class(spec)
        return cls(model_dir=model_dir) if model_dir is not None else cls()
    raise ValueError(f"unknown policy {spec!r}: use 'default', 'noop' or 'module:Class'")


def import_policy_class(spec: str) -> type[Policy]:
    """Import ``"package.module:Class"``; TypeError unless it names a Policy subclass."""
    module_name, sep, attr = spec.partition(":")
    if not (module_name and sep and attr) or ":" in attr:
        raise ValueError(f"policy class must be written 'module:Class', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"cannot import module {module_name!r} for policy {spec!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):  # allow a nested class, "module:Outer.Inner"
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ImportError(f"module {module_name!r} has no attribute {attr!r} (policy {spec!r})") from None
    if not (isinstance(obj, type) and issubclass(obj, Policy)):
        raise TypeError(f"{spec!r} is not a subclass of serving.policy.Policy (got {obj!r})")
    return obj


def _load_checkpoint_policy(model_dir: str) -> Policy:
    from serving.models.checkpoint import read_config

    policy_class = read_config(model_dir).get("policy_class")
    if policy_class:
        return import_policy_class(policy_class)(model_dir=model_dir)
    from serving.policy.vla_policy import VLAPolicy

    return VLAPolicy(model_dir=model_dir)
