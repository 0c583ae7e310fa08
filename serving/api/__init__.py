"""The public wire API (superbrain.v1), generated from proto/ by ``serving.protogen``."""

from serving.api.v1 import superbrain_pb2 as pb
from serving.api.v1 import superbrain_pb2_grpc as pb_grpc

__all__ = ["pb", "pb_grpc"]
