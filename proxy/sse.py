"""Incremental server-sent-events parsing and writing.

The parser is fed whatever byte chunks the network delivers and yields complete
events; it keeps each event's original bytes so an unchanged event is written
back exactly as the upstream sent it.
"""

from __future__ import annotations

from typing import Any, Iterator

import orjson


class JSONTooDeep(TypeError):
    """JSON nested deeper than even the standard library's encoder writes (about 990 levels)."""


def dump_json(obj: Any) -> bytes:
    """``orjson.dumps``; past its depth of 254 levels (``orjson.loads``, vLLM's parser and OpenAI take
    1024), the standard library's encoder, so a body or an event a plugin changed is written as deep as
    it came. Anything else orjson refuses (a value that is not JSON) raises as before."""
    try:
        return orjson.dumps(obj)
    except TypeError as e:
        if "ecursion" not in str(e):
            raise
    import json

    try:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except RecursionError:
        raise JSONTooDeep("JSON nested too deep to write") from None

_UNSET: Any = object()
DONE_DATA = "[DONE]"


class Event:
    """One SSE event. ``data`` is the text of its ``data:`` lines joined by newlines.

    ``json`` parses ``data`` lazily; assigning ``event.json`` or ``event.data``
    marks the event changed, and it is then re-serialised on output. Unchanged
    events are written as the original bytes.
    """

    __slots__ = ("_raw", "_data", "_json", "event", "id", "retry", "comments")

    def __init__(
        self,
        data: str | None = None,
        *,
        json: Any = _UNSET,
        event: str | None = None,
        id: str | None = None,
        retry: int | None = None,
        raw: bytes | None = None,
    ) -> None:
        self._raw = raw
        self._data = data
        self._json = json
        self.event = event
        self.id = id
        self.retry = retry
        self.comments: list[str] | None = None
        if data is None and json is _UNSET and raw is None:
            raise ValueError("an Event needs data, json or raw bytes")

    @classmethod
    def from_json(cls, obj: Any, **kw: Any) -> Event:
        return cls(json=obj, **kw)

    @property
    def data(self) -> str:
        if self._data is None:
            if self._json is not _UNSET:
                self._data = dump_json(self._json).decode()
            else:
                self._data = ""
        return self._data

    @data.setter
    def data(self, value: str) -> None:
        self._data = value
        self._json = _UNSET
        self._raw = None

    @property
    def is_done(self) -> bool:
        return self.data == DONE_DATA

    @property
    def json(self) -> Any:
        """The parsed JSON of ``data``; ``None`` when it is not JSON."""
        if self._json is _UNSET:
            try:
                self._json = orjson.loads(self.data)
            except orjson.JSONDecodeError:
                self._json = None
        return self._json

    @json.setter
    def json(self, value: Any) -> None:
        self._json = value
        self._data = None
        self._raw = None

    def changed(self) -> None:
        """Call after mutating ``event.json`` in place, so it is serialised again."""
        if self._json is not _UNSET:
            self._data = None
        self._raw = None

    def encode(self) -> bytes:
        if self._raw is not None:
            return self._raw
        parts: list[bytes] = []
        if self.comments:
            parts.extend(b":" + c.encode() + b"\n" for c in self.comments)
        if self.event is not None:
            parts.append(b"event: " + self.event.encode() + b"\n")
        if self.id is not None:
            parts.append(b"id: " + self.id.encode() + b"\n")
        if self.retry is not None:
            parts.append(b"retry: " + str(self.retry).encode() + b"\n")
        if self._data is None and self._json is not _UNSET:
            parts.append(b"data: " + dump_json(self._json) + b"\n")
        else:
            for line in self.data.split("\n"):
                parts.append(b"data: " + line.encode() + b"\n")
        parts.append(b"\n")
        self._raw = b"".join(parts)
        return self._raw

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Event(event={self.event!r}, data={self.data[:60]!r})"


def _split_lines(block: bytes) -> list[bytes]:
    return block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")


def parse_block(block: bytes) -> Event | None:
    """Parse one event block (its lines, without the blank separator line)."""
    if block[:6] == b"data: " and b"\n" not in block and b"\r" not in block:
        return Event(block[6:].decode("utf-8", "replace"))  # the usual block: one data line
    data_lines: list[str] = []
    event = id_ = None
    retry = None
    comments: list[str] = []
    for line in _split_lines(block):
        if not line:
            continue
        if line.startswith(b":"):
            comments.append(line[1:].decode("utf-8", "replace"))
            continue
        name, sep, value = line.partition(b":")
        if sep and value.startswith(b" "):
            value = value[1:]
        text = value.decode("utf-8", "replace")
        if name == b"data":
            data_lines.append(text)
        elif name == b"event":
            event = text
        elif name == b"id":
            id_ = text
        elif name == b"retry" and text.isdigit():
            retry = int(text)
    if not data_lines and event is None and not comments and id_ is None and retry is None:
        return None  # nothing a client reads (blank lines, unknown fields)
    ev = Event("\n".join(data_lines), event=event, id=id_, retry=retry)
    if comments:
        ev.comments = comments
    return ev


def find_boundary(buf: bytes | bytearray, start: int = 0) -> tuple[int, int]:
    """Index and length of the first blank-line separator at or after ``start``, or (-1, 0)."""
    i = buf.find(b"\n\n", start)
    j = buf.find(b"\r\n\r\n", start)
    if j != -1 and (i == -1 or j < i):
        return j, 4
    if i != -1:
        # a lone "\r\n\n" or "\n\r\n" mix is rare; treat "\n\n" as the separator
        return i, 2
    k = buf.find(b"\r\r", start)
    if k != -1:
        return k, 2
    return -1, 0


class Parser:
    """Feed bytes, get complete events (each with its original bytes)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, chunk: bytes) -> Iterator[Event]:
        buf = self._buf
        if not buf and b"\r" not in chunk:
            # the usual read: whole events separated by blank lines, nothing carried over
            parts = chunk.split(b"\n\n")
            tail = parts.pop()
            for part in parts:
                ev = parse_block(part)
                if ev is not None:
                    ev._raw = part + b"\n\n"
                    yield ev
            if tail:
                buf += tail
            return
        buf += chunk
        pos = 0
        while True:
            idx, sep = find_boundary(buf, pos)
            if idx == -1:
                break
            end = idx + sep
            raw = bytes(buf[pos:end])
            ev = parse_block(raw[:idx - pos])
            pos = end
            if ev is not None:
                ev._raw = raw
                yield ev
        if pos:
            del buf[:pos]

    def close(self) -> Iterator[Event]:
        """The stream ended: an unterminated last event still counts."""
        if self._buf.strip():
            raw = bytes(self._buf)
            self._buf.clear()
            ev = parse_block(raw)
            if ev is not None:
                yield ev
        else:
            self._buf.clear()

    @property
    def pending(self) -> int:
        return len(self._buf)


DONE = Event(DONE_DATA, raw=b"data: [DONE]\n\n")
