"""Start and stop the Superbrain app on a Ray cluster (local or existing).

Used by ``superbrain serve``, the benchmark and the end-to-end tests, so all
three run exactly what ``serve run serving.app:build_app`` runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from serving.config import ServingConfig

log = logging.getLogger(__name__)


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Connect to ``address`` or start a local Ray head in this process."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.WARNING}
    kwargs.update(init_kwargs)
    ray.init(address=address, **kwargs)


def deploy(cfg: ServingConfig) -> None:
    """Deploy (or update) the app; returns once every replica is listening."""
    from ray import serve

    from serving.app import build_app

    # Robots talk to the replicas' own gRPC ports, so Serve's HTTP/gRPC proxies
    # would only cost CPU.
    serve.start(proxy_location="Disabled")
    serve.run(build_app(cfg.model_dump()), name=cfg.app_name, route_prefix=None, blocking=False)


def undeploy(cfg: ServingConfig) -> None:
    from ray import serve

    serve.delete(cfg.app_name, _blocking=True)


def shutdown() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
