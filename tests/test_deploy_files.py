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
