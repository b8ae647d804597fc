"""Write and read a safetensors file one tensor at a time.

safetensors' own writers take every tensor at once; dequantizing a GGUF that way holds the
whole float32 model in memory (a 1B model's 5 GB, a 7B's 28 GB). Here each tensor is written to
a scratch file as it comes, and the header, which must come first and name every tensor's
offsets, is written before the data when they are joined.

safetensors' reader maps the file: every page a load touches stays in the process's resident
memory beside the copies the model keeps (a float32 model's peak was twice its weights). Here
each tensor is read into memory of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
}


# safetensors' dtype names, as torch reads them
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def read_header(file: BinaryIO) -> tuple[dict[str, dict], int]:
    """A safetensors file's tensor entries (metadata left out) and where its data starts."""
    (length,) = struct.unpack("<Q", file.read(8))
    header = json.loads(file.read(length))
    header.pop("__metadata__", None)
    return header, 8 + length


def iter_streamed(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Each tensor of the file at `path`, in file order, read (not mapped) into a tensor of its
    own."""
    with open(path, "rb", buffering=0) as file:
        header, base = read_header(file)
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            dtype = _TORCH_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"{path}: tensor {name!r} has dtype {entry['dtype']}, not read")
            start, end = entry["data_offsets"]
            data = torch.empty(end - start, dtype=torch.uint8)
            file.seek(base + start)
            view, done = memoryview(data.numpy()), 0
            while done < len(view):
                got = file.readinto(view[done:])
                if not got:
                    raise ValueError(f"{path} ends inside tensor {name!r}")
                done += got
            yield name, data.view(dtype).reshape(entry["shape"])


def save_streamed(
    tensors: Iterable[tuple[str, np.ndarray]], path: Path, metadata: dict[str, str]
) -> None:
    """Write `tensors` (consumed one at a time) to `path`, atomically: a file under that name is
    always complete."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    with tempfile.TemporaryFile(dir=path.parent) as body:
        for name, array in tensors:
            array = np.ascontiguousarray(array)
            if array.dtype not in _DTYPES:
                raise TypeError(f"{name}: dtype {array.dtype} is not written")
            end = offset + array.nbytes
            header[name] = {
                "dtype": _DTYPES[array.dtype],
                "shape": list(array.shape),
                "data_offsets": [offset, end],
            }
            body.write(array.reshape(-1).view(np.uint8).data)
            offset = end
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        fd, scratch = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(struct.pack("<Q", len(encoded)))
                out.write(encoded)
                body.seek(0)
                shutil.copyfileobj(body, out, 1 << 24)
            os.replace(scratch, path)
        except BaseException:
            Path(scratch).unlink(missing_ok=True)
            raise
