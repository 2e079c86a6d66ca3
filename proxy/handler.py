"""The request lifecycle, top to bottom: match, read, on_request, upstream, answer, on_done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
import zlib
from typing import TYPE_CHECKING, Any, Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from . import chain as ch
from .context import Attempt, Context, Response
from .errors import ProxyError, error_body
from .openai import (
    ensure_stream_usage,
    request_headers,
    response_headers,
    streams_usage,
)
from .relay import RawRelay, attach, detach, direct_transport, note_start, tap_event
from .sse import DONE, Event, Parser
from .timers import Alarm, Watchdog
from .upstream import CONNECT_ERRORS, Upstream

if TYPE_CHECKING:  # pragma: no cover
    import aiohttp

    from .server import Server

log = logging.getLogger("sluice.access")
_bits = random.getrandbits
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache"}


def new_request_id() -> str:
    """``req_`` + 12 hex digits of Unix milliseconds + 20 random hex digits.

    Time-ordered like a UUIDv7, so ledgers keyed by it append instead of inserting
    at random places in their index; 80 random bits keep ids unique within a millisecond.
    An id names, it guards nothing, so the bits come from ``random`` (reseeded in every
    forked worker) rather than a system call per request.
    """
    return "req_" + ((time.time_ns() // 1_000_000) << 80 | _bits(80)).to_bytes(16, "big").hex()  # half the time of "%x" formatting


def error_response(status: int, message: str, request_id: str, *, code: str | None = None, headers: dict | None = None) -> web.Response:
    err = ProxyError(status, message, code=code, headers=headers)
    h = CIMultiDict({"content-type": "application/json", "x-request-id": request_id, **err.headers})
    return web.Response(status=status, body=err.body(), headers=h)


class Refusal(Exception):
    """A request the core answers before any plugin runs, counted in ``sluice_rejected_requests_total``
    by ``reason``; ``close``: its connection cannot carry another request."""

    status = 400
    reason = code = message = ""
    close = False


class BodyTooLarge(Refusal):
    status, reason, code = 413, "request_too_large", "request_too_large"

    def __init__(self, limit: int) -> None:
        self.message = f"The request body is larger than this server's limit of {limit} bytes (max_body_bytes)."


class ExpectationFailed(Refusal):
    status, reason, code, message = 417, "expectation_failed", "expectation_failed", "Only 'Expect: 100-continue' is understood."


class BodyCutShort(Refusal):
    reason, code, message = "incomplete_body", "incomplete_body", "The request body ended before its Content-Length."


class UnsupportedEncoding(Refusal):
    status, reason, code = 415, "unsupported_encoding", "unsupported_content_encoding"
    message = "The request body's content-encoding is not one Sluice reads (gzip or deflate)."


class BadEncoding(Refusal):
    reason, code, message = "invalid_encoding", "invalid_content_encoding", "The request body is not a whole stream of its content-encoding."


class BodyStalled(Refusal):
    """The client stopped sending its request body for longer than ``server.body_timeout_s``: the rest of
    it may still come, so the connection is closed once the answer is out."""

    status, reason, code, close = 408, "body_timeout", "request_timeout", True

    def __init__(self, idle: float) -> None:
        self.message = f"The request body stalled: no more of it arrived within {idle:g} s."


def refuse(server: Server, request_id: str, status: int, reason: str, message: str, code: str) -> web.Response:
    """The answer to a request refused before any plugin ran, counted by ``reason``; with
    ``server.access_log``, logged as served requests are (the reason is Sluice's word: nothing the client
    sent is quoted), so a client's ``x-request-id`` can be found."""
    server.metrics.rejected.labels(reason=reason).inc()
    if server.loaded.config.server.access_log:
        log.info("request_id=%s route=- status=%s outcome=refused answered_by=core:%s", request_id, status, reason)
    return error_response(status, message, request_id, code=code)


#: the request body encodings Sluice decodes (read_body): the body a plugin reads and the upstream
#: gets is the decoded one
DECODED_ENCODINGS = frozenset({"gzip", "x-gzip", "deflate"})


async def read_body(request: web.BaseRequest, limit: int, idle: float = 0.0) -> bytes:
    """The request body, at most ``limit`` bytes, decoded when the client compressed it.

    A body still arriving must make progress: ``idle`` seconds (0: no limit) without a byte is
    :class:`BodyStalled`. A body that came whole with its headers, as nearly all do, is read with no timer.
    """
    headers = request.headers
    coding = None
    if "content-encoding" in headers:
        given = headers.getall("content-encoding")
        coding = given[0].strip().lower() if len(given) == 1 and "," not in given[0] else "stacked"
        if coding in ("", "identity"):
            coding = None
        elif coding not in DECODED_ENCODINGS:
            raise UnsupportedEncoding  # br, zstd, stacked codings: nothing here decodes them
    cl = request.content_length
    if cl is not None and cl > limit:
        raise BodyTooLarge(limit)
    if "expect" in headers:
        await _expect(request)
    content = request.content
    if not content.is_eof():
        data = await _read_arriving(content, cl, limit, idle, request.task.get_loop())
    elif cl is not None:
        try:
            data = await content.readexactly(cl) if cl else b""
        except asyncio.IncompleteReadError:
            raise BodyCutShort from None
    else:
        data = await content.read()  # chunked, and all here
        if len(data) > limit:
            raise BodyTooLarge(limit)
    return decode_body(data, coding, limit) if coding is not None and data else data


async def _read_arriving(content: aiohttp.StreamReader, cl: int | None, limit: int, idle: float,
                         loop: asyncio.AbstractEventLoop) -> bytes:
    """A body not yet all here: read as it comes, each wait for more bytes at most ``idle`` seconds (0: no limit)."""
    buf = bytearray()
    want = limit if cl is None else cl
    try:
        async with asyncio.timeout_at(loop.time() + idle if idle else None) as deadline:
            while len(buf) < want or cl is None:
                chunk = await content.readany()
                if not chunk:
                    break
                buf += chunk
                if len(buf) > limit:
                    raise BodyTooLarge(limit)
                if idle:
                    deadline.reschedule(loop.time() + idle)
    except TimeoutError:
        raise BodyStalled(idle) from None
    if cl is not None and len(buf) != cl:
        raise BodyCutShort  # the connection ended first (more than cl cannot be: the parser stops at cl)
    return bytes(buf)


def decode_body(data: bytes, coding: str, limit: int) -> bytes:
    """``data`` decoded (gzip, or deflate: zlib-wrapped as RFC 9110 says, or raw as some clients send it):
    whole (a cut or corrupt stream, or bytes after its end, are :class:`BadEncoding`) and at most
    ``limit`` bytes (else :class:`BodyTooLarge`, found without decoding more than that)."""
    for wbits in ((31,) if coding != "deflate" else (15, -15)):
        d = zlib.decompressobj(wbits)
        try:
            out = d.decompress(data, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit:
            raise BodyTooLarge(limit)
        if d.eof and not d.unused_data:
            return out
        break
    raise BadEncoding


def has_dot_segments(path: str) -> bool:
    """Whether ``path`` holds a ``.`` or ``..`` segment, percent-encoded (up to three times), behind a
    backslash or before ``;`` parameters (``..;``, which Java servers resolve): an upstream or a proxy in
    front of it that resolves them would serve a path outside the route's upstream base, with the
    upstream's credentials."""
    for _ in range(4):
        for seg in path.replace("\\", "/").split("/"):
            if seg.partition(";")[0] in (".", ".."):
                return True
        if "%" not in path:
            return False
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return False


def json_typed(headers: CIMultiDictProxy[str], body: bytes) -> bool:
    """Whether an upstream may read the body as JSON: declared so, or not declared at all (FastAPI's
    rule, which vLLM follows), or shaped like JSON whatever it is declared (Go servers such as Ollama's
    bind JSON without looking at the content type)."""
    ct = headers.get("content-type")
    if ct is None:
        return True
    media = ct.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        return True
    m = _LEAD.match(body)
    return body[m.end():m.end() + 1] in (b"{", b"[")  # type: ignore[union-attr]


def json_refusal(ctx: Context) -> str | None:
    """Why a JSON body must not reach the chain, or ``None``: the plugins that read bodies must see what
    the upstream will act on. A body a laxer parser than ours takes (NaN, a byte order mark, a lone
    surrogate) is refused, as OpenAI refuses it; so is one whose keys differ only in case."""
    try:
        body = ctx.body
    except ProxyError as e:
        return e.message
    if type(body) is dict and case_twins(body):
        return "The JSON body has keys that differ only in case (such as 'model' and 'Model'): send each once."
    return None


def case_twins(body: dict[str, Any]) -> bool:
    """Whether the request's object, or one of its messages or input items, has two keys that differ only in
    case. Go's JSON decoder (Ollama's) binds a key to a field whatever its case, the last one winning:
    ``{"model": "allowed", "Model": "other"}`` reaches it as "other" while every plugin here reads
    "allowed". Keys all in lower-case ASCII (every key of the API) cannot collide: one join and one
    comparison per object, the case folding only for an object with other keys."""
    if _twins(body):
        return True
    for name in ("messages", "input"):
        items = body.get(name)
        if type(items) is list:
            for item in items:
                if type(item) is dict and _twins(item):
                    return True
    return False


def _twins(d: dict[str, Any]) -> bool:
    if len(d) < 2:
        return False
    keys = "".join(d)
    if keys.isascii() and keys == keys.lower():
        return False
    return len({k.casefold() for k in d}) != len(d)


#: what a JSON parser skips before a value (any amount: Go's does), and a byte order mark
_LEAD = re.compile(rb"[ \t\r\n\xef\xbb\xbf]*")


class Handler:
    """The main listener's request handler (aiohttp's low-level server calls it directly)."""

    def __init__(self, server: Server, special: dict[str, Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]] | None = None) -> None:
        self.server = server
        #: exact paths served before any route (health checks)
        self.special = special or {}

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        # one coroutine for the whole lifecycle: every await of a stream read resumes
        # each enclosing coroutine, so layers cost on every event
        raw_path = request.raw_path
        path, _, query = raw_path.partition("?")
        special = self.special.get(path)
        if special is not None:
            return await special(request)
        server = self.server
        gen = server.generation
        gen.enter()
        server.handling += 1
        try:
            rid = new_request_id()
            if ("." in path or "%" in path or "\\" in path) and has_dot_segments(path):
                return refuse(server, rid, 400, "invalid_path", "The request path has '.' or '..' segments: send it normalised.",
                              "invalid_path")
            if (upgrade := request.headers.get("upgrade")) is not None and upgrade.lower() == "websocket":
                # the Realtime API's WebSocket: not relayed (an upgrade stripped as hop-by-hop would reach the
                # upstream as a plain GET, whose answer means nothing to the client)
                return refuse(server, rid, 501, "websocket_not_supported", "WebSocket connections (the Realtime API) are not "
                              "supported through this gateway.", "websocket_not_supported")
            route = gen.match(request.method, path, request.headers)
            if route is None:
                return refuse(server, rid, 404, "route_not_found", f"No route for {request.method} {path}.", "route_not_found")
            try:
                raw = await read_body(request, route.max_body_bytes, route.body_timeout)
            except Refusal as e:
                resp = refuse(server, rid, e.status, e.reason, e.message, e.code)
                if e.close:
                    resp.force_close()  # the rest of the body may still come: the connection cannot carry another request
                    await resp.prepare(request)
                    await resp.write_eof()
                    # closed once the answer is out: aiohttp would otherwise wait (server-side "lingering", up to 10 s)
                    # for the rest of a body that has stopped coming
                    request.protocol.force_close()
                return resp
            headers = request_headers(request.headers)
            if "content-encoding" in headers:
                del headers["content-encoding"]  # read decoded (read_body), sent on as read
            ctx = Context(
                request_id=rid, method=request.method, path=path, query=query,
                headers=headers, raw=raw, route=route,
            )
            if route.checks_json and raw and json_typed(request.headers, raw) and (why := json_refusal(ctx)):
                return refuse(server, rid, 400, "invalid_json", why, "invalid_json")
            ctx._peer = (gen.client_ip, request)  # the address is looked up if a plugin asks
            ctx.runtime = gen.runtime
            ctx.targets = list(route.default_targets)
            resp: web.StreamResponse | None = None  # a buffered answer, sent here before on_done runs inline
            try:
                await ch.run_request(ctx, route)
                if ctx.reply_value is not None:
                    if ctx.outcome is None:
                        ctx.outcome = "answered"
                    resp = await self._send_reply(request, ctx, route)
                    return resp

                injected = False
                if route.needs_usage and ctx.stream and streams_usage(ctx.path):
                    body = ctx.body
                    if isinstance(body, dict) and ensure_stream_usage(body):
                        ctx.body = body
                        injected = True

                # the handler's own task, which the timeouts cancel and uncancel: not request.task, the
                # connection's, which awaits this one (a cancellation of it reaches this one, but its
                # count would stay raised, and aiohttp reads that count to tell a shutdown)
                loop = request.task.get_loop()  # get_running_loop() costs a getpid() system call
                task = asyncio.current_task(loop)
                assert task is not None
                try:
                    up_resp, up, att = await gen.pool.send(ctx, route, task)
                except ProxyError as e:
                    ctx.outcome = "upstream_error"
                    ctx.error = e.message
                    ctx.response = Response(e.status, {"content-type": "application/json", **e.headers}, e.body())
                    await ch.run_response(ctx, route)
                    resp = self._buffered(ctx)
                    return resp
                ctx.timings.upstream_start = ctx.attempts[0].start
                ctx.timings.first_byte = att.first_byte
                try:
                    ctype = up_resp.headers.get("content-type", "")
                    if ctype.startswith("text/event-stream"):
                        resp = await self._relay(request, ctx, route, up_resp, up, att, injected, task)
                        return resp
                    if ctype and up_resp.status < 300 and not _json_media(ctype) and ctx.method != "HEAD":
                        # speech audio, a file's content, NDJSON: relayed as they come, as the upstream sends them
                        resp = await self._pass_body(request, ctx, up_resp, up, att, task)
                        return resp
                    # timeouts.idle holds between a buffered answer's reads too, as between a stream's events
                    data = await _read_body(up_resp.content, loop, task, up.config.timeouts.idle, self._deadline(att, up, loop))
                    att.end = ctx.timings.upstream_end = time.perf_counter()
                    ctx.response = Response(up_resp.status, response_headers(up_resp.headers, ctx.method == "HEAD"), data)
                    ctx.outcome = "ok" if up_resp.status < 400 else "upstream_error"
                    if up_resp.status < 300 and route.wants_usage:
                        ctx.defer_usage(data)  # parsed on first read of ctx.usage
                    if route.has_response_hooks:
                        await ch.run_response(ctx, route)
                    resp = self._buffered(ctx)
                    return resp
                except TimeoutError:
                    resp = _upstream_broke(ctx, att, "timeout", 504, "The upstream did not finish its answer in time.", "upstream_timeout")
                    return resp
                except CONNECT_ERRORS:
                    resp = _upstream_broke(ctx, att, "protocol", 502, "The upstream broke the connection.", "upstream_disconnected")
                    return resp
                finally:
                    up.outstanding -= 1
                    if att.end is None:
                        att.end = time.perf_counter()
                    up_resp.close()  # aborts the upstream request if it is not finished
            except asyncio.CancelledError:
                # the client went away: aiohttp cancels the handler (handler_cancellation). Not gone early
                # if it had its whole stream (the relay says "ok": it left after [DONE], as the openai SDK
                # does); a buffered answer (ctx.response) was not yet sent, whatever its outcome
                if ctx.outcome != "ok" or ctx.response is not None:
                    ctx.outcome = "client_gone"
                raise
            except ProxyError as e:
                ctx.outcome = ctx.outcome or "error"
                if _answer_started(request):
                    return _cut(request, ctx, e.status)
                ctx.status, ctx.error = e.status, e.message
                resp = error_response(e.status, e.message, rid, code=e.code, headers=e.headers)
                return resp
            except Exception as e:  # never a stack trace to the client
                log.error("internal error %s request_id=%s", type(e).__name__, rid, exc_info=self.server.debug)
                ctx.outcome = "error"
                if _answer_started(request):
                    return _cut(request, ctx, 500)
                ctx.status = 500
                resp = error_response(500, _INTERNAL.message, rid, code=_INTERNAL.code)
                return resp
            finally:
                ctx.timings.end = time.perf_counter()
                if ctx.outcome is None:
                    ctx.outcome = "error"
                if route.done_inline:
                    try:
                        if resp is not None and not resp.prepared:
                            await _send(request, resp, ctx)
                    finally:
                        self.server.done_now(ctx, route, gen)
                else:
                    self.server.done(ctx, route, gen)
        finally:
            gen.leave()
            server.handling -= 1
            if not server.handling and server.handlers_done is not None:
                server.handlers_done.set()  # close() waits for the handlers it cut to have queued their on_done

    @staticmethod
    def _deadline(att: Attempt, up: Upstream, loop: asyncio.AbstractEventLoop) -> float:
        return loop.time() + max(0.0, up.config.timeouts.total - (time.perf_counter() - att.start))

    @staticmethod
    def _finish_headers(ctx: Context, out: web.StreamResponse) -> web.StreamResponse:
        """Our id and the plugins' headers, on the answer's own copy of the headers."""
        headers = out.headers
        headers["x-request-id"] = ctx.request_id
        if ctx.response_headers:
            headers.update(ctx.response_headers)
        return out

    def _buffered(self, ctx: Context) -> web.Response:
        r = ctx.response
        assert r is not None
        ctx.status = r.status
        # aiohttp copies the headers it is given, so ctx.response keeps the upstream's as they were
        return self._finish_headers(ctx, web.Response(status=r.status, body=r.body, headers=r.headers))  # type: ignore[return-value]

    async def _send_reply(self, request: web.BaseRequest, ctx: Context, route: ch.CompiledRoute) -> web.StreamResponse:
        reply = ctx.reply_value
        assert reply is not None
        if reply.events is None:
            ctx.response = Response(reply.status, reply.headers, reply.body)
            await ch.run_response(ctx, route)
            return self._buffered(ctx)
        headers = CIMultiDict(SSE_HEADERS)
        headers.update(reply.headers)
        out = self._finish_headers(ctx, web.StreamResponse(status=reply.status, headers=headers))
        ctx.status = reply.status
        await out.prepare(request)
        pipeline = ch.ChunkPipeline(ctx, route)
        try:
            async for ev in ch.aiter_events(reply.events):
                if ev.is_done:
                    continue
                ctx.stream_events += 1
                await self._write_events(out, ctx, await pipeline.push((ev,)))
            await self._write_events(out, ctx, await pipeline.end())
            await out.write(DONE.encode())
        except ch.StreamError as e:
            await self._stream_error(out, ctx, e.err)
        except ConnectionResetError:
            ctx.outcome = "client_gone"
            return out
        except Exception as e:  # as in _relay
            await self._failed_in_stream(out, ctx, e)
        with contextlib.suppress(ConnectionResetError):
            await out.write_eof()  # the whole answer is written: a client that left after [DONE] had it
        return out

    async def _failed_in_stream(self, out: web.StreamResponse, ctx: Context, e: Exception) -> None:
        """A failure of ours after a stream's headers went out: logged, and the stream ends with an error
        event (a second response written into its body would break the client's connection)."""
        log.error("internal error %s after a stream's headers request_id=%s", type(e).__name__, ctx.request_id,
                  exc_info=self.server.debug)
        ctx.outcome = "error"
        await self._stream_error(out, ctx, _INTERNAL)

    async def _write_events(self, out: web.StreamResponse, ctx: Context, events: list[Event]) -> None:
        if events:
            data = b"".join([e.encode() for e in events])
            ctx.stream_bytes += len(data)
            await out.write(data)

    async def _stream_error(self, out: web.StreamResponse, ctx: Context, err: ProxyError) -> None:
        """After the status line is sent, an error can only be an event; then the stream ends."""
        ctx.error = err.message
        ctx.error_status = err.status
        ctx.answer_reason = ctx.answer_reason or err.reason
        ev = Event(error_body(err.message, err.type, err.code, err.param).decode())
        try:
            await out.write(ev.encode())
        except ConnectionResetError:
            ctx.outcome = "client_gone"

    async def _relay(
        self,
        request: web.BaseRequest,
        ctx: Context,
        route: ch.CompiledRoute,
        resp: aiohttp.ClientResponse,
        up: Upstream,
        att: Attempt,
        injected: bool,
        task: asyncio.Task[Any],
    ) -> web.StreamResponse:
        out = self._finish_headers(ctx, web.StreamResponse(status=resp.status, headers=response_headers(resp.headers)))
        ctx.status = resp.status
        await out.prepare(request)
        content = resp.content
        idle = up.config.timeouts.idle
        loop = task.get_loop()
        deadline = self._deadline(att, up, loop)
        parse = route.parse_stream
        pipeline = ch.ChunkPipeline(ctx, route) if parse else None
        parser = Parser() if parse else None
        ctx.outcome = "upstream_error"  # until the stream completes
        finished = "ok" if resp.status < 400 else "upstream_error"  # once it completes, or the client has [DONE]
        dog = Watchdog(loop, idle, deadline, task)
        # after the first write (which carries the headers), blocks go to the transport
        # directly while it keeps up; aiohttp's writer (and its drain) takes over when not
        relay = RawRelay(ctx, route.wants_usage, injected, dog, loop)
        tapped = parser is None and attach(content, relay)
        timings = ctx.timings
        first: bytes | None = None  # the stream's first piece (its model and id, should it never finish)
        try:
            while True:
                dog.last = loop.time()  # only the wait on the upstream counts as idle
                relay.waiting = tapped
                try:
                    chunk = await content.readany()
                finally:
                    relay.waiting = False  # from here on only this coroutine writes, until it waits again
                if not chunk:
                    break
                if first is None:
                    # a model server sends a stream's headers before its first token (vLLM: before
                    # prefill): the time to first token is the first body bytes', not the headers'.
                    # The first piece always comes through here: the tap starts after the first write
                    timings.first_byte = time.perf_counter()
                    first = chunk
                if parser is None:
                    block = relay.block(chunk)
                    if block:
                        if not relay.send(block):
                            await out.write(block)
                            relay.transport = direct_transport(request, out)
                        relay.done_sent = relay.saw_done
                else:
                    events = []
                    for ev in parser.feed(chunk):
                        if ev.is_done:
                            relay.saw_done = True
                        elif tap_event(ctx, ev, injected):
                            events.append(ev)
                    if events:
                        # counted as they come, not as they leave: what a plugin holds back was generated
                        # (and is billed) all the same, should the stream be cut before it is released
                        ctx.stream_events += len(events)
                        events = await pipeline.push(events)  # type: ignore[union-attr]
                        if events:
                            data = events[0].encode() if len(events) == 1 else b"".join([e.encode() for e in events])
                            ctx.stream_bytes += len(data)
                            if not relay.send(data):
                                await out.write(data)
                                relay.transport = direct_transport(request, out)
            att.end = ctx.timings.upstream_end = time.perf_counter()
            ctx.outcome = finished  # the upstream finished (on_stream_end is told so); a failure below says otherwise
            if parser is None:
                buf = relay.buf
                if buf:
                    await out.write(relay.tap(bytes(buf)))
            else:
                tail = []
                for ev in parser.close():  # what the stream's end left without its blank line
                    if ev.is_done:
                        relay.saw_done = True  # a last "data: [DONE]" with no blank line after it is the end all the same
                    elif tap_event(ctx, ev, injected):
                        tail.append(ev)
                if tail:
                    ctx.stream_events += len(tail)
                    await self._write_events(out, ctx, await pipeline.push(tail))  # type: ignore[union-attr]
                await self._write_events(out, ctx, await pipeline.end())  # type: ignore[union-attr]
                if relay.saw_done:
                    await out.write(DONE.encode())
        except ch.StreamError as e:
            if ctx.outcome != "plugin_error":
                ctx.outcome = "answered"
            await self._stream_error(out, ctx, e.err)
        except asyncio.CancelledError:
            if not dog.fired:
                # the client left after [DONE], relayed as it came (the openai SDK closes its response
                # there, before an upstream's last empty chunk): it had the whole answer; else it left early
                ctx.outcome = finished if relay.done_sent else "client_gone"
                raise  # the client went away
            task.uncancel()
            att.error = "timeout"
            ctx.outcome = "upstream_error"
            why = "The upstream did not finish its stream in time." if dog.overran() else "The upstream stream stalled."
            await self._end_broken(out, ctx, pipeline, ProxyError(504, why, code="upstream_timeout"))
        except CONNECT_ERRORS as e:
            if isinstance(e, ConnectionResetError) and _client_gone(request):
                ctx.outcome = finished if relay.done_sent else "client_gone"  # as above
                return out
            att.error = "protocol"
            ctx.outcome = "upstream_error"
            await self._end_broken(out, ctx, pipeline, ProxyError(502, "The upstream stream broke off.", code="upstream_disconnected"))
        except Exception as e:  # ours (an event a plugin left unencodable)
            await self._failed_in_stream(out, ctx, e)
        finally:
            dog.cancel()
            if tapped:
                detach(content, relay)
            if first is not None and route.wants_usage:
                note_start(ctx, first)  # ended, finished or cut: fill in what its events did not say
        if ctx.outcome != "client_gone":
            # the whole answer is written, error event and all: a client that left after it (the openai SDK
            # closes its response on [DONE]) had it, and only the last empty chunk is lost
            with contextlib.suppress(ConnectionResetError):
                await out.write_eof()
        return out

    async def _pass_body(self, request: web.BaseRequest, ctx: Context, resp: aiohttp.ClientResponse, up: Upstream, att: Attempt,
                         task: asyncio.Task[Any]) -> web.StreamResponse:
        """A successful answer that is neither JSON nor SSE (speech audio played as it is made, a file's
        content, an NDJSON stream), relayed piece by piece as it arrives, under the stream's idle and total
        timeouts. No plugin reads it: ``on_response`` is for JSON answers and ``on_chunk`` for SSE events;
        ``ctx.response`` stays ``None``. An upstream that stalls or breaks off cuts the client's connection,
        so the client sees an incomplete body, not a whole one (there is no error event to send)."""
        out = self._finish_headers(ctx, web.StreamResponse(status=resp.status, headers=response_headers(resp.headers, keep_length=True)))
        ctx.status = resp.status
        await out.prepare(request)
        content = resp.content
        loop = task.get_loop()
        dog = Watchdog(loop, up.config.timeouts.idle, self._deadline(att, up, loop), task)
        ctx.outcome = "upstream_error"  # until the body is all relayed
        first = True
        try:
            while True:
                dog.last = loop.time()  # only the wait on the upstream counts as idle
                chunk = await content.readany()
                if not chunk:
                    break
                if first:
                    ctx.timings.first_byte = time.perf_counter()
                    first = False
                await out.write(chunk)
            att.end = ctx.timings.upstream_end = time.perf_counter()
            ctx.outcome = "ok"
            await out.write_eof()
            return out
        except asyncio.CancelledError:
            if not dog.fired:
                ctx.outcome = "client_gone"
                raise
            task.uncancel()
            att.error, status = "timeout", 504
            ctx.error = "The upstream did not finish its answer in time." if dog.overran() else "The upstream answer stalled."
        except CONNECT_ERRORS as e:
            if isinstance(e, ConnectionResetError) and _client_gone(request):
                ctx.outcome = "client_gone"
                return out
            att.error, status = "protocol", 502
            ctx.error = "The upstream answer broke off."
        finally:
            dog.cancel()
        ctx.outcome = "upstream_error"
        _cut(request, ctx, status)  # the body is not whole: the client must not take it for whole
        return out

    async def _end_broken(self, out: web.StreamResponse, ctx: Context, pipeline: ch.ChunkPipeline | None, err: ProxyError) -> None:
        """The upstream failed mid-stream: release what plugins hold, then say so in an error event."""
        try:
            if pipeline is not None:
                await self._write_events(out, ctx, await pipeline.end())
        except ch.StreamError:
            pass
        except ConnectionResetError:
            ctx.outcome = "client_gone"
            return
        await self._stream_error(out, ctx, err)


def _json_media(ctype: str) -> bool:
    """A JSON answer, read whole for the plugins (``application/json``, ``text/json``, ``...+json``); NDJSON
    and JSON Lines streams are not: they are relayed as they come."""
    mt = ctype.partition(";")[0].strip().lower()
    return mt == "application/json" or mt.endswith("+json") or mt == "text/json"


async def _read_body(content: Any, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], idle: float,
                     deadline: float) -> bytes:
    """A buffered answer's whole body; ``TimeoutError`` when the upstream sends nothing for ``idle`` seconds
    or the loop time passes ``deadline``. One alarm for a body that comes at once (the usual case), one per
    read after that. At the body's end the response has given its connection back to the pool (aiohttp
    does that at the end of the body)."""
    alarm = Alarm(min(loop.time() + idle, deadline), loop, task)
    before = alarm
    try:
        chunk = await content.readany()
        if not chunk or content.at_eof():
            return chunk
        chunks = [chunk]
        while True:
            alarm.disarm()
            before, alarm = alarm, Alarm(min(loop.time() + idle, deadline), loop, task)
            chunk = await content.readany()
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    except asyncio.CancelledError:
        # the alarm before may have fired in the same turn of the loop as the read it was waiting for ended
        (before if before.fired else alarm).timed_out()
    finally:
        alarm.disarm()


def _upstream_broke(ctx: Context, att: Attempt, kind: str, status: int, message: str, code: str) -> web.Response:
    """The upstream failed while a buffered answer was being read: record it, answer with the error."""
    att.error = kind
    ctx.outcome = "upstream_error"
    ctx.error = message
    ctx.status = status
    return error_response(status, message, ctx.request_id, code=code)


_INTERNAL = ProxyError(500, "Sluice failed to process the request.", code="internal_error")


def _answer_started(request: web.BaseRequest) -> bool:
    """The answer's status line is out (a stream): an error can no longer be an answer of its own."""
    writer = request.writer
    return writer is not None and writer.output_size > 0


def _cut(request: web.BaseRequest, ctx: Context, status: int) -> web.StreamResponse:
    """A failure after the answer started that no error event can tell (a body relayed as it came, or one
    outside the relays' own handling): the connection is closed, so the client sees the answer cut short,
    not a whole one nor a second response inside its body."""
    ctx.error_status = status
    if request.transport is not None:
        request.transport.abort()
    return web.StreamResponse()  # never sent: aiohttp finds the connection closed


async def _send(request: web.BaseRequest, resp: web.StreamResponse, ctx: Context) -> None:
    """Send a buffered answer now (aiohttp would after the handler returns; then it finds it sent)."""
    try:
        await resp.prepare(request)
        await resp.write_eof()
    except ConnectionResetError:
        ctx.outcome = "client_gone"


async def _expect(request: web.BaseRequest) -> None:
    """Answer ``Expect: 100-continue`` before the body is read, as aiohttp's router would."""
    if request.headers["expect"].lower() != "100-continue":
        raise ExpectationFailed
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0


def _client_gone(request: web.BaseRequest) -> bool:
    t = request.transport
    return t is None or t.is_closing()
