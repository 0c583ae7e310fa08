"""Every Superbrain metric, defined once; cheap on the request path; one scrape endpoint per node.

Why not prometheus_client's multiprocess mode: it writes every increment to an
mmap under a process-wide lock after a pid check (~2 us per value, several
values per request), and the overhead target for W1 is a few percent. Here the
request path only adds to plain dicts in its own process (~0.3 us), and:

1. each process (replica, quota coordinator) writes a snapshot of its totals to
   the node's metrics directory once a second (``SnapshotWriter``), holding an
   ``flock`` on a lock file for as long as it lives;
2. one process per node holds the metrics port (``NodeEndpoint``: whoever binds
   it first; the others retry, so the endpoint survives its holder) and serves
   the sum over all snapshots (``NodeCollector``): counters and histograms of
   dead processes still count (totals never go backwards), their gauges do not.

The endpoint also serves the accelerator metrics and, next to ours, Ray's own
metrics of the same node (``ray_serve_*`` and friends), so ops scrape one port
per node. prometheus_client does the exposition.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

# Label values for requests whose tenant is not known.
NO_TENANT = "none"  # auth is off
UNKNOWN_TENANT = "unknown"  # the key failed


@dataclass(frozen=True)
class MetricDef:
    """One metric. Counters are named without ``_total``; exposition adds it."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # How a gauge combines over the processes of a node: "sum" (queue depth) or "max" (a setting).
    aggregate: Literal["sum", "max"] = "sum"


# -- every metric -------------------------------------------------------------
# Labels are bounded: model, version, embodiment, tenant, code, limit. Never a
# robot id, request id or key.

REQUESTS = MetricDef(
    "superbrain_requests",
    "counter",
    "Act calls and stream steps finished, by gRPC status code",
    ("model", "version", "embodiment", "tenant", "code"),
)
REQUEST_DURATION = MetricDef(
    "superbrain_request_duration_seconds",
    "histogram",
    "Time from a request's arrival to its answer, inside the server",
    ("model", "tenant"),
    LATENCY_BUCKETS,
)
QUEUE_DURATION = MetricDef(
    "superbrain_queue_duration_seconds",
    "histogram",
    "Time a request waited for its batch to start",
    ("model",),
    LATENCY_BUCKETS,
)
PREPROCESS_DURATION = MetricDef(
    "superbrain_preprocess_duration_seconds",
    "histogram",
    "Decoding and validating one request (before it may join a batch)",
    ("model",),
    LATENCY_BUCKETS,
)
COMPUTE_DURATION = MetricDef(
    "superbrain_compute_duration_seconds",
    "histogram",
    "One batch's policy forward pass, post-processing included",
    ("model",),
    LATENCY_BUCKETS,
)
FORWARD_BUSY_SECONDS = MetricDef(
    "superbrain_forward_busy_seconds",
    "counter",
    "Time the policy's forward stage held a batch (forward pass and outputs back on the host); "
    "its rate per replica is the accelerator busy fraction",
    ("model",),
)
BATCH_SIZE = MetricDef(
    "superbrain_batch_size", "histogram", "Requests per batch run by the policy", ("model",), BATCH_BUCKETS
)
QUEUE_DEPTH = MetricDef("superbrain_queue_depth", "gauge", "Requests waiting for a batch", ("model",))
INFLIGHT = MetricDef("superbrain_inflight_requests", "gauge", "Requests admitted and not yet answered", ("model",))
REPLICAS = MetricDef("superbrain_replicas", "gauge", "Live policy replicas (each contributes 1)", ("model", "version"))
REPLICAS_MIN = MetricDef(
    "superbrain_replicas_min", "gauge", "Configured minimum of policy replicas (take the max)", ("model",), (), "max"
)
OVERLOAD_REJECTIONS = MetricDef(
    "superbrain_overload_rejections",
    "counter",
    "Requests refused with RESOURCE_EXHAUSTED because a replica's queue was full",
    ("model",),
)
QUOTA_REJECTIONS = MetricDef(
    "superbrain_quota_rejections",
    "counter",
    "Requests refused by a tenant's plan (rate, monthly budgets, stream cap) or quota service outage",
    ("tenant", "limit"),
)
TENANT_ACCEL_SECONDS = MetricDef(
    "superbrain_tenant_accelerator_seconds",
    "counter",
    "Accelerator time charged to tenants (each call's share of its batch's compute)",
    ("tenant", "model"),
)
MODEL_LOAD_SECONDS = MetricDef(
    "superbrain_model_load_seconds",
    "gauge",
    "Time the replica took to load its model (the slowest on the node)",
    ("model", "version"),
    (),
    "max",
)
USAGE_PENDING = MetricDef(
    "superbrain_usage_pending_records", "gauge", "Admitted calls' usage records not yet in the ledger store"
)
USAGE_OLDEST_PENDING = MetricDef(
    "superbrain_usage_oldest_pending_seconds", "gauge", "Age of the oldest usage record not yet in the ledger store"
)
USAGE_FLUSH_FAILURES = MetricDef(
    "superbrain_usage_flush_failures", "counter", "Failed attempts to write usage records to the ledger store"
)
USAGE_STORED = MetricDef(
    "superbrain_usage_records_stored", "counter", "Usage records written to the ledger store (replays included)"
)
QUOTA_EXCHANGES = MetricDef(
    "superbrain_quota_exchanges", "counter", "Lease exchanges of this replica with the quota coordinator"
)
QUOTA_EXCHANGE_FAILURES = MetricDef(
    "superbrain_quota_exchange_failures", "counter", "Lease exchanges that failed (coordinator unreachable or slow)"
)
QUOTA_ADMISSION_WAITS = MetricDef(
    "superbrain_quota_admission_waits",
    "counter",
    "Admissions that found their tenant's leased slice empty and waited for an exchange",
)
BUILD_INFO = MetricDef(
    "superbrain_build_info", "gauge", "Superbrain version of this node's metrics endpoint", ("version",)
)

ALL_METRICS: tuple[MetricDef, ...] = tuple(v for v in list(globals().values()) if isinstance(v, MetricDef))

Labels = tuple[str, ...]
Source = Callable[[], Iterable[tuple[MetricDef, Labels, float]]]


class ProcessMetrics:
    """This process's totals. The request path calls ``inc``/``observe``; nothing here does I/O.

    Values are written from the event loop (and, for sources, read from the
    snapshot thread); ``snapshot`` copies dicts with C-level copies, which the
    GIL makes atomic, so no lock is taken per request.
    """

    def __init__(self) -> None:
        self._counters: dict[tuple[str, Labels], float] = {}
        self._gauges: dict[tuple[str, Labels], float] = {}
        self._hists: dict[tuple[str, Labels], list[float]] = {}
        self._sources: list[Source] = []

    def inc(self, metric: MetricDef, labels: Labels, amount: float = 1.0) -> None:
        key = (metric.name, labels)
        self._counters[key] = self._counters.get(key, 0.0) + amount

    def set(self, metric: MetricDef, labels: Labels, value: float) -> None:
        self._gauges[(metric.name, labels)] = value

    def observe(self, metric: MetricDef, labels: Labels, value: float) -> None:
        key = (metric.name, labels)
        hist = self._hists.get(key)
        if hist is None:
            # Per-bucket counts (not cumulative), the +Inf count, then the sum.
            hist = self._hists[key] = [0.0] * (len(metric.buckets) + 2)
        hist[bisect.bisect_left(metric.buckets, value)] += 1
        hist[-1] += value

    def add_source(self, source: Source) -> Callable[[], None]:
        """Values owned by another object (queue depth, spool counters), read at snapshot time.

        Returns a function that removes the source again.
        """
        self._sources.append(source)
        return lambda: self._sources.remove(source) if source in self._sources else None

    def snapshot(self) -> dict:
        counters, gauges = dict(self._counters), dict(self._gauges)
        hists = {key: list(values) for key, values in dict(self._hists).items()}
        for source in list(self._sources):
            try:
                for metric, labels, value in source():
                    target = counters if metric.kind == "counter" else gauges
                    target[(metric.name, labels)] = value
            except Exception:
                log.warning("metrics source failed", exc_info=True)
        return {
            "counters": [[name, list(labels), v] for (name, labels), v in counters.items()],
            "gauges": [[name, list(labels), v] for (name, labels), v in gauges.items()],
            "histograms": [[name, list(labels), v] for (name, labels), v in hists.items()],
        }


# The process-wide instance the serving code records into.
METRICS = ProcessMetrics()


class SnapshotWriter:
    """Writes a process's snapshot into the node's metrics directory every ``interval_s``.

    The lock file is held (``flock``) for the life of the process: a reader that
    can take it knows the process is gone and drops its gauges.
    """

    def __init__(self, directory: str | Path, metrics: ProcessMetrics = METRICS, *, interval_s: float = 1.0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metrics = metrics
        self.interval_s = interval_s
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.path = self.directory / f"{self.token}.json"
        self._lock_fd = os.open(self.directory / f"{self.token}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-snapshot", daemon=True)

    def start(self) -> SnapshotWriter:
        self.write()
        self._thread.start()
        return self

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.metrics.snapshot(), separators=(",", ":")))
        os.replace(tmp, self.path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.write()
            except Exception:
                log.warning("could not write the metrics snapshot", exc_info=True)

    def close(self) -> None:
        """Last snapshot, then release the lock: this process's gauges leave the node's sum."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.write()
        os.close(self._lock_fd)


def _alive(lock_path: Path) -> bool:
    """True while the snapshot's writer holds its lock (taking it here means the writer died)."""
    try:
        fd = os.open(lock_path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


class NodeCollector(Collector):
    """Sums the snapshots of every Superbrain process on this node (live and dead)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self._defs = {m.name: m for m in ALL_METRICS}

    def _snapshots(self) -> Iterator[tuple[dict, bool]]:
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError):
                continue  # being replaced, or torn: the next scrape reads it
            yield data, _alive(path.with_suffix(".lock"))

    def collect(self) -> Iterator[Metric]:
        counters: dict[tuple[str, Labels], float] = {}
        gauges: dict[tuple[str, Labels], float] = {}
        hists: dict[tuple[str, Labels], list[float]] = {}
        live = dead = 0
        for data, alive in self._snapshots():
            live, dead = live + alive, dead + (not alive)
            for name, labels, value in data.get("counters", []):
                key = (name, tuple(labels))
                counters[key] = counters.get(key, 0.0) + value
            if alive:
                for name, labels, value in data.get("gauges", []):
                    key = (name, tuple(labels))
                    if key not in gauges:
                        gauges[key] = value
                    elif self._gauge_max(name):
                        gauges[key] = max(gauges[key], value)
                    else:
                        gauges[key] += value
            for name, labels, values in data.get("histograms", []):
                key = (name, tuple(labels))
                acc = hists.get(key)
                if acc is None:
                    hists[key] = list(values)
                elif len(acc) == len(values):
                    hists[key] = [a + b for a, b in zip(acc, values, strict=True)]
        yield from self._families(counters, gauges, hists)
        processes = GaugeMetricFamily(
            "superbrain_metrics_processes", "Processes whose metrics this node sums", labels=["state"]
        )
        processes.add_metric(["live"], live)
        processes.add_metric(["dead"], dead)
        yield processes

    def _gauge_max(self, name: str) -> bool:
        metric = self._defs.get(name)
        return metric is not None and metric.aggregate == "max"

    def _families(self, counters, gauges, hists) -> Iterator[Metric]:
        by_name: dict[str, list[tuple[Labels, object]]] = {}
        for store in (counters, gauges, hists):
            for (name, labels), value in store.items():
                by_name.setdefault(name, []).append((labels, value))
        for name, samples in sorted(by_name.items()):
            metric = self._defs.get(name)
            if metric is None:
                continue  # written by another version of the code; skip rather than guess
            labelnames = list(metric.labels)
            if metric.kind == "counter":
                family: Metric = CounterMetricFamily(name, metric.help, labels=labelnames)
                for labels, value in samples:
                    family.add_metric(list(labels), value)
            elif metric.kind == "gauge":
                family = GaugeMetricFamily(name, metric.help, labels=labelnames)
                for labels, value in samples:
                    family.add_metric(list(labels), value)
            else:
                family = HistogramMetricFamily(name, metric.help, labels=labelnames)
                for labels, values in samples:
                    family.add_metric(list(labels), _cumulative(metric.buckets, values), sum_value=values[-1])
            yield family


def _cumulative(bounds: tuple[float, ...], values: list[float]) -> list[tuple[str, float]]:
    out, running = [], 0.0
    for bound, count in zip((*bounds, float("inf")), values[:-1], strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else _bound_text(bound), running))
    return out


def _bound_text(bound: float) -> str:
    return repr(float(bound))


class _BuildInfo(Collector):
    def collect(self) -> Iterator[Metric]:
        from serving import __version__

        info = GaugeMetricFamily(BUILD_INFO.name, BUILD_INFO.help, labels=list(BUILD_INFO.labels))
        info.add_metric([__version__], 1)
        yield info


def node_registry(directory: str | Path, *, accelerators: bool = True) -> CollectorRegistry:
    """What a node's endpoint exposes: every process's metrics, build info, accelerators."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(directory))
    registry.register(_BuildInfo())
    if accelerators:
        from serving.accel_metrics import AcceleratorCollector

        registry.register(AcceleratorCollector())
    return registry


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeEndpoint:
    """Serve the node's metrics on ``host:port`` if this process can bind it first.

    Every Superbrain process on a node runs one; exactly one holds the port at
    a time (no SO_REUSEPORT here). The others retry every ``retry_s``, so when
    the holder dies another process takes over within that time.
    """

    def __init__(
        self,
        directory: str | Path,
        host: str,
        port: int,
        *,
        retry_s: float = 5.0,
        ray_metrics_url: Callable[[], str | None] | None = None,
        accelerators: bool = True,
    ):
        self.directory = Path(directory)
        self.host, self.port = host, port
        self.retry_s = retry_s
        self._ray_metrics_url = ray_metrics_url
        self._accelerators = accelerators
        self._server: ThreadingHTTPServer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics-endpoint", daemon=True)

    @property
    def holding(self) -> bool:
        return self._server is not None

    def start(self) -> NodeEndpoint:
        self._try_bind()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.retry_s):
            if self._server is None:
                self._try_bind()

    def _try_bind(self) -> None:
        try:
            server = ThreadingHTTPServer((self.host, self.port), self._handler())
        except OSError:
            return  # another process on this node serves it
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        log.info("serving this node's metrics on %s:%d", self.host, self.port)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        registry = node_registry(self.directory, accelerators=self._accelerators)
        ray_url = self._ray_metrics_url

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = generate_latest(registry)
                if ray_url is not None:
                    body += _ray_node_metrics(ray_url())
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # scrapes are not worth a log line each
                pass

        return Handler

    def close(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _ray_node_metrics(url: str | None) -> bytes:
    """Ray's own metrics for this node (Serve's included), minus anything named like ours."""
    if not url:
        return b""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            text = resp.read()
    except OSError:
        return b"# Ray's metrics agent did not answer\n"
    return b"".join(line + b"\n" for line in text.splitlines() if b"superbrain_" not in line)


def ray_metrics_url() -> str | None:
    """Where this node's Ray metrics agent exports (None outside Ray or when unknown)."""
    try:
        import ray

        node_id = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node.get("NodeID") == node_id and node.get("MetricsExportPort"):
                return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    except Exception:
        log.debug("no Ray metrics address", exc_info=True)
    return None


class ProcessTelemetry:
    """A process's part in its node's metrics: its snapshot writer and its bid for the endpoint."""

    def __init__(
        self,
        directory: str | Path,
        host: str,
        port: int,
        *,
        include_ray: bool = True,
        metrics: ProcessMetrics = METRICS,
    ):
        self.metrics = metrics
        self.writer = SnapshotWriter(directory, metrics).start()
        self._removers: list[Callable[[], None]] = []
        self.endpoint = None
        if port:
            cached: list[str | None] = []

            def ray_url() -> str | None:
                if not cached or cached[0] is None:
                    cached[:] = [ray_metrics_url()]
                return cached[0]

            self.endpoint = NodeEndpoint(directory, host, port, ray_metrics_url=ray_url if include_ray else None)
            self.endpoint.start()

    def add_source(self, source: Source) -> None:
        self._removers.append(self.metrics.add_source(source))

    def close(self) -> None:
        if self.endpoint is not None:
            self.endpoint.close()
        self.writer.close()  # the last snapshot still reads the sources' counters
        for remove in self._removers:
            remove()
        self._removers = []
