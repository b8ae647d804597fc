"""Streaming snapshots from the output processor: UTF-8 is never split, stop strings are held
back until they are ruled out."""

from __future__ import annotations

from lmserve import SamplingParams
from lmserve.engine.messages import EngineCoreOutput, FinishReason
from lmserve.engine.output_processor import OutputProcessor


def feed(processor: OutputProcessor, token_ids: list[int], last_reason: FinishReason | None = None):
    snapshots = []
    for i, token_id in enumerate(token_ids):
        reason = last_reason if i == len(token_ids) - 1 else None
        out = EngineCoreOutput("r", [token_id], reason)
        outputs, _ = processor.process([out], snapshots=True)
        snapshots += outputs
    return snapshots


def test_multibyte_characters_are_never_split(smollm2_llm) -> None:
    tokenizer = smollm2_llm.get_tokenizer()
    text = " 日本語 🎉!"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # some characters span several byte tokens
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, tokenizer.encode("Hi"), SamplingParams(max_tokens=50), ["r"])
    snapshots = feed(processor, ids, last_reason=FinishReason.LENGTH)
    texts = [s.outputs[0].text for s in snapshots]
    assert all("\ufffd" not in t for t in texts)
    assert all(texts[-1].startswith(t) for t in texts)
    assert texts[-1] == text


def test_possible_stop_string_is_held_back(smollm2_llm) -> None:
    tokenizer = smollm2_llm.get_tokenizer()
    ids = tokenizer.encode(" the end of the story", add_special_tokens=False)
    processor = OutputProcessor(tokenizer)
    params = SamplingParams(max_tokens=50, stop=["the story"])
    processor.add_request("r", None, tokenizer.encode("Hi"), params, ["r"])
    snapshots = []
    to_abort = []
    for token_id in ids:
        outputs, abort = processor.process([EngineCoreOutput("r", [token_id])], True)
        snapshots += outputs
        to_abort += abort
    texts = [s.outputs[0].text for s in snapshots]
    assert to_abort == ["r"] and snapshots[-1].finished
    assert texts[-1] == " the end of "
    assert all(texts[-1].startswith(t) for t in texts)  # nothing streamed was taken back


def test_a_prompt_ending_inside_a_character_keeps_its_text_out_of_the_output(smollm2_llm) -> None:
    """Random or cut prompts can end on part of a character's bytes: the output holds only
    the generated tokens' text, and a token that redraws the prompt's tail is not an error."""
    tokenizer = smollm2_llm.get_tokenizer()
    ids = tokenizer.encode("Say 日本語 🎉", add_special_tokens=False)
    cut = max(k for k in range(1, len(ids)) if "\ufffd" in tokenizer.decode(ids[:k]))
    prompt = ids[:cut]  # ends on part of the emoji's bytes
    generated = tokenizer.encode(" ok\n", add_special_tokens=False) + ids[cut:]
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, prompt, SamplingParams(max_tokens=50), ["r"])
    snapshots = feed(processor, generated, last_reason=FinishReason.LENGTH)
    text = snapshots[-1].outputs[0].text
    assert text.startswith(" ok\n") and "Say" not in text
