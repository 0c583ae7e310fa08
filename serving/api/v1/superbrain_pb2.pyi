from google.protobuf import any_pb2 as _any_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
UINT8: DType
FLOAT32: DType
FLOAT64: DType
INT32: DType
INT64: DType
FLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("raw", "jpeg", "png")
    RAW_FIELD_NUMBER: _ClassVar[int]
    JPEG_FIELD_NUMBER: _ClassVar[int]
    PNG_FIELD_NUMBER: _ClassVar[int]
    raw: Tensor
    jpeg: bytes
    png: bytes
    def __init__(self, raw: _Optional[_Union[Tensor, _Mapping]] = ..., jpeg: _Optional[bytes] = ..., png: _Optional[bytes] = ...) -> None: ...

class Observation(_message.Message):
    __slots__ = ("images", "state", "instruction", "embodiment", "robot_id", "episode_id", "step", "model", "model_version")
    class ImagesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Image
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    EMBODIMENT_FIELD_NUMBER: _ClassVar[int]
    ROBOT_ID_FIELD_NUMBER: _ClassVar[int]
    EPISODE_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.MessageMap[str, Image]
    state: Tensor
    instruction: str
    embodiment: str
    robot_id: str
    episode_id: str
    step: int
    model: str
    model_version: str
    def __init__(self, images: _Optional[_Mapping[str, Image]] = ..., state: _Optional[_Union[Tensor, _Mapping]] = ..., instruction: _Optional[str] = ..., embodiment: _Optional[str] = ..., robot_id: _Optional[str] = ..., episode_id: _Optional[str] = ..., step: _Optional[int] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ...) -> None: ...

class ActRequest(_message.Message):
    __slots__ = ("observation", "request_id")
    OBSERVATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    observation: Observation
    request_id: str
    def __init__(self, observation: _Optional[_Union[Observation, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class ServerTiming(_message.Message):
    __slots__ = ("queue_ms", "compute_ms", "batch_size", "total_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    batch_size: int
    total_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ..., batch_size: _Optional[int] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ActResponse(_message.Message):
    __slots__ = ("actions", "model", "model_version", "embodiment", "timing", "request_id", "step")
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBODIMENT_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    actions: Tensor
    model: str
    model_version: str
    embodiment: str
    timing: ServerTiming
    request_id: str
    step: int
    def __init__(self, actions: _Optional[_Union[Tensor, _Mapping]] = ..., model: _Optional[str] = ..., model_version: _Optional[str] = ..., embodiment: _Optional[str] = ..., timing: _Optional[_Union[ServerTiming, _Mapping]] = ..., request_id: _Optional[str] = ..., step: _Optional[int] = ...) -> None: ...

class StepError(_message.Message):
    __slots__ = ("code", "message", "request_id", "step", "details")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    request_id: str
    step: int
    details: _containers.RepeatedCompositeFieldContainer[_any_pb2.Any]
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., request_id: _Optional[str] = ..., step: _Optional[int] = ..., details: _Optional[_Iterable[_Union[_any_pb2.Any, _Mapping]]] = ...) -> None: ...

class ActStreamResponse(_message.Message):
    __slots__ = ("chunk", "error")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    chunk: ActResponse
    error: StepError
    def __init__(self, chunk: _Optional[_Union[ActResponse, _Mapping]] = ..., error: _Optional[_Union[StepError, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CameraInfo(_message.Message):
    __slots__ = ("name", "height", "width")
    NAME_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    name: str
    height: int
    width: int
    def __init__(self, name: _Optional[str] = ..., height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class EmbodimentInfo(_message.Message):
    __slots__ = ("name", "description", "state_dim", "action_dim", "cameras", "chunk_length", "control_rate_hz", "action_low", "action_high")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    STATE_DIM_FIELD_NUMBER: _ClassVar[int]
    ACTION_DIM_FIELD_NUMBER: _ClassVar[int]
    CAMERAS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CONTROL_RATE_HZ_FIELD_NUMBER: _ClassVar[int]
    ACTION_LOW_FIELD_NUMBER: _ClassVar[int]
    ACTION_HIGH_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    state_dim: int
    action_dim: int
    cameras: _containers.RepeatedCompositeFieldContainer[CameraInfo]
    chunk_length: int
    control_rate_hz: float
    action_low: _containers.RepeatedScalarFieldContainer[float]
    action_high: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., state_dim: _Optional[int] = ..., action_dim: _Optional[int] = ..., cameras: _Optional[_Iterable[_Union[CameraInfo, _Mapping]]] = ..., chunk_length: _Optional[int] = ..., control_rate_hz: _Optional[float] = ..., action_low: _Optional[_Iterable[float]] = ..., action_high: _Optional[_Iterable[float]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "embodiments", "max_batch_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EMBODIMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    embodiments: _containers.RepeatedCompositeFieldContainer[EmbodimentInfo]
    max_batch_size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., embodiments: _Optional[_Iterable[_Union[EmbodimentInfo, _Mapping]]] = ..., max_batch_size: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("models", "default_model", "server_version")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    default_model: str
    server_version: str
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., default_model: _Optional[str] = ..., server_version: _Optional[str] = ...) -> None: ...
