"""An incremental JSON reader that knows, at every character, how much of what it has read can
be closed into valid JSON, so arguments can be streamed raw and never taken back."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Reader states.
_VALUE = 0  # expecting a value
_OBJECT_FIRST = 1  # after "{": a key or "}"
_OBJECT_KEY = 2  # after ",": a key
_COLON = 3
_AFTER_VALUE = 4  # "," or the container's closer
_ARRAY_FIRST = 5  # after "[": a value or "]"
_STRING = 6  # in a string's plain text
_ESCAPE = 7  # after a backslash
_UNICODE = 8  # in the hex digits of \uXXXX
_NUMBER = 9
_LITERAL = 10  # true, false, null

# States at which the text read so far, plus `closers()`, is valid JSON.
_CLOSABLE = frozenset({_OBJECT_FIRST, _ARRAY_FIRST, _AFTER_VALUE})

_WHITESPACE = " \t\n\r"
_PLAIN_CHARS = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_NUMBER_TEXT = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_LITERALS = ("true", "false", "null")
_SIMPLE_ESCAPES = frozenset('"\\/bfnrt')
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}


@dataclass(slots=True)
class Member:
    """A member of the top-level object: where its value lies in `JsonScanner.text`."""

    key: str
    start: int
    end: int | None = None  # None until the value is complete


class JsonScanner:
    """Reads one JSON value from pieces of text, stopping at its end or at the first character
    that cannot continue it.

    `text` is what was read, except that raw control characters inside strings (a model writing
    a literal newline into code) are written as escapes, so the text stays valid JSON.
    """

    def __init__(self) -> None:
        self.text = ""
        self.closable_end = 0  # text[:closable_end] + closers() is valid JSON
        self.done = False
        self.failed = False
        self.members: list[Member] = []
        self._stack: list[str] = []  # the closers of the open containers, outermost first
        self._state = _VALUE
        self._in_key = False
        self._token = ""  # the key (as written), number or literal being read
        self._key = ""  # the last complete key of the top-level object
        self._num_hex = 0
        self._closable_in_string = False

    def closers(self, depth: int = 0) -> str:
        """What closes `text[:closable_end]`, for the containers from `depth` inward.

        NOTE: containers open and close only at closable states, so the stack now is the stack
        at `closable_end`.
        """
        quote = '"' if self._closable_in_string else ""
        return quote + "".join(reversed(self._stack[depth:]))

    def push(self, chunk: str) -> int:
        """Read from `chunk` and return how many characters were consumed: all of them unless
        the value ended (`done`) or a character could not continue it (`failed`)."""
        out: list[str] = []
        size = len(self.text)
        i = 0
        while i < len(chunk) and not (self.done or self.failed):
            if self._state == _STRING:
                run = _PLAIN_CHARS.match(chunk, i)
                step = (run.group(), run.end() - i) if run else self._string_char(chunk[i], size)
            else:
                step = self._char(chunk[i], size)
            if step is None:
                self.failed = True
                break
            piece, num_read = step
            if self._in_key and self._state in (_STRING, _ESCAPE, _UNICODE):
                self._token += piece
            out.append(piece)
            size += len(piece)
            i += num_read
            in_value_string = self._state == _STRING and not self._in_key
            if in_value_string or self._state in _CLOSABLE:
                self.closable_end = size
                self._closable_in_string = in_value_string
        self.text += "".join(out)
        return i

    def _string_char(self, c: str, size: int) -> tuple[str, int]:
        """A quote, backslash or control character in a string."""
        if c == '"':
            if self._in_key:
                self._key = json.loads(self._token + '"')  # the token has the opening quote
                self._state = _COLON
            else:
                self._value_done(size + 1)
        elif c == "\\":
            self._state = _ESCAPE
        else:
            return _CONTROL_ESCAPES.get(c) or f"\\u{ord(c):04x}", 1
        return c, 1

    def _char(self, c: str, size: int) -> tuple[str, int] | None:
        """One character outside a string's plain text: (what to append, characters consumed),
        or None when it cannot come here."""
        state = self._state
        if state == _ESCAPE:
            if c == "u":
                self._state, self._num_hex = _UNICODE, 4
            elif c in _SIMPLE_ESCAPES:
                self._state = _STRING
            else:
                return None
        elif state == _UNICODE:
            if c not in _HEX_DIGITS:
                return None
            self._num_hex -= 1
            if self._num_hex == 0:
                self._state = _STRING
        elif state == _NUMBER:
            if c not in _NUMBER_CHARS:
                if not _NUMBER_TEXT.fullmatch(self._token):
                    return None
                self._value_done(size)
                return "", 0  # `c` is read again after the number
            self._token += c
        elif state == _LITERAL:
            self._token += c
            if not any(word.startswith(self._token) for word in _LITERALS):
                return None
            if self._token in _LITERALS:
                self._value_done(size + 1)
        elif c not in _WHITESPACE and not self._structural(c, size):
            return None
        return c, 1

    def _structural(self, c: str, size: int) -> bool:
        """Handle a non-whitespace character outside strings, numbers and literals; False when
        it cannot come here."""
        state = self._state
        if state == _ARRAY_FIRST and c != "]":
            state = self._state = _VALUE
        if state == _VALUE:
            is_member = self._stack == ["}"]
            if c == "{" or c == "[":
                self._stack.append("}" if c == "{" else "]")
                self._state = _OBJECT_FIRST if c == "{" else _ARRAY_FIRST
            elif c == '"':
                self._state, self._in_key = _STRING, False
            elif c in "-0123456789":
                self._state, self._token = _NUMBER, c
            elif c in "tfn":
                self._state, self._token = _LITERAL, c
            else:
                return False
            if is_member:
                self.members.append(Member(self._key, size))
            return True
        if state in (_OBJECT_FIRST, _OBJECT_KEY) and c == '"':
            self._state, self._in_key, self._token = _STRING, True, ""
        elif state == _COLON and c == ":":
            self._state = _VALUE
        elif state in (_OBJECT_FIRST, _ARRAY_FIRST, _AFTER_VALUE) and c == self._stack[-1]:
            self._stack.pop()
            self._value_done(size + 1)
        elif state == _AFTER_VALUE and c == ",":
            self._state = _OBJECT_KEY if self._stack[-1] == "}" else _VALUE
        else:
            return False
        return True

    def _value_done(self, end: int) -> None:
        """A value just ended at `end`: note it if it is a top-level member's."""
        self._state = _AFTER_VALUE
        if not self._stack:
            self.done = True
        elif self._stack == ["}"] and self.members:
            self.members[-1].end = end
