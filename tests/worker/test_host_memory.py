"""A model that cannot fit in this host's memory is refused before any weight is read, with
what it needs, what is available and what would fit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmserve import LLM
from lmserve.engine.args import create_engine_config
from lmserve.models.gguf import gguf_to_hf_dir
from lmserve.models.memory import weight_bytes
from lmserve.worker.host_memory import available_bytes, check_fits
from tests.models.test_memory import LLAMA_7B, write_llama_shape

_GB = 1 << 30


def test_available_memory_is_at_most_the_total() -> None:
    total = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal:")
    )
    available = available_bytes()
    assert available is not None and 0 < available <= total


@pytest.fixture(scope="module")
def llama_7b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 7B-shape Q4_K file (3.6 GB, sparse: no disk) and its conversion's cache."""
    root = tmp_path_factory.mktemp("llama-7b")
    path = write_llama_shape(root / "llama-7b-shape.Q4_K.gguf", LLAMA_7B)
    gguf_to_hf_dir(path, root / "cache" / "gguf")
    return path, root / "cache"


def test_a_7b_gguf_as_float32_is_refused_up_front(llama_7b) -> None:
    path, cache = llama_7b
    params = {
        "max_model_len": 512, "kv_cache_memory_gb": 0.5, "cache_dir": str(cache),
        "dtype": "float32",
    }  # fmt: skip
    float32 = weight_bytes(create_engine_config(str(path), **params).model)
    assert float32 is not None
    available = available_bytes()
    if available is None or float32 + _GB // 2 <= available:
        pytest.skip(f"this host fits a 7B model in float32 ({float32 / _GB:.0f} GB)")
    with pytest.raises(ValueError) as raised:
        LLM(str(path), **params)
    message = str(raised.value)
    needed = float(re.search(r"needs about ([\d.]+) GB", message)[1])
    assert needed == pytest.approx((float32 + _GB / 2) / _GB, abs=0.051)
    stated = float(re.search(r"but ([\d.]+) GB is available", message)[1])
    assert stated == pytest.approx(available / _GB, abs=1.0)  # free memory moves a little
    gguf = float(re.search(r"--quantization gguf \(about ([\d.]+) GB", message)[1])
    assert gguf == pytest.approx(path.stat().st_size / _GB + 0.5, abs=0.1)
    assert not list((cache / "gguf").glob("*/model.safetensors"))  # nothing was dequantized


def test_the_same_file_kept_quantized_fits(llama_7b) -> None:
    path, cache = llama_7b
    config = create_engine_config(
        str(path), quantization="gguf", max_model_len=512, kv_cache_memory_gb=0.5,
        cache_dir=str(cache),
    )  # fmt: skip
    available = available_bytes()
    if available is None or path.stat().st_size + _GB > available:
        pytest.skip("this host has less free memory than a 7B Q4_K file")
    check_fits(config)  # no error: about 4.1 GB
