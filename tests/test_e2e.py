"""End to end: the real Ray Serve app (default VLA), driven through the robot SDK over real gRPC."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serving import codec
from serving.api import pb
from serving.client import RobotClient
from serving.client import errors as sb_errors
from serving.policy.base import PolicyObservation
from serving.policy.loader import load_policy

pytestmark = pytest.mark.ray


def _observation(spec, rng: np.random.Generator) -> dict:
    return {
        "images": {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in spec.cameras},
        "state": rng.normal(size=spec.state_dim).astype(np.float32),
        "instruction": str(rng.choice(["pick up the red cup", "walk forward", "fold the towel", "open the drawer"])),
        "embodiment": spec.name,
    }


@pytest.fixture(scope="module")
def reference():
    """The same policy in-process: what a robot alone should get."""
    policy = load_policy("default")
    policy.setup("cpu")
    return policy


@pytest.fixture(scope="module")
def robot(superbrain):
    with RobotClient(superbrain.address, timeout=30) as client:
        yield client


def test_describe_lists_three_embodiments(robot) -> None:
    info = robot.describe()
    embodiments = info.embodiments
    assert len(embodiments) >= 3
    dims = {(e.state_dim, e.action_dim, len(e.cameras)) for e in embodiments.values()}
    assert len(dims) >= 3, "embodiments must differ in state/action sizes and camera sets"
    for e in embodiments.values():
        assert e.chunk_length > 0 and e.control_rate_hz > 0


def test_many_robots_mixed_embodiments_each_get_their_own_chunk(superbrain, robot, reference) -> None:
    """64 concurrent robots of three embodiments: every chunk equals the one computed alone."""
    specs = list(reference.embodiments.values())
    rng = np.random.default_rng(7)
    observations = [_observation(specs[i % len(specs)], rng) for i in range(96)]
    barrier = threading.Barrier(64)

    def call(i: int):
        if i < 64:
            barrier.wait(10)
        return robot.act(**observations[i], robot_id=f"robot-{i}", step=i)

    with ThreadPoolExecutor(64) as pool:
        chunks = list(pool.map(call, range(len(observations))))

    batch_sizes = [c.timing.batch_size for c in chunks]
    assert max(batch_sizes) > 1, f"robots should share batches, got {batch_sizes}"
    for obs, chunk in zip(observations, chunks, strict=True):
        spec = reference.embodiments[obs["embodiment"]]
        alone = reference.infer([PolicyObservation(**obs)])[0]
        assert chunk.actions.dtype == np.float32
        assert chunk.actions.shape == (spec.chunk_length, spec.action_dim)
        np.testing.assert_allclose(chunk.actions, alone, atol=1e-4, rtol=1e-4)
        assert (chunk.actions >= np.asarray(spec.action_low) - 1e-6).all()
        assert (chunk.actions <= np.asarray(spec.action_high) + 1e-6).all()


def test_jpeg_and_png_frames(robot, reference) -> None:
    spec = reference.embodiments["unitree_go2"]
    obs = _observation(spec, np.random.default_rng(3))
    for fmt in ("jpeg", "png"):
        chunk = robot.act(**obs, image_format=fmt)
        assert chunk.actions.shape == (spec.chunk_length, spec.action_dim)
    png = robot.act(**obs, image_format="png")
    np.testing.assert_allclose(png.actions, reference.infer([PolicyObservation(**obs)])[0], atol=1e-4)


@pytest.mark.parametrize(
    "mutate, error, field",
    [
        (lambda o: o["state"].__setitem__(0, np.nan), sb_errors.InvalidArgument, "observation.state"),
        (lambda o: o.__setitem__("state", o["state"][:-1]), sb_errors.InvalidArgument, "observation.state"),
        (lambda o: o.__setitem__("embodiment", "tank"), sb_errors.NotFound, "observation.embodiment"),
    ],
)
def test_bad_requests_get_typed_errors_and_the_server_keeps_serving(robot, reference, mutate, error, field) -> None:
    obs = _observation(reference.embodiments["unitree_go2"], np.random.default_rng(5))
    mutate(obs)
    with pytest.raises(error) as info:
        robot.act(**obs)
    assert field in str(info.value)
    good = _observation(reference.embodiments["franka_arm"], np.random.default_rng(6))
    assert robot.act(**good).actions.shape == (16, 8)


def test_wrong_channel_count_is_invalid_argument(robot, reference) -> None:
    """Sent as a raw request: the SDK itself refuses to build such a frame."""
    obs = _observation(reference.embodiments["unitree_go2"], np.random.default_rng(8))
    request = pb.ActRequest(
        observation=pb.Observation(
            embodiment="unitree_go2",
            state=codec.numpy_to_tensor(obs["state"]),
            images={"head": codec.raw_image(np.zeros((224, 224, 4), np.uint8))},
        )
    )
    with pytest.raises(sb_errors.InvalidArgument, match=r"images\[head\].raw.shape"):
        robot.act_request(request)


def test_wrong_model_is_not_found(robot, reference) -> None:
    obs = _observation(reference.embodiments["franka_arm"], np.random.default_rng(1))
    with pytest.raises(sb_errors.NotFound, match="observation.model"):
        robot.act(**obs, model="no-such-model")


def test_oversized_message_is_resource_exhausted(robot, reference) -> None:
    obs = _observation(reference.embodiments["unitree_go2"], np.random.default_rng(2))
    obs["images"]["head"] = np.zeros((2048, 2048, 3), np.uint8)  # 12 MiB > the test app's 4 MiB limit
    with pytest.raises(sb_errors.ResourceExhausted):
        robot.act(**obs)


def test_deadline_is_honoured(robot, reference) -> None:
    obs = _observation(reference.embodiments["aloha_dual_arm"], np.random.default_rng(4))
    with pytest.raises(sb_errors.DeadlineExceeded):
        robot.act(**obs, timeout=0.001)
    assert robot.act(**obs).actions.shape == (25, 14)


def test_stream_session(robot, reference) -> None:
    spec = reference.embodiments["franka_arm"]
    rng = np.random.default_rng(11)
    with robot.stream("franka_arm", instruction="stack the blocks") as session:
        for step in range(5):
            obs = _observation(spec, rng)
            chunk = session.act(images=obs["images"], state=obs["state"])
            assert chunk.step == step and chunk.actions.shape == (16, 8)
        bad = _observation(spec, rng)
        bad["state"][3] = np.inf
        with pytest.raises(sb_errors.InvalidArgument, match="observation.state"):
            session.act(images=bad["images"], state=bad["state"])
        obs = _observation(spec, rng)
        assert session.act(images=obs["images"], state=obs["state"]).actions.shape == (16, 8)


def test_serves_a_checkpoint_directory(ray_session, tmp_path, reference) -> None:
    """`superbrain serve --model DIR`: a checkpoint on disk serves the same actions as the model it holds."""
    from serving import launcher
    from serving.config import ServingConfig
    from serving.models.checkpoint import write_default_checkpoint
    from tests.servers import free_port

    write_default_checkpoint(tmp_path / "ckpt", seed=0)
    cfg = ServingConfig(
        grpc_port=free_port(),
        model_dir=str(tmp_path / "ckpt"),
        replica_num_cpus=0.5,
        torch_threads=1,
        app_name="from-checkpoint",
        auth=False,
        state_dir=str(tmp_path / "state"),
        metrics_port=0,
    )
    launcher.deploy(cfg)
    try:
        obs = _observation(reference.embodiments["aloha_dual_arm"], np.random.default_rng(21))
        with RobotClient(cfg.address, timeout=30) as client:
            chunk = client.act(**obs)
        np.testing.assert_allclose(chunk.actions, reference.infer([PolicyObservation(**obs)])[0], atol=1e-4)
    finally:
        launcher.undeploy(cfg)


def test_superbrain_act_command(superbrain, capsys) -> None:
    from serving.cli import main

    assert main(["act", "--target", superbrain.address, "--embodiment", "aloha_dual_arm", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    import json

    reply = json.loads(out)
    assert np.asarray(reply["actions"]).shape == (25, 14)


def _replica_thread_niceness(app_name: str) -> dict[int, set[int]]:
    """pid -> the nice values of its threads, for every Serve replica process of ``app_name``."""
    found: dict[int, set[int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if f"ServeReplica:{app_name}:" not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            found[int(proc.name)] = {
                int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]) for task in (proc / "task").iterdir()
            }
        except OSError:
            continue  # exited meanwhile
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads thread priorities from Linux's /proc")
def test_replicas_serve_at_normal_priority_not_rays_worker_niceness(superbrain, robot) -> None:
    """Ray starts workers at nice 15; a replica (its request loop included) must run at the
    cluster's own priority (nice 0 unless the cluster was started niced), or any busy process
    on the node takes the cores from the serving path."""
    robot.describe()  # the replica is up and serving
    cluster = os.getpriority(os.PRIO_PROCESS, 0)  # this process started the test cluster
    niceness = _replica_thread_niceness(superbrain.app_name)
    assert niceness, "no replica process of the app found"
    assert all(values == {cluster} for values in niceness.values()), (cluster, niceness)
