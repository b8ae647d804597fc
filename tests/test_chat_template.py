"""The one chat renderer: LLM.chat and the server render a conversation alike."""

from __future__ import annotations

import sys
import time

import pytest

from lmserve import SamplingParams
from lmserve.chat_template import (
    ChatTemplateError,
    detect_content_format,
    image_sources,
    render_chat,
)

FRANCE = "What is the capital of France?"
CALL = {"id": "call_1", "type": "function",
        "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}  # fmt: skip


def test_parts_render_as_the_string_they_join_to(smollm2_llm) -> None:
    tokenizer = smollm2_llm.get_tokenizer()
    as_string = render_chat(tokenizer, [{"role": "user", "content": FRANCE}])
    as_parts = render_chat(
        tokenizer, [{"role": "user", "content": [{"type": "text", "text": FRANCE}]}]
    )
    assert (
        as_parts
        == as_string
        == tokenizer.apply_chat_template(
            [{"role": "user", "content": FRANCE}], tokenize=False, add_generation_prompt=True
        )
    )
    assert detect_content_format(tokenizer.chat_template) == "string"


def test_llm_chat_takes_what_the_server_takes(smollm2_llm) -> None:
    """Content parts, and a past tool call whose arguments come as a JSON string (rendered as a
    mapping, as the server does), work offline too; the tokens follow the same prompt."""
    greedy = SamplingParams(temperature=0, max_tokens=8)
    parts = [{"role": "user", "content": [{"type": "text", "text": FRANCE}]}]
    by_parts = smollm2_llm.chat(parts, greedy, use_tqdm=False)[0]
    by_string = smollm2_llm.chat([{"role": "user", "content": FRANCE}], greedy, use_tqdm=False)[0]
    assert by_parts.outputs[0].token_ids == by_string.outputs[0].token_ids
    assert "Paris" in by_parts.outputs[0].text
    template = (
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.arguments.a }}]{% endfor %}|"
        "{% endfor %}"
    )
    conversation = [{"role": "user", "content": "add"},
                    {"role": "assistant", "content": None, "tool_calls": [CALL]}]  # fmt: skip
    text = render_chat(
        smollm2_llm.get_tokenizer(), conversation, chat_template=template,
        add_generation_prompt=False,
    )  # fmt: skip
    assert text == "user:add|assistant:[1]|"
    out = smollm2_llm.chat(
        conversation, greedy, use_tqdm=False, chat_template=template, add_generation_prompt=False
    )[0]
    assert smollm2_llm.get_tokenizer().decode(out.prompt_token_ids) == text


@pytest.mark.parametrize(
    ("messages", "options", "match"),
    [
        ([{"role": "user", "content": [{"type": "image_url"}]}], {}, "takes no images"),
        ([{"role": "user", "content": [{"type": "input_audio"}]}], {}, "not supported"),
        ([{"role": "user", "content": "x"}], {"continue_final_message": True}, "only one"),
        ([{"role": "user", "content": "x"}], {"chat_template": "{{ raise_exception('no') }}"},
         "cannot render these messages: no"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], {}, "`text`, a string"),
        ([{"role": "user", "content": [{"type": "text"}]}], {}, "`text`, a string"),
        ([{"role": "user", "content": 7}], {}, "a string or a list of content parts"),
        ([{"role": "assistant", "tool_calls": "abc"}], {}, "tool_calls is a list"),
        ([{"role": "assistant", "tool_calls": [{"function": "f"}]}], {}, "tool_calls is a list"),
        ([{"role": "user", "content": "x"}], {"chat_template": "{{ 1 / 0 }}"},
         "cannot render these messages: division by zero"),
        ([{"role": "user", "content": "x"}], {"chat_template": "{% include 'other' %}"},
         "cannot render these messages"),
        ([{"role": "user", "content": "x"}],
         {"chat_template": "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"},
         "cannot render these messages"),
        ([{"role": "user", "content": "x"}], {"chat_template_kwargs": {"tokenize": True}},
         "chat_template_kwargs may not set tokenize"),
    ],
    ids=["image-part", "audio-part", "both-prompt-flags", "template-raises", "text-number", "text-missing",
         "content-number", "tool-calls-string", "function-string", "division-by-zero", "include",
         "recursion", "reserved-kwarg"],
)  # fmt: skip
def test_what_cannot_render_says_why(smollm2_llm, messages, options, match) -> None:
    with pytest.raises(ChatTemplateError, match=match):
        render_chat(smollm2_llm.get_tokenizer(), messages, **options)
    with pytest.raises(ValueError, match=match):  # LLM.chat raises the same
        smollm2_llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False, **options)


def test_a_template_that_loops_is_stopped_in_time(smollm2_llm) -> None:
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="did not finish within 0.2 s"):
        render_chat(
            smollm2_llm.get_tokenizer(),
            [{"role": "user", "content": "x"}],
            chat_template=looping,
            timeout_s=0.2,
        )
    assert time.monotonic() - started < 1.0
    assert sys.gettrace() is None  # the deadline's tracing is gone with it


BOMBS = {
    "repeat": "{{ 'x' * 2000000000 }}",
    "computed-repeat": "{{ 'x' * (1000 * 1000 * 1000) }}",
    "list-repeat": "{{ ['a'] * 100000000 }}",
    "percent-width": "{{ '%9999999999s' % 'x' }}",
    "format-width": "{{ '{:>9999999999}'.format(1) }}",
    "filter-width": "{{ 'x'|center(10**10) }}",
    "method-width": "{{ 'x'.ljust(10000000000) }}",
    "power": "{{ 7 ** 999999 }}",
}


@pytest.mark.parametrize("template", list(BOMBS.values()), ids=list(BOMBS))
def test_a_request_template_cannot_build_a_huge_value(smollm2_llm, template) -> None:
    """Each is one operation that would allocate gigabytes at once: refused before it runs."""
    started = time.monotonic()
    with pytest.raises(ChatTemplateError, match="may build at most|too large"):
        render_chat(
            smollm2_llm.get_tokenizer(),
            [{"role": "user", "content": "x"}],
            chat_template=template,
            timeout_s=0.5,
        )
    assert time.monotonic() - started < 1.0


def test_a_request_template_that_doubles_a_string_is_stopped(smollm2_llm) -> None:
    doubling = (
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s|length }}"
    )
    with pytest.raises(ChatTemplateError, match="did not finish|more than 512 MB"):
        render_chat(
            smollm2_llm.get_tokenizer(),
            [{"role": "user", "content": "x"}],
            chat_template=doubling,
            timeout_s=0.5,
        )


def test_the_bounds_do_not_change_what_a_template_renders(smollm2_llm) -> None:
    tokenizer = smollm2_llm.get_tokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "%s {} 123456789 " * 3},
        {"role": "assistant", "content": "Sure."},
        {"role": "user", "content": "Again."},
    ]
    template = tokenizer.chat_template
    assert render_chat(tokenizer, messages, chat_template=template, timeout_s=2.0) == render_chat(
        tokenizer, messages
    )


def test_image_parts_render_as_the_models_placeholder(smollm2_llm) -> None:
    """A template that loops over parts sees {"type": "image"} where each image stands; one
    that takes a string gets the placeholder text in its place; the images come out in order."""
    tokenizer = smollm2_llm.get_tokenizer()
    content = [
        {"type": "image_url", "image_url": {"url": "http://a/1.png"}},
        {"type": "text", "text": "and"},
        {"type": "input_image", "image_url": "data:image/png;base64,AAAA"},
    ]
    messages = [{"role": "user", "content": content}]
    looping = (
        "{% for m in messages %}{% for p in m['content'] %}"
        "{% if p['type'] == 'image' %}[IMG]{% else %}{{ p['text'] }}{% endif %}"
        "{% endfor %}{% endfor %}"
    )
    text = render_chat(tokenizer, messages, chat_template=looping, image_token="<image>")
    assert text == "[IMG]and[IMG]"
    plain = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    text = render_chat(tokenizer, messages, chat_template=plain, image_token="<image>")
    assert text == "<image>\nand\n<image>"
    assert image_sources(messages) == ["http://a/1.png", "data:image/png;base64,AAAA"]
    with pytest.raises(ChatTemplateError, match="needs its image"):
        image_sources([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
