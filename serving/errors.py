"""Request errors that map one-to-one onto gRPC status codes.

Every stage raises ``RequestError`` for a caller's mistake; the ingress turns it
into the matching status. ``field`` names the offending request field so a robot
engineer can fix the call without reading server logs.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

STATUS_DETAILS_KEY = "grpc-status-details-bin"


class RequestError(Exception):
    """A request that cannot be served, with the gRPC status it should get.

    ``details`` are google.rpc error-detail messages (RetryInfo, QuotaFailure)
    sent in the standard ``grpc-status-details-bin`` trailer (grpcio-status).
    """

    def __init__(
        self, code: grpc.StatusCode, message: str, field: str | None = None, details: tuple[Message, ...] = ()
    ):
        self.code = code
        self.field = field
        self.detail = f"{field}: {message}" if field else message
        self.details = details
        super().__init__(self.detail)

    def packed_details(self) -> list[any_pb2.Any]:
        packed = []
        for message in self.details:
            item = any_pb2.Any()
            item.Pack(message)
            packed.append(item)
        return packed

    def status_trailer(self) -> tuple[tuple[str, bytes], ...]:
        """Trailing metadata carrying the rich google.rpc.Status (empty without details)."""
        if not self.details:
            return ()
        status = status_pb2.Status(code=self.code.value[0], message=self.detail, details=self.packed_details())
        return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


def retry_info(retry_after_s: float) -> error_details_pb2.RetryInfo:
    info = error_details_pb2.RetryInfo()
    info.retry_delay.FromNanoseconds(int(max(0.0, retry_after_s) * 1e9))
    return info


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, field)


def not_found(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message, field)


def exhausted(message: str, retry_after_s: float | None = None) -> RequestError:
    details = (retry_info(retry_after_s),) if retry_after_s is not None else ()
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, details=details)


def quota_exceeded(subject: str, limit: str, message: str, retry_after_s: float) -> RequestError:
    """RESOURCE_EXHAUSTED naming the limit (google.rpc.QuotaFailure) and when to retry (RetryInfo)."""
    failure = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject=subject, description=f"{limit}: {message}")]
    )
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message, details=(failure, retry_info(retry_after_s)))


def unauthenticated(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAUTHENTICATED, message)


def permission_denied(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.PERMISSION_DENIED, message, field)


def deadline_exceeded(message: str = "deadline passed before the request could be computed") -> RequestError:
    return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)
