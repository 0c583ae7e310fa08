"""The gRPC front door and engine without Ray: status codes, isolation, deadlines, overload, draining."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import codec
from serving.api import pb, pb_grpc
from serving.ingress import IngressLimits
from tests.policies import ARM, DOG, EchoPolicy, expected_echo
from tests.servers import IngressThread


def request(spec=ARM, state=None, fill: int = 2, instruction: str = "go", step: int = 0) -> pb.ActRequest:
    state = np.arange(spec.state_dim, dtype=np.float32) if state is None else np.asarray(state, np.float32)
    images = {c.name: codec.raw_image(np.full((c.height, c.width, 3), fill, np.uint8)) for c in spec.cameras}
    return pb.ActRequest(
        request_id=f"r{step}",
        observation=pb.Observation(
            embodiment=spec.name, state=codec.numpy_to_tensor(state), images=images, instruction=instruction, step=step
        ),
    )


@pytest.fixture(scope="module")
def server():
    with IngressThread(EchoPolicy(delay_s=0.01), max_batch_size=16, wait_s=0.01) as srv:
        yield srv


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield pb_grpc.PolicyServiceStub(channel)


def test_act_returns_the_callers_chunk(stub) -> None:
    resp = stub.Act(request(DOG, state=[1, 2, 3, 4, 5], fill=4, step=9), timeout=5)
    actions = codec.tensor_to_numpy(resp.actions, "actions")
    np.testing.assert_allclose(actions, expected_echo(DOG, np.array([1, 2, 3, 4, 5.0]), 4.0))
    assert (resp.model, resp.model_version, resp.embodiment, resp.step, resp.request_id) == (
        "echo",
        "1",
        "dog",
        9,
        "r9",
    )
    assert resp.timing.batch_size >= 1 and resp.timing.total_ms > 0


def test_concurrent_mixed_robots_each_get_their_own_chunk(server, stub) -> None:
    def call(i: int):
        spec = ARM if i % 2 else DOG
        state = np.full(spec.state_dim, float(i))
        resp = stub.Act(request(spec, state=state, fill=i % 7), timeout=10)
        return i, spec, state, resp

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(64)))
    sizes = []
    for i, spec, state, resp in results:
        np.testing.assert_allclose(codec.tensor_to_numpy(resp.actions, "a"), expected_echo(spec, state, i % 7))
        sizes.append(resp.timing.batch_size)
    assert max(sizes) > 1, "concurrent robots should have shared batches"


def test_describe_lists_embodiments(stub) -> None:
    info = stub.Describe(pb.DescribeRequest(), timeout=5)
    assert info.default_model == "echo"
    dims = {e.name: (e.state_dim, e.action_dim, [c.name for c in e.cameras]) for e in info.models[0].embodiments}
    assert dims == {"arm": (3, 2, ["front"]), "dog": (5, 3, ["head", "tail"])}


@pytest.mark.parametrize(
    "make, code, field",
    [
        (lambda: request(ARM, state=[1, float("nan"), 0]), grpc.StatusCode.INVALID_ARGUMENT, "observation.state"),
        (lambda: request(ARM, state=[1, 2]), grpc.StatusCode.INVALID_ARGUMENT, "observation.state"),
        (
            lambda: _with(request(ARM), lambda o: o.images["front"].CopyFrom(pb.Image(jpeg=b"\xff\xd8junk"))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "images[front].jpeg",
        ),
        (
            lambda: _with(request(ARM), lambda o: setattr(o, "embodiment", "tank")),
            grpc.StatusCode.NOT_FOUND,
            "observation.embodiment",
        ),
        (
            lambda: _with(request(ARM), lambda o: setattr(o, "model", "gpt")),
            grpc.StatusCode.NOT_FOUND,
            "observation.model",
        ),
    ],
)
def test_errors_carry_code_and_field(stub, make, code, field) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stub.Act(make(), timeout=5)
    assert info.value.code() == code
    assert field in info.value.details()


def _with(req: pb.ActRequest, mutate) -> pb.ActRequest:
    mutate(req.observation)
    return req


def test_oversized_message_is_resource_exhausted() -> None:
    with IngressThread(EchoPolicy(), max_message_bytes=1 << 16) as srv, grpc.insecure_channel(srv.address) as ch:
        big = request(ARM)
        big.observation.instruction = "x" * (1 << 17)
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.PolicyServiceStub(ch).Act(big, timeout=5)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        # ...and the server keeps serving.
        assert pb_grpc.PolicyServiceStub(ch).Act(request(ARM), timeout=5).actions.data


def test_poisoned_request_fails_alone(server, stub) -> None:
    def call(i: int):
        try:
            return stub.Act(request(ARM, state=[i, 0, 0], instruction="poison" if i == 3 else "go"), timeout=10)
        except grpc.RpcError as err:
            return err

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, range(8)))
    assert isinstance(results[3], grpc.RpcError) and results[3].code() == grpc.StatusCode.INTERNAL
    for i, r in enumerate(results):
        if i != 3:
            assert codec.tensor_to_numpy(r.actions, "a")[0, 0] == pytest.approx(i + 2)


def test_expired_deadline_is_not_computed() -> None:
    policy = EchoPolicy(delay_s=0.3)
    with IngressThread(policy, max_batch_size=1, wait_s=0.0) as srv, grpc.insecure_channel(srv.address) as ch:
        stub = pb_grpc.PolicyServiceStub(ch)
        slow = stub.Act.future(request(ARM, step=1), timeout=5)  # occupies the single slot for 0.3 s
        time.sleep(0.05)
        with pytest.raises(grpc.RpcError) as info:
            stub.Act(request(ARM, step=2), timeout=0.1)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        slow.result()
        time.sleep(0.1)
        assert policy.batches == [1], "the expired request must have been left out of every batch"


def test_overload_is_fast_resource_exhausted() -> None:
    limits = IngressLimits(max_queued_requests=2)
    with IngressThread(EchoPolicy(delay_s=0.5), max_batch_size=1, limits=limits) as srv:
        with grpc.insecure_channel(srv.address) as ch:
            stub = pb_grpc.PolicyServiceStub(ch)
            held = [stub.Act.future(request(ARM), timeout=10) for _ in range(2)]
            time.sleep(0.1)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Act(request(ARM), timeout=10)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - t0 < 0.3
            for f in held:
                f.result()


def test_stream_keeps_going_after_a_bad_step(server) -> None:
    with grpc.insecure_channel(server.address) as ch:
        stub = pb_grpc.PolicyServiceStub(ch)
        reqs = [request(ARM, state=[s, 0, 0], step=s) for s in range(5)]
        reqs[2] = request(ARM, state=[np.inf, 0, 0], step=2)
        out = list(stub.ActStream(iter(reqs), timeout=10))
    assert [r.WhichOneof("result") for r in out] == ["chunk", "chunk", "error", "chunk", "chunk"]
    assert out[2].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and out[2].error.step == 2
    assert "observation.state" in out[2].error.message
    assert [r.chunk.step for r in out if r.HasField("chunk")] == [0, 1, 3, 4]


def test_health_and_draining_finishes_in_flight_work() -> None:
    srv = IngressThread(EchoPolicy(delay_s=0.4), max_batch_size=1)
    with srv, grpc.insecure_channel(srv.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        inflight = pb_grpc.PolicyServiceStub(ch).Act.future(request(ARM), timeout=10)
        time.sleep(0.1)
        stopper = threading.Thread(target=srv.stop, args=(5.0,))
        stopper.start()
        assert inflight.result().actions.data, "an admitted request must finish during drain"
        stopper.join()
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.PolicyServiceStub(ch).Act(request(ARM), timeout=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_reflection_lists_the_services(server) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in replies[0].list_services_response.service}
        assert {"superbrain.v1.PolicyService", "grpc.health.v1.Health"} <= names
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol="superbrain.v1.PolicyService")
        (reply,) = stub.ServerReflectionInfo(iter([request]))
        assert reply.file_descriptor_response.file_descriptor_proto


def test_each_call_sees_its_own_metadata_from_the_handler_lookup() -> None:
    """PolicyServiceHandler hands every call the metadata grpc.aio converted for the lookup, call by call."""
    import asyncio

    from serving import ingress

    seen: list[tuple[str, bool, str]] = []

    class Recording(pb_grpc.PolicyServiceServicer):
        async def Act(self, request, context):
            from_lookup = ingress._CALL_METADATA.get() is not None
            await asyncio.sleep(0.01 * (int(request.request_id) % 3))  # calls overlap and finish out of order
            who = dict(ingress.call_metadata(context))["x-robot"]
            seen.append((request.request_id, from_lookup, who))
            return pb.ActResponse(request_id=request.request_id)

    async def scenario() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((ingress.PolicyServiceHandler(Recording()),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.PolicyServiceStub(channel)
                await asyncio.gather(
                    *(
                        stub.Act(pb.ActRequest(request_id=str(i)), metadata=(("x-robot", f"robot-{i}"),))
                        for i in range(12)
                    )
                )
        finally:
            await server.stop(0)

    asyncio.run(scenario())
    assert sorted(seen) == sorted((str(i), True, f"robot-{i}") for i in range(12))
