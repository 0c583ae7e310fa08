"""Policy backends (VLAPolicy, NoopPolicy) and the policy loader."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import serving.policy as policy_pkg
from serving.models.checkpoint import CONFIG_FILE, write_default_checkpoint
from serving.models.embodiments import default_embodiments
from serving.policy import NoopPolicy, Policy, PolicyObservation, VLAPolicy, load_policy
from serving.policy.base import EmbodimentSpec

SPECS = {s.name: s for s in default_embodiments()}


class CustomPolicy(Policy):
    """A minimal third-party policy, loaded by "module:Class" in the tests below."""

    name = "custom"

    def __init__(self, model_dir: str | None = None):
        self.model_dir = model_dir

    @property
    def embodiments(self) -> dict[str, EmbodimentSpec]:
        return SPECS

    def preprocess(self, observations: list[PolicyObservation]) -> list[PolicyObservation]:
        return observations

    def forward(self, batch: list[PolicyObservation]) -> list[PolicyObservation]:
        return batch

    def postprocess(self, outputs: list[PolicyObservation], observations: list[PolicyObservation]) -> list[np.ndarray]:
        return [
            np.ones((SPECS[o.embodiment].chunk_length, SPECS[o.embodiment].action_dim), np.float32) for o in outputs
        ]


class NotAPolicy:
    pass


def _obs(rng: np.random.Generator, name: str, size=(224, 224), instruction="pick up the red cup"):
    spec = SPECS[name]
    images = {c.name: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for c in spec.cameras}
    state = (np.array(spec.state_mean) + np.array(spec.state_std) * rng.normal(size=spec.state_dim)).astype(np.float32)
    return PolicyObservation(name, images, state, instruction)


def _mixed(seed: int = 0) -> list[PolicyObservation]:
    rng = np.random.default_rng(seed)
    return [
        _obs(rng, "franka_arm"),
        _obs(rng, "aloha_dual_arm", (37, 53), "fold the towel"),
        _obs(rng, "unitree_go2", (120, 160), "walk to the door"),
        _obs(rng, "franka_arm", (96, 96), ""),
        _obs(rng, "unitree_go2"),
        _obs(rng, "aloha_dual_arm"),
    ]


def _assert_within_limits(chunks: list[np.ndarray], observations: list[PolicyObservation]) -> None:
    for chunk, obs in zip(chunks, observations, strict=True):
        spec = SPECS[obs.embodiment]
        assert chunk.shape == (spec.chunk_length, spec.action_dim) and chunk.dtype == np.float32
        # Compared in float64 against the limits exactly as written.
        assert (chunk.astype(np.float64) >= np.array(spec.action_low)).all(), obs.embodiment
        assert (chunk.astype(np.float64) <= np.array(spec.action_high)).all(), obs.embodiment


@pytest.fixture(scope="module")
def policy() -> VLAPolicy:
    pol = VLAPolicy.default(seed=0)
    pol.setup("cpu")
    return pol


# -- VLAPolicy ----------------------------------------------------------------------------


def test_infer_returns_one_chunk_per_observation_within_limits(policy: VLAPolicy) -> None:
    observations = _mixed()
    chunks = policy.infer(observations)
    assert len(chunks) == len(observations)
    _assert_within_limits(chunks, observations)
    assert policy.name == "tiny-vla" and policy.version == "0.1.0+seed0"
    assert set(policy.embodiments) == set(SPECS)


def test_alone_equals_inside_a_mixed_batch(policy: VLAPolicy) -> None:
    observations = _mixed(seed=1)
    together = policy.infer(observations)
    for obs, chunk in zip(observations, together, strict=True):
        np.testing.assert_allclose(policy.infer([obs])[0], chunk, atol=1e-4, rtol=0)
    # And order within the batch does not matter either.
    reversed_chunks = policy.infer(observations[::-1])[::-1]
    for a, b in zip(reversed_chunks, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


def test_observations_are_not_confused(policy: VLAPolicy) -> None:
    """Two robots of the same kind with different inputs get different chunks."""
    observations = _mixed(seed=2)
    chunks = policy.infer([observations[0], observations[3]])
    assert np.abs(chunks[0] - chunks[1]).max() > 1e-4


def test_limits_hold_for_extreme_inputs(policy: VLAPolicy) -> None:
    rng = np.random.default_rng(3)
    observations = []
    for name, spec in SPECS.items():
        for value, pixel in ((1e30, 255), (-1e30, 0)):
            obs = _obs(rng, name, instruction="x " * 100)
            obs.state = np.full(spec.state_dim, value, np.float32)
            obs.images = {k: np.full_like(v, pixel) for k, v in obs.images.items()}
            observations.append(obs)
    _assert_within_limits(policy.infer(observations), observations)


def test_postprocess_clips_whatever_the_model_says(policy: VLAPolicy) -> None:
    observations = _mixed(seed=4)
    cfg = policy.model.config
    wild = torch.randn(len(observations), cfg.horizon, cfg.max_action_dim) * 1e3
    chunks = policy.postprocess(wild, observations)
    _assert_within_limits(chunks, observations)
    # The clip was active: values sit exactly on the (float32-rounded-inward) limits.
    assert any(
        (np.abs(c - np.array(SPECS[o.embodiment].action_high)) < 1e-6).any()
        for c, o in zip(chunks, observations, strict=True)
    )
    with pytest.raises(RuntimeError, match="non-finite"):
        policy.postprocess(torch.full_like(wild, float("nan")), observations)


def test_checkpoint_round_trip_gives_identical_actions(policy: VLAPolicy, tmp_path: Path) -> None:
    write_default_checkpoint(tmp_path / "ckpt", seed=0)
    observations = _mixed(seed=5)
    expected = policy.infer(observations)
    for loaded in (VLAPolicy.from_checkpoint(tmp_path / "ckpt"), load_policy("default", str(tmp_path / "ckpt"))):
        assert isinstance(loaded, VLAPolicy) and loaded.version == policy.version
        for a, b in zip(loaded.infer(observations), expected, strict=True):
            np.testing.assert_array_equal(a, b)


def test_different_seeds_give_different_policies(policy: VLAPolicy) -> None:
    observations = _mixed(seed=6)[:1]
    other = VLAPolicy.default(seed=1)
    assert other.version != policy.version
    assert np.abs(other.infer(observations)[0] - policy.infer(observations)[0]).max() > 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    observations = _mixed(seed=7)
    cpu = VLAPolicy.default(seed=0).infer(observations)
    gpu_policy = VLAPolicy.default(seed=0)
    gpu_policy.setup("cuda")
    assert gpu_policy.preprocess(observations).images.device.type == "cuda"
    for a, b in zip(gpu_policy.infer(observations), cpu, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=0)


# -- NoopPolicy ---------------------------------------------------------------------------


def test_noop_returns_clipped_zeros_fast() -> None:
    noop = NoopPolicy()
    observations = _mixed(seed=8) * 10
    start = time.perf_counter()
    chunks = noop.infer(observations)
    assert time.perf_counter() - start < 0.05
    _assert_within_limits(chunks, observations)
    go2 = chunks[2]
    np.testing.assert_allclose(go2[:, 2], -0.84, rtol=1e-6)  # calf: 0 is outside its range, so its bound
    franka = chunks[0]
    assert not franka.any()  # zero deltas and a closed gripper are legal
    franka[:] = 5  # callers own their chunks
    assert not noop.infer(observations[:1])[0].any()
    assert noop.name == "noop" and set(noop.embodiments) == set(SPECS)


def test_noop_rejects_unknown_embodiment() -> None:
    obs = _mixed()[0]
    obs.embodiment = "hovercraft"
    with pytest.raises(ValueError, match="hovercraft"):
        NoopPolicy().infer([obs])


# -- Loader -------------------------------------------------------------------------------


def test_load_builtin_policies() -> None:
    assert isinstance(load_policy("noop"), NoopPolicy)
    default = load_policy()
    assert isinstance(default, VLAPolicy) and default.version.endswith("seed0")
    assert load_policy("default", seed=2).version.endswith("seed2")


def test_load_by_module_and_class(tmp_path: Path) -> None:
    pol = load_policy(f"{__name__}:CustomPolicy")
    assert isinstance(pol, CustomPolicy) and pol.model_dir is None
    pol = load_policy(f"{__name__}:CustomPolicy", model_dir=str(tmp_path))
    assert pol.model_dir == str(tmp_path)
    assert pol.infer(_mixed()[:1])[0].shape == (16, 8)
    vla = load_policy("serving.policy.vla_policy:VLAPolicy")
    assert isinstance(vla, VLAPolicy)


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        (f"{__name__}:NotAPolicy", TypeError, "not a subclass of serving.policy.Policy"),
        (f"{__name__}:_obs", TypeError, "not a subclass"),
        (f"{__name__}:Missing", ImportError, "has no attribute 'Missing'"),
        ("no_such_module_xyz:Policy", ImportError, "cannot import module 'no_such_module_xyz'"),
        ("just-a-name", ValueError, "use 'default', 'noop' or 'module:Class'"),
        (":Class", ValueError, "'module:Class'"),
        ("a:b:c", ValueError, "'module:Class'"),
    ],
)
def test_bad_policy_specs_are_explained(spec: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        load_policy(spec)


def test_checkpoint_can_name_its_policy_class(tmp_path: Path) -> None:
    directory = write_default_checkpoint(tmp_path / "ckpt", seed=0)
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["policy_class"] = f"{__name__}:CustomPolicy"
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    pol = load_policy("default", model_dir=str(directory))
    assert isinstance(pol, CustomPolicy) and pol.model_dir == str(directory)


def test_package_exports() -> None:
    for name in (
        "CameraSpec",
        "EmbodimentSpec",
        "Policy",
        "PolicyObservation",
        "VLAPolicy",
        "NoopPolicy",
        "load_policy",
    ):
        assert hasattr(policy_pkg, name)
    with pytest.raises(AttributeError):
        _ = policy_pkg.DoesNotExist
