"""Builds the Superbrain Ray Serve application.

Deploy it the way Ray Serve deploys anything, by import path::

    serve run serving.app:build_app grpc_port=9000 policy=default
    serve deploy deploy/serve_config.yaml      # or KubeRay's serveConfigV2

``superbrain serve`` calls the same builder.
"""

from __future__ import annotations

import os
from typing import Any

from ray.serve import Application
from ray.serve.config import AutoscalingPolicy

from serving import accel
from serving.config import ServingConfig, load_config
from serving.deployment import PolicyReplica

# glibc malloc settings for replicas (read once, when the worker process starts).
# By default glibc serves a freed ~150 KB frame buffer from fresh mmap'd or
# re-grown heap memory, and returns freed heap tops to the kernel: every request's
# payload copy then page-faults its pages back in. Under W1 that was 4.5 faults
# per call, 7.7 with the partner gate's extra allocations, about 1.5 us each on
# the request loop (docs/benchmarks.md). Buffers below 4 MiB now come from the heap
# and up to 256 MiB of free heap stays mapped; an operator's own GLIBC_TUNABLES wins.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=268435456"


def replica_malloc_env() -> dict[str, str]:
    return {} if "GLIBC_TUNABLES" in os.environ else {"GLIBC_TUNABLES": MALLOC_TUNABLES}


# Ray starts every worker process at nice 15 (its ``worker_niceness``), so that a
# training job cannot starve the raylet. A replica IS the serving path: at 15 its
# request loop waits behind every nice-0 process on the node (Ray's own agents, a
# log shipper, a co-located load generator) whenever the cores are busy. Run it at
# nice 0. The operator's own ``RAY_worker_niceness`` wins; other actors (the quota
# coordinator, the Serve controller) keep Ray's default.
REPLICA_NICENESS = "0"
WORKER_NICENESS_VAR = "RAY_worker_niceness"  # Ray's spelling: RAY_ + its config name


def replica_niceness_env() -> dict[str, str]:
    return {WORKER_NICENESS_VAR: os.environ.get(WORKER_NICENESS_VAR, REPLICA_NICENESS)}


def deployment_options(cfg: ServingConfig) -> dict[str, Any]:
    """Ray Serve options for the replica deployment, from the one config object."""
    actor_options: dict[str, Any] = {
        "num_cpus": cfg.replica_num_cpus,
        # Our gRPC server lives on the replica's event loop; Serve's default extra
        # user-code thread only adds a loop hop per call (W1: 0.77 -> 0.97 of the
        # limit). Policy compute runs on the engine's worker thread, so the loop
        # (and Serve's health checks) never block on a forward pass.
        "runtime_env": {
            "env_vars": {
                "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
                **replica_malloc_env(),
                **replica_niceness_env(),
            }
        },
    }
    override = cfg.accelerator_override
    if override is None and cfg.replica_num_gpus:
        actor_options["num_gpus"] = cfg.replica_num_gpus  # asked for explicitly: honour it on any head
    else:
        # Ray GPU for NVIDIA/MetaX/ROCm, the mthreads_gpu resource, or NPU; nothing on CPU.
        actor_options.update(accel.replica_actor_options(override, cfg.replica_num_gpus or None))
    options: dict[str, Any] = {
        "ray_actor_options": actor_options,
        # Requests reach replicas over their own gRPC port, not Serve handles;
        # this only has to admit a full batch so @serve.batch can fill it.
        "max_ongoing_requests": max(cfg.max_queued_requests, cfg.max_batch_size),
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": cfg.grace_period_s + 5.0,
        "health_check_period_s": 5.0,
    }
    if cfg.autoscaling is not None:
        a = cfg.autoscaling
        options["autoscaling_config"] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "policy": AutoscalingPolicy(
                policy_function="serving.autoscaling:InflightAutoscalingPolicy",
                policy_kwargs={"target": a.target_inflight_per_replica},
            ),
        }
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def build_app(args: dict[str, Any] | None = None) -> Application:
    """Serve application builder: ``args`` are ServingConfig fields (env fills the rest)."""
    cfg = load_config(overrides=args or {})
    # Replicas may run with another working directory: pin local state to an absolute path.
    cfg = cfg.model_copy(update={"state_dir": str(cfg.state_path)})
    # With auth on, replicas start the app's quota coordinator themselves (a Ray
    # actor that leaves once they are gone: serving/quota/coordinator.py).
    return PolicyReplica.options(**deployment_options(cfg)).bind(cfg.model_dump())
