"""The replica's array backend reaches the default model: plumbing, the fused-kernel dispatch, same outputs.

CPU paths always run: numpy vs torch (CPU) end to end through ``VLAPolicy`` on
fresh random inputs (odd frame sizes, every embodiment). The CuPy comparison
needs a CUDA device and CuPy, and skips with the reason otherwise.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from serving import accel
from serving.batching import BatchAssembler
from serving.models.embodiments import default_embodiments
from serving.policy.base import EmbodimentSpec, Policy, PolicyObservation, setup_policy
from serving.policy.noop import NoopPolicy
from serving.policy.vla_policy import TorchBatch, VLAPolicy
from serving.processing import NumpyBackend, get_backend, normalize_images, resize_bilinear, resize_normalize
from serving.processing.backend import resolve_backend_name
from serving.processing.streams import HostStages, stage_streams
from tests.gpu_support import needs_cupy

EMBODIMENTS = default_embodiments()
#: Actions in robot units. The two backends feed the same torch model the same state,
#: tokens and masks, and images that may differ by up to NORMALISED_ATOL (2e-5,
#: tests/test_array_backends.py) where torch vectorises the resize differently; through
#: the network and the tanh-bounded head, scaled by action stds of at most 0.45, that is
#: a few 1e-6. (On the CI machine they agree exactly: 0 difference over 300 observations.)
#: 1e-4 leaves room for other CPUs' kernels and is far below any actuator's resolution.
END_TO_END_ATOL = 1e-4


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="module")
def policies() -> dict[str, VLAPolicy]:
    out = {}
    for name in ("numpy", "torch"):
        policy = VLAPolicy.default(seed=0)
        policy.setup("cpu", array_backend=name)
        out[name] = policy
    return out


def _observation(rng: np.random.Generator, spec: EmbodimentSpec, size: tuple[int, int] | None) -> PolicyObservation:
    images = {}
    for cam in spec.cameras:
        h, w = size or (cam.height, cam.width)
        images[cam.name] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    state = (np.array(spec.state_mean) + np.array(spec.state_std) * rng.normal(size=spec.state_dim) * 2).astype(
        np.float32
    )
    return PolicyObservation(spec.name, images, state, "pick up the red cup")


@pytest.mark.parametrize("spec", EMBODIMENTS, ids=lambda s: s.name)
@pytest.mark.parametrize("size", [None, (223, 97), (5, 3), (96, 96)], ids=["native", "223x97", "5x3", "96x96"])
def test_numpy_and_torch_backends_give_the_same_actions(policies, rng, spec, size) -> None:
    observations = [_observation(rng, spec, size) for _ in range(int(rng.integers(1, 6)))]
    a = policies["numpy"].infer(observations)
    b = policies["torch"].infer(observations)
    assert len(a) == len(b) == len(observations)
    for x, y in zip(a, b, strict=True):
        assert x.shape == y.shape == (spec.chunk_length, spec.action_dim) and x.dtype == y.dtype == np.float32
        np.testing.assert_allclose(y, x, atol=END_TO_END_ATOL, rtol=0)


def test_a_mixed_batch_agrees_across_backends(policies, rng) -> None:
    sizes = [None, (223, 97), (5, 3)]
    observations = [_observation(rng, spec, sizes[i % 3]) for i, spec in enumerate(EMBODIMENTS * 3)]
    for x, y in zip(policies["numpy"].infer(observations), policies["torch"].infer(observations), strict=True):
        np.testing.assert_allclose(y, x, atol=END_TO_END_ATOL, rtol=0)


def test_the_configured_backend_does_the_preprocessing_and_hands_over_without_a_copy(policies, rng) -> None:
    observations = [_observation(rng, EMBODIMENTS[0], None) for _ in range(3)]
    for name, expected_type in (("numpy", np.ndarray), ("torch", torch.Tensor)):
        policy = policies[name]
        assert policy.array_backend == name
        batch = policy.preprocess(observations)
        assert isinstance(batch, TorchBatch) and len(batch) == 3
        assert isinstance(batch.source.images, expected_type)
        assert isinstance(batch.images, torch.Tensor) and batch.images.device.type == "cpu"
        source_ptr = (
            batch.source.images.ctypes.data if name == "numpy" else batch.source.images.data_ptr()
        )  # to_torch: a view of the assembler's array, not a copy
        assert batch.images.data_ptr() == source_ptr
        assert batch.ready is None  # nothing to wait for on the host


def test_auto_resolves_like_the_replica_plan(monkeypatch) -> None:
    assert resolve_backend_name(None, "cpu") == "numpy"
    assert resolve_backend_name("auto", "cpu") == "numpy"
    assert resolve_backend_name("torch", "cpu") == "torch"
    gpu = accel.DeviceSet(available=True, names=("NVIDIA H100",))
    with_cupy = accel.Found(torch_version="2.13.0", cuda=gpu, cupy=accel.CupyInfo(version="14.2", device_count=1))
    without = accel.Found(torch_version="2.13.0", cuda=gpu)
    monkeypatch.setattr(accel, "probe", lambda: with_cupy)
    assert resolve_backend_name("auto", "cuda") == "cupy"
    monkeypatch.setattr(accel, "probe", lambda: without)
    assert resolve_backend_name(None, "cuda:0") == "torch"


def test_a_backend_the_device_cannot_run_is_refused() -> None:
    policy = VLAPolicy.default(seed=0)
    with pytest.raises(ValueError, match="CUDA/ROCm"):
        policy.setup("cpu", array_backend="cupy")
    with pytest.raises(ValueError, match="unknown array backend"):
        policy.setup("cpu", array_backend="jax")


class _LegacyPolicy(NoopPolicy):
    """A partner's policy written before array_backend existed."""

    def __init__(self) -> None:
        super().__init__()
        self.devices: list[str] = []

    def setup(self, device: str = "cpu") -> None:  # type: ignore[override]
        self.devices.append(device)


class _RecordingPolicy(NoopPolicy):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str | None]] = []

    def setup(self, device: str = "cpu", array_backend: str | None = None) -> None:
        self.calls.append((device, array_backend))


def test_setup_policy_hands_the_backend_to_policies_that_take_it() -> None:
    recording = _RecordingPolicy()
    setup_policy(recording, "cpu", "torch")
    assert recording.calls == [("cpu", "torch")]
    legacy = _LegacyPolicy()
    setup_policy(legacy, "cpu", "numpy")  # no TypeError: the old signature gets the device only
    assert legacy.devices == ["cpu"]
    noop = NoopPolicy()
    setup_policy(noop, "cpu", "numpy")  # the base class's hook takes and ignores it
    vla = VLAPolicy.default(seed=0)
    setup_policy(vla, "cpu", "torch")
    assert vla.array_backend == "torch"
    assert "array_backend" in Policy.setup.__code__.co_varnames


class _FusedNumpy(NumpyBackend):
    """numpy with a 'fused' kernel, as CuPy has: records that it was used, computes with the seam."""

    def __init__(self) -> None:
        super().__init__()
        self.fused_calls: list[int] = []

    def resize_normalize(self, frames, out_h, out_w, mean, std):
        self.fused_calls.append(len(frames))
        return normalize_images(resize_bilinear(self.asarray(frames), out_h, out_w, self), mean, std, self)


def test_a_backend_with_a_fused_kernel_gets_to_run_it(rng) -> None:
    xp = _FusedNumpy()
    frames = rng.integers(0, 256, (3, 31, 45, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    got = resize_normalize(frames, 16, 16, mean, std, xp)
    assert xp.fused_calls == [3]
    expected = resize_normalize(frames, 16, 16, mean, std, get_backend("numpy"))  # the seam's path
    np.testing.assert_array_equal(got, expected)

    policy = VLAPolicy.default(seed=0)
    assembler = BatchAssembler(policy.meta.embodiments, policy.dims, xp)
    spec = EMBODIMENTS[0]
    observations = [_observation(rng, spec, (50, 70)) for _ in range(2)]
    batch = assembler.assemble(observations)
    # Every frame went through the fused kernel (one source size: one group).
    assert sum(xp.fused_calls[1:]) == 2 * len(spec.cameras)
    plain = BatchAssembler(policy.meta.embodiments, policy.dims, get_backend("numpy")).assemble(observations)
    np.testing.assert_array_equal(batch.images, plain.images)


def test_stage_streams_are_host_no_ops_off_cuda() -> None:
    for device in ("cpu", "musa:0", "npu"):
        streams = stage_streams(device, get_backend("numpy"))
        assert type(streams) is HostStages
        with streams.preprocess():
            ready = streams.record_ready()
        assert ready is None
        with streams.forward(ready):
            pass


# --------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
@needs_cupy
@pytest.mark.parametrize("spec", EMBODIMENTS, ids=lambda s: s.name)
def test_cupy_backend_through_vla_policy_matches_numpy_on_cpu(policies, rng, spec) -> None:
    gpu = VLAPolicy.default(seed=0)
    gpu.setup("cuda", array_backend="cupy")
    observations = [_observation(rng, spec, size) for size in (None, (223, 97), (5, 3))]
    batch = gpu.preprocess(observations)
    assert batch.images.device.type == "cuda" and type(batch.source.images).__module__.startswith("cupy")
    assert batch.images.data_ptr() == batch.source.images.data.ptr  # DLPack: no copy
    # GPU kernels (cuDNN may convolve in TF32) differ from the CPU's: 1e-3, as tests/test_policy.py allows.
    for x, y in zip(policies["numpy"].infer(observations), gpu.infer(observations), strict=True):
        np.testing.assert_allclose(y, x, atol=1e-3, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
@needs_cupy
def test_cupy_runs_each_stage_on_that_stages_torch_stream() -> None:
    import cupy

    stages = stage_streams("cuda", get_backend("cupy", "cuda"))
    seen = set()
    for stage in (stages.preprocess, stages.forward):
        with stage():
            torch_stream = torch.cuda.current_stream().cuda_stream
            assert cupy.cuda.get_current_stream().ptr == torch_stream  # one stream, seen from both
            seen.add(torch_stream)
    assert len(seen) == 2 and torch.cuda.default_stream().cuda_stream not in seen


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU visible to torch")
def test_pipelined_engine_on_cuda_gives_the_sequential_results() -> None:
    import asyncio
    import time

    from serving.engine import Pending, PolicyEngine

    gpu = VLAPolicy.default(seed=0)
    gpu.setup("cuda")
    rng = np.random.default_rng(11)
    batches = [[_observation(rng, spec, None) for spec in EMBODIMENTS * 4] for _ in range(6)]

    async def run(engine: PolicyEngine) -> list:
        futures = []
        for obs in batches:
            items = [Pending(observation=o, deadline=time.monotonic() + 60) for o in obs]
            futures.append(asyncio.ensure_future(engine.run_batch(items)))
            await asyncio.sleep(0)
        return [[o.actions for o in outcomes] for outcomes in await asyncio.gather(*futures)]

    results = {}
    for pipeline in (False, True):
        engine = PolicyEngine(gpu, pipeline=pipeline)
        try:
            results[pipeline] = asyncio.run(run(engine))
        finally:
            engine.close()
    for seq, pipe in zip(results[False], results[True], strict=True):
        for a, b in zip(seq, pipe, strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_replica_takes_its_array_backend_from_the_plan(tmp_path) -> None:
    from serving.config import ServingConfig
    from serving.deployment import PolicyReplica

    pick = PolicyReplica.func_or_class._pick_device
    assert pick(ServingConfig(state_dir=str(tmp_path))) == ("cpu", None, "numpy")
    assert pick(ServingConfig(state_dir=str(tmp_path), array_backend="torch")) == ("cpu", None, "torch")


class _FakeStream:
    def __init__(self, device=None) -> None:
        self.device = torch.device("cuda", 0)
        self.cuda_stream = id(self)
        self.waited: list[object] = []

    def wait_event(self, event: object) -> None:
        self.waited.append(event)


def test_cuda_stage_streams_wiring_with_stand_in_cuda(monkeypatch) -> None:
    """Which stream each stage enters, where the event is recorded and waited for (no GPU: stand-ins)."""
    import contextlib
    import sys
    import types

    from serving.processing.streams import CudaStages

    log: list[tuple] = []

    @contextlib.contextmanager
    def torch_stream(stream):
        log.append(("torch enter", stream))
        yield

    class Event:
        def record(self, stream) -> None:
            log.append(("record", stream))

    class CupyContext:
        def __init__(self, kind: str, *args) -> None:
            self.kind, self.args = kind, args

        def __enter__(self):
            log.append((f"cupy {self.kind}", *self.args))

        def __exit__(self, *exc) -> None:
            pass

    fake_cupy = types.SimpleNamespace(
        cuda=types.SimpleNamespace(
            ExternalStream=lambda ptr, index: CupyContext("stream", ptr, index),
            Device=lambda index: CupyContext("device", index),
        )
    )
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", torch_stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)

    stages = CudaStages("cuda", with_cupy=True)
    pre, fwd = stages._pre, stages._fwd
    with stages.preprocess():
        ready = stages.record_ready()
    assert log == [("torch enter", pre), ("cupy device", 0), ("cupy stream", id(pre), 0), ("record", pre)]
    log.clear()
    with stages.forward(ready):
        pass
    assert fwd.waited == [ready] and pre.waited == []  # the device waits, on the forward stream
    assert log == [("torch enter", fwd), ("cupy device", 0), ("cupy stream", id(fwd), 0)]

    class Tensor:
        recorded: list[object] = []

        def record_stream(self, stream) -> None:
            self.recorded.append(stream)

    stages.keep_for_forward([Tensor()])
    assert Tensor.recorded == []  # CuPy memory: not torch's allocator
    torch_only = CudaStages("cuda:0", with_cupy=False)
    torch_only.keep_for_forward([Tensor(), Tensor()])
    assert Tensor.recorded == [torch_only._fwd] * 2
