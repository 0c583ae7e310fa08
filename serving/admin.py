"""``superbrain tenants|keys|usage``: manage partners, their API keys, and report usage.

Every command works on the ledger named by ``--ledger-url``, else by the
configuration (``--config`` / SUPERBRAIN_CONFIG, SUPERBRAIN_LEDGER_URL,
SUPERBRAIN_STATE_DIR: see ``ServingConfig.resolved_ledger_url``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from serving.quota.model import ApiKey, Plan, Tenant
from serving.quota.store import LedgerStore, StoreError, iso, open_store

# "not given" for the plan flags, so that `tenants update` changes only what was given.
_UNSET: Any = object()

AdminCommand = Callable[[argparse.Namespace, LedgerStore], int]


class AdminError(Exception):
    """A user error: reported as one line on stderr, exit code 1."""


def _fail(message: str) -> int:
    print(f"superbrain: error: {message}", file=sys.stderr)
    return 1


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def ledger_url(args: argparse.Namespace) -> str:
    if args.ledger_url:
        return args.ledger_url
    from serving.config import load_config

    return load_config(path=args.config).resolved_ledger_url


def _with_store(command: AdminCommand) -> Callable[[argparse.Namespace], int]:
    """Open the ledger for ``command``; user errors become one line on stderr and exit code 1."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        import yaml

        try:
            with open_store(ledger_url(args)) as store:
                return command(args, store)
        except BrokenPipeError:
            # Output piped into `head` and the like: stop quietly, and keep the
            # interpreter's final flush from failing on the closed pipe too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        except (AdminError, StoreError, ValueError, OSError, yaml.YAMLError) as e:
            return _fail(_one_line(e))

    return run


# -- flag types ---------------------------------------------------------------


def _none_or(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "unlimited"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _models(text: str) -> tuple[str, ...]:
    models = tuple(m.strip() for m in text.split(",") if m.strip())
    if not models:
        raise argparse.ArgumentTypeError("give model names separated by commas, or '*'")
    return models


PLAN_FLAGS: dict[str, tuple[str, Callable[[str], Any], str, str]] = {
    # flag: (Plan field, type, metavar, help)
    "--rate": ("rate_per_s", float, "CALLS_PER_S", "sustained calls per second across the tenant's fleet"),
    "--burst": ("burst", int, "N", "calls the fleet may burst to above the rate"),
    "--monthly-calls": ("monthly_calls", _none_or(int), "N", "calls per UTC calendar month ('none': unlimited)"),
    "--monthly-accel-ms": (
        "monthly_accel_ms",
        _none_or(float),
        "MS",
        "accelerator milliseconds per UTC calendar month ('none': unlimited)",
    ),
    "--models": ("models", _models, "a,b|*", "models the tenant may call: 'a,b' or '*' for all"),
    "--max-streams": ("max_streams", int, "N", "concurrent ActStream sessions across the cluster"),
}


def _plan_changes(args: argparse.Namespace) -> dict[str, Any]:
    out = {}
    for field, *_ in PLAN_FLAGS.values():
        value = getattr(args, field)
        if value is not _UNSET:
            out[field] = value
    return out


def _when(text: str) -> float:
    """``YYYY-MM-DD`` (UTC midnight) or an ISO 8601 datetime (UTC unless it names an offset)."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            dt = datetime.strptime(text, "%Y-%m-%d")
        else:
            dt = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        example = "2026-11-21T13:00:00Z"
        raise AdminError(f"bad date {text!r}: use YYYY-MM-DD or an ISO 8601 datetime such as {example}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _shown(ts: float | None) -> str:
    """A timestamp for a table: ISO 8601 to the second, or '-'."""
    return "-" if ts is None else iso(float(int(ts)))


def _num(v: float | None) -> str:
    if v is None:
        return "unlimited"
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


# -- tenants --------------------------------------------------------------------


def _tenant_json(t: Tenant) -> dict[str, Any]:
    return {"name": t.name, "plan": t.plan.to_dict(), "created_at": iso(t.created_at)}


def _describe_plan(p: Plan) -> str:
    return (
        f"rate {_num(p.rate_per_s)}/s, burst {p.burst}, monthly calls {_num(p.monthly_calls)}, "
        f"monthly accel ms {_num(p.monthly_accel_ms)}, models {','.join(p.models)}, max streams {p.max_streams}"
    )


@_with_store
def cmd_tenants_create(args: argparse.Namespace, store: LedgerStore) -> int:
    tenant = Tenant(name=args.name, plan=Plan(**_plan_changes(args)), created_at=time.time())
    store.create_tenant(tenant)
    print(f"created tenant {tenant.name}: {_describe_plan(tenant.plan)}")
    return 0


@_with_store
def cmd_tenants_update(args: argparse.Namespace, store: LedgerStore) -> int:
    changes = _plan_changes(args)
    if not changes:
        raise AdminError(f"nothing to change: give at least one of {', '.join(PLAN_FLAGS)}")
    current = store.get_tenant(args.name)
    if current is None:
        raise AdminError(f"no tenant {args.name!r}")
    tenant = store.update_tenant(args.name, replace(current.plan, **changes))
    print(f"updated tenant {tenant.name}: {_describe_plan(tenant.plan)}")
    return 0


@_with_store
def cmd_tenants_list(args: argparse.Namespace, store: LedgerStore) -> int:
    from serving.quota.report import format_table

    tenants = store.list_tenants()
    if args.format == "json":
        print(json.dumps([_tenant_json(t) for t in tenants], indent=2))
        return 0

    header = ("name", "rate/s", "burst", "monthly_calls", "monthly_accel_ms", "models", "max_streams", "created")
    rows = [
        (
            t.name,
            _num(t.plan.rate_per_s),
            str(t.plan.burst),
            _num(t.plan.monthly_calls),
            _num(t.plan.monthly_accel_ms),
            ",".join(t.plan.models),
            str(t.plan.max_streams),
            _shown(t.created_at),
        )
        for t in tenants
    ]
    sys.stdout.write(format_table(header, rows, numeric=(1, 2, 3, 4, 6)))
    return 0


# -- keys -----------------------------------------------------------------------


def _key_json(k: ApiKey) -> dict[str, Any]:
    # Never the hash: listings are for people and scripts, not for verifying keys.
    return {
        "key_id": k.key_id,
        "tenant": k.tenant,
        "label": k.label,
        "created_at": iso(k.created_at),
        "revoked_at": None if k.revoked_at is None else iso(k.revoked_at),
    }


@_with_store
def cmd_keys_issue(args: argparse.Namespace, store: LedgerStore) -> int:
    from serving.quota.keys import new_key

    plaintext, record = new_key(args.tenant, label=args.label)
    if args.out is None:
        store.add_key(record)
        print(plaintext)
        print(
            f"issued key {record.key_id} for tenant {record.tenant}: this is the only time it is shown; "
            "store it securely now.",
            file=sys.stderr,
        )
        return 0
    # Create the file first (exclusively, owner-only), so a key is never stored that
    # could not be handed over, and an existing file is never overwritten.
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AdminError(f"{args.out} exists; refusing to overwrite it") from None
    try:
        os.fchmod(fd, 0o600)
        store.add_key(record)
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(plaintext + "\n")
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(args.out)
        raise
    print(record.key_id)
    print(f"wrote the key for tenant {record.tenant} to {args.out} (mode 0600)", file=sys.stderr)
    return 0


@_with_store
def cmd_keys_revoke(args: argparse.Namespace, store: LedgerStore) -> int:
    before = store.get_key(args.key_id)
    if before is None:
        raise AdminError(f"no key {args.key_id!r}")
    key = store.revoke_key(args.key_id)
    if before.revoked:
        print(f"key {key.key_id} (tenant {key.tenant}) was already revoked at {iso(key.revoked_at or 0)}")
    else:
        print(f"revoked key {key.key_id} (tenant {key.tenant}) at {iso(key.revoked_at or 0)}")
    return 0


@_with_store
def cmd_keys_list(args: argparse.Namespace, store: LedgerStore) -> int:
    from serving.quota.report import format_table

    if args.tenant is not None and store.get_tenant(args.tenant) is None:
        raise AdminError(f"no tenant {args.tenant!r}")
    keys = store.list_keys(args.tenant)
    if args.format == "json":
        print(json.dumps([_key_json(k) for k in keys], indent=2))
        return 0
    rows = [(k.key_id, k.tenant, k.label, _shown(k.created_at), _shown(k.revoked_at)) for k in keys]
    sys.stdout.write(format_table(("key_id", "tenant", "label", "created", "revoked"), rows))
    return 0


# -- usage ----------------------------------------------------------------------


@_with_store
def cmd_usage_report(args: argparse.Namespace, store: LedgerStore) -> int:
    from serving.quota.report import format_report

    since, until = _when(args.from_), _when(args.to)
    if until <= since:
        raise AdminError(f"--to ({args.to}) must be after --from ({args.from_}); --to is exclusive")
    if args.tenant is not None and store.get_tenant(args.tenant) is None:
        raise AdminError(f"no tenant {args.tenant!r}")
    rows = store.usage_report(args.tenant, since, until, args.by)
    sys.stdout.write(format_report(rows, args.format))
    return 0


# -- the parsers ----------------------------------------------------------------


def add_admin_commands(sub: argparse._SubParsersAction) -> None:
    """Register ``tenants``, ``keys`` and ``usage`` on the ``superbrain`` subcommand parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help="YAML file with ServingConfig fields (env: SUPERBRAIN_CONFIG)")
    common.add_argument(
        "--ledger-url",
        help="ledger store: sqlite:///path.db or postgresql://user@host/db "
        "(default: the config's ledger_url, env SUPERBRAIN_LEDGER_URL, else SQLite in state_dir)",
    )

    def plan_flags(parser: argparse.ArgumentParser) -> None:
        for flag, (field, kind, metavar, help_text) in PLAN_FLAGS.items():
            parser.add_argument(flag, dest=field, type=kind, metavar=metavar, default=_UNSET, help=help_text)

    def fmt_flag(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--format", choices=["table", "json"], default="table")

    tenants = sub.add_parser("tenants", help="create, update and list partner tenants and their plans")
    tenants_sub = tenants.add_subparsers(dest="tenants_command", required=True)
    create = tenants_sub.add_parser("create", parents=[common], help="add a tenant (plan flags default to Plan())")
    create.add_argument("name", help="tenant id: 1-63 of a-z, 0-9, '-', '_'")
    plan_flags(create)
    create.set_defaults(func=cmd_tenants_create)
    update = tenants_sub.add_parser("update", parents=[common], help="change a tenant's plan (only the given flags)")
    update.add_argument("name")
    plan_flags(update)
    update.set_defaults(func=cmd_tenants_update)
    tlist = tenants_sub.add_parser("list", parents=[common], help="list tenants and their plans")
    fmt_flag(tlist)
    tlist.set_defaults(func=cmd_tenants_list)

    keys = sub.add_parser("keys", help="issue, revoke and list API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    issue = keys_sub.add_parser("issue", parents=[common], help="issue a key (printed once; only its hash is kept)")
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--label", default="", help="a note, e.g. which fleet or site uses the key")
    issue.add_argument("--out", help="write the key to this new file (mode 0600) and print only its id")
    issue.set_defaults(func=cmd_keys_issue)
    revoke = keys_sub.add_parser("revoke", parents=[common], help="revoke a key (takes effect cluster-wide)")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=cmd_keys_revoke)
    klist = keys_sub.add_parser("list", parents=[common], help="list keys (ids and labels, never secrets)")
    klist.add_argument("--tenant")
    fmt_flag(klist)
    klist.set_defaults(func=cmd_keys_list)

    usage = sub.add_parser("usage", help="usage reports and billing exports")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True)
    report = usage_sub.add_parser("report", parents=[common], help="calls, errors and accelerator ms per window")
    report.add_argument("--tenant")
    report.add_argument("--from", dest="from_", required=True, metavar="DATE", help="YYYY-MM-DD (UTC) or ISO 8601")
    report.add_argument("--to", required=True, metavar="DATE", help="exclusive end: YYYY-MM-DD (UTC) or ISO 8601")
    report.add_argument("--by", choices=["hour", "day", "model"], default="day")
    report.add_argument("--format", choices=["table", "csv", "json"], default="table")
    report.set_defaults(func=cmd_usage_report)
