"""The on-disk checkpoint format, and the deterministic default model.

A checkpoint is a directory::

    model.safetensors   weights (safetensors: no pickle, safe to load from anywhere)
    config.json         {"format": "superbrain.checkpoint", "format_version": 1,
                         "name", "version", "model": {VLAConfig fields},
                         "embodiments": [{EmbodimentSpec fields, cameras as objects}],
                         "policy_class": "module:Class" or null}

Everything the server needs to validate requests, normalise and clip lives in
config.json next to the weights, so a model and its statistics cannot drift
apart. ``policy_class`` lets a checkpoint name the Policy that serves it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from serving.models.embodiments import check_embodiment, check_fits, default_embodiments
from serving.models.vla import TinyVLA, VLAConfig
from serving.policy.base import CameraSpec, EmbodimentSpec

FORMAT = "superbrain.checkpoint"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

DEFAULT_MODEL_NAME = "tiny-vla"
DEFAULT_MODEL_VERSION = "0.1.0"


class CheckpointError(ValueError):
    """A checkpoint directory exists but its contents are invalid."""


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint says about itself besides the architecture."""

    name: str
    version: str
    #: In model order: position i is embodiment id i.
    embodiments: tuple[EmbodimentSpec, ...]
    #: "module:Class" of the Policy that should serve this checkpoint; None = the default VLAPolicy.
    policy_class: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    model: TinyVLA
    meta: CheckpointMeta


# -- Embodiments <-> JSON ---------------------------------------------------------------


def embodiment_to_dict(spec: EmbodimentSpec) -> dict[str, Any]:
    data = dataclasses.asdict(spec)  # nested CameraSpecs become dicts, tuples stay tuples
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def embodiment_from_dict(data: Mapping[str, Any]) -> EmbodimentSpec:
    """Inverse of ``embodiment_to_dict``; raises CheckpointError naming what is wrong."""
    name = data.get("name", "?")
    try:
        fields = dict(data)
        fields["cameras"] = tuple(CameraSpec(**c) for c in fields.get("cameras", ()))
        for key in ("state_mean", "state_std", "action_mean", "action_std", "action_low", "action_high"):
            if key in fields:
                fields[key] = tuple(float(x) for x in fields[key])
        spec = EmbodimentSpec(**fields)
        check_embodiment(spec)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"embodiment {name!r} in {CONFIG_FILE}: {exc}") from None
    return spec


# -- Saving and loading -----------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike[str], model: TinyVLA, meta: CheckpointMeta) -> Path:
    """Write ``model`` and ``meta`` as a checkpoint directory (created if needed); returns its path."""
    from safetensors.torch import save_file

    _check_meta(meta, model.config)
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": meta.name,
        "version": meta.version,
        "model": model.config.to_dict(),
        "embodiments": [embodiment_to_dict(e) for e in meta.embodiments],
        "policy_class": meta.policy_class,
    }
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Write to temporary names and rename, so a replica starting up meanwhile never
    # reads a half-written file.
    tmp_weights = directory / f".{WEIGHTS_FILE}.tmp"
    save_file(weights, str(tmp_weights), metadata={"format": "pt"})
    tmp_config = directory / f".{CONFIG_FILE}.tmp"
    tmp_config.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp_weights, directory / WEIGHTS_FILE)
    os.replace(tmp_config, directory / CONFIG_FILE)
    return directory


def read_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse and check the envelope of ``config.json`` (format and version), without loading weights.

    Also what the policy loader uses to find a checkpoint's ``policy_class``.
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} does not exist")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object")
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{config_path}: 'format' must be {FORMAT!r}, got {config.get('format')!r}")
    if config.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{config_path}: unsupported format_version {config.get('format_version')!r} "
            f"(this server reads {FORMAT_VERSION})"
        )
    policy_class = config.get("policy_class")
    if policy_class is not None and not isinstance(policy_class, str):
        raise CheckpointError(f"{config_path}: 'policy_class' must be a 'module:Class' string or null")
    return config


def load_checkpoint(path: str | os.PathLike[str], device: str = "cpu") -> Checkpoint:
    """Load a checkpoint directory; FileNotFoundError if files are missing, CheckpointError if invalid."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(path)
    config = read_config(directory)
    for key in ("name", "version", "model", "embodiments"):
        if key not in config:
            raise CheckpointError(f"{directory / CONFIG_FILE}: missing key {key!r}")
    try:
        model_config = VLAConfig.from_dict(config["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{directory / CONFIG_FILE}: invalid 'model': {exc}") from None
    if not isinstance(config["embodiments"], list):
        raise CheckpointError(f"{directory / CONFIG_FILE}: 'embodiments' must be a list")
    meta = CheckpointMeta(
        name=str(config["name"]),
        version=str(config["version"]),
        embodiments=tuple(embodiment_from_dict(e) for e in config["embodiments"]),
        policy_class=config.get("policy_class"),
    )
    _check_meta(meta, model_config)

    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint {str(directory)!r} has no {WEIGHTS_FILE}")
    try:
        weights = load_file(str(weights_path), device=device)
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {weights_path}: {exc}") from None
    model = TinyVLA(model_config)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path} does not match the model in {CONFIG_FILE}: {exc}") from None
    return Checkpoint(model=model.to(device).eval(), meta=meta)


def _check_meta(meta: CheckpointMeta, config: VLAConfig) -> None:
    """The embodiments must fit the architecture: one embedding row each, and within its maxima."""
    if len(meta.embodiments) != config.num_embodiments:
        raise CheckpointError(
            f"{len(meta.embodiments)} embodiments but the model has num_embodiments={config.num_embodiments}"
        )
    names = [e.name for e in meta.embodiments]
    if len(set(names)) != len(names):
        raise CheckpointError(f"embodiment names must be unique, got {names}")
    for e in meta.embodiments:
        try:
            check_fits(
                e,
                max_cameras=config.max_cameras,
                max_state_dim=config.max_state_dim,
                max_action_dim=config.max_action_dim,
                horizon=config.horizon,
            )
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None


# -- The default model ------------------------------------------------------------------


def build_default_model(seed: int = 0, embodiments: Sequence[EmbodimentSpec] | None = None) -> TinyVLA:
    """A TinyVLA for the default embodiments with weights drawn from ``seed`` (eval mode, CPU).

    Same seed, same torch version -> bit-identical weights; the global RNG state is
    left untouched, so building a model never perturbs anyone else's randomness.
    """
    specs = tuple(embodiments) if embodiments is not None else default_embodiments()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyVLA(VLAConfig.for_embodiments(specs))
    return model.eval()


def default_meta(seed: int = 0) -> CheckpointMeta:
    return CheckpointMeta(
        name=DEFAULT_MODEL_NAME,
        version=f"{DEFAULT_MODEL_VERSION}+seed{seed}",
        embodiments=default_embodiments(),
    )


def default_checkpoint(seed: int = 0) -> Checkpoint:
    """The default model and metadata in memory, as ``load_checkpoint`` would return them."""
    return Checkpoint(model=build_default_model(seed), meta=default_meta(seed))


def write_default_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write the default model for ``seed`` as a checkpoint directory; returns its path."""
    ckpt = default_checkpoint(seed)
    return save_checkpoint(path, ckpt.model, ckpt.meta)
