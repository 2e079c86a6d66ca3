"""OpenTelemetry plumbing for the tracing plugin: providers, exporters, clocks, GenAI attributes.

The OTel SDK and its exporters are imported inside functions: a chain without
tracing never pays for them. Sluice never touches the global tracer provider (an
embedding application may have its own). Each distinct exporter setting gets one
pipeline (resource + batch processor + exporter) per process, shared by every route
that uses it and shut down (flushing its batch) when the last of them stops.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import unquote, urlsplit



class Clock:
    """Converts ``time.perf_counter()`` stamps (what ``ctx.timings`` holds) to epoch nanoseconds.

    The offset is measured once per plugin start: the two clocks drift apart only by
    NTP slewing, far less than a span's precision matters over a config's lifetime.
    """

    __slots__ = ("offset_ns",)

    def __init__(self) -> None:
        # bracket perf_counter between two wall-clock reads to halve the read skew
        a = time.time_ns()
        p = time.perf_counter_ns()
        b = time.time_ns()
        self.offset_ns = (a + b) // 2 - p

    def epoch_ns(self, perf_s: float) -> int:
        return int(perf_s * 1e9) + self.offset_ns


@dataclass(frozen=True)
class ExportSettings:
    """Everything that makes two tracing instances need different providers."""

    exporter: str
    endpoint: str | None
    headers: tuple[tuple[str, str], ...]
    timeout_s: float
    compression: str
    insecure: bool | None
    service_name: str
    resource: tuple[tuple[str, str], ...]
    max_queue_size: int
    max_export_batch_size: int
    schedule_delay_ms: int


def http_endpoint(configured: str | None) -> str:
    """The OTLP/HTTP traces URL: the config's, else the standard OTEL_EXPORTER_OTLP_* variables."""
    if configured:
        return configured
    env = os.environ
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return env["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
    return "http://localhost:4318/v1/traces"


def env_headers() -> dict[str, str]:
    """OTEL_EXPORTER_OTLP_(TRACES_)HEADERS: ``k=v,k2=v2``, URL-encoded values."""
    raw = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or os.environ.get("OTEL_EXPORTER_OTLP_HEADERS") or ""
    out = {}
    for item in raw.split(","):
        k, sep, v = item.partition("=")
        if sep and k.strip():
            out[unquote(k.strip()).lower()] = unquote(v.strip())
    return out


def build_exporter(s: ExportSettings) -> Any:
    if s.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=s.service_name)
    headers = dict(s.headers) or None
    if s.exporter == "otlp_http":
        from ._otel_wire import WireExporter

        return WireExporter(http_endpoint(s.endpoint), {**env_headers(), **(headers or {})}, s.timeout_s, s.compression == "gzip")
    if s.exporter == "otlp_grpc":
        from grpc import Compression as GrpcCompression
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        comp = GrpcCompression.Gzip if s.compression == "gzip" else GrpcCompression.NoCompression
        return GrpcExporter(endpoint=s.endpoint, insecure=s.insecure, headers=headers, timeout=s.timeout_s, compression=comp)
    raise ValueError(f"unknown exporter {s.exporter!r}")


@dataclass
class Pipeline:
    """What finished spans go through: the resource they carry and the batch processor.

    OTLP/HTTP takes spans already encoded (``wire``, a :class:`WireBatcher`); the SDK's
    exporters (gRPC, console) take SDK ``ReadableSpan`` objects through its
    ``BatchSpanProcessor`` (``processor``). Exporter ``none`` has neither.
    """

    resource: Any
    scope: Any
    processor: Any  # a BatchSpanProcessor, or None
    wire: Any = None  # a WireBatcher, or None

    def shutdown(self) -> None:
        if self.processor is not None:
            self.processor.shutdown()
        if self.wire is not None:
            self.wire.shutdown()


def build_pipeline(s: ExportSettings) -> Pipeline:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    import proxy

    resource = Resource.create({"service.name": s.service_name, "service.version": proxy.__version__, **dict(s.resource)})
    scope = InstrumentationScope("sluice", proxy.__version__)
    processor = None
    if s.exporter == "otlp_http":
        from ._otel_wire import WireBatcher

        # encoded spans, batched and posted from the batcher's thread
        wire = WireBatcher(build_exporter(s), resource, scope, max_queue_size=s.max_queue_size,
                           max_export_batch_size=s.max_export_batch_size, schedule_delay_s=s.schedule_delay_ms / 1000)
        return Pipeline(resource, scope, None, wire)
    if s.exporter != "none":
        # the batch processor exports from its own thread: spans never wait on the network in the loop
        processor = BatchSpanProcessor(
            build_exporter(s),
            max_queue_size=s.max_queue_size,
            max_export_batch_size=min(s.max_export_batch_size, s.max_queue_size),
            schedule_delay_millis=s.schedule_delay_ms,
            export_timeout_millis=int(s.timeout_s * 1000),
        )
    return Pipeline(resource, scope, processor)


class PipelinePool:
    """Refcounted pipelines per :class:`ExportSettings`, one pool per process (``runtime.shared``)."""

    def __init__(self) -> None:
        self._entries: dict[ExportSettings, list[Any]] = {}

    def acquire(self, s: ExportSettings) -> Pipeline:
        entry = self._entries.get(s)
        if entry is None:
            entry = self._entries[s] = [build_pipeline(s), 0]
        entry[1] += 1
        return entry[0]

    def release(self, s: ExportSettings) -> Pipeline | None:
        """Drop one reference; the pipeline to shut down when it was the last, else ``None``."""
        entry = self._entries.get(s)
        if entry is None:
            return None
        entry[1] -= 1
        if entry[1] <= 0:
            del self._entries[s]
            return entry[0]
        return None


# -- W3C trace context --------------------------------------------------------------

_HEX = frozenset("0123456789abcdef")
TRACE_ID_LIMIT = (1 << 64) - 1


def parse_traceparent(value: str) -> tuple[int, int, int] | None:
    """(trace id, parent span id, flags) of a valid W3C ``traceparent``, else ``None``."""
    parts = value.strip().split("-")
    if len(parts) < 4:
        return None
    version, trace, span, flags = parts[0], parts[1], parts[2], parts[3]
    if len(version) != 2 or version == "ff" or len(trace) != 32 or len(span) != 16 or len(flags) != 2:
        return None
    if version == "00" and len(parts) != 4:
        return None
    if not (set(version) | set(trace) | set(span) | set(flags)) <= _HEX:
        return None
    trace_id, span_id = int(trace, 16), int(span, 16)
    if trace_id == 0 or span_id == 0:
        return None
    return trace_id, span_id, int(flags, 16)


def format_traceparent(trace_id: int, span_id: int, sampled: bool) -> str:
    return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"


def ratio_bound(ratio: float) -> int:
    """The trace-id bound below which a trace is sampled: the SDK's TraceIdRatioBased rule."""
    return round(ratio * (TRACE_ID_LIMIT + 1))


def server_address(url: str) -> tuple[str | None, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80 if parts.scheme == "http" else None)
    return parts.hostname, port


# GenAI request parameters recorded from the body (semconv name, body field)
REQUEST_PARAMS: tuple[tuple[str, str], ...] = (
    ("gen_ai.request.max_tokens", "max_tokens"),
    ("gen_ai.request.max_tokens", "max_completion_tokens"),
    ("gen_ai.request.temperature", "temperature"),
    ("gen_ai.request.top_p", "top_p"),
    ("gen_ai.request.top_k", "top_k"),
    ("gen_ai.request.frequency_penalty", "frequency_penalty"),
    ("gen_ai.request.presence_penalty", "presence_penalty"),
    ("gen_ai.request.seed", "seed"),
    ("gen_ai.request.choice.count", "n"),
)


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_PARAM_FIELDS = frozenset(field for _, field in REQUEST_PARAMS) | {"stop", "stream"}


def request_attributes(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    present = _PARAM_FIELDS.intersection(body) if isinstance(body, dict) else _PARAM_FIELDS
    if not present:
        return out  # the common case: a body with none of the recorded parameters
    for attr, field in REQUEST_PARAMS:
        if field not in present:
            continue
        v = body.get(field)
        if isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and _INT64_MIN <= v <= _INT64_MAX):
            out[attr] = v  # an int past int64 (JSON allows it) has no OTLP value: left out, as the SDK's encoder does
    stop = body.get("stop")
    if isinstance(stop, str):
        out["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        out["gen_ai.request.stop_sequences"] = stop
    if body.get("stream") is True:
        out["gen_ai.request.stream"] = True
    return out


def answer_attributes(rid: Any, model: Any, reasons: list[str]) -> dict[str, Any]:
    """``gen_ai.response.*`` from an answer's id, model and finish reasons (``ctx.answer``); values that are
    not strings are left out."""
    out: dict[str, Any] = {}
    if isinstance(rid, str):
        out["gen_ai.response.id"] = rid
    if isinstance(model, str):
        out["gen_ai.response.model"] = model
    if reasons:
        out["gen_ai.response.finish_reasons"] = reasons
    return out


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
