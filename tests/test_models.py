"""Default embodiments, TinyVLA and the checkpoint format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from serving.models.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMeta,
    build_default_model,
    default_meta,
    load_checkpoint,
    read_config,
    save_checkpoint,
    write_default_checkpoint,
)
from serving.models.embodiments import check_embodiment, default_embodiments
from serving.models.vla import TinyVLA, VLAConfig

SPECS = {s.name: s for s in default_embodiments()}


@pytest.fixture(scope="module")
def model() -> TinyVLA:
    return build_default_model(seed=0)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_default_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)


def _inputs(config: VLAConfig, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random model inputs with a valid padding structure (every sample has >= 1 camera)."""
    g = torch.Generator().manual_seed(seed)
    cameras = torch.randint(1, config.max_cameras + 1, (batch,), generator=g)
    state_dims = torch.randint(1, config.max_state_dim + 1, (batch,), generator=g)
    words = torch.randint(0, config.max_tokens + 1, (batch,), generator=g)
    token_mask = torch.arange(config.max_tokens)[None] < words[:, None]
    return {
        "images": torch.rand(batch, config.max_cameras, 3, config.image_size, config.image_size, generator=g) * 2 - 1,
        "camera_mask": torch.arange(config.max_cameras)[None] < cameras[:, None],
        "state": torch.randn(batch, config.max_state_dim, generator=g),
        "state_mask": torch.arange(config.max_state_dim)[None] < state_dims[:, None],
        "embodiment_ids": torch.randint(0, config.num_embodiments, (batch,), generator=g),
        "token_ids": torch.randint(1, config.vocab_size, (batch, config.max_tokens), generator=g) * token_mask,
        "token_mask": token_mask,
    }


def _run(model: TinyVLA, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.inference_mode():
        return model(**inputs)


# -- Embodiments ------------------------------------------------------------------------


def test_default_embodiments_have_the_documented_shapes() -> None:
    shapes = {
        n: (s.state_dim, s.action_dim, s.camera_names, s.chunk_length, s.control_rate_hz) for n, s in SPECS.items()
    }
    assert shapes == {
        "franka_arm": (8, 8, ("front", "wrist"), 16, 20.0),
        "aloha_dual_arm": (14, 14, ("front", "left_wrist", "right_wrist"), 25, 50.0),
        "unitree_go2": (18, 12, ("head",), 8, 50.0),
    }
    for spec in SPECS.values():
        check_embodiment(spec)  # lengths, std > 0, low <= high
        assert all((c.height, c.width) == (224, 224) for c in spec.cameras)
        assert spec.description
        # The mean action is a legal action.
        assert all(lo <= m <= hi for lo, m, hi in zip(spec.action_low, spec.action_mean, spec.action_high, strict=True))
    franka = SPECS["franka_arm"]
    assert (franka.action_low[7], franka.action_high[7]) == (0.0, 1.0)  # gripper


def test_default_embodiments_are_deterministic() -> None:
    assert default_embodiments() == default_embodiments()


# -- VLAConfig and TinyVLA --------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    config = VLAConfig.for_embodiments(list(SPECS.values()), d_model=64, n_heads=4)
    assert (config.max_cameras, config.max_state_dim, config.max_action_dim, config.horizon) == (3, 18, 14, 25)
    assert VLAConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown VLAConfig fields"):
        VLAConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match="divisible"):
        VLAConfig(d_model=100, n_heads=3)


def test_same_seed_same_weights_and_global_rng_untouched() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = build_default_model(0), build_default_model(0), build_default_model(1)
    assert torch.equal(torch.rand(1), expected_next)  # building never consumed the global RNG
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_output_shape_and_bound(model: TinyVLA) -> None:
    cfg = model.config
    out = _run(model, _inputs(cfg, 5))
    assert out.shape == (5, cfg.horizon, cfg.max_action_dim) and out.dtype == torch.float32
    assert out.abs().max() <= cfg.action_bound
    assert out.std() > 0.01  # not degenerate


def test_each_sample_depends_only_on_itself(model: TinyVLA) -> None:
    inputs = _inputs(model.config, 12, seed=3)
    together = _run(model, inputs)
    for i in range(12):
        alone = _run(model, {k: v[i : i + 1] for k, v in inputs.items()})
        torch.testing.assert_close(alone[0], together[i], atol=1e-4, rtol=0)


def test_padding_is_ignored(model: TinyVLA) -> None:
    """What sits in masked-out slots (frames, state dims, words) must not change the actions."""
    inputs = _inputs(model.config, 6, seed=4)
    base = _run(model, inputs)
    noisy = dict(inputs)
    noisy["images"] = torch.where(inputs["camera_mask"][:, :, None, None, None], inputs["images"], 0.7)
    noisy["state"] = torch.where(inputs["state_mask"], inputs["state"], 5.0)
    noisy["token_ids"] = torch.where(inputs["token_mask"], inputs["token_ids"], 17)
    torch.testing.assert_close(_run(model, noisy), base, atol=1e-5, rtol=0)


def test_inputs_matter(model: TinyVLA) -> None:
    inputs = _inputs(model.config, 2, seed=5)
    base = _run(model, inputs)
    for key in ("images", "state"):
        changed = {**inputs, key: inputs[key] + 0.5}
        assert (_run(model, changed) - base).abs().max() > 1e-3, key
    other = {**inputs, "embodiment_ids": (inputs["embodiment_ids"] + 1) % model.config.num_embodiments}
    assert (_run(model, other) - base).abs().max() > 1e-3


# -- Checkpoints ------------------------------------------------------------------------


def test_checkpoint_round_trip(model: TinyVLA, checkpoint_dir: Path) -> None:
    assert {p.name for p in checkpoint_dir.iterdir()} == {WEIGHTS_FILE, CONFIG_FILE}
    config = json.loads((checkpoint_dir / CONFIG_FILE).read_text())
    assert config["format_version"] == 1 and config["name"] == "tiny-vla"
    assert [e["name"] for e in config["embodiments"]] == list(SPECS)

    loaded = load_checkpoint(checkpoint_dir)
    assert loaded.meta == default_meta(0)
    assert loaded.model.config == model.config and not loaded.model.training
    inputs = _inputs(model.config, 4)
    assert torch.equal(_run(loaded.model, inputs), _run(model, inputs))


def test_policy_class_is_stored(tmp_path: Path, model: TinyVLA) -> None:
    meta = CheckpointMeta("custom", "2", tuple(SPECS.values()), policy_class="pkg.mod:MyPolicy")
    save_checkpoint(tmp_path, model, meta)
    assert read_config(tmp_path)["policy_class"] == "pkg.mod:MyPolicy"
    assert load_checkpoint(tmp_path).meta == meta


def test_save_rejects_embodiments_that_do_not_fit(tmp_path: Path, model: TinyVLA) -> None:
    with pytest.raises(CheckpointError, match="num_embodiments=3"):
        save_checkpoint(tmp_path, model, CheckpointMeta("x", "1", (SPECS["franka_arm"],)))


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(changes)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def test_missing_files_are_named(tmp_path: Path, checkpoint_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)
    broken = _copy(checkpoint_dir, tmp_path / "no_weights")
    (broken / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_checkpoint(broken)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
        (lambda d: (d / CONFIG_FILE).write_text("[1, 2]"), "JSON object"),
        (lambda d: _edit_config(d, format="other"), "'format' must be"),
        (lambda d: _edit_config(d, format_version=99), "unsupported format_version 99"),
        (lambda d: _edit_config(d, model={"d_model": 64, "bogus": 1}), "unknown VLAConfig fields"),
        (lambda d: _edit_config(d, model={**VLAConfig().to_dict(), "d_model": 96}), "does not match"),
        (lambda d: _edit_config(d, embodiments=[{"name": "x"}]), "embodiment 'x'"),
        (lambda d: _edit_config(d, policy_class=3), "policy_class"),
        (lambda d: (d / WEIGHTS_FILE).write_bytes(b"garbage"), "cannot read"),
    ],
)
def test_invalid_checkpoints_are_explained(tmp_path: Path, checkpoint_dir: Path, damage, message) -> None:
    broken = _copy(checkpoint_dir, tmp_path / "broken")
    damage(broken)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(broken)


def test_model_is_small() -> None:
    params = sum(p.numel() for p in build_default_model(0).parameters())
    assert 1e6 < params < 5e6
