"""The cache through a real server, with the openai SDK as client and the fake upstream behind it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from pydantic import ValidationError

from plugins.cache import Cache
from proxy import Context, Identity, Plugin, hookimpl
from proxy.testing import FakeUpstream, RedisServer, SluiceServer, configure_plugin, make_context, make_runtime, register_plugin

MSG = [{"role": "user", "content": "what is the capital of France"}]


class Door(Plugin):
    """Test double of an auth plugin and an outer transform: sets the identity from headers,
    marks answers on their way out, and records what on_done saw."""

    name = "door"
    seen: list[dict[str, Any]] = []

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return
        key = ctx.headers.get("x-test-key")
        if key:
            ctx.identity = Identity(key_id=key, team=ctx.headers.get("x-test-team"))

    @hookimpl
    def on_response(self, ctx: Context) -> None:
        body = ctx.response.json if ctx.response is not None else None
        if isinstance(body, dict) and body.get("choices"):
            body["choices"][0]["message"]["content"] += " [outer]"
            ctx.response.set_json(body)

    @hookimpl
    def on_chunk(self, ctx: Context, event):
        obj = event.json
        if isinstance(obj, dict) and obj.get("choices") and obj["choices"][0].get("finish_reason"):
            obj["choices"][0]["delta"]["content"] = (obj["choices"][0]["delta"].get("content") or "") + " [outer]"
            event.json = obj
        return None

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        Door.seen.append({"tags": dict(ctx.tags), "upstream": ctx.upstream, "outcome": ctx.outcome, "answered_by": ctx.answered_by})


@pytest.fixture(autouse=True)
def door():
    Door.seen = []
    with register_plugin(Door):
        yield Door


def config(up: FakeUpstream, chain: list[dict] | None = None, **cache: Any) -> dict:
    return {
        "upstreams": {"demo": {"url": up.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "demo", "chain": chain or [{"cache": {"backend": "memory", **cache}}]}],
    }


def client(s: SluiceServer, key: str = "sk-a", **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.url, api_key=key, max_retries=0, **kw)


async def chat(c: openai.AsyncOpenAI, **kw: Any):
    kw.setdefault("model", "sluice-demo")
    kw.setdefault("messages", MSG)
    raw = await c.chat.completions.with_raw_response.create(**kw)
    return raw.headers, raw.parse()


async def stream(c: openai.AsyncOpenAI, **kw: Any):
    kw.setdefault("model", "sluice-demo")
    kw.setdefault("messages", MSG)
    raw = await c.chat.completions.with_raw_response.create(stream=True, **kw)
    chunks = [ch async for ch in raw.parse()]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return raw.headers, chunks, text


def chat_requests(up: FakeUpstream) -> int:
    return sum(1 for r in up.requests if r.path.endswith("/chat/completions"))


@pytest.mark.parametrize("backend", ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def test_miss_then_hit_on_every_backend(upstream: FakeUpstream, tmp_path: Path, backend: str, request: pytest.FixtureRequest):
    cfg = config(upstream, backend=backend)
    if backend == "redis":
        rs: RedisServer = request.getfixturevalue("redis_server")
        cfg["state"] = {"redis": {"url": rs.url, "key_prefix": f"cache-{tmp_path.name}:"}}
    async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
        h1, r1 = await chat(c)
        await s.wait_idle()
        h2, r2 = await chat(c, temperature=None)
        assert (h1["x-sluice-cache"], h2["x-sluice-cache"]) == ("miss", "hit")
        assert r2.choices[0].message.content == r1.choices[0].message.content
        assert r2.usage.total_tokens == r1.usage.total_tokens
        assert chat_requests(upstream) == 1
        assert int(h2["age"]) >= 0


async def test_key_ignores_stream_user_and_field_order_but_not_parameters(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        await chat(c, user="alice", temperature=0.2)
        await s.wait_idle()
        h, _ = await chat(c, user="bob", temperature=0.2)
        assert h["x-sluice-cache"] == "hit"
        h, _ = await chat(c, temperature=0.3)
        assert h["x-sluice-cache"] == "miss"
        h, _ = await chat(c, temperature=0.2, max_tokens=3)
        assert h["x-sluice-cache"] == "miss"
        assert chat_requests(upstream) == 3


async def test_tenants_never_share_entries(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s, client(s, "sk-a") as a, client(s, "sk-b") as b:
        await chat(a)
        await s.wait_idle()
        hb, _ = await chat(b)
        assert hb["x-sluice-cache"] == "miss"
        await s.wait_idle()
        ha, _ = await chat(a)
        hb, _ = await chat(b)
        assert (ha["x-sluice-cache"], hb["x-sluice-cache"]) == ("hit", "hit")
        assert chat_requests(upstream) == 2


@pytest.mark.parametrize("header", ["api-key", "x-api-key"])
async def test_tenants_keyed_by_other_credential_headers_never_share_entries(upstream: FakeUpstream, tmp_path: Path, header: str):
    """Azure OpenAI's SDK sends its key in ``api-key``, some gateways' clients in ``x-api-key``: without an
    auth plugin, those are the tenants' credentials as much as ``Authorization`` is."""
    async with SluiceServer(config(upstream), tmp_path) as s, \
            client(s, default_headers={header: "tenant-one-key"}) as a, client(s, default_headers={header: "tenant-two-key"}) as b:
        await chat(a)
        await s.wait_idle()
        hb, _ = await chat(b)
        assert hb["x-sluice-cache"] == "miss"
        assert chat_requests(upstream) == 2


async def test_scope_by_identity_key_team_and_shared(upstream: FakeUpstream, tmp_path: Path):
    chain = [{"door": {}}, {"cache": {"backend": "memory", "scope": "team"}}]
    async with SluiceServer(config(upstream, chain), tmp_path) as s, client(s) as c:
        await chat(c, extra_headers={"x-test-key": "k1", "x-test-team": "red"})
        await s.wait_idle()
        same_team, _ = await chat(c, extra_headers={"x-test-key": "k2", "x-test-team": "red"})
        other_team, _ = await chat(c, extra_headers={"x-test-key": "k3", "x-test-team": "blue"})
        assert (same_team["x-sluice-cache"], other_team["x-sluice-cache"]) == ("hit", "miss")
    chain = [{"door": {}}, {"cache": {"backend": "memory", "scope": "key", "namespace": "keyscope"}}]
    async with SluiceServer(config(upstream, chain), tmp_path / "k") as s, client(s) as c:
        await chat(c, extra_headers={"x-test-key": "k1", "x-test-team": "red"})
        await s.wait_idle()
        h, _ = await chat(c, extra_headers={"x-test-key": "k2", "x-test-team": "red"})
        assert h["x-sluice-cache"] == "miss"
    async with SluiceServer(config(upstream, scope="shared"), tmp_path / "s") as s, client(s, "sk-a") as a, client(s, "sk-b") as b:
        await chat(a)
        await s.wait_idle()
        h, _ = await chat(b)
        assert h["x-sluice-cache"] == "hit"


async def test_stream_stored_then_replayed_as_stream_and_as_plain(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        h, chunks, text = await stream(c)
        assert h["x-sluice-cache"] == "miss" and all(ch.usage is None for ch in chunks)
        await s.wait_idle()
        h2, chunks2, text2 = await stream(c)
        assert h2["x-sluice-cache"] == "hit"
        assert text2 == text
        # the caller did not ask for usage: the replay has none either
        assert all(ch.usage is None for ch in chunks2)
        assert chunks2[-1].choices[0].finish_reason == "stop"
        h3, plain = await chat(c)
        assert h3["x-sluice-cache"] == "hit"
        assert plain.choices[0].message.content == text
        # usage was obtained from the upstream (the cache asks for it) though the first caller did not want it
        assert plain.usage is not None and plain.usage.completion_tokens > 0
        h4, chunks4, _ = await stream(c, stream_options={"include_usage": True})
        assert h4["x-sluice-cache"] == "hit"
        assert chunks4[-1].choices == [] and chunks4[-1].usage.total_tokens == plain.usage.total_tokens
        assert all(ch.usage is None for ch in chunks4[:-1])
        assert chat_requests(upstream) == 1


async def test_plain_answer_replayed_as_stream(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        _, plain = await chat(c)
        await s.wait_idle()
        h, chunks, text = await stream(c)
        assert h["x-sluice-cache"] == "hit"
        assert text == plain.choices[0].message.content
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
        assert chat_requests(upstream) == 1


async def test_hit_passes_back_through_outer_plugins_and_stores_what_the_cache_saw(upstream: FakeUpstream, tmp_path: Path):
    chain = [{"door": {}}, {"cache": {"backend": "memory"}}]
    async with SluiceServer(config(upstream, chain), tmp_path) as s, client(s) as c:
        _, first = await chat(c)
        await s.wait_idle()
        h, hit = await chat(c)
        await s.wait_idle()
    assert h["x-sluice-cache"] == "hit"
    # the outer plugin changed both answers once: the stored copy is the one the cache saw
    assert first.choices[0].message.content.endswith(" [outer]")
    assert hit.choices[0].message.content == first.choices[0].message.content
    miss, served = Door.seen
    assert miss["tags"]["cache"] == "miss" and miss["upstream"] is not None
    assert served["tags"]["cache"] == "hit" and served["upstream"] is None and served["answered_by"] == "cache"


async def test_cache_control_and_ttl_header(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        h, _ = await chat(c, extra_headers={"cache-control": "no-store"})
        assert h["x-sluice-cache"] == "bypass"
        await s.wait_idle()
        h, _ = await chat(c, extra_headers={"x-sluice-cache-ttl": "0"})
        assert h["x-sluice-cache"] == "miss"
        await s.wait_idle()
        h, _ = await chat(c)
        assert h["x-sluice-cache"] == "miss"  # neither of the two above was stored
        await s.wait_idle()
        h, _ = await chat(c, extra_headers={"cache-control": "no-cache"})
        assert h["x-sluice-cache"] == "miss"  # looked past the entry, went upstream
        assert chat_requests(upstream) == 4
        assert "x-sluice-cache-ttl" not in {k.lower() for k in upstream.requests[1].headers}
        h, _ = await chat(c)
        assert h["x-sluice-cache"] == "hit"
        # a short per-request TTL: the entry is gone once it lapsed
        other = [{"role": "user", "content": "short lived"}]
        await chat(c, messages=other, extra_headers={"x-sluice-cache-ttl": "0.2"})
        await s.wait_idle()
        h, _ = await chat(c, messages=other)
        assert h["x-sluice-cache"] == "hit"
        await asyncio.sleep(0.3)  # the TTL itself is under test: let it lapse
        h, _ = await chat(c, messages=other)
        assert h["x-sluice-cache"] == "miss"


async def test_only_complete_successful_answers_are_stored(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        upstream.fail_next(500)
        with pytest.raises(openai.InternalServerError):
            await chat(c)
        await s.wait_idle()
        upstream.drop_after = 3
        with pytest.raises(openai.APIError):
            await stream(c)
        await s.wait_idle()
        upstream.drop_after = None
        h, _ = await chat(c)
        assert h["x-sluice-cache"] == "miss"
        await s.wait_idle()
        # an answer cut by max_tokens is complete for that request: stored
        _, cut = await chat(c, max_tokens=2)
        assert cut.choices[0].finish_reason == "length"
        await s.wait_idle()
        h, _ = await chat(c, max_tokens=2)
        assert h["x-sluice-cache"] == "hit"


async def test_embeddings_and_completions_are_cached(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        e1 = await c.embeddings.with_raw_response.create(model="sluice-demo", input=["a", "b"])
        await s.wait_idle()
        e2 = await c.embeddings.with_raw_response.create(model="sluice-demo", input=["a", "b"])
        assert e2.headers["x-sluice-cache"] == "hit"
        assert e2.parse().data[1].embedding == e1.parse().data[1].embedding
        raw = await c.completions.with_raw_response.create(model="sluice-demo", prompt="once upon", stream=True)
        text = "".join([ch.choices[0].text async for ch in raw.parse() if ch.choices])
        await s.wait_idle()
        hit = await c.completions.with_raw_response.create(model="sluice-demo", prompt="once upon")
        assert hit.headers["x-sluice-cache"] == "hit"
        assert hit.parse().choices[0].text == text


async def test_unlisted_endpoints_and_methods_are_left_alone(upstream: FakeUpstream, tmp_path: Path):
    async with SluiceServer(config(upstream, endpoints=["embeddings"]), tmp_path) as s, client(s) as c:
        h, _ = await chat(c)
        assert "x-sluice-cache" not in h
        models = await c.models.with_raw_response.list()
        assert "x-sluice-cache" not in models.headers


async def test_an_earlier_answer_is_left_alone(tmp_path: Path):
    rt = await make_runtime(tmp_path)
    try:
        plugin = await configure_plugin(Cache, {"backend": "memory"}, runtime=rt)
        ctx = make_context({"model": "m", "messages": MSG}, runtime=rt)
        ctx.reply(403, {"error": {"message": "no"}})
        await plugin.on_request(ctx)
        assert "cache" not in ctx.tags and ctx.reply_value.status == 403
    finally:
        await rt.close_all()


def test_config_validation_messages():
    with pytest.raises(ValidationError, match="ttl_seconds must not exceed max_ttl_seconds"):
        Cache.Config.model_validate({"ttl_seconds": 100, "max_ttl_seconds": 10})
    with pytest.raises(ValidationError, match="ignore_fields must not contain model"):
        Cache.Config.model_validate({"ignore_fields": ["messages"]})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Cache.Config.model_validate({"tll_seconds": 5})


@pytest.mark.redis
async def test_replicas_share_entries_through_redis(upstream: FakeUpstream, tmp_path: Path, redis_server: RedisServer):
    cfg = config(upstream, backend="redis")
    cfg["state"] = {"redis": {"url": redis_server.url, "key_prefix": f"replicas-{tmp_path.name}:"}}
    async with SluiceServer(cfg, tmp_path / "one") as one, SluiceServer(cfg, tmp_path / "two") as two:
        async with client(one) as c1, client(two) as c2:
            h1, r1 = await chat(c1)
            await one.wait_idle()
            h2, r2 = await chat(c2)
            _, chunks, text = await stream(c2)
        assert (h1["x-sluice-cache"], h2["x-sluice-cache"]) == ("miss", "hit")
        assert r2.choices[0].message.content == r1.choices[0].message.content == text
        assert chat_requests(upstream) == 1


@pytest.mark.redis
async def test_redis_down_with_on_error_closed_is_a_503(upstream: FakeUpstream, tmp_path: Path):
    with RedisServer() as rs:
        cfg = config(upstream, backend="redis", on_error="closed")
        cfg["state"] = {"redis": {"url": rs.url, "timeout_ms": 100, "breaker_failures": 2}}
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            await chat(c)
            rs.stop()
            with pytest.raises(openai.InternalServerError) as e:
                await chat(c, messages=[{"role": "user", "content": "another"}])
            assert e.value.status_code == 503 and "redis" not in e.value.message.lower()
        assert chat_requests(upstream) == 1


@pytest.mark.redis
async def test_redis_down_fails_open_to_the_upstream(upstream: FakeUpstream, tmp_path: Path):
    with RedisServer() as rs:
        cfg = config(upstream, backend="redis")
        cfg["state"] = {"redis": {"url": rs.url, "timeout_ms": 100, "breaker_failures": 2}}
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            await chat(c)
            await s.wait_idle()
            h, _ = await chat(c)
            assert h["x-sluice-cache"] == "hit"
            rs.stop()
            for _ in range(3):
                h, r = await chat(c)  # the cache is a transform: it fails open, the upstream answers
                assert r.choices[0].message.content and "x-sluice-cache" not in h
            await s.wait_idle()
        assert chat_requests(upstream) == 4


async def test_identical_concurrent_requests_are_coalesced(upstream: FakeUpstream, tmp_path: Path):
    upstream.first_byte_delay = 0.3
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        first = asyncio.ensure_future(chat(c))
        await upstream.wait_for(lambda: chat_requests(upstream) == 1)
        rest = await asyncio.gather(*(chat(c) for _ in range(4)))
        h0, r0 = await first
        assert h0["x-sluice-cache"] == "miss"
        assert [h["x-sluice-cache"] for h, _ in rest] == ["hit"] * 4
        assert all(r.choices[0].message.content == r0.choices[0].message.content for _, r in rest)
        assert chat_requests(upstream) == 1
        # streamed requests never wait for another one: their first token matters
        lead = asyncio.ensure_future(chat(c, messages=[{"role": "user", "content": "other"}]))
        await upstream.wait_for(lambda: chat_requests(upstream) == 2)
        h, _, _ = await stream(c, messages=[{"role": "user", "content": "other"}])
        assert h["x-sluice-cache"] == "miss"
        await lead
        assert chat_requests(upstream) == 3


async def test_coalesced_waiters_go_upstream_when_the_leader_fails(upstream: FakeUpstream, tmp_path: Path):
    upstream.first_byte_delay = 0.3
    upstream.fail_next(500)
    async with SluiceServer(config(upstream), tmp_path) as s, client(s) as c:
        first = asyncio.ensure_future(chat(c))
        await upstream.wait_for(lambda: chat_requests(upstream) == 1)
        h, r = await chat(c)
        assert h["x-sluice-cache"] == "miss" and r.choices[0].message.content
        with pytest.raises(openai.InternalServerError):
            await first
        assert chat_requests(upstream) == 2


async def test_a_hit_is_metered_with_no_upstream_cost(upstream: FakeUpstream, tmp_path: Path):
    import sqlite3

    cfg = config(upstream, [{"metering": {}}, {"cache": {"backend": "memory"}}])
    cfg["prices"] = {"sluice-demo": {"input": 2.0, "output": 8.0}}
    async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
        await chat(c)
        await s.wait_idle()
        h, _ = await chat(c)
        assert h["x-sluice-cache"] == "hit"
        await s.wait_idle()
        await s.runtime.state.records("ledger").flush()
    conn = sqlite3.connect(tmp_path / "ledger.db")
    try:
        rows = conn.execute("SELECT cache_hit, cost, attempts FROM ledger ORDER BY ts").fetchall()
    finally:
        conn.close()
    (miss_hit, miss_cost, miss_attempts), (hit, hit_cost, hit_attempts) = rows
    assert (miss_hit, hit) == (0, 1)
    assert miss_cost > 0 and hit_cost == 0 and hit_attempts == 0 and miss_attempts == 1


async def test_a_stream_with_keep_alive_comments_and_retry_blocks_is_cached(tmp_path: Path):
    """An event with no data (a keep-alive comment, a `retry:` block) was parsed as a chunk, failed as
    JSON and marked the stream broken: such streams were never stored. The retry block reaches the client."""
    import httpx
    from aiohttp import web

    from proxy.testing import serve_app

    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}]}
    calls = []

    async def answer(request: web.Request) -> web.StreamResponse:
        calls.append(await request.json())
        r = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await r.prepare(request)
        for block in (b": keep-alive\n\n", b"retry: 3000\n\n", b"data: " + orjson.dumps(chunk) + b"\n\n", b"data: [DONE]\n\n"):
            await r.write(block)
        return r

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serve_app(app) as origin:
        cfg = {"upstreams": {"u": {"url": origin + "/v1"}},
               "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"cache": {}}]}]}
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        async with SluiceServer(cfg, tmp_path) as s, httpx.AsyncClient() as http:
            first = await http.post(f"{s.url}/chat/completions", json=body)
            assert first.headers["x-sluice-cache"] == "miss" and b"retry: 3000\n\n" in first.content
            await s.wait_idle()
            again = await http.post(f"{s.url}/chat/completions", json=body)
            assert again.headers["x-sluice-cache"] == "hit", again.text
            assert b'"content":"hello"' in again.content.replace(b" ", b"")
    assert len(calls) == 1


async def test_a_stream_stored_without_its_usage_event_keeps_the_usage_details(tmp_path: Path):
    """The first client streamed without include_usage: Sluice asked for the usage and hid its event, and the
    entry was stored with three counts only. Every later hit then reported no cached or reasoning tokens,
    where the upstream reports them."""
    from aiohttp import web

    from proxy.testing import serve_app

    usage = {"prompt_tokens": 100, "completion_tokens": 30, "total_tokens": 130,
             "prompt_tokens_details": {"cached_tokens": 40}, "completion_tokens_details": {"reasoning_tokens": 10}}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
        r = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await r.prepare(request)
        for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": "Paris"}, None), ({}, "stop")):
            ev = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            await r.write(b"data: " + orjson.dumps(ev) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await r.write(b"data: " + orjson.dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        await r.write(b"data: [DONE]\n\n")
        return r

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_app(app) as origin:
        conf = {"upstreams": {"u": {"url": f"{origin}/v1"}},
                "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"cache": {"backend": "memory"}}]}]}
        async with SluiceServer(conf, tmp_path) as s, openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
            first = [c async for c in await client.chat.completions.create(model="m", messages=MSG, stream=True)]
            assert all(c.usage is None for c in first)
            await s.wait_idle()
            hit = await client.chat.completions.with_raw_response.create(model="m", messages=MSG)
            assert hit.headers["x-sluice-cache"] == "hit"
            u = hit.parse().usage
            assert (u.prompt_tokens_details.cached_tokens, u.completion_tokens_details.reasoning_tokens) == (40, 10)
