"""Batch assembly: mixed-embodiment observations -> one padded model batch, and back.

One model serves every embodiment, so a batch mixes robots with different
cameras, state sizes, action sizes and chunk lengths. Everything is padded to the
model's maxima and paired with a mask, so each sample's output depends on that
sample alone (the model never looks at padding). Frames are grouped by source
size and each group is resized and normalised in one vectorised call (one fused
kernel launch on a backend that has one: CuPy; the seam's resize + normalise
otherwise).

Plain Python + an ``ArrayBackend``: no Ray, no torch import.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from serving.models.embodiments import check_fits
from serving.policy.base import EmbodimentSpec, PolicyObservation
from serving.processing import ArrayBackend, get_backend, resize_normalize, tokenize
from serving.processing.actions import float32_limits
from serving.processing.backend import Array

#: Normalised state values are clamped to +-this many standard deviations. A state that
#: far from the statistics is out of distribution anyway; clamping keeps the network's
#: activations finite for any finite input (1e30 would otherwise overflow float32 maths).
STATE_CLAMP = 10.0

#: Frames resized per kernel call on CPU (see BatchAssembler.frames_per_call).
CPU_FRAMES_PER_CALL = 8


@dataclass(frozen=True)
class BatchDims:
    """The model's fixed input/output sizes that every batch is padded to."""

    image_size: int
    max_cameras: int
    max_state_dim: int
    max_action_dim: int
    horizon: int
    max_tokens: int
    vocab_size: int
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)


@dataclass
class ModelBatch:
    """Padded model inputs for B observations; arrays belong to the assembler's backend.

    Masks are True where the entry is real. Empty camera slots hold zeros.
    """

    images: Array  # float32 (B, max_cameras, 3, S, S), normalised, channels-first
    camera_mask: Array  # bool (B, max_cameras); slots follow the embodiment's camera order
    state: Array  # float32 (B, max_state_dim), normalised, zero-padded
    state_mask: Array  # bool (B, max_state_dim)
    embodiment_ids: Array  # int64 (B,), position in the model's embodiment list
    token_ids: Array  # int64 (B, max_tokens), 0 = padding
    token_mask: Array  # bool (B, max_tokens)

    def __len__(self) -> int:
        return int(self.embodiment_ids.shape[0])


@dataclass(frozen=True)
class EmbodimentTable:
    """Per-embodiment statistics padded to the model's sizes, one row per embodiment id.

    A batch gets its per-sample statistics with one gather (``table.action_mean[ids]``)
    instead of a Python loop. Padding: mean 0, std 1, limits 0, mask False.
    """

    specs: tuple[EmbodimentSpec, ...]
    index: dict[str, int]
    state_mean: np.ndarray  # float32 (E, max_state_dim)
    state_std: np.ndarray
    state_mask: np.ndarray  # bool (E, max_state_dim)
    action_mean: np.ndarray  # float32 (E, max_action_dim)
    action_std: np.ndarray
    action_low: np.ndarray  # float32, rounded inward (see float32_limits)
    action_high: np.ndarray

    @classmethod
    def from_specs(cls, specs: Sequence[EmbodimentSpec], dims: BatchDims) -> EmbodimentTable:
        specs = tuple(specs)
        if not specs:
            raise ValueError("at least one embodiment is needed")
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"embodiment names must be unique, got {names}")
        for s in specs:
            check_fits(
                s,
                max_cameras=dims.max_cameras,
                max_state_dim=dims.max_state_dim,
                max_action_dim=dims.max_action_dim,
                horizon=dims.horizon,
            )
        e, sd, ad = len(specs), dims.max_state_dim, dims.max_action_dim
        state_mean = np.zeros((e, sd), np.float32)
        state_std = np.ones((e, sd), np.float32)
        state_mask = np.zeros((e, sd), bool)
        action_mean = np.zeros((e, ad), np.float32)
        action_std = np.ones((e, ad), np.float32)
        action_low = np.zeros((e, ad), np.float32)
        action_high = np.zeros((e, ad), np.float32)
        for i, s in enumerate(specs):
            state_mean[i, : s.state_dim] = s.state_mean
            state_std[i, : s.state_dim] = s.state_std
            state_mask[i, : s.state_dim] = True
            action_mean[i, : s.action_dim] = s.action_mean
            action_std[i, : s.action_dim] = s.action_std
            action_low[i, : s.action_dim], action_high[i, : s.action_dim] = float32_limits(s.action_low, s.action_high)
        return cls(
            specs=specs,
            index={name: i for i, name in enumerate(names)},
            state_mean=state_mean,
            state_std=state_std,
            state_mask=state_mask,
            action_mean=action_mean,
            action_std=action_std,
            action_low=action_low,
            action_high=action_high,
        )

    def ids(self, observations: Sequence[PolicyObservation]) -> np.ndarray:
        """Embodiment ids int64 (B,) for the observations; ValueError for an unknown embodiment."""
        try:
            return np.fromiter((self.index[o.embodiment] for o in observations), np.int64, len(observations))
        except KeyError as exc:
            raise ValueError(f"unknown embodiment {exc.args[0]!r}; known: {sorted(self.index)}") from None


class BatchAssembler:
    """Builds ``ModelBatch``es for one model and splits its outputs back per observation."""

    def __init__(
        self,
        embodiments: Sequence[EmbodimentSpec],
        dims: BatchDims,
        xp: ArrayBackend | None = None,
    ):
        self.dims = dims
        self.table = EmbodimentTable.from_specs(embodiments, dims)
        self.xp = xp if xp is not None else get_backend("numpy")
        #: Frames per kernel call. On CPU, 8 frames' temporaries stay in cache, which is about
        #: twice as fast as one call over a whole batch; an accelerator wants everything at once.
        self.frames_per_call: int | None = CPU_FRAMES_PER_CALL if self.xp.device == "cpu" else None

    def assemble(self, observations: Sequence[PolicyObservation]) -> ModelBatch:
        """Pad, normalise and stack ``observations`` (any mix of embodiments) into one batch."""
        if not observations:
            raise ValueError("cannot assemble an empty batch")
        xp, dims = self.xp, self.dims
        ids = self.table.ids(observations)
        images, camera_mask = self._images(observations, ids)
        state = self._state(observations, ids)
        token_ids, token_mask = tokenize([o.instruction for o in observations], dims.max_tokens, dims.vocab_size)
        return ModelBatch(
            images=images,
            camera_mask=xp.asarray(camera_mask),
            state=xp.asarray(state),
            state_mask=xp.asarray(self.table.state_mask[ids]),
            embodiment_ids=xp.asarray(ids),
            token_ids=xp.asarray(token_ids),
            token_mask=xp.asarray(token_mask),
        )

    def split(self, actions: np.ndarray, observations: Sequence[PolicyObservation]) -> list[np.ndarray]:
        """Cut host actions (B, T, A) into per-observation float32 (chunk_length, action_dim) copies."""
        if actions.shape[0] != len(observations):
            raise ValueError(f"{actions.shape[0]} action rows for {len(observations)} observations")
        out = []
        for row, obs in zip(actions, observations, strict=True):
            spec = self.table.specs[self.table.index[obs.embodiment]]
            # A copy, so a returned chunk never keeps the whole batch buffer alive.
            out.append(np.array(row[: spec.chunk_length, : spec.action_dim], dtype=np.float32))
        return out

    def _images(self, observations: Sequence[PolicyObservation], ids: np.ndarray) -> tuple[Array, np.ndarray]:
        xp, size, dims = self.xp, self.dims.image_size, self.dims
        camera_mask = np.zeros((len(observations), dims.max_cameras), bool)
        # (height, width) -> [(row, slot, frame)]: one resize call per source size.
        groups: dict[tuple[int, int], list[tuple[int, int, np.ndarray]]] = {}
        for row, (obs, eid) in enumerate(zip(observations, ids, strict=True)):
            spec = self.table.specs[eid]
            for slot, name in enumerate(spec.camera_names):
                frame = obs.images.get(name)
                if frame is None:
                    raise ValueError(f"observation {row} ({spec.name}): missing camera {name!r}")
                if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                    raise ValueError(
                        f"observation {row} camera {name!r}: expected uint8 (H, W, 3), got {frame.dtype} {frame.shape}"
                    )
                groups.setdefault(frame.shape[:2], []).append((row, slot, frame))
                camera_mask[row, slot] = True

        images = xp.zeros((len(observations), dims.max_cameras, 3, size, size), "float32")
        for members in groups.values():
            block = self.frames_per_call or len(members)
            for start in range(0, len(members), block):
                part = members[start : start + block]
                rows = xp.asarray(np.array([m[0] for m in part], dtype=np.int64))
                slots = xp.asarray(np.array([m[1] for m in part], dtype=np.int64))
                # One host->device copy of the group, as uint8; a fused kernel where the backend has one.
                stacked = xp.stack_frames([m[2] for m in part])
                images[rows, slots] = resize_normalize(stacked, size, size, dims.image_mean, dims.image_std, xp)
        return images, camera_mask

    def _state(self, observations: Sequence[PolicyObservation], ids: np.ndarray) -> np.ndarray:
        raw = np.zeros((len(observations), self.dims.max_state_dim), np.float32)
        for row, (obs, eid) in enumerate(zip(observations, ids, strict=True)):
            want = self.table.specs[eid].state_dim
            state = np.asarray(obs.state, dtype=np.float32).reshape(-1)
            if state.shape[0] != want:
                raise ValueError(
                    f"observation {row} ({obs.embodiment}): state has {state.shape[0]} values, needs {want}"
                )
            raw[row, :want] = state
        if not np.isfinite(raw).all():
            bad = int(np.flatnonzero(~np.isfinite(raw).all(axis=1))[0])
            raise ValueError(f"observation {bad} ({observations[bad].embodiment}): state contains NaN or inf")
        normalised = (raw - self.table.state_mean[ids]) / self.table.state_std[ids]
        # Padding stays exactly 0 (mean 0, std 1 there); clamp bounds the rest.
        return np.clip(normalised, -STATE_CLAMP, STATE_CLAMP) * self.table.state_mask[ids]
