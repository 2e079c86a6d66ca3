"""The direct OTLP encoder writes exactly what the SDK's encoder writes, faster."""

from __future__ import annotations

import time

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from plugins._otel_wire import any_value, encode_request

RES = Resource.create({"service.name": "sluice", "deployment.environment": "test"})
SCOPE = InstrumentationScope("sluice", "0.1.0")
ATTRS = {
    "gen_ai.operation.name": "chat", "gen_ai.request.model": "gpt-4o-mini", "gen_ai.request.temperature": 0.25,
    "gen_ai.request.max_tokens": 200, "gen_ai.usage.input_tokens": 0, "negative": -5, "big": 2**62,
    "gen_ai.response.finish_reasons": ["stop", "length"], "sluice.cache_hit": False, "flag": True,
    "unicode": "naïve – ✓ 𝄞", "empty": "", "floats": [0.5, 1.5], "ints": [1, 2, 3],
}


def spans() -> list[ReadableSpan]:
    state = TraceState([("vendor", "abc")])
    remote = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1), state)
    server = SpanContext(remote.trace_id, 0x1111111111111111, False, TraceFlags(1), state)
    client = SpanContext(remote.trace_id, 0x2222222222222222, False, TraceFlags(1), state)
    other_res = Resource.create({"service.name": "other"})
    return [
        ReadableSpan("chat gpt-4o-mini", client, parent=server, resource=RES, attributes=ATTRS, kind=SpanKind.CLIENT,
                     status=Status(StatusCode.ERROR, "HTTP 503"), start_time=1_700_000_000_000_000_123,
                     end_time=1_700_000_000_500_000_000, instrumentation_scope=SCOPE),
        ReadableSpan("POST main", server, parent=remote, resource=RES, attributes={"a": "b"}, kind=SpanKind.SERVER,
                     start_time=1_700_000_000_000_000_000, end_time=1_700_000_001_000_000_000, instrumentation_scope=SCOPE),
        ReadableSpan("root", SpanContext(1, 2, False, TraceFlags(1)), parent=None, resource=other_res, attributes={},
                     kind=SpanKind.SERVER, status=Status(StatusCode.OK), start_time=5, end_time=6,
                     instrumentation_scope=SCOPE),
    ]


def test_same_message_as_the_sdk_encoder():
    ours = ExportTraceServiceRequest()
    ours.ParseFromString(encode_request(spans()))
    assert ours == encode_spans(spans())


def test_values_round_trip():
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue

    for v, field in (("x", "string_value"), (True, "bool_value"), (-1, "int_value"), (2.5, "double_value")):
        av = AnyValue()
        av.ParseFromString(any_value(v))
        assert getattr(av, field) == v


def test_faster_than_the_sdk_encoder():
    batch = spans() * 200
    t = time.process_time()
    encode_spans(batch).SerializeToString()
    sdk = time.process_time() - t
    t = time.process_time()
    encode_request(batch)
    ours = time.process_time() - t
    assert ours < sdk / 2, (ours, sdk)
