"""The router through a real server: several fake upstreams, the openai SDK as client."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import pytest

from proxy import ConfigError
from pydantic import ValidationError

from plugins.router import Router
from proxy.testing import FakeUpstream, SluiceServer, configure_plugin, make_context, make_runtime

MSG = [{"role": "user", "content": "hello"}]


@contextlib.asynccontextmanager
async def upstreams(n: int) -> AsyncIterator[list[FakeUpstream]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakeUpstream()) for _ in range(n)]


def config(ups: list[FakeUpstream], router: dict[str, Any], *, kinds: dict[int, dict] | None = None, retries: dict | None = None) -> dict:
    names = "abcdefgh"
    return {
        "upstreams": {names[i]: {"url": u.url, **((kinds or {}).get(i, {}))} for i, u in enumerate(ups)},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "chain": [{"router": router}],
                    **({"retries": retries} if retries else {})}],
    }


def client(s: SluiceServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.url, api_key="sk-test", max_retries=0)


def router_of(s: SluiceServer) -> Router:
    return next(p for r in s.server.generation.routes for p in r.plugins if isinstance(p, Router))


def chats(up: FakeUpstream) -> list[dict]:
    return [r.json for r in up.requests if r.path.endswith("/chat/completions")]


async def ask(c: openai.AsyncOpenAI, model: str = "smart", **kw: Any):
    return await c.chat.completions.create(model=model, messages=kw.pop("messages", MSG), **kw)


async def test_alias_sends_each_target_its_own_model_by_weight(tmp_path: Path):
    async with upstreams(2) as (a, b):
        cfg = config([a, b], {"aliases": {"smart": {"strategy": "weighted", "targets": [
            {"upstream": "a", "model": "model-a", "weight": 0}, {"upstream": "b", "model": "model-b", "weight": 1}]}}})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            for _ in range(5):
                r = await ask(c)
                assert r.model == "model-b"
        assert [q["model"] for q in chats(b)] == ["model-b"] * 5 and chats(a) == []


async def test_round_robin_alternates_and_unknown_models_pass(tmp_path: Path):
    async with upstreams(2) as (a, b):
        cfg = config([a, b], {"aliases": {"smart": {"strategy": "round_robin", "targets": [{"upstream": "a"}, {"upstream": "b"}]}}})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            for _ in range(6):
                await ask(c)
            # not an alias: the route's own upstream, model untouched
            r = await ask(c, model="sluice-demo")
            assert r.model == "sluice-demo"
        assert (len(chats(a)), len(chats(b))) == (4, 3)
        assert chats(a)[-1]["model"] == "sluice-demo"


async def test_unknown_models_can_be_rejected(tmp_path: Path):
    async with upstreams(1) as (a,):
        cfg = config([a], {"unknown_models": "reject", "aliases": {"smart": {"targets": [{"upstream": "a"}]}}})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            with pytest.raises(openai.NotFoundError) as e:
                await ask(c, model="gpt-nope")
            assert e.value.code == "model_not_found"
            await ask(c)


async def test_errors_fall_back_within_the_alias_and_to_fallback_aliases(tmp_path: Path):
    async with upstreams(3) as (a, b, c3):
        cfg = config([a, b, c3], {"aliases": {
            "smart": {"strategy": "round_robin", "targets": [{"upstream": "a"}, {"upstream": "b"}], "fallbacks": ["backup"]},
            "backup": {"targets": [{"upstream": "c", "model": "backup-model"}]},
        }})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            a.fail_next(503)
            b.fail_next(502)
            r = await ask(c)
            assert r.model == "backup-model"
            assert (len(chats(a)), len(chats(b)), len(chats(c3))) == (1, 1, 1)


async def test_context_window_picks_a_target_that_fits(tmp_path: Path):
    async with upstreams(2) as (a, b):
        cfg = config([a, b], {"aliases": {
            "smart": {"targets": [{"upstream": "a"}], "fallbacks": ["long"]},
            "long": {"targets": [{"upstream": "b"}]},
        }}, kinds={0: {"context_window": 100}, 1: {"context_window": 2000}})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            await ask(c)
            await ask(c, messages=[{"role": "user", "content": "word " * 200}])
            await ask(c, max_tokens=150)  # the answer's allowance counts too
            with pytest.raises(openai.BadRequestError) as e:
                await ask(c, messages=[{"role": "user", "content": "word " * 4000}])
            assert e.value.code == "context_length_exceeded"
        assert (len(chats(a)), len(chats(b))) == (1, 2)


async def test_outlier_is_ejected_then_probed_back_in(tmp_path: Path):
    async with upstreams(2) as (a, b):
        cfg = config([a, b], {"aliases": {"smart": {"strategy": "round_robin", "targets": [{"upstream": "a"}, {"upstream": "b"}]}},
                              "ejection": {"consecutive_failures": 2, "cooldown_s": 0.3, "max_cooldown_s": 5}})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            a.fail_next(500, count=2)
            for _ in range(4):
                await ask(c)  # a fails twice; b answers each time
                await s.wait_idle()
            assert len(chats(a)) == 2
            for _ in range(6):
                await ask(c)
            assert len(chats(a)) == 2, "an ejected target gets no traffic"
            st = router_of(s).stats["a\x00"]
            assert st.ejections == 1
            await asyncio.sleep(0.35)  # the cooldown itself is under test: let it pass
            for _ in range(4):
                await ask(c)
                await s.wait_idle()
            assert len(chats(a)) >= 2 + 2, "after the cooldown a successful probe brings it back"
            assert st.ejections == 0 and st.consecutive_failures == 0


async def test_concurrency_cap_sends_overflow_elsewhere_or_503(tmp_path: Path):
    async with upstreams(2) as (a, b):
        a.token_delay = 0.05
        cfg = config([a, b], {"aliases": {
            "smart": {"strategy": "weighted", "targets": [{"upstream": "a", "weight": 1, "max_concurrency": 1}, {"upstream": "b", "weight": 0}]},
            "only": {"targets": [{"upstream": "a", "max_concurrency": 1}]},
        }})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            slow = await ask(c, messages=[{"role": "user", "content": "a long answer " * 10}], stream=True)
            first = await slow.__anext__()  # in flight at a until the stream is drained
            assert first.choices[0].delta.role == "assistant"
            await ask(c)  # a is at its cap: b takes it
            with pytest.raises(openai.InternalServerError) as e:
                await ask(c, model="only")
            assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
            assert [ch async for ch in slow][-1].choices[0].finish_reason == "stop"
        assert (len(chats(a)), len(chats(b))) == (1, 1)


async def test_lowest_latency_prefers_the_faster_target(tmp_path: Path):
    async with upstreams(2) as (a, b):
        a.first_byte_delay = 0.2
        cfg = config([a, b], {"aliases": {"smart": {"strategy": "lowest_latency", "targets": [{"upstream": "a"}, {"upstream": "b"}]}}})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            for _ in range(8):
                await ask(c)
                await s.wait_idle()
            st = router_of(s).stats
            assert st["a\x00"].ewma_ms > st["b\x00"].ewma_ms
        # both were tried once, then the fast one took the rest
        assert (len(chats(a)), len(chats(b))) == (1, 7)


async def test_lowest_latency_of_streams_is_to_the_first_token(tmp_path: Path):
    """A model server sends a stream's headers before prefill: b answers its headers at once but its
    first token late, so for streams b is the slow one."""
    async with upstreams(2) as (a, b):
        b.first_event_delay = 0.2
        cfg = config([a, b], {"aliases": {"smart": {"strategy": "lowest_latency", "targets": [{"upstream": "a"}, {"upstream": "b"}]}}})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            for _ in range(8):
                _ = [ch async for ch in await ask(c, stream=True)]
                await s.wait_idle()
            st = router_of(s).stats
            assert st["b\x00"].ewma_ms > 150 > st["a\x00"].ewma_ms
        assert (len(chats(a)), len(chats(b))) == (7, 1)


async def test_vllm_strategy_prefers_the_idle_server(tmp_path: Path):
    async with upstreams(2) as (a, b):
        a.token_delay = 0.05
        cfg = config([a, b], {"aliases": {"smart": {"strategy": "vllm", "targets": [{"upstream": "a"}, {"upstream": "b"}]}},
                              "vllm": {"poll_interval_s": 600}},
                     kinds={0: {"kind": "vllm"}, 1: {"kind": "vllm"}})
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            r = router_of(s)
            # a is busy with traffic that does not go through this proxy (another replica's)
            async with aiohttp.ClientSession() as direct:
                busy = asyncio.create_task(direct.post(a.url + "/chat/completions", json={
                    "model": "m", "stream": True, "messages": [{"role": "user", "content": "x " * 40}]}))
                await a.wait_for(lambda: a.stats.running >= 1)
                assert await r.scrape_once("a") and await r.scrape_once("b")
                assert r.stats["a\x00"].vllm[1] > r.stats["b\x00"].vllm[1]
                for _ in range(4):
                    await ask(c)
                (await busy).close()
        assert len(chats(b)) == 4 and all(q["stream"] is True for q in chats(a))


async def test_vllm_scrape_failure_is_reported_not_raised(tmp_path: Path):
    import socket

    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    async with upstreams(1) as (a,):
        cfg = config([a], {"aliases": {"smart": {"strategy": "vllm", "targets": [{"upstream": "a"}, {"upstream": "dead"}]}},
                           "vllm": {"poll_interval_s": 600}}, kinds={0: {"kind": "vllm"}})
        cfg["upstreams"]["dead"] = {"url": f"http://127.0.0.1:{dead_port}/v1", "kind": "vllm"}
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            r = router_of(s)
            assert not await r.scrape_once("dead")
            assert await r.scrape_once("a")
            assert r.stats["dead\x00"].vllm is None
            for _ in range(3):
                await ask(c)  # the unscraped target scores worse than a fresh, idle one
        assert len(chats(a)) == 3


async def test_complexity_router(tmp_path: Path):
    async with upstreams(2) as (a, b):
        cfg = config([a, b], {
            "aliases": {"small": {"targets": [{"upstream": "a", "model": "tiny"}]}, "large": {"targets": [{"upstream": "b", "model": "huge"}]}},
            "complexity": {"model": "auto", "small": "small", "large": "large", "max_prompt_tokens": 200, "max_turns": 4, "keywords": ["prove"]},
        })
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            assert (await ask(c, "auto")).model == "tiny"
            assert (await ask(c, "auto", messages=[{"role": "user", "content": "```python\nprint(1)\n```"}])).model == "huge"
            assert (await ask(c, "auto", messages=[{"role": "user", "content": "word " * 400}])).model == "huge"
            assert (await ask(c, "auto", messages=[{"role": "user", "content": "Prove that 2 is prime"}])).model == "huge"
            deep = [{"role": r, "content": "hi"} for r in ["user", "assistant"] * 3]
            assert (await ask(c, "auto", messages=deep)).model == "huge"
            tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
            assert (await ask(c, "auto", tools=tools)).model == "huge"


async def test_active_health_checks_eject_and_restore(tmp_path: Path):
    async with upstreams(2) as (a, b):
        cfg = config([a, b], {"aliases": {"smart": {"strategy": "round_robin", "targets": [{"upstream": "a"}, {"upstream": "b"}]}},
                              "health_checks": {"enabled": True, "interval_s": 0.05, "timeout_s": 1, "unhealthy_threshold": 2,
                                                "path": "healthcheck"}})
        a.fail_next(503, count=2, path_contains="/healthcheck")
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            r = router_of(s)
            st = r.stats["a\x00"]
            probes = lambda: sum(1 for q in a.requests if q.path.endswith("/healthcheck"))  # noqa: E731
            await a.wait_for(lambda: probes() >= 2)
            # the second failed probe ejects; the next passing one restores
            await a.wait_for(lambda: probes() >= 3)
            await a.wait_for(lambda: st.ejections == 0 and st.consecutive_failures == 0, timeout=5)
            assert r.metrics.ejections.labels("a")._value.get() >= 1
            for _ in range(4):
                await ask(c)
        assert len(chats(a)) == 2 and len(chats(b)) == 2


async def test_active_health_checks_work_without_passive_ejection(tmp_path: Path):
    """Active probes are their own feature: with passive ejection off, a target whose probes fail is out
    of rotation all the same (it was still picked, and each request paid for the dead upstream)."""
    async with upstreams(2) as (a, b):
        cfg = config([a, b], {"aliases": {"smart": {"strategy": "round_robin", "targets": [{"upstream": "a"}, {"upstream": "b"}]}},
                              "ejection": {"enabled": False},
                              # each failed probe keeps the target out for two intervals: 0.2 s leaves room for a slow probe
                              "health_checks": {"enabled": True, "interval_s": 0.2, "timeout_s": 1, "unhealthy_threshold": 2,
                                                "path": "healthcheck"}})
        a.fail_next(503, count=10_000, path_contains="/healthcheck")
        async with SluiceServer(cfg, tmp_path) as s, client(s) as c:
            r = router_of(s)
            await a.wait_for(lambda: r.metrics.ejections.labels("a")._value.get() >= 1, timeout=5)
            for _ in range(6):
                await ask(c)
        assert len(chats(a)) == 0 and len(chats(b)) == 6


async def test_an_earlier_answer_is_left_alone(tmp_path: Path):
    async with upstreams(1) as (a,):
        rt = await make_runtime(tmp_path, config={"upstreams": {"a": {"url": a.url}}})
        try:
            plugin = await configure_plugin(Router, {"aliases": {"smart": {"targets": [{"upstream": "a", "model": "x"}]}}}, runtime=rt)
            ctx = make_context({"model": "smart", "messages": MSG}, runtime=rt)
            ctx.reply(429, {"error": {"message": "slow down"}})
            plugin.on_request(ctx)
            assert ctx.targets == []
            ctx2 = make_context({"model": "smart", "messages": MSG}, runtime=rt)
            plugin.on_request(ctx2)
            assert [(t.upstream, t.model, t.label) for t in ctx2.targets] == [("a", "x", "smart")]
            await plugin.stop()
        finally:
            await rt.close_all()


async def test_unknown_upstream_is_refused_at_load_and_on_reload(tmp_path: Path):
    async with upstreams(1) as (a,):
        bad = config([a], {"aliases": {"smart": {"targets": [{"upstream": "nope"}]}, "ok": {"targets": [{"upstream": "a"}]}}})
        with pytest.raises(ConfigError, match=r"routes\[0\]\.chain\[0\]\.router\.aliases\.smart\.targets: unknown upstream\(s\) nope: add them to 'upstreams' \(plugin router\)"):
            async with SluiceServer(bad, tmp_path):
                pass
        good = config([a], {"aliases": {"ok": {"targets": [{"upstream": "a"}]}}})
        async with SluiceServer(good, tmp_path) as s, client(s) as c:
            ok, why = await s.reload(bad)
            assert not ok and "unknown upstream(s) nope" in why
            await ask(c, "ok")  # the old config keeps serving


async def test_reload_adds_an_upstream_and_an_alias(tmp_path: Path):
    async with upstreams(2) as (a, b):
        first = config([a], {"aliases": {"smart": {"strategy": "least_outstanding", "targets": [{"upstream": "a"}]}}})
        async with SluiceServer(first, tmp_path) as s, client(s) as c:
            await ask(c)
            second = config([a, b], {"aliases": {
                "smart": {"strategy": "least_outstanding", "targets": [{"upstream": "a"}]},
                "new": {"targets": [{"upstream": "b", "model": "fresh"}]}}})
            ok, why = await s.reload(second)
            assert ok, why
            assert (await ask(c, "new")).model == "fresh"
            await ask(c)
        assert len(chats(a)) == 2 and [q["model"] for q in chats(b)] == ["fresh"]


@pytest.mark.parametrize("cfg,message", [
    ({"aliases": {"x": {"targets": [{"upstream": "a"}], "fallbacks": ["x"]}}}, "an alias cannot fall back to itself"),
    ({"aliases": {"x": {"targets": [{"upstream": "a"}], "fallbacks": ["y"]}}}, "unknown alias 'y'"),
    ({"aliases": {"x": {"targets": [{"upstream": "a", "weight": 0}]}}}, "needs at least one target with weight > 0"),
    ({"ejection": {"cooldown_s": 100, "max_cooldown_s": 10}}, "cooldown_s must not exceed max_cooldown_s"),
    ({"ejection": {"failure_statuses": [42]}}, "failure_statuses must be HTTP statuses"),
    ({"aliases": {"auto": {"targets": [{"upstream": "a"}]}}, "complexity": {"small": "s", "large": "l"}}, "'auto' is also an alias"),
    ({"aliases": {"x": {"targets": []}}}, "at least 1 item"),
    ({"aliases": {"x": {"targets": [{"upstream": "a"}], "strategy": "fastest"}}}, "Input should be 'weighted'"),
])
def test_config_validation_messages(cfg: dict, message: str):
    with pytest.raises(ValidationError) as e:
        Router.Config.model_validate(cfg)
    assert message in str(e.value)
