"""The chain's semantics, proved hook by hook against real servers and the openai SDK.

Matrix: endpoint (chat, completions, responses) x answer (buffered, streamed) x
scenario (ok, early answer, upstream error, upstream timeout, client gone mid-stream).
Two probe plugins (outer, inner) record every hook call, so the onion order is checked.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import httpx
import openai
import pytest
from pydantic import Field

from proxy import Context, Event, Plugin, PluginConfig, hookimpl
from proxy.testing import FakeUpstream, SluiceServer, held_answer, register_plugin


class Probe(Plugin):
    name = "probe"
    calls: ClassVar[list[tuple[str, str]]] = []
    done: ClassVar[list[Context]] = []
    end_outcomes: ClassVar[list[str | None]] = []
    #: the tasks a request ran in: its handler's, then each connection's (aiohttp's RequestHandler.start)
    tasks: ClassVar[list[asyncio.Task[Any]]] = []

    class Config(PluginConfig):
        answer: bool = Field(False, description="answer early in on_request")

    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        self.calls.append((self.id, "on_request"))
        self.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        self.tasks.extend(t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "RequestHandler.start")  # type: ignore[union-attr]
        if ctx.answered:
            return
        if self.config.answer:
            if ctx.stream:
                ctx.reply(events=[Event.from_json(_early_chunk(ctx))], reason="probe")
            else:
                ctx.reply(200, _early_body(ctx), reason="probe")

    @hookimpl
    def on_response(self, ctx: Context) -> None:
        self.calls.append((self.id, "on_response"))
        ctx.response_headers.add("x-probe", self.id)

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> None:
        self.calls.append((self.id, "on_chunk"))

    @hookimpl
    def on_stream_end(self, ctx: Context) -> None:
        self.calls.append((self.id, "on_stream_end"))
        self.end_outcomes.append(ctx.outcome)

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        self.calls.append((self.id, "on_done"))
        self.done.append(ctx)


def _early_body(ctx: Context) -> dict[str, Any]:
    if ctx.endpoint == "chat/completions":
        return {"id": "chatcmpl-early", "object": "chat.completion", "created": 1, "model": ctx.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "early"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    if ctx.endpoint == "completions":
        return {"id": "cmpl-early", "object": "text_completion", "created": 1, "model": ctx.model,
                "choices": [{"index": 0, "text": "early", "finish_reason": "stop"}]}
    return {"id": "resp_early", "object": "response", "created_at": 1, "status": "completed", "model": ctx.model,
            "output": [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
                        "content": [{"type": "output_text", "text": "early", "annotations": []}]}]}


def _early_chunk(ctx: Context) -> dict[str, Any]:
    if ctx.endpoint == "chat/completions":
        return {"id": "chatcmpl-early", "object": "chat.completion.chunk", "created": 1, "model": ctx.model,
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "early"}, "finish_reason": "stop"}]}
    if ctx.endpoint == "completions":
        return {"id": "cmpl-early", "object": "text_completion", "created": 1, "model": ctx.model,
                "choices": [{"index": 0, "text": "early", "finish_reason": "stop"}]}
    return {"type": "response.output_text.delta", "sequence_number": 0, "item_id": "msg_1", "output_index": 0,
            "content_index": 0, "delta": "early"}


ENDPOINTS = ["chat", "completions", "responses"]


async def _call(client: openai.AsyncOpenAI, endpoint: str, stream: bool, text: str = "one two three") -> tuple[str, Any]:
    """Make the call; return the text the client assembled and the last object seen."""
    if endpoint == "chat":
        kw: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": text}]}
        if not stream:
            r = await client.chat.completions.create(**kw)
            return r.choices[0].message.content or "", r
        out, last = "", None
        async for ch in await client.chat.completions.create(**kw, stream=True):
            last = ch
            if ch.choices:
                out += ch.choices[0].delta.content or ""
        return out, last
    if endpoint == "completions":
        if not stream:
            r = await client.completions.create(model="m", prompt=text, max_tokens=100)
            return r.choices[0].text, r
        out, last = "", None
        async for ch in await client.completions.create(model="m", prompt=text, max_tokens=100, stream=True):
            last = ch
            if ch.choices:
                out += ch.choices[0].text
        return out, last
    if not stream:
        r = await client.responses.create(model="m", input=text)
        return r.output_text, r
    out, last = "", None
    async for ev in await client.responses.create(model="m", input=text, stream=True):
        last = ev
        if ev.type == "response.output_text.delta":
            out += ev.delta
    return out, last


_clients: list[openai.AsyncOpenAI] = []


def _client(s: SluiceServer) -> openai.AsyncOpenAI:
    c = openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0)
    _clients.append(c)
    return c


@pytest.fixture(autouse=True)
async def close_clients():
    yield
    while _clients:
        await _clients.pop().close()


def _config(up: FakeUpstream, chain: list[dict[str, Any]], **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"u": {"url": up.url, **upstream}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": chain}],
    }


CHAIN = [{"probe": {"id": "outer"}}, {"probe": {"id": "inner"}}]


@pytest.fixture(autouse=True)
def probe():
    Probe.calls.clear()
    Probe.end_outcomes.clear()
    Probe.done.clear()
    Probe.tasks.clear()
    with register_plugin(Probe):
        yield Probe


def phases(kind: str) -> list[str]:
    return [p for p, h in Probe.calls if h == kind]


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_ok(endpoint, stream, tmp_path):
    async with FakeUpstream() as up, SluiceServer(_config(up, CHAIN), tmp_path) as s:
        client = _client(s)
        text, last = await _call(client, endpoint, stream)
        assert text.endswith("You said: one two three")
        await s.wait_idle()
    assert phases("on_request") == ["outer", "inner"]
    if stream:
        chunks = phases("on_chunk")
        # every event passes inner first, then outer (events read together pass together)
        assert chunks and chunks.count("inner") == chunks.count("outer")
        assert all(chunks[: i + 1].count("inner") >= chunks[: i + 1].count("outer") for i in range(len(chunks)))
        assert phases("on_stream_end") == ["inner", "outer"]
        assert Probe.end_outcomes == ["ok", "ok"]  # they are told the stream completed (they were told it broke)
        assert phases("on_response") == []
    else:
        assert phases("on_response") == ["inner", "outer"]
        assert phases("on_chunk") == []
    assert phases("on_done") == ["outer", "inner"]
    ctx = Probe.done[0]
    assert ctx.outcome == "ok" and ctx.status == 200 and ctx.answered_by is None
    assert ctx.upstream is not None and ctx.upstream.upstream == "u"
    t = ctx.timings
    assert t.start <= t.upstream_start <= t.first_byte <= t.end
    if not stream or endpoint == "responses":
        # buffered answers carry usage; the Responses API stream carries it in response.completed
        assert ctx.usage is not None and ctx.usage.completion_tokens > 0


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_early_answer_passes_back_only_through_plugins_it_passed(endpoint, stream, tmp_path):
    chain = [{"probe": {"id": "outer"}}, {"probe": {"id": "middle", "answer": True}}, {"probe": {"id": "inner"}}]
    async with FakeUpstream() as up, SluiceServer(_config(up, chain), tmp_path) as s:
        client = _client(s)
        text, _ = await _call(client, endpoint, stream)
        assert text == "early"
        await s.wait_idle()
        assert up.requests == []
    assert phases("on_request") == ["outer", "middle"]
    if stream:
        assert set(phases("on_chunk")) == {"middle", "outer"}
        assert phases("on_stream_end") == ["middle", "outer"]
    else:
        assert phases("on_response") == ["middle", "outer"]
    assert phases("on_done") == ["outer", "middle", "inner"]
    ctx = Probe.done[0]
    assert ctx.answered_by == "middle" and ctx.answer_reason == "probe" and ctx.outcome == "answered"


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_upstream_error_passes_through_unchanged(endpoint, stream, tmp_path):
    body = {"error": {"message": "model 'm' does not exist", "type": "NotFoundError", "param": "model", "code": 404}}
    async with FakeUpstream() as up, SluiceServer(_config(up, CHAIN), tmp_path) as s:
        up.fail_next(404, body=body, headers={"x-upstream-thing": "kept"})
        client = _client(s)
        with pytest.raises(openai.NotFoundError) as e:
            await _call(client, endpoint, stream)
        assert e.value.status_code == 404
        assert e.value.body == body["error"]
        assert e.value.response.headers["x-upstream-thing"] == "kept"
        assert e.value.response.headers["x-request-id"].startswith("req_")
        await s.wait_idle()
    assert phases("on_response") == ["inner", "outer"]
    ctx = Probe.done[0]
    assert ctx.outcome == "upstream_error" and ctx.status == 404


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "streamed"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_upstream_timeout_is_504(endpoint, stream, tmp_path):
    async with FakeUpstream() as up, SluiceServer(_config(up, CHAIN, timeouts={"first_byte": 0.2}), tmp_path) as s:
        up.first_byte_delay = 5
        client = _client(s)
        with pytest.raises(openai.APIStatusError) as e:
            await _call(client, endpoint, stream)
        assert e.value.status_code == 504
        assert e.value.body["code"] == "upstream_timeout"
        await s.wait_idle()
    ctx = Probe.done[0]
    assert ctx.outcome == "upstream_error" and ctx.attempts[0].error == "timeout"


@pytest.mark.parametrize("which", ["idle", "total"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_stream_idle_timeout_ends_stream_with_error_event(endpoint, which, tmp_path):
    """A stalled stream ends with an error event, whichever timeout cut it; the message says which."""
    timeouts = {"idle": 0.3} if which == "idle" else {"idle": 30, "total": 0.5}
    async with FakeUpstream() as up, SluiceServer(_config(up, CHAIN, timeouts=timeouts), tmp_path) as s:
        up.stall_after = 2
        client = _client(s)
        with pytest.raises(openai.APIError) as e:
            await _call(client, endpoint, True)
        await s.wait_idle()
    ctx = Probe.done[0]
    assert ctx.outcome == "upstream_error" and ctx.attempts[0].error == "timeout"
    assert phases("on_stream_end") == ["inner", "outer"] and Probe.end_outcomes == ["upstream_error"] * 2
    said = {"idle": "The upstream stream stalled.", "total": "The upstream did not finish its stream in time."}[which]
    assert ctx.error == said and said in str(e.value)


@pytest.mark.parametrize("where", ["first_byte", "body", "body-idle", "idle"])
async def test_timeouts_leave_no_cancellation_raised(where, tmp_path):
    """A timeout cancels the request's own task and takes that back: neither the handler's task nor the
    connection's (whose count aiohttp reads to tell a shutdown) stays marked as cancelled, and the next
    request on the connection is served. ``body-idle``: a buffered answer whose body stalls ends at
    ``idle``, as a stream does (it waited for ``total``, 900 s by default)."""
    timeouts = {"first_byte": {"first_byte": 0.2}, "body": {"total": 0.3}, "body-idle": {"idle": 0.3},
                "idle": {"idle": 0.3}}[where]
    async with FakeUpstream() as up, held_answer(b'{"id": "chatcmpl-1", ', "application/json", 1000) as (stalling, _):
        cfg = _config(up, CHAIN, timeouts=timeouts)
        if where.startswith("body"):
            cfg["upstreams"]["u"]["url"] = stalling
        async with SluiceServer(cfg, tmp_path) as s:
            if where == "first_byte":
                up.first_byte_delay = 5
            up.stall_after = 2 if where == "idle" else None
            client = _client(s)
            with pytest.raises(openai.APIError) as e:
                await _call(client, "chat", where == "idle")
            if where != "idle":
                assert isinstance(e.value, openai.APIStatusError) and e.value.status_code == 504
            await s.wait_idle()
            handler = Probe.tasks[0]  # each probe adds the handler's task, then the connections' tasks it sees
            connections = [t for t in Probe.tasks if t.get_coro().__qualname__ == "RequestHandler.start"]  # type: ignore[union-attr]
            assert connections, "no connection task seen"
            assert handler.cancelling() == 0
            assert [t.cancelling() for t in connections] == [0] * len(connections)
            if not where.startswith("body"):
                up.first_byte_delay, up.stall_after = 0.0, None
                text, _ = await _call(client, "chat", False)
                assert text
    assert Probe.done[0].attempts[0].error == "timeout"


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_client_gone_mid_stream_cancels_upstream(endpoint, tmp_path):
    paths = {"chat": "chat/completions", "completions": "completions", "responses": "responses"}
    bodies = {
        "chat": {"model": "m", "messages": [{"role": "user", "content": "w " * 200}], "stream": True},
        "completions": {"model": "m", "prompt": "w " * 200, "max_tokens": 500, "stream": True},
        "responses": {"model": "m", "input": "w " * 200, "stream": True},
    }
    async with FakeUpstream() as up, SluiceServer(_config(up, CHAIN), tmp_path) as s:
        up.token_delay = 0.02
        async with httpx.AsyncClient() as http:
            async with http.stream("POST", f"{s.url}/{paths[endpoint]}", json=bodies[endpoint]) as r:
                assert r.status_code == 200
                n = 0
                async for _ in r.aiter_lines():
                    n += 1
                    if n >= 6:
                        break
        # the proxy notices the client left and aborts the upstream request at once
        await up.wait_for(lambda: up.stats.aborted >= 1, timeout=10)
        await s.wait_idle()
    ctx = Probe.done[0]
    assert ctx.outcome == "client_gone"
    assert phases("on_done") == ["outer", "inner"]
    assert up.stats.completed_streams == 0
