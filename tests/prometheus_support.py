"""A real Prometheus for tests, and the PromQL our dashboard and alert rules ship.

Ops files are only worth something if their queries work against what the app
really exports, so tests start the Debian ``prometheus`` binary on loopback,
let it scrape the app, and evaluate every dashboard and rule expression through
Prometheus' HTTP API. Everything here uses the standard library (urllib) and
PyYAML, so the harness adds no dependency.

Typical use::

    prometheus_bin = require_prometheus()
    with PrometheusServer([f"127.0.0.1:{metrics_port}"], rule_files=[ALERTS]) as prom:
        prom.wait_for_targets()
        ... drive traffic ...
        for title, expr in dashboard_queries(DASHBOARD, rate_interval="15s"):
            assert prom.wait_for(expr, timeout=20), title
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy/grafana/dashboards/superbrain.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERTS_TEST = ROOT / "deploy/prometheus/alerts_test.yml"

JOB = "superbrain"
# Where the Debian package puts them; $SUPERBRAIN_PROMETHEUS / $SUPERBRAIN_PROMTOOL override.
_DEFAULT_BINARIES = {"prometheus": "/usr/bin/prometheus", "promtool": "/usr/bin/promtool"}


class PrometheusError(RuntimeError):
    """Prometheus answered with an error (bad PromQL, failed evaluation) or not at all."""


# ------------------------------------------------------------------ binaries


def _binary(name: str) -> str | None:
    override = os.environ.get(f"SUPERBRAIN_{name.upper()}")
    if override:
        return override if os.access(override, os.X_OK) else None
    found = shutil.which(name)
    if found:
        return found
    default = _DEFAULT_BINARIES[name]
    return default if os.access(default, os.X_OK) else None


def prometheus_binary() -> str | None:
    """Path of the ``prometheus`` server binary, or None when it is not installed."""
    return _binary("prometheus")


def promtool_binary() -> str | None:
    """Path of ``promtool`` (rule checks and rule unit tests), or None when it is not installed."""
    return _binary("promtool")


def _require(name: str, path: str | None) -> str:
    import pytest

    if path is not None:
        return path
    reason = f"{name} is not installed (apt-get install --no-install-recommends prometheus)"
    if os.environ.get("CI") == "true":
        # CI installs the package (.ci/run); a silent skip there would hide broken ops files.
        pytest.fail(f"CI must run the Prometheus tests, but {reason}", pytrace=False)
    pytest.skip(f"Prometheus tests skipped: {reason}")


def require_prometheus() -> str:
    """The prometheus binary's path; skips the test without it (fails under CI=true, where it must run)."""
    return _require("prometheus", prometheus_binary())


def require_promtool() -> str:
    """The promtool binary's path; skips the test without it (fails under CI=true, where it must run)."""
    return _require("promtool", promtool_binary())


# ------------------------------------------------------------------ server


def free_port() -> int:
    """A TCP port free on loopback right now (the caller binds it soon after; races are retried)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusServer:
    """A throwaway Prometheus on 127.0.0.1 scraping ``targets`` as job "superbrain".

    ``targets`` are "host:port" strings; ``rule_files`` are loaded as they are, so
    the shipped alerts.yml can be evaluated unchanged. Intervals default to 1 s so a
    test sees rates and rule results within seconds. Config, TSDB and the server's
    log live in a temp dir removed on exit; ``log_tail()`` quotes the log in errors.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        rule_files: Iterable[str | os.PathLike[str]] = (),
        job: str = JOB,
        metrics_path: str = "/metrics",
        scrape_interval: str = "1s",
        evaluation_interval: str = "1s",
        binary: str | None = None,
        startup_timeout: float = 30.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.scrape_targets = list(targets)
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.job = job
        self.metrics_path = metrics_path
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval
        self.binary = binary or prometheus_binary()
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.port: int | None = None
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None

    # -- lifecycle

    def config(self) -> dict[str, Any]:
        """The prometheus.yml this server runs with (also handy to print when a test fails)."""
        return {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.evaluation_interval},
            "rule_files": self.rule_files,
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "scrape_timeout": self.scrape_interval,
                    "static_configs": [{"targets": self.scrape_targets}],
                }
            ],
        }

    def start(self) -> PrometheusServer:
        """Start the server and wait until /-/ready answers; retries on a port lost to a race."""
        if self.binary is None:
            raise PrometheusError("the prometheus binary is not installed")
        self._tmp = tempfile.TemporaryDirectory(prefix="superbrain-prometheus-")
        tmp = Path(self._tmp.name)
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self._log_path = tmp / "prometheus.log"
        last_error = ""
        for _attempt in range(3):
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            log = self._log_path.open("ab")
            try:
                self._proc = subprocess.Popen(
                    [
                        self.binary,
                        f"--config.file={config_path}",
                        f"--storage.tsdb.path={tmp / 'data'}",
                        f"--web.listen-address=127.0.0.1:{self.port}",
                        "--log.level=warn",
                        *self.extra_args,
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            finally:
                log.close()
            try:
                self._wait_ready()
                return self
            except PrometheusError as exc:
                last_error = str(exc)
                self._stop_process()
                if "address already in use" not in self.log_tail():
                    break
        self.stop()
        raise PrometheusError(f"prometheus did not start: {last_error}")

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PrometheusError(f"exited with {self._proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        raise PrometheusError(f"not ready after {self.startup_timeout} s:\n{self.log_tail()}")

    def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def stop(self) -> None:
        """Stop the server (terminate, then kill) and remove its temp dir."""
        self._stop_process()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> PrometheusServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's own log (why it refused a config, failed a scrape...)."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        return self._log_path.read_text(errors="replace")[-chars:]

    # -- HTTP API

    def _api(self, path: str, params: Mapping[str, str] | None = None, *, what: str = "") -> Any:
        """GET (or POST, for queries) an /api/v1 endpoint and return its ``data``; raise on error status."""
        if not self.url:
            raise PrometheusError("the server is not running")
        url = f"{self.url}/api/v1/{path}"
        data = urllib.parse.urlencode(params).encode() if params else None
        request = urllib.request.Request(url, data=data, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            # 400/422/503 carry {"status": "error", "errorType": ..., "error": ...}.
            try:
                body = json.loads(exc.read())
            except ValueError:
                raise PrometheusError(f"{what or path}: HTTP {exc.code}") from exc
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            raise PrometheusError(f"{what or path}: {exc}") from exc
        if body.get("status") != "success":
            raise PrometheusError(f"{what or path}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Evaluate ``expr`` now (or at unix time ``at``); return the samples as ``[{"metric", "value"}]``.

        A scalar or string result comes back as one sample with no labels, so a caller
        can always test ``if prom.query(...)`` for "returned data".
        """
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        data = self._api("query", params, what=f"query {expr!r}")
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def wait_for(self, expr: str, timeout: float = 30.0, interval: float = 0.5) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns data; raise TimeoutError (with the last answer) if it never does.

        Scrapes and rule evaluations happen every interval, so a fresh series takes a
        moment to appear; rates need two scrapes.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no data for {expr!r} after {timeout} s")
            time.sleep(interval)

    def targets(self) -> list[dict[str, Any]]:
        """Active scrape targets (labels, health "up"/"down", lastError)."""
        return self._api("targets", what="targets")["activeTargets"]

    def wait_for_targets(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every configured target has been scraped successfully at least once.

        Prometheus hands discovered targets to its scrapers in 5 s batches, so the
        first scrape lands 5 to 6 s after start-up whatever the scrape interval.
        """
        deadline = time.monotonic() + timeout
        while True:
            active = [t for t in self.targets() if t["labels"].get("job") == self.job]
            if len(active) >= len(self.scrape_targets) and all(t["health"] == "up" for t in active):
                return active
            if time.monotonic() >= deadline:
                states = [(t["scrapeUrl"], t["health"], t.get("lastError")) for t in active]
                raise TimeoutError(f"targets not up after {timeout} s: {states}")
            time.sleep(0.25)

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (GET /api/v1/alerts): each has labels, annotations, state pending|firing, value."""
        return self._api("alerts", what="alerts")["alerts"]

    def firing_alerts(self) -> list[str]:
        """Names of the alerts firing now (pending ones are still inside their ``for``)."""
        return sorted({a["labels"]["alertname"] for a in self.alerts() if a["state"] == "firing"})

    def rule_groups(self) -> list[dict[str, Any]]:
        """Loaded rule groups with each rule's health, lastError and (for alerts) state."""
        return self._api("rules", what="rules")["groups"]

    def wait_for_rule_evaluations(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every loaded rule has been evaluated once; raise if one of them failed.

        A rule whose expression errors at run time (e.g. many-to-many matching on
        the real label sets) shows health "err" here although promtool accepted it.
        """
        deadline = time.monotonic() + timeout
        while True:
            groups = self.rule_groups()
            rules = [r for g in groups for r in g["rules"]]
            bad = [(r["name"], r.get("lastError")) for r in rules if r.get("health") == "err"]
            if bad:
                raise PrometheusError(f"rules failed to evaluate: {bad}")
            if rules and all(r.get("health") == "ok" for r in rules):
                return groups
            if time.monotonic() >= deadline:
                raise TimeoutError(f"rules not evaluated after {timeout} s: {[r['name'] for r in rules]}")
            time.sleep(0.25)


# ------------------------------------------------------------------ expressions

_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<metric>.+?)\s*,\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


def _panels(panels: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def expand_grafana_variables(expr: str, variables: Mapping[str, str]) -> str:
    """Substitute ``$name``, ``${name}`` and ``${name:format}`` with ``variables[name]``.

    Longer names go first so that ``$__rate_interval`` is not read as ``$__rate`` + text.
    Unknown variables are left alone (and then fail to parse, which is what a test wants).
    """
    for name in sorted(variables, key=len, reverse=True):
        value = variables[name]
        expr = re.sub(r"\$\{" + re.escape(name) + r"(?::[^}]*)?\}", lambda _m, v=value: v, expr)
        expr = re.sub(r"\$" + re.escape(name) + r"(?![A-Za-z0-9_])", lambda _m, v=value: v, expr)
    return expr


def dashboard_queries(
    path: str | os.PathLike[str] = DASHBOARD,
    variables: Mapping[str, str] | None = None,
    *,
    rate_interval: str = "1m",
    interval: str = "15s",
    range_: str = "1h",
    include_variable_queries: bool = True,
) -> list[tuple[str, str]]:
    """``(panel title, PromQL)`` for every target of every panel, with Grafana's variables filled in.

    ``variables`` defaults to "All" (``.*``) for model and tenant and "prometheus" for
    the datasource; ``$__rate_interval``, ``$__interval`` and ``$__range`` get the given
    durations (pick ``rate_interval`` of at least four scrape intervals). The templating
    variables' ``label_values(metric, label)`` queries are Grafana-only syntax; they come
    back as ``group by (label) (metric)``, titled "variable <name>", which returns data
    exactly when the variable would have options.
    """
    dashboard = json.loads(Path(path).read_text())
    values = {"model": ".*", "tenant": ".*", "datasource": "prometheus"}
    values.update(variables or {})
    values.update({"__rate_interval": rate_interval, "__interval": interval, "__range": range_})
    queries: list[tuple[str, str]] = []
    if include_variable_queries:
        for var in dashboard.get("templating", {}).get("list", []):
            if var.get("type") != "query":
                continue
            query = var.get("query")
            if isinstance(query, dict):
                query = query.get("query", "")
            match = _LABEL_VALUES.match(query or "")
            expr = f"group by ({match['label']}) ({match['metric']})" if match else query
            queries.append((f"variable {var['name']}", expand_grafana_variables(expr, values)))
    for panel in _panels(dashboard.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((panel.get("title", ""), expand_grafana_variables(target["expr"], values)))
    return queries


def rule_expressions(path: str | os.PathLike[str] = ALERTS) -> list[tuple[str, str, str, bool]]:
    """``(group, rule name, PromQL, is_alert)`` for every recording and alerting rule in a rules file."""
    doc = yaml.safe_load(Path(path).read_text())
    out: list[tuple[str, str, str, bool]] = []
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            is_alert = "alert" in rule
            out.append((group["name"], rule["alert"] if is_alert else rule["record"], rule["expr"].strip(), is_alert))
    return out
