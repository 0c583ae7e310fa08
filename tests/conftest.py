"""Shared fixtures: one real Ray cluster + Superbrain app per test session (start-up is the slow part)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from serving.config import ServingConfig
from serving.quota.model import Plan
from tests.servers import free_port

pytest_plugins = ["tests.ledger_fixtures"]

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


def issue_tenant_key(ledger_url: str, tenant: str, plan: Plan | None = None) -> str:
    """Create ``tenant`` (if new) in the ledger and return a fresh plaintext key for it."""
    from serving.quota.keys import new_key
    from serving.quota.model import Tenant
    from serving.quota.store import open_store

    with open_store(ledger_url) as store:
        if store.get_tenant(tenant) is None:
            store.create_tenant(Tenant(tenant, plan or Plan()))
        plaintext, record = new_key(tenant, label="tests")
        store.add_key(record)
    return plaintext


@pytest.fixture(scope="session")
def superbrain(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServingConfig]:
    """The real app (default VLA policy, auth on) on a free loopback port.

    Its tenant ``fleet`` has room for every test; the key goes into
    SUPERBRAIN_API_KEY, where the SDK picks it up, so every end-to-end test
    passes through authentication, quota and metering.
    """
    from serving import launcher

    state = tmp_path_factory.mktemp("superbrain-state")
    cfg = ServingConfig(
        state_dir=str(state),
        grpc_port=free_port(),
        policy="default",
        max_batch_size=32,
        batch_wait_timeout_ms=5,
        max_message_mb=4,
        torch_threads=1,
        replica_num_cpus=1,
        app_name="superbrain-test",
        metrics_port=free_port(),
    )
    os.environ["SUPERBRAIN_API_KEY"] = issue_tenant_key(
        cfg.resolved_ledger_url, "fleet", Plan(rate_per_s=100_000, burst=100_000, max_streams=1000)
    )
    launcher.deploy(cfg)
    yield cfg
    launcher.undeploy(cfg)
