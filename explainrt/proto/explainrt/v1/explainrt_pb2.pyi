from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DATA_TYPE_UNSPECIFIED: _ClassVar[DataType]
    UINT8: _ClassVar[DataType]
    FLOAT16: _ClassVar[DataType]
    FLOAT32: _ClassVar[DataType]

class MapSize(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MAP_SIZE_MODEL_INPUT: _ClassVar[MapSize]
    MAP_SIZE_ORIGINAL: _ClassVar[MapSize]
DATA_TYPE_UNSPECIFIED: DataType
UINT8: DataType
FLOAT16: DataType
FLOAT32: DataType
MAP_SIZE_MODEL_INPUT: MapSize
MAP_SIZE_ORIGINAL: MapSize

class Tensor(_message.Message):
    __slots__ = ("data", "dtype", "shape")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DataType
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DataType, str]] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("saliency_dtype", "map_size", "overlay_png", "top_k")
    SALIENCY_DTYPE_FIELD_NUMBER: _ClassVar[int]
    MAP_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    saliency_dtype: DataType
    map_size: MapSize
    overlay_png: bool
    top_k: int
    def __init__(self, saliency_dtype: _Optional[_Union[DataType, str]] = ..., map_size: _Optional[_Union[MapSize, str]] = ..., overlay_png: _Optional[bool] = ..., top_k: _Optional[int] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("model", "encoded", "tensor", "method", "targets", "params", "output", "request_id", "priority")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGETS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    model: str
    encoded: bytes
    tensor: Tensor
    method: str
    targets: _containers.RepeatedScalarFieldContainer[int]
    params: _containers.ScalarMap[str, str]
    output: OutputOptions
    request_id: str
    priority: int
    def __init__(self, model: _Optional[str] = ..., encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., method: _Optional[str] = ..., targets: _Optional[_Iterable[int]] = ..., params: _Optional[_Mapping[str, str]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("class_index", "label", "probability")
    CLASS_INDEX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    class_index: int
    label: str
    probability: float
    def __init__(self, class_index: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class SaliencyMap(_message.Message):
    __slots__ = ("target", "label", "probability", "saliency")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    SALIENCY_FIELD_NUMBER: _ClassVar[int]
    target: int
    label: str
    probability: float
    saliency: Tensor
    def __init__(self, target: _Optional[int] = ..., label: _Optional[str] = ..., probability: _Optional[float] = ..., saliency: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_s", "preprocess_s", "base_pass_s", "explain_s", "postprocess_s", "total_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_S_FIELD_NUMBER: _ClassVar[int]
    BASE_PASS_S_FIELD_NUMBER: _ClassVar[int]
    EXPLAIN_S_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    preprocess_s: float
    base_pass_s: float
    explain_s: float
    postprocess_s: float
    total_s: float
    def __init__(self, queue_s: _Optional[float] = ..., preprocess_s: _Optional[float] = ..., base_pass_s: _Optional[float] = ..., explain_s: _Optional[float] = ..., postprocess_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("request_id", "model", "method", "maps", "predictions", "forward_passes", "timings", "params", "original_size", "overlay_png", "visualization")
    class ParamsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    MAPS_FIELD_NUMBER: _ClassVar[int]
    PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_PASSES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    VISUALIZATION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    method: str
    maps: _containers.RepeatedCompositeFieldContainer[SaliencyMap]
    predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    forward_passes: int
    timings: Timings
    params: _containers.ScalarMap[str, str]
    original_size: _containers.RepeatedScalarFieldContainer[int]
    overlay_png: bytes
    visualization: Tensor
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., method: _Optional[str] = ..., maps: _Optional[_Iterable[_Union[SaliencyMap, _Mapping]]] = ..., predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., forward_passes: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., params: _Optional[_Mapping[str, str]] = ..., original_size: _Optional[_Iterable[int]] = ..., overlay_png: _Optional[bytes] = ..., visualization: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("done", "total")
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    done: int
    total: int
    def __init__(self, done: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ExplainStreamResponse(_message.Message):
    __slots__ = ("index", "request_id", "result", "progress", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    request_id: str
    result: ExplainResponse
    progress: Progress
    error: ItemError
    def __init__(self, index: _Optional[int] = ..., request_id: _Optional[str] = ..., result: _Optional[_Union[ExplainResponse, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("name", "input_size", "num_classes", "backend", "device")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    input_size: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    backend: str
    device: str
    def __init__(self, name: _Optional[str] = ..., input_size: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class GetModelMetadataRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class TensorSpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class MethodParameter(_message.Message):
    __slots__ = ("name", "default_json")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_JSON_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_json: str
    def __init__(self, name: _Optional[str] = ..., default_json: _Optional[str] = ...) -> None: ...

class MethodInfo(_message.Message):
    __slots__ = ("name", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    parameters: _containers.RepeatedCompositeFieldContainer[MethodParameter]
    def __init__(self, name: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[MethodParameter, _Mapping]]] = ...) -> None: ...

class ModelMetadataResponse(_message.Message):
    __slots__ = ("name", "inputs", "outputs", "input_name", "input_size", "mean", "std", "logits_output", "probs_output", "activation_output", "activation_layer", "activation_shape", "num_classes", "labels", "methods", "backend", "device", "batch_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SIZE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    LOGITS_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PROBS_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_LAYER_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    inputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    outputs: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    input_name: str
    input_size: _containers.RepeatedScalarFieldContainer[int]
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    logits_output: str
    probs_output: str
    activation_output: str
    activation_layer: str
    activation_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    labels: _containers.RepeatedScalarFieldContainer[str]
    methods: _containers.RepeatedCompositeFieldContainer[MethodInfo]
    backend: str
    device: str
    batch_size: int
    def __init__(self, name: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., outputs: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., input_name: _Optional[str] = ..., input_size: _Optional[_Iterable[int]] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., logits_output: _Optional[str] = ..., probs_output: _Optional[str] = ..., activation_output: _Optional[str] = ..., activation_layer: _Optional[str] = ..., activation_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., labels: _Optional[_Iterable[str]] = ..., methods: _Optional[_Iterable[_Union[MethodInfo, _Mapping]]] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., batch_size: _Optional[int] = ...) -> None: ...
