"""Pixtral (HF's LlavaForConditionalGeneration with a Pixtral tower) through `LLM`: images at
their own sizes laid out as rows of [IMG] with [IMG_BREAK]s and an [IMG_END], greedy tokens
equal HF's `generate` on the same tiny random checkpoint, batched, chunked, preempted, and
through chat."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from lmserve import LLM, SamplingParams
from tests.models.test_llava import _assert_nothing_held, _png, later_turn

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
PROMPT = "USER: [IMG]What is in the picture?\nASSISTANT:"


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Sizes that give 4x2, 2x4 and 3x3 patches after the processor's resize."""
    return [_png(3, (64, 32)), _png(4, (16, 40)), _png(5, (24, 24))]


@pytest.fixture(scope="module")
def hf(tiny_pixtral_dir: Path):
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_pixtral_dir, dtype=torch.float32)
    return (
        model.eval(),
        AutoImageProcessor.from_pretrained(tiny_pixtral_dir),
        AutoTokenizer.from_pretrained(tiny_pixtral_dir),
    )


def _hf_tokens(hf, prompt: str, images: list[Image.Image], max_tokens: int = 10) -> list[int]:
    """HF's generate on the prompt as HF's PixtralProcessor lays it out (each [IMG] replaced by
    the image's rows of [IMG], each row ended by [IMG_BREAK], the last by [IMG_END])."""
    model, image_processor, tokenizer = hf
    pixels = (
        image_processor(images, return_tensors="pt")
        if images
        else {"image_sizes": torch.empty(0, 3)}
    )
    pieces = prompt.split("[IMG]")
    for i, (height, width) in enumerate(pixels["image_sizes"].tolist()):
        rows = [["[IMG]"] * (width // 8) + ["[IMG_BREAK]"] for _ in range(height // 8)]
        layout = [token for row in rows for token in row]
        layout[-1] = "[IMG_END]"
        pieces[i + 1] = "".join(layout) + pieces[i + 1]
    prompt = "".join(pieces)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            **(
                {"pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]}
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


def test_images_of_their_own_sizes_equal_hf(tiny_pixtral_dir: Path, hf, images) -> None:
    expected = [_hf_tokens(hf, PROMPT, [image]) for image in images]
    assert len({tuple(e) for e in expected}) == 3
    two = "USER: [IMG][IMG]Which is brighter?\nASSISTANT:"
    expected_two = _hf_tokens(hf, two, images[:2])
    llm = LLM(str(tiny_pixtral_dir), kv_cache_memory_gb=0.05)
    llm.step_hook = llm.engine_core.check_invariants
    prompts = [
        *(_prompt([image]) for image in images),
        _prompt(images[:2], two),
        "USER: Hi\nASSISTANT:",
    ]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    expected_text = _hf_tokens(hf, prompts[-1], [])
    assert [o.outputs[0].token_ids for o in outputs] == [*expected, expected_two, expected_text]
    tokenizer = llm.get_tokenizer()
    layout = tokenizer.decode(outputs[0].prompt_token_ids)  # 64 wide, 32 high: 2 rows of 4
    assert "[IMG]" * 4 + "[IMG_BREAK]" + "[IMG]" * 4 + "[IMG_END]What" in layout
    _assert_nothing_held(llm)


def test_chunked_preempted_and_chat(tiny_pixtral_dir: Path, hf, images) -> None:
    """5-token steps cut through the rows and their breaks; a small cache preempts; chat
    renders an image part as [IMG]."""
    expected = [_hf_tokens(hf, PROMPT, [image], 30) for image in images]
    llm = LLM(
        str(tiny_pixtral_dir), max_num_batched_tokens=5, block_size=4, num_kv_blocks=30,
        max_model_len=100,
    )  # fmt: skip
    llm.step_hook = llm.engine_core.check_invariants
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    outputs = llm.generate([_prompt([image]) for image in images], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine_core.scheduler.num_preemptions > 0
    assert llm.engine_core.runner.images.encoder_cache.num_encoded == 3
    chat = llm.chat(
        [{"role": "user", "content": [{"type": "image_pil", "image_pil": images[2]},
                                      {"type": "text", "text": "What is in the picture?"}]}],
        params,
        use_tqdm=False,
    )[0]  # fmt: skip
    assert chat.outputs[0].token_ids == expected[2]
    later, hf_later = later_turn({"type": "image_pil", "image_pil": images[1]})
    out = llm.chat(later, params, use_tqdm=False)[0]
    prompt = hf[2].apply_chat_template(hf_later, tokenize=False, add_generation_prompt=True)
    assert out.outputs[0].token_ids == _hf_tokens(hf, prompt, [images[1]], 30)
    _assert_nothing_held(llm)
