"""``superbrain tenants|keys|usage`` against real SQLite and PostgreSQL ledgers."""

from __future__ import annotations

import calendar
import csv
import io
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from serving.cli import main
from serving.quota.keys import hash_key, key_id_of, matches
from serving.quota.model import Plan, Tenant, UsageRecord
from serving.quota.report import CSV_HEADER
from serving.quota.store import open_store

DAY0 = float(calendar.timegm((2026, 11, 21, 0, 0, 0)))
HOUR = 3600.0


def run(capsys: pytest.CaptureFixture[str], command: str, *argv: str) -> tuple[int, str, str]:
    """``superbrain <command> argv...`` in-process (command split like a shell): (exit code, stdout, stderr)."""
    try:
        code = main([*shlex.split(command), *argv])
    except SystemExit as e:  # argparse usage errors
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err


def usage(i: int, tenant: str, at: float, model: str = "vla", status: str = "OK", accel_ms: float = 1.0) -> UsageRecord:
    return UsageRecord(
        id=f"{tenant}-{i}",
        tenant=tenant,
        key_id="k",
        robot_id="r",
        model=model,
        embodiment="franka_arm",
        status=status,
        batch_size=2,
        accel_ms=accel_ms,
        queue_ms=0.1,
        received_at=at,
        finished_at=at + 0.01,
    )


def test_tenants_create_update_list(ledger_url, capsys) -> None:
    db = ("--ledger-url", ledger_url)
    code, out, _ = run(capsys, "tenants create acme --rate 5 --burst 20 --monthly-calls 1000 --models vla,small", *db)
    assert code == 0 and "created tenant acme" in out
    assert run(capsys, "tenants create beta", *db)[0] == 0

    code, out, _ = run(capsys, "tenants update acme --rate 7.5 --max-streams 4", *db)
    assert code == 0 and "updated tenant acme" in out
    with open_store(ledger_url) as store:
        acme = store.get_tenant("acme")
        assert acme.plan == Plan(rate_per_s=7.5, burst=20, monthly_calls=1000, models=("vla", "small"), max_streams=4)
        assert acme.created_at > DAY0 - 400 * 86400
        assert store.get_tenant("beta").plan == Plan()

    assert run(capsys, "tenants update acme --monthly-calls none --models '*'", *db)[0] == 0
    code, out, _ = run(capsys, "tenants list --format json", *db)
    assert code == 0
    listed = json.loads(out)
    assert [t["name"] for t in listed] == ["acme", "beta"]
    assert Plan.from_dict(listed[0]["plan"]) == Plan(rate_per_s=7.5, burst=20, max_streams=4)

    code, out, _ = run(capsys, "tenants list", *db)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["name", "rate/s", "burst"]
    assert lines[2].split()[:3] == ["acme", "7.5", "20"] and lines[3].startswith("beta")


def test_tenant_errors_are_one_line_with_exit_code_1(sqlite_ledger_url, capsys) -> None:
    db = ("--ledger-url", sqlite_ledger_url)
    assert run(capsys, "tenants create acme", *db)[0] == 0
    code, _, err = run(capsys, "tenants create acme", *db)
    assert code == 1
    assert_one_line_error(err, "already exists")
    code, _, err = run(capsys, "tenants update nobody --rate 3", *db)
    assert code == 1
    assert_one_line_error(err, "no tenant 'nobody'")
    code, _, err = run(capsys, "tenants update acme", *db)
    assert code == 1
    assert_one_line_error(err, "nothing to change")
    code, _, err = run(capsys, "tenants create 'Bad Name!'", *db)
    assert code == 1
    assert_one_line_error(err, "tenant name")
    code, _, err = run(capsys, "tenants create zeta --burst 0", *db)
    assert code == 1
    assert_one_line_error(err, "burst must be >= 1")
    # Usage errors are argparse's: exit code 2.
    assert run(capsys, "tenants create", *db)[0] == 2
    assert run(capsys, "tenants create zeta --rate fast", *db)[0] == 2
    # A bad ledger URL names the accepted forms and never echoes a password.
    code, _, err = run(capsys, "tenants list --ledger-url mysql://admin:hunter2@db/ledger")
    assert code == 1
    assert_one_line_error(err, "sqlite:///", "postgresql://")
    assert "hunter2" not in err


def test_keys_issue_revoke_list(ledger_url, capsys, tmp_path) -> None:
    db = ("--ledger-url", ledger_url)
    assert run(capsys, "tenants create acme", *db)[0] == 0

    code, out, err = run(capsys, "keys issue --tenant acme --label fleet-1", *db)
    assert code == 0
    plaintext = out.strip()
    key_id = key_id_of(plaintext)
    assert key_id is not None and "only time" in err and plaintext not in err
    with open_store(ledger_url) as store:
        record = store.get_key(key_id)
        assert record.tenant == "acme" and record.label == "fleet-1" and not record.revoked
        assert record.secret_hash == hash_key(plaintext) and matches(plaintext, record)

    key_file = tmp_path / "acme.key"
    code, out, err = run(capsys, "keys issue --tenant acme --out", str(key_file), *db)
    assert code == 0
    second_id = out.strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_id_of(key_file.read_text().strip()) == second_id and "sb_" not in out
    code, _, err = run(capsys, "keys issue --tenant acme --out", str(key_file), *db)
    assert code == 1
    assert_one_line_error(err, "refusing to overwrite")
    code, _, err = run(capsys, "keys issue --tenant nobody --out", str(tmp_path / "n.key"), *db)
    assert code == 1
    assert_one_line_error(err, "no tenant 'nobody'")
    assert not (tmp_path / "n.key").exists()

    code, out, _ = run(capsys, "keys revoke", key_id, *db)
    assert code == 0 and f"revoked key {key_id}" in out
    with open_store(ledger_url) as store:
        revoked_at = store.get_key(key_id).revoked_at
    code, out, _ = run(capsys, "keys revoke", key_id, *db)
    assert code == 0 and "already revoked" in out
    with open_store(ledger_url) as store:
        assert store.get_key(key_id).revoked_at == revoked_at
    code, _, err = run(capsys, "keys revoke ffffffffffff", *db)
    assert code == 1
    assert_one_line_error(err, "no key")

    code, out, _ = run(capsys, "keys list --tenant acme --format json", *db)
    assert code == 0
    listed = {k["key_id"]: k for k in json.loads(out)}
    assert set(listed) == {key_id, second_id}
    assert listed[key_id]["revoked_at"] is not None and listed[second_id]["revoked_at"] is None
    assert listed[key_id]["label"] == "fleet-1"
    assert record.secret_hash not in out and "hash" not in out
    code, out, _ = run(capsys, "keys list", *db)
    assert code == 0 and out.splitlines()[0].split() == ["key_id", "tenant", "label", "created", "revoked"]
    assert key_id in out and record.secret_hash not in out
    code, _, err = run(capsys, "keys list --tenant nobody", *db)
    assert code == 1
    assert_one_line_error(err, "no tenant")


def test_usage_report_csv_matches_the_ledger(ledger_url, capsys) -> None:
    db = ("--ledger-url", ledger_url)
    records = [usage(i, "acme", DAY0 + i * 600, accel_ms=0.5) for i in range(12)]  # 2 hours of calls
    records += [usage(100 + i, "acme", DAY0 + 1800, "small", "INTERNAL", accel_ms=1.25) for i in range(3)]
    records += [usage(i, "beta", DAY0 + 86400 + i, accel_ms=2.0) for i in range(5)]  # the next day
    records += [usage(99, "beta", DAY0 + 2 * 86400, accel_ms=50.0)]  # at --to: excluded
    with open_store(ledger_url) as store:
        store.create_tenant(Tenant("acme"))
        store.create_tenant(Tenant("beta"))
        store.insert_usage(records)

    code, out, _ = run(capsys, "usage report --from 2026-11-21 --to 2026-11-23 --by hour --format csv", *db)
    assert code == 0
    parsed = list(csv.reader(io.StringIO(out)))
    assert tuple(parsed[0]) == CSV_HEADER
    rows = [dict(zip(CSV_HEADER, r, strict=True)) for r in parsed[1:]]
    assert [(r["tenant"], r["window_start"], r["model"], r["calls"], r["errors"], r["accel_ms"]) for r in rows] == [
        ("acme", "2026-11-21T00:00:00Z", "small", "3", "3", "3.750"),
        ("acme", "2026-11-21T00:00:00Z", "vla", "6", "0", "3.000"),
        ("acme", "2026-11-21T01:00:00Z", "vla", "6", "0", "3.000"),
        ("beta", "2026-11-22T00:00:00Z", "vla", "5", "0", "10.000"),
    ]
    assert rows[0]["window_end"] == "2026-11-21T01:00:00Z"
    assert sum(int(r["calls"]) for r in rows) == len(records) - 1
    assert sum(float(r["accel_ms"]) for r in rows) == pytest.approx(sum(r.accel_ms for r in records) - 50.0)

    code, out, _ = run(
        capsys, "usage report --tenant acme --from 2026-11-21T00:30:00Z --to 2026-11-22 --by model --format json", *db
    )
    assert code == 0
    assert [(r["model"], r["calls"], r["window_start"]) for r in json.loads(out)] == [
        ("small", 3, "2026-11-21T00:30:00Z"),
        ("vla", 9, "2026-11-21T00:30:00Z"),
    ]

    code, out, _ = run(capsys, "usage report --from 2026-11-21 --to 2026-11-23", *db)
    assert code == 0
    total = out.strip().splitlines()[-1].split()
    assert total[0] == "total" and total[-3:] == ["20", "3", "19.750"]


def test_usage_report_errors(sqlite_ledger_url, capsys) -> None:
    db = ("--ledger-url", sqlite_ledger_url)
    code, _, err = run(capsys, "usage report --from 21/11/2026 --to 2026-11-23", *db)
    assert code == 1
    assert_one_line_error(err, "bad date '21/11/2026'")
    code, _, err = run(capsys, "usage report --from 2026-11-23 --to 2026-11-21", *db)
    assert code == 1
    assert_one_line_error(err, "must be after")
    code, _, err = run(capsys, "usage report --tenant nobody --from 2026-11-21 --to 2026-11-23", *db)
    assert code == 1
    assert_one_line_error(err, "no tenant")
    assert run(capsys, "usage report --from 2026-11-21", *db)[0] == 2
    assert run(capsys, "usage report --from 2026-11-21 --to 2026-11-22 --by week", *db)[0] == 2


def test_ledger_url_comes_from_config_and_env(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("SUPERBRAIN_CONFIG", raising=False)
    monkeypatch.delenv("SUPERBRAIN_LEDGER_URL", raising=False)
    monkeypatch.setenv("SUPERBRAIN_STATE_DIR", str(tmp_path / "state"))
    assert run(capsys, "tenants create from-state-dir")[0] == 0
    assert (tmp_path / "state" / "ledger.db").exists()

    monkeypatch.setenv("SUPERBRAIN_LEDGER_URL", f"sqlite:///{tmp_path}/env.db")
    assert run(capsys, "tenants create from-env")[0] == 0
    with open_store(f"sqlite:///{tmp_path}/env.db") as store:
        assert [t.name for t in store.list_tenants()] == ["from-env"]

    config = tmp_path / "serving.yaml"
    config.write_text(f"ledger_url: sqlite:///{tmp_path}/config.db\n")
    monkeypatch.delenv("SUPERBRAIN_LEDGER_URL")
    assert run(capsys, "tenants create from-config --config", str(config))[0] == 0
    code, out, _ = run(capsys, "tenants list --config", str(config), "--format", "json")
    assert code == 0 and [t["name"] for t in json.loads(out)] == ["from-config"]
    # --ledger-url wins over everything.
    code, out, _ = run(capsys, "tenants list --config", str(config), "--ledger-url", f"sqlite:///{tmp_path}/env.db")
    assert code == 0 and "from-env" in out and "from-config" not in out

    code, _, err = run(capsys, "tenants list --config", str(tmp_path / "missing.yaml"))
    assert code == 1
    assert_one_line_error(err, "missing.yaml")


def test_installed_command_prints_the_key_once(sqlite_ledger_url, tmp_path) -> None:
    exe = Path(sys.executable).with_name("superbrain")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "serving.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERBRAIN_")}

    def superbrain(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, *argv, "--ledger-url", sqlite_ledger_url],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )

    assert superbrain("tenants", "create", "acme").returncode == 0
    issued = superbrain("keys", "issue", "--tenant", "acme")
    assert issued.returncode == 0, issued.stderr
    plaintext = issued.stdout.strip()
    assert key_id_of(plaintext) and "only time" in issued.stderr
    failed = superbrain("keys", "issue", "--tenant", "nobody")
    assert failed.returncode == 1 and failed.stdout == ""
    assert_one_line_error(failed.stderr, "no tenant 'nobody'")
