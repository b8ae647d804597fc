from __future__ import annotations

import json
import random
from typing import Any

import pytest

from lmserve.api.tool_parsers.json_scanner import JsonScanner

KEYS = ["a", 'k"', "ü"]


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([0, -2.5, 1e21, True, False, None, 'q"b\\s/\n\té😀', "", "}{]["])
    if roll < 0.65:
        return {rng.choice(KEYS) + str(i): _random_value(rng, depth + 1) for i in range(3)}
    return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


@pytest.mark.parametrize("seed", range(20))
def test_every_prefix_closes_into_json(seed: int) -> None:
    """Read a char at a time, the closable prefix plus `closers()` is always valid JSON, and the
    whole read text is the value with its members located."""
    rng = random.Random(seed)
    value = {"x": _random_value(rng), "y": 1}
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
    scanner = JsonScanner()
    closable_ends = []
    for char in text:
        assert scanner.push(char) == 1
        json.loads(scanner.text[: scanner.closable_end] + scanner.closers())
        closable_ends.append(scanner.closable_end)
    assert closable_ends == sorted(closable_ends)
    assert scanner.done and json.loads(scanner.text) == value
    assert [m.key for m in scanner.members] == ["x", "y"]
    first = scanner.members[0]
    assert first.end is not None
    assert json.loads(scanner.text[first.start : first.end]) == value["x"]


def test_stops_after_the_value() -> None:
    scanner = JsonScanner()
    assert scanner.push('{"a": [1, 2]} tail') == len('{"a": [1, 2]}')
    assert scanner.done and not scanner.failed


@pytest.mark.parametrize(
    ("text", "num_read", "closed"),
    [
        ('{"a": 1.}', 8, "{}"),
        ('{"a": tru }', 9, "{}"),
        ('{"a" 1}', 5, "{}"),
        ('{"a": 01}', 8, "{}"),
        ("[1,]", 3, "[1]"),
        ('{"a": "x\\q"}', 9, '{"a": "x"}'),
        ('{"a": "b", }', 11, '{"a": "b"}'),
    ],
)
def test_fails_at_the_first_bad_character(text: str, num_read: int, closed: str) -> None:
    scanner = JsonScanner()
    assert scanner.push(text) == num_read
    assert scanner.failed
    assert scanner.text[: scanner.closable_end] + scanner.closers() == closed


def test_raw_control_characters_in_strings_become_escapes() -> None:
    scanner = JsonScanner()
    scanner.push('{"a\tb": "x\ny\x01"}')
    assert scanner.text == '{"a\\tb": "x\\ny\\u0001"}'
    assert json.loads(scanner.text) == {"a\tb": "x\ny\x01"}
    assert scanner.members[0].key == "a\tb"
