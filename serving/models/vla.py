"""TinyVLA: a small vision-language-action policy for many embodiments at once.

Each sample becomes a short token sequence

    [embodiment] [state] [camera tokens ...] [instruction words ...]

fused by a few pre-norm transformer layers; the output at the embodiment token
is decoded to a (horizon, max_action_dim) chunk of normalised actions. Padding
(missing camera slots, unused state dimensions, short instructions) is masked
per sample and there is no batch normalisation, so a sample's actions do not
depend on what else is in its batch: the server may batch any robots together.

It is deliberately small (about 2.2M parameters with the default config): the point is a realistic
serving workload with the right shapes and costs, not a trained model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from serving.policy.base import EmbodimentSpec


@dataclass(frozen=True)
class VLAConfig:
    """Architecture and I/O sizes of a TinyVLA; stored in a checkpoint's config.json."""

    num_embodiments: int = 3
    max_cameras: int = 3
    max_state_dim: int = 18
    max_action_dim: int = 14
    #: Actions per output chunk; the longest chunk_length of any embodiment.
    horizon: int = 25
    #: Frames are resized to image_size x image_size in preprocessing.
    image_size: int = 96
    vocab_size: int = 4096
    max_tokens: int = 16
    # Sized so a CPU forward at batch 32 takes a few tens of ms on 2 cores: a
    # realistic serving load while tests and benchmarks still run on a laptop.
    d_model: int = 192
    n_heads: int = 6
    n_layers: int = 3
    ff_dim: int = 512
    conv_channels: tuple[int, int] = (32, 64)
    #: Each camera is pooled to a camera_grid x camera_grid grid of tokens.
    camera_grid: int = 2
    #: Normalised actions are tanh-bounded to +-action_bound standard deviations.
    action_bound: float = 3.0
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 (the encoder's stride), got {self.image_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if min(self.num_embodiments, self.max_cameras, self.max_state_dim, self.max_action_dim) < 1:
            raise ValueError("num_embodiments, max_cameras, max_state_dim and max_action_dim must be >= 1")

    @classmethod
    def for_embodiments(cls, embodiments: Sequence[EmbodimentSpec], **overrides: Any) -> VLAConfig:
        """A config just large enough for ``embodiments`` (other fields default or overridden)."""
        sizes = dict(
            num_embodiments=len(embodiments),
            max_cameras=max(len(e.cameras) for e in embodiments),
            max_state_dim=max(e.state_dim for e in embodiments),
            max_action_dim=max(e.action_dim for e in embodiments),
            horizon=max(e.chunk_length for e in embodiments),
        )
        return cls(**{**sizes, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VLAConfig:
        """Inverse of ``to_dict`` (JSON lists back to tuples); unknown keys are an error, not ignored."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"unknown VLAConfig fields {unknown}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


class ImageEncoder(nn.Module):
    """(n, 3, S, S) frames -> (n, grid * grid, d_model) tokens; shared by all cameras.

    A stride-4 patchify conv then two stride-2 convs (S/16 spatial), pooled to a
    small grid. GroupNorm rather than BatchNorm: statistics per frame, never per batch.
    """

    def __init__(self, config: VLAConfig):
        super().__init__()
        c1, c2 = config.conv_channels
        d = config.d_model
        self.net = nn.Sequential(
            nn.Conv2d(3, c1, kernel_size=4, stride=4),
            nn.GroupNorm(8, c1),
            nn.GELU(),
            nn.Conv2d(c1, c2, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(8, c2),
            nn.GELU(),
            nn.Conv2d(c2, d, kernel_size=3, stride=2, padding=1),
            nn.AdaptiveAvgPool2d(config.camera_grid),
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return self.net(frames).flatten(2).transpose(1, 2)


class TinyVLA(nn.Module):
    """Images + state + embodiment + instruction -> normalised action chunks (B, horizon, max_action_dim)."""

    def __init__(self, config: VLAConfig):
        super().__init__()
        self.config = config
        d = config.d_model
        tokens_per_camera = config.camera_grid**2
        self.image_encoder = ImageEncoder(config)
        # Which camera slot and which grid cell a camera token came from.
        self.camera_slot = nn.Parameter(0.02 * torch.randn(config.max_cameras, 1, d))
        self.camera_cell = nn.Parameter(0.02 * torch.randn(1, tokens_per_camera, d))
        # The state is fed with its mask so "padded" and "exactly at the mean" differ.
        self.state_proj = nn.Linear(2 * config.max_state_dim, d)
        self.embodiment = nn.Embedding(config.num_embodiments, d)
        self.word = nn.Embedding(config.vocab_size, d, padding_idx=0)
        self.word_position = nn.Parameter(0.02 * torch.randn(config.max_tokens, d))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d,
                config.n_heads,
                config.ff_dim,
                dropout=0.0,
                activation="gelu",
                batch_first=True,
                norm_first=True,
            )
            for _ in range(config.n_layers)  # built one by one: each layer gets its own random init
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Sequential(
            nn.Linear(d, config.ff_dim),
            nn.GELU(),
            nn.Linear(config.ff_dim, config.horizon * config.max_action_dim),
        )
        with torch.no_grad():
            nn.init.normal_(self.embodiment.weight, std=0.02)
            nn.init.normal_(self.word.weight, std=0.02)
            self.word.weight[0].zero_()

    def forward(
        self,
        images: torch.Tensor,
        camera_mask: torch.Tensor,
        state: torch.Tensor,
        state_mask: torch.Tensor,
        embodiment_ids: torch.Tensor,
        token_ids: torch.Tensor,
        token_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Shapes as in ``serving.batching.ModelBatch``; returns float32 (B, horizon, max_action_dim)."""
        cfg = self.config
        batch, cameras = camera_mask.shape
        camera_mask = camera_mask.bool()

        # Encode only the frames that exist, then scatter them into their slots.
        features = self.image_encoder(images[camera_mask])  # (n_frames, P, d)
        camera_tokens = features.new_zeros(batch, cameras, features.shape[1], cfg.d_model)
        camera_tokens[camera_mask] = features
        camera_tokens = (camera_tokens + self.camera_slot[:cameras] + self.camera_cell).flatten(1, 2)
        camera_valid = camera_mask.repeat_interleave(features.shape[1], dim=1)

        state_mask_f = state_mask.to(state.dtype)
        state_token = self.state_proj(torch.cat([state * state_mask_f, state_mask_f], dim=-1))
        embodiment_token = self.embodiment(embodiment_ids)
        words = self.word(token_ids) + self.word_position[: token_ids.shape[1]]

        tokens = torch.cat([embodiment_token[:, None], state_token[:, None], camera_tokens, words], dim=1)
        always = camera_valid.new_ones(batch, 2)
        valid = torch.cat([always, camera_valid, token_mask.bool()], dim=1)
        for layer in self.layers:
            tokens = layer(tokens, src_key_padding_mask=~valid)

        # Read the chunk out at the embodiment token, which attended to everything valid.
        out = self.head(self.norm(tokens[:, 0]))
        return cfg.action_bound * torch.tanh(out).view(batch, cfg.horizon, cfg.max_action_dim)
