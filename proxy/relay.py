"""The raw stream relay: an upstream's server-sent events to the client's socket, with the usage tap.

A stream costs per event what its reads cost. aiohttp's client hands each decoded
piece of an upstream body to the response's ``StreamReader.feed_data`` (from the
protocol's ``data_received``); the reader wakes the coroutine parked in
``readany()``, which resumes every enclosing coroutine of the handler to write the
piece out. While that coroutine is parked with nothing buffered and the client's
socket keeps up, a :class:`RawRelay` takes complete events straight from
``feed_data`` to the client's transport instead: no future, no task step, no
coroutine resumed per event. Everything else goes the usual way, into the reader's
buffer and through the coroutine: a piece that ends mid-event, the first write
(it carries the response headers), a client whose socket buffer is full (aiohttp's
writer and its drain are the backpressure, and the reader's high-water mark then
pauses the upstream), a closing socket. The coroutine still sees the end of the
body, errors and cancellation as before, so timeouts, client disconnects and the
end of stream are handled in one place.

Only a reader of exactly aiohttp's ``StreamReader`` class is switched to the
tapped subclass (same layout, so ``__class__`` may be assigned) and switched back
when the relay ends; with any other reader, the relay simply never takes a piece.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Callable, Iterator

from aiohttp.http_writer import StreamWriter
from aiohttp.streams import StreamReader

from .context import StreamEnd
from .openai import is_usage_only_chunk, usage_from
from .sse import _UNSET, Event, find_boundary, parse_block

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from .context import Context
    from .timers import Watchdog

#: blocks go to the socket directly only while less than this is waiting in its buffer
WRITE_BUFFER_LOW = 64 * 1024


def _null_usage(block: bytes, k: int) -> int:
    """At ``k``, where ``block`` holds ``"usage"``: the length of a ``:null`` value after it (``: null``
    too), else 0. OpenAI, once a stream is asked for its usage, puts ``"usage":null`` in every
    chunk but the last: nothing to parse there."""
    after = k + 7
    if block.startswith(b":null", after):
        return 5
    if block.startswith(b": null", after):
        return 6
    return 0


def _null_usage_cut(block: bytes, k: int, n: int) -> tuple[int, int]:
    """The bytes to drop for a ``"usage":null`` member at ``k`` (``n`` from :func:`_null_usage`):
    the member and the comma (and blanks) that join it to its neighbour."""
    end = k + 7 + n
    j = k - 1
    while j >= 0 and block[j] in b" \t":
        j -= 1
    if j >= 0 and block[j] == 0x2C:  # ","
        return j, end
    e = end
    while e < len(block) and block[e] in b" \t":
        e += 1
    if e < len(block) and block[e] == 0x2C:
        return k, e + 1
    return k, k  # a lone member: left as it is (``{}`` would be no better)


def _event_at(block: bytes, k: int) -> tuple[int, int]:
    """The span of the ``\\n\\n``-separated event of ``block`` around offset ``k`` (its separator included)."""
    start = block.rfind(b"\n\n", 0, k)
    end = block.find(b"\n\n", k)
    return (0 if start == -1 else start + 2), (len(block) if end == -1 else end + 2)


def _pieces(block: bytes) -> Iterator[bytes]:
    """The events of ``block`` with any of the separators SSE allows, each with its separator."""
    pos = 0
    while pos < len(block):
        idx, sep = find_boundary(block, pos)
        end = len(block) if idx == -1 else idx + sep
        yield block[pos:end]
        pos = end


#: what an event that finishes a choice or refuses holds, in compact JSON and with a blank after the colon
_FINISH, _REFUSAL = b'finish_reason":"', b'"refusal":"'
_FINISH_SPACED, _REFUSAL_SPACED = b'finish_reason": "', b'"refusal": "'
END_MARKS = (_FINISH, _FINISH_SPACED, _REFUSAL, _REFUSAL_SPACED)


def ends(block: bytes) -> bool:
    """Whether ``block`` may hold an event that finishes a choice or carries a refusal (where every
    event of a stream has ``"finish_reason":null``), in compact or spaced JSON."""
    return _FINISH in block or _REFUSAL in block or _FINISH_SPACED in block or _REFUSAL_SPACED in block


def ends_compact(block: bytes) -> bool:
    """:func:`ends` for a stream whose JSON has no blank after a colon (OpenAI's, vLLM's): half the scans,
    each a few hundred nanoseconds on a chunk."""
    return _FINISH in block or _REFUSAL in block


def note_end(ctx: Context, obj: Any) -> None:
    """A stream event's model, id, finish reasons and refusal into ``ctx.stream_end``."""
    if type(obj) is not dict:
        return
    end = ctx.stream_end
    if end is None:
        end = ctx.stream_end = StreamEnd()
    model, rid = obj.get("model"), obj.get("id")
    if type(model) is str and model:
        end.model = model
    if type(rid) is str and rid:
        end.id = rid
    choices = obj.get("choices")
    if type(choices) is list:
        for c in choices:
            if type(c) is not dict:
                continue
            reason = c.get("finish_reason")
            if type(reason) is str:
                i = c.get("index")
                end.reasons[i if type(i) is int else 0] = reason
            delta = c.get("delta")
            if type(delta) is dict and delta.get("refusal"):
                end.refusal = True


def _string_member(block: bytes, key: bytes) -> str | None:
    """The first ``"key": "value"`` string member of ``block`` (compact or spaced JSON), when it is short
    and has no escapes (the model and id of a chunk): found in the bytes, nothing parsed."""
    k = block.find(key)
    while k != -1:
        v = k + len(key)
        if block.startswith(b':"', v):
            v += 2
        elif block.startswith(b': "', v):
            v += 3
        else:
            k = block.find(key, v)
            continue
        e = block.find(b'"', v)
        if e == -1 or e - v > 256 or b"\\" in block[v:e]:
            return None
        return block[v:e].decode("utf-8", "replace")
    return None


def named(piece: bytes) -> tuple[str | None, str | None]:
    """The first ``"model"`` and ``"id"`` string members of ``piece``, found in its bytes; empty ones say
    nothing (Azure's first chunk, its prompt filter results, has ``"model":""`` and ``"id":""``)."""
    return _string_member(piece, b'"model"') or None, _string_member(piece, b'"id"') or None


def note_start(ctx: Context, chunk: bytes) -> None:
    """A stream's model and id from its first piece, where its finishing event (which has the last
    word) did not name them: a stream cut before it finished. Called once the stream is over."""
    end = ctx.stream_end
    if end is not None and end.model is not None and end.id is not None:
        return  # the usual case: nothing to read
    model, rid = named(chunk)
    if model is None and rid is None:
        return
    if end is None:
        ctx.stream_end = StreamEnd(model=model, id=rid)
    else:
        end.model = end.model or model
        end.id = end.id or rid


def tap_end(ctx: Context, block: bytes) -> None:
    """Raw relay: :func:`note_end` for each event of ``block`` that :data:`END_MARKS` point at (one
    or two a stream: only those events are parsed)."""
    if b"\r" in block:
        for piece in _pieces(block):
            if ends(piece):
                ev = parse_block(piece)
                if ev is not None:
                    note_end(ctx, ev.json)
        return
    seen = -1
    for mark in END_MARKS:
        pos = 0
        while (k := block.find(mark, pos)) != -1:
            start, end = _event_at(block, k)
            pos = end
            if start == seen:
                continue  # this event again (a finish reason and a refusal in one)
            seen = start
            ev = parse_block(block[start:end].rstrip(b"\n"))
            if ev is not None:
                note_end(ctx, ev.json)


def tap_event(ctx: Context, ev: Event, injected: bool) -> bool:
    """Pick the usage out of an event; False for the usage chunk the client did not ask for.

    Where we asked for the usage (``injected``), the ``"usage": null`` OpenAI then puts in every
    other chunk is taken out too: the client gets the chunks it would have got without. As the raw
    relay does, the member is cut from the event's bytes, which are otherwise the upstream's (its
    spacing, escapes and numbers as it wrote them, and no serialising per chunk), unless a plugin
    changes the event.
    """
    raw = ev._raw
    if raw is not None:
        if ends(raw):
            note_end(ctx, ev.json)
        k = raw.find(b'"usage"')
        if k == -1 or (not injected and _null_usage(raw, k)):
            return True
        if injected and raw[:5] == b"data:" and raw[-2:] == b"\n\n" and b"\r" not in raw and raw.count(b"\n") == 2:
            cut, other = _strip_null_usage(raw, True)
            if not other:  # every "usage" of this one-line event is a null member: cut, nothing to parse
                ev._raw = cut
                ev._data = cut[6 if cut[5:6] == b" " else 5:-2].decode("utf-8", "replace")
                ev._json = _UNSET  # read again from what is left, if a plugin asks
                return True
    obj = ev.json
    if type(obj) is dict and "usage" in obj and obj["usage"] is None:
        if injected:
            del obj["usage"]
            ev.changed()
        return True
    u = usage_from(obj)
    if u is not None:
        ctx.usage = u
        if injected and is_usage_only_chunk(obj):
            return False
    return True


def tap_block(ctx: Context, block: bytes, injected: bool) -> bytes:
    """Raw relay: the usage from the block's events, minus an injected usage chunk.

    Only the events holding ``"usage"`` are parsed (inside a JSON string the quotes
    would be escaped, so the bytes mark a key); with ``\\n\\n`` between events, each is
    found from that mark without splitting the block.
    """
    if b"\r" in block:
        return _tap_block_any(ctx, block, injected)
    if injected:
        # our own request's "usage":null members go first, wherever they are (an event whose
        # content is the word "usage" too); what is left to parse is a real usage, if any
        block, other = _strip_null_usage(block, True)
        if not other:
            return block
    pos = 0
    cuts = None
    while (k := block.find(b'"usage"', pos)) != -1:
        if _null_usage(block, k):  # the client asked for them: they stay, and say nothing
            pos = k + 7
            continue
        start, end = _event_at(block, k)
        pos = end
        ev = parse_block(block[start:end].rstrip(b"\n"))
        if ev is not None and not tap_event(ctx, ev, injected):
            (cuts := cuts or []).append((start, end))
    return block if cuts is None else _cut(block, cuts)


def _cut(block: bytes, cuts: list[tuple[int, int]]) -> bytes:
    """``block`` without the ``(start, end)`` ranges of ``cuts`` (in order, not overlapping)."""
    out = []
    pos = 0
    for start, end in cuts:
        out.append(block[pos:start])
        pos = end
    out.append(block[pos:])
    return b"".join(out)


def _strip_null_usage(piece: bytes, injected: bool) -> tuple[bytes, bool]:
    """``piece`` without its ``"usage":null`` members when ``injected`` (``piece`` itself when none is
    cut), and whether it holds a ``"usage"`` that is not null (the one to parse)."""
    pos = 0
    cuts = None
    other = False
    while (k := piece.find(b'"usage"', pos)) != -1:
        n = _null_usage(piece, k)
        if n:
            if injected:
                (cuts := cuts or []).append(_null_usage_cut(piece, k, n))
            pos = k + 7 + n
        else:
            other = True
            pos = k + 7
    return (piece if cuts is None else _cut(piece, cuts)), other


def _tap_block_any(ctx: Context, block: bytes, injected: bool) -> bytes:
    """:func:`tap_block` for blocks with any of the separators SSE allows."""
    out = []
    changed = False
    for piece in _pieces(block):
        if b'"usage"' in piece:
            stripped, other = _strip_null_usage(piece, injected)
            if stripped is not piece:
                piece = stripped
                changed = True
            if other:
                ev = parse_block(piece)
                if ev is not None and not tap_event(ctx, ev, injected):
                    changed = True
                    continue
        out.append(piece)
    return b"".join(out) if changed else block


def is_done_block(block: bytes) -> bool:
    """Whether whole events ``block`` hold the terminal ``data: [DONE]`` event, not just the text (a model
    may write "[DONE]" in its content: inside an event's JSON it never starts a line)."""
    return (block.startswith((b"data: [DONE]", b"data:[DONE]")) or b"\ndata: [DONE]" in block
            or b"\ndata:[DONE]" in block)


def last_boundary(buf: bytearray) -> int:
    """Length of the prefix of ``buf`` made of complete events (0 when none is complete)."""
    i = buf.rfind(b"\n\n")
    j = buf.rfind(b"\r\n\r\n")
    if j != -1 and j + 4 > i + 2:
        return j + 4
    return i + 2 if i != -1 else 0


def direct_transport(request: web.BaseRequest, out: web.StreamResponse) -> asyncio.Transport | None:
    """The client's transport, when a raw block may be framed and written to it directly.

    Only for a chunked, uncompressed body whose headers are out: then a chunk is
    ``<hex length>\\r\\n<data>\\r\\n`` and aiohttp's ``write_eof`` ends the body as usual.
    """
    w = request.writer
    if not isinstance(w, StreamWriter) or not w.chunked or w._compress is not None or w.length is not None or w._headers_buf:
        return None
    return request.transport


class RawRelay:
    """One stream's relay state, shared by the coroutine and the reader's ``feed_data``.

    Blocks go straight to the client's socket (``transport``, set by the coroutine once its
    first write has carried the headers) while that is safe; aiohttp's writer takes over
    when not.
    """

    __slots__ = ("transport", "ctx", "wants_usage", "injected", "buf", "saw_done", "done_sent", "waiting", "dog", "loop", "taken",
                 "reader", "ends")

    def __init__(self, ctx: Context, wants_usage: bool, injected: bool, dog: Watchdog, loop: asyncio.AbstractEventLoop) -> None:
        self.transport: asyncio.Transport | None = None
        self.ctx = ctx
        self.wants_usage = wants_usage
        self.injected = injected
        self.buf = bytearray()  # the start of an event not yet complete
        self.saw_done = False
        #: the block holding ``data: [DONE]`` was handed to the client's socket: the client has the whole stream
        self.done_sent = False
        #: the coroutine is parked in ``readany()``: pieces may bypass it while the reader holds none
        self.waiting = False
        self.dog = dog
        self.loop = loop
        #: pieces written from ``feed_data`` (the tests read it)
        self.taken = 0
        #: the upstream body's reader, while attached
        self.reader: StreamReader | None = None
        #: how to spot a finishing event in a block (:func:`ends_compact` when the upstream writes compact JSON)
        self.ends: Callable[[bytes], bool] | None = None

    def _open(self) -> asyncio.Transport | None:
        """The client's socket when a block may go to it directly: not before the first write,
        not while its buffer is full (the writer's drain is the backpressure), not closing."""
        t = self.transport
        if t is None or t.get_write_buffer_size() >= WRITE_BUFFER_LOW or t.is_closing():
            return None
        return t

    def send(self, data: bytes) -> bool:
        """One HTTP/1.1 chunk to the socket; False when aiohttp's writer must do it instead."""
        t = self._open()
        if t is None:
            return False
        t.write(b"%x\r\n%b\r\n" % (len(data), data))
        return True

    def tap(self, block: bytes) -> bytes:
        """The usage and the stream's end read from ``block`` (when a plugin reads answers), minus what
        the client must not get: the usage chunk and ``"usage":null`` members Sluice asked for."""
        if not self.wants_usage:
            return block
        out = tap_block(self.ctx, block, self.injected) if b'"usage"' in block else block
        ends_ = self.ends
        if ends_ is None:
            ends_ = ends
            if b"{" in block:  # the first JSON tells how the upstream writes it
                self.ends = ends if b'": ' in block else ends_compact
        if ends_(block):
            tap_end(self.ctx, block)
        return out

    def _whole(self, block: bytes) -> bytes:
        """Complete events: the usage tapped (first: it is what can fail), ``[DONE]`` noted, counted."""
        out = self.tap(block) if self.wants_usage else block  # no call per block for a route that reads no answers
        done = b"[DONE]" in block and is_done_block(block)
        if done:
            self.saw_done = True
        if out:
            ctx = self.ctx
            ctx.stream_bytes += len(out)
            # [DONE] is no event of the answer: not counted (nor is it on the parsed path)
            ctx.stream_events += (out.count(b"\n\n") or out.count(b"\r\n\r\n") or out.count(b"\r\r")) - done
        return out

    def block(self, chunk: bytes) -> bytes:
        """The coroutine's path: the complete events so far, tapped, counted; b"" when none."""
        buf = self.buf
        if not buf and chunk.endswith(b"\n\n"):
            return self._whole(chunk)  # the common case: whole events, no copy
        buf += chunk
        cut = last_boundary(buf)
        if not cut:
            return b""
        block = bytes(buf[:cut])
        del buf[:cut]
        return self._whole(block)

    def take(self, data: bytes) -> bool:
        """From ``feed_data``: write whole events straight out; False leaves them to the coroutine."""
        if self.buf or not data.endswith(b"\n\n"):
            return False
        t = self._open()
        if t is None:
            return False
        try:
            block = self._whole(data)
        except Exception:
            return False  # nothing noted yet: the coroutine meets the same error where errors are handled
        if block:
            t.write(b"%x\r\n%b\r\n" % (len(block), block))
            self.done_sent = self.saw_done
        self.taken += 1
        self.dog.last = self.loop.time()  # a new wait for the upstream starts now
        return True


_RELAYS: dict[int, RawRelay] = {}


class _TappedReader(StreamReader):
    """aiohttp's reader, whose ``feed_data`` first offers each piece to the stream's relay."""

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        relay = _RELAYS.get(id(self))
        # not past what is buffered for the coroutine: one read of the socket can hold several
        # HTTP chunks, and the parser feeds them one by one before the woken coroutine runs
        if relay is not None and relay.waiting and not self._buffer and data and relay.take(data):
            self.total_bytes += len(data)
            return False
        return StreamReader.feed_data(self, data, size)

    def end_http_chunk_receiving(self) -> None:
        # The parser calls this after every HTTP/1.1 chunk of the upstream's body; aiohttp
        # then wakes any waiting read, for readchunk()'s sake. The relay never calls
        # readchunk(), and while it takes the pieces there is nothing for readany() to
        # return: waking it would put back the task step per event the relay removes.
        relay = _RELAYS.get(id(self))
        if relay is not None and relay.waiting:
            return
        StreamReader.end_http_chunk_receiving(self)


def attach(content: StreamReader, relay: RawRelay) -> bool:
    """Let ``relay`` take pieces of ``content`` as they arrive; False when this reader cannot."""
    if type(content) is not StreamReader:
        return False
    _RELAYS[id(content)] = relay
    relay.reader = content
    content.__class__ = _TappedReader
    return True


def detach(content: StreamReader, relay: RawRelay) -> None:
    relay.waiting = False
    relay.reader = None
    if _RELAYS.get(id(content)) is relay:
        del _RELAYS[id(content)]
        content.__class__ = StreamReader
