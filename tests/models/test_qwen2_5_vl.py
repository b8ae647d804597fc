"""Qwen2.5-VL through `LLM`: images at their own grids, each <|image_pad|> repeated per merged
block, M-RoPE positions; greedy tokens equal HF's `generate` on the same tiny random checkpoint,
batched beside text, two images in a prompt, chunked, preempted, and through chat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lmserve import LLM, SamplingParams
from tests.models.test_llava import _assert_nothing_held, _png, later_turn

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPT = f"USER: {IMAGE}What is in the picture?\nASSISTANT:"


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Grids of 4x6, 6x4 and 4x4 patches (6, 6 and 4 merged rows)."""
    return [_png(6, (84, 56)), _png(7, (56, 84)), _png(8, (56, 56))]


@pytest.fixture(scope="module")
def hf(tiny_qwen2_5_vl_dir: Path):
    from transformers import (
        AutoImageProcessor,
        AutoTokenizer,
        Qwen2_5_VLForConditionalGeneration,
    )

    path = tiny_qwen2_5_vl_dir
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return (
        model.eval(),
        AutoImageProcessor.from_pretrained(path),
        AutoTokenizer.from_pretrained(path),
    )


def _hf_tokens(hf, prompt: str, images: list[Image.Image], max_tokens: int = 10) -> list[int]:
    """HF's generate on the prompt as HF's Qwen2.5-VL processor lays it out."""
    model, image_processor, tokenizer = hf
    pixels = (
        image_processor(images, return_tensors="pt")
        if images
        else {"image_grid_thw": torch.empty(0, 3)}
    )
    pieces = prompt.split("<|image_pad|>")
    for i, (t, h, w) in enumerate(pixels["image_grid_thw"].tolist()):
        pieces[i + 1] = "<|image_pad|>" * (t * h * w // 4) + pieces[i + 1]
    ids = tokenizer("".join(pieces), return_tensors="pt")["input_ids"]
    image_id = model.config.image_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            **(
                {
                    "pixel_values": pixels["pixel_values"],
                    "image_grid_thw": pixels["image_grid_thw"],
                    "mm_token_type_ids": (ids == image_id).int(),
                }
                if images
                else {}
            ),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
        )
    return out[0, ids.shape[1] :].tolist()


def _prompt(images: list[Image.Image], prompt: str = PROMPT) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": images}}


def test_images_with_mrope_equal_hf(tiny_qwen2_5_vl_dir: Path, hf, images) -> None:
    expected = [_hf_tokens(hf, PROMPT, [image]) for image in images]
    assert len({tuple(e) for e in expected}) == 3
    two = f"USER: {IMAGE}{IMAGE}Which is brighter?\nASSISTANT:"
    expected_two = _hf_tokens(hf, two, images[:2])
    text = "USER: Tell me a story.\nASSISTANT:"
    llm = LLM(str(tiny_qwen2_5_vl_dir), kv_cache_memory_gb=0.05)
    llm.step_hook = llm.engine_core.check_invariants
    prompts = [*(_prompt([image]) for image in images), _prompt(images[:2], two), text]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected_text = _hf_tokens(hf, text, [])
    assert [o.outputs[0].token_ids for o in outputs] == [*expected, expected_two, expected_text]
    _assert_nothing_held(llm)


def test_chunked_preempted_and_chat(tiny_qwen2_5_vl_dir: Path, hf, images) -> None:
    expected = [_hf_tokens(hf, PROMPT, [image], 30) for image in images]
    llm = LLM(
        str(tiny_qwen2_5_vl_dir), max_num_batched_tokens=5, block_size=4, num_kv_blocks=30,
        max_model_len=100,
    )  # fmt: skip
    llm.step_hook = llm.engine_core.check_invariants
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = llm.generate([_prompt([image]) for image in images], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine_core.scheduler.num_preemptions > 0
    assert llm.engine_core.runner.images.encoder_cache.num_encoded == 3
    chat = llm.chat(
        [{"role": "user", "content": [{"type": "image_pil", "image_pil": images[0]},
                                      {"type": "text", "text": "What is in the picture?"}]}],
        params,
        use_tqdm=False,
    )[0]  # fmt: skip
    assert chat.outputs[0].token_ids == expected[0]
    later, hf_later = later_turn({"type": "image_pil", "image_pil": images[1]})
    out = llm.chat(later, params, use_tqdm=False)[0]
    prompt = hf[2].apply_chat_template(hf_later, tokenize=False, add_generation_prompt=True)
    assert out.outputs[0].token_ids == _hf_tokens(hf, prompt, [images[1]], 30)
    _assert_nothing_held(llm)
