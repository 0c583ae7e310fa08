"""The Ray Serve replica: thin glue around the plain stages.

Each replica embeds the gRPC front door (``serving.ingress``), so a robot's call
goes socket -> replica -> batch -> reply with no proxy hop. Ray Serve still owns
what it is good at: placing replicas on nodes with the right accelerator,
restarting them, health checks and autoscaling (fed
by each replica's requests in flight). docs/benchmarks.md shows why: Ray Serve's
own gRPC proxy costs ~10x throughput on these machines.
"""

from __future__ import annotations

import logging
import time

from ray import serve

from serving import accel
from serving import metrics as m
from serving.access_log import open_access_log
from serving.config import ServingConfig
from serving.engine import CapacityBatcher, Outcome, Pending, PolicyEngine, Submit, resolve_pipeline
from serving.ingress import GrpcFrontend, IngressLimits, PolicyServicer
from serving.policy.base import setup_policy
from serving.policy.loader import load_policy
from serving.quota.coordinator import ActorCoordinator
from serving.quota.gate import AccessGate, KeyCache
from serving.quota.leases import ReplicaQuota
from serving.quota.spool import UsageSpool

log = logging.getLogger("ray.serve")


@serve.deployment(name="PolicyReplica")
class PolicyReplica:
    async def __init__(self, config: dict) -> None:
        cfg = ServingConfig.model_validate(config)
        if cfg.policy != "noop":
            import torch

            # Ray sets OMP_NUM_THREADS from num_cpus, rounding fractions down to 1.
            torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.replica_num_cpus)))
        self.cfg = cfg
        load_started = time.monotonic()
        self.policy = load_policy(cfg.policy, cfg.model_dir, seed=cfg.seed)
        self.device, self._device_claim, array_backend = self._pick_device(cfg)
        setup_policy(self.policy, self.device, array_backend)
        load_s = time.monotonic() - load_started
        self.engine = PolicyEngine(self.policy, pipeline=resolve_pipeline(cfg.pipeline, self.device))
        self.gate = await self._start_gate(cfg) if cfg.auth else None
        # With auth on, every batch is metered in one spool write before its answers leave.
        self._run_engine = (
            self.gate.metering(self.engine.run_batch, self.policy.name) if self.gate else self.engine.run_batch
        )
        wait_s = cfg.batch_wait_timeout_ms / 1e3
        submit: Submit
        if cfg.batcher == "serve":
            self.run_batch.set_max_batch_size(cfg.max_batch_size)
            self.run_batch.set_batch_wait_timeout_s(wait_s)
            submit = self.run_batch
        else:
            self.batcher = CapacityBatcher(
                self._run_engine, cfg.max_batch_size, wait_s, max_inflight=self.engine.max_inflight_batches
            )
            submit = self.batcher
        self.access_log = open_access_log(cfg.access_log, cfg.state_path)
        servicer = PolicyServicer(
            self.policy,
            submit,
            IngressLimits(cfg.max_queued_requests, cfg.default_timeout_s),
            max_batch_size=cfg.max_batch_size,
            gate=self.gate,
            access_log=self.access_log,
        )
        self.frontend = GrpcFrontend(servicer, cfg.host, cfg.grpc_port, int(cfg.max_message_mb * 2**20))
        await self.frontend.start()
        self.telemetry = self._start_telemetry(cfg, servicer, load_s)
        log.info("replica serving %s %s on %s:%d", self.policy.name, self.policy.version, cfg.host, self.frontend.port)

    @staticmethod
    def _pick_device(cfg: ServingConfig) -> tuple[str, accel.DeviceClaim | None, str]:
        """This replica's torch device (and, on MUSA, a claimed index) and its array backend, from the node."""
        found = accel.probe()
        chosen = accel.plan(found, cfg.accelerator_override)
        device, claim = accel.replica_device(chosen, found, cfg.state_path / "devices")
        accel.import_device_plugin(device)
        log.info(
            "replica device %s, array backend %s (%s; %s)",
            device,
            chosen.array_backend,
            chosen.vendor,
            "; ".join(chosen.reasons),
        )
        return device, claim, chosen.array_backend

    @staticmethod
    async def _start_gate(cfg: ServingConfig) -> AccessGate:
        url = cfg.resolved_ledger_url
        spool = UsageSpool(cfg.state_path / "spool", url, flush_interval_s=cfg.usage_flush_s)
        coordinator = ActorCoordinator(
            serve.get_replica_context().app_name, spool.replica_token, url, lease_ttl_s=cfg.lease_ttl_s
        )
        # Periodic exchanges (usage reports, lease renewals) as often as the slice
        # is sized for, not more: a busy replica then exchanges about 1.4 times a
        # second, not 1.9 (each a Ray actor call, ~1-2 ms of CPU across both processes).
        horizon_s = cfg.lease_ttl_s / 2
        quota = ReplicaQuota(coordinator, horizon_s=horizon_s, sync_interval_s=horizon_s)
        gate = AccessGate(KeyCache(url, refresh_s=cfg.key_refresh_s), quota, spool)
        await gate.start()
        # Start (or find) the coordinator now: starting its Ray worker takes seconds
        # of CPU, which would otherwise land on the first robots' calls.
        try:
            await coordinator.ready()
        except Exception:
            log.warning("quota coordinator not reachable yet; the first calls will retry it", exc_info=True)
        return gate

    def _start_telemetry(self, cfg: ServingConfig, servicer: PolicyServicer, load_s: float) -> m.ProcessTelemetry:
        telemetry = m.ProcessTelemetry(
            cfg.state_path / "metrics", cfg.metrics_bind_host, cfg.metrics_port, include_ray=cfg.metrics_include_ray
        )
        model = (self.policy.name,)
        version = (self.policy.name, self.policy.version)
        min_replicas = cfg.autoscaling.min_replicas if cfg.autoscaling else cfg.num_replicas
        batcher = getattr(self, "batcher", None)

        def replica_values():
            yield m.REPLICAS, version, 1.0
            yield m.REPLICAS_MIN, model, float(min_replicas)
            yield m.MODEL_LOAD_SECONDS, version, load_s
            yield m.INFLIGHT, model, float(servicer.inflight)
            if batcher is not None:  # @serve.batch keeps its queue to itself
                yield m.QUEUE_DEPTH, model, float(batcher.queued)

        telemetry.add_source(replica_values)
        # Counters exist from the start at 0, so rate() and alerts see "none yet", not "no data".
        m.METRICS.inc(m.OVERLOAD_REJECTIONS, model, 0.0)
        if self.gate is not None:
            telemetry.add_source(self.gate.metric_values)
        return telemetry

    # Used with ``batcher: serve``; the default capacity-aware CapacityBatcher forms
    # larger batches under load (see serving.engine.CapacityBatcher).
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def run_batch(self, items: list[Pending]) -> list[Outcome]:
        return await self._run_engine(items)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom autoscaling metric: robots' requests this replica holds right now."""
        return {"inflight": float(self.frontend.servicer.inflight)}

    async def __del__(self) -> None:
        # Serve calls this on scale-down and shutdown: drain before the process exits.
        frontend = getattr(self, "frontend", None)
        if frontend is not None:
            await frontend.stop(self.cfg.grace_period_s)
            self.engine.close()
        # After the drain: the last calls' usage reaches the ledger, leased tokens go back.
        gate = getattr(self, "gate", None)
        if gate is not None:
            await gate.close()
        for part in ("access_log", "telemetry"):  # last: they count the drained calls too
            closer = getattr(self, part, None)
            if closer is not None:
                closer.close()
