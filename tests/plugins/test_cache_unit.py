"""Unit tests of the cache's pure parts: the canonical key, scopes, stream assembly and replay."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from plugins._cache_entry import StreamAssembler, is_complete_body, make_entry, read_entry, replay_chunks, synthesise_chunks
from plugins._cache_key import canonical_request, credentials_of, request_key, scope_of

BASE = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5}


def test_key_ignores_order_stream_and_user():
    a = request_key("chat/completions", BASE, "s")
    b = request_key("chat/completions", {"temperature": 0.5, "stream": True, "user": "u1", "messages": BASE["messages"], "model": "m",
                                         "stream_options": {"include_usage": True}}, "s")
    assert a == b


@pytest.mark.parametrize(
    "change",
    [{"model": "other"}, {"temperature": 0.6}, {"max_tokens": 5}, {"n": 2}, {"seed": 1}, {"tools": [{"type": "function"}]},
     {"messages": [{"role": "user", "content": "hello"}]}, {"response_format": {"type": "json_object"}}, {"stop": ["x"]}],
)
def test_key_changes_with_every_answer_changing_parameter(change):
    assert request_key("chat/completions", BASE, "s") != request_key("chat/completions", {**BASE, **change}, "s")


def test_key_differs_per_endpoint_and_scope():
    assert request_key("chat/completions", BASE, "s") != request_key("completions", BASE, "s")
    assert request_key("chat/completions", BASE, "a") != request_key("chat/completions", BASE, "b")


def test_key_normalises_numbers_and_text_parts():
    one = request_key("chat/completions", {**BASE, "temperature": 1}, "s")
    assert one == request_key("chat/completions", {**BASE, "temperature": 1.0}, "s")
    text = BASE["messages"][0]["content"]
    one_part = {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
    assert request_key("chat/completions", one_part, "s") == request_key("chat/completions", BASE, "s")
    # several parts are not their concatenation: upstreams join them with a newline or a space
    parts = {**BASE, "messages": [{"role": "user", "content": [{"type": "text", "text": text[:2]}, {"type": "text", "text": text[2:]}]}]}
    assert request_key("chat/completions", parts, "s") != request_key("chat/completions", BASE, "s")
    image = {**BASE, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert request_key("chat/completions", image, "s") != request_key("chat/completions", BASE, "s")


def test_canonical_drops_nulls():
    assert canonical_request("x", {"model": "m", "seed": None})["body"] == {"model": "m"}


def test_scopes():
    assert scope_of("key", "k1", "t", None) != scope_of("key", "k2", "t", None)
    assert scope_of("team", "k1", "t", None) == scope_of("team", "k2", "t", None)
    assert scope_of("team", "k1", None, None) == scope_of("key", "k1", None, None)
    assert scope_of("shared", "k1", "t", "Bearer x") == "shared"
    assert scope_of("key", None, None, "Bearer a") != scope_of("key", None, None, "Bearer b")
    assert "Bearer" not in scope_of("key", None, None, "Bearer a")
    assert scope_of("key", None, None, None) == "anon"
    # Azure OpenAI's api-key and gateways' x-api-key are credentials too
    for h in ("api-key", "x-api-key"):
        one, two = credentials_of({h: "tenant-one"}), credentials_of({h: "tenant-two"})
        assert scope_of("key", None, None, one) != scope_of("key", None, None, two) != "anon"
    assert credentials_of({"authorization": "Bearer a"}) != credentials_of({"api-key": "Bearer a"})
    assert credentials_of({"content-type": "application/json"}) is None


def _chunk(delta, finish=None, idx=0, **kw):
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": idx, "delta": delta, "logprobs": None, "finish_reason": finish}], **kw}


def test_assembler_folds_content_tools_and_usage():
    asm = StreamAssembler()
    asm.add(_chunk({"role": "assistant", "content": ""}))
    asm.add(_chunk({"content": "Hel"}))
    asm.add(_chunk({"content": "lo"}))
    asm.add(_chunk({"tool_calls": [{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\""}}]}))
    asm.add(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}))
    assert not asm.complete
    asm.add(_chunk({}, "tool_calls"))
    asm.add({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}})
    assert asm.complete
    body = asm.body()
    msg = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-1"
    assert msg["content"] == "Hello" and msg["role"] == "assistant"
    assert msg["tool_calls"] == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"a\": 1}"}}]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert body["usage"]["total_tokens"] == 5
    assert all("usage" not in c for c in asm.chunks) and len(asm.chunks) == 6


def test_assembler_text_completions_and_multiple_choices():
    asm = StreamAssembler()
    for idx in (0, 1):
        asm.add({"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": [{"index": idx, "text": "ab", "finish_reason": None}]})
    asm.add({"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": [{"index": 0, "text": "c", "finish_reason": "stop"}]})
    assert not asm.complete
    asm.add({"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": [{"index": 1, "text": "", "finish_reason": "length"}]})
    body = asm.body()
    assert body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["abc", "ab"]


def test_assembler_error_event_breaks_it():
    asm = StreamAssembler()
    asm.add(_chunk({"content": "x"}, "stop"))
    asm.add({"error": {"message": "boom"}})
    assert not asm.complete


def test_replay_round_trip_buffered_to_stream_and_back():
    body = {"id": "chatcmpl-9", "object": "chat.completion", "created": 2, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "Yes."}, "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    entry = read_entry(make_entry(body, None))
    chunks = replay_chunks(entry, include_usage=False)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert all("usage" not in c for c in chunks)
    with_usage = replay_chunks(entry, include_usage=True)
    assert with_usage[-1]["choices"] == [] and with_usage[-1]["usage"]["total_tokens"] == 3
    asm = StreamAssembler()
    for c in with_usage:
        asm.add(c)
    again = asm.body()
    assert again["choices"] == body["choices"] and again["usage"] == body["usage"]


def test_synthesised_tool_calls_reassemble():
    body = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None,
                         "message": {"role": "assistant", "content": None,
                                     "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    asm = StreamAssembler()
    for c in synthesise_chunks(body):
        asm.add(c)
    assert asm.body()["choices"] == body["choices"]


def test_entries_of_other_versions_are_misses():
    assert read_entry(b"not json") is None
    assert read_entry(orjson.dumps({"v": 99, "body": {}})) is None


def test_complete_body():
    assert is_complete_body({"choices": [{"finish_reason": "stop"}]})
    assert not is_complete_body({"choices": [{"finish_reason": None}]})
    assert not is_complete_body({"error": {"message": "x"}})
    assert is_complete_body({"object": "list", "data": [{"embedding": [0.1]}]})
    assert not is_complete_body({"choices": []})


VLLM = Path(__file__).parent.parent / "fixtures" / "vllm"


def _sse(name: str) -> list:
    from proxy.sse import Parser

    p = Parser()
    events = [*p.feed((VLLM / name).read_bytes()), *p.close()]
    return [orjson.loads(e.data) for e in events if not e.is_done]


@pytest.mark.parametrize("name", ["chat_stream_usage.sse", "chat_stream.sse", "completion_stream_usage.sse", "completion_stream.sse"])
def test_recorded_vllm_streams_assemble_and_replay(name: str):
    chunks = _sse(name)
    asm = StreamAssembler()
    for c in chunks:
        asm.add(c)
    assert asm.complete
    body = asm.body()
    text_of = (lambda ch: ch["delta"].get("content") or "") if "chat" in name else (lambda ch: ch.get("text") or "")
    expected = "".join(text_of(ch) for c in chunks for ch in c.get("choices") or [])
    got = body["choices"][0]["message"]["content"] if "chat" in name else body["choices"][0]["text"]
    assert got == expected and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert ("usage" in body) == ("usage" in name)
    # the replay of the stored stream is the upstream's chunks, minus the usage chunk unless asked for
    entry = read_entry(make_entry(body, asm.chunks))
    assert replay_chunks(entry, include_usage=False) == [c for c in chunks if c.get("choices")]
    if "usage" in name:
        assert replay_chunks(entry, include_usage=True)[-1]["usage"] == chunks[-1]["usage"]


def test_recorded_vllm_answer_is_complete_and_replays_as_a_stream():
    body = orjson.loads((VLLM / "chat.json").read_bytes())
    assert is_complete_body(body)
    asm = StreamAssembler()
    for c in synthesise_chunks(body):
        asm.add(c)
    assert asm.body()["choices"][0]["message"]["content"] == body["choices"][0]["message"]["content"]
    assert not is_complete_body(orjson.loads((VLLM / "error_unknown_model.json").read_bytes()))


def test_legacy_function_call_and_audio_deltas_assemble_and_replay():
    """A streamed answer with the legacy ``function_call`` or with ``audio`` used to be cached without them:
    a hit answered a function call with an empty message."""
    head = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}

    def chunk(delta: dict, finish: str | None = None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    asm = StreamAssembler()
    for c in (chunk({"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": ""}}),
              chunk({"function_call": {"arguments": '{"city": '}}), chunk({"function_call": {"arguments": '"Oslo"}'}}),
              chunk({}, "function_call")):
        asm.add(c)
    body = asm.body()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": None,
                                             "function_call": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    again = StreamAssembler()
    for c in synthesise_chunks(body):
        again.add(c)
    assert again.body()["choices"] == body["choices"]

    asm = StreamAssembler()
    for c in (chunk({"role": "assistant", "audio": {"id": "audio_1", "transcript": "Hel"}}),
              chunk({"audio": {"transcript": "lo", "data": "UklG"}}), chunk({"audio": {"data": "RiQA", "expires_at": 1700000000}}),
              chunk({}, "stop")):
        asm.add(c)
    msg = asm.body()["choices"][0]["message"]
    assert msg["audio"] == {"id": "audio_1", "transcript": "Hello", "data": "UklGRiQA", "expires_at": 1700000000}
