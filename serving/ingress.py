"""The gRPC front door: admit -> decode + validate -> submit to the batcher -> encode.

``PolicyServicer`` is plain grpc.aio (no Ray): the Ray deployment hands it a
batcher as ``submit`` (``CapacityBatcher`` or the ``@serve.batch`` method).
Errors become status codes here and nowhere else, so a robot always gets the
right code with the offending field named, and a bad request never reaches a
batch.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from serving import __version__, codec
from serving import metrics as m
from serving.access_log import AccessLog
from serving.api import pb, pb_grpc
from serving.engine import NOT_ADMITTED, Outcome, Pending, Submit
from serving.errors import RequestError, exhausted, not_found
from serving.policy.base import Policy
from serving.quota.gate import AccessGate, KeyPass

log = logging.getLogger(__name__)

# RetryInfo hint when a replica's admission queue is full.
OVERLOAD_RETRY_S = 0.05

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PolicyService"].full_name

# This call's metadata as grpc.aio already turned it into Python to look up its handler
# (``PolicyServiceHandler``); read by the servicer instead of converting it again.
_CALL_METADATA: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("call_metadata", default=None)


def call_metadata(context: grpc.aio.ServicerContext) -> tuple:
    """The invocation metadata of the current call (already converted when served by PolicyServiceHandler)."""
    metadata = _CALL_METADATA.get()
    return metadata if metadata is not None else context.invocation_metadata()


class PolicyServiceHandler(grpc.GenericRpcHandler):
    """PolicyService on grpc's generic path, remembering each call's metadata for the servicer.

    grpc.aio converts a call's metadata to Python once to find its handler, and
    ``context.invocation_metadata()`` converts it again: about 2 us per call,
    which W1 feels (docs/benchmarks.md). The lookup runs in the call's own task,
    so a context variable set here is what that call's servicer method sees.
    Registered methods (the generated ``add_PolicyServiceServicer_to_server``)
    are looked up without the metadata, and each also costs the server one more
    request future that grpc.aio waits on for every incoming call.
    """

    def __init__(self, servicer: pb_grpc.PolicyServiceServicer):
        self._methods: dict[str, Any] = {}
        pb_grpc.add_PolicyServiceServicer_to_server(servicer, self)  # collects the method handlers

    # What the generated function calls on the "server" it is given:
    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same methods as add_registered_method_handlers gets

    def add_registered_method_handlers(self, service: str, methods: dict[str, Any]) -> None:
        self._methods.update({f"/{service}/{name}": handler for name, handler in methods.items()})

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = self._methods.get(handler_call_details.method)
        if handler is not None:
            _CALL_METADATA.set(handler_call_details.invocation_metadata)  # type: ignore[attr-defined]
        return handler


@dataclass(frozen=True)
class IngressLimits:
    # Requests admitted but not yet answered, per replica; past it: RESOURCE_EXHAUSTED.
    max_queued_requests: int = 256
    # Deadline applied when the caller sets none.
    default_timeout_s: float = 10.0


class PolicyServicer(pb_grpc.PolicyServiceServicer):
    def __init__(
        self,
        policy: Policy,
        submit: Submit,
        limits: IngressLimits | None = None,
        max_batch_size: int = 0,
        gate: AccessGate | None = None,
        access_log: AccessLog | None = None,
    ):
        self._policy = policy
        self._access_log = access_log
        # Partners' keys, quota and metering; None only where auth is off (loopback).
        self._gate = gate
        self._embodiments = policy.embodiments
        self._submit = submit
        self._limits = limits or IngressLimits()
        self.inflight = 0
        self._describe = describe_policy(policy, max_batch_size)
        self._model_label = (policy.name,)

    # -- RPCs ---------------------------------------------------------------

    async def Act(self, request: pb.ActRequest, context: grpc.aio.ServicerContext) -> pb.ActResponse:
        received = time.monotonic()
        remaining = context.time_remaining()
        key = None
        try:
            if self._gate is not None:
                # A key seen before costs one lookup here; its quota token is taken with
                # the rest of its batch (AccessGate.metering). Inline, not _verify: one
                # coroutine fewer per call.
                metadata = call_metadata(context)
                key = self._gate.key_pass(metadata) or await self._gate.verify(metadata)
            outcome = await self._act(request, received, remaining, key)
        except RequestError as err:
            context.set_code(err.code)
            context.set_details(err.detail)
            if err.details:
                context.set_trailing_metadata(err.status_trailer())
            self._finished(request, key, err.code.name, received, None)
            return pb.ActResponse()
        except BaseException as exc:  # the caller went away, or a bug (grpc answers UNKNOWN)
            self._finished(request, key, _unexpected_code(exc), received, None)
            raise
        response = self._response(request, outcome, received)
        self._finished(request, key, "OK", received, outcome)
        return response

    async def ActStream(
        self, request_iterator: AsyncIterator[pb.ActRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ActStreamResponse]:
        key = None
        if self._gate is not None:
            # A bad key or a full stream cap ends the stream before its first step.
            try:
                key = await self._verify(context)
                await self._gate.open_stream(key.caller)
            except RequestError as err:
                if err.details:
                    context.set_trailing_metadata(err.status_trailer())
                await context.abort(err.code, err.detail)
        metadata = call_metadata(context)  # fixed for the stream's life
        try:
            async for request in request_iterator:
                received = time.monotonic()
                step_key = None
                try:
                    # Re-checked per step, so a revoked key stops an open stream too.
                    step_key = await self._verify(context, metadata)
                    outcome = await self._act(request, received, None, step_key)
                except RequestError as err:
                    self._finished(request, step_key, err.code.name, received, None)
                    yield pb.ActStreamResponse(
                        error=pb.StepError(
                            code=err.code.value[0],
                            message=err.detail,
                            request_id=request.request_id,
                            step=request.observation.step,
                            details=err.packed_details(),
                        )
                    )
                    continue
                chunk = self._response(request, outcome, received)
                self._finished(request, step_key, "OK", received, outcome)
                yield pb.ActStreamResponse(chunk=chunk)
        finally:
            if key is not None and self._gate is not None:
                await self._gate.close_stream(key.caller)

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        if self._gate is not None:
            try:
                await self._verify(context)
            except RequestError as err:
                await context.abort(err.code, err.detail)
        return self._describe

    # -- one observation ----------------------------------------------------

    async def _verify(self, context: grpc.aio.ServicerContext, metadata=None) -> KeyPass | None:
        if self._gate is None:
            return None
        if metadata is None:
            metadata = call_metadata(context)
        return self._gate.key_pass(metadata) or await self._gate.verify(metadata)

    async def _act(
        self, request: pb.ActRequest, received: float, remaining: float | None, key: KeyPass | None
    ) -> Outcome:
        """One observation: validated, batched, answered; with a ``key``, admitted and metered once.

        The batch admits the call (a token from this replica's slice of the
        tenant's quota) and meters it with the rest of the batch. Only a call the
        batch could not admit, or one refused before it reached a batch, is
        admitted and metered here.
        """
        if self.inflight >= self._limits.max_queued_requests:
            m.METRICS.inc(m.OVERLOAD_REJECTIONS, self._model_label)
            raise exhausted(
                f"server overloaded: {self.inflight} requests queued on this replica; retry with backoff",
                retry_after_s=OVERLOAD_RETRY_S,
            )
        if key is None:
            return await self._wait(self._pending(request, received, remaining))
        gate = self._gate
        assert gate is not None
        if key.models is not None:  # the plan names its models
            gate.authorize(key, request.observation.model or self._policy.name)
        try:
            pending = self._pending(request, received, remaining, key)
        except RequestError as err:
            # Refused before a batch, but a call all the same: it takes a token (over
            # quota, RESOURCE_EXHAUSTED is the answer) and is metered with its error.
            await gate.admit(key.caller)
            self._record(request, received, key, err.code.name, None, None)
            raise
        outcome: Outcome | None = None
        status = "CANCELLED"
        try:
            outcome = await self._wait(pending)
            if outcome is NOT_ADMITTED:  # this replica's slice had no token: wait for one, or say why not
                await gate.admit(key.caller)
                pending.admitted = True
                outcome = await self._wait(pending)
            status = "OK"
            return outcome
        except RequestError as err:
            status = err.code.name
            raise
        finally:
            # Admitted: exactly one usage record, whatever the outcome; the batch wrote it
            # unless the call never got a batch result.
            if pending.admitted and not pending.metered:
                self._record(request, received, key, status, outcome, pending)

    def _record(
        self,
        request: pb.ActRequest,
        received: float,
        key: KeyPass,
        status: str,
        outcome: Outcome | None,
        pending: Pending | None,
    ) -> None:
        """Meter one admitted call that has no batch result (refused, failed or cancelled)."""
        assert self._gate is not None
        obs = request.observation
        usage = self._gate.usage(key, obs.robot_id, obs.embodiment, request.request_id, received)
        self._gate.record(usage, self._policy.name, status, outcome, pending)

    def _pending(
        self, request: pb.ActRequest, received: float, remaining: float | None, key: KeyPass | None = None
    ) -> Pending:
        """Validate and decode one observation for the batcher."""
        obs = request.observation
        if obs.model and obs.model != self._policy.name:
            raise not_found("observation.model", f"unknown model {obs.model!r}; served: [{self._policy.name!r}]")
        if obs.model_version and obs.model_version != self._policy.version:
            raise not_found(
                "observation.model_version",
                f"model {self._policy.name!r} has version {self._policy.version!r}, not {obs.model_version!r}",
            )
        started = time.monotonic()
        decoded = codec.decode_observation(obs, self._embodiments)
        m.METRICS.observe(m.PREPROCESS_DURATION, self._model_label, time.monotonic() - started)
        if remaining is None or remaining > 1e9:
            remaining = self._limits.default_timeout_s
        return Pending(
            observation=decoded,
            deadline=received + remaining,
            received=received,
            key=key,
            request_id=request.request_id if key is not None else "",  # read only for the usage record
        )

    async def _wait(self, pending: Pending) -> Outcome:
        """The batcher's answer for one observation."""
        self.inflight += 1
        try:
            outcome = await self._submit(pending)
        except BaseException:
            # Caller cancelled or the batcher failed: make sure nobody computes for it.
            pending.cancelled = True
            raise
        finally:
            self.inflight -= 1
        if outcome.error is not None:
            raise outcome.error
        return outcome

    def _finished(
        self, request: pb.ActRequest, key: KeyPass | None, code: str, received: float, outcome: Outcome | None
    ) -> None:
        """Count and log one finished request (tuple appends: no I/O on the request path)."""
        latency_s = time.monotonic() - received
        if key is not None:
            tenant, key_id = key.tenant, key.key_id
        else:
            tenant, key_id = (m.NO_TENANT if self._gate is None else m.UNKNOWN_TENANT), ""
        embodiment = request.observation.embodiment
        # A label takes only served embodiments: a robot sending made-up names must
        # not grow the number of time series.
        label = embodiment if embodiment in self._embodiments else "other"
        name = self._policy.name
        m.METRICS.inc(m.REQUESTS, (name, self._policy.version, label, tenant, code))
        m.METRICS.observe(m.REQUEST_DURATION, (name, tenant), latency_s)
        if self._access_log is not None:
            queue_ms, batch_size = (outcome.queue_ms, outcome.batch_size) if outcome else (0.0, 0)
            self._access_log.record(
                request.request_id, tenant, key_id, name, embodiment, code, latency_s, queue_ms, batch_size
            )

    def _response(self, request: pb.ActRequest, outcome: Outcome, received: float) -> pb.ActResponse:
        resp = pb.ActResponse(
            model=self._policy.name,
            model_version=self._policy.version,
            embodiment=request.observation.embodiment,
            request_id=request.request_id,
            step=request.observation.step,
        )
        assert outcome.actions is not None
        codec.numpy_to_tensor(outcome.actions, resp.actions)
        t = resp.timing
        t.queue_ms = outcome.queue_ms
        t.compute_ms = outcome.compute_ms
        t.batch_size = outcome.batch_size
        t.total_ms = (time.monotonic() - received) * 1e3
        return resp


def _unexpected_code(exc: BaseException) -> str:
    return "CANCELLED" if isinstance(exc, asyncio.CancelledError) else "UNKNOWN"


def describe_policy(policy: Policy, max_batch_size: int = 0) -> pb.DescribeResponse:
    """The Describe answer: models and embodiments with dims, cameras, limits."""
    info = pb.ModelInfo(name=policy.name, version=policy.version, max_batch_size=max_batch_size)
    for spec in policy.embodiments.values():
        info.embodiments.append(
            pb.EmbodimentInfo(
                name=spec.name,
                description=spec.description,
                state_dim=spec.state_dim,
                action_dim=spec.action_dim,
                cameras=[pb.CameraInfo(name=c.name, height=c.height, width=c.width) for c in spec.cameras],
                chunk_length=spec.chunk_length,
                control_rate_hz=spec.control_rate_hz,
                action_low=list(spec.action_low),
                action_high=list(spec.action_high),
            )
        )
    return pb.DescribeResponse(models=[info], default_model=policy.name, server_version=__version__)


def server_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Replicas on one node bind the same port; the kernel spreads connections.
        ("grpc.so_reuseport", 1),
        # Robots hold connections open for hours and ping to keep NATs warm.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


class GrpcFrontend:
    """A grpc.aio server with the PolicyService, grpc.health.v1 and reflection."""

    def __init__(self, servicer: PolicyServicer, host: str, port: int, max_message_bytes: int):
        self.servicer = servicer
        self.server = grpc.aio.server(options=server_options(max_message_bytes))
        self.server.add_generic_rpc_handlers((PolicyServiceHandler(servicer),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind gRPC on {host}:{port}")
        self.host = host

    async def start(self) -> None:
        await self.server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_s: float) -> None:
        """Drain: report NOT_SERVING, refuse new calls, let in-flight ones finish."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)
