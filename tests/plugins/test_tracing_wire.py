"""The direct OTLP encoder writes exactly what the SDK's encoder writes (its speed is benchmarks/bench_observers.py's)."""

from __future__ import annotations

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


# -- the tracing plugin's spans assembled from cached parts -----------------------------

def _contexts(rt):
    """Finished requests of many kinds: each field the spans read, present and absent."""
    from types import SimpleNamespace

    import orjson

    from proxy import Attempt, Identity, Response, StreamEnd, Target, Usage
    from proxy.testing import make_context

    route = SimpleNamespace(name="main", prefix="/v1/")
    answer = orjson.dumps({"id": "chatcmpl-1", "model": "gpt-4o-2024", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "ho"}, "finish_reason": "length"}]})
    bodies = [
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]},
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "temperature": 1, "max_tokens": 20},
        {"model": "gpt-4o", "messages": [], "temperature": 1.0, "stop": ["a", "b"], "seed": 7},
        {"model": "gpt-4o", "messages": [], "temperature": True, "stop": "x", "n": 2},
        {"model": "gpt-4o", "messages": [], "temperature": -0.0, "top_p": 0.0, "stream": True},
        {"model": "gpt-4o", "messages": [], "temperature": 0.0, "top_p": -0.0, "stream": True},
        {"model": "other", "prompt": "once upon", "max_completion_tokens": 5},
        {"messages": [{"role": "user", "content": "no model"}]},
    ]
    answers = [
        answer,
        orjson.dumps({"id": "chatcmpl-" + "x" * 200, "model": "gpt-4o-2024", "choices": [{"finish_reason": "stop"}]}),
        orjson.dumps({"id": "réponse-ü", "choices": [{"finish_reason": "length"}, "odd", {"finish_reason": None}]}),
        orjson.dumps({"id": 5, "model": 7, "choices": {"finish_reason": "stop"}}),
        orjson.dumps([1, 2]),
    ]
    out = []
    for i, body in enumerate(bodies):
        for variant in range(6):
            headers = {}
            if variant == 1:
                headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                           "tracestate": "vendor=abc, other=x"}
            elif variant == 2:
                headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
            ident = None if variant in (0, 3) else Identity(key_id=f"k{variant}", team="t" if variant % 2 else None)
            ctx = make_context(body, runtime=rt, identity=ident, headers=headers, path="/v1/chat/completions" if i != 6 else "/v1/completions")
            ctx.route = route if variant != 4 else None
            ctx.request_id = "req_" + "é" * (i * 20) + "x" * (i * 3)
            t = ctx.timings
            t.end = t.start + 0.05
            if variant == 3:  # answered early by a plugin: no attempt
                ctx.answered_by, ctx.answer_reason, ctx.status, ctx.outcome = "auth", "missing_key", 401, "answered"
                ctx.tags["variant"] = "b"
                ctx.tags["n"] = 1
            elif variant == 5:  # two failures then the fallback
                ctx.attempts += [
                    Attempt(Target("bad"), start=t.start + 0.001, status=503, end=t.start + 0.002),
                    Attempt(Target("bad"), start=t.start + 0.003, error="connect"),
                    Attempt(Target("good", model="gpt-4o-mini", label="cheap"), start=t.start + 0.004, status=200,
                            first_byte=t.start + 0.01, end=None),
                ]
                ctx.upstream = Target("good", model="gpt-4o-mini", label="cheap")
                t.upstream_start, t.upstream_end = t.start + 0.001, t.start + 0.04
                ctx.usage = Usage(10, 3, 13, cached_tokens=4, reasoning_tokens=1, estimated=True)
                ctx.status, ctx.outcome = 200, "ok"
                ctx.tags["cache"] = "miss"
                ctx.annotations["pii"] = {"email": 2, "flag": True, "phone": 0.5}
                ctx.cost = 0.00125
            else:
                ctx.attempts.append(Attempt(Target("good"), start=t.start + 0.001, status=200 if variant != 4 else 502,
                                            first_byte=t.start + 0.01, end=t.start + 0.04))
                ctx.upstream = Target("good")
                t.first_byte = t.start + 0.01
                ctx.status = 200 if variant != 4 else 502
                ctx.outcome = "ok" if variant != 4 else "upstream_error"
                if variant != 2:
                    ctx.response = Response(ctx.status, {"content-type": "application/json"},
                                            answers[i % len(answers)] if variant != 4 else b"{}")
                elif i % 2 == 0:  # a stream: its answer as the core read it from the finishing events
                    ctx.stream_end = StreamEnd(model="gpt-4o-2024" if i % 4 else None, id="chatcmpl-s" if i else None,
                                               reasons={1: "length", 0: "stop"} if i % 3 else {})
                ctx.usage = (Usage(21, 28, 49) if i % 2 else Usage(21.0, 28, 49)) if variant != 4 else None
                if variant == 0:
                    ctx.tags["cache"] = "hit"
            t.plugins.update({"metrics.on_done": 2e-5, "tracing.on_request": 1e-5})
            out.append(ctx)
    return out


async def test_spans_from_cached_parts_are_the_sdk_encoders_messages(tmp_path):
    """``Tracing._encoded`` gives, byte for byte, what the SDK encoder makes of ``Tracing._spans``.

    Every kind of request twice (the second time from cached parts), with each option that
    changes the attributes.
    """
    import random

    from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan

    from plugins._otel_wire import encode_batch
    from plugins.tracing import OUTPUT, Tracing
    from proxy.testing import configure_plugin, make_runtime

    rt = await make_runtime(tmp_path, config={"upstreams": {
        "good": {"url": "https://api.example.com/v1", "models": ["gpt-4o"]},
        "bad": {"url": "http://127.0.0.1:9/v1", "models": ["gpt-4o"]}}})
    try:
        for options in ({}, {"plugin_timings": True}, {"capture_content": True, "max_content_chars": 64}):
            p = await configure_plugin(Tracing, {"exporter": "none", **options}, runtime=rt)
            compared = 0
            for round_ in range(2):
                for k, ctx in enumerate(_contexts(rt)):
                    if options.get("capture_content"):
                        ctx.stash[OUTPUT] = '[{"role": "assistant", "content": "' + "x" * 100 * (k % 2) + '"}]'
                    trace = p._trace(ctx)
                    sent: list[str] = []
                    if k % 3 == 0 and ctx.attempts:  # attempts sent with a traceparent, as the core does
                        made = list(ctx.attempts)
                        ctx.attempts.clear()
                        for a in made:
                            ctx.attempts.append(a)
                            headers: dict[str, str] = {}
                            p._propagate(ctx, a, headers)
                            sent.append(headers["traceparent"].split("-")[2])
                    random.seed(k)
                    sdk = encode_spans(p._spans(ctx, trace))
                    random.seed(k)
                    encoded = p._encoded(ctx, trace)
                    ours = ExportTraceServiceRequest()
                    ours.ParseFromString(encode_batch(p.pipeline.resource, p.pipeline.scope, encoded))
                    assert ours == sdk, (options, round_, k)
                    # and each span's bytes exactly as the SDK's protobuf serialises that span
                    mine = [PbSpan.FromString(e) for e in encoded]
                    assert mine == list(sdk.resource_spans[0].scope_spans[0].spans)
                    if sent:  # each client span is the one its attempt named upstream
                        assert [m.span_id.hex() for m in mine[:-1]] == sent
                    compared += len(encoded)
            assert compared > 100
            await p.stop()
    finally:
        await rt.close_all()
