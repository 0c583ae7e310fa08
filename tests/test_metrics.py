"""Metrics: what a node's scrape endpoint reports, across processes, and what the ingress counts.

Real processes (a killed writer really dies, its flock really goes), a real
HTTP endpoint and the real grpc.aio ingress; prometheus_client's own parser
reads the exposition. The app-wide check against a real Prometheus is
tests/test_prometheus_e2e.py.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from serving import metrics as m
from serving.access_log import AccessLog
from serving.client import RobotClient
from serving.client._common import NO_RETRY
from serving.client.errors import NotFound
from tests.policies import ARM, EchoPolicy
from tests.servers import IngressThread, free_port


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Exposition text -> {(sample name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape_dir(directory) -> dict[tuple[str, tuple], float]:
    return samples(generate_latest(m.node_registry(directory, accelerators=False)).decode())


def test_histograms_use_prometheus_le_semantics():
    pm = m.ProcessMetrics()
    for v in (0.001, 0.0011, 0.1, 99.0):
        pm.observe(m.QUEUE_DURATION, ("p",), v)
    (_, labels, values) = pm.snapshot()["histograms"][0]
    buckets = m.QUEUE_DURATION.buckets
    assert values[buckets.index(0.001)] == 1  # exactly on the bound: in that bucket
    assert values[buckets.index(0.0025)] == 1
    assert values[buckets.index(0.1)] == 1
    assert values[len(buckets)] == 1  # +Inf
    assert values[-1] == pytest.approx(0.001 + 0.0011 + 0.1 + 99.0)


def test_a_node_sums_its_processes_and_keeps_the_totals_of_dead_ones(tmp_path):
    a, b = m.ProcessMetrics(), m.ProcessMetrics()
    wa = m.SnapshotWriter(tmp_path, a, interval_s=60).start()
    wb = m.SnapshotWriter(tmp_path, b, interval_s=60).start()
    for pm, n in ((a, 3), (b, 4)):
        for _ in range(n):
            pm.inc(m.REQUESTS, ("vla", "1", "arm", "acme", "OK"))
            pm.observe(m.REQUEST_DURATION, ("vla", "acme"), 0.02)
        pm.set(m.QUEUE_DEPTH, ("vla",), n)
        pm.set(m.REPLICAS_MIN, ("vla",), n)
    wa.write(), wb.write()

    got = scrape_dir(tmp_path)
    req = (
        "superbrain_requests_total",
        (("code", "OK"), ("embodiment", "arm"), ("model", "vla"), ("tenant", "acme"), ("version", "1")),
    )
    assert got[req] == 7
    assert got[("superbrain_queue_depth", (("model", "vla"),))] == 7  # summed
    assert got[("superbrain_replicas_min", (("model", "vla"),))] == 4  # a setting: the max
    lat = (("model", "vla"), ("tenant", "acme"))
    assert got[("superbrain_request_duration_seconds_count", lat)] == 7
    assert got[("superbrain_request_duration_seconds_bucket", (("le", "0.025"), *lat))] == 7
    assert got[("superbrain_request_duration_seconds_bucket", (("le", "0.01"), *lat))] == 0
    assert got[("superbrain_metrics_processes", (("state", "live"),))] == 2

    wb.close()  # b is gone: its gauges leave the sum, its counts stay
    got = scrape_dir(tmp_path)
    assert got[req] == 7
    assert got[("superbrain_queue_depth", (("model", "vla"),))] == 3
    assert got[("superbrain_metrics_processes", (("state", "dead"),))] == 1
    wa.close()


def test_a_killed_process_loses_its_gauges_but_not_its_counts(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from serving import metrics as m
        pm = m.ProcessMetrics()
        pm.inc(m.REQUESTS, ("vla", "1", "arm", "acme", "OK"), 5)
        pm.set(m.INFLIGHT, ("vla",), 9)
        m.SnapshotWriter({str(tmp_path)!r}, pm).start()
        print("ready", flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        got = scrape_dir(tmp_path)
        assert got[("superbrain_inflight_requests", (("model", "vla"),))] == 9
    finally:
        proc.kill()
        proc.wait()
    got = scrape_dir(tmp_path)
    assert ("superbrain_inflight_requests", (("model", "vla"),)) not in got
    total = sum(v for (name, _), v in got.items() if name == "superbrain_requests_total")
    assert total == 5


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


class _FakeRayAgent(BaseHTTPRequestHandler):
    """Stands in for Ray's per-node metrics agent (a real HTTP server, canned Ray text)."""

    def do_GET(self):  # noqa: N802
        body = b"# TYPE ray_serve_num_replicas gauge\nray_serve_num_replicas 2\nsuperbrain_requests_total 99\n"
        self.send_response(200)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_one_process_per_node_serves_the_port_and_another_takes_over(tmp_path):
    ray_agent = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRayAgent)
    threading.Thread(target=ray_agent.serve_forever, daemon=True).start()
    ray_url = f"http://127.0.0.1:{ray_agent.server_address[1]}/metrics"
    pm = m.ProcessMetrics()
    pm.inc(m.OVERLOAD_REJECTIONS, ("vla",), 2)
    writer = m.SnapshotWriter(tmp_path, pm).start()
    port = free_port()
    first = m.NodeEndpoint(
        tmp_path, "127.0.0.1", port, retry_s=0.1, ray_metrics_url=lambda: ray_url, accelerators=False
    )
    second = m.NodeEndpoint(
        tmp_path, "127.0.0.1", port, retry_s=0.1, ray_metrics_url=lambda: ray_url, accelerators=False
    )
    try:
        first.start(), second.start()
        assert first.holding and not second.holding
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        got = samples(text)
        assert got[("superbrain_overload_rejections_total", (("model", "vla"),))] == 2
        assert got[("ray_serve_num_replicas", ())] == 2  # Ray's metrics next to ours
        assert ("superbrain_requests_total", ()) not in got  # never let Ray's text shadow ours
        assert ("superbrain_build_info", (("version", __import__("serving").__version__),)) in got
        assert _get(f"http://127.0.0.1:{port}/other")[0] == 404

        first.close()
        deadline = time.monotonic() + 5
        while not second.holding and time.monotonic() < deadline:
            time.sleep(0.05)
        assert second.holding
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
    finally:
        first.close(), second.close(), writer.close()
        ray_agent.shutdown()


def test_the_node_endpoint_reports_accelerator_health_without_a_gpu(tmp_path):
    got = samples(generate_latest(m.node_registry(tmp_path)).decode())
    assert got[("superbrain_accelerator_exporter_up", ())] == 1


def test_every_metric_is_named_superbrain_and_never_labelled_by_robot_or_key():
    for metric in m.ALL_METRICS:
        assert metric.name.startswith("superbrain_")
        assert not {"robot_id", "robot", "key", "api_key", "key_id", "request_id"} & set(metric.labels)


def test_the_ingress_counts_and_logs_every_request(tmp_path):
    stream = io.StringIO()
    log = AccessLog(stream, flush_s=0.05)
    before = m.METRICS.snapshot()
    obs = {"images": {"front": np.zeros((8, 8, 3), np.uint8)}, "state": [1.0, 2.0, 3.0], "embodiment": ARM.name}
    with IngressThread(EchoPolicy(), access_log=log) as srv:
        with RobotClient(srv.address, retry=NO_RETRY) as robot:
            for i in range(3):
                robot.act(**obs, request_id=f"ok-{i}")
            with pytest.raises(NotFound):
                robot.act(**{**obs, "embodiment": "made-up-robot"}, request_id="bad-1")
    log.close()
    after = m.METRICS.snapshot()

    def delta(name, labels):
        def total(snap):
            return sum(v for n, lab, v in snap["counters"] if n == name and tuple(lab) == labels)

        return total(after) - total(before)

    policy = EchoPolicy()
    assert delta("superbrain_requests", (policy.name, policy.version, ARM.name, m.NO_TENANT, "OK")) == 3
    # A made-up embodiment is counted, but under "other": robots cannot grow the series.
    assert delta("superbrain_requests", (policy.name, policy.version, "other", m.NO_TENANT, "NOT_FOUND")) == 1
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    by_id = {line["request_id"]: line for line in lines}
    assert {"ok-0", "ok-1", "ok-2", "bad-1"} <= set(by_id)
    ok = by_id["ok-0"]
    assert ok["code"] == "OK" and ok["tenant"] == m.NO_TENANT and ok["embodiment"] == ARM.name
    assert ok["model"] == policy.name and ok["batch_size"] >= 1 and ok["latency_ms"] > 0
    assert set(ok) == {
        "ts",
        "request_id",
        "tenant",
        "key_id",
        "model",
        "embodiment",
        "code",
        "latency_ms",
        "queue_ms",
        "batch_size",
    }
    assert by_id["bad-1"]["code"] == "NOT_FOUND" and by_id["bad-1"]["embodiment"] == "made-up-robot"


def test_access_log_files_rotate(tmp_path):
    path = tmp_path / "access.jsonl"
    log = AccessLog(path, flush_s=60, max_bytes=2000, backups=2)
    for round_ in range(4):
        for i in range(20):
            log.record(f"r{round_}-{i}", "acme", "abc", "vla", "arm", "OK", 0.01, 1.0, 4)
        log.flush()
    log.close()
    assert path.with_name("access.jsonl.1").exists() and path.with_name("access.jsonl.2").exists()
    assert not path.with_name("access.jsonl.3").exists()
    for line in path.with_name("access.jsonl.1").read_text().splitlines():
        assert json.loads(line)["tenant"] == "acme"


def test_operations_doc_lists_every_metric():
    doc = (Path(__file__).resolve().parents[1] / "docs/operations.md").read_text()
    for metric in m.ALL_METRICS:
        exposed = metric.name + ("_total" if metric.kind == "counter" else "")
        assert f"`{exposed}`" in doc, f"docs/operations.md does not describe {exposed}"
