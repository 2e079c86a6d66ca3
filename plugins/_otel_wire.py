"""A direct OTLP/protobuf encoder for finished spans, and an OTLP/HTTP exporter that uses it.

The SDK's OTLP encoder builds one protobuf object per attribute in Python and costs
about 4 us per attribute: with ~30 attributes a request, encoding alone was more than
everything else the observers do together. Spans here are plain data with known
types, so they are written straight to the protobuf wire format (the field numbers of
opentelemetry/proto/trace/v1/trace.proto and common.proto), about four times faster.
tests/plugins/test_tracing_wire.py decodes the output with opentelemetry-proto and
compares it with the SDK encoder's, field for field.

The exporter posts to an OTLP/HTTP collector from the batch processor's thread, with
the SDK exporter's retry rule (429, 502, 503, 504 and connection errors, exponential
backoff with jitter, within the export timeout).
"""

from __future__ import annotations

import gzip
import logging
import random
import struct
import threading
import time
from typing import Any, Mapping, Sequence

log = logging.getLogger("sluice.tracing")

_pack_d = struct.Struct("<d").pack
_pack_q = struct.Struct("<Q").pack
_pack_i = struct.Struct("<I").pack
RETRYABLE = frozenset({429, 502, 503, 504})


_SMALL = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _SMALL[n]
    if n < 0:
        n += 1 << 64  # int64 on the wire: two's complement, ten bytes
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


#: the tag byte of a length-delimited field (every field number used here is below 16)
_LEN_TAG = [bytes(((f << 3) | 2,)) for f in range(16)]


def _len(field: int, payload: bytes) -> bytes:
    n = len(payload)
    return _LEN_TAG[field] + (_SMALL[n] if n < 0x80 else _varint(n)) + payload


def _str(field: int, s: str) -> bytes:
    return _len(field, s.encode("utf-8", "surrogatepass"))


def _any_list(v: Any) -> bytes:
    return _len(5, b"".join([_len(1, any_value(x)) for x in v]))


def _any_int(v: int) -> bytes:
    return b"\x18" + _varint(v)


_ANY: dict[type, Any] = {
    str: lambda v: _str(1, v),
    bool: lambda v: b"\x10\x01" if v else b"\x10\x00",
    int: _any_int,
    float: lambda v: b"\x21" + _pack_d(v),
    bytes: lambda v: _len(7, v),
    list: _any_list,
    tuple: _any_list,
}


def any_value(v: Any) -> bytes:
    """An ``AnyValue`` message (without its own tag)."""
    enc = _ANY.get(type(v))
    if enc is not None:
        return enc(v)
    if isinstance(v, str):
        return _str(1, v)
    if isinstance(v, bool):
        return b"\x10" + (b"\x01" if v else b"\x00")
    if isinstance(v, int):
        return b"\x18" + _varint(v)
    if isinstance(v, float):
        return b"\x21" + _pack_d(v)
    if isinstance(v, (bytes, bytearray)):
        return _len(7, bytes(v))
    if isinstance(v, Mapping):
        return _len(6, b"".join(_len(1, key_value(str(k), x)) for k, x in v.items()))
    if isinstance(v, Sequence):
        return _len(5, b"".join(_len(1, any_value(x)) for x in v))
    return _str(1, str(v))


_KEYS: dict[str, bytes] = {}
_PAIRS: dict[tuple[str, Any, type], bytes] = {}
#: bound of the caches: attribute keys and repeated (key, value) pairs are few in practice
CACHE_MAX = 8192
#: attributes whose values are unique per request: caching them would only crowd out the rest
UNIQUE = frozenset({"sluice.request_id", "gen_ai.response.id", "gen_ai.input.messages", "gen_ai.output.messages"})
_CACHED_TYPES = frozenset({str, bool, int, list, tuple})


def key_value(key: str, value: Any) -> bytes:
    k = _KEYS.get(key)
    if k is None:
        k = _str(1, key)
        if len(_KEYS) < CACHE_MAX:
            _KEYS[key] = k
    return k + _len(2, any_value(value))


#: the field number of ``Span.attributes``: the only attributes whose encodings are cached
SPAN_ATTRIBUTES = 9


def _attribute(key: str, value: Any) -> bytes:
    """A span attribute (``KeyValue`` in field 9), its bytes reused when the same pair comes again."""
    # most attribute values repeat (operation, model, route, upstream, status, finish reasons)
    t = type(value)
    if t in _CACHED_TYPES and key not in UNIQUE:
        if t is int:
            if not -1024 < value < 1024:
                return _len(9, key_value(key, value))
            pk: Any = (key, value, t)
        elif t is str or t is bool:
            pk = (key, value, t)
        else:
            if len(value) > 8:
                return _len(9, key_value(key, value))
            try:
                pk = (key, tuple(value), t, tuple(map(type, value)))  # [1] and [True] are different attributes
                hash(pk)
            except TypeError:
                return _len(9, key_value(key, value))
        enc = _PAIRS.get(pk)
        if enc is None:
            enc = _len(9, key_value(key, value))
            if len(_PAIRS) < CACHE_MAX and (t is not str or len(value) <= 256):
                _PAIRS[pk] = enc
        return enc
    return _len(9, key_value(key, value))


#: one span attribute's bytes (for encoders that assemble spans from parts)
span_attribute = _attribute


def attributes(field: int, attrs: Mapping[str, Any] | None) -> bytes:
    if not attrs:
        return b""
    if field != SPAN_ATTRIBUTES:
        return b"".join([_len(field, key_value(k, v)) for k, v in attrs.items() if v is not None])
    get = _PAIRS.get
    out = []
    for k, v in attrs.items():
        t = type(v)
        if t is str or t is int or t is bool:
            enc = get((k, v, t))  # the common case first: a pair seen before
            if enc is not None:
                out.append(enc)
                continue
        if v is not None:
            out.append(_attribute(k, v))
    return b"".join(out)


_KIND = [b"\x30" + _varint(k + 1) for k in range(8)]  # the proto enum counts UNSPECIFIED as 0
_FLAGS_LOCAL = b"\x85\x01" + _pack_i(0x100)
_FLAGS_REMOTE = b"\x85\x01" + _pack_i(0x300)
_STATUS_UNSET = _len(15, b"")


def span(s: Any) -> bytes:
    """One ``Span`` message from an SDK ``ReadableSpan``."""
    ctx = s.context
    parts = [
        b"\x0a\x10" + ctx.trace_id.to_bytes(16, "big"),
        b"\x12\x08" + ctx.span_id.to_bytes(8, "big"),
    ]
    if ctx.trace_state:
        parts.append(_str(3, ctx.trace_state.to_header()))
    parent = s.parent
    if parent is not None:
        parts.append(b"\x22\x08" + parent.span_id.to_bytes(8, "big"))
    parts.append(_str(5, s.name))
    parts.append(_KIND[s.kind.value])
    parts.append(b"\x39" + _pack_q(s.start_time))
    parts.append(b"\x41" + _pack_q(s.end_time))
    parts.append(attributes(9, s.attributes))
    status = s.status
    code = status.status_code.value
    # always present, as the SDK encoder writes it (an empty message for UNSET)
    if not code and not status.description:
        parts.append(_STATUS_UNSET)
    else:
        parts.append(_len(15, (_str(2, status.description) if status.description else b"") + (b"\x18" + _varint(code) if code else b"")))
    # SpanFlags: "has is_remote" always, "is_remote" for a remote parent (the SDK leaves the trace flags out)
    parts.append(_FLAGS_REMOTE if parent is not None and parent.is_remote else _FLAGS_LOCAL)
    return b"".join(parts)


_RESOURCES: dict[int, tuple[Any, bytes]] = {}


def _resource(resource: Any) -> bytes:
    found = _RESOURCES.get(id(resource))
    if found is None or found[0] is not resource:
        found = (resource, _len(1, attributes(1, resource.attributes)))
        if len(_RESOURCES) >= 64:
            _RESOURCES.clear()
        _RESOURCES[id(resource)] = found
    return found[1]


def _scope(scope: Any) -> bytes:
    sc = b""
    if scope is not None:
        sc = _str(1, scope.name) + (_str(2, scope.version) if scope.version else b"")
    return _len(1, sc)


def _resource_spans(resource: Any, scopes: Sequence[tuple[Any, Sequence[bytes]]]) -> bytes:
    """One ``ResourceSpans``: the resource, then per scope its encoded ``Span`` messages."""
    body = [_resource(resource)]
    for scope, encoded in scopes:
        body.append(_len(2, _scope(scope) + b"".join([_len(2, e) for e in encoded])))
    if resource.schema_url:
        body.append(_str(3, resource.schema_url))
    return _len(1, b"".join(body))


def encode_request(spans: Sequence[Any]) -> bytes:
    """An ``ExportTraceServiceRequest`` for spans (grouped by resource, then scope)."""
    groups: dict[int, tuple[Any, dict[int, tuple[Any, list[bytes]]]]] = {}
    for s in spans:
        res = groups.setdefault(id(s.resource), (s.resource, {}))
        scope = s.instrumentation_scope
        res[1].setdefault(id(scope), (scope, []))[1].append(span(s))
    return b"".join([_resource_spans(resource, list(scopes.values())) for resource, scopes in groups.values()])


def encode_batch(resource: Any, scope: Any, spans: Sequence[bytes]) -> bytes:
    """An ``ExportTraceServiceRequest`` of already encoded ``Span`` messages of one resource and scope."""
    return _resource_spans(resource, [(scope, spans)]) if spans else b""


class WireExporter:
    """Posts encoded OTLP/HTTP export requests for a :class:`WireBatcher`, retrying as the SDK's exporter does.

    A plain ``http://`` collector with no proxy configured for it is posted to over one
    kept-alive ``http.client`` connection: requests' session costs about four times as
    much CPU per post (a 300 KB batch: about 1 ms against 0.23). HTTPS, proxies (the
    ``HTTP_PROXY`` / ``NO_PROXY`` variables requests honours) and redirects go through
    a requests session, as before.
    """

    def __init__(self, endpoint: str, headers: Mapping[str, str] | None, timeout_s: float, gzip_body: bool) -> None:
        import requests

        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.gzip = gzip_body
        self.session = requests.Session()
        self.session.headers.update({"content-type": "application/x-protobuf", **(headers or {})})
        if gzip_body:
            self.session.headers["content-encoding"] = "gzip"
        self._shutdown = threading.Event()
        #: (host, port, path) when posting over http.client, else None (requests)
        self.direct: tuple[str, int, str] | None = _direct_target(endpoint)
        self._headers = dict(self.session.headers)
        self._conn: Any = None
        self._lock = threading.Lock()  # one request at a time on the kept-alive connection
        #: posts sent again after a retryable failure (status or connection), since start
        self.retries = 0

    def post(self, data: bytes, count: int) -> bool:
        """Send one encoded export request, retrying as the SDK exporter does; False when it was given up."""
        import http.client

        import requests

        if self._shutdown.is_set():
            return False
        if self.gzip:
            data = gzip.compress(data, compresslevel=5)
        deadline = time.monotonic() + self.timeout_s
        delay = 1.0
        while True:
            left = deadline - time.monotonic()
            try:
                status = self._send(data, max(left, 0.001))
                if status < 400:
                    return True
                retry, why = status in RETRYABLE, f"HTTP {status}"
            except (requests.exceptions.RequestException, OSError, http.client.HTTPException) as e:
                retry, why = True, type(e).__name__
            wait = random.uniform(0, delay)
            if not retry or time.monotonic() + wait >= deadline or self._shutdown.is_set():
                log.warning("tracing: could not export %d spans (%s)", count, why)
                return False
            self.retries += 1
            self._shutdown.wait(wait)
            delay *= 2

    def _send(self, data: bytes, timeout: float) -> int:
        """One POST: the response's status (raises on connection and protocol errors)."""
        if self.direct is None:
            return self.session.post(self.endpoint, data=data, timeout=timeout).status_code
        with self._lock:
            return self._send_direct(data, timeout)

    def _send_direct(self, data: bytes, timeout: float) -> int:
        import http.client

        assert self.direct is not None

        host, port, path = self.direct
        for fresh in (False, True):
            conn = self._conn
            reused = conn is not None
            if conn is None:
                conn = self._conn = http.client.HTTPConnection(host, port, timeout=timeout)
            else:
                conn.timeout = timeout
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
            try:
                conn.request("POST", path, body=data, headers=self._headers)
                r = conn.getresponse()
                r.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._conn = None
                if reused and not fresh:
                    continue  # the collector closed the idle kept-alive connection: once more on a new one
                raise
            if r.will_close:
                conn.close()
                self._conn = None
            if 300 <= r.status < 400:
                # a redirect: requests follows them; from now on it posts
                self.direct = None
                return self.session.post(self.endpoint, data=data, timeout=timeout).status_code
            return r.status
        raise AssertionError("unreachable")  # pragma: no cover

    def shutdown(self) -> None:
        self._shutdown.set()
        self.session.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _direct_target(endpoint: str) -> tuple[str, int, str] | None:
    """(host, port, path) of a plain http:// endpoint that no proxy setting applies to, else None."""
    from urllib.parse import urlsplit
    from urllib.request import getproxies, proxy_bypass

    parts = urlsplit(endpoint)
    if parts.scheme != "http" or not parts.hostname or parts.username or parts.password:
        return None
    proxies = getproxies()
    if (proxies.get("http") or proxies.get("all")) and not proxy_bypass(parts.hostname):
        return None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
    return host, parts.port or 80, path


class WireBatcher:
    """The batch processor of already encoded spans: a bounded queue and an export thread.

    The SDK's ``BatchSpanProcessor`` rules: spans wait at most ``schedule_delay_s``, a
    full batch wakes the thread at once, a full queue drops new spans (never waits), and
    shutdown exports what is queued before it returns. Spans arrive as ``Span`` message
    bytes (the tracing plugin encodes them in ``on_done`` from cached parts), so a batch
    costs the export thread a join and a post.
    """

    def __init__(self, exporter: WireExporter, resource: Any, scope: Any, *, max_queue_size: int,
                 max_export_batch_size: int, schedule_delay_s: float, export_timeout_s: float = 30.0) -> None:
        from collections import deque

        self.exporter = exporter
        self.resource = resource
        self.scope = scope
        self.max_queue_size = max_queue_size
        self.batch_size = max(1, min(max_export_batch_size, max_queue_size))
        self.delay_s = schedule_delay_s
        self.export_timeout_s = export_timeout_s
        self._q: Any = deque()
        self._wake = threading.Event()
        self._stopping = False
        #: spans dropped because the queue was full
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="OtelBatchSpanRecordProcessor", daemon=True)
        self._thread.start()

    def add(self, encoded: bytes) -> None:
        """Queue one encoded span (called on the event loop; never blocks)."""
        q = self._q
        if len(q) >= self.max_queue_size or self._stopping:
            if not self.dropped:
                if self._stopping:
                    log.warning("tracing: a span finished after the exporter shut down; dropped")
                else:
                    log.warning("tracing: the span queue is full (%d); new spans are dropped", self.max_queue_size)
            self.dropped += 1
            return
        q.append(encoded)
        if len(q) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            woken = self._wake.wait(self.delay_s)
            self._wake.clear()
            if self._stopping:
                break
            # woken by a full batch: export full batches; on the timer: at least one batch
            sent = 0
            while self._q and (len(self._q) >= self.batch_size or (not woken and not sent)):
                self._export_one()
                sent += 1
        while self._q:
            self._export_one()

    def _export_one(self) -> None:
        q = self._q
        batch = [q.popleft() for _ in range(min(self.batch_size, len(q)))]
        try:
            self.exporter.post(encode_batch(self.resource, self.scope, batch), len(batch))
        except Exception:  # noqa: BLE001 - the export thread must survive anything an export does
            log.exception("tracing: exporting %d spans failed", len(batch))

    def shutdown(self) -> None:
        """Export what is queued (waiting at most ``export_timeout_s``, the SDK's 30 s), then stop the thread and the exporter."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(self.export_timeout_s)
        self.exporter.shutdown()


# -- parts of Span messages, for encoders that assemble spans from cached pieces ---------

KIND_SERVER = _KIND[1]  # SpanKind.SERVER.value == 1
KIND_CLIENT = _KIND[2]  # SpanKind.CLIENT.value == 2
FLAGS_LOCAL = _FLAGS_LOCAL
FLAGS_REMOTE = _FLAGS_REMOTE
STATUS_UNSET = _STATUS_UNSET


def float_attribute(key: str) -> Any:
    """An encoder of ``key``'s attribute for float values, its key encoded once (other types: the general way)."""
    k = _str(1, key)
    prefix = _LEN_TAG[9] + _varint(len(k) + 11) + k + b"\x12\x09\x21"  # KeyValue{key, value: AnyValue{double}}

    def encode(value: Any) -> bytes:
        if type(value) is float:
            return prefix + _pack_d(value)
        return b"" if value is None else _attribute(key, value)

    return encode


def str_attribute(key: str) -> Any:
    """An encoder of ``key``'s attribute for string values that are never cached (ids), its key encoded once."""
    k = _str(1, key)
    small = 128 - len(k) - 4  # values shorter than this fit one-byte lengths throughout

    def encode(value: Any) -> bytes:
        if type(value) is str:
            b = value.encode("utf-8", "surrogatepass")
            n = len(b)
            if n < small:
                # KeyValue{key, value: AnyValue{string_value}} in field 9, lengths written directly
                return b"".join((b"\x4a", _SMALL[len(k) + n + 4], k, b"\x12", _SMALL[n + 2], b"\x0a", _SMALL[n], b))
            return _len(9, k + _len(2, _len(1, b)))
        return b"" if value is None else _attribute(key, value)

    return encode


def status_error(description: str) -> bytes:
    """``Status`` (field 15) with code ERROR and a description, as :func:`span` writes it."""
    return _len(15, (_str(2, description) if description else b"") + b"\x18\x02")


def span_name(name: str) -> bytes:
    return _str(5, name)


def trace_state(header: str) -> bytes:
    return _str(3, header)


def assemble(trace_id: bytes, span_id: int, state: bytes, parent_id: int | None, name: bytes, kind: bytes,
             start_ns: int, end_ns: int, attrs: bytes, status: bytes, flags: bytes) -> bytes:
    """A ``Span`` message from its parts, field for field as :func:`span` writes it.

    ``trace_id`` is the field already encoded (``b"\\x0a\\x10"`` + 16 bytes): a request's spans share it.
    """
    return b"".join((
        trace_id, b"\x12\x08", span_id.to_bytes(8, "big"), state,
        b"\x22\x08" + parent_id.to_bytes(8, "big") if parent_id is not None else b"",
        name, kind, b"\x39", _pack_q(start_ns), b"\x41", _pack_q(end_ns), attrs, status, flags,
    ))
