"""Shared fixtures: one real Ray cluster + Superbrain app per test session (start-up is the slow part)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.config import ServingConfig
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    from serving import launcher

    # Ray workers inherit this, so policies defined under tests/ import in replicas.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    launcher.ensure_ray(None, num_cpus=4)
    try:
        yield
    finally:
        launcher.shutdown()


@pytest.fixture(scope="session")
def superbrain(ray_session: None) -> Iterator[ServingConfig]:
    """The real app (default VLA policy) on a free loopback port."""
    from serving import launcher

    cfg = ServingConfig(
        grpc_port=free_port(),
        policy="default",
        max_batch_size=32,
        batch_wait_timeout_ms=5,
        max_message_mb=4,
        torch_threads=1,
        replica_num_cpus=1,
        app_name="superbrain-test",
    )
    launcher.deploy(cfg)
    yield cfg
    launcher.undeploy(cfg)
