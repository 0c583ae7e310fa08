"""The ops files against the real thing: the app, a real Prometheus, every dashboard and rule query.

The session's app (default model, auth on) serves its node's metrics endpoint;
a real Prometheus (Debian's ``prometheus``) scrapes it every second with the
shipped alert rules loaded. Robots send good calls and the usual mistakes
(unknown embodiment, bad key, a tenant over its rate). Then every PromQL
expression of the Grafana dashboard must return data, and every alert must be
quiet on this healthy cluster.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from serving.client import RobotClient
from serving.client._common import NO_RETRY
from serving.client.errors import SuperbrainError
from serving.config import ServingConfig
from serving.quota.model import Plan
from tests.conftest import issue_tenant_key
from tests.prometheus_support import (
    ALERTS,
    PrometheusServer,
    dashboard_queries,
    require_prometheus,
    rule_expressions,
)

# Accelerator device series exist only where a GPU is; the exporter's own health always does.
DEVICE_METRICS = (
    "superbrain_accelerator_utilization_ratio",
    "superbrain_accelerator_memory_used_bytes",
    "superbrain_accelerator_memory_total_bytes",
    "superbrain_accelerator_temperature_celsius",
    "superbrain_accelerator_power_watts",
    "superbrain_accelerator_info",
)


def _arm_observation(robot: RobotClient) -> dict:
    spec = {e.name: e for model in robot.describe().models for e in model.embodiments}["franka_arm"]
    return {
        "images": {c.name: np.zeros((c.height, c.width, 3), np.uint8) for c in spec.cameras},
        "state": np.zeros(spec.state_dim, np.float32),
        "instruction": "pick up the red cup",
        "embodiment": spec.name,
    }


class Fleet:
    """Robots in threads: steady good calls, and now and then the mistakes robots make."""

    def __init__(self, cfg: ServingConfig, tiny_key: str):
        self.cfg, self.tiny_key = cfg, tiny_key
        self.stop = threading.Event()
        self.ok = 0
        self.errors: dict[str, int] = {}
        self.unexpected: list[BaseException] = []
        self.threads = [threading.Thread(target=self._good, daemon=True) for _ in range(3)]
        self.threads.append(threading.Thread(target=self._mistakes, daemon=True))

    def __enter__(self) -> Fleet:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def _good(self) -> None:
        try:
            with RobotClient(self.cfg.address, timeout=10) as robot:
                obs = _arm_observation(robot)
                while not self.stop.is_set():
                    robot.act(**obs)
                    self.ok += 1
                    time.sleep(0.02)
        except BaseException as err:  # the test checks this list: a good robot must never fail
            self.unexpected.append(err)

    def _mistakes(self) -> None:
        with (
            RobotClient(self.cfg.address, timeout=10, retry=NO_RETRY) as robot,
            RobotClient(self.cfg.address, timeout=10, retry=NO_RETRY, api_key="sb_000000000000_nope") as stranger,
            RobotClient(self.cfg.address, timeout=10, retry=NO_RETRY, api_key=self.tiny_key) as tiny,
        ):
            obs = _arm_observation(robot)
            calls = [
                lambda: robot.act(**{**obs, "embodiment": "made-up-robot"}),
                lambda: stranger.act(**obs),
                lambda: tiny.act(**obs),
                lambda: tiny.act(**obs),
            ]
            while not self.stop.is_set():
                for call in calls:
                    try:
                        call()
                    except SuperbrainError as err:
                        name = type(err).__name__
                        self.errors[name] = self.errors.get(name, 0) + 1
                time.sleep(0.2)


@pytest.fixture(scope="module")
def prometheus(superbrain: ServingConfig) -> Iterator[PrometheusServer]:
    require_prometheus()
    with PrometheusServer([f"127.0.0.1:{superbrain.metrics_port}"], rule_files=[ALERTS]) as prom:
        prom.wait_for_targets()
        yield prom


def test_every_dashboard_query_and_rule_works_against_the_app(superbrain, prometheus) -> None:
    tiny_key = issue_tenant_key(superbrain.resolved_ledger_url, "tiny", Plan(rate_per_s=1, burst=1))
    with Fleet(superbrain, tiny_key) as fleet:
        time.sleep(8)  # a few scrapes with traffic in them
        queries = dashboard_queries(rate_interval="10s")
        assert len(queries) >= 15, "the dashboard lost its panels"
        # Ray's own node metrics come through the same endpoint (one scrape job per node).
        assert prometheus.wait_for('count({job="superbrain", __name__=~"ray_.+"})', timeout=20)
        devices = prometheus.query("sum(superbrain_accelerator_devices)")
        has_gpu = bool(devices) and float(devices[0]["value"][1]) > 0
        empty = []
        for title, expr in queries:
            if not has_gpu and any(name in expr for name in DEVICE_METRICS):
                # No accelerator here: the series must be absent, not wrong. On a GPU node they fill in.
                assert prometheus.query(expr) == [], f"{title}: device data without a device? {expr}"
                continue
            if not prometheus.wait_for(expr, timeout=20):
                empty.append(f"{title}: {expr}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    assert fleet.ok > 0 and not fleet.unexpected, fleet.unexpected
    assert {"NotFound", "Unauthenticated", "ResourceExhausted"} <= set(fleet.errors), fleet.errors

    # Every rule evaluates without error; every recording rule has data; no alert fires.
    groups = prometheus.wait_for_rule_evaluations()
    broken = [
        f"{rule['name']}: {rule.get('lastError')}" for g in groups for rule in g["rules"] if rule.get("health") == "err"
    ]
    assert not broken, broken
    for group, name, expr, is_alert in rule_expressions():
        result = prometheus.query(expr)
        if is_alert:
            assert result == [], f"alert {name} ({group}) would fire on a healthy cluster: {result}"
        elif not has_gpu and any(metric in expr for metric in DEVICE_METRICS):
            continue
        else:
            assert prometheus.wait_for(expr, timeout=20), f"recording rule {name} has no data: {expr}"
    assert prometheus.firing_alerts() == []
