"""The Serve config file and KubeRay's serveConfigV2 must build the app they claim to."""

from pathlib import Path

import pytest
import yaml
from ray._common.utils import import_attr
from ray.serve.schema import ServeDeploySchema

from serving.app import build_app, deployment_options
from serving.config import ServingConfig

ROOT = Path(__file__).resolve().parents[1]


def _serve_configs() -> list[tuple[str, dict]]:
    configs = [("deploy/serve_config.yaml", yaml.safe_load((ROOT / "deploy/serve_config.yaml").read_text()))]
    for doc in yaml.safe_load_all((ROOT / "k8s/rayservice.yaml").read_text()):
        if doc and doc.get("kind") == "RayService":
            configs.append(("k8s/rayservice.yaml", yaml.safe_load(doc["spec"]["serveConfigV2"])))
    return configs


@pytest.mark.parametrize("name, config", _serve_configs(), ids=lambda v: v if isinstance(v, str) else "")
def test_serve_config_builds_the_app(name: str, config: dict) -> None:
    schema = ServeDeploySchema.model_validate(config)
    (app,) = schema.applications
    builder = import_attr(app.import_path)
    assert builder is build_app
    cfg = ServingConfig.model_validate(app.args)  # every arg is a real config field
    assert build_app(app.args) is not None
    options = deployment_options(cfg)
    assert ("autoscaling_config" in options) == (cfg.autoscaling is not None)


def test_every_ray_pod_exposes_the_metrics_port_and_ray_stays_off_it() -> None:
    """PodMonitor scrapes port 'sb-metrics'; KubeRay's default Ray metrics port (8080) would take it."""
    (service,) = [
        d for d in yaml.safe_load_all((ROOT / "k8s/rayservice.yaml").read_text()) if d["kind"] == "RayService"
    ]
    (app,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    port = ServingConfig.model_validate(app["args"]).metrics_port
    cluster = service["spec"]["rayClusterConfig"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        ports = [p for c in group["template"]["spec"]["containers"] for p in c.get("ports", [])]
        assert {"containerPort": port, "name": "sb-metrics"} in ports
        assert group["rayStartParams"].get("metrics-export-port") not in (None, str(port))
