"""The wire format: usage extraction from answers and events, header hygiene."""

from __future__ import annotations

import orjson
import pytest
from multidict import CIMultiDict

from proxy.openai import usage_from_body
from proxy.openai import ensure_stream_usage, request_headers, response_headers, streams_usage, usage_from


def chat(content: str, usage: object) -> bytes:
    return orjson.dumps({"id": "x", "choices": [{"message": {"content": content}}], "usage": usage})


def test_usage_from_body_reads_the_answers_own_usage():
    u = usage_from_body(chat("hi", {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                    "prompt_tokens_details": {"cached_tokens": 2}, "completion_tokens_details": {"reasoning_tokens": 1}}))
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens) == (3, 4, 7, 2, 1)


def test_usage_inside_content_is_not_mistaken_for_the_answers():
    body = chat('the JSON was {"usage": {"prompt_tokens": 999}} and "usage"', {"prompt_tokens": 1, "completion_tokens": 2})
    u = usage_from_body(body)
    assert (u.prompt_tokens, u.completion_tokens) == (1, 2)
    # usage first, then content that mentions it: the scan falls back to a full parse
    body = b'{"usage": {"prompt_tokens": 5, "completion_tokens": 6}, "choices": [{"text": "\\"usage\\": {}"}]}'
    assert usage_from_body(body).prompt_tokens == 5


@pytest.mark.parametrize("usage", [None, "many", {"prompt_tokens": "x", "completion_tokens": None}, {}])
def test_malformed_or_missing_usage_is_none(usage):
    assert usage_from_body(chat("x", usage)) is None


def test_responses_api_usage_and_events():
    u = usage_from({"type": "response.completed", "response": {"usage": {"input_tokens": 8, "output_tokens": 2,
                    "input_tokens_details": {"cached_tokens": 4}, "output_tokens_details": {"reasoning_tokens": 1}}}})
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens) == (8, 2, 10, 4, 1)


def test_ensure_stream_usage_keeps_other_stream_options():
    body = {"stream_options": {"continuous_usage_stats": False, "x": 1}}
    assert ensure_stream_usage(body) is True
    assert body["stream_options"] == {"continuous_usage_stats": False, "x": 1, "include_usage": True}
    assert ensure_stream_usage(body) is False
    # vLLM sends continuous usage only with include_usage: the client asked for none, so none comes
    body = {"stream_options": {"continuous_usage_stats": True}}
    assert ensure_stream_usage(body) is True
    assert body["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    body = {"stream_options": {"continuous_usage_stats": True, "include_usage": True}}
    assert ensure_stream_usage(body) is False and body["stream_options"]["continuous_usage_stats"] is True


def test_stream_usage_endpoints_under_any_prefix():
    for endpoint in ("chat/completions", "completions", "v1/chat/completions", "deployments/gpt/chat/completions", "v1/completions",
                     "chat/completions/"):
        assert streams_usage(endpoint), endpoint
    for endpoint in ("embeddings", "v1/embeddings", "responses", "v1/xcompletions", "chat/completions/x", "models"):
        assert not streams_usage(endpoint), endpoint


def test_stream_end_is_read_from_the_finishing_events_only():
    from proxy.relay import tap_end
    from proxy.testing import make_context

    first = b'data: {"id":"c1","model":"m-1","choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"finish_reason":null}]}'
    token = b'data: {"id":"c1","model":"m-1","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}'
    last0 = b'data: {"id":"c1","model":"m-1","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    last1 = b'data: {"id": "c1", "model": "m-1", "choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]}'
    refused = b'data: {"id":"c1","model":"m-1","choices":[{"index":0,"delta":{"refusal":"I can\'t help with that."},"finish_reason":null}]}'
    for sep in (b"\n\n", b"\r\n\r\n"):
        ctx = make_context({"model": "m"})
        tap_end(ctx, sep.join([first, token, token]) + sep)
        assert ctx.stream_end is None  # nothing finished yet: nothing parsed
        tap_end(ctx, sep.join([token, last1, last0, b"data: [DONE]"]) + sep)
        end = ctx.stream_end
        assert (end.model, end.id, end.finish_reasons, end.refusal) == ("m-1", "c1", ["stop", "length"], False)
        tap_end(ctx, refused + sep)
        assert ctx.stream_end.refusal is True


def test_the_raw_relay_finds_finishing_events_in_compact_and_spaced_json():
    """The relay learns from the first JSON block whether it needs the spaced scans too."""
    from proxy.relay import RawRelay
    from proxy.testing import make_context

    for first, last in (
        (b'data: {"model":"m","choices":[{"delta":{"content":"a"},"finish_reason":null}]}\n\n',
         b'data: {"model":"m","choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'),
        (b'data: {"model": "m", "choices": [{"delta": {"content": "a"}, "finish_reason": null}]}\n\n',
         b'data: {"model": "m", "choices": [{"delta": {}, "finish_reason": "stop"}]}\n\n'),
    ):
        ctx = make_context({"model": "m"})
        relay = RawRelay(ctx, True, False, None, None)  # type: ignore[arg-type]
        for block in (b": keep-alive\n\n", first, last):
            assert relay.block(block) == block
        assert ctx.stream_end is not None and ctx.stream_end.finish_reasons == ["stop"], first


def test_a_chunks_model_and_id_are_read_from_its_bytes():
    from proxy.relay import _string_member

    assert _string_member(b'data: {"id":"c-1","model":"m-2","choices":[]}', b'"model"') == "m-2"
    assert _string_member(b'data: {"id": "c-1", "model": "m-2"}', b'"id"') == "c-1"
    assert _string_member(b'data: {"model":"with \\"quote\\""}', b'"model"') is None  # escaped: not guessed
    assert _string_member(b'data: {"model":null,"id":"x"}', b'"model"') is None
    assert _string_member(b'data: {"model":"' + b"m" * 300 + b'"}', b'"model"') is None
    from proxy.relay import note_start
    from proxy.testing import make_context

    ctx = make_context({"model": "m"})  # Azure's first chunk: its prompt filter results, with empty names
    note_start(ctx, b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[]}\n\n')
    assert ctx.stream_end is None


def test_a_buffered_answer_is_read_once_by_ctx_answer_and_again_only_when_replaced():
    from proxy import Response
    from proxy.context import _UNPARSED, ANSWER_PARSE_LIMIT
    from proxy.testing import make_context

    ctx = make_context({"model": "m"})
    assert ctx.answer is None  # no answer yet
    body = {"id": "c-1", "model": "m-2", "choices": [
        {"index": 2, "message": {"content": "b"}, "finish_reason": "length"},
        {"message": {"content": None, "refusal": "I can't help with that."}, "finish_reason": "stop"},  # no index: its place
        {"index": 3, "finish_reason": 7},  # not a string: left out
        "not a choice",
    ]}
    ctx.response = Response(200, {}, orjson.dumps(body))
    a = ctx.answer
    assert (a.model, a.id, a.reasons, a.refusal, a.choices) == ("m-2", "c-1", {2: "length", 1: "stop"}, True, 3)
    assert a.finish_reasons == ["stop", "length"]  # in index order
    assert ctx.answer is a  # read once for every reader
    ctx.response.set_json({"id": "", "model": "", "object": "embedding.list", "data": []})  # a plugin replaced it
    a = ctx.answer
    assert (a.model, a.id, a.reasons, a.refusal, a.choices) == (None, None, {}, False, 0)  # empty names are no names
    for raw in (b"not json", b"[1, 2]", b"[" + b"1, " * ANSWER_PARSE_LIMIT + b"1]"):
        ctx.response = Response(200, {}, raw)
        assert ctx.answer is None, raw[:20]
    # a big answer (an embeddings batch) is not parsed: its model and id are read from the bytes
    vectors = [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 1536} for i in range(60)]
    big = orjson.dumps({"object": "list", "data": vectors, "model": "text-embedding-3-small", "usage": {"prompt_tokens": 9}})
    assert len(big) > ANSWER_PARSE_LIMIT
    ctx.response = Response(200, {}, big)
    a = ctx.answer
    assert (a.model, a.id, a.reasons, a.choices) == ("text-embedding-3-small", None, {}, 0)
    assert ctx.response._json is _UNPARSED
    # a stream's answer is the one its events gave (the relay's ctx.stream_end)
    from proxy.context import StreamEnd

    ctx.response, ctx.stream_end = None, StreamEnd(model="m-3", id="c-3", reasons={0: "stop"})
    assert ctx.answer is ctx.stream_end


def test_header_hygiene():
    h = request_headers(CIMultiDict({"Host": "x", "Connection": "close, X-Trace", "X-Trace": "1", "Authorization": "Bearer k",
                                     "Transfer-Encoding": "chunked", "Content-Length": "5", "Keep-Alive": "1",
                                     "Accept-Encoding": "gzip, br"}))
    # plain answers asked for, whatever the client accepts: Sluice sends them on decoded
    assert dict(h) == {"Authorization": "Bearer k", "accept-encoding": "identity"}
    r = response_headers(CIMultiDict({"Content-Encoding": "gzip", "X-Request-Id": "up-1", "Content-Type": "application/json"}))
    assert dict(r) == {"x-upstream-request-id": "up-1", "Content-Type": "application/json"}


def test_stream_flag_without_a_parse_unless_the_key_may_be_there():
    from proxy.context import _UNPARSED, Context

    plain = Context(request_id="r", method="POST", path="/v1/chat/completions", raw=b'{"model": "m", "messages": []}')
    assert plain.stream is False
    assert plain._body is _UNPARSED  # nothing was parsed to answer that
    escaped = Context(request_id="r", method="POST", path="/v1/chat/completions", raw=b'{"\\u0073tream": true}')
    assert escaped.stream is True
    off = Context(request_id="r", method="POST", path="/v1/chat/completions", raw=b'{"stream": false, "model": "m"}')
    assert off.stream is False and off.model == "m"


def test_model_and_stream_follow_the_body_assigned_back():
    from proxy.context import Context

    ctx = Context(request_id="r", method="POST", path="/v1/chat/completions", raw=b'{"model": "a", "stream": false}')
    assert (ctx.model, ctx.stream) == ("a", False)
    body = ctx.body
    body["model"], body["stream"] = "b", True
    ctx.body = body
    assert (ctx.model, ctx.stream) == ("b", True)
    ctx.body = {"model": 7}
    assert (ctx.model, ctx.stream) == (None, False)
    ctx.body = None
    assert (ctx.model, ctx.stream) == (None, False)


def test_requested_model_stays_the_clients_after_a_plugin_rewrites_the_body():
    from proxy.context import Context

    ctx = Context(request_id="r", method="POST", path="/v1/chat/completions", raw=b'{"model": "auto", "messages": []}')
    assert ctx.requested_model == ctx.model == "auto"
    body = ctx.body
    body["model"] = "small"  # in place first, as a router does, then assigned back
    ctx.body = body
    assert (ctx.model, ctx.requested_model) == ("small", "auto")
    ctx.body = {"model": "large"}
    assert (ctx.model, ctx.requested_model) == ("large", "auto")
    for raw in (b"", b"{not json", b'{"model": 3}', b"[]"):
        ctx = Context(request_id="r", method="POST", path="/v1/x", raw=raw)
        ctx.body = {"model": "m"}
        assert (ctx.model, ctx.requested_model) == ("m", None)


def test_request_ids_are_unique_and_time_ordered():
    import time

    from proxy.handler import new_request_id

    first = new_request_id()
    ids = [new_request_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(i.startswith("req_") and len(i) == 36 for i in ids)
    # the first 12 hex digits are the millisecond: never decreasing, and now
    stamps = [int(i[4:16], 16) for i in [first, *ids]]
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] - time.time_ns() // 1_000_000) < 60_000


@pytest.mark.parametrize(
    ("usage", "want"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4}, (3, 4, 7, 0, 0)),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 9}, (3, 4, 9, 0, 0)),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 0}, (3, 4, 7, 0, 0)),
        # a count given but not one (a bool, a negative) makes the usage malformed: estimated instead
        ({"prompt_tokens": 3, "completion_tokens": True}, None),
        ({"prompt_tokens": -1, "completion_tokens": 2}, None),
        ({"prompt_tokens": 3}, (3, 0, 3, 0, 0)),  # absent is no count: an embedding's usage
        ({"prompt_tokens": 2.0, "completion_tokens": None, "input_tokens": 5}, (5, 0, 5, 0, 0)),
        ({"prompt_tokens": True, "completion_tokens": False}, None),
        ({"input_tokens": 1, "output_tokens": 2, "input_tokens_details": None, "output_tokens_details": []}, (1, 2, 3, 0, 0)),
        ({"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": "4"}, "completion_tokens_details": {"reasoning_tokens": -2}}, (1, 0, 1, 0, 0)),
        ({"prompt_tokens": 1, "prompt_tokens_details": {"cached_tokens": 1}, "completion_tokens_details": {"reasoning_tokens": 0}}, (1, 0, 1, 1, 0)),
        # past any real count (JSON allows it; one past 64 bits cost the ledger its row): malformed, estimated
        ({"prompt_tokens": 2**63, "completion_tokens": 2}, None),
        ({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 2**64, "prompt_tokens_details": {"cached_tokens": 2**60}}, (1, 2, 3, 0, 0)),
    ],
)
def test_usage_counts_are_non_negative_integers_and_nothing_else(usage, want):
    u = usage_from({"usage": usage})
    assert (None if u is None else (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens)) == want


def _tap(fn, block: bytes, injected: bool):
    from proxy.testing import make_context

    ctx = make_context({"model": "m"})
    out = fn(ctx, block, injected)
    u = ctx.usage
    return out, None if u is None else (u.prompt_tokens, u.completion_tokens)


#: stream events both usage-tap tests use: a finishing chunk with OpenAI's null usage, the usage chunk, the end
FINISH = b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],"usage":null}'
USAGE_ONLY = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}'
DONE_EVENT = b"data: [DONE]"


def test_the_usage_tap_finds_and_hides_exactly_what_the_general_scan_does():
    """The ``\\n\\n`` fast path of tap_block against the scan that knows every SSE separator."""
    import itertools

    from proxy.relay import _tap_block_any, tap_block

    content = b'data: {"choices":[{"delta":{"content":"say \\"usage\\" twice"}}]}'
    with_choices = b'data: {"choices":[{"delta":{}}],"usage":{"prompt_tokens":7,"completion_tokens":1}}'
    named = b'event: message\nid: 4\ndata: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":2}}'
    comment = b": keep-alive"
    spaced_null = b'data: {"usage": null, "choices":[{"delta":{"content":"x"}}]}'
    word = b'data: {"choices":[{"delta":{"content":"usage"}}],"usage":null}'  # the word first, then the member
    spaced_last = b'data: {"choices": [{"delta": {"content": "y"}}], "usage": null}'
    parts = [content, FINISH, USAGE_ONLY, with_choices, named, comment, DONE_EVENT, spaced_null, word, spaced_last]
    seen = 0
    for n in (1, 2, 3):
        for combo in itertools.permutations(parts, n):
            for tail in (b"\n\n", b"", b"\n"):
                block = b"\n\n".join(combo) + tail
                for injected in (False, True):
                    assert _tap(tap_block, block, injected) == _tap(_tap_block_any, block, injected), block
                    seen += 1
    assert seen > 1000
    out, usage = _tap(tap_block, content + b"\n\n" + USAGE_ONLY + b"\n\n" + DONE_EVENT + b"\n\n", True)
    assert out == content + b"\n\n" + DONE_EVENT + b"\n\n" and usage == (3, 5)
    # OpenAI's "usage":null members: cut when we asked for the usage, kept when the client did
    block = FINISH + b"\n\n" + spaced_null + b"\n\n"
    out, usage = _tap(tap_block, block, True)
    assert out == (b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
                   b'data: { "choices":[{"delta":{"content":"x"}}]}\n\n') and usage is None
    assert _tap(tap_block, block, False) == (block, None)
    for block in (word + b"\n\n", spaced_last + b"\n\n"):
        out, _ = _tap(tap_block, block, True)
        assert b'"usage"' not in out.replace(b'"content":"usage"', b""), out
        assert _tap(tap_block, block, False) == (block, None)


def test_the_parsed_relay_sends_what_the_raw_relay_sends_for_events_no_plugin_changed():
    """An event no plugin changes leaves the parsed relay as the upstream wrote it, less what Sluice
    asked for (a usage chunk, ``"usage":null`` members): the raw relay's bytes, spacing, escapes and
    numbers included, not a serialisation of its JSON."""
    import itertools

    from proxy.relay import tap_block, tap_event
    from proxy.sse import Parser
    from proxy.testing import make_context

    spaced = b'data: {"id": "c1", "choices": [{"index": 0, "delta": {"content": "caf\\u00e9 1e-05"}, "logprobs": {"x": 1.50}}], "usage": null}'
    compact = b'data: {"choices":[{"delta":{"content":"x"},"finish_reason":null}],"usage":null,"n":1.0}'
    first = b'data: {"usage":null,"choices":[{"delta":{"content":"say \\"usage\\""}}]}'
    plain = b'data: {"choices":[{"delta":{"content":"usage"}}]}'
    tight = b'data:{"choices":[{"delta":{"content":"no blank after data:"}}],"usage":null}'
    seen = 0
    for combo in itertools.permutations([spaced, compact, first, FINISH, USAGE_ONLY, plain, tight, DONE_EVENT], 3):
        block = b"\n\n".join(combo) + b"\n\n"
        for injected in (False, True):
            raw_out, raw_usage = _tap(tap_block, block, injected)
            ctx = make_context({"model": "m"})
            out = b""
            for ev in Parser().feed(block):
                if ev.is_done or tap_event(ctx, ev, injected):
                    out += ev.encode()
            u = ctx.usage
            assert (out, None if u is None else (u.prompt_tokens, u.completion_tokens)) == (raw_out, raw_usage), block
            seen += 1
    assert seen == 672  # every ordered choice of three of the eight kinds, asked or not
    # what a plugin reads of a cut event is what the client gets
    ev = next(Parser().feed(tight + b"\n\n"))
    assert tap_event(make_context({"model": "m"}), ev, True)
    assert ev.encode() == b'data:{"choices":[{"delta":{"content":"no blank after data:"}}]}\n\n'
    assert ev.data == '{"choices":[{"delta":{"content":"no blank after data:"}}]}'
    ev = next(Parser().feed(spaced + b"\n\n"))
    assert tap_event(make_context({"model": "m"}), ev, True)
    assert ev.encode() == b'data: {"id": "c1", "choices": [{"index": 0, "delta": {"content": "caf\\u00e9 1e-05"}, "logprobs": {"x": 1.50}}]}\n\n'
    assert ev.json == {"id": "c1", "choices": [{"index": 0, "delta": {"content": "caf\u00e9 1e-05"}, "logprobs": {"x": 1.5}}]}
    ev.json["choices"][0]["delta"]["content"] = "changed"  # a plugin's change: serialised again
    ev.changed()
    assert b'"changed"' in ev.encode() and b"usage" not in ev.encode()


def test_upstream_urls_are_built_once_per_endpoint_and_stay_right_past_the_cache():
    from proxy.config import UpstreamConfig
    from proxy.upstream import URL_CACHE_SIZE, Upstream

    up = Upstream("u", UpstreamConfig(url="http://127.0.0.1:9/v1"))
    a = up.url_for("chat/completions", "")
    assert a is up.url_for("chat/completions", "") and str(a) == "http://127.0.0.1:9/v1/chat/completions"
    for i in range(URL_CACHE_SIZE * 2 + 3):
        assert str(up.url_for("files", f"after=file_{i}&limit=2")) == f"http://127.0.0.1:9/v1/files?after=file_{i}&limit=2"
    assert len(up._urls) <= URL_CACHE_SIZE
    assert str(up.url_for("models/a%2Fb", "")) == "http://127.0.0.1:9/v1/models/a%2Fb"  # sent as the client encoded it
