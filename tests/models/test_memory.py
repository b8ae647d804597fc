"""weight_bytes read from checkpoint headers, and a Llama-3.2-1B-shape Q4_K GGUF loaded with
`quantization="gguf"` within 1.3x its file size plus the KV cache."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from lmserve.engine.args import create_engine_config
from lmserve.kernels import cpu_ops
from lmserve.models.gguf import bundled_smollm2_gguf, gguf_to_hf_dir
from lmserve.models.memory import weight_bytes

Q = gguf.GGMLQuantizationType
LLAMA_1B = dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256)
LLAMA_7B = dict(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008, vocab=32000)


def _smollm2_vocab() -> dict:
    """SmolLM2's BPE tokenizer as its GGUF stores it (a shape's vocabulary may be larger: the
    rows past it are never produced by the tokenizer)."""
    reader = gguf.GGUFReader(bundled_smollm2_gguf())
    return {
        key: reader.get_field(f"tokenizer.ggml.{key}").contents()
        for key in ("model", "pre", "tokens", "token_type", "merges")
    }


def write_llama_shape(path: Path, shape: dict[str, int], qtype: Q = Q.Q4_K) -> Path:
    """A llama GGUF of real shapes, every matrix in `qtype`, its data zeros left as a hole in a
    sparse file: seconds to write and no disk, and loading it is what is measured, not its
    numbers (zero blocks are valid blocks of every type)."""
    hidden, ffn, head_dim = shape["hidden"], shape["ffn"], shape["hidden"] // shape["heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(hidden)
    writer.add_block_count(shape["layers"])
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(shape["heads"])
    writer.add_head_count_kv(shape["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    vocab = _smollm2_vocab()
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_type"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    kv = shape["kv_heads"] * head_dim
    tensors = [("token_embd.weight", (shape["vocab"], hidden), qtype)]
    tensors.append(("output_norm.weight", (hidden,), Q.F32))
    for i in range(shape["layers"]):
        tensors += [
            (f"blk.{i}.attn_norm.weight", (hidden,), Q.F32),
            (f"blk.{i}.attn_q.weight", (hidden, hidden), qtype),
            (f"blk.{i}.attn_k.weight", (kv, hidden), qtype),
            (f"blk.{i}.attn_v.weight", (kv, hidden), qtype),
            (f"blk.{i}.attn_output.weight", (hidden, hidden), qtype),
            (f"blk.{i}.ffn_norm.weight", (hidden,), Q.F32),
            (f"blk.{i}.ffn_gate.weight", (ffn, hidden), qtype),
            (f"blk.{i}.ffn_up.weight", (ffn, hidden), qtype),
            (f"blk.{i}.ffn_down.weight", (hidden, ffn), qtype),
        ]
    data = 0
    for name, dims, kind in tensors:
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        nbytes = math.prod(dims) // block * block_bytes
        writer.add_tensor_info(name, dims, np.dtype(np.float32), nbytes, raw_dtype=kind)
        data += -(-nbytes // 32) * 32
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with path.open("r+b") as file:
        file.truncate(-(-path.stat().st_size // 32) * 32 + data)
    return path


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the file, the cache its conversion is in)."""
    root = tmp_path_factory.mktemp("llama-1b")
    path = write_llama_shape(root / "llama-3.2-1b-shape.Q4_K.gguf", LLAMA_1B)
    gguf_to_hf_dir(path, root / "cache" / "gguf")  # the one-time conversion, not measured
    return path, root / "cache"


def test_weight_bytes_reads_the_checkpoint(llama_1b, smollm2_dir: Path) -> None:
    """-q gguf: the file's blocks plus its float32 norms; float32: 4 bytes a weight, the tied
    head counted once; safetensors: from the shards' headers."""
    path, cache = llama_1b
    params = {"max_model_len": 256, "cache_dir": str(cache)}
    kept = weight_bytes(create_engine_config(str(path), quantization="gguf", **params).model)
    assert path.stat().st_size - (10 << 20) < kept <= path.stat().st_size
    h, f, kv = LLAMA_1B["hidden"], LLAMA_1B["ffn"], LLAMA_1B["hidden"] // 4
    count = (
        LLAMA_1B["vocab"] * h
        + h
        + LLAMA_1B["layers"] * (2 * h * h + 2 * kv * h + 3 * h * f + 2 * h)
    )
    assert weight_bytes(create_engine_config(str(path), dtype="float32", **params).model) == (
        4 * count
    )
    bf16 = create_engine_config(str(path), dtype="bfloat16", **params).model
    assert weight_bytes(bf16) == 2 * count
    smollm2 = create_engine_config(str(smollm2_dir), dtype="float32", **params).model
    shard = (smollm2_dir / "model.safetensors").read_bytes()[:8]  # then the header, then data
    data = (smollm2_dir / "model.safetensors").stat().st_size - 8 - int.from_bytes(shard, "little")
    assert weight_bytes(smollm2) == data  # its tensors are float32, as the model
    dummy = create_engine_config(str(smollm2_dir), load_format="dummy", **params).model
    assert weight_bytes(dummy) is None


@pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")
@pytest.mark.parametrize("kind", ["llama", "smollm2", "smollm2_gguf"])
def test_int4_counts_the_blocks_it_keeps(kind: str, tiny_model_dirs, smollm2_dir, tmp_path) -> None:
    """From safetensors or read from the GGUF's index, -q int4's estimate is the loaded model's
    bytes exactly: Q4_1 linears, a Q8_0 head (SmolLM2's tied one a copy of its own), float
    embeddings and norms."""
    from lmserve import LLM

    path = tiny_model_dirs["llama"]  # an untied head
    if kind == "smollm2_gguf":
        path = smollm2_dir
    if kind == "smollm2":  # the converted GGUF's safetensors, as a plain checkpoint
        path = tmp_path / "smollm2"
        path.mkdir()
        for name in ("config.json", "generation_config.json", "model.safetensors"):
            (path / name).symlink_to(smollm2_dir / name)
    llm = LLM(str(path), quantization="int4", kv_cache_memory_gb=0.01, max_model_len=64)
    tensors = {
        t.data_ptr(): t.numel() * t.element_size()
        for name, t in [*llm.engine_core.runner.model.named_parameters(),
                        *llm.engine_core.runner.model.named_buffers()]
        if "rotary" not in name
    }  # fmt: skip
    estimate = weight_bytes(llm.config.model)
    assert estimate == sum(tensors.values())
    float32 = weight_bytes(dataclasses.replace(llm.config.model, quantization=None))
    assert float32 > 2 * estimate  # float32 embeddings are much of what is left


_MEASURE = """
import json, sys
from lmserve.engine.args import create_engine_config
from lmserve.engine.core import build_engine_core
config = create_engine_config(sys.argv[1], quantization="gguf", kv_cache_memory_gb=0.1,
                              max_model_len=256, cache_dir=sys.argv[2])
def status(key):
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith(key))
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
before = status("VmRSS:")
core = build_engine_core(config)
print(json.dumps({"before": before, "peak": status("VmHWM:"), "kv": config.cache.kv_cache_bytes}))
"""


@pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's clear_refs")
def test_a_1b_q4_k_file_loads_within_1_3x_its_size(llama_1b) -> None:
    """The load (weights, then the KV cache) adds at most 1.3x the file plus the KV cache to the
    process's peak RSS: the blocks are read once each, never mapped beside their copies, and a
    fused layer's parts are joined as soon as they are all there."""
    path, cache = llama_1b
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), str(cache)],
        capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    grown = measured["peak"] - measured["before"]
    assert grown <= 1.3 * path.stat().st_size + measured["kv"], (grown >> 20, measured)
