"""VLAPolicy: serves a TinyVLA checkpoint (or the seeded default model).

preprocess  observations -> ModelBatch (serving.batching; numpy kernels on CPU,
            torch kernels on the model's device otherwise, so GPU serving ships
            uint8 frames once and does the pixel work on the device)
forward     ModelBatch -> normalised actions (B, horizon, max_action_dim), no autograd
postprocess un-normalise and clip per embodiment, then one float32
            (chunk_length, action_dim) chunk per observation
"""

from __future__ import annotations

import os

import numpy as np
import torch

from serving.batching import BatchAssembler, BatchDims, ModelBatch
from serving.models.checkpoint import Checkpoint, default_checkpoint, load_checkpoint
from serving.policy.base import EmbodimentSpec, Policy, PolicyObservation
from serving.processing import clip_actions, get_backend, unnormalize_actions


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

    def setup(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        # On CPU, numpy kernels feed torch without copies; elsewhere the kernels run on the device.
        xp = get_backend("numpy") if self.device.type == "cpu" else get_backend("torch", str(self.device))
        self._xp = xp
        self._assembler = BatchAssembler(self.meta.embodiments, self._dims, xp)
        table = self._assembler.table
        self._action_mean = xp.asarray(table.action_mean)
        self._action_std = xp.asarray(table.action_std)
        self._action_low = xp.asarray(table.action_low)
        self._action_high = xp.asarray(table.action_high)

    def preprocess(self, observations: list[PolicyObservation]) -> ModelBatch:
        return self._assembler.assemble(observations)

    def forward(self, batch: ModelBatch) -> torch.Tensor:
        def tensor(x: object) -> torch.Tensor:
            return torch.as_tensor(x, device=self.device)  # zero-copy for host numpy on CPU

        with torch.inference_mode():
            return self.model(
                tensor(batch.images),
                tensor(batch.camera_mask),
                tensor(batch.state),
                tensor(batch.state_mask),
                tensor(batch.embodiment_ids),
                tensor(batch.token_ids),
                tensor(batch.token_mask),
            )

    def postprocess(self, outputs: torch.Tensor, observations: list[PolicyObservation]) -> list[np.ndarray]:
        xp = self._xp
        ids = xp.asarray(self._assembler.table.ids(observations))
        actions = xp.asarray(outputs)  # numpy: a view of the CPU tensor; torch: the tensor itself
        actions = unnormalize_actions(actions, self._action_mean[ids], self._action_std[ids])
        actions = clip_actions(actions, self._action_low[ids], self._action_high[ids], xp)
        host = xp.to_host(actions)
        # Clipping cannot repair NaN; never send one to a robot.
        if not np.isfinite(host).all():
            raise RuntimeError(f"model {self.name} {self.version} produced non-finite actions")
        return self._assembler.split(host, observations)
