"""Write a safetensors file one tensor at a time.

safetensors' own writers take every tensor at once; dequantizing a GGUF that way holds the
whole float32 model in memory (a 1B model's 5 GB, a 7B's 28 GB). Here each tensor is written to
a scratch file as it comes, and the header, which must come first and name every tensor's
offsets, is written before the data when they are joined.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

_DTYPES = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
}


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
