"""NumPy arrays ⇄ ``explainrt.v1.Tensor`` messages (raw bytes + dtype + shape), shared by server and client."""
from __future__ import annotations

import math

import numpy as np

from ..errors import InvalidInputError
from .explainrt.v1 import explainrt_pb2 as pb

# Little-endian on the wire whatever the host is.
DTYPES = {pb.UINT8: np.dtype("u1"), pb.FLOAT16: np.dtype("<f2"), pb.FLOAT32: np.dtype("<f4")}
DTYPE_NAMES = {pb.UINT8: "uint8", pb.FLOAT16: "float16", pb.FLOAT32: "float32"}
_BY_NAME = {name: code for code, name in DTYPE_NAMES.items()}


def dtype_code(name: str) -> int:
    """``"float16"`` → ``pb.FLOAT16`` (and so on); raises InvalidInputError for other names."""
    try:
        return _BY_NAME[np.dtype(name).name]
    except (TypeError, KeyError):
        raise InvalidInputError(f"dtype must be one of {', '.join(_BY_NAME)}, got {name!r}") from None


def array_to_tensor(array: np.ndarray, dtype: int | None = None) -> pb.Tensor:
    """Encode ``array`` (converted to ``dtype``, a ``pb.DataType``, when given) as a Tensor message."""
    return fill_tensor(pb.Tensor(), array, dtype)


def fill_tensor(message: pb.Tensor, array: np.ndarray, dtype: int | None = None) -> pb.Tensor:
    """Write ``array`` (converted to ``dtype`` when given) into an existing Tensor ``message`` and return it.

    Unlike ``array_to_tensor`` followed by ``CopyFrom``/``add(saliency=...)``, the data is copied
    once (``tobytes``) and once into the message, not a third time.
    """
    if dtype is None:
        dtype = dtype_code(array.dtype.name)
    if dtype not in DTYPES:
        raise InvalidInputError(f"cannot encode dtype {dtype!r}; use uint8, float16 or float32")
    data = np.ascontiguousarray(array, dtype=DTYPES[dtype])
    message.data = data.tobytes()
    message.dtype = dtype
    message.shape[:] = [int(d) for d in data.shape]
    return message


def dtype_name(value: int) -> str:
    """The DataType enum's name of ``value``, or the number when it names none."""
    return pb.DataType.Name(value) if value in pb.DataType.values() else str(value)


def tensor_to_array(tensor: pb.Tensor, name: str = "tensor", allowed: tuple = tuple(DTYPES)) -> np.ndarray:
    """Decode a Tensor message to a (read-only) NumPy array, checking dtype, shape and byte count."""
    if tensor.dtype not in allowed:
        allowed_names = ", ".join(DTYPE_NAMES[d] for d in allowed)
        raise InvalidInputError(
            f"{name}: dtype {dtype_name(tensor.dtype)} "
            f"is not accepted here; use one of {allowed_names}"
        )
    shape = tuple(int(d) for d in tensor.shape)
    if not shape or any(d < 1 for d in shape):
        raise InvalidInputError(f"{name}: shape must be non-empty with every dimension >= 1, got {list(shape)}")
    dtype = DTYPES[tensor.dtype]
    expected = math.prod(shape) * dtype.itemsize
    if len(tensor.data) != expected:
        raise InvalidInputError(
            f"{name}: shape {list(shape)} of {dtype.name} needs {expected} bytes, but data holds {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
