"""Reading and writing ``.safetensors`` files with NumPy only (bfloat16 through ml_dtypes).

The format: an 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype": "BF16", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {...}}``
(offsets relative to the end of the header, tensors back to back in row-major order), then the
data. Reading memory-maps the file: ``SafetensorsFile.array(name)`` is a lazy view, and slicing
it reads only the pages it touches, which is what loading shards straight onto a device mesh
needs. We do not use the ``safetensors`` package: its NumPy API cannot hold bfloat16, and it
would make PyTorch-free installs (TPU VMs) depend on an extra; the tests check our files
against it both ways.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2 ** 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file that cannot be what it claims to be (truncated, bad header, bad offsets)."""


class SafetensorsFile:
    """A memory-mapped ``.safetensors`` file; validates the whole header when opened."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CorruptCheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER, size - 8):
                raise CorruptCheckpointError(f"{path}: header length {header_len} does not fit the {size}-byte file")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CorruptCheckpointError(f"{path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CorruptCheckpointError(f"{path}: header is not a JSON object")
        self.metadata: dict = header.pop("__metadata__", None) or {}
        self._start = 8 + header_len
        data_len = size - self._start
        self._info = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CorruptCheckpointError(f"{path}: bad header entry for {name!r}: {info!r}") from None
            if not 0 <= begin <= end <= data_len or end - begin != dtype.itemsize * int(np.prod(shape)):
                raise CorruptCheckpointError(
                    f"{path}: tensor {name!r} {info['dtype']}{list(shape)} has data_offsets [{begin}, {end}] "
                    f"but the data section holds {data_len} bytes (file truncated or corrupt)")
            self._info[name] = (dtype, shape, begin)
        self._map = None

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._info[name][0]

    def array(self, name: str) -> np.ndarray:
        """A read-only, lazily read view of one tensor."""
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        dtype, shape, begin = self._info[name]
        count = int(np.prod(shape))
        return self._map[self._start + begin:self._start + begin + count * dtype.itemsize].view(dtype).reshape(shape)


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None,
                      order: Iterable[str] | None = None) -> int:
    """Writes ``tensors`` (C-contiguous copies are made only where needed); returns the file size.

    ``order``: key order in the file (default: the mapping's order). The header is padded with
    spaces to a multiple of 8 bytes, as the reference implementation does.
    """
    names = list(tensors if order is None else order)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        array = tensors[name]
        if array.dtype not in _CODES:
            raise TypeError(f"{name}: dtype {array.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _CODES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(memoryview(np.ascontiguousarray(tensors[name]).reshape(-1).view(np.uint8)))
    return 8 + len(blob) + offset
