"""save_streamed and iter_streamed against safetensors' own reader and writer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file
from safetensors.torch import save_file

from lmserve.models.safetensors_stream import iter_streamed, read_header, save_streamed


def test_tensors_round_trip_through_safetensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 5)).astype(np.float32),
        "b": np.arange(7, dtype=np.int64),  # odd sizes: offsets need no alignment of their own
        "c.half": rng.standard_normal((2, 3, 1)).astype(np.float16),
        "d.view": rng.standard_normal((4, 6)).astype(np.float32).T,  # not contiguous
        "e.empty": np.zeros((0, 4), dtype=np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_streamed(iter(tensors.items()), path, metadata={"format": "pt"})
    loaded = load_file(path)
    assert loaded.keys() == tensors.keys()
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    with safe_open(path, framework="np") as handle:
        assert handle.metadata() == {"format": "pt"}


def test_a_failed_write_leaves_no_file(tmp_path: Path) -> None:
    def tensors() -> Iterator[tuple[str, np.ndarray]]:
        yield "a", np.ones(3, dtype=np.float32)
        raise RuntimeError("conversion failed")

    with pytest.raises(RuntimeError, match="conversion failed"):
        save_streamed(tensors(), tmp_path / "model.safetensors", metadata={})
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_dtype_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bool"):
        save_streamed([("flags", np.ones(2, dtype=bool))], tmp_path / "x.safetensors", {})
    assert list(tmp_path.iterdir()) == []


def test_iter_streamed_reads_what_safetensors_wrote(tmp_path: Path) -> None:
    """Every dtype a checkpoint holds, odd sizes and an empty tensor, bitwise as safetensors
    reads them, in the file's order; a file cut short is an error naming the tensor."""
    generator = torch.Generator().manual_seed(0)
    tensors = {
        "w.bf16": torch.randn(3, 5, generator=generator).bfloat16(),
        "w.f32": torch.randn(4, 7, generator=generator),
        "w.f16": torch.randn(2, 3, 1, generator=generator).half(),
        "ids": torch.arange(5, dtype=torch.int64),
        "blocks": torch.randint(0, 255, (3, 17), dtype=torch.uint8, generator=generator),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    read = list(iter_streamed(path))
    with open(path, "rb") as file:
        header, _ = read_header(file)
    offsets = [header[name]["data_offsets"][0] for name, _ in read]
    assert sorted(header) == sorted(tensors) and offsets == sorted(offsets)
    with safe_open(path, framework="pt") as handle:
        for name, tensor in read:
            expected = handle.get_tensor(name)
            assert tensor.dtype == expected.dtype and tensor.shape == expected.shape, name
            assert torch.equal(tensor, expected), name
    data = path.read_bytes()
    path.write_bytes(data[:-8])
    with pytest.raises(ValueError, match="ends inside tensor"):
        list(iter_streamed(path))
