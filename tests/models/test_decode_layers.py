"""The one-call decode loop (models/decode_layers.py) against the layer-by-layer path: the same
tokens and the same logprobs to the bit, in every engine scenario, for the Llama family and
Gemma 2/3, where it runs; and the layers it does not run take the layer path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.kernels import cpu_ops
from lmserve.models.decode_layers import DecodeLayers
from lmserve.models.gguf import bundled_smollm2_gguf
from tests.conftest import _randomize
from tests.engine.test_llm import (
    NUM_NEW,
    SCENARIOS,
    PreemptionCounter,
    assert_no_blocks_held,
    random_prompts,
)
from tests.models.test_gemma import _gemma2, _gemma3

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason="needs the C++ CPU kernels")

PROMPTS = random_prompts([5, 17, 33, 64, 3, 1])
PARAMS = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, ignore_eos=True, logprobs=2)


def _generate(model: str, monkeypatch: pytest.MonkeyPatch, fused: bool, **kwargs) -> tuple:
    """(tokens and logprobs per prompt, decode steps the loop ran, preemptions)."""
    calls = []
    with monkeypatch.context() as patch:
        if fused:
            run = cpu_ops.decode_layers
            patch.setattr(cpu_ops, "decode_layers", lambda *a: calls.append(1) or run(*a))
        else:
            patch.setattr(DecodeLayers, "build", classmethod(lambda cls, *args, **kwargs: None))
        llm = LLM(model, **kwargs)
        llm.step_hook = hook = PreemptionCounter(llm)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], PARAMS, use_tqdm=False)
        assert_no_blocks_held(llm)
    result = [
        (o.outputs[0].token_ids, [sorted(d.items()) for d in o.outputs[0].logprobs])
        for o in outputs
    ]
    return result, len(calls), hook.preempted


@pytest.mark.parametrize(
    ("kind", "scenario", "quantization"),
    [("llama", s, "int4") for s in SCENARIOS]
    + [("qwen2", "batched", "int4"), ("mistral", "preemption", "int4")]
    + [("llama", "preemption_chunked", q) for q in (None, "int8")]
    + [("qwen2", "batched", q) for q in (None, "int8")],
)
def test_decode_steps_in_one_call_are_the_layer_paths(
    tiny_model_dirs, monkeypatch, kind: str, scenario: str, quantization: str | None
) -> None:
    """GGUF blocks (int4: the tiny models' weights requantized), int8 and float32 linears:
    Llama, Qwen2's q/k/v bias and windowed last layer, Mistral's window on every layer;
    batched, chunked, prefix-cached and preempted requests."""
    kwargs = dict(quantization=quantization, kv_cache_memory_gb=0.01, **SCENARIOS[scenario])
    fused, steps, preempted = _generate(str(tiny_model_dirs[kind]), monkeypatch, True, **kwargs)
    layered, never, _ = _generate(str(tiny_model_dirs[kind]), monkeypatch, False, **kwargs)
    assert steps > 0 and never == 0
    assert preempted == (scenario.startswith("preemption") and kind != "mistral")
    assert fused == layered


@pytest.fixture(scope="module")
def gemma_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny Gemma 2 (soft caps, no q/k norms) and Gemma 3 (q/k norms, a rotary table for the
    windowed layers and one for the global) checkpoints."""
    dirs = {}
    for kind, build in (("gemma2", _gemma2), ("gemma3", _gemma3)):
        torch.manual_seed(7)
        model = build()
        _randomize(model)
        dirs[kind] = tmp_path_factory.mktemp(kind)
        model.save_pretrained(dirs[kind])
    return dirs


@pytest.mark.parametrize("kind", ["gemma2", "gemma3"])
@pytest.mark.parametrize(
    ("scenario", "quantization"),
    [("batched", "int4"), ("preemption_chunked", "int4"), ("batched", None), ("batched", "int8")],
)
def test_gemma_decode_steps_in_one_call_are_the_layer_paths(
    gemma_dirs, monkeypatch, kind: str, scenario: str, quantization: str | None
) -> None:
    kwargs = dict(quantization=quantization, kv_cache_memory_gb=0.01, **SCENARIOS[scenario])
    fused, steps, _ = _generate(str(gemma_dirs[kind]), monkeypatch, True, **kwargs)
    layered, never, _ = _generate(str(gemma_dirs[kind]), monkeypatch, False, **kwargs)
    assert steps > 0 and never == 0
    assert fused == layered


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["gguf", "gguf_q8"])
def test_smollm2_gguf_decodes_in_one_call(monkeypatch, quantization: str) -> None:
    """The bundled Q4_1 file as it serves by default (float32 activations) and with llama.cpp's
    q8 activations: every decode step in one call, the layer path's numbers."""
    kwargs = dict(quantization=quantization, kv_cache_memory_gb=0.05, max_model_len=512)
    gguf = str(bundled_smollm2_gguf())
    fused, steps, _ = _generate(gguf, monkeypatch, True, **kwargs)
    assert steps >= PARAMS.max_tokens - 1
    assert fused == _generate(gguf, monkeypatch, False, **kwargs)[0]


@pytest.mark.parametrize(
    ("kind", "kwargs"),
    [
        ("qwen3", dict(quantization="int4")),  # q/k norms
        ("llama", dict(quantization="int4", enable_lora=True, max_lora_rank=8)),
        ("llama", dict(dtype="bfloat16")),  # the kernels compute in float32
    ],
    ids=["qk-norm", "lora", "bfloat16"],
)
def test_layers_the_loop_does_not_run_take_the_layer_path(
    tiny_model_dirs, monkeypatch, kind: str, kwargs: dict
) -> None:
    outputs, steps, _ = _generate(str(tiny_model_dirs[kind]), monkeypatch, True, **kwargs)
    assert steps == 0
    assert [len(tokens) for tokens, _ in outputs] == [PARAMS.max_tokens] * len(PROMPTS)


def test_build_refuses_a_model_with_any_layer_it_does_not_run(tiny_model_dirs) -> None:
    llm = LLM(str(tiny_model_dirs["llama"]), quantization="int4", kv_cache_memory_gb=0.01)
    layers = llm.engine_core.runner.model.model.layers
    parts = [layer.decode_parts() for layer in layers]
    assert DecodeLayers.build(parts) is not None
    assert DecodeLayers.build([*parts[:-1], None]) is None
    assert DecodeLayers.build([]) is None
