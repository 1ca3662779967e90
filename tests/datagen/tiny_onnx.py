"""A tiny ONNX "matting" model for fast unit tests, written as raw protobuf (no ``onnx`` package).

The graph is one 1x1 convolution and a sigmoid: saliency = sigmoid(gain * (mean RGB input -
threshold)), so bright things on a dark background come out salient. It runs in onnxruntime like
any rembg-style model (input ``input`` [N, 3, H, W], output ``output`` [N, 1, H, W]); the photo
tests use the real ISNet model instead.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(data)) + data


def _tensor(name: str, array: np.ndarray) -> bytes:
    dims = b"".join(_int(1, d) for d in array.shape)
    return dims + _int(2, 1) + _bytes(8, name) + _bytes(9, array.astype("<f4").tobytes())


def _value_info(name: str, dims: list[int | str]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, 1) + _bytes(2, shape)  # elem_type FLOAT
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def write_bright_model(path: Path, batch: int | None = 1, size: int | None = 64,
                       gain: float = 20.0, threshold: float = 0.0) -> Path:
    """Write the model; ``batch`` / ``size`` None make that input dimension free."""
    n: int | str = batch if batch is not None else "N"
    h: int | str = size if size is not None else "H"
    w: int | str = size if size is not None else "W"
    weight = np.full((1, 3, 1, 1), gain / 3.0, np.float32)  # gain * mean of the three channels
    bias = np.array([-gain * threshold], np.float32)
    conv = (_bytes(1, "input") + _bytes(1, "w") + _bytes(1, "b") + _bytes(2, "c") + _bytes(3, "conv")
            + _bytes(4, "Conv"))
    sig = _bytes(1, "c") + _bytes(2, "output") + _bytes(3, "sigmoid") + _bytes(4, "Sigmoid")
    graph = (_bytes(1, conv) + _bytes(1, sig) + _bytes(2, "bright") + _bytes(5, _tensor("w", weight))
             + _bytes(5, _tensor("b", bias)) + _bytes(11, _value_info("input", [n, 3, h, w]))
             + _bytes(12, _value_info("output", [n, 1, h, w])))
    model = _int(1, 8) + _bytes(2, "layerdiff-tests") + _bytes(7, graph) + _bytes(8, _bytes(1, "") + _int(2, 13))
    path.write_bytes(model)
    assert struct.unpack("B", model[:1])[0] == 0x08  # as every ONNX ModelProto starts
    return path
