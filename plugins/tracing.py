"""OpenTelemetry traces: a server span per request, a client span per upstream attempt.

The server span starts at ``ctx.timings.start`` (its ids are chosen in ``on_request``) and
is finished in ``on_done`` with everything the request learnt: GenAI semantic-convention
attributes, usage, the route, the key id, cache hits, who answered and each plugin's time.
Client spans are created in ``on_done`` from ``ctx.attempts`` with their real start and end
times, so retries and fallbacks show as separate attempts; the only work on the request path
is each attempt's span id, chosen as it is sent (``ctx.on_attempt``) and propagated upstream
in its W3C ``traceparent``.
Because every time is known when a span is recorded, no live SDK span is ever made (its
lock per span, per-attribute validation, sampler objects and context switching would
cost several times the rest of the observers together). With OTLP/HTTP, ``on_done``
writes the spans straight as OTLP protobuf ``Span`` messages, assembled from encodings
cached per kind of request (route, model, status, key, upstream) plus the few values
new to each request (ids, times, tokens, cost), and a batcher thread posts them in
batches (plugins/_otel_wire.py). For the SDK's exporters (gRPC, console) the same spans
are built as SDK ``ReadableSpan`` objects and go through its ``BatchSpanProcessor``; a
test checks both give the same messages. Sampling follows the SDK's rules: trace-id
ratio for new traces, the caller's sampled flag when ``parent_based``.

Prompt and completion content is captured only with ``capture_content: true``, and
then it is what the request carried after the plugins before ``on_done`` changed it:
place ``tracing`` after ``pii`` in the chain so the completion is seen before PII
restoration, and the prompt is the redacted one.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any, Iterator, Literal

import orjson
from pydantic import Field, model_validator

from proxy import Context, Plugin, PluginConfig, StashKey, hookimpl

from . import _otel_wire as wire
from ._genai_messages import input_messages, output_messages, streamed_message, system_instructions
from ._pii_scope import endpoint_kind, stream_slots
from ._otel import (
    TRACE_ID_LIMIT,
    Clock,
    ExportSettings,
    PipelinePool,
    answer_attributes,
    format_traceparent,
    parse_traceparent,
    ratio_bound,
    request_attributes,
    server_address,
    truncate,
)
from .metrics import Bounded, OperationNames, error_type, finding_counts, route_name


TRACE: StashKey[tuple[int, int, int | None, bool]] = StashKey("tracing.trace")  # trace id, span id, parent id, sampled
OUTPUT: StashKey[str] = StashKey("tracing.output")
#: a stream's captured completion so far, per choice index
STREAMED: StashKey[dict[int, _Captured]] = StashKey("tracing.streamed")
#: the client span id each attempt sent upstream in its ``traceparent``, by attempt index
SENT_SPANS: StashKey[dict[int, int]] = StashKey("tracing.sent_spans")
#: who had answered (``ctx.answered_by``, ``ctx.answer_reason``) when this plugin read the answer: a plugin that
#: replaced it or cut its stream since changed them
READ_FROM: StashKey[tuple[str | None, str | None]] = StashKey("tracing.read_from")
ERROR_OUTCOMES = frozenset({"upstream_error", "plugin_error", "error"})
#: the stream channels (plugins._pii_scope.stream_slots) whose text a captured completion gathers
_TEXT_CHANNELS = frozenset({"text", "content", "refusal"})
_RESPONSE_TEXT = frozenset({"response.output_text.delta", "response.refusal.delta"})


class _Captured:
    """One choice's streamed text as pieces (appending to a string would copy it every time), its tool
    calls (:class:`_ToolCall` by the call's key, in the order they began) and the length of both."""

    __slots__ = ("pieces", "size", "tools", "last_tool")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.size = 0
        self.tools: dict[Any, _ToolCall] | None = None
        #: the key of the call a piece went to last (a piece without index, id or name continues it)
        self.last_tool: Any = None

    def keep(self, into: list[str], piece: str, limit: int) -> str:
        """Append to ``into`` what of ``piece`` fits under ``limit`` characters in all; the part kept."""
        piece = piece[:max(limit - self.size, 0)]
        if piece:
            into.append(piece)
            self.size += len(piece)
        return piece


class _ToolCall:
    """One streamed tool call: its id and name (from the piece that gives them), its arguments as pieces,
    and ``whole``: the arguments given whole (a ``.done`` event's complete text, or the JSON text of an
    object some servers send instead of a string), which then stand instead of the pieces."""

    __slots__ = ("id", "name", "pieces", "whole", "depth", "state")

    def __init__(self) -> None:
        self.id: Any = None
        self.name: Any = None
        self.pieces: list[str] = []
        self.whole: Any = None
        #: how deep the pieces so far are inside JSON objects and arrays, read as they come (:meth:`scan`)
        self.depth = 0
        #: 0 before the arguments' first character, 1 outside a string, 2 in one, 3 after its backslash,
        #: 4 once the arguments are whole JSON (their first object, array or string closed), 5 for a
        #: number or literal, whose end a piece cannot tell
        self.state = 0

    def arguments(self) -> Any:
        return self.whole if self.whole is not None else "".join(self.pieces)

    def complete(self) -> bool:
        """Whether the arguments are whole: given whole, or their JSON closed."""
        return self.whole is not None or self.state == 4

    def scan(self, piece: str) -> None:
        """Follow ``piece`` of the arguments (once each, so a stream costs its length, not its square)."""
        state, depth = self.state, self.depth
        for ch in piece:
            if state >= 4:
                break
            if state == 2:
                if ch == "\\":
                    state = 3
                elif ch == '"':
                    state = 4 if depth <= 0 else 1  # a string at the top is whole once it closes
            elif state == 3:
                state = 2
            elif ch == '"':
                state = 2
            elif ch in "{[":
                depth += 1
                state = 1
            elif ch in "}]":
                depth -= 1
                state = 4 if depth <= 0 else 1
            elif state == 0 and not ch.isspace():
                state = 5  # a number or literal at the top: where it ends cannot be told, so never whole here
        self.state, self.depth = state, depth


#: how a tool-call piece carries its arguments: a piece of them, or all of them
PIECE, WHOLE = 0, 1


def _unindexed(tools: dict[Any, _ToolCall], last: Any, cid: str | None, name: str | None) -> Any:
    """The key of a tool-call piece that has no ``index`` (servers that send whole calls): its id's call;
    else, with a name, a new call, unless it names the last call again while that call's arguments are
    not yet whole JSON (a server that repeats the name in every piece); else, bare, the last call."""
    if cid is not None:
        return ("id", cid)
    if last is not None and (name is None or (tools[last].name == name and not tools[last].complete())):
        return last
    return ("new", len(tools))


def _tool_pieces(data: Any) -> Iterator[tuple[int, Any, Any, Any, Any, int]]:
    """A streamed chunk's tool-call pieces as (choice index, call key, id, name, arguments, PIECE or WHOLE).

    Chat's ``tool_calls`` are keyed by their ``index``; without one the key is ``None`` and
    :func:`_unindexed` tells the calls apart (a server that sends whole calls without an index). The
    legacy ``function_call`` is one call. A Responses function call (in choice 0, as the stream's
    text) is keyed by its ``output_index``: ``output_item.added`` names it,
    ``function_call_arguments.delta`` carries pieces, and ``function_call_arguments.done`` and
    ``output_item.done`` the whole arguments. A first piece gives the id and name (later ones ``None``)."""
    if type(data) is not dict:
        return
    choices = data.get("choices")
    if type(choices) is list:
        for choice in choices:
            delta = choice.get("delta") if type(choice) is dict else None
            if type(delta) is not dict:
                continue
            i = choice.get("index", 0)
            i = i if type(i) is int else 0
            calls = delta.get("tool_calls")
            if type(calls) is list:
                for call in calls:
                    fn = call.get("function") if type(call) is dict else None
                    if type(fn) is dict:
                        idx = call.get("index")
                        yield i, idx if type(idx) is int else None, call.get("id"), fn.get("name"), fn.get("arguments"), PIECE
            fc = delta.get("function_call")
            if type(fc) is dict:
                yield i, "function", None, fc.get("name"), fc.get("arguments"), PIECE
        return
    kind = data.get("type")
    at = data.get("output_index")
    key = ("output", at if type(at) is int else 0)
    if kind == "response.function_call_arguments.delta":
        yield 0, key, None, None, data.get("delta"), PIECE
    elif kind == "response.function_call_arguments.done":
        yield 0, key, None, None, data.get("arguments"), WHOLE
    elif kind in ("response.output_item.added", "response.output_item.done"):
        item = data.get("item")
        if type(item) is dict and item.get("type") == "function_call":
            how = PIECE if kind == "response.output_item.added" else WHOLE
            yield 0, key, item.get("call_id"), item.get("name"), item.get("arguments"), how


class Tracing(Plugin):
    """Exports OpenTelemetry spans for every request of the route (OTLP HTTP/gRPC or console)."""

    name = "tracing"
    kind = "observer"
    #: gen_ai.usage.* on streams: ask the upstream for the stream's usage when the client did not
    needs_usage = True
    #: metering's on_done sets ctx.cost and the usage estimate the spans carry
    follows = ("metering",)

    class Config(PluginConfig):
        exporter: Literal["otlp_http", "otlp_grpc", "console", "none"] = Field(
            "otlp_http", description="Where spans go: OTLP over HTTP/protobuf, OTLP over gRPC, stdout, or nowhere (propagation only).")
        endpoint: str | None = Field(
            None, max_length=2048,
            description="Collector URL: for otlp_http the full traces URL (http://host:4318/v1/traces), for otlp_grpc host:port "
            "or http(s)://host:port. Default: the OTEL_EXPORTER_OTLP_* environment variables, else localhost.")
        headers: dict[str, str] = Field(
            default_factory=dict, description='Headers sent to the collector (authentication: use {"$env": NAME} values).')
        timeout_s: float = Field(10.0, gt=0, le=300, description="Timeout of one export call (in the exporter's thread).")
        compression: Literal["none", "gzip"] = Field("none", description="Compression of export requests.")
        insecure: bool | None = Field(
            None, description="otlp_grpc only: plaintext instead of TLS. Default: plaintext for http:// endpoints.")
        service_name: str = Field("sluice", min_length=1, max_length=256, description="The service.name resource attribute.")
        resource_attributes: dict[str, str] = Field(
            default_factory=dict, description="Extra resource attributes (deployment.environment, service.instance.id, ...).")
        sample_ratio: float = Field(
            1.0, ge=0.0, le=1.0, description="Share of new traces recorded (trace-id ratio sampling).")
        parent_based: bool = Field(
            True, description="Follow the sampling decision of an incoming traceparent instead of the ratio.")
        accept_traceparent: bool = Field(
            True, description="Continue the trace of a client's W3C traceparent (off: every request starts a new trace).")
        propagate: bool = Field(
            True, description="Send each upstream attempt a traceparent naming its client span (a client's tracestate passes on with its accepted traceparent, and is dropped with a new trace).")
        capture_content: bool = Field(
            False, description="Record prompts and completions on the server span (gen_ai.input.messages / "
            "gen_ai.output.messages) as left by the plugins before (redacted by pii).")
        max_content_chars: int = Field(
            16384, ge=64, le=1_048_576, description="Longest content recorded per attribute; longer is truncated.")
        plugin_timings: bool = Field(
            False, description="Record each plugin's time per phase as sluice.plugin.<id>.<phase>_ms (the metrics plugin "
            "already publishes them; on, they add about ten attributes per span).")
        max_queue_size: int = Field(
            8192, ge=16, le=1_000_000, description="Spans buffered for export; when full, new spans are dropped (never waited on).")
        max_export_batch_size: int = Field(512, ge=1, le=100_000, description="Spans per export request.")
        schedule_delay_ms: int = Field(1000, ge=1, le=600_000, description="Longest a span waits before its batch is exported.")

        @model_validator(mode="after")
        def _check(self) -> Tracing.Config:
            if self.insecure is not None and self.exporter != "otlp_grpc":
                raise ValueError("insecure applies to exporter otlp_grpc only")
            if self.endpoint is not None and self.exporter in ("console", "none"):
                raise ValueError(f"endpoint has no meaning with exporter {self.exporter}")
            if self.exporter == "otlp_http" and self.endpoint and not self.endpoint.startswith(("http://", "https://")):
                raise ValueError("endpoint of otlp_http must start with http:// or https://")
            return self

    def __init__(self, config: Config, runtime: Any) -> None:
        super().__init__(config, runtime)
        self.config: Tracing.Config = config
        self.pipeline: Any = None
        self.clock = Clock()
        self.bound = ratio_bound(config.sample_ratio)
        self._settings: ExportSettings | None = None
        self._servers: dict[str, tuple[str | None, int | None, str]] = {}
        self._otel: Any = None
        self._unset: Any = None
        self._operation = OperationNames()
        #: encoded attribute runs and span names per kind of request (see _encoded)
        self._parts: dict[tuple[Any, ...], bytes] = {}
        #: an encoder per ctx.timings.plugins key ("plugin-id.phase"): its attribute's key is encoded once
        self._timing_attrs: dict[str, Any] = Bounded(1024)  # keys are plugin ids and phases
        if config.exporter == "none":
            self.needs_usage = False  # type: ignore[misc]  # propagation only: no span to put usage on
            self.follows = ()
        elif config.capture_content:
            # this plugin's on_response must see the completion before pii restores it (on_response runs in reverse)
            self.follows = ("metering", "pii")
        if not config.capture_content:
            # on_response and on_chunk only keep the completion for capture_content: without it, no hook
            # at all, so a route whose other plugins have none skips the response phase and relays
            # streams raw (the chain builds its hook lists from the instance's attributes)
            self.on_response = None  # type: ignore[assignment]
            self.on_chunk = None  # type: ignore[assignment]

    @property
    def wants_plugin_timings(self) -> bool:  # type: ignore[override]
        # the hooks are timed only when a plugin of the route asks: without the metrics plugin, tracing must
        return self.config.plugin_timings

    async def start(self) -> None:
        # the SDK and an exporter's stack (requests, grpc) take a while to import the first
        # time: in the executor, so a reload that adds tracing does not stall the loop
        await self.runtime.run_cpu(_import_sdk, self.config.exporter)
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

        self._otel = (ReadableSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags(1), TraceState)
        self._unset = Status(StatusCode.UNSET)
        c = self.config
        insecure = c.insecure
        if c.exporter == "otlp_grpc" and insecure is None and c.endpoint:
            insecure = c.endpoint.startswith("http://")
        self._settings = ExportSettings(
            exporter=c.exporter, endpoint=c.endpoint, headers=tuple(sorted(c.headers.items())), timeout_s=c.timeout_s,
            compression=c.compression, insecure=insecure, service_name=c.service_name,
            resource=tuple(sorted(c.resource_attributes.items())),
            max_queue_size=c.max_queue_size, max_export_batch_size=c.max_export_batch_size, schedule_delay_ms=c.schedule_delay_ms,
        )
        self.pipeline = self.runtime.shared("tracing.pipelines", PipelinePool).acquire(self._settings)
        self.clock = Clock()
        config = getattr(self.runtime, "config", None)
        for name, up in (getattr(config, "upstreams", None) or {}).items():
            host, port = server_address(up.url)
            self._servers[name] = (host, port, "openai" if up.kind == "openai" else up.kind)

    async def stop(self) -> None:
        if self._settings is None:
            return
        pipeline = self.runtime.shared("tracing.pipelines", PipelinePool).release(self._settings)
        self._settings = None
        if pipeline is not None:
            # shutdown joins the export thread after a last flush: never on the loop
            await asyncio.get_running_loop().run_in_executor(None, pipeline.shutdown)

    # -- request path ---------------------------------------------------------------
    def _trace(self, ctx: Context) -> tuple[int, int, int | None, bool]:
        """This request's (trace id, server span id, parent span id, sampled), decided once."""
        found = ctx.stash.get(TRACE)
        if found is not None:
            return found
        parent = None
        if self.config.accept_traceparent:
            tp = ctx.headers.get("traceparent")
            if tp is not None:
                parent = parse_traceparent(tp)
        if parent is not None:
            trace_id, parent_id, flags = parent
            sampled = bool(flags & 1) if self.config.parent_based else (trace_id & TRACE_ID_LIMIT) < self.bound
        else:
            trace_id, parent_id = random.getrandbits(128) or 1, None
            sampled = (trace_id & TRACE_ID_LIMIT) < self.bound
        found = ctx.stash[TRACE] = (trace_id, random.getrandbits(64) or 1, parent_id, sampled)
        return found

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered or self.pipeline is None:
            return
        trace_id, span_id, parent_id, sampled = self._trace(ctx)
        if self.config.propagate:
            # each attempt sends a traceparent naming its own client span (_propagate), so the
            # upstream's spans are children of the attempt that reached it
            hooks = ctx.on_attempt
            if hooks is None:
                ctx.on_attempt = [self._propagate]
            else:
                hooks.append(self._propagate)
            if parent_id is None and "tracestate" in ctx.headers:
                # a new trace (no traceparent, an invalid one, or one not accepted): the caller's
                # tracestate belongs to another trace, and W3C Trace Context says to drop it
                ctx.headers.popall("tracestate")

    def _propagate(self, ctx: Context, att: Any, headers: Any) -> None:
        """Before an attempt is sent: its client span's id, kept for ``on_done``, in the ``traceparent``
        it carries."""
        trace_id, _, _, sampled = ctx.stash[TRACE]
        span = random.getrandbits(64) or 1
        sent = ctx.stash.get(SENT_SPANS)
        if sent is None:
            sent = ctx.stash[SENT_SPANS] = {}
        sent[len(ctx.attempts) - 1] = span
        headers["traceparent"] = format_traceparent(trace_id, span, sampled)

    @hookimpl
    def on_response(self, ctx: Context) -> None:
        if not self.config.capture_content or ctx.response is None:
            return
        found = ctx.stash.get(TRACE)
        if found is None or not found[3]:
            return
        if ctx.response.status >= 400:
            return  # an error's body is no completion
        outputs = output_messages(ctx.response.json)
        if outputs:
            ctx.stash[OUTPUT] = orjson.dumps(outputs).decode()
            ctx.stash[READ_FROM] = (ctx.answered_by, ctx.answer_reason)

    @hookimpl
    def on_chunk(self, ctx: Context, event: Any) -> None:
        """With ``capture_content``, a stream's completion as this plugin sees it: after the chain, it
        runs before ``pii`` restores the values it redacted (``on_chunk`` runs in reverse chain order)."""
        found = ctx.stash.get(TRACE)
        if found is None or not found[3]:
            return
        data = event.json
        for chan, container, key in stream_slots(data):
            # a choice's text, content or refusal; a Responses stream's output text (one message)
            kind = chan[0]
            if kind in _TEXT_CHANNELS or (kind == "resp" and chan[3] in _RESPONSE_TEXT):
                piece = container[key]
                if piece:
                    i = chan[1] if kind != "resp" else 0
                    self._gather(ctx, i if type(i) is int else 0, piece)
        for i, call, cid, name, arguments, how in _tool_pieces(data):
            self._gather_tool(ctx, i, call, cid, name, arguments, how)

    def _choice(self, ctx: Context, i: int) -> _Captured:
        """What is gathered of choice ``i`` of the stream."""
        streamed = ctx.stash.setdefault(STREAMED, {})
        got = streamed.get(i)
        if got is None:
            got = streamed[i] = _Captured()
            ctx.stash.setdefault(READ_FROM, (ctx.answered_by, ctx.answer_reason))
        return got

    def _gather(self, ctx: Context, i: int, piece: str) -> None:
        """Keep ``piece`` of choice ``i``'s text, up to one past ``max_content_chars``."""
        got = self._choice(ctx, i)
        got.keep(got.pieces, piece, self.config.max_content_chars + 1)  # one past the limit: truncate() then marks the cut

    def _gather_tool(self, ctx: Context, i: int, call: Any, cid: Any, name: Any, arguments: Any, how: int) -> None:
        """Keep a piece (or the whole) of one of choice ``i``'s tool calls, and its id and name when it names
        them; its arguments count towards the choice's ``max_content_chars``."""
        got = self._choice(ctx, i)
        tools = got.tools
        if tools is None:
            tools = got.tools = {}
        cid = cid if type(cid) is str and cid else None  # an empty id or name is none (some servers send "")
        name = name if type(name) is str and name else None
        if call is None:
            call = _unindexed(tools, got.last_tool, cid, name)
        found = tools.get(call)
        if found is None:
            if len(tools) >= MAX_TOOL_CALLS:
                got.last_tool = None  # the pieces that would continue this call are not kept either
                return
            found = tools[call] = _ToolCall()
        got.last_tool = call
        if cid is not None and found.id is None:
            found.id = cid
        if name is not None and found.name is None:
            found.name = name
        if arguments is None or arguments == "":
            return
        limit = self.config.max_content_chars + 1
        if type(arguments) is not str:
            # an object (some servers send one): kept as its JSON text, so that it counts towards the bound
            try:
                arguments = orjson.dumps(arguments).decode()
            except (TypeError, orjson.JSONEncodeError):
                return
            how = WHOLE
        if how == WHOLE:
            # the whole arguments: they replace what was gathered (a .done event repeats the deltas)
            got.size -= sum(map(len, found.pieces)) + (len(found.whole) if found.whole is not None else 0)
            found.pieces.clear()
            found.whole = arguments[:max(limit - got.size, 0)]
            got.size += len(found.whole)
        elif found.whole is None:
            found.scan(got.keep(found.pieces, arguments, limit))

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        if self.pipeline is None:
            return
        # answered before reaching us: traced all the same, but without the prompt, which the plugins
        # before us (pii) may not have seen (an auth 401, a limit's 429, a guard's block)
        reached = TRACE in ctx.stash
        trace = self._trace(ctx)
        if not trace[3]:
            return
        streamed = ctx.stash.get(STREAMED) if self.config.capture_content else None
        if streamed and OUTPUT not in ctx.stash:
            ctx.stash[OUTPUT] = _streamed_output(ctx, streamed)
        pipeline = self.pipeline
        if pipeline.wire is not None:
            add = pipeline.wire.add
            for encoded in self._encoded(ctx, trace, reached):
                add(encoded)
        elif pipeline.processor is not None:
            on_end = pipeline.processor.on_end
            for span in self._spans(ctx, trace, reached):
                on_end(span)

    # -- spans --------------------------------------------------------------------------
    def _spans(self, ctx: Context, trace: tuple[int, int, int | None, bool], reached: bool = True) -> list[Any]:
        """The request's spans as SDK ``ReadableSpan`` objects (client spans, then the server span)."""
        ReadableSpan, SpanContext, SpanKind, Status, StatusCode, sampled_flags, TraceState = self._otel
        trace_id, span_id, parent_id, _ = trace
        pipeline = self.pipeline
        # tracestate may come as several header fields: W3C Trace Context combines them in order
        tracestate = ctx.headers.getall("tracestate", None) if parent_id is not None else None
        state = TraceState.from_header(tracestate) if tracestate else None
        own = SpanContext(trace_id, span_id, False, sampled_flags, state)
        parent = SpanContext(trace_id, parent_id, True, sampled_flags, state) if parent_id is not None else None
        epoch = self.clock.epoch_ns
        c = self.config
        t = ctx.timings
        end_ns = epoch(t.end) if t.end is not None else time.time_ns()
        op = self._operation(ctx)
        route = route_name(ctx)
        asked = ctx.model
        attrs: dict[str, Any] = {"http.request.method": ctx.method, "url.path": ctx.path, "sluice.request_id": ctx.request_id}
        body = ctx.json_body
        _kind_attributes(attrs, ctx, op, route, ctx.outcome or "unknown", asked, request_attributes(body) if body is not None else None)
        _findings_and_timings(ctx, c.plugin_timings, attrs)
        if t.first_byte is not None and ctx.stream:
            attrs["gen_ai.response.time_to_first_chunk"] = max(t.first_byte - t.start, 0.0)
        usage = ctx.usage
        usage_attrs: dict[str, Any] = {}
        if usage is not None:
            usage_attrs = {
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
            }
            if usage.cached_tokens:
                usage_attrs["gen_ai.usage.cache_read.input_tokens"] = usage.cached_tokens
            if usage.reasoning_tokens:
                usage_attrs["gen_ai.usage.reasoning.output_tokens"] = usage.reasoning_tokens
            if usage.estimated:
                usage_attrs["sluice.usage.estimated"] = True
            attrs.update(usage_attrs)
        if ctx.cost is not None:
            attrs["sluice.cost"] = ctx.cost
        resp_attrs: dict[str, Any] = {}
        answer = ctx.answer if ctx.upstream is not None else None  # buffered or streamed, as the core read it
        if answer is not None:
            resp_attrs = answer_attributes(answer.id, answer.model, answer.finish_reasons)
            attrs.update(resp_attrs)
        if ctx.upstream is not None:
            _, _, provider = self._servers.get(ctx.upstream.upstream, (None, None, "openai"))
            attrs["gen_ai.provider.name"] = provider
            attrs["sluice.upstream"] = ctx.upstream.upstream
            if "gen_ai.response.model" not in attrs and ctx.upstream.model:
                attrs["gen_ai.response.model"] = ctx.upstream.model
        if c.capture_content and body is not None:
            attrs.update(_captured(ctx, body, reached, c.max_content_chars))

        spans = []
        n = len(ctx.attempts)
        sent = ctx.stash.get(SENT_SPANS) or _NONE_SENT
        for i, a in enumerate(ctx.attempts):
            model = a.target.model or asked
            cattrs = self._attempt_attributes(op, i, a, model)
            if a.first_byte is not None:
                cattrs["sluice.time_to_first_byte"] = max(a.first_byte - a.start, 0.0)
            failed = _attempt_failed(a)
            if a.error:
                cattrs["error.type"] = a.error
            elif failed:
                cattrs["error.type"] = str(a.status)
            if i == n - 1 and ctx.upstream is not None and not failed:
                cattrs.update(usage_attrs)
                cattrs.update(resp_attrs)
                if t.first_byte is not None and ctx.stream:
                    cattrs["gen_ai.response.time_to_first_chunk"] = max(t.first_byte - a.start, 0.0)
            a_end = a.end if a.end is not None else (t.upstream_end if t.upstream_end is not None else t.end)
            spans.append(ReadableSpan(
                f"{op} {model}" if model else op,
                context=SpanContext(trace_id, sent.get(i) or random.getrandbits(64) or 1, False, sampled_flags, state),
                parent=own, resource=pipeline.resource, attributes=cattrs, kind=SpanKind.CLIENT,
                status=Status(StatusCode.ERROR, a.error or f"HTTP {a.status}") if failed else self._unset,
                start_time=epoch(a.start), end_time=epoch(a_end) if a_end is not None else end_ns,
                instrumentation_scope=pipeline.scope,
            ))
        status = self._unset
        ended = ctx.error_status or ctx.status  # a stream's error event after its 200 is what it ended in
        if _server_failed(ctx.outcome, ended):
            attrs["error.type"] = error_type(ended, ctx.outcome)
            status = Status(StatusCode.ERROR, attrs["error.type"])
        spans.append(ReadableSpan(
            f"{ctx.method} {route}", context=own, parent=parent, resource=pipeline.resource, attributes=attrs,
            kind=SpanKind.SERVER, status=status, start_time=epoch(t.start), end_time=end_ns,
            instrumentation_scope=pipeline.scope,
        ))
        return spans

    def _attempt_attributes(self, op: str, i: int, a: Any, model: str | None) -> dict[str, Any]:
        """A client span's attributes but its time to first byte, in span order."""
        host, port, provider = self._servers.get(a.target.upstream, (None, None, "openai"))
        out: dict[str, Any] = {"gen_ai.operation.name": op, "gen_ai.provider.name": provider,
                               "sluice.upstream": a.target.upstream, "sluice.attempt": i}
        if model:
            out["gen_ai.request.model"] = model
        if a.target.label:
            out["sluice.target.label"] = a.target.label
        if host:
            out["server.address"] = host
        if port:
            out["server.port"] = port
        if a.status is not None:
            out["http.response.status_code"] = a.status
        return out

    def _encoded(self, ctx: Context, trace: tuple[int, int, int | None, bool], reached: bool = True) -> list[bytes]:
        """The spans of :meth:`_spans` as OTLP ``Span`` messages, byte for byte what ``_otel_wire.span`` makes of them.

        Most of a span's attributes are the same for every request of a kind (route, model,
        status, key, upstream, attempt): their encodings are cached per kind as runs of
        bytes, in the order :meth:`_spans` gives them, and only the per-request values (ids,
        times, tokens, cost, the response id) are encoded for each request. No attribute
        dicts, no span objects: a request's spans cost a few joins.
        tests/plugins/test_tracing_wire.py checks both methods give the same messages.
        """
        trace_id, span_id, parent_id, _ = trace
        c = self.config
        t = ctx.timings
        offset = self.clock.offset_ns  # Clock.epoch_ns, inline: int(perf_s * 1e9) + offset
        end_ns = int(t.end * 1e9) + offset if t.end is not None else time.time_ns()
        op = self._operation(ctx)
        route = route_name(ctx)
        asked = ctx.model
        parts = self._parts
        if len(parts) >= PARTS_MAX:
            parts.clear()  # bounded: paths, models and key ids are client text
        tid = b"\x0a\x10" + trace_id.to_bytes(16, "big")
        state = b""
        if parent_id is not None:
            headers = ctx.headers.getall("tracestate", None)  # every field, in order (W3C Trace Context)
            if headers:
                ts = self._otel[6].from_header(headers)
                if ts:
                    state = wire.trace_state(ts.to_header())

        # the server span's attributes, in _spans' order
        method, path = ctx.method, ctx.path
        body = ctx.json_body
        params = request_attributes(body) if body is not None else None
        ident = ctx.identity
        tags = ctx.tags
        status = ctx.status
        outcome = ctx.outcome or "unknown"
        # one lookup per kind of request: the attributes before the request id, those after it, the span's name
        key: tuple[Any, ...] = (
            1, method, path, op, route, outcome, asked, status, None if ident is None else (ident.key_id, ident.team),
            ctx.answered_by and (ctx.answered_by, ctx.answer_reason or ""), _tags_key(tags) if tags else None,
            _params_key(params) if params else None)
        found = parts.get(key)
        if found is None:
            found = parts[key] = (
                wire.attributes(9, {"http.request.method": method, "url.path": path}),
                wire.attributes(9, _kind_attributes({}, ctx, op, route, outcome, asked, params)),
                wire.span_name(f"{method} {route}"),
            )
        head, kind, server_name = found
        attrs = [head, _REQUEST_ID(ctx.request_id), kind]
        if ctx.annotations:
            attrs.append(wire.attributes(9, _findings_and_timings(ctx, False, {})))
        if c.plugin_timings:
            # _findings_and_timings' timing attributes, without a dict or a key string per request
            encoders = self._timing_attrs
            for key, seconds in t.plugins.items():
                enc = encoders.get(key)
                if enc is None:
                    enc = encoders[key] = wire.float_attribute(_timing_name(key))
                attrs.append(enc(round(seconds * 1000, 4)))
        if t.first_byte is not None and ctx.stream:
            attrs.append(_TTFT(max(t.first_byte - t.start, 0.0)))
        usage = ctx.usage
        used = b""
        if usage is not None:
            p_, c_, ca, re_ = usage.prompt_tokens, usage.completion_tokens, usage.cached_tokens, usage.reasoning_tokens
            # types in the key: 21 and 21.0 are equal keys but different attributes
            key = (7, p_, c_, ca, re_, not usage.estimated, type(p_), type(c_), type(ca), type(re_))
            used = parts.get(key)
            if used is None:
                d = {"gen_ai.usage.input_tokens": p_, "gen_ai.usage.output_tokens": c_}
                if ca:
                    d["gen_ai.usage.cache_read.input_tokens"] = ca
                if re_:
                    d["gen_ai.usage.reasoning.output_tokens"] = re_
                if usage.estimated:
                    d["sluice.usage.estimated"] = True
                used = parts[key] = wire.attributes(9, d)
            attrs.append(used)
        if ctx.cost is not None:
            attrs.append(_COST(ctx.cost))
        answer = b""
        upstream = ctx.upstream
        if upstream is not None:
            # answer_attributes' values, without its dict: the id is new every time; the model
            # and finish reasons repeat. One lookup gives their attributes (when there is an answer)
            # and those of the upstream that served it.
            rid = rmodel = None
            reasons: tuple[str, ...] = ()
            said = ctx.answer  # buffered or streamed, as the core read it
            answered = said is not None
            if answered:
                rid, rmodel, reasons = said.id, said.model, tuple(said.finish_reasons)
            key = (6, answered, rmodel, reasons, upstream.upstream, upstream.model)
            found = parts.get(key)
            if found is None:
                d: dict[str, Any] = {}
                if rmodel is not None:
                    d["gen_ai.response.model"] = rmodel
                if reasons:
                    d["gen_ai.response.finish_reasons"] = list(reasons)
                _, _, provider = self._servers.get(upstream.upstream, (None, None, "openai"))
                fallback = upstream.model if upstream.model and rmodel is None else None  # the answer named none
                served = {"gen_ai.provider.name": provider, "sluice.upstream": upstream.upstream}
                if fallback:
                    served["gen_ai.response.model"] = fallback
                found = parts[key] = (wire.attributes(9, d), wire.attributes(9, served))
            rest, served_attrs = found
            if answered:
                answer = (_RESPONSE_ID(rid) if isinstance(rid, str) else b"") + rest
                attrs.append(answer)
            attrs.append(served_attrs)
        if c.capture_content and body is not None:
            attrs.extend(_attr(k, v) for k, v in _captured(ctx, body, reached, c.max_content_chars))
        server_status = wire.STATUS_UNSET
        ended = ctx.error_status or status  # a stream's error event after its 200 is what it ended in
        if _server_failed(ctx.outcome, ended):
            why = error_type(ended, ctx.outcome)
            attrs.append(_attr("error.type", why))
            server_status = wire.status_error(why)

        spans = []
        n = len(ctx.attempts)
        sent = ctx.stash.get(SENT_SPANS) or _NONE_SENT
        for i, a in enumerate(ctx.attempts):
            target = a.target
            model = target.model or asked
            key = (3, op, target.upstream, i, model, target.label, a.status)
            found = parts.get(key)
            if found is None:
                found = parts[key] = (wire.attributes(9, self._attempt_attributes(op, i, a, model)),
                                      wire.span_name(f"{op} {model}" if model else op))
            cattrs, name = found
            if a.first_byte is not None:
                cattrs += _TTFB(max(a.first_byte - a.start, 0.0))
            failed = _attempt_failed(a)
            if a.error:
                cattrs += _attr("error.type", a.error)
            elif failed:
                cattrs += _attr("error.type", str(a.status))
            if i == n - 1 and upstream is not None and not failed:
                cattrs += used + answer
                if t.first_byte is not None and ctx.stream:
                    cattrs += _TTFT(max(t.first_byte - a.start, 0.0))
            a_end = a.end if a.end is not None else (t.upstream_end if t.upstream_end is not None else t.end)
            spans.append(wire.assemble(
                tid, sent.get(i) or random.getrandbits(64) or 1, state, span_id, name, wire.KIND_CLIENT, int(a.start * 1e9) + offset,
                int(a_end * 1e9) + offset if a_end is not None else end_ns, cattrs,
                wire.status_error(a.error or f"HTTP {a.status}") if failed else wire.STATUS_UNSET, wire.FLAGS_LOCAL,
            ))
        spans.append(wire.assemble(
            tid, span_id, state, parent_id, server_name, wire.KIND_SERVER, int(t.start * 1e9) + offset, end_ns, b"".join(attrs), server_status,
            wire.FLAGS_REMOTE if parent_id is not None else wire.FLAGS_LOCAL,
        ))
        return spans


_NONE_SENT: dict[int, int] = {}

#: most cached attribute runs per tracing instance (the cache starts again when full)
PARTS_MAX = 4096
#: most tool calls of one choice a captured stream keeps
MAX_TOOL_CALLS = 128


_REQUEST_ID = wire.str_attribute("sluice.request_id")
_RESPONSE_ID = wire.str_attribute("gen_ai.response.id")
#: the GenAI span attribute (gen_ai.server.time_to_first_token is a metric's name, not an attribute's)
_TTFT = wire.float_attribute("gen_ai.response.time_to_first_chunk")
_TTFB = wire.float_attribute("sluice.time_to_first_byte")
_COST = wire.float_attribute("sluice.cost")


def _captured(ctx: Context, body: Any, reached: bool, limit: int) -> list[tuple[str, str]]:
    """With ``capture_content``: the prompt (only when the request reached this plugin, so that the
    plugins before it saw it) and the completion gathered, as GenAI messages cut at ``limit``.

    Withheld (``sluice.content_withheld`` says why) where a screen did not redact them: nothing when
    a plugin failed open on this request (a pii timeout: the prompt and the answer went unscreened);
    no completion when a plugin replaced the answer or cut its stream after this plugin read it (a pii
    screen that failed closed), or when pii found personal data the model wrote (it redacts that for
    the client after this plugin read the answer: ``on_response`` and ``on_chunk`` run in reverse chain
    order).
    """
    if ctx.failed_open:
        return [("sluice.content_withheld", "plugin_failed_open")]
    out = []
    content = input_messages(body) if reached else None
    if content is not None:
        out.append(("gen_ai.input.messages", truncate(orjson.dumps(content).decode(), limit)))
    # a Responses request's only: the one kind whose ``instructions`` pii screens (elsewhere the field is no prompt)
    system = system_instructions(body) if reached and endpoint_kind(ctx.path, body) == "responses" else None
    if system is not None:
        out.append(("gen_ai.system_instructions", truncate(orjson.dumps(system).decode(), limit)))
    completion = ctx.stash.get(OUTPUT)
    if completion is not None:
        if ctx.stash.get(READ_FROM, (ctx.answered_by, ctx.answer_reason)) != (ctx.answered_by, ctx.answer_reason):
            # a plugin replaced the answer or cut its stream after this plugin read it (pii's answer screen
            # failing closed), whether the upstream's or a plugin's (a cache hit): the client never got it,
            # and no screen passed it
            out.append(("sluice.content_withheld", "answer_replaced"))
        elif finding_counts(ctx.annotations.get("pii_answer")):
            out.append(("sluice.content_withheld", "answer_personal_data"))
        else:
            out.append(("gen_ai.output.messages", truncate(completion, limit)))
    return out


def _streamed_output(ctx: Context, streamed: dict[int, _Captured]) -> str:
    """A stream's captured choices as GenAI output messages (JSON), each with its finish reason (a choice
    that never said one: ``stop`` when the stream ended well)."""
    end = ctx.stream_end
    reasons = end.reasons if end is not None else {}
    out = []
    for i in sorted(streamed):
        got = streamed[i]
        tools = [(t.id, t.name, t.arguments()) for t in got.tools.values()] if got.tools else None
        out.append(streamed_message("".join(got.pieces), reasons.get(i, "stop" if ctx.outcome == "ok" else None), tools))
    return orjson.dumps(out).decode()


def _attempt_failed(a: Any) -> bool:
    """Whether an attempt's client span is an error: no answer, or a 4xx or 5xx one (OpenTelemetry's
    HTTP rule for client spans)."""
    return a.error is not None or (a.status is not None and a.status >= 400)


def _server_failed(outcome: str | None, status: int | None) -> bool:
    """Whether the server span is an error, by OpenTelemetry's HTTP rule: a 5xx is, a 4xx is the
    caller's (an upstream's 400 passed through included); an outcome that failed with no error status
    (a stream cut after its 200) is too."""
    if status is not None and status >= 400:
        return status >= 500
    return outcome in ERROR_OUTCOMES


def _attr(key: str, value: Any) -> bytes:
    """One span attribute's bytes (nothing for ``None``, as the SDK leaves such attributes out)."""
    return b"" if value is None else wire.span_attribute(key, value)


def _tags_key(tags: dict[str, Any]) -> tuple[Any, ...]:
    # values recorded as str(v): a non-string keeps its type, so 1 and True stay apart
    return tuple([(k, v if type(v) is str else (type(v), str(v))) for k, v in tags.items()])


def _params_key(params: dict[str, Any]) -> tuple[Any, ...]:
    # 1, 1.0 and True are equal keys but different attributes; -0.0 and 0.0 too: types and exact floats
    return tuple([(k, type(v), v.hex() if type(v) is float else tuple(v) if type(v) is list else v) for k, v in params.items()])


def _import_sdk(exporter: str) -> None:
    import opentelemetry.sdk.trace  # noqa: F401
    import opentelemetry.sdk.trace.export  # noqa: F401

    if exporter == "otlp_http":
        import requests  # noqa: F401
    elif exporter == "otlp_grpc":
        import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401


def _findings_and_timings(ctx: Context, plugin_timings: bool, out: dict[str, Any]) -> dict[str, Any]:
    """The guards' findings (counts by type, as metrics counts them) and, when asked, each hook's time,
    as span attributes into ``out``."""
    for plugin_id, annotation in ctx.annotations.items():
        for kind, n in finding_counts(annotation):
            out[f"sluice.finding.{plugin_id}.{kind}"] = n
    if plugin_timings:
        for key, seconds in ctx.timings.plugins.items():
            out[_timing_name(key)] = round(seconds * 1000, 4)
    return out


def _timing_name(key: str) -> str:
    """The span attribute of a hook's time, from its ``ctx.timings.plugins`` key ("plugin-id.phase")."""
    return f"sluice.plugin.{key}_ms"


def _kind_attributes(out: dict[str, Any], ctx: Context, op: str, route: str, outcome: str, asked: str | None,
                     params: dict[str, Any] | None) -> dict[str, Any]:
    """The server span's attributes that are the same for every request of a kind, in span order, into ``out``."""
    out["gen_ai.operation.name"] = op
    out["sluice.route"] = route
    out["sluice.outcome"] = outcome
    if asked:
        out["gen_ai.request.model"] = asked
    if params:
        out.update(params)
    if ctx.status is not None:
        out["http.response.status_code"] = ctx.status
    ident = ctx.identity
    if ident is not None:
        out["sluice.key_id"] = ident.key_id
        if ident.team:
            out["sluice.team"] = ident.team
    if ctx.answered_by:
        out["sluice.answered_by"] = ctx.answered_by
        out["sluice.answer_reason"] = ctx.answer_reason or ""
    cache = ctx.tags.get("cache")
    if cache is not None:
        out["sluice.cache_hit"] = cache == "hit"
    for k, v in ctx.tags.items():
        if k != "cache":
            out[f"sluice.tag.{k}"] = str(v)
    return out
