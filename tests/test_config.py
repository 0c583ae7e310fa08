from pathlib import Path

import pytest
from pydantic import ValidationError

from serving.config import ServingConfig, load_config


def test_defaults() -> None:
    cfg = load_config(environ={})
    assert (cfg.host, cfg.grpc_port, cfg.policy) == ("127.0.0.1", 9000, "default")


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = tmp_path / "sb.yaml"
    path.write_text("grpc_port: 9100\nmax_batch_size: 8\nhost: 0.0.0.0\n")
    env = {"SUPERBRAIN_GRPC_PORT": "9200", "SUPERBRAIN_HOST": "127.0.0.2"}
    cfg = load_config(path, {"host": "127.0.0.3", "grpc_port": None}, environ=env)
    assert cfg.max_batch_size == 8  # from the file
    assert cfg.grpc_port == 9200  # env beats the file; a flag left unset does not override
    assert cfg.host == "127.0.0.3"  # flags beat env


def test_bad_values_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_config(environ={"SUPERBRAIN_GRPC_PORT": "not-a-port"})
    with pytest.raises(ValidationError, match="policy"):
        load_config(overrides={"policy": "nonsense"}, environ={})
    path = tmp_path / "typo.yaml"
    path.write_text("grpc_prot: 1\n")
    with pytest.raises(ValidationError, match="grpc_prot"):
        load_config(path, environ={})


def test_accelerator_settings_are_checked_and_decide_the_ray_resource() -> None:
    from serving.app import deployment_options

    assert ServingConfig().accelerator == "auto"
    assert ServingConfig(device="cuda").accelerator == "cuda"  # the older name still reads
    with pytest.raises(ValueError, match="accelerator 'tpu'"):
        ServingConfig(accelerator="tpu")
    with pytest.raises(ValueError, match="array_backend|array backend"):
        ServingConfig(array_backend="jax")

    def options(**kw):
        return deployment_options(ServingConfig(**kw))["ray_actor_options"]

    assert options(accelerator="cuda")["num_gpus"] == 1.0  # NVIDIA and MetaX: Ray GPUs
    assert options(accelerator="cuda", replica_num_gpus=0.5)["num_gpus"] == 0.5
    assert options(accelerator="musa")["resources"] == {"mthreads_gpu": 1.0}  # Moore Threads: custom
    assert options(accelerator="npu")["resources"] == {"NPU": 1.0}
    assert "num_gpus" not in options(accelerator="cpu") and "resources" not in options(accelerator="cpu")


def test_replicas_run_at_nice_0_unless_the_operator_sets_rays_worker_niceness(monkeypatch) -> None:
    from serving.app import deployment_options

    def replica_env():
        return deployment_options(ServingConfig())["ray_actor_options"]["runtime_env"]["env_vars"]

    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    assert replica_env()["RAY_worker_niceness"] == "0"  # Ray's own default is 15
    monkeypatch.setenv("RAY_worker_niceness", "5")
    assert replica_env()["RAY_worker_niceness"] == "5"


def test_replicas_start_with_malloc_settings_that_keep_frame_buffers_mapped(monkeypatch) -> None:
    """Replicas get GLIBC_TUNABLES (unless the operator set their own), and on glibc they work:
    a freed frame-sized buffer is reused without page-faulting its memory back in."""
    import os
    import platform
    import subprocess
    import sys

    from serving.app import MALLOC_TUNABLES, deployment_options

    def replica_env():
        return deployment_options(ServingConfig())["ray_actor_options"]["runtime_env"]["env_vars"]

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert replica_env()["GLIBC_TUNABLES"] == MALLOC_TUNABLES
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    assert "GLIBC_TUNABLES" not in replica_env()  # inherited from the operator's environment instead

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("the tunables are glibc's")
    churn = (
        "import ctypes, resource\n"
        "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
        "faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(20):\n"  # warm up: the heap grows once
        "    ps = [libc.malloc(150_528) for _ in range(4)]\n"
        "    [ctypes.memset(p, 1, 150_528) for p in ps]; [libc.free(p) for p in ps]\n"
        "start = faults()\n"
        "for _ in range(200):\n"
        "    ps = [libc.malloc(150_528) for _ in range(4)]\n"
        "    [ctypes.memset(p, 1, 150_528) for p in ps]; [libc.free(p) for p in ps]\n"
        "print((faults() - start) / 200)\n"
    )

    def faults_per_round(env: dict[str, str]) -> float:
        clean = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        out = subprocess.run([sys.executable, "-c", churn], env={**clean, **env}, capture_output=True, text=True)
        return float(out.stdout)

    assert faults_per_round({}) > 50  # glibc's defaults: four frames' pages faulted in again every round
    assert faults_per_round({"GLIBC_TUNABLES": MALLOC_TUNABLES}) < 5
