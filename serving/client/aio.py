"""asyncio robot client on grpc.aio: ``AsyncRobotClient`` and ``AsyncStreamSession``.

Same API as the blocking client, with ``await``. Create it inside the event loop
that uses it (``async with AsyncRobotClient(...) as robot:``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Mapping

import grpc
import grpc.aio

from serving.api import pb, pb_grpc
from serving.client._common import (
    DEFAULT_TIMEOUT_S,
    RetryPolicy,
    build_request,
    call_metadata,
    channel_options,
    check_timeout,
    chunk_from_response,
    resolve_api_key,
)
from serving.client.errors import (
    DeadlineExceeded,
    SuperbrainError,
    Unavailable,
    error_for_code,
    from_rpc_error,
    from_step_error,
)
from serving.client.types import ActionChunk, ServerInfo

log = logging.getLogger("serving.client")

__all__ = ["AsyncRobotClient", "AsyncStreamSession"]


class AsyncRobotClient:
    """asyncio twin of ``RobotClient`` (same arguments, same retries and errors)."""

    def __init__(
        self,
        target: str,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        image_format: str = "raw",
        jpeg_quality: int = 90,
        options: Mapping[str, object] | None = None,
    ):
        self.target = target
        self.timeout = check_timeout(timeout, DEFAULT_TIMEOUT_S)
        self.retry = retry or RetryPolicy()
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        opts = channel_options(options)
        if credentials is not None:
            self._channel = grpc.aio.secure_channel(target, credentials, options=opts)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=opts)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._metadata = call_metadata(resolve_api_key(api_key))
        self._closed = False
        self._sessions: weakref.WeakSet[AsyncStreamSession] = weakref.WeakSet()

    def __repr__(self) -> str:
        key = "set" if self._metadata else "unset"
        return f"AsyncRobotClient({self.target!r}, timeout={self.timeout}, api_key={key})"

    async def __aenter__(self) -> AsyncRobotClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for session in list(self._sessions):
            await session.close()
        await self._channel.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_ready(self, timeout: float | None = None) -> None:
        t = check_timeout(timeout, self.timeout)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), t)
        except asyncio.TimeoutError:
            raise Unavailable(f"could not connect to {self.target} within {t:.3g} s") from None

    async def describe(self, *, timeout: float | None = None) -> ServerInfo:
        resp, _ = await self._unary(self._stub.Describe, pb.DescribeRequest(), check_timeout(timeout, self.timeout))
        return ServerInfo.from_proto(resp)

    async def act(
        self,
        images: Mapping[str, object] | None = None,
        state=None,
        instruction: str = "",
        embodiment: str = "",
        *,
        robot_id: str = "",
        episode_id: str = "",
        step: int = 0,
        model: str = "",
        model_version: str = "",
        request_id: str | None = None,
        timeout: float | None = None,
        image_format: str | None = None,
    ) -> ActionChunk:
        """See ``RobotClient.act``."""
        start = time.monotonic()
        t = check_timeout(timeout, self.timeout)
        req = build_request(
            images=images,
            state=state,
            instruction=instruction,
            embodiment=embodiment,
            robot_id=robot_id,
            episode_id=episode_id,
            step=step,
            model=model,
            model_version=model_version,
            request_id=request_id,
            image_format=image_format or self.image_format,
            jpeg_quality=self.jpeg_quality,
        )
        return await self.act_request(req, timeout=t, _start=start)

    async def act_request(self, request: pb.ActRequest, *, timeout: float | None = None, _start=None) -> ActionChunk:
        start = _start if _start is not None else time.monotonic()
        t = check_timeout(timeout, self.timeout)
        resp, attempts = await self._unary(self._stub.Act, request, t - (time.monotonic() - start), request.request_id)
        return chunk_from_response(resp, (time.monotonic() - start) * 1e3, attempts)

    def stream(
        self,
        embodiment: str,
        *,
        instruction: str = "",
        robot_id: str = "",
        episode_id: str = "",
        model: str = "",
        model_version: str = "",
        first_step: int = 0,
        timeout: float | None = None,
        image_format: str | None = None,
    ) -> AsyncStreamSession:
        """Open an ActStream session (the stream itself starts on the first ``act``)."""
        if self._closed:
            raise ValueError("client is closed")
        session = AsyncStreamSession(
            self,
            embodiment=embodiment,
            instruction=instruction,
            robot_id=robot_id,
            episode_id=episode_id,
            model=model,
            model_version=model_version,
            first_step=first_step,
            timeout=check_timeout(timeout, self.timeout),
            image_format=image_format or self.image_format,
        )
        self._sessions.add(session)
        return session

    async def _unary(self, method, request, timeout: float, request_id: str = ""):
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"no reply within {timeout:.3g} s", request_id=request_id)
            try:
                return await method(request, timeout=remaining, metadata=self._metadata), attempt
            except grpc.RpcError as err:
                error = from_rpc_error(err, request_id=request_id)
                delay = self.retry.next_delay(
                    error.code, attempt, deadline - time.monotonic(), getattr(error, "retry_after_s", None)
                )
                if delay is None or self._closed:
                    raise error from err
                log.debug("attempt %d failed with %s; retrying in %.3f s", attempt, error.code.name, delay)
                await asyncio.sleep(delay)


class _AioStream:
    """One ActStream call: writes serialised by a lock, a reader task resolving futures."""

    def __init__(self, stub: pb_grpc.PolicyServiceStub, metadata):
        self._call = stub.ActStream(metadata=metadata)
        self._write_lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Future] = {}
        self._order: deque[str] = deque()
        self.error: SuperbrainError | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    async def send(self, request: pb.ActRequest) -> asyncio.Future:
        fut = asyncio.get_running_loop().create_future()
        rid = request.request_id
        if self.error is not None:
            fut.set_exception(self.error)
            return fut
        self._pending[rid] = fut
        self._order.append(rid)
        try:
            async with self._write_lock:
                await self._call.write(request)
        except grpc.RpcError as exc:
            self._fail(from_rpc_error(exc))
        except (asyncio.InvalidStateError, RuntimeError) as exc:  # call already finished
            self._fail(Unavailable(f"the stream is closed: {exc}"))
        return fut

    def abandon(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    async def _read(self) -> None:
        try:
            while True:
                resp = await self._call.read()
                if resp is grpc.aio.EOF:
                    break
                self._dispatch(resp)
            err: SuperbrainError = Unavailable("the server ended the stream")
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
        except asyncio.CancelledError:
            self._fail(SuperbrainError("stream closed", grpc.StatusCode.CANCELLED))
            raise
        except Exception as exc:  # pragma: no cover - defensive
            err = SuperbrainError(f"stream reader failed: {exc!r}")
        self._fail(err)

    def _dispatch(self, resp: pb.ActStreamResponse) -> None:
        kind = resp.WhichOneof("result")
        if kind is None:
            return
        rid = getattr(resp, kind).request_id
        if rid:
            with contextlib.suppress(ValueError):
                self._order.remove(rid)
        elif self._order:
            rid = self._order.popleft()
        fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(resp)

    def _fail(self, err: SuperbrainError) -> None:
        if self.error is None:
            self.error = err
        waiters = list(self._pending.values())
        self._pending.clear()
        self._order.clear()
        for fut in waiters:
            if not fut.done():
                fut.set_exception(err)

    async def close(self, timeout: float = 1.0) -> None:
        if not self._call.done():
            with contextlib.suppress(Exception):
                await self._call.done_writing()
        try:
            await asyncio.wait_for(asyncio.shield(self._reader), timeout)
        except (asyncio.TimeoutError, Exception):
            self._call.cancel()
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        self._fail(SuperbrainError("stream closed", grpc.StatusCode.CANCELLED))


class AsyncStreamSession:
    """asyncio twin of ``StreamSession``."""

    def __init__(
        self,
        client: AsyncRobotClient,
        *,
        embodiment: str,
        instruction: str,
        robot_id: str,
        episode_id: str,
        model: str,
        model_version: str,
        first_step: int,
        timeout: float,
        image_format: str,
    ):
        self._client = client
        self.embodiment = embodiment
        self.instruction = instruction
        self.robot_id = robot_id
        self.episode_id = episode_id
        self.model = model
        self.model_version = model_version
        self.timeout = timeout
        self.image_format = image_format
        self._next_step = int(first_step)
        self._stream: _AioStream | None = None
        self._closed = False

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        self._closed = True
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    async def act(
        self,
        images: Mapping[str, object] | None = None,
        state=None,
        *,
        instruction: str | None = None,
        step: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
        image_format: str | None = None,
    ) -> ActionChunk:
        start = time.monotonic()
        t = check_timeout(timeout, self.timeout)
        deadline = start + t
        if step is None:
            step = self._next_step
        self._next_step = int(step) + 1
        req = build_request(
            images=images,
            state=state,
            instruction=self.instruction if instruction is None else instruction,
            embodiment=self.embodiment,
            robot_id=self.robot_id,
            episode_id=self.episode_id,
            step=step,
            model=self.model,
            model_version=self.model_version,
            request_id=request_id,
            image_format=image_format or self.image_format,
            jpeg_quality=self._client.jpeg_quality,
        )
        rid = req.request_id
        attempt = 0
        while True:
            attempt += 1
            stream = await self._ensure_stream()
            fut = await stream.send(req)
            try:
                resp = await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                stream.abandon(rid)
                raise DeadlineExceeded(f"no reply on the stream within {t:.3g} s", request_id=rid, step=step) from None
            except SuperbrainError as err:
                error = error_for_code(
                    err.code,
                    err.details,
                    request_id=rid,
                    step=step,
                    retry_after_s=getattr(err, "retry_after_s", None),
                    quota_violations=getattr(err, "quota_violations", ()),
                )
            else:
                if resp.WhichOneof("result") == "chunk":
                    return chunk_from_response(resp.chunk, (time.monotonic() - start) * 1e3, attempt)
                error = from_step_error(resp.error)
            delay = self._client.retry.next_delay(
                error.code, attempt, deadline - time.monotonic(), getattr(error, "retry_after_s", None)
            )
            if delay is None or self._closed:
                raise error
            log.debug("stream step %d failed with %s; retrying in %.3f s", step, error.code.name, delay)
            await asyncio.sleep(delay)

    async def _ensure_stream(self) -> _AioStream:
        if self._closed or self._client.closed:
            raise SuperbrainError("stream session is closed", grpc.StatusCode.CANCELLED)
        stream = self._stream
        if stream is not None and stream.error is None:
            return stream
        self._stream = new = _AioStream(self._client._stub, self._client._metadata)
        if stream is not None:
            await stream.close(timeout=0.1)
        return new
