"""Robot SDK against a real gRPC server (a small fake PolicyService on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections import Counter
from concurrent import futures

import grpc
import numpy as np
import pytest
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from serving import codec
from serving.api import pb, pb_grpc
from serving.client import (
    ActionChunk,
    AsyncRobotClient,
    ChunkBroker,
    RetryPolicy,
    RobotClient,
    ServerInfo,
    errors,
)
from serving.client._common import build_request, channel_options
from serving.client.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    SuperbrainError,
    Unavailable,
)

HORIZON = 4
ACTION_DIM = 3
FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def make_response(req: pb.ActRequest) -> pb.ActResponse:
    """Actions derived from the request: column 0 = state[0], column 1 = step, column 2 = 0..T-1."""
    obs = req.observation
    state = codec.tensor_to_numpy(obs.state, "state") if obs.HasField("state") else np.zeros(1, np.float32)
    actions = np.zeros((HORIZON, ACTION_DIM), np.float32)
    actions[:, 0] = state[0]
    actions[:, 1] = obs.step
    actions[:, 2] = np.arange(HORIZON)
    resp = pb.ActResponse(
        model="fake",
        model_version="v1",
        embodiment=obs.embodiment,
        request_id=req.request_id,
        step=obs.step,
    )
    codec.numpy_to_tensor(actions, resp.actions)
    resp.timing.queue_ms = 1.5
    resp.timing.compute_ms = 2.5
    resp.timing.batch_size = 1
    resp.timing.total_ms = 4.0
    return resp


def retry_info_status(delay_s: float):
    detail = any_pb2.Any()
    seconds = int(delay_s)
    detail.Pack(
        error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int(round((delay_s - seconds) * 1e9)))
        )
    )
    st = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message="server overloaded", details=[detail])
    return rpc_status.to_status(st)


class FakePolicy(pb_grpc.PolicyServiceServicer):
    """Behaviour is chosen by the observation's instruction; counters are keyed by episode_id."""

    def __init__(self):
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.streams = 0
        self.metadata: list[dict] = []
        self.images: dict[str, tuple[str, tuple]] = {}

    def _count(self, key: str) -> int:
        with self.lock:
            self.calls[key] += 1
            return self.calls[key]

    def Act(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        obs = request.observation
        cmd = obs.instruction
        n = self._count(obs.episode_id)
        for name, image in obs.images.items():
            self.images[name] = (image.WhichOneof("data"), codec.decode_image(image, name).shape)
        if cmd == "invalid":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "observation.state: wrong shape")
        if cmd == "not-found":
            context.abort(grpc.StatusCode.NOT_FOUND, "observation.embodiment: unknown")
        if cmd.startswith("unavailable:") and n <= int(cmd.split(":")[1]):
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        if cmd.startswith("exhausted:"):
            context.abort_with_status(retry_info_status(float(cmd.split(":")[1])))
        if cmd == "exhausted-plain":
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        if cmd.startswith("sleep:"):
            time.sleep(float(cmd.split(":")[1]))
        return make_response(request)

    def ActStream(self, request_iterator, context):
        with self.lock:
            self.streams += 1
        self.metadata.append(dict(context.invocation_metadata()))
        for req in request_iterator:
            obs = req.observation
            cmd = obs.instruction
            if cmd == "invalid":
                yield pb.ActStreamResponse(
                    error=pb.StepError(
                        code=code_pb2.INVALID_ARGUMENT,
                        message="observation.state: wrong shape",
                        request_id=req.request_id,
                        step=obs.step,
                    )
                )
                continue
            if cmd == "abort-stream" and self._count(obs.episode_id) == 1:
                context.abort(grpc.StatusCode.UNAVAILABLE, "replica going away")
            if cmd.startswith("sleep:"):
                time.sleep(float(cmd.split(":")[1]))
            yield pb.ActStreamResponse(chunk=make_response(req))

    def Describe(self, request, context):
        self.metadata.append(dict(context.invocation_metadata()))
        return pb.DescribeResponse(
            default_model="fake",
            server_version="9.9",
            models=[
                pb.ModelInfo(
                    name="fake",
                    version="v1",
                    max_batch_size=8,
                    embodiments=[
                        pb.EmbodimentInfo(
                            name="franka_arm",
                            description="7-dof arm",
                            state_dim=8,
                            action_dim=ACTION_DIM,
                            cameras=[pb.CameraInfo(name="front", height=224, width=224)],
                            chunk_length=HORIZON,
                            control_rate_hz=20.0,
                            action_low=[-1, -2, -3],
                            action_high=[1, 2, 3],
                        )
                    ],
                )
            ],
        )


def start_server(servicer: FakePolicy, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20)],
    )
    pb_grpc.add_PolicyServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    assert bound, "could not bind"
    server.start()
    return server, bound


@pytest.fixture(scope="module")
def server():
    servicer = FakePolicy()
    srv, port = start_server(servicer)
    yield servicer, f"127.0.0.1:{port}"
    srv.stop(0)


@pytest.fixture(scope="module")
def robot(server):
    _, addr = server
    with RobotClient(addr, retry=FAST_RETRY, api_key="") as client:
        yield client


def state(x: float) -> np.ndarray:
    return np.array([x, 0, 0, 0, 0, 0, 0, 0], np.float32)


def ep(request) -> str:
    """A per-test episode id, so the fake's counters do not leak between tests."""
    return request.node.name


# -- sync client ----------------------------------------------------------------


def test_describe_returns_typed_info(robot):
    info = robot.describe()
    assert isinstance(info, ServerInfo)
    assert info.default_model == "fake" and info.server_version == "9.9"
    model = info.model()
    assert model.name == "fake" and model.version == "v1" and model.max_batch_size == 8
    emb = info.embodiment("franka_arm")
    assert emb is info.embodiments["franka_arm"]
    assert (emb.state_dim, emb.action_dim, emb.chunk_length) == (8, 3, HORIZON)
    assert emb.camera_names == ("front",) and emb.cameras[0].height == 224
    assert emb.control_rate_hz == 20.0 and emb.chunk_duration_s == pytest.approx(0.2)
    assert emb.action_low.dtype == np.float32
    np.testing.assert_array_equal(emb.action_high, [1, 2, 3])
    with pytest.raises(KeyError):
        info.embodiment("nope")


def test_act_returns_its_own_chunk(robot, request):
    frame = np.zeros((48, 64, 3), np.uint8)
    chunk = robot.act(
        images={"front": frame},
        state=state(0.5),
        instruction="pick up the red cup",
        embodiment="franka_arm",
        episode_id=ep(request),
        step=7,
        request_id="req-1",
    )
    assert isinstance(chunk, ActionChunk)
    assert chunk.actions.dtype == np.float32 and chunk.actions.shape == (HORIZON, ACTION_DIM)
    assert chunk.actions.flags.writeable
    np.testing.assert_array_equal(chunk.actions[:, 0], 0.5)
    np.testing.assert_array_equal(chunk.actions[:, 1], 7)
    assert (chunk.model, chunk.model_version, chunk.embodiment) == ("fake", "v1", "franka_arm")
    assert chunk.request_id == "req-1" and chunk.step == 7 and chunk.attempts == 1
    assert chunk.timing.queue_ms == 1.5 and chunk.timing.batch_size == 1 and chunk.timing.total_ms == 4.0
    assert chunk.latency_ms > 0 and len(chunk) == HORIZON


def test_act_generates_request_ids(robot, request):
    a = robot.act(state=state(1), embodiment="franka_arm", episode_id=ep(request))
    b = robot.act(state=state(2), embodiment="franka_arm", episode_id=ep(request))
    assert a.request_id and b.request_id and a.request_id != b.request_id


def test_concurrent_calls_each_get_their_answer(robot, request):
    with futures.ThreadPoolExecutor(8) as pool:
        chunks = list(
            pool.map(
                lambda i: robot.act(state=state(i), step=i, embodiment="franka_arm", episode_id=ep(request)),
                range(16),
            )
        )
    for i, chunk in enumerate(chunks):
        assert chunk.actions[0, 0] == i and chunk.step == i


@pytest.mark.parametrize("fmt", ["raw", "jpeg", "png"])
def test_image_formats(server, robot, fmt, request):
    servicer, _ = server
    frame = np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8)
    robot.act(images={"front": frame}, state=state(0), embodiment="franka_arm", image_format=fmt)
    assert servicer.images["front"] == (fmt, (32, 40, 3))


def test_bad_frames_rejected_client_side(robot):
    with pytest.raises(TypeError):
        robot.act(images={"front": np.zeros((4, 4, 3), np.float32)}, state=state(0), embodiment="x")
    with pytest.raises(ValueError):
        robot.act(images={"front": np.zeros((4, 4), np.uint8)}, state=state(0), embodiment="x")
    with pytest.raises(ValueError):
        robot.act(state=state(0), embodiment="x", image_format="bmp")


def test_state_sent_as_float32():
    req = build_request(images=None, state=[1.0, 2.0], instruction="", embodiment="e")
    assert req.observation.state.dtype == pb.FLOAT32 and list(req.observation.state.shape) == [2]


def test_invalid_argument_not_retried(server, robot, request):
    servicer, _ = server
    with pytest.raises(InvalidArgument) as info:
        robot.act(state=state(0), instruction="invalid", embodiment="franka_arm", episode_id=ep(request))
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "observation.state" in err.details
    assert isinstance(err, SuperbrainError)
    assert servicer.calls[ep(request)] == 1


def test_not_found(robot):
    with pytest.raises(NotFound):
        robot.act(state=state(0), instruction="not-found", embodiment="nope")


def test_unavailable_retried_then_succeeds(server, robot, request):
    servicer, _ = server
    chunk = robot.act(state=state(3), instruction="unavailable:2", embodiment="franka_arm", episode_id=ep(request))
    assert chunk.actions[0, 0] == 3
    assert chunk.attempts == 3
    assert servicer.calls[ep(request)] == 3


def test_unavailable_gives_up_after_max_attempts(server, robot, request):
    servicer, _ = server
    with pytest.raises(Unavailable) as info:
        robot.act(state=state(0), instruction="unavailable:99", embodiment="franka_arm", episode_id=ep(request))
    assert info.value.details == "warming up"
    assert servicer.calls[ep(request)] == FAST_RETRY.max_attempts


def test_retries_stay_within_the_deadline(server, request):
    servicer, addr = server
    slow_retry = RetryPolicy(max_attempts=100, initial_backoff_s=0.1, max_backoff_s=0.1)
    with RobotClient(addr, retry=slow_retry) as client:
        start = time.monotonic()
        with pytest.raises(Unavailable):
            client.act(
                state=state(0),
                instruction="unavailable:999",
                embodiment="franka_arm",
                episode_id=ep(request),
                timeout=0.3,
            )
        assert time.monotonic() - start < 1.0
    assert 2 <= servicer.calls[ep(request)] <= 6


def test_resource_exhausted_carries_retry_after(server, robot, request):
    servicer, _ = server
    with pytest.raises(ResourceExhausted) as info:
        robot.act(
            state=state(0), instruction="exhausted:1.5", embodiment="franka_arm", episode_id=ep(request), timeout=1.0
        )
    assert info.value.retry_after_s == pytest.approx(1.5)
    assert info.value.details == "server overloaded"
    assert info.value.limit is None  # overload, not a quota
    assert servicer.calls[ep(request)] == 1  # the hint does not fit in the deadline: not retried


def test_resource_exhausted_retry_hint_is_honoured_within_the_deadline(server, robot, request):
    servicer, _ = server
    start = time.monotonic()
    with pytest.raises(ResourceExhausted):
        robot.act(state=state(0), instruction="exhausted:0.1", embodiment="franka_arm", episode_id=ep(request))
    elapsed = time.monotonic() - start
    assert servicer.calls[ep(request)] == FAST_RETRY.max_attempts
    assert elapsed >= 0.1 * (FAST_RETRY.max_attempts - 1)  # waited the hint each time, no faster


def test_resource_exhausted_without_details(robot):
    with pytest.raises(ResourceExhausted) as info:
        robot.act(state=state(0), instruction="exhausted-plain", embodiment="franka_arm")
    assert info.value.retry_after_s is None


def test_deadline_honoured(server, robot, request):
    servicer, _ = server
    start = time.monotonic()
    with pytest.raises(DeadlineExceeded) as info:
        robot.act(state=state(0), instruction="sleep:1.0", embodiment="franka_arm", episode_id=ep(request), timeout=0.2)
    assert time.monotonic() - start < 0.8
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert servicer.calls[ep(request)] == 1


def test_api_key_sent_as_bearer_and_never_shown(server, monkeypatch):
    servicer, addr = server
    monkeypatch.setenv("SUPERBRAIN_API_KEY", "s3cret")
    with RobotClient(addr) as client:
        client.describe()
        assert servicer.metadata[-1]["authorization"] == "Bearer s3cret"
        assert "s3cret" not in repr(client)
    with RobotClient(addr, api_key="other") as client:
        client.describe()
        assert servicer.metadata[-1]["authorization"] == "Bearer other"
    with RobotClient(addr, api_key="") as client:  # "" disables the env default
        client.describe()
        assert "authorization" not in servicer.metadata[-1]


def test_channel_options():
    opts = dict(channel_options({"grpc.keepalive_time_ms": 5000}))
    assert opts["grpc.max_receive_message_length"] >= 64 * 2**20
    assert opts["grpc.max_send_message_length"] >= 64 * 2**20
    assert opts["grpc.keepalive_time_ms"] == 5000


def test_large_frames_fit(robot):
    frames = {f"cam{i}": np.zeros((1080, 1920, 3), np.uint8) for i in range(3)}  # ~18 MiB raw
    chunk = robot.act(images=frames, state=state(1), embodiment="franka_arm", timeout=5)
    assert chunk.actions[0, 0] == 1


def test_survives_server_restart():
    servicer = FakePolicy()
    srv, port = start_server(servicer)
    addr = f"127.0.0.1:{port}"
    with RobotClient(addr, timeout=3.0, retry=RetryPolicy(max_attempts=20, max_backoff_s=0.2)) as client:
        session = client.stream("franka_arm")
        assert client.act(state=state(1), embodiment="franka_arm").actions[0, 0] == 1
        assert session.act(state=state(2)).actions[0, 0] == 2
        srv.stop(0).wait()
        with pytest.raises(Unavailable):
            client.act(state=state(0), embodiment="franka_arm", timeout=0.3)
        srv, port2 = start_server(servicer, port)
        assert port2 == port
        try:
            assert client.act(state=state(3), embodiment="franka_arm").actions[0, 0] == 3
            assert session.act(state=state(4)).actions[0, 0] == 4  # a new stream under the hood
            assert servicer.streams == 2
        finally:
            session.close()
            srv.stop(0)


def test_async_client_survives_server_restart():
    servicer = FakePolicy()
    srv, port = start_server(servicer)

    async def main():
        nonlocal srv
        retry = RetryPolicy(max_attempts=20, max_backoff_s=0.2)
        async with AsyncRobotClient(f"127.0.0.1:{port}", timeout=3.0, retry=retry) as client:
            session = client.stream("franka_arm")
            assert (await client.act(state=state(1), embodiment="franka_arm")).actions[0, 0] == 1
            assert (await session.act(state=state(2))).actions[0, 0] == 2
            srv.stop(0).wait()
            with pytest.raises(Unavailable):
                await client.act(state=state(0), embodiment="franka_arm", timeout=0.3)
            srv, _ = start_server(servicer, port)
            assert (await client.act(state=state(3), embodiment="franka_arm")).actions[0, 0] == 3
            assert (await session.act(state=state(4))).actions[0, 0] == 4
            assert servicer.streams == 2

    try:
        asyncio.run(main())
    finally:
        srv.stop(0)


def test_wait_ready(server):
    _, addr = server
    with RobotClient(addr) as client:
        client.wait_ready(2.0)
    with RobotClient("127.0.0.1:1") as client, pytest.raises(Unavailable):
        client.wait_ready(0.1)


def test_closed_client_refuses_calls(server):
    _, addr = server
    client = RobotClient(addr)
    client.close()
    client.close()  # idempotent
    with pytest.raises(ValueError):
        client.stream("franka_arm")


# -- stream sessions --------------------------------------------------------------


def test_stream_session_in_order(server, robot, request):
    servicer, _ = server
    before = servicer.streams
    with robot.stream("franka_arm", instruction="go", episode_id=ep(request)) as session:
        for i in range(6):
            chunk = session.act(state=state(10 + i))
            assert chunk.actions[0, 0] == 10 + i
            assert chunk.step == i  # steps count up on their own
        chunk = session.act(state=state(1), step=100)
        assert chunk.step == 100
        assert session.act(state=state(1)).step == 101
    assert servicer.streams == before + 1


def test_stream_step_error_keeps_stream_open(server, robot, request):
    servicer, _ = server
    before = servicer.streams
    with robot.stream("franka_arm", episode_id=ep(request)) as session:
        assert session.act(state=state(1)).actions[0, 0] == 1
        with pytest.raises(InvalidArgument) as info:
            session.act(state=state(2), instruction="invalid")
        assert info.value.step == 1 and "observation.state" in info.value.details
        assert session.act(state=state(3)).actions[0, 0] == 3
    assert servicer.streams == before + 1


def test_stream_step_timeout_drops_late_reply(server, robot, request):
    servicer, _ = server
    before = servicer.streams
    with robot.stream("franka_arm", episode_id=ep(request)) as session:
        with pytest.raises(DeadlineExceeded):
            session.act(state=state(1), instruction="sleep:0.4", timeout=0.1)
        chunk = session.act(state=state(2))  # the late reply to step 0 is not mistaken for this one
        assert chunk.actions[0, 0] == 2 and chunk.step == 1
    assert servicer.streams == before + 1


def test_stream_reopens_after_unavailable(server, robot, request):
    servicer, _ = server
    before = servicer.streams
    with robot.stream("franka_arm", episode_id=ep(request)) as session:
        chunk = session.act(state=state(5), instruction="abort-stream")
        assert chunk.actions[0, 0] == 5 and chunk.attempts == 2
    assert servicer.streams == before + 2


def test_stream_concurrent_steps(robot, request):
    with robot.stream("franka_arm", episode_id=ep(request)) as session, futures.ThreadPoolExecutor(4) as pool:
        chunks = list(pool.map(lambda i: session.act(state=state(i)), range(12)))
    assert [c.actions[0, 0] for c in chunks] == list(range(12))


def test_closed_session_raises(robot):
    session = robot.stream("franka_arm")
    session.close()
    with pytest.raises(SuperbrainError):
        session.act(state=state(0))


# -- asyncio client -----------------------------------------------------------------


def test_async_client(server, request):
    servicer, addr = server
    name = ep(request)

    async def main():
        async with AsyncRobotClient(addr, retry=FAST_RETRY, api_key="k") as robot:
            await robot.wait_ready(2.0)
            info = await robot.describe()
            assert info.embodiment("franka_arm").chunk_length == HORIZON
            chunk = await robot.act(
                images={"front": np.zeros((8, 8, 3), np.uint8)},
                state=state(0.25),
                embodiment="franka_arm",
                step=3,
            )
            assert chunk.actions[0, 0] == 0.25 and chunk.step == 3
            assert servicer.metadata[-1]["authorization"] == "Bearer k"

            chunks = await asyncio.gather(*(robot.act(state=state(i), embodiment="franka_arm") for i in range(10)))
            assert [c.actions[0, 0] for c in chunks] == list(range(10))

            chunk = await robot.act(
                state=state(4), instruction="unavailable:2", embodiment="franka_arm", episode_id=name + "u"
            )
            assert chunk.attempts == 3 and servicer.calls[name + "u"] == 3

            with pytest.raises(InvalidArgument):
                await robot.act(state=state(0), instruction="invalid", embodiment="franka_arm")
            with pytest.raises(ResourceExhausted) as exc:
                await robot.act(
                    state=state(0),
                    instruction="exhausted:0.25",
                    embodiment="franka_arm",
                    episode_id=name + "x",
                    timeout=0.2,
                )
            assert exc.value.retry_after_s == pytest.approx(0.25) and servicer.calls[name + "x"] == 1

            start = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await robot.act(state=state(0), instruction="sleep:1.0", embodiment="franka_arm", timeout=0.2)
            assert time.monotonic() - start < 0.8

    asyncio.run(main())


def test_async_stream_session(server, request):
    servicer, addr = server
    name = ep(request)

    async def main():
        async with AsyncRobotClient(addr, retry=FAST_RETRY) as robot:
            before = servicer.streams
            async with robot.stream("franka_arm", episode_id=name) as session:
                for i in range(5):
                    chunk = await session.act(state=state(i))
                    assert chunk.actions[0, 0] == i and chunk.step == i
                with pytest.raises(InvalidArgument) as exc:
                    await session.act(state=state(0), instruction="invalid")
                assert exc.value.step == 5
                with pytest.raises(DeadlineExceeded):
                    await session.act(state=state(0), instruction="sleep:0.4", timeout=0.1)
                chunk = await session.act(state=state(7))
                assert chunk.actions[0, 0] == 7 and chunk.step == 7
                chunks = await asyncio.gather(*(session.act(state=state(20 + i)) for i in range(6)))
                assert [c.actions[0, 0] for c in chunks] == [20 + i for i in range(6)]
            assert servicer.streams == before + 1

            async with robot.stream("franka_arm", episode_id=name + "a") as session:
                chunk = await session.act(state=state(9), instruction="abort-stream")
                assert chunk.actions[0, 0] == 9 and chunk.attempts == 2
            assert servicer.streams == before + 3

    asyncio.run(main())


# -- errors ---------------------------------------------------------------------------


def test_error_mapping_from_step_error():
    err = errors.from_step_error(pb.StepError(code=8, message="busy", request_id="r", step=4))
    assert isinstance(err, ResourceExhausted) and err.retry_after_s is None
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.request_id == "r" and err.step == 4
    assert "RESOURCE_EXHAUSTED" in str(err)
    unknown = errors.from_step_error(pb.StepError(code=13, message="boom"))
    assert isinstance(unknown, errors.Internal)
    other = errors.error_for_code(grpc.StatusCode.ABORTED, "x")
    assert type(other) is SuperbrainError and other.code == grpc.StatusCode.ABORTED
    for cls in (errors.Unauthenticated, errors.PermissionDenied, DeadlineExceeded, NotFound):
        assert issubclass(cls, SuperbrainError)


def test_errors_pickle():
    err = ResourceExhausted("busy", retry_after_s=2.0, request_id="r", step=1)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ResourceExhausted and back.retry_after_s == 2.0 and back.step == 1
    assert back.code == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- broker end to end --------------------------------------------------------------------


def test_broker_with_real_client(robot, request):
    ticks = {"n": 0}

    def fetch():
        return robot.act(state=state(ticks["n"]), embodiment="franka_arm", episode_id=ep(request))

    with ChunkBroker(fetch, control_rate_hz=200, initial_latency_s=0.05) as broker:
        for _ in range(3 * HORIZON):
            action = broker.next_action(timeout=5)
            assert action.shape == (ACTION_DIM,) and action.dtype == np.float32
            ticks["n"] += 1
        stats = broker.stats
    assert stats.chunks >= 3 and stats.latency_mean_s is not None
    assert isinstance(broker.last_chunk, ActionChunk) or broker.last_chunk is None
