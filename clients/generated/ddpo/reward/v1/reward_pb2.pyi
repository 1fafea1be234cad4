from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_HIGHER_IS_BETTER: _ClassVar[Direction]
    DIRECTION_LOWER_IS_BETTER: _ClassVar[Direction]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]

class RewardSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REWARD_SOURCE_UNSPECIFIED: _ClassVar[RewardSource]
    REWARD_SOURCE_BUILTIN: _ClassVar[RewardSource]
    REWARD_SOURCE_PLUGIN: _ClassVar[RewardSource]
    REWARD_SOURCE_ENDPOINT: _ClassVar[RewardSource]
    REWARD_SOURCE_COMPOSITE: _ClassVar[RewardSource]
DIRECTION_UNSPECIFIED: Direction
DIRECTION_HIGHER_IS_BETTER: Direction
DIRECTION_LOWER_IS_BETTER: Direction
DTYPE_UNSPECIFIED: DType
DTYPE_UINT8: DType
DTYPE_FLOAT32: DType
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
REWARD_SOURCE_UNSPECIFIED: RewardSource
REWARD_SOURCE_BUILTIN: RewardSource
REWARD_SOURCE_PLUGIN: RewardSource
REWARD_SOURCE_ENDPOINT: RewardSource
REWARD_SOURCE_COMPOSITE: RewardSource

class ListRewardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRewardsResponse(_message.Message):
    __slots__ = ("rewards", "load_errors")
    class LoadErrorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    LOAD_ERRORS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedCompositeFieldContainer[RewardSpec]
    load_errors: _containers.ScalarMap[str, str]
    def __init__(self, rewards: _Optional[_Iterable[_Union[RewardSpec, _Mapping]]] = ..., load_errors: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RewardSpec(_message.Message):
    __slots__ = ("name", "description", "version", "units", "direction", "requires_prompt", "image_spec", "component_names")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SPEC_FIELD_NUMBER: _ClassVar[int]
    COMPONENT_NAMES_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    version: str
    units: str
    direction: Direction
    requires_prompt: bool
    image_spec: ImageSpec
    component_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., version: _Optional[str] = ..., units: _Optional[str] = ..., direction: _Optional[_Union[Direction, str]] = ..., requires_prompt: _Optional[bool] = ..., image_spec: _Optional[_Union[ImageSpec, _Mapping]] = ..., component_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ImageSpec(_message.Message):
    __slots__ = ("channels", "dtypes", "min_height", "min_width", "max_height", "max_width")
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    MIN_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MIN_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_WIDTH_FIELD_NUMBER: _ClassVar[int]
    channels: _containers.RepeatedScalarFieldContainer[int]
    dtypes: _containers.RepeatedScalarFieldContainer[DType]
    min_height: int
    min_width: int
    max_height: int
    max_width: int
    def __init__(self, channels: _Optional[_Iterable[int]] = ..., dtypes: _Optional[_Iterable[_Union[DType, str]]] = ..., min_height: _Optional[int] = ..., min_width: _Optional[int] = ..., max_height: _Optional[int] = ..., max_width: _Optional[int] = ...) -> None: ...

class RawImage(_message.Message):
    __slots__ = ("data", "height", "width", "channels", "dtype")
    DATA_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    height: int
    width: int
    channels: int
    dtype: DType
    def __init__(self, data: _Optional[bytes] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., channels: _Optional[int] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class EncodedImage(_message.Message):
    __slots__ = ("data", "format")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    format: ImageFormat
    def __init__(self, data: _Optional[bytes] = ..., format: _Optional[_Union[ImageFormat, str]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("raw", "encoded")
    RAW_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    raw: RawImage
    encoded: EncodedImage
    def __init__(self, raw: _Optional[_Union[RawImage, _Mapping]] = ..., encoded: _Optional[_Union[EncodedImage, _Mapping]] = ...) -> None: ...

class Item(_message.Message):
    __slots__ = ("id", "image", "prompt", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    image: Image
    prompt: str
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., prompt: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("reward", "items", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    reward: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    weights: _containers.ScalarMap[str, float]
    def __init__(self, reward: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class ScoreStreamRequest(_message.Message):
    __slots__ = ("reward", "items", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REWARD_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    reward: str
    items: _containers.RepeatedCompositeFieldContainer[Item]
    weights: _containers.ScalarMap[str, float]
    def __init__(self, reward: _Optional[str] = ..., items: _Optional[_Iterable[_Union[Item, _Mapping]]] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ScoreStreamResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    def __init__(self, results: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("id", "status", "score", "components", "info")
    class ComponentsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class InfoEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    score: float
    components: _containers.ScalarMap[str, float]
    info: _containers.ScalarMap[str, str]
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, _Mapping]] = ..., score: _Optional[float] = ..., components: _Optional[_Mapping[str, float]] = ..., info: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("name", "url", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    url: str
    options: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., url: _Optional[str] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class RegisterEndpointRequest(_message.Message):
    __slots__ = ("endpoint", "replace")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    endpoint: Endpoint
    replace: bool
    def __init__(self, endpoint: _Optional[_Union[Endpoint, _Mapping]] = ..., replace: _Optional[bool] = ...) -> None: ...

class RegisterEndpointResponse(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: RewardSpec
    def __init__(self, spec: _Optional[_Union[RewardSpec, _Mapping]] = ...) -> None: ...

class UnregisterEndpointRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterEndpointResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AdminListRewardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewardEntry(_message.Message):
    __slots__ = ("spec", "source", "type", "url", "runtime", "state")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    RUNTIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    spec: RewardSpec
    source: RewardSource
    type: str
    url: str
    runtime: bool
    state: str
    def __init__(self, spec: _Optional[_Union[RewardSpec, _Mapping]] = ..., source: _Optional[_Union[RewardSource, str]] = ..., type: _Optional[str] = ..., url: _Optional[str] = ..., runtime: _Optional[bool] = ..., state: _Optional[str] = ...) -> None: ...

class AdminListRewardsResponse(_message.Message):
    __slots__ = ("rewards",)
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    rewards: _containers.RepeatedCompositeFieldContainer[RewardEntry]
    def __init__(self, rewards: _Optional[_Iterable[_Union[RewardEntry, _Mapping]]] = ...) -> None: ...
