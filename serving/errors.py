"""Request errors that map one-to-one onto gRPC status codes.

Every stage raises ``RequestError`` for a caller's mistake; the ingress turns it
into the matching status. ``field`` names the offending request field so a robot
engineer can fix the call without reading server logs.
"""

from __future__ import annotations

import grpc


class RequestError(Exception):
    """A request that cannot be served, with the gRPC status it should get."""

    def __init__(self, code: grpc.StatusCode, message: str, field: str | None = None):
        self.code = code
        self.field = field
        self.detail = f"{field}: {message}" if field else message
        super().__init__(self.detail)


def invalid(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message, field)


def not_found(field: str, message: str) -> RequestError:
    return RequestError(grpc.StatusCode.NOT_FOUND, message, field)


def exhausted(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def deadline_exceeded(message: str = "deadline passed before the request could be computed") -> RequestError:
    return RequestError(grpc.StatusCode.DEADLINE_EXCEEDED, message)


def unavailable(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.UNAVAILABLE, message)
