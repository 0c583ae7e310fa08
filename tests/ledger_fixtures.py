"""Ledger fixtures (a pytest plugin, loaded from conftest.py): real SQLite files and a real PostgreSQL.

``ledger_url`` gives each test a fresh, empty ledger on each backend. The
PostgreSQL server is, in order: $SUPERBRAIN_TEST_POSTGRES_URL (what .ci/run
exports), else a throwaway cluster this session starts with tests/pg_cluster.sh
when the server binaries are installed, else the PostgreSQL tests skip (and fail
under CI=true, where they must run).
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

PG_CLUSTER = Path(__file__).with_name("pg_cluster.sh")
POSTGRES_URL_ENV = "SUPERBRAIN_TEST_POSTGRES_URL"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _missing_postgres(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the PostgreSQL ledger tests, but {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL ledger tests skipped: {reason} (set {POSTGRES_URL_ENV} or install postgresql)")


def _server_binaries() -> bool:
    if os.environ.get("PG_BINDIR"):
        return Path(os.environ["PG_BINDIR"], "initdb").exists()
    return bool(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or shutil.which("initdb") is not None


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """Admin URL (may create databases) of a real PostgreSQL server for this session."""
    url = os.environ.get(POSTGRES_URL_ENV)
    if url:
        yield url
        return
    if not _server_binaries():
        _missing_postgres("no PostgreSQL server binaries (initdb) were found")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _missing_postgres("running as root needs runuser to start PostgreSQL as the postgres user")
    # Not under pytest's tmp_path: that is private to root, and the server runs as `postgres`.
    directory = tempfile.mkdtemp(prefix="superbrain-pg-")
    errors = []
    for _ in range(3):  # a free port can be taken between probing and binding: retry on another
        started = subprocess.run(
            ["bash", str(PG_CLUSTER), "start", directory, str(_free_port())],
            capture_output=True,
            text=True,
            timeout=90,
        )
        if started.returncode == 0:
            break
        errors.append(started.stderr.strip()[-2000:])
        subprocess.run(["bash", str(PG_CLUSTER), "stop", directory], capture_output=True, timeout=60)
    else:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail("could not start a throwaway PostgreSQL cluster:\n" + "\n---\n".join(errors), pytrace=False)
    try:
        yield started.stdout.strip().splitlines()[-1]
    finally:
        subprocess.run(["bash", str(PG_CLUSTER), "stop", directory], capture_output=True, timeout=60)


def _with_database(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + dbname))


@pytest.fixture
def postgresql_ledger_url(postgres_server_url: str) -> Iterator[str]:
    """A new, empty database on the test server (dropped afterwards, open connections or not)."""
    import psycopg

    dbname = f"sb_ledger_{secrets.token_hex(6)}"
    with psycopg.connect(postgres_server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{dbname}"')
    try:
        yield _with_database(postgres_server_url, dbname)
    finally:
        with psycopg.connect(postgres_server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@pytest.fixture
def sqlite_ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger' / 'ledger.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh, empty ledger: once per backend."""
    return request.getfixturevalue(f"{request.param}_ledger_url")
