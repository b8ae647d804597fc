"""Structured outputs through `lmserve serve` and the openai client, on the bundled SmolLM2:
every constraint form, streaming and not, with n = 3; each output obeys its constraint."""

from __future__ import annotations

import ast
import asyncio
import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from transformers import AutoTokenizer

from tests.api.conftest import Server, start_server, stop_server

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
STR = {"type": "string", "maxLength": 16}
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"name": STR, "age": {"type": "integer", "minimum": 0,
     "maximum": 120}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"name": STR,
     "address": {"type": "object", "properties": {"city": STR, "zip": {"type": "string",
     "pattern": "^[0-9]{5}$"}}, "required": ["city", "zip"]}}, "required": ["name", "address"]}},
     "required": ["person"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100}, "minItems": 1,
     "maxItems": 5},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
     "required": ["color"]},
    {"type": "object", "properties": {"active": {"type": "boolean"}, "note": {"type": "null"}},
     "required": ["active", "note"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["price"]},
    {"type": "object", "$defs": {"point": {"type": "object", "properties": {"x": DIGIT, "y": DIGIT},
     "required": ["x", "y"]}}, "properties": {"start": {"$ref": "#/$defs/point"},
     "end": {"$ref": "#/$defs/point"}}, "required": ["start", "end"]},
    {"type": "object", "properties": {"value": {"anyOf": [DIGIT, {"type": "string",
     "maxLength": 5}]}}, "required": ["value"]},
    {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {"id": DIGIT,
     "label": STR}, "required": ["id", "label"]}},
    {"type": "object", "properties": {"version": {"const": "1.0"}, "ok": {"type": "boolean"}},
     "required": ["version", "ok"]},
    {"type": "object", "properties": {"when": {"type": "string", "format": "date"}},
     "required": ["when"]},
    {"type": "object", "properties": {"a": STR, "b": DIGIT}, "required": ["a"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
     "required": ["code"]},
    {"type": "array", "items": {"enum": ["x", "y", "z"]}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
     "type": "array", "maxItems": 2, "items": DIGIT}}}, "required": ["matrix"]},
    {"type": "object", "properties": {"shape": {"anyOf": [
        {"type": "object", "properties": {"kind": {"const": "circle"}, "r": DIGIT},
         "required": ["kind", "r"]},
        {"type": "object", "properties": {"kind": {"const": "square"}, "side": DIGIT},
         "required": ["kind", "side"]}]}}, "required": ["shape"]},
    {"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0,
     "exclusiveMaximum": 10}}, "required": ["n"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8}},
     "required": ["word"]},
    {"type": "object", "properties": {"v": {"type": ["integer", "null"], "minimum": 0,
     "maximum": 9}}, "required": ["v"]},
    {"title": "Color", "type": "object", "properties": {"name": {"title": "Name", "type": "string",
     "maxLength": 16}, "hex": {"title": "Hex", "type": "string", "pattern": "^#[0-9a-f]{6}$"}},
     "required": ["name", "hex"]},
]  # fmt: skip

REGEXES = {
    "ipv4": r"(25[0-5]|2[0-4]\d|1?\d?\d)(\.(25[0-5]|2[0-4]\d|1?\d?\d)){3}",
    "date": r"(19|20)\d\d-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "email": r"[a-z]{1,10}@[a-z]{1,10}\.(com|org|net)",
}
ARITHMETIC = """root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor ("*" factor){0,2}
factor ::= [1-9] | "(" expr ")"
"""
SELECT = 'root ::= "SELECT " col (", " col){0,2} " FROM " col\ncol ::= [a-z]{1,8}\n'


def constraint_body(i: int, schema: dict[str, Any]) -> dict[str, Any]:
    """Every way a client can ask for a JSON schema, in turn."""
    forms = [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                                    "strict": True}}},
        {"response_format": {"type": "json_schema", "json_schema": schema}},  # the seeds' form
        {"guided_json": schema},
        {"structured_outputs": {"json": schema}},
    ]  # fmt: skip
    return forms[i % len(forms)]


CITY = {"enum": ["Paris", "Rome"]}
CITY_TAG = json.dumps({"type": "structural_tag", "format": {
    "type": "tag", "begin": "<city>", "content": {"type": "json_schema", "json_schema": CITY},
    "end": "</city>"}})  # fmt: skip


@pytest.fixture(scope="module")
def server(smollm2_dir) -> Iterator[Server]:
    server = start_server("--max-model-len", "1024", "--kv-cache-memory-gb", "0.5")
    yield server
    stop_server(server)


def complete_texts(server: Server, bodies: list[dict[str, Any]], path: str) -> list[list[str]]:
    """Run all requests at once (so they batch), streaming or not; each choice's text."""

    async def one(client: openai.AsyncOpenAI, body: dict[str, Any]) -> list[str]:
        body = {"model": MODEL, "max_tokens": 200, "temperature": 0.8, "n": 3, **body}
        known = {"model", "messages", "prompt", "max_tokens", "temperature", "n", "stream",
                 "response_format", "seed"}  # fmt: skip
        extra = {k: body.pop(k) for k in list(body) if k not in known}
        create = client.chat.completions.create if path == "chat" else client.completions.create
        if not body.get("stream"):
            reply = await create(**body, extra_body=extra)
            assert all(c.finish_reason == "stop" for c in reply.choices), reply
            if path == "chat":
                return [c.message.content for c in reply.choices]
            return [c.text for c in reply.choices]
        texts = [""] * body["n"]
        finished = [None] * body["n"]
        async for chunk in await create(**body, extra_body=extra):
            for c in chunk.choices:
                piece = c.delta.content if path == "chat" else c.text
                texts[c.index] += piece or ""
                finished[c.index] = c.finish_reason or finished[c.index]
        assert finished == ["stop"] * body["n"]
        return texts

    async def run() -> list[list[str]]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="x") as client:
            return await asyncio.gather(*(one(client, b) for b in bodies))

    return asyncio.run(run())


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_twenty_json_schemas_validate(server: Server, stream: bool) -> None:
    bodies = [
        {
            "messages": chat("Reply with JSON for this schema: " + json.dumps(schema)),
            "seed": i,
            "stream": stream,
            **constraint_body(i + stream, schema),
        }
        for i, schema in enumerate(SCHEMAS)
    ]
    for schema, texts in zip(SCHEMAS, complete_texts(server, bodies, "chat"), strict=True):
        assert len(texts) == 3
        for text in texts:
            jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_regex_choice_and_grammar_constraints_hold(server: Server, stream: bool) -> None:
    regex_bodies = [
        {"prompt": f"An example {name}: ", "guided_regex": pattern, "stream": stream}
        for name, pattern in REGEXES.items()
    ]
    for pattern, texts in zip(
        REGEXES.values(), complete_texts(server, regex_bodies, "completions"), strict=True
    ):
        assert all(re.fullmatch(pattern, t) for t in texts), texts
    options = ["Paris", "Berlin", "Madrid", "not sure"]
    chat_bodies = [
        {"messages": chat("Capital of France?"), "guided_choice": options, "stream": stream},
        {"messages": chat("Pick a city"), "structured_outputs": {"choice": options},
         "stream": stream},
        {"messages": chat("Write a sum."), "guided_grammar": ARITHMETIC, "stream": stream},
        {"messages": chat("Write SQL."), "structured_outputs": {"grammar": SELECT},
         "stream": stream},
    ]  # fmt: skip
    choice_a, choice_b, sums, selects = complete_texts(server, chat_bodies, "chat")
    assert all(t in options for t in choice_a + choice_b)
    for text in sums:
        tree = ast.parse(text, mode="eval")  # parses as an arithmetic expression
        allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult)
        assert all(isinstance(node, allowed) for node in ast.walk(tree)), text
    select = re.compile(r"SELECT [a-z]{1,8}(, [a-z]{1,8}){0,2} FROM [a-z]{1,8}")
    assert all(select.fullmatch(t) for t in selects), selects


def test_json_object_and_text_formats(server: Server) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "You are a helpful assistant that outputs JSON."},
            {"role": "user", "content": "List three colors in JSON format"},
        ],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=400,
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)
    compact = client.chat.completions.create(
        model=MODEL,
        messages=chat("Describe a cat as JSON."),
        max_tokens=200,
        temperature=0,
        extra_body={"guided_json": SCHEMAS[0], "guided_whitespace_pattern": "[ ]?"},
    )
    text = compact.choices[0].message.content
    assert "\n" not in text and "  " not in text  # the pattern replaced the default whitespace
    jsonschema.validate(json.loads(text), SCHEMAS[0])
    plain = client.chat.completions.create(
        model=MODEL, messages=chat("Hi"), response_format={"type": "text"}, max_tokens=4
    )
    assert plain.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"guided_regex": "[a-"}, "regex"),
        ({"guided_json": {"type": "array", "uniqueItems": True}}, "uniqueItems"),
        ({"guided_grammar": "root ::= nothing_defined"}, "nothing_defined"),
        ({"guided_json": {"type": "object"}, "guided_regex": "a"}, "more than one"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "more than one",
        ),
        ({"structured_outputs": {"jsn": {}}}, "jsn"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_choice": []}, "non-empty"),
        (
            {"response_format": {"type": "structural_tag", "format": {"type": "nope"}}},
            "Format type not recognized",
        ),
        ({"response_format": {"type": "structural_tag", "structures": [{}]}}, "begin"),
    ],
)
def test_bad_constraints_are_400s(server: Server, body: dict[str, Any], needle: str) -> None:
    for path, base in (
        ("chat/completions", {"messages": chat("x")}),
        ("completions", {"prompt": "x"}),
    ):
        for stream in (False, True):
            response = httpx.post(
                f"{server.url}/v1/{path}", json={**base, **body, "stream": stream}, timeout=60
            )
            assert response.status_code == 400, response.text
            assert needle in response.json()["error"]["message"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_structural_tags_hold_the_tagged_spans(server: Server, smollm2_dir) -> None:
    """xgrammar's structural tag (vLLM's response_format type): with a required tag the whole
    output is the tag; in vLLM's older form, text is free until a trigger, then the tag's
    schema holds until its end."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x")
    tagged = client.chat.completions.create(
        model=MODEL, messages=chat("Which city is the capital of France?"), max_tokens=30,
        temperature=1.0, n=3, response_format=json.loads(CITY_TAG),
    )  # fmt: skip
    for choice in tagged.choices:
        assert choice.message.content in ('<city>"Paris"</city>', '<city>"Rome"</city>')
    # the older form: `<` triggers the tag, so forcing `<` first forces the whole tag
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    (angle,) = tokenizer.encode("<")
    legacy = {"type": "structural_tag", "triggers": ["<"],
              "structures": [{"begin": "<city>", "schema": CITY, "end": "</city>"}]}  # fmt: skip
    reply = client.completions.create(
        model=MODEL, prompt="The capital of France:", max_tokens=30, temperature=1.0, n=3,
        extra_body={"response_format": legacy, "logit_bias": {str(angle): 100},
                    "stop": ["</city>"], "include_stop_str_in_output": True},
    )  # fmt: skip
    for choice in reply.choices:
        assert choice.text in ('<city>"Paris"</city>', '<city>"Rome"</city>'), choice.text
