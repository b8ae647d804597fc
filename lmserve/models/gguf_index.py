"""A GGUF file's tensor index and scalar metadata, read without its metadata arrays.

gguf-py's GGUFReader builds a numpy view for every element of every metadata array: Gemma-3's
262k-token vocabulary is 786k of them, 9 s and ~800 MB at peak, spent on each load of weights
that need none of it. Loading the blocks (`quantization="gguf"`), writing the float32 copy and
sizing a model before it loads read the file through this index; the one-time conversion
(tokenizer, config) still reads it with GGUFReader.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9
# Fixed-size metadata value types (ggml's gguf_type ids) and their struct codes
_SCALARS = {
    0: "B",
    1: "b",
    2: "H",
    3: "h",
    4: "I",
    5: "i",
    6: "f",
    7: "?",
    10: "Q",
    11: "q",
    12: "d",
}
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class IndexedTensor:
    """One tensor, with the attributes gguf-py's ReaderTensor has for the same use."""

    name: str
    shape: tuple[int, ...]  # GGUF's order: innermost dimension first
    tensor_type: GGMLQuantizationType
    path: Path
    offset: int  # of its first byte in the file
    nbytes: int

    @property
    def data(self) -> np.ndarray:
        """uint8 [outer dims..., bytes per innermost row], read into memory of its own on each
        access. Not a view of the mapped file: mapped pages count in the process's memory
        beside every copy made of them (a fused layer's joined parts), up to twice the file."""
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = np.fromfile(file, dtype=np.uint8, count=self.nbytes)
        return data.reshape(*reversed(self.shape[1:]), -1)


@dataclass(frozen=True)
class GGUFIndex:
    metadata: dict[str, Any]  # scalar and string values; arrays are skipped
    tensors: list[IndexedTensor]

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    def __init__(self, buffer: np.memmap, path: Path) -> None:
        self.buffer, self.path, self.offset = buffer, path, 0

    def unpack(self, code: str) -> Any:
        fmt = "<" + code
        try:
            (value,) = struct.unpack_from(fmt, self.buffer, self.offset)
        except struct.error:
            raise ValueError(f"{self.path.name} is truncated: not a complete GGUF file") from None
        self.offset += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.unpack("Q")
        raw = bytes(self.buffer[self.offset : self.offset + size])
        self.offset += size
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            self.skip_array()
            return None
        if kind not in _SCALARS:
            raise ValueError(f"{self.path.name}: unknown GGUF metadata type {kind}")
        return self.unpack(_SCALARS[kind])

    def skip_array(self) -> None:
        kind, count = self.unpack("I"), self.unpack("Q")
        if kind in _SCALARS:
            self.offset += count * struct.calcsize(_SCALARS[kind])
        elif kind == _STRING:  # by their lengths alone: a vocabulary's 262k, never decoded
            for _ in range(count):
                size = self.unpack("Q")  # (moves the offset past itself first)
                self.offset += size
        else:
            for _ in range(count):
                self.value(kind)


def read_gguf_index(path: Path) -> GGUFIndex:
    """The file's scalar metadata and where each tensor lies in it."""
    buffer = np.memmap(path, mode="r")
    if bytes(buffer[:4]) != _MAGIC:
        raise ValueError(f"{path.name} is not a GGUF file (no GGUF magic)")
    cursor = _Cursor(buffer, path)
    cursor.offset = 4
    version = cursor.unpack("I")
    if version not in (2, 3):
        raise ValueError(f"{path.name}: GGUF version {version} (big-endian or unknown) unsupported")
    tensor_count, kv_count = cursor.unpack("Q"), cursor.unpack("Q")
    metadata = {}
    for _ in range(kv_count):
        key = cursor.string()
        value = cursor.value(cursor.unpack("I"))
        if value is not None:
            metadata[key] = value
    infos = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = tuple(cursor.unpack("Q") for _ in range(cursor.unpack("I")))
        infos.append((name, dims, GGMLQuantizationType(cursor.unpack("I")), cursor.unpack("Q")))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    start = -(-cursor.offset // alignment) * alignment
    tensors = []
    for name, dims, qtype, offset in infos:
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        row_bytes = dims[0] // block * block_bytes
        rows = int(np.prod(dims[1:], dtype=np.int64))
        begin = start + offset
        if begin + rows * row_bytes > len(buffer):
            raise ValueError(f"{path.name} is truncated: tensor {name} runs past its end")
        tensors.append(IndexedTensor(name, dims, qtype, path, begin, rows * row_bytes))
    return GGUFIndex(metadata, tensors)
