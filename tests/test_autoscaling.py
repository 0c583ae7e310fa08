from types import SimpleNamespace

import numpy as np
import pytest
from ray import serve

from serving import launcher
from serving.autoscaling import InflightAutoscalingPolicy
from serving.client import RobotClient
from serving.config import AutoscalingSettings, ServingConfig
from tests.servers import free_port


def _ctx(inflight: dict, lo: int = 1, hi: int = 8) -> SimpleNamespace:
    return SimpleNamespace(
        aggregated_metrics={"inflight": inflight}, capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi
    )


@pytest.mark.parametrize(
    "inflight, expected",
    [({}, 1), ({"a": 0.0}, 1), ({"a": 64.0}, 1), ({"a": 65.0}, 2), ({"a": 100.0, "b": 100.0}, 4), ({"a": 5000.0}, 8)],
)
def test_replicas_follow_requests_in_flight(inflight, expected) -> None:
    assert InflightAutoscalingPolicy(target=64)(_ctx(inflight))[0] == expected


@pytest.mark.ray
def test_autoscaling_deployment_starts_and_serves(ray_session, tmp_path) -> None:
    """Serve accepts the custom policy and the replicas' stats method; traffic flows."""
    cfg = ServingConfig(
        grpc_port=free_port(),
        policy="noop",
        replica_num_cpus=0.5,
        app_name="autoscaled",
        auth=False,
        state_dir=str(tmp_path),
        metrics_port=0,
        autoscaling=AutoscalingSettings(min_replicas=1, max_replicas=2, target_inflight_per_replica=8),
    )
    launcher.deploy(cfg)
    try:
        status = serve.status().applications[cfg.app_name]
        assert status.status == "RUNNING"
        with RobotClient(cfg.address, timeout=10) as robot:
            chunk = robot.act(
                images={"head": np.zeros((224, 224, 3), np.uint8)}, state=np.zeros(18), embodiment="unitree_go2"
            )
        assert chunk.actions.shape == (8, 12)
    finally:
        launcher.undeploy(cfg)
