"""Run by tests/test_multinode.py in its own process: a 3-node Ray cluster on this machine.

The head has no CPUs, so the two replicas must land on the two worker nodes
(separate raylets, as on separate GPU machines); robots then reach both through
the shared port. Prints one JSON line with what it saw.
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np
import ray
from ray import serve
from ray.cluster_utils import Cluster

from serving import launcher
from serving.client import RobotClient
from serving.config import ServingConfig


def main(port: int) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        cfg = ServingConfig(
            grpc_port=port,
            policy="noop",
            num_replicas=2,
            replica_num_cpus=1,
            auth=False,
            state_dir=tempfile.mkdtemp(prefix="superbrain-multinode-"),
            metrics_port=0,
        )
        launcher.deploy(cfg)
        # Each worker node has exactly one CPU and each replica needs one, so two
        # running replicas are necessarily on two different nodes.
        replicas = serve.status().applications[cfg.app_name].deployments["PolicyReplica"].replica_states
        free_cpus = ray.available_resources().get("CPU", 0.0)
        frame = np.zeros((224, 224, 3), np.uint8)
        ok = 0
        for _ in range(10):
            with RobotClient(cfg.address, timeout=10) as robot:
                chunk = robot.act(images={"head": frame}, state=np.zeros(18), embodiment="unitree_go2")
                ok += chunk.actions.shape == (8, 12)
        print(
            json.dumps({"running_replicas": replicas.get("RUNNING", 0), "free_cpus": free_cpus, "ok": ok}), flush=True
        )
        serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
