"""The harmony scanner: events from gpt-oss's output, the same however the text is cut."""

from __future__ import annotations

from itertools import groupby

import pytest

from lmserve.api.harmony import Body, Closed, Event, HarmonyScanner, Header, Loose, Opened

THINK_THEN_CALL = (
    "<|channel|>analysis<|message|>Need the weather.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
    '<|message|>{"city": "Paris"}<|call|>'
)


def scan(pieces: list[str]) -> list[Event]:
    """Events with adjacent text merged, so any two cuttings of one text compare equal."""
    scanner = HarmonyScanner()
    events = [e for piece in pieces for e in scanner.feed(piece)] + scanner.finish()
    merged: list[Event] = []
    for kind, group in groupby(events, key=type):
        items = list(group)
        if kind in (Loose, Body):
            merged.append(kind("".join(e.text for e in items)))
        else:
            merged.extend(items)
    return merged


def test_messages_and_their_headers() -> None:
    assert scan([THINK_THEN_CALL]) == [
        Opened(Header("analysis", None)),
        Body("Need the weather."),
        Closed("<|end|>"),
        Opened(Header("commentary", "functions.get_weather")),
        Body('{"city": "Paris"}'),
        Closed("<|call|>"),
    ]


@pytest.mark.parametrize(
    ("raw", "channel", "recipient", "function", "reasoning"),
    [
        ("assistant<|channel|>final", "final", None, None, False),
        ("<|channel|>analysis", "analysis", None, None, True),
        ("assistant to=functions.add<|channel|>commentary json", "commentary", "functions.add",
         "add", False),
        ("assistant<|channel|>analysis to=browser.search", "analysis", "browser.search", None,
         True),
        ("assistant<|channel|>commentary to=python", "commentary", "python", None, True),
    ],
)  # fmt: skip
def test_headers(raw, channel, recipient, function, reasoning) -> None:
    header = Header.parse(raw)
    assert (header.channel, header.recipient) == (channel, recipient)
    assert header.function == function and header.is_reasoning == reasoning


def test_every_cut_gives_the_same_events() -> None:
    text = "stray " + THINK_THEN_CALL + "<|start|>assistant<|channel|>final<|message|>Done."
    expected = scan([text])
    assert expected[0] == Loose("stray ") and expected[-1] == Closed(None)
    assert scan(list(text)) == expected
    for cut in range(len(text) + 1):
        assert scan([text[:cut], text[cut:]]) == expected


def test_cut_off_and_interrupted_messages() -> None:
    # a header that never reached <|message|> is dropped; a body cut off is closed without a
    # marker, as is one a new message interrupts
    assert scan(["<|channel|>analysis<|message|>Hmm<|start|>assistant<|channel|>fin"]) == [
        Opened(Header("analysis", None)),
        Body("Hmm"),
        Closed(None),
    ]
    assert scan(["a <|message|> b<|end|>c"]) == [Loose("a  bc")]
