"""First-run convenience for ``make serve``: a local dev tenant and its key.

On an empty ledger (no tenants at all) ``superbrain serve`` creates tenant
``dev`` and issues it a key, written to ``<state_dir>/dev-api-key`` with mode
0600 and printed once. Later runs find the tenant and only point at the file.
A ledger that already has tenants (a real deployment) is never touched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from serving.config import ServingConfig
from serving.quota.keys import new_key
from serving.quota.model import Plan, Tenant
from serving.quota.store import open_store

DEV_TENANT = "dev"
DEV_KEY_FILE = "dev-api-key"
# Generous enough for local benchmarks and load tests on one machine.
DEV_PLAN = Plan(rate_per_s=20_000, burst=40_000, max_streams=1024)


@dataclass(frozen=True)
class DevKey:
    path: Path
    plaintext: str | None  # only on the run that created it


def dev_key_path(cfg: ServingConfig) -> Path:
    return cfg.state_path / DEV_KEY_FILE


def ensure_dev_tenant(cfg: ServingConfig) -> DevKey | None:
    """Create the dev tenant and key on an empty ledger; None when the ledger has tenants of its own."""
    path = dev_key_path(cfg)
    with open_store(cfg.resolved_ledger_url) as store:
        tenants = store.list_tenants()
        if tenants:
            dev_only = [t.name for t in tenants] == [DEV_TENANT]
            return DevKey(path, None) if dev_only and path.exists() else None
        store.create_tenant(Tenant(DEV_TENANT, DEV_PLAN))
        plaintext, record = new_key(DEV_TENANT, label="make serve dev key")
        store.add_key(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(plaintext + "\n")
    return DevKey(path, plaintext)


def read_dev_key(cfg: ServingConfig) -> str | None:
    """The dev key from its file, for local tools when SUPERBRAIN_API_KEY is unset."""
    try:
        return dev_key_path(cfg).read_text().strip() or None
    except OSError:
        return None
