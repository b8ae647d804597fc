"""One call written as a JSON object, `{"name": "f", "arguments": {...}}` (keys in any order,
other keys ignored, the first of a repeated key counts), read as it streams: the arguments are
the raw text the model wrote for them, with raw control characters in strings escaped."""

from __future__ import annotations

import json
from abc import abstractmethod
from collections.abc import Callable

from lmserve.api.tool_parsers import ToolCallStream
from lmserve.api.tool_parsers.json_scanner import JsonScanner, Member


class JsonCallReader:
    """Commits once the name is complete and the arguments object has begun; after that,
    `take_arguments()` hands out each piece of the arguments as soon as it is certain."""

    def __init__(self, arguments_keys: tuple[str, ...]) -> None:
        self._json = JsonScanner()
        self._arguments_keys = arguments_keys
        self.name: str | None = None
        self._name_member: Member | None = None
        self._arguments: Member | None = None
        self._num_sent = 0  # offset in the scanner's text up to which arguments were handed out

    @property
    def committed(self) -> bool:
        return self.name is not None and self._arguments is not None

    @property
    def done(self) -> bool:
        """The object ended (a call only if `committed`)."""
        return self._json.done

    @property
    def failed(self) -> bool:
        """The text stopped being JSON."""
        return self._json.failed

    def push(self, chunk: str) -> int:
        """Read from `chunk`; returns the characters consumed, as `JsonScanner.push`."""
        num_read = self._json.push(chunk)
        text = self._json.text
        for member in self._json.members:
            if self._name_member is None and member.key == "name":
                self._name_member = member
            elif (
                self._arguments is None
                and member.key in self._arguments_keys
                and text[member.start] == "{"
            ):
                self._arguments = member
        named = self._name_member
        if self.name is None and named is not None and named.end is not None:
            name = json.loads(text[named.start : named.end])
            if isinstance(name, str) and name:
                self.name = name
        return num_read

    def take_arguments(self) -> str:
        """The arguments text not handed out yet that can no longer change."""
        if not self.committed:
            return ""
        assert self._arguments is not None
        start = max(self._num_sent, self._arguments.start)
        end = self._arguments.end
        if end is None:
            end = self._json.closable_end
        self._num_sent = max(self._num_sent, end)
        return self._json.text[start:end]

    def close(self) -> str:
        """The rest of the arguments when the object breaks off before they end: what is
        certain, then what closes it."""
        rest = self.take_arguments()
        assert self._arguments is not None
        if self._arguments.end is None:
            rest += self._json.closers(depth=1)
        return rest


class JsonCallStream(ToolCallStream):
    """A stream whose calls are JSON objects: feeds the open one and sends its name and
    arguments; the format decides what follows a call in `_call_ended`."""

    def __init__(self, new_call_id: Callable[[], str], arguments_keys: tuple[str, ...]) -> None:
        super().__init__(new_call_id)
        self._arguments_keys = arguments_keys
        self._call: JsonCallReader | None = None
        self._block: list[str] = []  # the open block as written, until a call in it commits

    @abstractmethod
    def _call_ended(self, call: JsonCallReader) -> None:
        """`call` is over: complete (`done`), broken (`failed`) or cut off by the output's end.
        A committed call's arguments are already closed."""

    def _open_call(self) -> None:
        self._call = JsonCallReader(self._arguments_keys)

    def _read_call(self, text: str, pos: int) -> int:
        """Feed the open call from `text[pos:]`; returns the new position."""
        call = self._call
        assert call is not None
        was_committed = call.committed
        num_read = call.push(text[pos:])
        if call.committed and not was_committed:
            assert call.name is not None
            self._begin_call(call.name)
            self._block = []
        elif not call.committed:
            self._block.append(text[pos : pos + num_read])
        self._arguments(call.take_arguments())
        if call.done or call.failed:
            self._end_call()
        return pos + num_read

    def _end_call(self) -> None:
        """End the open call (also when the output ends inside it)."""
        call = self._call
        assert call is not None
        self._call = None
        if call.committed and not call.done:
            self._arguments(call.close())
        self._call_ended(call)
