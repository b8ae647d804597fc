"""read_gguf_index against gguf-py's GGUFReader on the same files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from lmserve.models.gguf import bundled_smollm2_gguf
from lmserve.models.gguf_index import read_gguf_index


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_the_index_is_what_gguf_py_reads(which: str, gemma3_gguf: Path) -> None:
    path = bundled_smollm2_gguf() if which == "smollm2" else gemma3_gguf
    reader = gguf.GGUFReader(path)
    index = read_gguf_index(path)
    assert [t.name for t in index.tensors] == [t.name for t in reader.tensors]
    for ours, theirs in zip(index.tensors, reader.tensors, strict=True):
        assert ours.shape == tuple(int(d) for d in theirs.shape), ours.name
        assert ours.tensor_type == theirs.tensor_type, ours.name
        expected = np.asarray(theirs.data).view(np.uint8)
        assert ours.data.shape == expected.shape, ours.name
        assert np.array_equal(ours.data, expected), ours.name
    scalars = {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert index.metadata == scalars
    assert index.get("general.architecture") == ("llama" if which == "smollm2" else "gemma3")


def test_not_a_gguf_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_index(path)


def test_a_truncated_file_is_an_error(tmp_path: Path) -> None:
    whole = bundled_smollm2_gguf().read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_index(path)
    path.write_bytes(whole[:1000])  # inside the metadata
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_index(path)
