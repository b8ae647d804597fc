"""What a request body may hold: each case is refused naming the field, before validation."""

from __future__ import annotations

import pytest

from lmserve.api import body
from lmserve.api.errors import APIError


@pytest.mark.parametrize(
    ("raw", "param", "says"),
    [
        (b'{"messages": [{"content": "a\\ud800"}]}', "messages.0.content", "surrogate"),
        (b'{"tools": {"\\udfff": 1}}', "tools", "key holding a lone UTF-16 surrogate"),
        (b'{"seed": 18446744073709551616}', "seed", "beyond 64 bits"),
        (b'{"prompt": [1, 2, 9223372036854775808]}', "prompt", "beyond 64 bits"),
        (b'{"prompt": [[1], [-9223372036854775809]]}', "prompt.1", "beyond 64 bits"),
        (b'{"temperature": NaN}', None, "not valid JSON: NaN is not a JSON value"),
        (b'{"temperature": 1e999}', "temperature", "not a finite number"),
        (b'{"a": ' + b"[" * 100 + b"]" * 100 + b"}", "a" + ".0" * 63, "nested more than 64"),
        (b"[" * 5000 + b"]" * 5000, None, "nested more than 64"),
        (b'{"a": "\xff"}', None, "not valid UTF-8 (byte 7)"),
        (b'{"a": ', None, "not valid JSON"),
    ],
)
def test_what_cannot_be_represented_is_a_400_naming_the_field(
    raw: bytes, param: str | None, says: str
) -> None:
    with pytest.raises(APIError) as caught:
        body.parse(raw)
    assert caught.value.status == 400 and caught.value.param == param
    assert says in caught.value.message


def test_what_can_be_represented_passes_as_parsed() -> None:
    raw = (
        b'{"prompt": [0, 9223372036854775807, -9223372036854775808], "text": "caf\\u00e9 \\ud83d'
        b'\\ude00", "n": 1.5, "ok": true, "deep": ' + b"[" * 63 + b"]" * 63 + b"}"
    )
    parsed = body.parse(raw)
    assert parsed["prompt"][1] == 2**63 - 1 and parsed["text"] == "café \U0001f600"
