"""LoRA adapters in the offline engine, checked token for token against HF transformers with PEFT
on the same adapter, alone and mixed in one batch with other adapters and the base model."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from lmserve import LLM, SamplingParams
from lmserve.kernels import cpu_ops
from lmserve.lora.request import LoRARequest
from tests.engine.test_llm import assert_no_blocks_held, hf_greedy, random_prompts

NUM_NEW = 8
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_dir: Path, out: Path, seed: int, rank: int, targets: list[str]) -> Path:
    """A PEFT adapter with random A and B (PEFT starts B at zero, which would change nothing)."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dirs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    llama = tiny_model_dirs["llama"]
    return {
        "all": make_adapter(llama, root / "all", 1, 8, ALL_TARGETS),
        "qv": make_adapter(llama, root / "qv", 2, 4, ["q_proj", "v_proj"]),  # PEFT's default
        "qwen2": make_adapter(tiny_model_dirs["qwen2"], root / "qwen2", 3, 8, ALL_TARGETS),
    }


def peft_greedy(base_dir: Path, adapter: Path | None, prompts: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    return [hf_greedy(model, p, NUM_NEW) for p in prompts]


def generate(llm: LLM, prompts, loras) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=NUM_NEW, ignore_eos=True)
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras
    )
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize(
    ("kind", "adapter"), [("llama", "all"), ("llama", "qv"), ("qwen2", "qwen2")]
)
def test_adapter_tokens_match_peft(tiny_model_dirs, adapters, kind, adapter) -> None:
    prompts = random_prompts([5, 23, 40])
    lora = LoRARequest(adapter, 1, str(adapters[adapter]))
    llm = LLM(str(tiny_model_dirs[kind]), enable_lora=True, kv_cache_memory_gb=0.01)
    got = generate(llm, prompts, lora)
    assert got == peft_greedy(tiny_model_dirs[kind], adapters[adapter], prompts)
    assert got != peft_greedy(tiny_model_dirs[kind], None, prompts)  # the adapter does something
    assert_no_blocks_held(llm)


def test_adapters_and_base_mixed_in_one_batch(tiny_model_dirs, adapters) -> None:
    """Chunked prefill and decode steps that mix two adapters and the base model; the same prompt
    under each must not share prefix-cache blocks."""
    base = tiny_model_dirs["llama"]
    shared = random_prompts([33])[0]
    prompts = [shared, shared, shared, *random_prompts([7, 19, 12], seed=1)]
    a = LoRARequest("all", 1, str(adapters["all"]))
    b = LoRARequest("qv", 2, str(adapters["qv"]))
    loras = [a, b, None, b, None, a]
    llm = LLM(
        str(base),
        enable_lora=True,
        max_loras=2,
        kv_cache_memory_gb=0.01,
        max_num_batched_tokens=24,
    )
    got = generate(llm, prompts, loras)
    for tokens, prompt, lora in zip(got, prompts, loras, strict=True):
        path = None if lora is None else Path(lora.lora_path)
        assert tokens == peft_greedy(base, path, [prompt])[0]
    assert_no_blocks_held(llm)


def test_more_adapters_than_max_loras_take_turns(tiny_model_dirs, adapters) -> None:
    base = tiny_model_dirs["llama"]
    prompts = random_prompts([9, 14, 6, 11], seed=2)
    a = LoRARequest("all", 1, str(adapters["all"]))
    b = LoRARequest("qv", 2, str(adapters["qv"]))
    loras = [a, b, a, b]
    llm = LLM(str(base), enable_lora=True, max_loras=1, kv_cache_memory_gb=0.01)
    seen = set()

    def hook() -> None:
        running = llm.engine_core.scheduler.running
        ids = {r.lora_request.lora_int_id for r in running if r.lora_request}
        assert len(ids) <= 1
        seen.update(ids)

    llm.step_hook = hook
    got = generate(llm, prompts, loras)
    assert seen == {1, 2}
    assert got[0] == peft_greedy(base, adapters["all"], prompts[:1])[0]
    assert got[1] == peft_greedy(base, adapters["qv"], prompts[1:2])[0]


def _edited_copy(source: Path, dest: Path, edit: Callable[[dict], object]) -> Path:
    """A copy of a rank-4 adapter whose tensors `edit` changed in place."""
    dest.mkdir()
    (dest / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8}))
    tensors = load_file(source / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


def test_bad_adapters_are_clear_errors(tiny_model_dirs, adapters, tmp_path) -> None:
    base = str(tiny_model_dirs["llama"])
    prompt = [{"prompt_token_ids": [1, 2, 3]}]
    plain = LLM(base, kv_cache_memory_gb=0.01)
    with pytest.raises(ValueError, match="--enable-lora"):
        plain.generate(prompt, lora_request=LoRARequest("all", 1, str(adapters["all"])))

    llm = LLM(base, enable_lora=True, max_lora_rank=4, kv_cache_memory_gb=0.01)
    with pytest.raises(ValueError, match="rank 8, above max_lora_rank=4"):
        llm.generate(prompt, lora_request=LoRARequest("all", 1, str(adapters["all"])))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        llm.generate(prompt, lora_request=LoRARequest("nope", 2, str(tmp_path / "nope")))
    # qwen3's head_dim is 32, the llama's 16: its q_proj adapter has the wrong shape
    other = make_adapter(tiny_model_dirs["qwen3"], tmp_path / "qwen3", 4, 4, ["q_proj"])
    with pytest.raises(ValueError, match="was it trained on another model"):
        llm.generate(prompt, lora_request=LoRARequest("qwen3", 3, str(other)))
    head = _edited_copy(  # an adapter on the LM head
        adapters["qv"],
        tmp_path / "head",
        lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}),
    )
    with pytest.raises(ValueError, match="lm_head.*q_proj, k_proj"):
        llm.generate(prompt, lora_request=LoRARequest("head", 4, str(head)))
    half = _edited_copy(  # half an adapter: one lora_B missing
        adapters["qv"],
        tmp_path / "half",
        lambda t: t.pop(next(k for k in t if "layers.1.self_attn.v_proj.lora_B" in k)),
    )
    with pytest.raises(ValueError, match="lora_A but not its other half for layer 1 v_proj"):
        llm.generate(prompt, lora_request=LoRARequest("half", 5, str(half)))
    for key, value, says in (("use_dora", True, "DoRA"), ("init_lora_weights", "pissa", "pissa")):
        edited = tmp_path / f"config-{key}"
        shutil.copytree(adapters["qv"], edited)
        config = json.loads((edited / "adapter_config.json").read_text())
        (edited / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ValueError, match=says):  # checkpoints vLLM refuses too
            llm.generate(prompt, lora_request=LoRARequest(key, 6, str(edited)))
    with pytest.raises(ValueError, match="positive"):
        LoRARequest("zero", 0, str(head))
    # the engine still serves after every refusal
    assert len(llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False)) == 1


def test_bf16_adapter_is_as_close_to_fp32_as_peft_bf16(tiny_model_dirs, adapters) -> None:
    """The adapter slots take the model's dtype: bf16 activations meet bf16 A and B, and each
    prompt token's logprob is about as far from PEFT's fp32 value as PEFT's own bf16 run."""
    base = tiny_model_dirs["llama"]
    prompt = random_prompts([60], seed=4)[0]
    rows, targets = torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])

    def peft_logprobs(dtype: torch.dtype) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        model = PeftModel.from_pretrained(model, adapters["all"]).eval()
        with torch.no_grad():
            logits = model(torch.tensor([prompt])).logits[0].float()
        return torch.log_softmax(logits, -1)[rows, targets]

    lora = LoRARequest("all", 1, str(adapters["all"]))
    llm = LLM(str(base), dtype="bfloat16", enable_lora=True, kv_cache_memory_gb=0.01)
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False, lora_request=lora)
    ours = torch.tensor([out[0].prompt_logprobs[i][t].logprob for i, t in enumerate(prompt) if i])
    fp32, peft_bf16 = peft_logprobs(torch.float32), peft_logprobs(torch.bfloat16)
    our_err, peft_err = (ours - fp32).abs(), (peft_bf16 - fp32).abs()
    assert peft_err.max() > 0
    assert our_err.mean() <= 1.5 * peft_err.mean() + 1e-3, (our_err.mean(), peft_err.mean())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_adapters_mixed_with_cuda_graphs_match_peft(tiny_model_dirs, adapters) -> None:
    """fp32 on CUDA with decode graphs on: steps holding an adapter run eagerly (graphs hold the
    base model only), the base-only steps replay graphs, and every prompt gets PEFT's tokens."""
    base = tiny_model_dirs["llama"]
    prompts = random_prompts([7, 19, 12, 30], seed=1)
    loras = [LoRARequest("all", 1, str(adapters["all"])), None, None, None]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (4, 12, 12, 12)]
    llm = LLM(str(base), device="cuda", dtype="float32", enable_lora=True, kv_cache_memory_gb=0.01)
    runner = llm.engine_core.runner
    replayed_with_adapter: list[bool] = []
    run = runner.graphs.run

    def run_graph(*args):
        replayed_with_adapter.append(bool(runner.batch.lora_id[runner.batch.rows_of(
            list(runner.batch.row_of))].any()))  # fmt: skip
        return run(*args)

    runner.graphs.run = run_graph
    outputs = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False, lora_request=loras
    )
    for out, prompt, lora, p in zip(outputs, prompts, loras, params, strict=True):
        path = None if lora is None else Path(lora.lora_path)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if path is not None:
            model = PeftModel.from_pretrained(model, path)
        assert out.outputs[0].token_ids == hf_greedy(model.eval(), prompt, p.max_tokens)
    assert replayed_with_adapter and not any(replayed_with_adapter)
    assert_no_blocks_held(llm)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_ops.available(), reason="no C++ compiler")
def test_adapter_on_gguf_blocks_matches_the_dequantized_base(smollm2_dir, tmp_path) -> None:
    """A LoRA adapter beside `-q gguf`'s quantized layers (the default) gives the float32
    model's tokens with the same adapter (SmolLM2's Q4_1 file, every projection adapted)."""
    adapter = make_adapter(smollm2_dir, tmp_path / "smollm2", 4, 8, ALL_TARGETS)
    lora = LoRARequest("smollm2", 1, str(adapter))
    prompts = random_prompts([5, 23, 40])
    tokens = {}
    for dtype in ("float32", "auto"):
        llm = LLM(
            None,
            dtype=dtype,
            enable_lora=True,
            kv_cache_memory_gb=0.05,
            max_model_len=512,
        )
        tokens[dtype] = (generate(llm, prompts, lora), generate(llm, prompts, None))
        assert_no_blocks_held(llm)
        del llm
    assert tokens["auto"] == tokens["float32"]
    assert tokens["float32"][0] != tokens["float32"][1]  # the adapter does something
