"""VLAPolicy: serves a TinyVLA checkpoint (or the seeded default model).

preprocess  observations -> ``TorchBatch``: the batch assembler
            (serving.batching) runs on the replica's array backend over the
            whole batch (numpy on CPU; CuPy's fused resize + normalise kernel or
            torch kernels on an accelerator, so frames travel once as uint8 and the
            pixel work happens on the device), then ``backend.to_torch`` hands the
            arrays to torch without a copy (a numpy view, CuPy through DLPack)
forward     TorchBatch -> normalised actions (B, horizon, max_action_dim), no autograd
postprocess un-normalise and clip per embodiment, then one float32
            (chunk_length, action_dim) chunk per observation

On CUDA, preprocess and forward queue their device work on two streams
(serving/processing/streams.py), so when the engine pipelines batches the
device computes batch N while batch N+1's frames are uploaded and resized.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from serving.batching import BatchAssembler, BatchDims, ModelBatch
from serving.models.checkpoint import Checkpoint, default_checkpoint, load_checkpoint
from serving.policy.base import EmbodimentSpec, Policy, PolicyObservation
from serving.processing import clip_actions, get_backend, unnormalize_actions
from serving.processing.backend import resolve_backend_name
from serving.processing.streams import stage_streams


@dataclass
class TorchBatch:
    """A preprocessed batch as the model takes it: torch tensors on the model's device.

    ``source`` is the assembler's batch the tensors alias (zero-copy): it must
    live until the forward pass has read them. ``ready`` is the device event
    after which the inputs are written (None on CPU).
    """

    images: torch.Tensor
    camera_mask: torch.Tensor
    state: torch.Tensor
    state_mask: torch.Tensor
    embodiment_ids: torch.Tensor
    token_ids: torch.Tensor
    token_mask: torch.Tensor
    source: ModelBatch
    ready: Any = None

    def inputs(self) -> tuple[torch.Tensor, ...]:
        """The model's positional arguments, in ``TinyVLA.forward``'s order."""
        return (
            self.images,
            self.camera_mask,
            self.state,
            self.state_mask,
            self.embodiment_ids,
            self.token_ids,
            self.token_mask,
        )

    def __len__(self) -> int:
        return int(self.embodiment_ids.shape[0])


class VLAPolicy(Policy):
    """The default policy: a TinyVLA plus its embodiments' statistics and limits."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        seed: int = 0,
        *,
        checkpoint: Checkpoint | None = None,
    ):
        """Serve ``checkpoint`` if given, else the checkpoint in ``model_dir``, else the default for ``seed``.

        Ready on CPU straight away; ``setup(device)`` moves it elsewhere. The
        ``model_dir=`` keyword is what ``load_policy`` passes to any policy class.
        """
        if checkpoint is None:
            checkpoint = load_checkpoint(model_dir) if model_dir is not None else default_checkpoint(seed)
        self.model = checkpoint.model
        self.meta = checkpoint.meta
        self.name = checkpoint.meta.name
        self.version = checkpoint.meta.version
        self._embodiments = {e.name: e for e in checkpoint.meta.embodiments}
        cfg = self.model.config
        self._dims = BatchDims(
            image_size=cfg.image_size,
            max_cameras=cfg.max_cameras,
            max_state_dim=cfg.max_state_dim,
            max_action_dim=cfg.max_action_dim,
            horizon=cfg.horizon,
            max_tokens=cfg.max_tokens,
            vocab_size=cfg.vocab_size,
            image_mean=cfg.image_mean,
            image_std=cfg.image_std,
        )
        self.setup("cpu")

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike[str]) -> VLAPolicy:
        return cls(model_dir=path)

    @classmethod
    def default(cls, seed: int = 0) -> VLAPolicy:
        return cls(seed=seed)

    @property
    def embodiments(self) -> dict[str, EmbodimentSpec]:
        return self._embodiments

    @property
    def dims(self) -> BatchDims:
        """The model's input sizes and image statistics that every batch is padded and normalised to."""
        return self._dims

    def setup(self, device: str = "cpu", array_backend: str | None = None) -> None:
        """Move the model to ``device`` and run pre/post-processing on ``array_backend``.

        ``array_backend`` None or "auto" resolves as a replica would
        (``resolve_backend_name``: numpy on CPU, CuPy on CUDA where it sees the
        device, else torch on the device); "torch" on "cpu" runs the torch
        kernels on the host (what the tests compare numpy against).
        """
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        name = resolve_backend_name(array_backend, str(self.device))
        xp = get_backend(name, str(self.device))
        self._xp = xp
        self.array_backend = xp.name
        self._streams = stage_streams(str(self.device), xp)
        self._assembler = BatchAssembler(self.meta.embodiments, self._dims, xp)
        table = self._assembler.table
        self._action_mean = xp.asarray(table.action_mean)
        self._action_std = xp.asarray(table.action_std)
        self._action_low = xp.asarray(table.action_low)
        self._action_high = xp.asarray(table.action_high)
        # Weights and tables were queued on the default stream; the stages use their own.
        self._streams.synchronize()

    def preprocess(self, observations: list[PolicyObservation]) -> TorchBatch:
        xp, streams = self._xp, self._streams
        with streams.preprocess():
            batch = self._assembler.assemble(observations)
            # to_torch here, on the preprocess stream: DLPack orders the hand-off on the stream that wrote it.
            out = TorchBatch(
                images=xp.to_torch(batch.images),
                camera_mask=xp.to_torch(batch.camera_mask),
                state=xp.to_torch(batch.state),
                state_mask=xp.to_torch(batch.state_mask),
                embodiment_ids=xp.to_torch(batch.embodiment_ids),
                token_ids=xp.to_torch(batch.token_ids),
                token_mask=xp.to_torch(batch.token_mask),
                source=batch,
            )
            out.ready = streams.record_ready()
        return out

    def forward(self, batch: TorchBatch) -> torch.Tensor:
        with self._streams.forward(batch.ready), torch.inference_mode():
            inputs = batch.inputs()
            self._streams.keep_for_forward(inputs)
            return self.model(*inputs)

    def postprocess(self, outputs: torch.Tensor, observations: list[PolicyObservation]) -> list[np.ndarray]:
        xp = self._xp
        with self._streams.forward():  # the forward stage's stream: outputs were written there
            ids = xp.asarray(self._assembler.table.ids(observations))
            actions = xp.asarray(outputs)  # numpy: a view of the CPU tensor; torch: the tensor; cupy: DLPack
            actions = unnormalize_actions(actions, self._action_mean[ids], self._action_std[ids])
            actions = clip_actions(actions, self._action_low[ids], self._action_high[ids], xp)
            host = xp.to_host(actions)  # waits for the device: the batch's work is done after this
        # Clipping cannot repair NaN; never send one to a robot.
        if not np.isfinite(host).all():
            raise RuntimeError(f"model {self.name} {self.version} produced non-finite actions")
        return self._assembler.split(host, observations)
