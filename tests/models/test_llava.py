"""LLaVA through `LLM`: greedy tokens equal HF's `generate` on the same tiny random checkpoint
with real (PNG-decoded) images, batched beside text, chunked, preempted and prefix-cached; an
image is encoded once however its prompt is split, and another image never reuses KV."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lmserve import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = "USER: <image>\nWhat is in the picture?\nASSISTANT:"


def _png(seed: int, size: tuple[int, int]) -> Image.Image:
    """A random picture, through a PNG file's bytes as a user's image comes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_png(0, (40, 50)), _png(1, (64, 32)), _png(2, (28, 28))]


@pytest.fixture(scope="module")
def hf(tiny_llava_dir: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32)
    return model.eval(), AutoProcessor.from_pretrained(tiny_llava_dir)


def _hf_tokens(hf, prompt: str, images: list[Image.Image] | None, max_tokens: int = 12):
    model, processor = hf
    inputs = processor(images=images, text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=max_tokens, do_sample=False, min_new_tokens=max_tokens
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def _tokens(llm: LLM, prompts) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def _image_prompt(image: Image.Image, prompt: str = PROMPT) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": image}}


def later_turn(image_part: dict) -> tuple[list[dict], list[dict]]:
    """A conversation with `image_part` in its second user turn, as LLM.chat takes it, and as
    HF's chat template takes it (the image as {"type": "image"})."""
    turns = [
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Hi! How can I help?"},
    ]
    text = {"type": "text", "text": "And this?"}
    return (
        [*turns, {"role": "user", "content": [image_part, text]}],
        [*turns, {"role": "user", "content": [{"type": "image"}, text]}],
    )


def _assert_nothing_held(llm: LLM) -> None:
    kv = llm.engine_core.scheduler.kv
    kv.check_invariants()
    assert kv.num_free_blocks == kv.pool.num_usable_blocks


def test_batched_images_and_text_equal_hf(tiny_llava_dir: Path, hf, images) -> None:
    expected = [_hf_tokens(hf, PROMPT, [image]) for image in images]
    text = "USER: Tell me a story.\nASSISTANT:"
    expected_text = _hf_tokens(hf, text, None)
    assert len({tuple(e) for e in expected}) == 3  # the image changes the answer
    llm = LLM(str(tiny_llava_dir), kv_cache_memory_gb=0.05)
    llm.step_hook = llm.engine_core.check_invariants
    prompts = [*map(_image_prompt, images), text]
    assert _tokens(llm, prompts) == [*expected, expected_text]
    assert _tokens(llm, prompts[::-1]) == [expected_text, *expected[::-1]]
    two = "USER: <image>\n<image>\nHow do they differ?\nASSISTANT:"
    both = {"prompt": two, "multi_modal_data": {"image": images[:2]}}
    assert _tokens(llm, [both]) == [_hf_tokens(hf, two, images[:2])]
    _assert_nothing_held(llm)


def test_chunked_and_preempted_prompts_encode_each_image_once(
    tiny_llava_dir: Path, hf, images
) -> None:
    """Steps of 8 tokens split every image's 16 rows across three chunks; a KV cache too
    small for all of them preempts and resumes requests. Tokens stay HF's, and each image
    is encoded once."""
    expected = [_hf_tokens(hf, PROMPT, [image], 40) for image in images]
    llm = LLM(
        str(tiny_llava_dir),
        max_num_batched_tokens=8,
        block_size=4,
        num_kv_blocks=36,
        max_model_len=128,
    )
    llm.step_hook = llm.engine_core.check_invariants
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs = llm.generate(list(map(_image_prompt, images)), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert llm.engine_core.scheduler.num_preemptions > 0
    assert llm.engine_core.runner.images.encoder_cache.num_encoded == len(images)
    _assert_nothing_held(llm)


def test_prefix_cache_reuses_kv_only_for_the_same_image(tiny_llava_dir: Path, hf, images) -> None:
    llm = LLM(str(tiny_llava_dir), block_size=4, kv_cache_memory_gb=0.05)
    system = "SYSTEM: You describe pictures carefully and in detail.\n"
    prompt = f"{system}{PROMPT}"
    first = llm.generate(_image_prompt(images[0], prompt), GREEDY, use_tqdm=False)[0]
    again = llm.generate(_image_prompt(images[0], prompt), GREEDY, use_tqdm=False)[0]
    other = llm.generate(_image_prompt(images[1], prompt), GREEDY, use_tqdm=False)[0]
    before_image = len(llm.get_tokenizer().encode(system + "USER: "))
    assert again.num_cached_tokens >= len(first.prompt_token_ids) - 4
    assert 0 < other.num_cached_tokens <= before_image  # the shared text only, not the image
    assert other.outputs[0].token_ids == _hf_tokens(hf, prompt, [images[1]])
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    _assert_nothing_held(llm)


def test_what_image_prompts_refuse(tiny_llava_dir: Path, tiny_chat_dir: Path, images) -> None:
    llm = LLM(str(tiny_llava_dir), limit_mm_per_prompt={"image": 2}, kv_cache_memory_gb=0.05)
    with pytest.raises(ValueError, match="1 image placeholders .* for 2 images"):
        llm.generate({"prompt": PROMPT, "multi_modal_data": {"image": images[:2]}}, GREEDY)
    with pytest.raises(ValueError, match="3 images in one prompt, more than the 2 allowed"):
        llm.generate({"prompt": PROMPT * 3, "multi_modal_data": {"image": images}}, GREEDY)
    text = LLM(str(tiny_chat_dir), kv_cache_memory_gb=0.05)
    with pytest.raises(ValueError, match="takes no images"):
        text.generate(_image_prompt(images[0]), GREEDY)


def test_an_image_in_a_later_turn_through_chat(tiny_llava_dir: Path, hf, images) -> None:
    """LLM.chat with image parts (a PIL image, and a data: URL) in the second user turn gives
    HF's tokens on the prompt HF's processor builds from the same template."""
    import base64

    buffer = io.BytesIO()
    images[1].save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    llm = LLM(str(tiny_llava_dir), kv_cache_memory_gb=0.05)
    _, processor = hf
    for image_part in (
        {"type": "image_pil", "image_pil": images[1]},
        {"type": "image_url", "image_url": {"url": data_url}},
    ):
        conversation, hf_conversation = later_turn(image_part)
        out = llm.chat(conversation, GREEDY, use_tqdm=False)[0]
        prompt = processor.apply_chat_template(hf_conversation, add_generation_prompt=True)
        assert out.outputs[0].token_ids == _hf_tokens(hf, prompt, [images[1]])
        assert llm.get_tokenizer().decode(out.prompt_token_ids).startswith("USER: Hello there.")


def test_aborted_requests_let_go_of_their_images(tiny_llava_dir: Path, images) -> None:
    """Requests aborted halfway through their images hold no image (nor KV block) after; the
    encoder cache keeps within its budget what nobody holds."""
    from lmserve.engine.messages import EngineCoreRequest

    llm = LLM(str(tiny_llava_dir), max_num_batched_tokens=8, kv_cache_memory_gb=0.05)
    core = llm.engine_core
    processor = llm.input_processor
    for round_ in range(5):
        req_ids = []
        for i, image in enumerate(images):
            prompt = processor.tokenize_prompt(_image_prompt(image))
            request = processor.make_request(f"r{round_}-{i}", prompt, GREEDY)
            assert isinstance(request, EngineCoreRequest)
            core.add_request(request)
            req_ids.append(request.req_id)
        for _ in range(3):  # into the first image's rows
            core.step()
            core.check_invariants()
        core.abort_requests(req_ids[::2])
        while core.has_unfinished_requests():
            core.step()
            core.check_invariants()
    assert not core.runner.images.holders and not core.runner.images.encoder_cache.holders
    assert core.runner.images.encoder_cache.num_rows <= core.runner.images.encoder_cache.budget_rows
    _assert_nothing_held(llm)
