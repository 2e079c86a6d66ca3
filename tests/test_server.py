"""Reload, drain, workers, health and the admin listener, against real servers and processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
import yaml

from proxy import Context, Plugin, PluginConfig, hookimpl
from proxy.testing import FakeUpstream, SluiceProcess, SluiceServer, register_plugin, wait_for


class HeaderTag(Plugin):
    name = "htag"

    class Config(PluginConfig):
        value: str = "a"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        ctx.response_headers["x-tag"] = self.config.value


def cfg(up: FakeUpstream, value: str) -> dict[str, Any]:
    return {"upstreams": {"u": {"url": up.url}}, "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"htag": {"value": value}}]}]}


@pytest.fixture(autouse=True)
def plugins():
    with register_plugin(HeaderTag):
        yield


async def test_reload_swaps_atomically_and_in_flight_streams_finish_on_old_chain(upstream, tmp_path):
    upstream.token_delay = 0.05
    async with SluiceServer(cfg(upstream, "old"), tmp_path) as s, httpx.AsyncClient(timeout=30) as http:
        body = {"model": "m", "messages": [{"role": "user", "content": "a b c d e f"}], "stream": True}
        async with http.stream("POST", f"{s.url}/chat/completions", json=body) as r:
            assert r.headers["x-tag"] == "old"
            it = r.aiter_lines()
            await it.__anext__()
            old_gen = s.server.generation
            ok, msg = await s.reload(cfg(upstream, "new"))
            assert ok, msg
            r2 = await http.get(f"{s.url}/models")
            assert r2.headers["x-tag"] == "new"
            rest = [line async for line in it]
            assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
        assert old_gen.inflight == 0
        # a bad config leaves the current one serving, and says why
        ok, msg = await s.reload({"upstreams": {"u": {"url": upstream.url}}, "routes": [{"upstream": "u", "chain": [{"htag": {"valeu": 1}}]}]})
        assert not ok and "routes[0].chain[0].htag.valeu: unknown field (plugin htag)" in msg
        r3 = await http.get(f"{s.url}/models")
        assert r3.headers["x-tag"] == "new"


async def test_a_reload_frees_the_retired_chain(upstream, tmp_path, caplog):
    """The heap is frozen out of the collector's sight; a retired chain was frozen with it, and its
    plugins' reference cycles were kept for good, one chain more per reload (the admin budgets list
    grew by one metering instance a reload). Once retired, the old chain is freed."""
    caplog.set_level("INFO", logger="sluice")
    config = {"upstreams": {"u": {"url": upstream.url}},
              "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"metering": {}}, {"htag": {"value": "a"}}]}]}
    async with SluiceServer(config, tmp_path) as s:
        retired = []
        for _ in range(3):
            retired.append(weakref.ref(s.server.generation.plugins[0]))
            ok, msg = await s.reload(config)
            assert ok, msg
        await wait_for(lambda: all(r() is None for r in retired), 20, "the retired chains' plugins to be freed")
        live = s.server.runtime.shared("metering.instances", weakref.WeakSet)
        assert list(live) == [s.server.generation.plugins[0]]
    assert "heap collected after a reload" in caplog.text


async def test_closing_while_a_reload_drains_stops_the_retired_config_too(tmp_path):
    """A server closed while a retired config still drained (a stream in flight) cancelled the retirement, so the
    old config's plugins never stopped and its upstream connections were never closed (aiohttp then warned
    "Unclosed client session" from the collector, in whatever test ran at the time)."""
    async with FakeUpstream() as up:
        up.token_delay = 0.5
        async with openai.AsyncOpenAI(api_key="sk-test", base_url="http://127.0.0.1:1/v1", max_retries=0) as c:
            async with SluiceServer(cfg(up, "one"), tmp_path) as s:
                old = s.server.generation
                stream = await c.with_options(base_url=s.url).chat.completions.create(
                    model="sluice-demo", stream=True, messages=[{"role": "user", "content": "a long answer " * 20}])
                await stream.__anext__()
                ok, msg = await s.reload(cfg(up, "two"))
                assert ok, msg
                sessions = [u.session for u in old.pool.upstreams.values()]
                assert sessions and not any(x.closed for x in sessions)
            # closed while the old config still drains: the stream is in flight
            await stream.close()
        assert all(x.closed for x in sessions)
        assert old._stops == len(old.plugins)


async def test_a_retired_config_waits_for_the_longest_request_it_may_have(tmp_path):
    """A reload stopped the old config drain_seconds + 60 s after it, whatever its requests: its upstream
    sessions closed under a long stream, which then hung until its idle timeout and ended as "stalled". The
    retirement now waits for as long as a request of that config may last (then a minute for on_done)."""
    async with FakeUpstream() as up:
        config = {
            "server": {"drain_seconds": 5, "body_timeout_s": 30},
            "upstreams": {"a": {"url": up.url, "timeouts": {"total": 900}}, "b": {"url": up.url, "timeouts": {"total": 300}}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "retries": {"deadline_s": 120}},
                       {"match": {"path": "/b/"}, "upstream": "b"}],
        }
        async with SluiceServer(config, tmp_path) as s:
            assert s.server.generation.longest_request_s() == 30 + 120 + 900


async def test_admin_reload_needs_token(upstream, tmp_path):
    async with SluiceServer(cfg(upstream, "one"), tmp_path) as s, httpx.AsyncClient() as http:
        r = await http.post(f"{s.admin_url}/admin/reload")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_admin_token"
        r = await http.post(f"{s.admin_url}/admin/reload", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await http.get(f"{s.admin_url}/admin/config", headers={"authorization": "Bearer admin-token"})
        assert r.status_code == 200 and r.json()["routes"][0]["chain"] == ["htag"]
        # the client port does not serve the admin API
        r = await http.get(f"{s.origin}/admin/config", headers={"authorization": "Bearer admin-token"})
        assert r.status_code == 404


async def test_the_admin_config_masks_credentials_in_upstream_urls(upstream, tmp_path):
    port = upstream.url.split(":")[2].split("/")[0]
    conf = {"upstreams": {"u": {"url": f"http://bob:URL-SECRET@127.0.0.1:{port}/v1?key=QUERY-SECRET"}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "u"}]}
    async with SluiceServer(conf, tmp_path) as s, httpx.AsyncClient() as http:
        r = await http.get(f"{s.admin_url}/admin/config", headers={"authorization": "Bearer admin-token"})
        assert r.json()["upstreams"]["u"]["url"] == f"http://bob:***@127.0.0.1:{port}/v1?key=***"
        assert "SECRET" not in r.text


@pytest.mark.parametrize("how", ["env", "file"])
async def test_an_empty_admin_token_opens_nothing(tmp_path, monkeypatch, how):
    """An empty token (an empty variable behind {$env: ...}) counted as a token, and "Bearer " + a no-break
    space stripped to "" matched it: anyone reaching the admin port could create keys and reload. An empty
    token is none (the admin API refused), and only HTTP's own spaces are stripped from a bearer."""
    if how == "env":
        monkeypatch.setenv("SLUICE_ADMIN_TOKEN", "")
        admin = {"token": {"$env": "SLUICE_ADMIN_TOKEN", "default": None}, "metrics_token": ""}
    else:
        admin = {"token": "", "metrics_token": " "}
    async with SluiceServer({"admin": admin}, tmp_path) as s, aiohttp.ClientSession() as http:
        for blank in ("Bearer \u00a0", "Bearer \u3000", "Bearer "):
            async with http.get(f"{s.admin_url}/admin/config", headers={"authorization": blank}) as r:
                assert (r.status, (await r.json())["error"]["code"]) == (403, "admin_disabled"), blank
            async with http.post(f"{s.admin_url}/admin/keys", json={"name": "mine"}, headers={"authorization": blank}) as r:
                assert r.status == 403
        # an empty metrics token is none: /metrics is open, with a bearer or without
        async with http.get(f"{s.admin_url}/metrics") as r:
            assert r.status == 200


async def test_a_bearer_that_is_not_utf8_is_refused_not_a_server_error(tmp_path, caplog):
    async with SluiceServer({}, tmp_path) as s:
        reader, writer = await asyncio.open_connection("127.0.0.1", s.server.admin_port)
        writer.write(b"GET /admin/config HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer \xa0\xff\r\n\r\n")
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert data.startswith(b"HTTP/1.1 401 ") and b"invalid_admin_token" in data
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize("trouble", ["port in use", "state.dir a file"])
def test_a_server_that_cannot_start_says_why_in_one_line(tmp_path, trouble):
    """A port in use, or a state.dir that is a file, ended in a 20-line Python traceback."""
    import socket
    import subprocess
    import sys

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = {"server": {"host": "127.0.0.1", "port": 0}, "admin": {"port": 0}, "state": {"dir": str(tmp_path / "state")}}
        if trouble == "port in use":
            config["server"]["port"] = busy.getsockname()[1]
        else:
            (tmp_path / "afile").write_text("x")
            config["state"]["dir"] = str(tmp_path / "afile")
        path = tmp_path / "sluice.yaml"
        path.write_text(yaml.safe_dump(config))
        r = subprocess.run([sys.executable, "-m", "proxy.cli", "serve", "-c", str(path)], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "SLUICE_ADMIN_TOKEN": "t"})
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("sluice: "), r.stderr


def test_a_command_on_a_store_that_is_not_a_database_says_so_in_one_line(tmp_path):
    import subprocess
    import sys

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "keys.db").write_bytes(b"this is not a database, only some bytes" * 100)
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump({"state": {"dir": str(tmp_path / "state")},
                                    "routes": [{"match": {"path": "/v1/"}, "chain": [{"auth": {}}]}]}))
    r = subprocess.run([sys.executable, "-m", "proxy.cli", "keys", "list", "-c", str(path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == "sluice keys: file is not a database", r.stderr


async def test_a_sluice_process_that_does_not_start_in_time_leaves_nothing_running(tmp_path):
    """The test kit's SluiceProcess left its child running, and its log file open, when start() timed out."""
    p = SluiceProcess({}, tmp_path, timeout=0.05)
    with pytest.raises(TimeoutError):
        async with p:
            pass
    assert p.proc is not None and p.proc.poll() is not None and p._log.closed


async def test_health_and_readiness(tmp_path):
    async with FakeUpstream() as up:
        async with SluiceServer(cfg(up, "x"), tmp_path) as s, httpx.AsyncClient() as http:
            assert (await http.get(f"{s.origin}/healthz")).json() == {"status": "ok"}
            r = await http.get(f"{s.origin}/readyz")
            assert r.status_code == 200 and r.json()["upstreams"] == {"u": "ok"}
            await up.stop()
            r = await http.get(f"{s.origin}/readyz")
            assert r.status_code == 503 and r.json()["upstreams"] == {"u": "unreachable"}
            assert r.json()["routes_without_upstream"] == ["/v1/"]


async def test_one_of_a_routes_fallback_upstreams_down_keeps_it_ready(tmp_path):
    """/readyz turned 503 as soon as any upstream was unreachable: with a route over two model servers and one
    rolled, every replica left the Service while the other server answered its requests."""
    async with FakeUpstream() as a, FakeUpstream() as b, FakeUpstream() as other:
        conf = {"upstreams": {"a": {"url": a.url}, "b": {"url": b.url}, "other": {"url": other.url}},
                "routes": [{"name": "fleet", "match": {"path": "/v1/"}, "upstream": ["a", "b"]},
                           {"name": "solo", "match": {"path": "/solo/"}, "upstream": "other"}]}
        async with SluiceServer(conf, tmp_path) as s, httpx.AsyncClient() as http:
            await a.stop()
            r = await http.get(f"{s.origin}/readyz")
            assert r.status_code == 200 and r.json()["upstreams"] == {"a": "unreachable", "b": "ok", "other": "ok"}
            chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            assert (await http.post(f"{s.url}/chat/completions", json=chat)).status_code == 200
            await other.stop()  # the only upstream of a route: that route cannot serve
            r = await http.get(f"{s.origin}/readyz")
            assert r.status_code == 503 and r.json()["routes_without_upstream"] == ["solo"]


def write_cfg(tmp_path, data: dict[str, Any]):
    p = tmp_path / "sluice.yaml"
    data = {**data, "server": {"port": 0, "drain_seconds": 20, **data.get("server", {})}, "admin": {"port": 0, "token": "t"}, "state": {"dir": str(tmp_path / "state")}}
    p.write_text(yaml.safe_dump(data))
    return p


@pytest.mark.slow
async def test_a_drain_closes_kept_alive_connections_and_lets_their_requests_finish(tmp_path):
    """A drain stopped the listener but left clients' kept-alive connections open: a pooled client went on
    sending new requests on them through the grace, and those were cut at its end. Now an idle connection
    closes at once (the client must connect anew, elsewhere), and a busy one once its answer is out."""
    from proxy.testing import held_answer

    first = b'data: {"id":"c1","object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
    async with held_answer(first, "text/event-stream") as (url, release):
        config = {"server": {"drain_seconds": 20}, "upstreams": {"u": {"url": url}},
                  "routes": [{"match": {"path": "/v1/"}, "upstream": "u"}]}
        async with SluiceServer(config, tmp_path) as s:
            one = httpx.Limits(max_keepalive_connections=1, max_connections=1)
            async with httpx.AsyncClient(timeout=20, limits=one) as a, httpx.AsyncClient(timeout=20, limits=one) as b:
                assert (await b.get(f"{s.origin}/healthz")).status_code == 200  # b keeps an idle connection
                got: list[bytes] = []

                async def stream() -> None:
                    async with a.stream("POST", f"{s.url}/chat/completions", json={"model": "m", "messages": [], "stream": True}) as r:
                        async for chunk in r.aiter_bytes():
                            got.append(chunk)

                streaming = asyncio.ensure_future(stream())
                await wait_for(lambda: got, 10, "the stream's first event")
                drain = asyncio.ensure_future(s.server.drain())
                web_server = s.server.runner.server  # the listener's connections: a's busy one and b's idle one
                await wait_for(lambda: len(web_server.connections) == 1, 5, "the idle connection to close")
                with pytest.raises(httpx.ConnectError):  # its kept connection closed, and nothing listens any more
                    await b.get(f"{s.origin}/healthz")
                release.set()
                await streaming  # the request in flight finished on its connection
                await drain
            assert b"".join(got).startswith(first)


async def test_sigterm_drains_in_flight_streams_and_exits_zero(upstream, tmp_path):
    upstream.token_delay = 0.05
    path = write_cfg(tmp_path, {"upstreams": {"u": {"url": upstream.url}}, "routes": [{"match": {"path": "/v1/"}, "upstream": "u"}]})
    async with SluiceProcess(path, tmp_path) as p:
        async with openai.AsyncOpenAI(base_url=p.url, api_key="k", max_retries=0) as client:
            stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "w " * 30}], stream=True)
            first = await stream.__anext__()
            assert first.choices[0].delta.role == "assistant"
            p.signal(signal.SIGTERM)
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            assert text.endswith("w w")
        assert await p.wait(30) == 0


@pytest.mark.slow
async def test_sighup_reloads_process(upstream, tmp_path):
    path = write_cfg(tmp_path, {"upstreams": {"u": {"url": upstream.url}}, "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "max_body_bytes": 2048}]})
    async with SluiceProcess(path, tmp_path) as p, httpx.AsyncClient() as http:
        assert (await http.post(f"{p.url}/embeddings", content=b"x" * 4096)).status_code == 413
        path.write_text(path.read_text().replace("max_body_bytes: 2048", "max_body_bytes: 8192"))
        p.signal(signal.SIGHUP)
        async with asyncio.timeout(15):
            while (await http.post(f"{p.url}/embeddings", content=b"x" * 4096)).status_code == 413:
                await asyncio.sleep(0.05)  # polling the observable effect of a signal in another process


@pytest.mark.slow
async def test_a_reload_applies_logging_and_refuses_what_only_a_restart_changes(upstream, tmp_path):
    # a reload answered "reloaded" while the old ports kept serving and the log kept its format
    path = write_cfg(tmp_path, {"upstreams": {"u": {"url": upstream.url}}, "routes": [{"match": {"path": "/v1/"}, "upstream": "u"}]})
    good = yaml.safe_load(path.read_text())
    async with SluiceProcess(path, tmp_path) as p, httpx.AsyncClient() as http:
        auth = {"authorization": "Bearer t"}
        path.write_text(yaml.safe_dump({**good, "server": {**good["server"], "port": 1}, "admin": {**good["admin"], "port": 2}}))
        r = await http.post(f"{p.admin_url}/admin/reload", headers=auth)
        assert r.status_code == 400
        assert "server.port, admin.port: set when the server starts; changing it needs a restart" in r.json()["error"]["message"]
        path.write_text(yaml.safe_dump({**good, "logging": {"level": "info", "format": "json"}}))
        r = await http.post(f"{p.admin_url}/admin/reload", headers=auth)
        assert r.status_code == 200, r.text
        await wait_for(lambda: "config reloaded" in p.logs(), 10, "the reload's log line")
        line = next(x for x in p.logs().splitlines() if "config reloaded" in x)
        assert json.loads(line)["level"] == "info"
        assert (await http.get(f"{p.url}/models")).status_code == 200  # the same port serves


@pytest.mark.slow
async def test_workers_share_one_port_and_drain(upstream, tmp_path):
    path = write_cfg(tmp_path, {"server": {"workers": 2}, "upstreams": {"u": {"url": upstream.url}}, "routes": [{"match": {"path": "/v1/"}, "upstream": "u"}]})
    async with SluiceProcess(path, tmp_path) as p:
        assert p.info["workers"] == 2
        async with openai.AsyncOpenAI(base_url=p.url, api_key="k", max_retries=0) as client:
            results = await asyncio.gather(*[client.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}]) for i in range(40)])
        assert len(results) == 40
        ids = {s.headers.get("x-request-id") for s in upstream.requests}
        assert len(ids) == 40
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{p.admin_url}/healthz")).status_code == 200
            # a file a plugin's check refuses is a 400 before any worker is told to reload
            good = path.read_text()
            data = yaml.safe_load(good)
            data["routes"][0]["chain"] = [{"router": {"aliases": {"x": {"targets": [{"upstream": "nope"}]}}}}]
            path.write_text(yaml.safe_dump(data))
            r = await http.post(f"{p.admin_url}/admin/reload", headers={"authorization": "Bearer t"})
            assert r.status_code == 400 and "unknown upstream(s) nope" in r.json()["error"]["message"]
            # so is one that changes what only a restart changes (every worker would refuse it)
            data = yaml.safe_load(good)
            data["server"]["background_queue"] = 123
            path.write_text(yaml.safe_dump(data))
            r = await http.post(f"{p.admin_url}/admin/reload", headers={"authorization": "Bearer t"})
            assert r.status_code == 400 and "server.background_queue" in r.json()["error"]["message"]
            path.write_text(good)
            r = await http.post(f"{p.admin_url}/admin/reload", headers={"authorization": "Bearer t"})
            assert r.status_code == 202
        p.signal(signal.SIGTERM)
        assert await p.wait(30) == 0


def _children(pid: int) -> set[int]:
    return {int(c) for c in (Path(f"/proc/{pid}/task/{pid}/children").read_text().split())}


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
async def test_a_worker_that_cannot_start_again_is_retried_while_the_others_serve(upstream, tmp_path):
    # the file on disk broke after start; a worker then died: the master used to crash on the
    # failed restart and leave the other worker serving with no parent to stop it
    path = write_cfg(tmp_path, {"server": {"workers": 2}, "upstreams": {"u": {"url": upstream.url}}, "routes": [{"match": {"path": "/v1/"}, "upstream": "u"}]})
    good = path.read_text()
    async with SluiceProcess(path, tmp_path) as p:
        workers = _children(p.pid)
        assert len(workers) == 2
        path.write_text(good + "server: {port: broken\n")
        victim, survivor = sorted(workers)
        os.kill(victim, signal.SIGKILL)  # a worker of the master this test started
        await wait_for(lambda: "failed to start again; next try in 2 s" in p.logs(), 30, "a second failed restart")
        assert p.proc is not None and p.proc.poll() is None
        async with openai.AsyncOpenAI(base_url=p.url, api_key="k", max_retries=0) as client:
            for i in range(4):
                await client.chat.completions.create(model="m", messages=[{"role": "user", "content": str(i)}])
        path.write_text(good)
        await wait_for(lambda: "worker 0 started again" in p.logs() or "worker 1 started again" in p.logs(), 30, "the worker back")
        now = _children(p.pid)
        assert len(now) == 2 and survivor in now and victim not in now
        p.signal(signal.SIGTERM)
        assert await p.wait(30) == 0
        assert not any(_alive(w) for w in now), "a worker outlived its master"
    assert not list(Path(tempfile.gettempdir()).glob(f"sluice-prom-*/*_{survivor}.db")), "the master left its metric files"


@pytest.mark.slow
async def test_serve_with_no_config_uses_demo_upstream(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text(yaml.safe_dump({"server": {"port": 0}, "admin": {"port": 0}, "state": {"dir": str(tmp_path / "s")}}))
    async with SluiceProcess(path, tmp_path) as p:
        async with openai.AsyncOpenAI(base_url=p.url, api_key="k", max_retries=0) as client:
            r = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
        assert r.choices[0].message.content == "Hello from the Sluice demo model. You said: hello"


def test_memory_trim_is_bound_on_glibc():
    import sys

    from proxy.server import _malloc_trim

    trim = _malloc_trim()
    if sys.platform.startswith("linux"):
        assert trim is not None and trim(0) in (0, 1)  # 1: memory was released, 0: none to release


class DoneLog(Plugin):
    """Records the request ids its on_done sees, in order (a plain hook: the route's on_done is inline)."""

    name = "donelog"
    seen: list[str] = []

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        DoneLog.seen.append(ctx.request_id)


class GuardDoneLog(Plugin):
    """A guard's plain on_done (as the rate limiter's, which frees concurrency slots): never batched."""

    name = "guarddonelog"
    kind = "guard"
    seen: list[str] = []

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        GuardDoneLog.seen.append(ctx.request_id)


async def test_inline_on_done_runs_in_batches_in_order_and_before_admin_reads_and_stops(upstream, tmp_path):
    from proxy.server import DONE_BATCH_MAX

    DoneLog.seen, GuardDoneLog.seen = [], []
    conf = {"server": {"done_batch_ms": 1000}, "upstreams": {"u": {"url": upstream.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"donelog": {}}, {"guarddonelog": {}}]}]}
    with register_plugin(DoneLog), register_plugin(GuardDoneLog):
        async with SluiceServer(conf, tmp_path) as s, httpx.AsyncClient() as http:
            ids = [(await http.get(f"{s.url}/models")).headers["x-request-id"] for _ in range(3)]
            # answered: the guard's on_done ran at once; the observer's waits for the batch (a second
            # away), holding the generation
            assert GuardDoneLog.seen == ids
            assert DoneLog.seen == [] and s.server.generation.inflight == 3
            # an admin read runs the batch first, so what it reports includes these requests
            assert (await http.get(f"{s.admin_url}/metrics")).status_code == 200
            assert DoneLog.seen == ids and s.server.generation.inflight == 0
            # a full batch runs at once
            more = [(await http.get(f"{s.url}/models")).headers["x-request-id"] for _ in range(DONE_BATCH_MAX)]
            assert DoneLog.seen == ids + more
            last = (await http.get(f"{s.url}/models")).headers["x-request-id"]
            assert DoneLog.seen[-1] != last
        # stopping (drain) runs what waits: nothing is lost
        assert DoneLog.seen == ids + more + [last]


class GuardWaits(Plugin):
    """A guard's plain on_done that, for a request asking so, hands the core a coroutine to wait for (as
    metering does for a big prompt's count): the hooks after it must wait for it too."""

    name = "guardwaits"
    kind = "guard"
    gate: asyncio.Event | None = None
    started: list[str] = []

    @hookimpl
    def on_done(self, ctx: Context) -> Any:
        if ctx.headers.get("x-wait") != "1":
            return None
        return self._wait(ctx.request_id)

    async def _wait(self, request_id: str) -> None:
        GuardWaits.started.append(request_id)
        assert GuardWaits.gate is not None
        await GuardWaits.gate.wait()


async def test_a_plain_on_done_returning_a_coroutine_holds_the_later_hooks_of_that_request_only(upstream, tmp_path):
    DoneLog.seen, GuardWaits.started, GuardWaits.gate = [], [], asyncio.Event()
    conf = {"server": {"done_batch_ms": 1000}, "upstreams": {"u": {"url": upstream.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"guardwaits": {}}, {"donelog": {}}]}]}
    with register_plugin(DoneLog), register_plugin(GuardWaits):
        async with SluiceServer(conf, tmp_path) as s, httpx.AsyncClient() as http:
            held = (await http.get(f"{s.url}/models", headers={"x-wait": "1"})).headers["x-request-id"]
            other = (await http.get(f"{s.url}/models")).headers["x-request-id"]
            await wait_for(lambda: GuardWaits.started == [held], timeout=10, what="the guard's coroutine running")
            # an admin read runs the batch: the other request's observer, not the held one's
            assert (await http.get(f"{s.admin_url}/metrics")).status_code == 200
            assert DoneLog.seen == [other] and s.server.generation.inflight == 1
            GuardWaits.gate.set()
            await wait_for(lambda: DoneLog.seen == [other, held], timeout=10, what="the held request's observer")
            await wait_for(lambda: s.server.generation.inflight == 0, timeout=10, what="the generation idle")


class BatchA(Plugin):
    """An observer's plain on_done that logs, fails for a request saying ``x-fail: 1`` and hands back a
    coroutine (as metering counting a big prompt) for one saying ``x-wait: 1``."""

    name = "batcha"
    kind = "observer"
    seen: list[tuple[str, str]] = []
    gate: asyncio.Event | None = None

    @hookimpl
    def on_done(self, ctx: Context) -> Any:
        BatchA.seen.append(("a", ctx.request_id))
        if ctx.headers.get("x-fail") == "1":
            raise RuntimeError("observer broke")
        if ctx.headers.get("x-wait") == "1":
            return self._wait()
        return None

    async def _wait(self) -> None:
        assert BatchA.gate is not None
        await BatchA.gate.wait()


class BatchB(Plugin):
    name = "batchb"
    kind = "observer"

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        BatchA.seen.append(("b", ctx.request_id))


async def test_a_batch_runs_hook_by_hook_and_a_failure_or_a_wait_costs_only_its_request(upstream, tmp_path):
    BatchA.seen, BatchA.gate = [], asyncio.Event()
    conf = {"server": {"done_batch_ms": 1000}, "upstreams": {"u": {"url": upstream.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"batcha": {}}, {"batchb": {}}]}]}
    with register_plugin(BatchA), register_plugin(BatchB):
        async with SluiceServer(conf, tmp_path) as s, httpx.AsyncClient() as http:
            ids = []
            for h in ({}, {"x-fail": "1"}, {"x-wait": "1"}, {}):
                ids.append((await http.get(f"{s.url}/models", headers=h)).headers["x-request-id"])
            assert BatchA.seen == []
            assert (await http.get(f"{s.admin_url}/metrics")).status_code == 200  # runs the batch
            # the first hook for every request in order, then the second for each still in the batch: the
            # one whose hook failed goes on, the one waiting leaves the batch
            assert BatchA.seen == [("a", i) for i in ids] + [("b", ids[0]), ("b", ids[1]), ("b", ids[3])]
            assert s.server.generation.inflight == 1
            BatchA.gate.set()
            await wait_for(lambda: BatchA.seen[-1] == ("b", ids[2]), timeout=10, what="the waiting request's second hook")
            await wait_for(lambda: s.server.generation.inflight == 0, timeout=10, what="the generation idle")
            text = (await http.get(f"{s.admin_url}/metrics")).text
            assert 'sluice_plugin_errors_total{phase="on_done",plugin="batcha"} 1.0' in text


async def test_a_batch_past_its_interval_runs_when_the_next_request_finishes_and_a_lone_one_on_a_later_timer(upstream, tmp_path):
    from proxy.server import DONE_BATCH_IDLE

    interval = 0.3
    DoneLog.seen = []
    conf = {"server": {"done_batch_ms": interval * 1000}, "upstreams": {"u": {"url": upstream.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"donelog": {}}]}]}
    with register_plugin(DoneLog):
        async with SluiceServer(conf, tmp_path) as s, httpx.AsyncClient() as http:
            first = (await http.get(f"{s.url}/models")).headers["x-request-id"]
            t0 = time.perf_counter()
            await wait_for(lambda: time.perf_counter() - t0 >= interval, 5, "one interval", every=0.01)
            # the interval passed with no timer fired (it would at DONE_BATCH_IDLE intervals): the next
            # request to finish runs the batch, itself included
            assert DoneLog.seen == []
            second = (await http.get(f"{s.url}/models")).headers["x-request-id"]
            assert DoneLog.seen == [first, second], "the batch should have run as the second request finished"
            # alone, a batch waits for the timer: not at one interval, at DONE_BATCH_IDLE of them
            third = (await http.get(f"{s.url}/models")).headers["x-request-id"]
            t1 = time.perf_counter()
            await wait_for(lambda: time.perf_counter() - t1 >= 2 * interval, 5, "two intervals", every=0.01)
            assert DoneLog.seen == [first, second]
            await wait_for(lambda: DoneLog.seen == [first, second, third], 10, "the timer to run the lone batch", every=0.01)
            assert time.perf_counter() - t1 >= (DONE_BATCH_IDLE - 0.5) * interval
