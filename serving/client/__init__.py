"""Superbrain robot SDK: call a served policy from a robot's control stack.

    from serving.client import RobotClient, ChunkBroker

    with RobotClient("127.0.0.1:9000") as robot:
        info = robot.describe()
        chunk = robot.act(images={"front": frame}, state=q, instruction="pick up the red cup",
                          embodiment="franka_arm")
        chunk.actions  # float32 (horizon, action_dim)

``AsyncRobotClient`` is the grpc.aio twin; ``robot.stream(...)`` opens an ActStream
session for long control loops; ``ChunkBroker`` / ``AsyncChunkBroker`` turn chunks
into one action per control tick with latency-aware prefetch and blending. Errors
are typed (``serving.client.errors``).
"""

from serving.client import errors
from serving.client._common import RetryPolicy, channel_options
from serving.client.aio import AsyncRobotClient, AsyncStreamSession
from serving.client.broker import AsyncChunkBroker, BrokerStats, ChunkBroker, LatencyEstimator
from serving.client.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    SuperbrainError,
    Unauthenticated,
    Unavailable,
)
from serving.client.sync import RobotClient, StreamSession
from serving.client.types import ActionChunk, CameraInfo, EmbodimentInfo, ModelInfo, ServerInfo, ServerTiming

__all__ = [
    "RobotClient",
    "AsyncRobotClient",
    "StreamSession",
    "AsyncStreamSession",
    "ActionChunk",
    "ServerTiming",
    "ServerInfo",
    "ModelInfo",
    "EmbodimentInfo",
    "CameraInfo",
    "ChunkBroker",
    "AsyncChunkBroker",
    "BrokerStats",
    "LatencyEstimator",
    "RetryPolicy",
    "channel_options",
    "errors",
    "SuperbrainError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Unavailable",
    "Unauthenticated",
    "PermissionDenied",
    "Internal",
]
