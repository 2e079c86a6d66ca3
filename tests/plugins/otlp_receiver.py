"""A real OTLP/HTTP trace receiver on loopback, for tests: decodes protobuf exports into dicts.

    async with OTLPReceiver() as rx:
        ... configure tracing with endpoint=rx.traces_url ...
        spans = await rx.wait_for(lambda spans: len(spans) >= 2)
"""

from __future__ import annotations

import asyncio
import gzip
from typing import Any, Callable

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

KINDS = {v: k.removeprefix("SPAN_KIND_").lower() for k, v in PbSpan.SpanKind.items()}


def any_value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def decode(request: ExportTraceServiceRequest) -> list[dict[str, Any]]:
    spans = []
    for rs in request.resource_spans:
        resource = {kv.key: any_value(kv.value) for kv in rs.resource.attributes}
        for ss in rs.scope_spans:
            for s in ss.spans:
                spans.append(
                    {
                        "name": s.name,
                        "kind": KINDS.get(s.kind, str(s.kind)),
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex() or None,
                        "trace_state": s.trace_state,
                        "start_ns": s.start_time_unix_nano,
                        "end_ns": s.end_time_unix_nano,
                        "attributes": {kv.key: any_value(kv.value) for kv in s.attributes},
                        "status": s.status.code,
                        "status_message": s.status.message,
                        "resource": resource,
                        "scope": ss.scope.name,
                    }
                )
    return spans


class OTLPReceiver:
    """Serves ``POST /v1/traces`` (protobuf, optionally gzip or deflate) on 127.0.0.1, port 0."""

    def __init__(self, status: int = 200, port: int = 0) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.encodings: list[str] = []
        #: the status answered to each request, in order
        self.statuses: list[int] = []
        self.status = status
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port = port

    @property
    def traces_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        # aiohttp inflates gzip and deflate request bodies itself; count what arrived compressed
        enc = request.headers.get("content-encoding", "")
        if enc:
            self.encodings.append(enc)
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(raw)
        async with self._changed:
            self.requests += 1
            self.statuses.append(self.status)
            if self.status == 200:
                self.spans.extend(decode(msg))
            self._changed.notify_all()
        return web.Response(
            status=self.status, body=ExportTraceServiceResponse().SerializeToString(), content_type="application/x-protobuf"
        )

    async def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
        """Wait until ``predicate(spans)`` holds; the spans received so far."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.spans)), timeout)
            return list(self.spans)

    async def __aenter__(self) -> OTLPReceiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class OTLPGrpcReceiver:
    """The same over OTLP/gRPC (``TraceService/Export``) on 127.0.0.1: ``.endpoint`` is host:port."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()
        self._server: Any = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 10.0) -> list[dict[str, Any]]:
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: predicate(self.spans)), timeout)
            return list(self.spans)

    async def __aenter__(self) -> OTLPGrpcReceiver:
        import grpc
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc

        receiver = self

        class Service(trace_service_pb2_grpc.TraceServiceServicer):
            async def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
                async with receiver._changed:
                    receiver.spans.extend(decode(request))
                    receiver._changed.notify_all()
                return ExportTraceServiceResponse()

        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Service(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        if self._server is not None:
            await self._server.stop(None)
