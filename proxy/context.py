"""The per-request context handed to every hook."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterable, Callable, Generic, Iterable, Mapping, TypeVar

import orjson
from multidict import CIMultiDict

from .errors import ProxyError
from .sse import JSONTooDeep, dump_json

if TYPE_CHECKING:  # pragma: no cover
    from .chain import CompiledRoute
    from .sse import Event

T = TypeVar("T")
_UNPARSED: Any = object()
#: a buffered answer up to this size is parsed whole for its usage (and the parse shared)
SHARED_PARSE_LIMIT = 32 * 1024
#: ``ctx.answer`` parses a buffered answer up to this size; of a bigger one (an embeddings batch) it reads
#: only the model and id, from the bytes: a parse of a few MB holds the event loop for milliseconds
ANSWER_PARSE_LIMIT = 1024 * 1024

_openai: Any = None


def _wire() -> Any:
    """proxy.openai, which imports this module: imported on first use, then kept."""
    global _openai
    if _openai is None:
        from . import openai

        _openai = openai
    return _openai


class StashKey(Generic[T]):
    """A typed key into ``ctx.stash``: each plugin owns its keys, so no two collide."""

    __slots__ = ("name",)

    def __init__(self, name: str = "") -> None:
        self.name = name

    def __repr__(self) -> str:  # pragma: no cover
        return f"StashKey({self.name!r})"


class Stash:
    """Per-request private state for plugins, keyed by :class:`StashKey` objects."""

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._d[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        return self._d[key]

    def get(self, key: StashKey[T], default: Any = None) -> T | Any:
        return self._d.get(key, default)

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return self._d.setdefault(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __delitem__(self, key: StashKey[T]) -> None:
        del self._d[key]


@dataclass(slots=True)
class Identity:
    """Who is calling. Set by an auth plugin; read by limits, metering, cache scope."""

    key_id: str
    name: str | None = None
    team: str | None = None
    user: str | None = None
    models: tuple[str, ...] | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Target:
    """Where a request may go: an upstream by name, optionally a model name to send."""

    upstream: str
    model: str | None = None
    #: a label recorded with the attempt (alias, experiment variant, ...)
    label: str | None = None
    #: skip this target while its upstream has this many requests in flight (the core's count, checked as
    #: the attempt is made: a router's choice may be stale by then, other requests having taken the room)
    max_concurrency: int | None = None


@dataclass(slots=True)
class Attempt:
    """One upstream attempt, as the upstream client made it."""

    target: Target
    start: float
    status: int | None = None
    error: str | None = None  # connect | timeout | protocol | cancelled (the client left) | None
    first_byte: float | None = None
    end: float | None = None
    #: cancelled or timed out before it had a connection to the upstream (waiting for the pool, or
    #: connecting): the upstream never saw the request
    unsent: bool = False


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    #: True when counted by Sluice rather than reported by the upstream
    estimated: bool = False


@dataclass(slots=True)
class StreamEnd:
    """What an answer said about itself. For a stream (``ctx.stream_end``), kept by the core when some
    plugin reads answers (an on_done, response or chunk hook): from the events that finish a choice or
    carry a refusal, and the model and id from its first piece when those never named them (a stream
    cut before it finished). For a buffered answer, read from its body by ``ctx.answer``, which
    gives either kind."""

    #: the ``model`` and ``id`` the stream named (its finishing events, else its first piece)
    model: str | None = None
    id: str | None = None
    #: each choice's ``finish_reason``, by choice index
    reasons: dict[int, str] = field(default_factory=dict)
    #: some choice's delta carried a ``refusal``
    refusal: bool = False
    #: a buffered answer's choices (a stream's are not counted: 0)
    choices: int = 0

    @property
    def finish_reasons(self) -> list[str]:
        """The finish reasons in choice order."""
        return [self.reasons[i] for i in sorted(self.reasons)]


def answer_of(body: Any) -> StreamEnd | None:
    """A buffered answer's (a parsed JSON body's) model, id, finish reasons by choice index (a choice without
    an ``index`` counts by its place) and whether some choice's message carries a refusal; ``None`` when the
    body is not a JSON object. Values that are not strings (or are empty) are left out, as for a stream."""
    if type(body) is not dict:
        return None
    model, rid = body.get("model"), body.get("id")
    found = StreamEnd(model if type(model) is str and model else None, rid if type(rid) is str and rid else None)
    choices = body.get("choices")
    if type(choices) is list:
        reasons = found.reasons
        for pos, choice in enumerate(choices):
            if type(choice) is not dict:
                continue
            found.choices += 1
            reason = choice.get("finish_reason")
            if type(reason) is str:
                i = choice.get("index")
                reasons.setdefault(i if type(i) is int else pos, reason)
            msg = choice.get("message")
            if type(msg) is dict and msg.get("refusal"):
                found.refusal = True
    return found


def _answer_from_bytes(body: bytes) -> StreamEnd | None:
    """A big buffered answer's model and id, found in its bytes as a stream's first piece is read; nothing
    parsed, no choices counted. ``None`` when the body is not a JSON object."""
    if body[:64].lstrip()[:1] != b"{":
        return None
    from .relay import named  # the relay imports this module

    return StreamEnd(*named(body))


@dataclass(slots=True)
class Timings:
    """Monotonic stamps (``time.perf_counter()``); ``None`` where a stage did not happen."""

    start: float = 0.0
    upstream_start: float | None = None
    #: the answer's first byte: a stream's first body bytes (its first token: a model server sends
    #: the headers before it), a buffered answer's headers (``Attempt.first_byte`` is the headers' for both)
    first_byte: float | None = None
    upstream_end: float | None = None
    end: float | None = None
    #: CPU-free wall time spent inside plugin hooks, by "plugin-id.phase"
    plugins: dict[str, float] = field(default_factory=dict)


class Response:
    """A buffered answer: from the upstream, or an early reply."""

    __slots__ = ("status", "headers", "_body", "_json", "_answer")

    def __init__(self, status: int, headers: CIMultiDict[str] | Mapping[str, str] | None, body: bytes) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers or {})
        self._body = body
        self._json: Any = _UNPARSED
        self._answer: Any = _UNPARSED

    @property
    def body(self) -> bytes:
        return self._body

    @body.setter
    def body(self, value: bytes) -> None:
        self._body = value
        self._json = self._answer = _UNPARSED

    @property
    def json(self) -> Any:
        """The parsed body, or ``None`` when it is not JSON."""
        if self._json is _UNPARSED:
            try:
                self._json = orjson.loads(self._body) if self._body else None
            except orjson.JSONDecodeError:
                self._json = None
        return self._json

    def set_json(self, value: Any) -> None:
        self._body = dump_json(value)
        self._json = value
        self._answer = _UNPARSED

    @property
    def answer(self) -> StreamEnd | None:
        """What the body says of the answer (model, id, finish reasons, refusal), read once, again only after
        the body is replaced: parsed up to 1 MiB (or when someone parsed it already), else only its model
        and id, from the bytes. ``None`` when it is not a JSON object."""
        if self._answer is _UNPARSED:
            body = self._body
            self._answer = (answer_of(self.json) if len(body) <= ANSWER_PARSE_LIMIT or self._json is not _UNPARSED
                            else _answer_from_bytes(body))
        return self._answer


class Reply:
    """An early answer made by a plugin (``ctx.reply``)."""

    __slots__ = ("status", "headers", "body", "events")

    def __init__(self, status: int, headers: Mapping[str, str] | None, body: bytes, events: AsyncIterable[Event] | Iterable[Event] | None):
        self.status = status
        self.headers = dict(headers or {})
        self.body = body
        self.events = events


class Context:
    """One request's state, handed to every hook. Slots, not a free-for-all dict."""

    __slots__ = (
        "request_id", "route", "method", "path", "query", "headers", "raw", "_client_ip", "_peer",
        "_body", "_body_changed", "_model", "_stream", "_asked", "identity", "targets", "upstream", "response",
        "response_headers", "_usage", "_usage_body", "cost", "answered_by", "answer_reason", "outcome",
        "timings", "stash", "attempts", "annotations", "features", "tags", "reply_value",
        "status", "error", "_current", "passed", "stream_events", "stream_bytes", "stream_end",
        "runtime", "settle_now", "failed_open", "on_attempt", "error_status",
    )

    def __init__(
        self,
        *,
        request_id: str,
        method: str,
        path: str,
        query: str = "",
        headers: CIMultiDict[str] | Mapping[str, str] | None = None,
        raw: bytes = b"",
        route: CompiledRoute | None = None,
        client_ip: str | None = None,
    ) -> None:
        self.request_id = request_id
        self.route = route
        self.method = method
        #: the full request path, prefix included, e.g. ``/v1/chat/completions``
        self.path = path
        self.query = query
        #: request headers forwarded upstream (hop-by-hop ones already removed)
        self.headers: CIMultiDict[str] = headers if isinstance(headers, CIMultiDict) else CIMultiDict(headers or {})
        #: the request body as received
        self.raw = raw
        self._client_ip = client_ip
        #: (resolver, request) the address is found from on first read of ``client_ip``
        self._peer: Any = None
        self._body: Any = _UNPARSED
        self._body_changed = False
        #: ``model`` and ``stream``, found on first read (every observer reads them); a body assigned back resets them
        self._model: Any = _UNPARSED
        self._asked: Any = _UNPARSED
        self._stream: Any = _UNPARSED
        #: who is calling (set by auth)
        self.identity: Identity | None = None
        #: where to send the request, in order of preference (set by routing)
        self.targets: list[Target] = []
        #: the target that answered
        self.upstream: Target | None = None
        #: the buffered answer, when there is one
        self.response: Response | None = None
        #: headers plugins add to the client's answer, whatever it is
        self.response_headers: CIMultiDict[str] = CIMultiDict()
        self._usage: Usage | None = None
        #: a buffered answer whose usage is read from it on first access of ``usage``
        self._usage_body: bytes | None = None
        #: money for this request (in the price table's currency), set by metering
        self.cost: float | None = None
        self.answered_by: str | None = None
        self.answer_reason: str | None = None
        #: ok | answered | upstream_error | client_gone | plugin_error | error
        self.outcome: str | None = None
        self.timings = Timings(start=time.perf_counter())
        self.stash = Stash()
        self.attempts: list[Attempt] = []
        #: what guards found, for observers: ``{"pii": {"EMAIL_ADDRESS": 2}}`` (types and counts, never values).
        #: Metrics and tracing count as findings the int values above 0 of a plugin's ``findings`` dict
        #: when its annotation has one, else of the annotation itself (docs/plugins/metrics.md)
        self.annotations: dict[str, Any] = {}
        #: numeric features of this request that observers (drift) record
        self.features: dict[str, float] = {}
        #: small labels to record (experiment variant, cache hit, ...)
        self.tags: dict[str, str] = {}
        self.reply_value: Reply | None = None
        #: the status the client got
        self.status: int | None = None
        #: the error the client got, if any (message only, safe to log)
        self.error: str | None = None
        #: a stream that ended in an error event after its 200 (a guard stopped it, the upstream broke off):
        #: that error's status, which observers take for the request's (``status`` stays the 200 sent)
        self.error_status: int | None = None
        self._current: str | None = None
        #: plugin instances whose on_request ran (the onion's way back)
        self.passed: int = 0
        #: a plugin holds something for this request that the next requests need back soon (metering's
        #: budget reservation): the observers' on_done runs as soon as the answer is sent, not after
        #: ``server.done_batch_ms`` in a batch (the requests waiting in the batch run with it, in order)
        self.settle_now = False
        #: the plugins that failed on this request and let it go on (their ``on_error`` is open), as
        #: ``"plugin-id.phase"``: what they did not do (a guard's screen) observers can tell
        self.failed_open: list[str] | None = None
        #: callables a plugin adds on the way in, called as ``fn(ctx, attempt, headers)`` before each
        #: upstream attempt is sent, with that attempt's own copy of the headers it carries (what a
        #: callable sets there goes to that attempt only): per-attempt headers, such as a tracer's
        #: ``traceparent`` naming that attempt's client span. Keep them quick; one that raises is logged
        #: and skipped
        self.on_attempt: list[Callable[[Context, Attempt, CIMultiDict[str]], None]] | None = None
        #: a stream's events as they came from the upstream (or from a plugin's reply), before any
        #: stream hook held, dropped or split them: the estimate of what a stream cut short generated
        self.stream_events = 0
        #: a stream's bytes relayed to the client
        self.stream_bytes = 0
        #: a stream's model, id, finish reasons and refusal, from its events (see StreamEnd)
        self.stream_end: StreamEnd | None = None
        self.runtime: Any = None

    def note_failed_open(self, plugin_id: str, phase: str) -> None:
        """Record that ``plugin_id`` failed in ``phase`` and the request went on without what it does
        (the chain calls it for a plugin whose ``on_error`` is open; a plugin that handles its own
        failure open, such as a guard's timeout, calls it too)."""
        entry = f"{plugin_id}.{phase}"
        if self.failed_open is None:
            self.failed_open = [entry]
        elif entry not in self.failed_open:
            self.failed_open.append(entry)

    @property
    def client_ip(self) -> str | None:
        """The caller's address (through ``server.trusted_proxies``); found on first read."""
        if self._peer is not None:
            resolve, request = self._peer
            self._peer = None
            self._client_ip = resolve(request.remote, request.headers.get("x-forwarded-for"))
        return self._client_ip

    @client_ip.setter
    def client_ip(self, value: str | None) -> None:
        self._peer = None
        self._client_ip = value

    @property
    def answer(self) -> StreamEnd | None:
        """What the answer said about itself (model, id, finish reasons, refusal), buffered or streamed.

        A buffered answer's is ``ctx.response.answer``, read from its body once and shared by every
        reader; a stream's is ``ctx.stream_end``. ``None`` when there is no answer or it is not a
        JSON object. The status is not looked at: an error's body names no model or choices.
        """
        r = self.response
        return self.stream_end if r is None else r.answer

    @property
    def usage(self) -> Usage | None:
        """Token counts of the answer: from the upstream's ``usage``, else what a plugin set."""
        if self._usage_body is not None:
            body, self._usage_body = self._usage_body, None
            wire = _wire()
            r = self.response
            if r is not None and r._body is body and (r._json is not _UNPARSED or len(body) <= SHARED_PARSE_LIMIT):
                # one parse of the answer, kept on ctx.response for every later reader
                u = wire.usage_from(r.json)
            else:
                u = wire.usage_from_body(body)  # a big answer (embeddings): only its tail is read
            if u is not None and self._usage is None:
                self._usage = u
        return self._usage

    @usage.setter
    def usage(self, value: Usage | None) -> None:
        self._usage_body = None
        self._usage = value

    def defer_usage(self, body: bytes) -> None:
        """The core's: read usage from this buffered answer only if someone asks for it."""
        self._usage_body = body

    # -- body ---------------------------------------------------------------
    @property
    def body(self) -> Any:
        """The request body parsed as JSON (lazily, once); ``None`` for an empty body.

        Raises a 400 :class:`ProxyError` when a plugin needs it and it is not JSON.
        After changing it, assign it back (``ctx.body = body``) so it is sent, and so
        ``ctx.model`` and ``ctx.stream`` see the change.
        """
        if self._body is _UNPARSED:
            if not self.raw:
                self._body = None
            else:
                try:
                    self._body = orjson.loads(self.raw)
                except orjson.JSONDecodeError:
                    raise ProxyError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
        return self._body

    @body.setter
    def body(self, value: Any) -> None:
        if not self._body_changed:
            # the client's model, for requested_model: as read before (a plugin that changes the body
            # in place reads ctx.model first), else from the body as parsed; unknown when never parsed
            m = self._model
            if m is _UNPARSED and type(self._body) is dict:
                m = self._body.get("model")
                m = m if isinstance(m, str) else None
            self._asked = m
        self._body = value
        self._body_changed = True
        self._model = self._stream = _UNPARSED

    @property
    def body_changed(self) -> bool:
        return self._body_changed

    @property
    def json_body(self) -> dict[str, Any] | None:
        """The body when it parses as a JSON object, else ``None`` (never raises)."""
        try:
            body = self.body
        except ProxyError:
            return None
        return body if isinstance(body, dict) else None

    @property
    def body_is_json(self) -> bool:
        """True when the body parses as a JSON object (never raises)."""
        return self.json_body is not None

    def body_bytes(self) -> bytes:
        """What to send upstream: the original bytes unless a plugin changed the body."""
        if self._body_changed:
            try:
                return dump_json(self._body)
            except JSONTooDeep:
                raise ProxyError(400, "The request body is nested too deeply to be sent on.", code="invalid_json") from None
        return self.raw

    def _json_field(self, name: str) -> Any:
        if self._body is _UNPARSED and (not self.raw or self.raw[:1] not in b"{ \t\r\n"):
            return None
        try:
            body = self.body
        except ProxyError:
            return None
        return body.get(name) if isinstance(body, dict) else None

    @property
    def model(self) -> str | None:
        """The ``model`` the client asked for (``None`` when the body has none); found once, and again after ``ctx.body = ...``."""
        m = self._model
        if m is _UNPARSED:
            m = self._json_field("model")
            m = self._model = m if isinstance(m, str) else None
        return m

    @property
    def requested_model(self) -> str | None:
        """The ``model`` of the body as the client sent it: ``ctx.model`` until a plugin assigns a new
        body (a router or an experiment choosing the model), then still the client's, kept when the body
        was first assigned (from the original bytes only when the body was never parsed before). A plugin
        that changes the model in place reads ``ctx.model`` first. What the ledger's ``model_requested``
        reports."""
        if not self._body_changed:
            return self.model
        m = self._asked
        if m is _UNPARSED:  # replaced before it was ever parsed: read the original bytes, once
            try:
                body = orjson.loads(self.raw) if self.raw else None
            except orjson.JSONDecodeError:
                body = None
            m = body.get("model") if isinstance(body, dict) else None
            m = self._asked = m if isinstance(m, str) else None
        return m  # type: ignore[no-any-return]

    @property
    def stream(self) -> bool:
        """Whether the client asked for a streamed answer; found once, and again after ``ctx.body = ...``."""
        s = self._stream
        if s is _UNPARSED:
            if self._body is _UNPARSED and b"stream" not in self.raw and b"\\u" not in self.raw:
                s = False  # the key cannot be there, even escaped: no parse needed
            else:
                s = self._json_field("stream") is True
            self._stream = s
        return s

    @property
    def endpoint(self) -> str:
        """The path after the route prefix, e.g. ``chat/completions``."""
        prefix = self.route.prefix if self.route is not None else "/"
        return self.path[len(prefix):] if self.path.startswith(prefix) else self.path.lstrip("/")

    # -- answers ------------------------------------------------------------
    @property
    def answered(self) -> bool:
        """True once a plugin answered early; later ``on_request`` hooks should step aside."""
        return self.reply_value is not None

    def reply(
        self,
        status: int = 200,
        body: Any = None,
        *,
        headers: Mapping[str, str] | None = None,
        events: AsyncIterable[Event] | Iterable[Event] | None = None,
        reason: str | None = None,
    ) -> None:
        """Answer the client now, without an upstream call.

        ``body`` is bytes, or anything orjson can serialise. Pass ``events`` (SSE
        events, sync or async iterable) instead to answer with a stream; the
        events pass through the outer plugins' ``on_chunk`` and ``data: [DONE]``
        is appended. ``reason`` goes to ``ctx.answer_reason``.
        """
        if events is not None:
            raw = b""
        elif isinstance(body, (bytes, bytearray)):
            raw = bytes(body)
        else:
            raw = orjson.dumps(body)
        hdrs = dict(headers or {})
        if events is None:
            hdrs.setdefault("content-type", "application/json")
        self.reply_value = Reply(status, hdrs, raw, events)
        self.answered_by = self._current
        self.answer_reason = reason or ("reply" if status < 400 else "error")

    def __repr__(self) -> str:  # pragma: no cover
        return f"<Context {self.request_id} {self.method} {self.path}>"
