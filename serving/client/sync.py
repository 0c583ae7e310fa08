"""Blocking robot client: ``RobotClient`` (Act / Describe) and ``StreamSession`` (ActStream).

Thread-safe: one client (one HTTP/2 connection) can serve a whole robot process.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

import grpc

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

__all__ = ["RobotClient", "StreamSession"]


class RobotClient:
    """Talk to a Superbrain server from a robot's control stack.

    ``target`` is ``host:port``. ``api_key`` defaults to $SUPERBRAIN_API_KEY (pass ""
    to send none); it travels as ``authorization: Bearer <key>`` metadata and is never
    logged. ``timeout`` is the default per-call deadline in seconds; UNAVAILABLE is
    retried (``retry``) within that deadline. ``credentials`` switches to TLS.
    """

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
            self._channel = grpc.secure_channel(target, credentials, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._stub = pb_grpc.PolicyServiceStub(self._channel)
        self._metadata = call_metadata(resolve_api_key(api_key))
        self._closed = threading.Event()
        self._sessions: weakref.WeakSet[StreamSession] = weakref.WeakSet()

    def __repr__(self) -> str:
        key = "set" if self._metadata else "unset"
        return f"RobotClient({self.target!r}, timeout={self.timeout}, api_key={key})"

    # -- lifecycle ------------------------------------------------------------

    def __enter__(self) -> RobotClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close open stream sessions and the channel."""
        if self._closed.is_set():
            return
        self._closed.set()
        for session in list(self._sessions):
            session.close()
        self._channel.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the channel is connected; raises Unavailable after ``timeout`` seconds."""
        t = check_timeout(timeout, self.timeout)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=t)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"could not connect to {self.target} within {t:.3g} s") from None

    # -- RPCs -----------------------------------------------------------------

    def describe(self, *, timeout: float | None = None) -> ServerInfo:
        """Models and embodiments served: dims, cameras, chunk length, control rate, limits."""
        resp, _ = self._unary(self._stub.Describe, pb.DescribeRequest(), check_timeout(timeout, self.timeout))
        return ServerInfo.from_proto(resp)

    def act(
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
        """Send one observation, get one action chunk (``chunk.actions``: float32 (horizon, action_dim)).

        ``images`` maps camera name -> uint8 (H, W, 3) frame (or a ready ``pb.Image``);
        frames go raw unless ``image_format`` is "jpeg" or "png". ``timeout`` (seconds)
        bounds the whole call, retries included.
        """
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
        return self.act_request(req, timeout=t, _start=start)

    def act_request(self, request: pb.ActRequest, *, timeout: float | None = None, _start=None) -> ActionChunk:
        """Lower level: send a ready ``pb.ActRequest``."""
        start = _start if _start is not None else time.monotonic()
        t = check_timeout(timeout, self.timeout)
        resp, attempts = self._unary(self._stub.Act, request, t - (time.monotonic() - start), request.request_id)
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
    ) -> StreamSession:
        """Open an ActStream session for a long control loop (see ``StreamSession``)."""
        if self.closed:
            raise ValueError("client is closed")
        session = StreamSession(
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

    # -- internals ------------------------------------------------------------

    def _unary(self, method, request, timeout: float, request_id: str = ""):
        """Call with a deadline; retry UNAVAILABLE within it. Returns (response, attempts)."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(f"no reply within {timeout:.3g} s", request_id=request_id)
            try:
                return method(request, timeout=remaining, metadata=self._metadata), attempt
            except grpc.RpcError as err:
                error = from_rpc_error(err, request_id=request_id)
                delay = self.retry.next_delay(
                    error.code, attempt, deadline - time.monotonic(), getattr(error, "retry_after_s", None)
                )
                if delay is None or self.closed:
                    raise error from err
                log.debug("attempt %d failed with %s; retrying in %.3f s", attempt, error.code.name, delay)
                if self._closed.wait(delay):
                    raise error from err


class _Stream:
    """One ActStream call: a request queue feeding grpc, a reader thread resolving futures."""

    def __init__(self, stub: pb_grpc.PolicyServiceStub, metadata):
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending: dict[str, Future] = {}
        self._order: deque[str] = deque()  # ids sent and not yet answered, in order
        self.error: SuperbrainError | None = None
        self._call = stub.ActStream(self._request_iter(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="superbrain-stream-reader", daemon=True)
        self._reader.start()

    def _request_iter(self):
        while True:
            item = self._requests.get()
            if item is None:
                return
            yield item

    def send(self, request: pb.ActRequest) -> Future:
        fut: Future = Future()
        rid = request.request_id
        with self._lock:
            if self.error is not None:
                fut.set_exception(self.error)
                return fut
            self._pending[rid] = fut
            self._order.append(rid)
        self._requests.put(request)
        return fut

    def abandon(self, request_id: str) -> None:
        """Stop waiting for ``request_id``; its late reply (if any) will be dropped."""
        with self._lock:
            self._pending.pop(request_id, None)

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._dispatch(resp)
            err: SuperbrainError = Unavailable("the server ended the stream")
        except grpc.RpcError as exc:
            err = from_rpc_error(exc)
        except Exception as exc:  # pragma: no cover - defensive: never leave waiters hanging
            err = SuperbrainError(f"stream reader failed: {exc!r}")
        self._fail(err)

    def _dispatch(self, resp: pb.ActStreamResponse) -> None:
        kind = resp.WhichOneof("result")
        if kind is None:
            return
        rid = getattr(resp, kind).request_id
        with self._lock:
            if rid:
                with contextlib.suppress(ValueError):
                    self._order.remove(rid)
            elif self._order:
                rid = self._order.popleft()  # no id echoed: replies come in order
            fut = self._pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_result(resp)

    def _fail(self, err: SuperbrainError) -> None:
        with self._lock:
            if self.error is None:
                self.error = err
            waiters = list(self._pending.values())
            self._pending.clear()
            self._order.clear()
        self._requests.put(None)  # release grpc's request-consumer thread
        for fut in waiters:
            if not fut.done():
                fut.set_exception(err)

    def close(self, timeout: float = 1.0) -> None:
        self._requests.put(None)  # half-close: the server finishes the stream
        self._reader.join(timeout)
        if self._reader.is_alive():
            self._call.cancel()
            self._reader.join(timeout)
        self._fail(SuperbrainError("stream closed", grpc.StatusCode.CANCELLED))


class StreamSession:
    """A control session on one ActStream: ``act()`` sends an observation and returns its chunk.

    Fixed fields (embodiment, robot/episode ids, model, default instruction) are given
    once; ``step`` counts up from ``first_step`` unless passed. Each ``act()`` has its
    own deadline (``timeout``): a step that times out raises DeadlineExceeded and its
    late reply is dropped, the stream stays open. A StepError from the server raises
    the matching typed exception for that step only. If the stream itself breaks
    (server restart: UNAVAILABLE) the step is retried on a new stream within its
    deadline, so a control loop survives restarts. Safe to call from several threads.
    """

    def __init__(
        self,
        client: RobotClient,
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
        self._lock = threading.Lock()
        self._stream: _Stream | None = None
        self._closed = False

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            stream.close()

    def act(
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
        with self._lock:
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
            stream = self._ensure_stream()
            fut = stream.send(req)
            try:
                resp = fut.result(timeout=max(0.0, deadline - time.monotonic()))
            except FutureTimeout:
                stream.abandon(rid)
                raise DeadlineExceeded(f"no reply on the stream within {t:.3g} s", request_id=rid, step=step) from None
            except SuperbrainError as err:  # the stream broke
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
            time.sleep(delay)

    def _ensure_stream(self) -> _Stream:
        with self._lock:
            if self._closed or self._client.closed:
                raise SuperbrainError("stream session is closed", grpc.StatusCode.CANCELLED)
            stream = self._stream
            if stream is not None and stream.error is None:
                return stream
            self._stream = _Stream(self._client._stub, self._client._metadata)
            new = self._stream
        if stream is not None:
            stream.close(timeout=0.1)
        return new
