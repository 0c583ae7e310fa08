"""Batch assembly over mixed embodiments: padding, masks, normalisation, and the way back."""

from __future__ import annotations

import numpy as np
import pytest

from serving.batching import STATE_CLAMP, BatchAssembler, BatchDims, EmbodimentTable
from serving.models.embodiments import default_embodiments
from serving.policy.base import PolicyObservation
from serving.processing import get_backend, normalize_images, resize_bilinear, tokenize

SPECS = {s.name: s for s in default_embodiments()}
DIMS = BatchDims(
    image_size=16, max_cameras=3, max_state_dim=18, max_action_dim=14, horizon=25, max_tokens=6, vocab_size=64
)


def _obs(rng: np.random.Generator, name: str, size: tuple[int, int] = (24, 24), instruction: str = "go"):
    spec = SPECS[name]
    images = {c.name: rng.integers(0, 256, (*size, 3), dtype=np.uint8) for c in spec.cameras}
    # Around the embodiment's statistics, as a real robot's state would be.
    state = (np.array(spec.state_mean) + np.array(spec.state_std) * rng.normal(size=spec.state_dim)).astype(np.float32)
    return PolicyObservation(name, images, state, instruction)


@pytest.fixture
def mixed() -> list[PolicyObservation]:
    rng = np.random.default_rng(7)
    return [
        _obs(rng, "franka_arm", (24, 24), "pick up the cup"),
        _obs(rng, "unitree_go2", (37, 53), "walk forward"),
        _obs(rng, "aloha_dual_arm", (24, 24), ""),
        _obs(rng, "franka_arm", (16, 16), "open the drawer please now now now"),
    ]


def test_layout_masks_and_ids(mixed) -> None:
    batch = BatchAssembler(SPECS.values(), DIMS).assemble(mixed)
    assert len(batch) == 4
    assert batch.images.shape == (4, 3, 3, 16, 16) and batch.images.dtype == np.float32
    assert batch.camera_mask.tolist() == [
        [True, True, False],
        [True, False, False],
        [True, True, True],
        [True, True, False],
    ]
    assert batch.embodiment_ids.tolist() == [0, 2, 1, 0]
    assert batch.state_mask.sum(axis=1).tolist() == [8, 18, 14, 8]
    # Empty camera slots are zeros, real ones are not.
    assert not batch.images[~batch.camera_mask].any()
    assert np.abs(batch.images[batch.camera_mask]).sum(axis=(1, 2, 3)).min() > 0


def test_frames_land_in_their_embodiments_camera_slots(mixed) -> None:
    batch = BatchAssembler(SPECS.values(), DIMS).assemble(mixed)
    xp = get_backend("numpy")
    for row, obs in enumerate(mixed):
        for slot, name in enumerate(SPECS[obs.embodiment].camera_names):
            frame = obs.images[name][None]
            expected = normalize_images(resize_bilinear(frame, 16, 16, xp), DIMS.image_mean, DIMS.image_std, xp)[0]
            np.testing.assert_allclose(batch.images[row, slot], expected, atol=1e-6)


def test_state_is_normalised_and_zero_padded(mixed) -> None:
    batch = BatchAssembler(SPECS.values(), DIMS).assemble(mixed)
    for row, obs in enumerate(mixed):
        spec = SPECS[obs.embodiment]
        expected = (obs.state - np.array(spec.state_mean)) / np.array(spec.state_std)
        np.testing.assert_allclose(batch.state[row, : spec.state_dim], expected, rtol=1e-5, atol=1e-5)
        assert not batch.state[row, spec.state_dim :].any()


def test_extreme_state_is_clamped() -> None:
    rng = np.random.default_rng(0)
    obs = _obs(rng, "franka_arm")
    obs.state = np.array([1e30, -1e30, 0, 0, 0, 0, 0, 0], np.float32)
    state = BatchAssembler(SPECS.values(), DIMS).assemble([obs]).state
    assert state[0, 0] == STATE_CLAMP and state[0, 1] == -STATE_CLAMP


def test_tokens_match_the_tokenizer(mixed) -> None:
    batch = BatchAssembler(SPECS.values(), DIMS).assemble(mixed)
    ids, mask = tokenize([o.instruction for o in mixed], DIMS.max_tokens, DIMS.vocab_size)
    np.testing.assert_array_equal(batch.token_ids, ids)
    np.testing.assert_array_equal(batch.token_mask, mask)
    assert batch.token_mask.sum(axis=1).tolist() == [4, 2, 0, 6]


def test_torch_backend_builds_the_same_batch(mixed) -> None:
    a = BatchAssembler(SPECS.values(), DIMS).assemble(mixed)
    tb = get_backend("torch")
    b = BatchAssembler(SPECS.values(), DIMS, tb).assemble(mixed)
    for field in ("images", "camera_mask", "state", "state_mask", "embodiment_ids", "token_ids", "token_mask"):
        np.testing.assert_allclose(tb.to_host(getattr(b, field)), getattr(a, field), atol=1e-5, err_msg=field)


def test_cache_blocking_does_not_change_the_batch(mixed) -> None:
    whole = BatchAssembler(SPECS.values(), DIMS)
    whole.frames_per_call = None
    blocked = BatchAssembler(SPECS.values(), DIMS)
    blocked.frames_per_call = 2
    np.testing.assert_array_equal(blocked.assemble(mixed).images, whole.assemble(mixed).images)


def test_split_returns_each_observation_its_own_rows(mixed) -> None:
    assembler = BatchAssembler(SPECS.values(), DIMS)
    b, t, a = len(mixed), DIMS.horizon, DIMS.max_action_dim
    # Every value encodes (row, step, dim), so a chunk can be traced back to its row.
    actions = np.arange(b * t * a, dtype=np.float64).reshape(b, t, a)
    chunks = assembler.split(actions, mixed)
    for row, (obs, chunk) in enumerate(zip(mixed, chunks, strict=True)):
        spec = SPECS[obs.embodiment]
        assert chunk.shape == (spec.chunk_length, spec.action_dim) and chunk.dtype == np.float32
        np.testing.assert_array_equal(chunk, actions[row, : spec.chunk_length, : spec.action_dim])
        assert not np.shares_memory(chunk, actions)
    with pytest.raises(ValueError, match="3 action rows for 4 observations"):
        assembler.split(actions[:3], mixed)


def test_table_pads_neutrally() -> None:
    table = EmbodimentTable.from_specs(list(SPECS.values()), DIMS)
    go2 = table.index["unitree_go2"]
    assert table.action_std[go2, 12:].tolist() == [1.0, 1.0]
    assert table.action_mean[go2, 12:].tolist() == [0.0, 0.0]
    assert table.action_low[go2, 12:].tolist() == table.action_high[go2, 12:].tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda o: setattr(o, "embodiment", "hovercraft"), "unknown embodiment 'hovercraft'"),
        (lambda o: o.images.pop("wrist"), "missing camera 'wrist'"),
        (lambda o: setattr(o, "state", np.zeros(5, np.float32)), "state has 5 values, needs 8"),
        (lambda o: o.state.__setitem__(2, np.nan), "NaN or inf"),
        (lambda o: o.images.__setitem__("front", np.zeros((4, 4), np.uint8)), "expected uint8"),
    ],
)
def test_bad_observations_are_named(mutate, message) -> None:
    obs = _obs(np.random.default_rng(1), "franka_arm")
    mutate(obs)
    with pytest.raises(ValueError, match=message):
        BatchAssembler(SPECS.values(), DIMS).assemble([obs])


def test_empty_batch_and_oversized_embodiment_are_rejected() -> None:
    with pytest.raises(ValueError, match="empty"):
        BatchAssembler(SPECS.values(), DIMS).assemble([])
    small = BatchDims(16, 2, 18, 14, 25, 4, 16)
    with pytest.raises(ValueError, match="'aloha_dual_arm': cameras 3 exceeds the model's 2"):
        BatchAssembler(SPECS.values(), small)
