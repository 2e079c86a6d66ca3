"""OpenTelemetry plumbing for the tracing plugin: providers, exporters, clocks, GenAI attributes.

The OTel SDK and its exporters are imported inside functions: a chain without
tracing never pays for them. Sluice never touches the global tracer provider (an
embedding application may have its own); each distinct exporter setting gets one
provider per process, shared by every route that uses it and shut down (flushing
its batch) when the last of them stops.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

if TYPE_CHECKING:  # pragma: no cover
    from opentelemetry.sdk.trace import TracerProvider


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
    sample_ratio: float
    parent_based: bool
    max_queue_size: int
    max_export_batch_size: int
    schedule_delay_ms: int


def build_exporter(s: ExportSettings) -> Any:
    if s.exporter == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter(service_name=s.service_name)
    headers = dict(s.headers) or None
    if s.exporter == "otlp_http":
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        comp = Compression.Gzip if s.compression == "gzip" else Compression.NoCompression
        return OTLPSpanExporter(endpoint=s.endpoint, headers=headers, timeout=s.timeout_s, compression=comp)
    if s.exporter == "otlp_grpc":
        from grpc import Compression as GrpcCompression
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        comp = GrpcCompression.Gzip if s.compression == "gzip" else GrpcCompression.NoCompression
        return GrpcExporter(endpoint=s.endpoint, insecure=s.insecure, headers=headers, timeout=s.timeout_s, compression=comp)
    raise ValueError(f"unknown exporter {s.exporter!r}")


def build_provider(s: ExportSettings) -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    import proxy

    ratio = TraceIdRatioBased(s.sample_ratio)
    sampler = ParentBased(root=ratio) if s.parent_based else ratio
    resource = Resource.create({"service.name": s.service_name, "service.version": proxy.__version__, **dict(s.resource)})
    provider = TracerProvider(sampler=sampler, resource=resource)
    if s.exporter != "none":
        # the batch processor exports from its own thread: spans never wait on the network in the loop
        provider.add_span_processor(
            BatchSpanProcessor(
                build_exporter(s),
                max_queue_size=s.max_queue_size,
                max_export_batch_size=min(s.max_export_batch_size, s.max_queue_size),
                schedule_delay_millis=s.schedule_delay_ms,
                export_timeout_millis=int(s.timeout_s * 1000),
            )
        )
    return provider


class ProviderPool:
    """Refcounted providers per :class:`ExportSettings`, one pool per process (``runtime.shared``)."""

    def __init__(self) -> None:
        self._entries: dict[ExportSettings, list[Any]] = {}

    def acquire(self, s: ExportSettings) -> TracerProvider:
        entry = self._entries.get(s)
        if entry is None:
            entry = self._entries[s] = [build_provider(s), 0]
        entry[1] += 1
        return entry[0]

    def release(self, s: ExportSettings) -> TracerProvider | None:
        """Drop one reference; the provider to shut down when it was the last, else ``None``."""
        entry = self._entries.get(s)
        if entry is None:
            return None
        entry[1] -= 1
        if entry[1] <= 0:
            del self._entries[s]
            return entry[0]
        return None


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


def request_attributes(body: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for attr, field in REQUEST_PARAMS:
        v = body.get(field)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[attr] = v
    stop = body.get("stop")
    if isinstance(stop, str):
        out["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(x, str) for x in stop):
        out["gen_ai.request.stop_sequences"] = stop
    if body.get("stream") is True:
        out["gen_ai.request.stream"] = True
    return out


def response_attributes(body: Any) -> dict[str, Any]:
    """``gen_ai.response.*`` from a buffered OpenAI answer (id, model, finish reasons)."""
    out: dict[str, Any] = {}
    if not isinstance(body, dict):
        return out
    if isinstance(body.get("id"), str):
        out["gen_ai.response.id"] = body["id"]
    if isinstance(body.get("model"), str):
        out["gen_ai.response.model"] = body["model"]
    reasons = [c.get("finish_reason") for c in body.get("choices") or () if isinstance(c, dict)]
    reasons = [r for r in reasons if isinstance(r, str)]
    if reasons:
        out["gen_ai.response.finish_reasons"] = reasons
    return out


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
