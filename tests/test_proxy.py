"""Transparent proxying: any endpoint, headers, bodies, errors, limits, usage on streams."""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from typing import Any, ClassVar

import httpx
import openai
import orjson
import pytest
from aiohttp import web

from proxy import Context, Event, Plugin, ProxyError, hookimpl
from proxy.testing import FakeUpstream, SluiceServer, held_answer, register_plugin, serve_app, wait_for


def route(up: FakeUpstream | str, chain: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    url = up if isinstance(up, str) else up.url
    return {
        "upstreams": {"u": {"url": url, **extra.pop("upstream", {})}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": chain or [], **extra}],
    }


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=20) as c:
        yield c


async def test_any_method_path_query_and_body_pass_through(upstream, http, tmp_path):
    async with SluiceServer(route(upstream), tmp_path) as s:
        body = b'{"purpose": "batch", "weird": "\\u00e9"}'
        r = await http.request(
            "DELETE", f"{s.url}/files/file-abc%2F1?limit=3&after=x%20y", content=body,
            headers={"content-type": "application/json", "openai-organization": "org-1", "connection": "keep-alive, x-hop", "x-hop": "drop-me",
                     "authorization": "Bearer sk-client-secret"},
        )
        assert r.status_code == 200
        echo = r.json()
        assert echo["method"] == "DELETE"
        assert echo["path"] == "/v1/files/file-abc/1"  # aiohttp decodes for display; raw bytes reached it
        assert upstream.requests[-1].query == "limit=3&after=x%20y"
        assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
        assert echo["headers"]["openai-organization"] == "org-1"
        assert "x-hop" not in echo["headers"]  # named in Connection: hop-by-hop
        assert echo["headers"]["x-request-id"] == r.headers["x-request-id"]
        assert r.headers["x-demo-echo"] == "1"
        # the demo upstream's echo never hands a credential back; the upstream got it
        assert echo["headers"]["authorization"] == "[redacted]" and "sk-client-secret" not in r.text
        assert upstream.requests[-1].headers["authorization"] == "Bearer sk-client-secret"


async def test_unchanged_body_goes_upstream_byte_for_byte(upstream, http, tmp_path):
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"hi"}], "zeta": 1, "alpha": [1, 2]}'
    async with SluiceServer(route(upstream), tmp_path) as s:
        r = await http.post(f"{s.url}/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 200
    assert upstream.requests[-1].body == raw


async def test_answer_bytes_and_vllm_fields_pass_through(upstream, http, tmp_path):
    answer = b'{"id":"chatcmpl-0123456789abcdef","object":"chat.completion","choices":[],"prompt_token_ids":[1,2],"kv_transfer_params":null,"usage":{"prompt_tokens":2,"completion_tokens":0,"total_tokens":2}}'
    async with SluiceServer(route(upstream), tmp_path) as s:
        upstream.fail_next(200, body=answer, headers={"x-upstream-header": "v", "openai-processing-ms": "12"})
        r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert r.content == answer
    assert r.headers["x-upstream-header"] == "v" and r.headers["openai-processing-ms"] == "12"


async def test_openai_sdk_surface(upstream, tmp_path):
    async with SluiceServer(route(upstream), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
            models = await client.models.list()
            assert [m.id for m in models.data] == ["sluice-demo"]
            assert (await client.models.retrieve("sluice-demo")).id == "sluice-demo"
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("no-such-model")
            emb = await client.embeddings.create(model="m", input=["a", "b"])  # the SDK asks for base64
            assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
            speech = await client.audio.speech.create(model="tts", voice="alloy", input="hello")
            audio = speech.read()
            assert audio.startswith(b"ID3")
            tr = await client.audio.transcriptions.create(model="whisper", file=("a.mp3", audio, "audio/mpeg"))
            assert tr.text == f"{len(audio)} bytes of audio for model whisper"


async def test_unknown_route_is_404_openai_shaped(upstream, http, tmp_path):
    async with SluiceServer(route(upstream), tmp_path) as s:
        r = await http.get(f"{s.origin}/v2/models")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "route_not_found"
    assert r.headers["x-request-id"].startswith("req_")


async def test_refused_requests_are_in_the_access_log(upstream, http, tmp_path, caplog):
    """A request the core refused (404, 413, ...) had an x-request-id found in no log line, access log on."""
    caplog.set_level("INFO", logger="sluice.access")
    async with SluiceServer({**route(upstream, max_body_bytes=2048), "server": {"access_log": True}}, tmp_path) as s:
        missing = await http.get(f"{s.origin}/nowhere/secret-path")
        big = await http.post(f"{s.url}/chat/completions", content=b"x" * 5000)
    for r, why in ((missing, "route_not_found"), (big, "request_too_large")):
        rid = r.headers["x-request-id"]
        assert f"request_id={rid} route=- status={r.status_code} outcome=refused answered_by=core:{why}" in caplog.text
    assert "secret-path" not in caplog.text


async def test_body_over_limit_is_413(upstream, http, tmp_path):
    async with SluiceServer(route(upstream, max_body_bytes=2048), tmp_path) as s:
        r = await http.post(f"{s.url}/chat/completions", content=b"x" * 5000)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # the operator's setting is named, so a client can tell who to ask (an upload past it works direct)
        assert r.json()["error"]["message"] == "The request body is larger than this server's limit of 2048 bytes (max_body_bytes)."

        async def chunks():
            for _ in range(10):
                yield b"y" * 500

        r = await http.post(f"{s.url}/chat/completions", content=chunks())  # chunked, no content-length
        assert r.status_code == 413
        assert r.headers["x-request-id"]
        r = await http.get(f"{s.origin}/v2/models")
        assert r.status_code == 404
        # answered before any plugin ran, so no plugin's metrics see them: the core counts them
        scrape = await http.get(f"{s.admin_url}/metrics", headers={"authorization": f"Bearer {s.admin_token}"})
        assert 'sluice_rejected_requests_total{reason="request_too_large"} 2.0' in scrape.text
        assert 'sluice_rejected_requests_total{reason="route_not_found"} 1.0' in scrape.text
    assert upstream.requests == []


class BodyReader(Plugin):
    name = "body_reader"
    kind = "guard"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if not ctx.answered:
            ctx.annotations["model"] = ctx.body.get("model")


async def test_unparsable_body_is_400_only_when_a_plugin_reads_it(upstream, http, tmp_path):
    with register_plugin(BodyReader):
        async with SluiceServer(route(upstream, [{"body_reader": {}}]), tmp_path) as s:
            r = await http.post(f"{s.url}/chat/completions", content=b"{not json")
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        async with SluiceServer(route(upstream), tmp_path) as s:
            r = await http.post(f"{s.url}/chat/completions", content=b"{not json")
            assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"  # the upstream's own


async def test_unreachable_upstream_is_502(http, tmp_path):
    async with SluiceServer(route("http://127.0.0.1:9/v1"), tmp_path) as s:
        r = await http.post(f"{s.url}/chat/completions", json={"model": "m"})
    assert r.status_code == 502
    assert r.json() == {"error": {"message": "The upstream could not be reached.", "type": "upstream_error", "param": None, "code": "upstream_unreachable"}}
    assert r.headers["x-request-id"]


async def test_retries_then_fallback_to_next_target(http, tmp_path):
    async with FakeUpstream() as a, FakeUpstream() as b:
        cfg = {
            "upstreams": {"a": {"url": a.url}, "b": {"url": b.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": ["a", "b"], "retries": {"attempts": 1, "backoff_s": 0.01}}],
        }
        async with SluiceServer(cfg, tmp_path) as s:
            a.fail_next(503, count=2)
            r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200
            assert len(a.requests) == 2 and len(b.requests) == 1
            # the last upstream error passes through when every attempt fails
            a.fail_next(503, count=2)
            b.fail_next(429, count=2, headers={"retry-after": "0"})
            r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 429


async def test_a_retry_that_cannot_wait_gives_way_to_the_next_target(http, tmp_path):
    """A retry whose wait passes ``retries.deadline_s`` (a long ``retry-after``, a long backoff) is skipped
    for the next target, which needs no wait: the route used to give up instead, with a healthy fallback."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    async with FakeUpstream() as a, FakeUpstream() as b:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
        cfg = {
            "upstreams": {"a": {"url": a.url}, "b": {"url": b.url}, "dead": {"url": f"http://127.0.0.1:{dead}/v1"}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": ["a", "b"], "retries": {"attempts": 2, "backoff_s": 0.05, "deadline_s": 3}}],
        }
        async with SluiceServer(cfg, tmp_path) as s:
            # a asks for 10 s before a retry, past the 3 s deadline: b answers instead, at once
            a.fail_next(503, headers={"retry-after": "10"})
            r = await http.post(f"{s.url}/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert len(a.requests) == 1 and len(b.requests) == 1
        # a backoff of up to 5 s after a refused connection, against a 2 s deadline: a answers, every time
        cfg["routes"][0].update(upstream=["dead", "a"], retries={"attempts": 1, "backoff_s": 5, "max_backoff_s": 5, "deadline_s": 2})
        async with SluiceServer(cfg, tmp_path) as s:
            rs = await asyncio.gather(*(http.post(f"{s.url}/chat/completions", json=body) for _ in range(6)))
            assert [r.status_code for r in rs] == [200] * 6, [r.text for r in rs]


async def test_an_upstreams_error_answer_passes_through_when_the_fallback_gives_none(http, tmp_path):
    """a answered 429 with its retry-after, then the fallback could not be reached: the client got Sluice's
    own 502 "could not be reached", without the upstream's answer or its headers."""
    import socket

    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    async with FakeUpstream() as a:
        cfg = {"upstreams": {"a": {"url": a.url}, "dead": {"url": f"http://127.0.0.1:{dead}/v1"}},
               "routes": [{"match": {"path": "/v1/"}, "upstream": ["a", "dead"], "retries": {"attempts": 0}}]}
        async with SluiceServer(cfg, tmp_path) as s:
            a.fail_next(429, body={"error": {"message": "slow down", "type": "requests", "param": None, "code": "rate_limit_exceeded"}},
                        headers={"retry-after": "7", "x-upstream-mark": "a"})
            r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 429, r.text
            assert r.json()["error"]["message"] == "slow down" and r.headers["retry-after"] == "7" and r.headers["x-upstream-mark"] == "a"
            assert r.headers["x-request-id"].startswith("req_")
            # and with no answer from anyone, Sluice's own
            cfg["routes"][0]["upstream"] = ["dead"]
        async with SluiceServer(cfg, tmp_path) as s:
            r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"


async def test_retry_after_ms_is_honoured(http, tmp_path):
    """OpenAI's retry-after-ms was never read: a 429 asking for 5 s was retried at once. Now its wait
    passes the route's deadline, so the upstream's own answer goes to the client instead of a retry."""
    from proxy.upstream import retry_after

    assert retry_after({"retry-after-ms": "1500", "retry-after": "2"}) == 1.5
    assert retry_after({"retry-after": "2"}) == 2.0
    assert retry_after({"retry-after-ms": "soon", "retry-after": "3"}) == 3.0
    assert retry_after({"retry-after-ms": "nan"}) is None and retry_after({"retry-after": "inf"}) is None
    assert retry_after({"retry-after-ms": "-5"}) == 0.0 and retry_after({}) is None
    async with FakeUpstream() as a:
        cfg = route(a, retries={"attempts": 1, "backoff_s": 0, "deadline_s": 2})
        async with SluiceServer(cfg, tmp_path) as s:
            a.fail_next(429, headers={"retry-after-ms": "5000"})
            r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 429 and r.headers["retry-after-ms"] == "5000"
            assert len(a.requests) == 1


async def test_a_client_leaving_during_a_retrys_wait_lets_the_kept_answer_go(tmp_path):
    """The error answer kept for passing through was released only when an attempt raised or one
    answered: a client that left during the backoff leaked it, and its upstream's outstanding count (which
    the router's max_concurrency and least-busy strategies read) stayed up for good."""
    async with FakeUpstream() as a:
        cfg = {"upstreams": {"a": {"url": a.url}},
               "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "retries": {"attempts": 1, "deadline_s": 30}}]}
        async with SluiceServer(cfg, tmp_path) as s, httpx.AsyncClient() as http:
            a.fail_next(429, headers={"retry-after": "5"})
            with pytest.raises(httpx.ReadTimeout):
                await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                                timeout=0.5)  # gone while Sluice waits out the retry-after
            up = s.runtime.upstreams.upstreams["a"]
            await wait_for(lambda: up.outstanding == 0, 10, "the kept answer to be let go")
            await s.wait_idle()
        assert len(a.requests) == 1


async def test_upstream_api_key_replaces_client_credentials(upstream, http, tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-upstream")
    cfg = route(upstream, upstream={"api_key": {"$env": "TEST_UPSTREAM_KEY"}})
    async with SluiceServer(cfg, tmp_path) as s:
        await http.get(f"{s.url}/models", headers={"authorization": "Bearer client-secret", "api-key": "client-secret"})
    seen = upstream.requests[-1].headers
    assert seen["Authorization"] == "Bearer sk-upstream"
    assert "api-key" not in {k.lower() for k in seen}


async def test_a_gzip_answer_cut_short_is_not_passed_off_as_whole(http, tmp_path):
    """aiohttp's gzip decoder took a gzip body cut short (with right framing) for a whole one: a 200 with
    half a JSON body, or a stream that just stopped, recorded "ok". The upstream is now asked for plain
    bytes (Sluice sends answers on decoded whatever the client accepts), whose framing shows a cut."""
    import gzip as gz

    seen: list[str | None] = []
    whole = orjson.dumps({"id": "c", "object": "chat.completion", "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "x" * 2000}, "finish_reason": "stop"}]})

    async def chat(request: web.Request) -> web.Response:
        ae = request.headers.get("accept-encoding")
        seen.append(ae)
        if ae and "gzip" in ae:  # as a compressing proxy that cuts its body short would answer
            cut = gz.compress(whole)[:60]
            return web.Response(body=cut, headers={"content-type": "application/json", "content-encoding": "gzip"})
        return web.Response(body=whole, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serve_app(app) as origin, SluiceServer(route(f"{origin}/v1"), tmp_path) as s:
        r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": []},
                            headers={"accept-encoding": "gzip, deflate, br"})
    assert seen == ["identity"]
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "x" * 2000


@pytest.mark.parametrize("sent", [{}, {"user-agent": "raw/1"}, {"content-type": "text/plain"}, {"user-agent": "raw/1", "content-type": "text/plain"}])
async def test_the_upstream_gets_no_user_agent_or_content_type_the_client_did_not_send(upstream, tmp_path, sent):
    async with SluiceServer(route(upstream), tmp_path) as s:
        for method, body in (("POST", b"some bytes"), ("GET", b"")):
            reader, writer = await asyncio.open_connection("127.0.0.1", s.server.port)  # no client library adds headers
            head = "".join(f"{k}: {v}\r\n" for k, v in sent.items())
            length = f"content-length: {len(body)}\r\n" if body else ""
            writer.write(f"{method} /v1/files HTTP/1.1\r\nhost: x\r\nconnection: close\r\n{length}{head}\r\n".encode() + body)
            status = await asyncio.wait_for(reader.readline(), 10)
            assert status.startswith(b"HTTP/1.1 200"), status
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
            seen = {k.lower(): v for k, v in upstream.requests[-1].headers.items()}
            assert seen.get("user-agent") == sent.get("user-agent")
            assert seen.get("content-type") == sent.get("content-type")


class UsageWanted(Plugin):
    name = "usage_wanted"
    needs_usage = True
    seen: ClassVar[list[Any]] = []

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        self.seen.append(ctx.usage)


class Chunky(Plugin):
    name = "chunky"

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> None:
        return None


class Unencodable(Plugin):
    """Hands back, for the stream's second event, one that cannot be written (a set is not JSON)."""

    name = "unencodable"

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> Any:
        ctx.stash["n"] = n = ctx.stash.get("n", 0) + 1
        return [Event.from_json({"bad": {1, 2}})] if n == 2 else None


class BadGenerator(Plugin):
    """A transform (fails open) whose on_chunk hands back a generator that fails as it is read."""

    name = "badgen"
    kind = "transform"

    @hookimpl
    def on_chunk(self, ctx: Context, event: Event) -> Any:
        def events() -> Any:
            raise RuntimeError("bug")
            yield event

        return events()


async def test_an_on_chunk_result_that_fails_as_it_is_read_is_the_plugins_failure(upstream, tmp_path, caplog):
    """The hook's result was read outside the failure policy: a generator that raised ended the stream with an
    internal_error, uncounted and without the plugin's name. It is now the plugin's failure: a transform fails
    open (the event goes on as it came), counted and named."""
    with register_plugin(BadGenerator):
        async with SluiceServer(route(upstream, [{"badgen": {}}]), tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
                stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}], stream=True)
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            async with httpx.AsyncClient() as http:
                metrics = (await http.get(f"{s.admin_url}/metrics")).text
    assert text.endswith("You said: a b")
    assert 'sluice_plugin_errors_total{phase="on_chunk",plugin="badgen"}' in metrics
    assert "plugin badgen failed in on_chunk (RuntimeError), failing open" in caplog.text


async def test_a_failure_of_ours_after_a_streams_headers_ends_it_with_an_error_event(upstream, tmp_path, caplog):
    """An exception after the 200 and its headers went out made the handler write a whole second HTTP
    response (a 500) into the stream's body: the SDK saw a broken connection (and retried the paid call).
    The stream now ends with an OpenAI-shaped error event, logged in one line."""
    with register_plugin(Unencodable):
        async with SluiceServer(route(upstream, [{"unencodable": {}}]), tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
                stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}], stream=True)
                got = []
                with pytest.raises(openai.APIError) as err:
                    async for c in stream:
                        got.append(c)
            await s.wait_idle()
    assert len(got) <= 1 and err.value.code == "internal_error"  # the events read with the bad one go with it
    assert "Sluice failed to process the request." in str(err.value.message)
    assert "Traceback" not in caplog.text and "internal error TypeError after a stream's headers" in caplog.text


@pytest.mark.parametrize("parse", [False, True], ids=["raw-relay", "parsed"])
@pytest.mark.parametrize("client_asks", [False, True], ids=["client-no-usage", "client-usage"])
async def test_usage_obtained_on_streams_without_changing_what_the_client_gets(upstream, tmp_path, parse, client_asks):
    UsageWanted.seen.clear()
    chain = [{"usage_wanted": {}}] + ([{"chunky": {}}] if parse else [])
    with register_plugin(UsageWanted), register_plugin(Chunky):
        async with SluiceServer(route(upstream, chain), tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
                kw: dict[str, Any] = {"stream_options": {"include_usage": True}} if client_asks else {}
                chunks = [c async for c in await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}], stream=True, **kw)]
            await s.wait_idle()
    assert upstream.requests[-1].json["stream_options"]["include_usage"] is True
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == (1 if client_asks else 0)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).endswith("You said: a b")
    u = UsageWanted.seen[0]
    assert u is not None and u.prompt_tokens == 5 and u.completion_tokens == 10 and not u.estimated
    if not client_asks:
        assert "stream_options" not in orjson.loads(b'{"x":1}')  # the client's body was not mutated in place


async def test_a_route_can_keep_stream_options_from_its_upstream(upstream, tmp_path):
    """``stream_usage: false`` for upstreams that refuse stream_options: the body goes as the client sent it."""
    UsageWanted.seen.clear()
    with register_plugin(UsageWanted):
        async with SluiceServer(route(upstream, [{"usage_wanted": {}}], stream_usage=False), tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
                chunks = [c async for c in await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "a b"}], stream=True)]
            await s.wait_idle()
    assert "stream_options" not in upstream.requests[-1].json
    assert chunks and UsageWanted.seen == [None]  # nothing reported it: an estimate is metering's to make


async def test_stream_usage_is_asked_on_a_route_at_the_root(upstream, tmp_path):
    """The endpoint a route sees is the path after its prefix (``v1/chat/completions`` under ``/``): the
    usage chunk is still asked for and hidden, so the usage is the upstream's, not an estimate
    (``streams_usage`` in test_wire covers other prefixes)."""
    UsageWanted.seen.clear()
    config = {"upstreams": {"u": {"url": upstream.origin}},
              "routes": [{"match": {"path": "/"}, "upstream": "u", "chain": [{"usage_wanted": {}}]}]}
    with register_plugin(UsageWanted):
        async with SluiceServer(config, tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.origin + "/v1", api_key="k", max_retries=0) as client:
                chunks = [c async for c in await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "a b"}], stream=True)]
            await s.wait_idle()
    assert upstream.requests[-1].json["stream_options"] == {"include_usage": True}
    assert [c for c in chunks if c.usage is not None] == []
    u = UsageWanted.seen[0]
    assert u is not None and u.completion_tokens == 10 and not u.estimated


@pytest.mark.parametrize("parse", [False, True], ids=["raw-relay", "parsed"])
@pytest.mark.parametrize("client_asks", [False, True], ids=["client-no-usage", "client-usage"])
async def test_openai_null_usage_members_are_hidden_only_when_we_asked(upstream, tmp_path, parse, client_asks):
    """OpenAI, asked for a stream's usage, puts ``"usage":null`` in every chunk before the usage chunk.
    When Sluice asked (the client did not), the client gets its chunks without it; when the client asked,
    as the upstream sent them."""
    upstream.null_usage = True
    UsageWanted.seen.clear()
    chain = [{"usage_wanted": {}}] + ([{"chunky": {}}] if parse else [])
    body: dict[str, Any] = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "a b"}]}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    with register_plugin(UsageWanted), register_plugin(Chunky):
        async with SluiceServer(route(upstream, chain), tmp_path) as s, httpx.AsyncClient(timeout=20) as c:
            raw = b""
            async with c.stream("POST", f"{s.url}/chat/completions", json=body) as r:
                async for piece in r.aiter_bytes():
                    raw += piece
            await s.wait_idle()
    events = [orjson.loads(b[6:]) for b in raw.split(b"\n\n") if b.startswith(b"data: {")]
    content = [e for e in events if e["choices"]]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in content).endswith("You said: a b")
    if client_asks:
        assert all("usage" in e and e["usage"] is None for e in content)
        assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 10
    else:
        assert b'"usage"' not in raw
    u = UsageWanted.seen[0]
    assert u is not None and u.completion_tokens == 10 and not u.estimated


class EndSeen(Plugin):
    name = "end_seen"
    kind = "observer"
    seen: ClassVar[list[Any]] = []

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        e, a = ctx.stream_end, ctx.answer
        self.seen.append((None if e is None else (e.model, e.id, e.finish_reasons, e.refusal),
                          None if a is None else (a.model, a.id, a.finish_reasons, a.refusal)))


@pytest.mark.parametrize("parse", [False, True], ids=["raw-relay", "parsed"])
async def test_a_streams_model_id_and_finish_reason_reach_on_done(upstream, tmp_path, parse):
    """A stream's model, id and finish reasons are in ctx.stream_end; ctx.answer gives them for streams
    and buffered answers alike."""
    EndSeen.seen.clear()
    upstream.events_per_write = 2  # the finishing event shares its write with others
    chain = [{"end_seen": {}}] + ([{"chunky": {}}] if parse else [])
    with register_plugin(EndSeen), register_plugin(Chunky):
        async with SluiceServer(route(upstream, chain), tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
                ids = []
                for max_tokens in (None, 3):
                    kw: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
                    chunks = [c async for c in await client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "a b"}], stream=True, **kw)]
                    ids.append(chunks[0].id)
                buffered = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "a b"}])
            await s.wait_idle()
    streamed = [("m", ids[0], ["stop"], False), ("m", ids[1], ["length"], False)]
    assert EndSeen.seen == [(e, e) for e in streamed] + [(None, ("m", buffered.id, ["stop"], False))]


async def test_split_and_merged_sse_events_are_relayed_intact(upstream, tmp_path):
    upstream.events_per_write = 3  # several events per network write, as vLLM does under load
    with register_plugin(Chunky):
        for chain in ([], [{"chunky": {}}]):
            async with SluiceServer(route(upstream, chain), tmp_path) as s:
                async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
                    text = ""
                    async for c in await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x y z"}], stream=True):
                        text += c.choices[0].delta.content or ""
            assert text == "Hello from the Sluice demo model. You said: x y z"


def _events(raw: bytes) -> list[Any]:
    """A stream's events with the per-request id and time taken out."""
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: {"):
            obj = orjson.loads(block[6:])
            obj.pop("id"), obj.pop("created")
            out.append(obj)
        elif block:
            out.append(block)
    return out


@pytest.mark.parametrize(
    ("piece", "delay"), [(None, None), (7, None), (61, None), (7, 0.0), (61, 0.0)],
    ids=["whole-events", "7-byte-pieces", "61-byte-pieces", "7-byte-pieces-at-once", "61-byte-pieces-at-once"],
)
@pytest.mark.parametrize("client_asks", [False, True], ids=["usage-hidden", "usage-asked"])
async def test_raw_stream_events_bypass_the_relay_coroutine_and_arrive_intact(upstream, tmp_path, piece, delay, client_asks):
    """Whole events go from the upstream reader straight to the client's socket; pieces that end mid-event take the coroutine's path.

    Either way the client gets the upstream's stream byte for byte, minus the usage chunk
    it did not ask for, and the usage is read. Pieces written at once reach the proxy as
    several HTTP chunks in one read: one that ends mid-event must hold back the whole
    events after it until the coroutine has written it.
    """
    from proxy import relay as relay_mod

    upstream.token_delay = 0.002
    upstream.piece_bytes = piece
    upstream.piece_delay = delay
    UsageWanted.seen.clear()
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "one two three four five six"}], "stream": True}
    if client_asks:
        body["stream_options"] = {"include_usage": True}
    with register_plugin(UsageWanted):
        async with SluiceServer(route(upstream, [{"usage_wanted": {}}]), tmp_path) as s, httpx.AsyncClient(timeout=20) as c:
            relays: list[Any] = []
            waiters: list[Any] = []
            via = b""
            async with c.stream("POST", f"{s.url}/chat/completions", json=body) as r:
                async for part in r.aiter_raw():
                    via += part
                    relays += [x for x in relay_mod._RELAYS.values() if x not in relays]
                    for x in relays:  # the future the parked coroutine waits on: a new one each time it is woken
                        w = x.reader._waiter if x.reader is not None else None
                        if w is not None and all(w is not y for y in waiters):
                            waiters.append(w)
            await s.wait_idle()
            direct = (await c.post(f"{upstream.url}/chat/completions", json={**body, "stream_options": {"include_usage": True}})).content
    want = _events(direct)
    (usage,) = [e["usage"] for e in want if isinstance(e, dict) and e.get("usage")]
    if not client_asks:
        want = [e for e in want if not (isinstance(e, dict) and e.get("usage") and not e["choices"])]
    assert _events(via) == want and via.endswith(b"data: [DONE]\n\n")
    u = UsageWanted.seen[0]
    assert u is not None and (u.prompt_tokens, u.completion_tokens) == (usage["prompt_tokens"], usage["completion_tokens"]) and not u.estimated
    assert len(relays) == 1 and not relay_mod._RELAYS  # attached for the stream, detached after
    n_events = len(want)
    if piece is None:
        assert relays[0].taken >= n_events - 3  # all but the first write (the headers) and what raced it
        assert len(waiters) <= 3  # and the coroutine slept through them
    else:
        assert relays[0].taken < n_events  # partial events went through the coroutine


class PerAttempt(Plugin):
    """Sets a header of each attempt's own; its second callable always fails."""

    name = "per-attempt"
    failed_open: ClassVar[list[Any]] = []

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        ctx.on_attempt = [self._number, self._broken]

    def _number(self, ctx: Context, attempt: Any, headers: Any) -> None:
        headers["x-attempt"] = f"{len(ctx.attempts) - 1} {attempt.target.upstream}"
        if attempt.target.upstream == "a":
            headers["x-only-for-a"] = "secret-for-a"  # a's own: never sent to b

    def _broken(self, ctx: Context, attempt: Any, headers: Any) -> None:
        raise RuntimeError("secret value sk-live-456")

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        self.failed_open.append(ctx.failed_open)


async def test_on_attempt_callables_set_each_attempts_headers_and_one_that_fails_is_skipped(http, tmp_path, caplog):
    async with FakeUpstream() as a, FakeUpstream() as b:
        cfg = {
            "upstreams": {"a": {"url": a.url}, "b": {"url": b.url, "api_key": "sk-upstream-b"}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": ["a", "b"], "retries": {"attempts": 1, "backoff_s": 0},
                        "chain": [{"per-attempt": {}}]}],
        }
        with register_plugin(PerAttempt):
            async with SluiceServer(cfg, tmp_path) as s:
                a.fail_next(503, count=2)
                r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
                assert r.status_code == 200
                await wait_for(lambda: PerAttempt.failed_open, timeout=10)
    assert [q.headers["x-attempt"] for q in (*a.requests, *b.requests)] == ["0 a", "1 a", "2 b"]
    assert [q.headers.get("x-only-for-a") for q in (*a.requests, *b.requests)] == ["secret-for-a", "secret-for-a", None]
    assert PerAttempt.failed_open == [["per-attempt.on_attempt"]]
    assert "on_attempt of per-attempt failed (RuntimeError)" in caplog.text and "sk-live" not in caplog.text


class Failing(Plugin):
    name = "failing"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        raise RuntimeError("secret value sk-live-123 leaked?")


async def test_failure_policy_closed_and_open(upstream, http, tmp_path, caplog):
    with register_plugin(Failing):
        async with SluiceServer(route(upstream, [{"failing": {"on_error": "closed"}}]), tmp_path) as s:
            r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 500 and r.json()["error"]["code"] == "plugin_error"
            assert "sk-live" not in r.text and "Traceback" not in r.text
        async with SluiceServer(route(upstream, [{"failing": {}}]), tmp_path) as s:  # observers default to open
            r = await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            assert r.status_code == 200
            metrics = (await http.get(f"{s.admin_url}/metrics")).text
            assert 'sluice_plugin_errors_total{phase="on_request",plugin="failing"} 1.0' in metrics
    assert "sk-live" not in caplog.text


class Blocker(Plugin):
    name = "blocker"
    kind = "guard"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if not ctx.answered:
            raise ProxyError(403, "Blocked by policy.", code="blocked", headers={"x-blocked": "1"})


async def test_proxy_error_is_an_answer_not_a_failure(upstream, http, tmp_path):
    with register_plugin(Blocker):
        async with SluiceServer(route(upstream, [{"blocker": {"on_error": "open"}}]), tmp_path) as s:
            r = await http.post(f"{s.url}/chat/completions", json={"model": "m"})
    assert r.status_code == 403 and r.headers["x-blocked"] == "1"
    assert r.json()["error"] == {"message": "Blocked by policy.", "type": "permission_error", "param": None, "code": "blocked"}


async def test_slow_client_backpressure_bounds_memory(upstream, tmp_path):
    """A client that stops reading stalls the upstream read instead of growing buffers."""
    upstream.reply_text = "word " * 150000
    async with SluiceServer(route(upstream), tmp_path) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.port)
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        # we read nothing more; the upstream's stream cannot complete while the socket buffers are full
        with pytest.raises(TimeoutError):
            await upstream.wait_for(lambda: upstream.stats.completed_streams > 0, timeout=1.5)
        writer.close()
        await upstream.wait_for(lambda: upstream.stats.aborted > 0, timeout=10)


async def test_several_routes_longest_prefix_first_with_their_own_upstreams_and_methods(http, tmp_path):
    async with FakeUpstream() as a, FakeUpstream() as b, FakeUpstream() as c:
        cfg = {
            "upstreams": {"a": {"url": a.url}, "b": {"url": b.url + "/embeddings"}, "c": {"url": c.url + "/extra"}},
            "routes": [
                {"match": {"path": "/v1/"}, "upstream": "a"},
                {"match": {"path": "/v1/embeddings"}, "upstream": "b"},
                {"match": {"path": "/tenant-x/", "headers": {"x-tenant": "x"}, "methods": ["get"]}, "upstream": "c"},
            ],
        }
        async with SluiceServer(cfg, tmp_path) as s:
            await http.post(f"{s.url}/embeddings", json={"model": "m", "input": "x"})
            await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            r = await http.get(f"{s.origin}/tenant-x/models", headers={"x-tenant": "x"})
            assert r.json()["path"] == "/v1/extra/models"  # what follows the prefix is appended to the url
            assert (await http.get(f"{s.origin}/tenant-x/models")).status_code == 404  # header must match
            assert (await http.post(f"{s.origin}/tenant-x/models", headers={"x-tenant": "x"})).status_code == 404
    assert [r.path for r in a.requests] == ["/v1/chat/completions"]
    assert [r.path for r in b.requests] == ["/v1/embeddings"]
    assert [r.path for r in c.requests] == ["/v1/extra/models"]


class SeeIp(Plugin):
    name = "see_ip"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        ctx.response_headers["x-seen-ip"] = ctx.client_ip or "-"


async def test_client_ip_through_trusted_proxies_only(upstream, http, tmp_path):
    with register_plugin(SeeIp):
        cfg = route(upstream, [{"see_ip": {}}])
        async with SluiceServer(cfg, tmp_path) as s:
            r = await http.get(f"{s.url}/models", headers={"x-forwarded-for": "203.0.113.9"})
            assert r.headers["x-seen-ip"] == "127.0.0.1"  # no trusted proxies: the header is ignored
        cfg["server"] = {"trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]}
        async with SluiceServer(cfg, tmp_path) as s:
            r = await http.get(f"{s.url}/models", headers={"x-forwarded-for": "198.51.100.7, 203.0.113.9, 10.1.2.3"})
            assert r.headers["x-seen-ip"] == "203.0.113.9"  # the nearest hop not ours; the rest may be forged


GATE: dict[str, asyncio.Event] = {}


class Recorder(Plugin):
    name = "recorder"
    done_required = True
    seen: ClassVar[list[str]] = []

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        await GATE["open"].wait()  # hold the only background worker so the queue fills up
        self.seen.append(ctx.request_id)


class Optional_(Plugin):
    name = "optional_observer"
    seen: ClassVar[list[str]] = []

    @hookimpl
    async def on_done(self, ctx: Context) -> None:
        await GATE["open"].wait()
        self.seen.append(ctx.request_id)


async def test_full_background_queue_drops_optional_work_but_never_required_work(upstream, http, tmp_path):
    Recorder.seen.clear()
    Optional_.seen.clear()
    with register_plugin(Recorder), register_plugin(Optional_):
        cfg = {
            "server": {"background_queue": 10, "background_workers": 1},
            "upstreams": {"u": {"url": upstream.url}, "chat": {"url": upstream.url + "/chat"}},
            "routes": [
                {"match": {"path": "/v1/chat/"}, "upstream": "chat", "chain": [{"recorder": {}}]},
                {"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"optional_observer": {}}]},
            ],
        }
        GATE["open"] = asyncio.Event()
        async with SluiceServer(cfg, tmp_path) as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            rs = await asyncio.gather(*[http.post(f"{s.url}/chat/completions", json=body) for _ in range(60)],
                                      *[http.post(f"{s.url}/completions", json={"model": "m", "prompt": "x"}) for _ in range(60)])
            assert all(r.status_code == 200 for r in rs)  # clients got their answers while on_done was stuck
            GATE["open"].set()
            await s.wait_idle()
            metrics = (await http.get(f"{s.admin_url}/metrics")).text
    assert len(Recorder.seen) == 60
    dropped = float(re.search(r"^sluice_background_dropped_total ([0-9.]+)$", metrics, re.M).group(1))
    assert dropped > 0 and len(Optional_.seen) + dropped == 60
    assert re.search(r"^sluice_background_overflow_total [1-9]", metrics, re.M)


async def test_stopping_past_the_drain_still_runs_every_overflowed_required_item(upstream, http, tmp_path):
    """Past the drain's grace, stopping flushes the on_done queue itself. A worker that empties a full queue
    wakes the overflowed items' puts and the flush's join together: the flush must not end before those
    items land and run (before the fix 9 of these 40 were lost)."""
    Recorder.seen.clear()
    with register_plugin(Recorder):
        cfg = {"server": {"background_queue": 10, "background_workers": 1},
               "upstreams": {"chat": {"url": upstream.url + "/chat"}},
               "routes": [{"match": {"path": "/v1/chat/"}, "upstream": "chat", "chain": [{"recorder": {}}]}]}
        GATE["open"] = asyncio.Event()
        async with SluiceServer(cfg, tmp_path) as s:
            body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
            rs = await asyncio.gather(*[http.post(f"{s.url}/chat/completions", json=body) for _ in range(40)])
            assert all(r.status_code == 200 for r in rs)
            metrics = (await http.get(f"{s.admin_url}/metrics")).text
            assert re.search(r"^sluice_background_overflow_total [1-9]", metrics, re.M)  # the queue overflowed
            GATE["open"].set()
            await s.server.close()  # what stopping does once the grace is over: no drain first
    assert len(Recorder.seen) == 40


class Timed(Plugin):
    name = "timed"
    wants_plugin_timings = True
    seen: ClassVar[list[dict[str, float]]] = []

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        self.seen.append(dict(ctx.timings.plugins))


class Untimed(Timed):
    name = "untimed"
    wants_plugin_timings = False


async def test_hook_timings_only_when_a_plugin_of_the_route_wants_them(upstream, http, tmp_path):
    Timed.seen.clear()
    with register_plugin(Timed), register_plugin(Untimed), register_plugin(Chunky):
        for chain in ([{"chunky": {}}, {"timed": {}}], [{"chunky": {}}, {"untimed": {}}]):
            async with SluiceServer(route(upstream, chain), tmp_path) as s:
                await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True})
                await s.wait_idle()
    timed, untimed = Timed.seen
    assert set(timed) == {"chunky.on_chunk"} and timed["chunky.on_chunk"] > 0  # its own on_done is timed after it ran
    assert untimed == {}


SPIN_S = 0.1


def spin(seconds: float) -> None:
    """CPU work for ``seconds`` (a hook that costs something), not a wait for anything."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class Busy(Plugin):
    name = "busy"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        spin(SPIN_S)

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        spin(SPIN_S)


class Quick(Plugin):
    name = "quick"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        return None

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        return None


async def test_each_hook_is_timed_apart_from_its_neighbours(upstream, http, tmp_path):
    """One clock reading ends a hook's time and starts the next one's: a costly hook's time is its own,
    not its neighbour's, in both phases."""
    Timed.seen.clear()
    with register_plugin(Timed), register_plugin(Busy), register_plugin(Quick):
        async with SluiceServer(route(upstream, [{"busy": {}}, {"quick": {}}, {"timed": {}}]), tmp_path) as s:
            await http.post(f"{s.url}/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
            await s.wait_idle()
    (seen,) = Timed.seen
    assert set(seen) == {"busy.on_request", "quick.on_request", "busy.on_done", "quick.on_done"}
    assert seen["busy.on_request"] >= SPIN_S and seen["busy.on_done"] >= SPIN_S
    assert 0 < seen["quick.on_request"] < SPIN_S and 0 < seen["quick.on_done"] < SPIN_S


async def test_expect_100_continue_is_answered_before_the_body(upstream, tmp_path):
    """curl sends ``Expect: 100-continue`` for larger uploads; the interim answer comes before the body."""
    async with SluiceServer(route(upstream), tmp_path) as s:
        body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 2000}]})
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(body)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        assert upstream.requests[-1].body == body
        # answered here: not sent on (aiohttp would wait for the upstream's own 100 before the body)
        assert "expect" not in upstream.requests[-1].headers

        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\nContent-Length: 2\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 417") and b"x-request-id: req_" in head.lower()
        writer.close()
    assert len(upstream.requests) == 1


async def test_a_last_done_without_its_blank_line_ends_the_stream_on_both_relays(tmp_path):
    """An upstream that ends its stream with "data: [DONE]\\n" and no blank line: the raw relay passed it on,
    the parsed one (a route with an on_chunk hook) dropped it, so the client never saw the stream's end."""
    ev = (b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,'
          b'"delta":{"content":"a"},"finish_reason":"stop"}]}\n\n')

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        r = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await r.prepare(request)
        await r.write(ev + b"data: [DONE]\n")
        return r

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    async with serve_app(app) as origin:
        with register_plugin(Chunky):
            for name, chain in (("raw", []), ("parsed", [{"chunky": {}}])):
                async with SluiceServer(route(f"{origin}/v1", chain), tmp_path / name) as s:
                    async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0) as c:
                        async with c.chat.completions.with_streaming_response.create(
                                model="m", messages=[{"role": "user", "content": "x"}], stream=True) as r:
                            body = b"".join([part async for part in r.http_response.aiter_bytes()])
                    assert body.rstrip(b"\n").endswith(b"data: [DONE]"), (name, body)


class AfterAnswer(Plugin):
    """A plain on_done that waits until a client in another thread has its whole answer."""

    name = "after_answer"
    got: ClassVar[dict[str, Any]] = {}
    seen: ClassVar[list[tuple[str, bool]]] = []

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        # blocks the loop: only possible because the answer is already on the wire
        self.seen.append((ctx.path, self.got[ctx.path].wait(timeout=10)))


async def test_plain_on_done_runs_after_the_answer_is_sent(upstream, tmp_path):
    import threading

    AfterAnswer.seen.clear()
    AfterAnswer.got.clear()
    with register_plugin(AfterAnswer):
        async with SluiceServer(route(upstream, [{"after_answer": {}}]), tmp_path) as s:

            def client(stream: bool) -> None:
                path = "/v1/chat/completions" if stream else "/v1/completions"
                with openai.OpenAI(base_url=s.url, api_key="k", max_retries=0, timeout=20) as c:
                    if stream:
                        chunks = list(c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True))
                        assert chunks
                    else:
                        assert c.completions.create(model="m", prompt="hi").choices
                AfterAnswer.got[path].set()

            for stream in (False, True):
                AfterAnswer.got["/v1/chat/completions" if stream else "/v1/completions"] = threading.Event()
                # the hook ran before the loop could see the client thread finish
                await asyncio.wait_for(asyncio.to_thread(client, stream), 30)
    assert AfterAnswer.seen == [("/v1/completions", True), ("/v1/chat/completions", True)]


class Finished(Plugin):
    """What each request's on_done saw: its outcome and usage."""

    name = "finished"
    needs_usage = True
    seen: ClassVar[list[tuple[str | None, Any]]] = []

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        self.seen.append((ctx.outcome, ctx.usage))


CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def _sse(*events: dict[str, Any], done: bool) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events) + (b"data: [DONE]\n\n" if done else b"")


async def _leave_after(url: str, tmp_path: Any, chunks: int | None) -> tuple[str, tuple[str | None, Any]]:
    """The text a client read (all of it, or ``chunks`` chunks) before it left, and the request's outcome and usage."""
    Finished.seen.clear()
    with register_plugin(Finished):
        async with SluiceServer(route(url, [{"finished": {}}]), tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as client:
                stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
                got = []
                async for c in stream:
                    got.append(c)
                    if chunks is not None and len(got) == chunks:
                        break
                await stream.close()  # what the SDK does on [DONE]; said here so the test does not rest on its version
            await wait_for(lambda: len(Finished.seen) == 1, 10, "the request's on_done")
    return "".join(c.choices[0].delta.content or "" for c in got if c.choices), Finished.seen[0]


async def test_a_client_that_leaves_after_done_had_its_whole_stream(tmp_path):
    """The openai SDK closes its response as soon as it reads ``data: [DONE]``, before an upstream's last
    empty chunk (OpenAI's comes a few ms later): the request is "ok", not "client_gone", and its usage is
    the upstream's. The upstream here holds its last chunk until the client has left."""
    body = _sse(
        {**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None}], "usage": None},
        {**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": None},
        {**CHUNK, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
        done=True,
    )
    async with held_answer(body, "text/event-stream") as (url, _):
        text, (outcome, usage) = await _leave_after(url, tmp_path, None)
    assert text == "hi"
    assert outcome == "ok"
    assert (usage.prompt_tokens, usage.completion_tokens, usage.estimated) == (3, 1, False)


async def test_done_in_a_models_text_is_not_the_end_of_its_stream(tmp_path):
    """Only the terminal ``data: [DONE]`` event ends a stream: a client that leaves after a chunk whose
    text says "[DONE]" (an agent's prompt often asks for it) left early."""
    body = _sse({**CHUNK, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "when finished, print [DONE]"},
                                       "finish_reason": None}]}, done=False)
    async with held_answer(body, "text/event-stream") as (url, _):
        text, (outcome, _) = await _leave_after(url, tmp_path, 1)
    assert text == "when finished, print [DONE]"
    assert outcome == "client_gone"


async def test_a_head_answer_keeps_the_upstreams_content_length(upstream, http, tmp_path):
    """RFC 9110 9.3.2: a HEAD answer carries the GET's header fields, its length among them, with no body."""
    async with SluiceServer(route(upstream), tmp_path) as s:
        direct = await http.head(f"{upstream.url}/models")
        head = await http.head(f"{s.url}/models")
        get = await http.get(f"{s.url}/models")
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == direct.headers["content-length"] == get.headers["content-length"]
    assert head.headers["x-request-id"].startswith("req_")


async def test_a_head_answer_gives_no_compressed_length(tmp_path):
    """Sluice reads an upstream's compressed answer decoded and sends it on decoded: the length of the
    compressed representation, which a HEAD answer from that upstream gives, is not the client's."""
    import gzip

    models = orjson.dumps({"object": "list", "data": [{"id": f"m{i}", "object": "model"} for i in range(50)]})

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=gzip.compress(models), headers={"content-type": "application/json", "content-encoding": "gzip"})

    app = web.Application()
    app.router.add_get("/v1/models", answer)  # aiohttp answers HEAD with GET's headers and no body
    async with serve_app(app) as origin, SluiceServer(route(f"{origin}/v1"), tmp_path) as s, httpx.AsyncClient() as http:
        head = await http.head(f"{s.url}/models")
        get = await http.get(f"{s.url}/models")
    assert head.status_code == 200 and "content-length" not in head.headers
    assert get.content == models and get.headers["content-length"] == str(len(models))
