"""Several replicas share one port (SO_REUSEPORT); losing one does not lose the service."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray

from serving import launcher
from serving.client import RobotClient
from serving.config import ServingConfig
from tests.servers import free_port

pytestmark = pytest.mark.ray


def _replica_actors(app: str) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app}#")
    ]


def test_two_replicas_share_the_port_and_survive_losing_one(ray_session, tmp_path) -> None:
    cfg = ServingConfig(
        grpc_port=free_port(),
        policy="noop",
        num_replicas=2,
        replica_num_cpus=0.5,
        app_name="two-replicas",
        auth=False,
        state_dir=str(tmp_path),
        metrics_port=0,
    )
    launcher.deploy(cfg)
    try:
        names = _replica_actors(cfg.app_name)
        assert len(names) == 2, names
        frame = np.zeros((224, 224, 3), np.uint8)
        obs = {"images": {"head": frame}, "state": np.zeros(18, np.float32), "embodiment": "unitree_go2"}
        for _ in range(10):  # a fresh connection each time: the kernel picks a replica
            with RobotClient(cfg.address, timeout=10) as robot:
                assert robot.act(**obs).actions.shape == (8, 12)

        ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
        with RobotClient(cfg.address, timeout=20) as robot:
            ok = sum(robot.act(**obs).actions.shape == (8, 12) for _ in range(20))
        assert ok == 20

        # Serve notices the dead replica and brings the deployment back to two.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(set(_replica_actors(cfg.app_name)) - {names[0]}) < 2:
            time.sleep(1)
        assert len(set(_replica_actors(cfg.app_name)) - {names[0]}) == 2
    finally:
        launcher.undeploy(cfg)
