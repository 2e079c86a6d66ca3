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


def test_reused_encodings_stay_exact():
    """Cached pairs (strings, small ints, bools, short lists) come back right, on any later span.

    The same key with values of other types or other lengths, a resource attribute equal to a
    span attribute, lengths past one and two varint bytes, and ints past the cached range.
    """
    res = Resource.create({"service.name": "sluice", "gen_ai.operation.name": "chat"})
    variants = [
        {"gen_ai.operation.name": "chat", "n": 1, "flag": True, "reasons": ["stop"], "mixed": [1, True, "x", 0.5]},
        {"gen_ai.operation.name": "chat", "n": True, "flag": 1, "reasons": ["stop", "length"], "mixed": [True, 1, "x", 0.5]},
        {"gen_ai.operation.name": "embeddings", "n": 1023, "flag": False, "reasons": ("stop",), "mixed": []},
        {"gen_ai.operation.name": "x" * 200, "n": -1023, "flag": "True", "reasons": ["s" * 20_000], "mixed": [[1, 2]]},
        {"gen_ai.operation.name": "chat", "n": 1024, "big": -(2**63), "reasons": ["stop"] * 9, "f": 1.0, "b": b"\x00\xff"},
        {"sluice.request_id": "req_1", "gen_ai.response.id": "chatcmpl-1", "n": 1, "reasons": ["stop"]},
    ]
    batch = []
    for round_ in range(3):  # the second and third rounds hit the caches the first filled
        for i, attrs in enumerate(variants):
            ctx = SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0x1000 + i + 100 * round_, False, TraceFlags(1))
            batch.append(ReadableSpan(f"span {i}", ctx, parent=None, resource=res, attributes=attrs, kind=SpanKind.CLIENT,
                                      status=Status(StatusCode.UNSET), start_time=1_700_000_000_000_000_000 + i,
                                      end_time=1_700_000_000_100_000_000, instrumentation_scope=SCOPE))
        ours = ExportTraceServiceRequest()
        ours.ParseFromString(encode_request(batch))
        assert ours == encode_spans(batch)
