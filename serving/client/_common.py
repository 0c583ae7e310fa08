"""Pieces shared by the sync and asyncio clients: channel options, metadata, retries, encoding."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from serving import codec
from serving.api import pb
from serving.client.errors import Internal
from serving.client.types import ActionChunk, ServerTiming

API_KEY_ENV = "SUPERBRAIN_API_KEY"
DEFAULT_TIMEOUT_S = 2.0
MAX_MESSAGE_BYTES = 64 * 2**20
IMAGE_FORMATS = ("raw", "jpeg", "png")

try:
    from serving import __version__ as _VERSION
except ImportError:  # pragma: no cover
    _VERSION = "0"


def channel_options(extra: Mapping[str, object] | None = None) -> list[tuple[str, object]]:
    """gRPC channel options for a long-lived robot connection (``extra`` overrides).

    * 64 MiB messages both ways: several raw camera frames fit in one request.
    * Keepalive pings every 20 s (also while idle), dropped connections are noticed
      within ~30 s instead of at the next call's deadline. The server must permit it
      (``grpc.http2.min_ping_interval_without_data_ms`` <= 20 s and
      ``grpc.keepalive_permit_without_calls``), as serving.ingress does.
    * Short reconnect backoff (0.1 s .. 2 s), so that after a server restart the
      client's UNAVAILABLE retries find a fresh connection within a call's deadline.
    """
    opts: dict[str, object] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.keepalive_time_ms": 20_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.keepalive_permit_without_calls": 1,
        "grpc.http2.max_pings_without_data": 0,
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.min_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 2_000,
        "grpc.primary_user_agent": f"superbrain-client/{_VERSION}",
        # One client, one connection: gRPC otherwise shares a TCP connection between
        # all channels to the same target in a process, so a fleet simulator (or a
        # gateway) with many clients would land on a single replica behind the port.
        "grpc.use_local_subchannel_pool": 1,
    }
    if extra:
        opts.update(extra)
    return list(opts.items())


def resolve_api_key(api_key: str | None) -> str | None:
    """The explicit key, else $SUPERBRAIN_API_KEY; "" disables it."""
    if api_key is None:
        api_key = os.environ.get(API_KEY_ENV)
    return api_key or None


def call_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE with exponential backoff and jitter, all within the call's deadline.

    RESOURCE_EXHAUSTED with a RetryInfo hint (a rate limit, an overloaded
    replica) is retried after exactly that hint (plus up to 10 % jitter) when it
    fits in the deadline (``honour_retry_info``); without a hint it is not retried.

    Attempt n (n >= 1) that failed with a retryable code sleeps a random time in
    ``[d/2, d]`` with ``d = min(max_backoff_s, initial_backoff_s * multiplier**(n-1))``,
    unless the attempts are used up or the sleep would leave less than
    ``min_attempt_s`` before the deadline: then the last error is raised.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    min_attempt_s: float = 0.02
    retryable: frozenset[grpc.StatusCode] = field(default_factory=lambda: frozenset({grpc.StatusCode.UNAVAILABLE}))
    honour_retry_info: bool = True

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        d = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, attempt - 1))
        r = (rng or random).random()
        return d * (0.5 + 0.5 * r)

    def next_delay(
        self, code: grpc.StatusCode, attempt: int, remaining_s: float, retry_after_s: float | None = None
    ) -> float | None:
        """Seconds to sleep before the next attempt, or None to give up."""
        if attempt >= self.max_attempts:
            return None
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_after_s is not None and self.honour_retry_info:
            delay = retry_after_s * (1.0 + 0.1 * random.random())
        elif code in self.retryable:
            delay = max(self.backoff_s(attempt), retry_after_s or 0.0)
        else:
            return None
        if remaining_s - delay < self.min_attempt_s:
            return None
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)


def new_request_id() -> str:
    return uuid.uuid4().hex


def encode_image(frame, image_format: str, jpeg_quality: int, name: str) -> pb.Image:
    if isinstance(frame, pb.Image):
        return frame
    arr = np.asarray(frame)
    if arr.dtype != np.uint8:
        raise TypeError(f"images[{name!r}]: expected a uint8 (H, W, 3) frame, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"images[{name!r}]: expected shape (H, W, 3), got {arr.shape}")
    if image_format == "raw":
        return codec.raw_image(arr)
    return codec.encoded_image(arr, image_format, jpeg_quality)


def build_request(
    *,
    images: Mapping[str, object] | None,
    state,
    instruction: str,
    embodiment: str,
    robot_id: str = "",
    episode_id: str = "",
    step: int = 0,
    model: str = "",
    model_version: str = "",
    request_id: str | None = None,
    image_format: str = "raw",
    jpeg_quality: int = 90,
) -> pb.ActRequest:
    """An ActRequest; frames are sent raw or JPEG/PNG-encoded, state as float32."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {IMAGE_FORMATS}, got {image_format!r}")
    req = pb.ActRequest(request_id=request_id or new_request_id())
    obs = req.observation
    obs.instruction = instruction or ""
    obs.embodiment = embodiment or ""
    obs.robot_id = robot_id or ""
    obs.episode_id = episode_id or ""
    obs.step = int(step or 0)
    obs.model = model or ""
    obs.model_version = model_version or ""
    if state is not None:
        codec.numpy_to_tensor(np.asarray(state, dtype=np.float32), obs.state)
    for name, frame in (images or {}).items():
        obs.images[name].CopyFrom(encode_image(frame, image_format, jpeg_quality, name))
    return req


def chunk_from_response(resp: pb.ActResponse, latency_ms: float = 0.0, attempts: int = 1) -> ActionChunk:
    """Decode an ActResponse into an ActionChunk (a writable float32 (T, A) copy)."""
    try:
        actions = codec.tensor_to_numpy(resp.actions, "actions")
    except Exception as exc:  # serving.errors.RequestError: the server sent a malformed tensor
        raise Internal(f"cannot decode the server's action chunk: {exc}", request_id=resp.request_id) from None
    if actions.ndim != 2:
        raise Internal(
            f"expected actions of shape (horizon, action_dim), got {list(actions.shape)}",
            request_id=resp.request_id,
        )
    return ActionChunk(
        actions=np.array(actions, dtype=np.float32),
        model=resp.model,
        model_version=resp.model_version,
        embodiment=resp.embodiment,
        request_id=resp.request_id,
        step=int(resp.step),
        timing=ServerTiming.from_proto(resp.timing),
        latency_ms=latency_ms,
        attempts=attempts,
    )


def check_timeout(timeout: float | None, default: float) -> float:
    t = default if timeout is None else float(timeout)
    if not t > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
    return t
