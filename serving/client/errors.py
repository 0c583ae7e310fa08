"""Typed exceptions for the robot SDK.

Every failure a robot can see is a ``SuperbrainError`` carrying the gRPC status
``code`` and the server's ``details`` (which name the offending request field).
Catch the subclass you can act on::

    try:
        chunk = robot.act(...)
    except ResourceExhausted as err:
        time.sleep(err.retry_after_s or 0.5)
    except InvalidArgument as err:
        log.error("fix the request: %s", err.details)

``from_rpc_error`` maps a ``grpc.RpcError`` / ``grpc.aio.AioRpcError`` and
``from_step_error`` maps a ``StepError`` message from an ActStream.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

__all__ = [
    "QuotaViolation",
    "SuperbrainError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "DeadlineExceeded",
    "Unavailable",
    "Unauthenticated",
    "PermissionDenied",
    "Internal",
    "from_rpc_error",
    "from_step_error",
    "error_for_code",
    "status_code_from_int",
]


class SuperbrainError(Exception):
    """A failed call. ``code`` is the grpc.StatusCode, ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str = "",
        code: grpc.StatusCode | None = None,
        *,
        request_id: str = "",
        step: int | None = None,
    ):
        if code is not None:
            self.code = code
        self.details = details
        self.request_id = request_id
        self.step = step
        super().__init__(details)

    def __str__(self) -> str:
        name = self.code.name if self.code is not None else "UNKNOWN"
        where = []
        if self.request_id:
            where.append(f"request_id={self.request_id}")
        if self.step is not None:
            where.append(f"step={self.step}")
        suffix = f" ({', '.join(where)})" if where else ""
        return f"{name}: {self.details}{suffix}"

    def __reduce__(self):
        return (
            _rebuild,
            (type(self), self.details, self.code, self.request_id, self.step, self.__dict__.copy()),
        )


def _rebuild(cls, details, code, request_id, step, state):
    err = cls.__new__(cls)
    SuperbrainError.__init__(err, details, code, request_id=request_id, step=step)
    err.__dict__.update(state)
    return err


class InvalidArgument(SuperbrainError):
    """The request is malformed (wrong shape, missing camera, ...): fix it, do not retry."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SuperbrainError):
    """Unknown embodiment, model or model version."""

    code = grpc.StatusCode.NOT_FOUND


@dataclass(frozen=True)
class QuotaViolation:
    """One entry of google.rpc.QuotaFailure: ``subject`` (e.g. "tenant:acme") and what was exceeded."""

    subject: str
    description: str

    @property
    def limit(self) -> str:
        """The limit's name: "rate", "monthly_calls", "monthly_accel_ms" or "streams"."""
        return self.description.split(":", 1)[0]


class ResourceExhausted(SuperbrainError):
    """Over a quota (``quota_violations`` says which) or the server is overloaded.

    ``retry_after_s`` is the server's RetryInfo hint; the SDK already waits that
    long and retries when it fits in the call's deadline (RetryPolicy).
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(
        self,
        details: str = "",
        code: grpc.StatusCode | None = None,
        *,
        retry_after_s=None,
        quota_violations: tuple[QuotaViolation, ...] = (),
        **kw,
    ):
        super().__init__(details, code, **kw)
        self.retry_after_s: float | None = retry_after_s
        self.quota_violations = tuple(quota_violations)

    @property
    def limit(self) -> str | None:
        """Which quota limit refused the call; None when the server was merely overloaded."""
        return self.quota_violations[0].limit if self.quota_violations else None


class DeadlineExceeded(SuperbrainError):
    """No answer within the call's deadline."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(SuperbrainError):
    """The server could not be reached (still after the client's retries)."""

    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(SuperbrainError):
    """Missing or wrong API key."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SuperbrainError):
    """The API key may not use this model or embodiment."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Internal(SuperbrainError):
    """A server bug, or a reply the client cannot decode."""

    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[SuperbrainError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        Internal,
    )
}
_BY_INT: dict[int, grpc.StatusCode] = {sc.value[0]: sc for sc in grpc.StatusCode}


def status_code_from_int(value: int) -> grpc.StatusCode:
    """A google.rpc.Code number (as in StepError.code) -> grpc.StatusCode (UNKNOWN if unknown)."""
    return _BY_INT.get(int(value), grpc.StatusCode.UNKNOWN)


def error_for_code(
    code: grpc.StatusCode,
    details: str = "",
    *,
    request_id: str = "",
    step: int | None = None,
    retry_after_s: float | None = None,
    quota_violations: tuple[QuotaViolation, ...] = (),
) -> SuperbrainError:
    """The typed exception for ``code`` (the base class for codes without a subclass)."""
    cls = _BY_CODE.get(code, SuperbrainError)
    if cls is ResourceExhausted:
        return ResourceExhausted(
            details,
            code,
            retry_after_s=retry_after_s,
            quota_violations=quota_violations,
            request_id=request_id,
            step=step,
        )
    return cls(details, code, request_id=request_id, step=step)


def from_rpc_error(err: grpc.RpcError, *, request_id: str = "", step: int | None = None) -> SuperbrainError:
    """Map a failed sync or aio call (``grpc.RpcError`` / ``AioRpcError``) to a typed exception."""
    code = _call_attr(err, "code") or grpc.StatusCode.UNKNOWN
    details = _call_attr(err, "details") or ""
    retry_after, violations = None, ()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after, violations = _parse_details(_status_details(err))
        if retry_after is None:
            retry_after = _retry_after_header(err)
    return error_for_code(
        code, details, request_id=request_id, step=step, retry_after_s=retry_after, quota_violations=violations
    )


def from_step_error(step_error) -> SuperbrainError:
    """Map a ``pb.StepError`` (a failure of one step of an ActStream) to a typed exception."""
    retry_after, violations = _parse_details(step_error.details)
    return error_for_code(
        status_code_from_int(step_error.code),
        step_error.message,
        request_id=step_error.request_id,
        step=step_error.step,
        retry_after_s=retry_after,
        quota_violations=violations,
    )


def _call_attr(err, name: str):
    fn = getattr(err, name, None)
    if fn is None:
        return None
    try:
        return fn()
    except Exception:  # a half-initialised error object; the mapping must never raise
        return None


def _status_details(err) -> list:
    """The google.protobuf.Any details of the rich status in the grpc-status-details-bin trailer."""
    try:
        from grpc_status import rpc_status

        status = rpc_status.from_call(err)
    except Exception:  # missing package, inconsistent or undecodable trailer
        return []
    return list(status.details) if status is not None else []


def _parse_details(details) -> tuple[float | None, tuple[QuotaViolation, ...]]:
    """RetryInfo delay and QuotaFailure violations from google.rpc error details."""
    from google.rpc import error_details_pb2

    retry_after: float | None = None
    violations: list[QuotaViolation] = []
    for detail in details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            if detail.Unpack(info):
                retry_after = max(0.0, info.retry_delay.seconds + info.retry_delay.nanos / 1e9)
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            if detail.Unpack(failure):
                violations.extend(QuotaViolation(v.subject, v.description) for v in failure.violations)
    return retry_after, tuple(violations)


def _retry_after_header(err) -> float | None:
    """A plain ``retry-after`` trailer (seconds), for servers that send no RetryInfo."""
    metadata = _call_attr(err, "trailing_metadata") or ()
    try:
        for key, value in metadata:
            if key == "retry-after":
                return max(0.0, float(value.decode() if isinstance(value, bytes) else value))
    except (TypeError, ValueError):
        pass
    return None
