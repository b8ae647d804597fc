"""gguf_to_hf_dir checked against transformers loading the same GGUF file."""

from __future__ import annotations

import json
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from lmserve import LLM, SamplingParams
from lmserve.kernels import cpu_ops
from lmserve.layers.gguf_layers import GGUFLinear, GGUFRows
from lmserve.models.gguf import (
    _llama3_rope_scaling,
    bundled_smollm2_gguf,
    ensure_hf_weights,
    gguf_source,
    gguf_to_hf_dir,
    iter_gguf_weights,
)
from tests.engine.test_llm import (
    NUM_NEW,
    SCENARIOS,
    PreemptionCounter,
    assert_no_blocks_held,
    random_prompts,
    run_greedy,
)

pytestmark = pytest.mark.slow

TEXTS = [
    "Hello world, this is a test.",
    "héllo wörld 🤗 日本語 — ünïcödé  \n\n  spaces\ttabs 12345",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
]
CHATS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2? 🤔"}],
]


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return bundled_smollm2_gguf()


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="module")
def converted(gguf_file: Path, cache_root: Path) -> Path:
    return gguf_to_hf_dir(gguf_file, cache_root)


@pytest.fixture(scope="module")
def hf_model(gguf_file: Path) -> torch.nn.Module:
    """transformers' own GGUF conversion of the file.

    `from_pretrained(gguf_file=...)` insists on `accelerate` (not a dependency) and then calls
    `load_gguf_checkpoint` for llama-arch files; we call that directly.
    """
    config = AutoConfig.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    checkpoint = load_gguf_checkpoint(
        str(gguf_file), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    missing, unexpected = model.load_state_dict(checkpoint["tensors"], strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected
    model.tie_weights()
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gguf_file: Path):
    return AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)


@pytest.fixture(scope="module")
def our_tokenizer(converted: Path):
    return AutoTokenizer.from_pretrained(converted)


def test_weights_match_transformers(converted: Path, hf_model: torch.nn.Module) -> None:
    ours = load_file(ensure_hf_weights(converted))
    theirs = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == np.float32, name
        np.testing.assert_array_equal(ours[name], tensor.numpy(), err_msg=name)  # bitwise


def test_config_matches_transformers(converted: Path, hf_model: torch.nn.Module) -> None:
    ours = json.loads((converted / "config.json").read_text())
    hf = hf_model.config
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert ours[key] == getattr(hf, key), key
    assert ours["vocab_size"] == hf.vocab_size
    assert ours["tie_word_embeddings"] is hf.tie_word_embeddings is True
    assert ours["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == pytest.approx(hf.rope_parameters["rope_theta"])
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert (ours["bos_token_id"], ours["eos_token_id"]) == (1, 2)
    assert "rope_scaling" not in ours


def test_converted_dir_generates_like_transformers(
    converted: Path, hf_model: torch.nn.Module, our_tokenizer
) -> None:
    """End to end, and independent of transformers' permutation: the model must still know facts."""
    ensure_hf_weights(converted)
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = our_tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, hf_model(**inputs).logits)
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    assert "Paris" in our_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_encodes_like_transformers(
    converted: Path, hf_tokenizer, our_tokenizer, text: str
) -> None:
    expected = hf_tokenizer(text)["input_ids"]
    assert our_tokenizer(text)["input_ids"] == expected
    assert Tokenizer.from_file(str(converted / "tokenizer.json")).encode(text).ids == expected


@pytest.mark.parametrize("chat", CHATS)
def test_chat_template_matches_transformers(hf_tokenizer, our_tokenizer, chat) -> None:
    expected = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert our_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        expected
    )


def test_special_tokens_follow_metadata(converted: Path, our_tokenizer) -> None:
    assert (our_tokenizer.bos_token, our_tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (our_tokenizer.eos_token, our_tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert our_tokenizer("hi")["input_ids"][0] != 1  # add_bos_token is false in the metadata
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False
    assert config["chat_template"] == our_tokenizer.chat_template
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


def test_second_call_reuses_cache(gguf_file: Path, cache_root: Path, converted: Path) -> None:
    weights = ensure_hf_weights(converted)
    mtimes = [p.stat().st_mtime_ns for p in (converted / "config.json", weights)]
    start = time.perf_counter()
    again = gguf_to_hf_dir(str(gguf_file), cache_root)
    assert ensure_hf_weights(again) == weights
    assert time.perf_counter() - start < 1.0
    assert again == converted
    assert [p.stat().st_mtime_ns for p in (converted / "config.json", weights)] == mtimes
    assert list(cache_root.iterdir()) == [converted]  # no temp dirs left behind
    assert not [p for p in converted.iterdir() if p.name.endswith(".tmp")]


def test_the_float32_weights_are_written_only_when_needed(gguf_file: Path, tmp_path: Path) -> None:
    """Converting writes no float32 copy; `quantization="gguf"` (the default) never needs one;
    the float32 model writes it on its first load."""
    cache = tmp_path / "cache"
    kwargs = dict(kv_cache_memory_gb=0.05, max_model_len=256, cache_dir=str(cache))
    converted = gguf_to_hf_dir(gguf_file, cache / "gguf")  # where LLM looks
    weights = converted / "model.safetensors"
    assert not weights.exists()
    if cpu_ops.available():
        LLM(str(gguf_file), **kwargs)
        assert not weights.exists()
    LLM(str(gguf_file), dtype="float32", **kwargs)
    assert weights.is_file()


def test_the_converted_dir_names_its_source(gguf_file: Path, converted: Path) -> None:
    assert gguf_source(converted) == gguf_file.resolve()
    assert gguf_source(converted.parent) is None


needs_kernels = pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")


@needs_kernels
def test_blocks_kept_quantized_are_the_converted_weights(gguf_file: Path, converted: Path) -> None:
    """Every tensor `quantization="gguf"` loads equals the converted checkpoint's bitwise: the
    Q4_1 linears' blocks once dequantized (q/k rows in HF's order), the Q8_0 embedding's, and
    the tied head is the embedding's blocks."""
    ours = load_file(ensure_hf_weights(converted))
    config = json.loads((converted / "config.json").read_text())
    kept = set()
    for name, tensor in iter_gguf_weights(gguf_file, config, tied_head=True):
        expected = ours["model.embed_tokens.weight" if name == "lm_head.weight" else name]
        if isinstance(tensor, GGUFRows):
            kept.add(name)
            tensor = cpu_ops.gguf_dequantize(tensor.data, tensor.qtype, tensor.in_features)
        np.testing.assert_array_equal(tensor.numpy(), expected, err_msg=name)
    linears = {n for n in ours if n.endswith("_proj.weight")}
    assert kept == linears | {"lm_head.weight", "model.embed_tokens.weight"}


GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "List three colors: red,",
    "Once upon a time, in a small village,",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
    "Translate to French: good morning",
    "import numpy as np\nx = np.arange(10)\nprint(x",
    "The quick brown fox jumps over the lazy dog. The quick brown fox",
]


@needs_kernels
def test_blocks_kept_quantized_generate_the_dequantized_models_tokens(
    gguf_file: Path, cache_root: Path
) -> None:
    """SmolLM2's Q4_1 file, weight-only, as it loads by default: the float32 model's
    (`dtype="float32"`) greedy tokens, the prompts batched (prefill through the dequantized GEMM,
    decode through the block kernel)."""
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    kwargs = dict(kv_cache_memory_gb=0.1, max_model_len=1024, cache_dir=str(cache_root))
    tokens = {}
    for dtype in ("float32", "auto"):
        llm = LLM(str(gguf_file), dtype=dtype, **kwargs)
        kept = isinstance(llm.engine_core.runner.model.model.layers[0].mlp.down_proj, GGUFLinear)
        assert (llm.config.model.quantization, kept) == (
            ("gguf", True) if dtype == "auto" else (None, False)
        )
        outputs = llm.generate(GREEDY_PROMPTS, params, use_tqdm=False)
        tokens[dtype] = [o.outputs[0].token_ids for o in outputs]
        del llm
    assert tokens["auto"] == tokens["float32"]


PARAGRAPH = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It "
    "is named after the engineer Gustave Eiffel, whose company designed and built the tower from "
    "1887 to 1889. Locally nicknamed the Iron Lady, it was constructed as the centerpiece of the "
    "1889 World's Fair, and to crown the centennial anniversary of the French Revolution."
)


def _nll(llm: LLM) -> float:
    """Mean negative log-likelihood of PARAGRAPH's tokens (teacher-forced, prompt logprobs)."""
    out = llm.generate([PARAGRAPH], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    ids, logprobs = out[0].prompt_token_ids[1:], out[0].prompt_logprobs[1:]
    return -sum(lp[t].logprob for t, lp in zip(ids, logprobs, strict=True)) / len(ids)


def _assert_batch_finishes_and_frees(llm: LLM) -> None:
    """Six prompts through a small cache with chunked prefill: every request preempted or not
    runs to its last token, and no KV block is held after."""
    hook = PreemptionCounter(llm)
    llm.step_hook = hook
    outputs = run_greedy(llm, random_prompts([5, 17, 33, 64, 3, 1]))
    assert [len(o) for o in outputs] == [NUM_NEW] * 6
    assert hook.preempted
    assert_no_blocks_held(llm)


@needs_kernels
def test_q8_activations_stay_near_the_float32_model(gguf_file: Path, cache_root: Path) -> None:
    """gguf_q8 is llama.cpp's arithmetic, not float32's: its layers hold the file's blocks, its
    likelihood of a paragraph stays within 0.02 nats a token of the float32 model's (measured:
    2.049 against 2.046; int8 2.103), and batching with chunked prefill and preemption leaks no
    blocks. (Its greedy tokens may change with batching, as llama.cpp's do: rounding activations
    to int8 magnifies the float32 differences between attention paths; each layer's rows are
    independent, tests/layers/test_gguf_layers.py.)"""
    kwargs = dict(cache_dir=str(cache_root), kv_cache_memory_gb=0.05, max_model_len=512)
    reference = _nll(LLM(str(gguf_file), dtype="float32", **kwargs))
    llm = LLM(str(gguf_file), quantization="gguf_q8", **kwargs)
    model = llm.engine_core.runner.model
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, GGUFLinear)
    assert abs(_nll(llm) - reference) < 0.02
    del llm
    llm = LLM(
        str(gguf_file),
        quantization="gguf_q8",
        cache_dir=str(cache_root),
        **SCENARIOS["preemption_chunked"],
    )
    _assert_batch_finishes_and_frees(llm)


def test_unsupported_architecture_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"'gpt2'.*llama"):
        gguf_to_hf_dir(path, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_llama3_rope_scaling_is_recovered_from_rope_freqs() -> None:
    """llama.cpp stores llama3 scaling as per-frequency divisors; transformers computes the same."""
    params = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    config = LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling=dict(params),
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    plain = 500000.0 ** -(torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    rope_freqs = (plain / scaled.double()).float().numpy()
    assert _llama3_rope_scaling(rope_freqs, 500000.0, 128) == params
    with pytest.raises(ValueError, match="rope_freqs"):
        _llama3_rope_scaling(rope_freqs * 1.5, 500000.0, 128)


@needs_kernels
def test_int4_on_the_converted_checkpoint(converted: Path, cache_root: Path) -> None:
    """quantization="int4" on the float32 safetensors: every linear re-stored as blocks, the
    head as Q8_0; SmolLM2's weights are dequantized Q4_1, so requantizing them to Q4_1 loses
    almost nothing (measured: the paragraph's likelihood the same to 4 decimals); batched with
    chunked prefill and preemption it finishes every request and leaks no blocks."""
    ensure_hf_weights(converted)
    kwargs = dict(kv_cache_memory_gb=0.05, max_model_len=512)
    reference = _nll(LLM(str(converted), **kwargs))
    llm = LLM(str(converted), quantization="int4", **kwargs)
    model = llm.engine_core.runner.model
    layers = [m for m in model.modules() if isinstance(m, GGUFLinear)]
    assert len(layers) == 1 + 4 * len(model.model.layers)  # head; qkv, o, gate_up, down
    assert model.lm_head.part0.shape[1] == 576 // 32 * 34  # Q8_0 rows
    assert abs(_nll(llm) - reference) < 0.005
    del llm
    llm = LLM(str(converted), quantization="int4", **SCENARIOS["preemption_chunked"])
    _assert_batch_finishes_and_frees(llm)
