"""Cache, router and experiments where they meet each other and the client's credentials: each test is a
defect a review found (2026-12-07), fixed; the statistics check compares the experiments' figures with scipy."""

from __future__ import annotations

import asyncio
import contextlib
import math
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web

from plugins.router import Router
from proxy import Context, Plugin, hookimpl
from proxy.testing import FakeUpstream, SluiceServer, register_plugin, serve_app

MSG = [{"role": "user", "content": "hello there"}]


@contextlib.asynccontextmanager
async def ups(n: int) -> AsyncIterator[list[FakeUpstream]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(FakeUpstream()) for _ in range(n)]


def chats(up: FakeUpstream) -> list[Any]:
    return [r for r in up.requests if r.path.endswith("/chat/completions")]


def plugin_of(s: SluiceServer, cls: type) -> Any:
    return next(p for r in s.server.generation.routes for p in r.plugins if isinstance(p, cls))


async def admin(s: SluiceServer, method: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
        async with http.request(method, s.admin_url + path) as resp:
            return resp.status, await resp.json()


# -- experiments: a shadow copy carries none of the client's credentials -------------------------------------


async def test_a_shadow_copy_carries_none_of_the_clients_credentials(tmp_path: Path):
    async with ups(2) as (a, b):
        cfg = {
            # the primary upstream has its own key: the client's is never sent to it
            "upstreams": {"a": {"url": a.url, "api_key": "sk-sluice-own-upstream-key"}, "b": {"url": b.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "chain": [
                {"experiments": {"shadows": [{"name": "cand", "target": {"upstream": "b", "model": "cand"}, "sample": 1.0}]}}]}],
        }
        async with SluiceServer(cfg, tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key="sk-client-own-openai-secret", max_retries=0) as c:
                await c.chat.completions.create(model="sluice-demo", messages=MSG)
            await s.wait_idle()
            await b.wait_for(lambda: len(chats(b)) == 1)
        shadow_req = chats(b)[0]
        assert chats(a)[0].headers.get("authorization") == "Bearer sk-sluice-own-upstream-key"
        assert shadow_req.headers.get("x-sluice-shadow") == "cand"
        # the candidate server is not handed the client's own secret (it was)
        assert "authorization" not in shadow_req.headers


# -- experiments: an operator's promote outlives a restart ----------------------------------------------------

CANARY = {"name": "rollout", "model": "sluice-demo", "sticky": "random",
          "variants": [{"name": "stable"}, {"name": "next", "upstream": "b"}],
          "canary": {"stable": "stable", "canary": "next", "steps": [10, 50], "min_requests": 5, "min_step_seconds": 0,
                     "max_error_rate_delta": 0.05, "alpha": 0.05, "window": 100}}


async def test_a_promoted_canary_is_still_promoted_after_a_restart(tmp_path: Path):
    async with ups(2) as (a, b):
        cfg = {
            "upstreams": {"a": {"url": a.url}, "b": {"url": b.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "chain": [{"experiments": {"experiments": [CANARY], "check_every": 1}}]}],
        }
        async with SluiceServer(cfg, tmp_path) as s:
            status, desc = await admin(s, "POST", "/admin/experiments/rollout/promote")
            assert status == 200 and desc["status"] == "completed" and desc["share"] == 100
        async with SluiceServer(cfg, tmp_path) as s:
            status, body = await admin(s, "GET", "/admin/experiments/rollout")
            can = body["experiments"][0]["canary"]
            assert (can["status"], can["share"]) == ("completed", 100)


# -- router: active health checks leave a passive ejection and its backoff alone --------------------------------


async def test_a_passing_health_check_does_not_cut_a_passive_ejection_short(tmp_path: Path):
    async with ups(2) as (a, b):
        # a answers /models (the health check) but fails every chat request
        a.fail_next(500, count=10_000, path_contains="/chat/completions")
        cfg = {
            "upstreams": {"a": {"url": a.url}, "b": {"url": b.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "chain": [{"router": {
                "aliases": {"smart": {"strategy": "weighted", "targets": [{"upstream": "a", "weight": 1}, {"upstream": "b", "weight": 0}]}},
                "ejection": {"consecutive_failures": 1, "cooldown_s": 60, "max_cooldown_s": 300},
                "health_checks": {"enabled": True, "interval_s": 0.1, "timeout_s": 1},
            }}]}],
        }
        async with SluiceServer(cfg, tmp_path) as s, openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
            await c.chat.completions.create(model="smart", messages=MSG)  # a fails (500), b answers
            await s.wait_idle()
            st = plugin_of(s, Router).stats["a\x00"]
            assert st.ejections == 1, "a is ejected for 60 s"
            # probes of GET /models pass meanwhile: the passive ejection stands for its 60 s cooldown (it ended at
            # the first passing probe, and its doubling was reset)
            probes = len([r for r in a.requests if r.path.endswith("/models")])
            await a.wait_for(lambda: len([r for r in a.requests if r.path.endswith("/models")]) >= probes + 3)
            assert st.ejections == 1 and st.ejected_until > 0
            for _ in range(3):
                await c.chat.completions.create(model="smart", messages=MSG)
                await s.wait_idle()
            assert len(chats(a)) == 1, "the ejected target got traffic again within its cooldown"


# -- router + experiments: a variant's upstream stands after the router ---------------------------------------


async def test_a_variants_upstream_survives_a_router_after_experiments(tmp_path: Path):
    async with ups(3) as (a, b, n):
        cfg = {
            "upstreams": {"a": {"url": a.url}, "b": {"url": b.url}, "next": {"url": n.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "chain": [
                {"experiments": {"experiments": [{"name": "upgrade", "model": "summarizer", "sticky": "random",
                                                  "variants": [{"name": "stable", "weight": 0}, {"name": "canary", "upstream": "next"}]}]}},
                {"router": {"aliases": {"summarizer": {"targets": [{"upstream": "a"}, {"upstream": "b"}]}}}},
            ]}],
        }
        async with SluiceServer(cfg, tmp_path) as s, openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
            for _ in range(4):
                await c.chat.completions.create(model="summarizer", messages=MSG)
            await s.wait_idle()
            rows = await s.runtime.state.records("experiments").query("SELECT variant, upstream FROM experiment_results")
        assert all(r["variant"] == "canary" for r in rows)
        assert len(chats(n)) == 4, "every request was assigned the variant that names upstream 'next'"


# -- router: max_concurrency holds under a burst -----------------------------------------------------------------


class Later(Plugin):
    """Any plugin after the router whose on_request waits (metering reserving a budget, a Redis call)."""

    name = "later"

    @hookimpl
    async def on_request(self, ctx: Context) -> None:
        await asyncio.sleep(0)  # a yield to the loop, as any await on I/O is: not a wait for anything


async def test_max_concurrency_holds_under_a_burst(tmp_path: Path):
    """Every request of a burst passed the router's cap check before any was sent (the cap counts requests in
    flight), so all six went to a target capped at one. The core now checks the cap as it sends."""
    async with ups(2) as (a, b):
        a.first_byte_delay = 0.5
        cfg = {
            "upstreams": {"a": {"url": a.url}, "b": {"url": b.url}},
            "routes": [{"match": {"path": "/v1/"}, "upstream": "a", "chain": [
                {"router": {"aliases": {"smart": {"strategy": "weighted", "targets": [
                    {"upstream": "a", "weight": 1, "max_concurrency": 1}, {"upstream": "b", "weight": 0}]}}}},
                {"later": {}},
            ]}],
        }
        with register_plugin(Later):
            async with SluiceServer(cfg, tmp_path) as s, openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
                answers = await asyncio.gather(*(c.chat.completions.create(model="smart", messages=MSG) for _ in range(6)))
        assert all(r.choices for r in answers)
        assert (len(chats(a)), len(chats(b))) == (1, 5)


# -- cache: a buffered hit from a streamed completions entry keeps its logprobs -----------------------------


LP = {"tokens": ["Hi"], "token_logprobs": [-0.1], "top_logprobs": [{"Hi": -0.1}], "text_offset": [0]}


@contextlib.asynccontextmanager
async def completions_upstream() -> AsyncIterator[tuple[str, list[dict]]]:
    seen: list[dict] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        seen.append(body)
        base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": body["model"]}
        if not body.get("stream"):
            return web.json_response({**base, "choices": [{"index": 0, "text": "Hi", "logprobs": LP, "finish_reason": "length"}],
                                      "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
        r = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await r.prepare(request)
        await r.write(b"data: " + orjson.dumps({**base, "choices": [{"index": 0, "text": "Hi", "logprobs": LP, "finish_reason": "length"}]}) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            await r.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}) + b"\n\n")
        await r.write(b"data: [DONE]\n\n")
        return r

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    async with serve_app(app) as origin:
        yield origin + "/v1", seen


async def test_completions_logprobs_survive_a_streamed_cache_entry(tmp_path: Path):
    async with completions_upstream() as (url, seen):
        cfg = {"upstreams": {"u": {"url": url}},
               "routes": [{"match": {"path": "/v1/"}, "upstream": "u", "chain": [{"cache": {"backend": "memory"}}]}]}
        async with SluiceServer(cfg, tmp_path) as s, openai.AsyncOpenAI(base_url=s.url, api_key="k", max_retries=0) as c:
            stream = await c.completions.create(model="m", prompt="say hi", max_tokens=1, logprobs=1, stream=True)
            chunks = [ch async for ch in stream]
            assert chunks[0].choices[0].logprobs.tokens == ["Hi"]
            await s.wait_idle()
            raw = await c.completions.with_raw_response.create(model="m", prompt="say hi", max_tokens=1, logprobs=1)
            hit = raw.parse()
        assert raw.headers.get("x-sluice-cache") == "hit" and len(seen) == 1
        assert hit.choices[0].logprobs is not None and hit.choices[0].logprobs.tokens == ["Hi"]


# -- experiments' statistics against scipy ---------------------------------------------------------------------


def test_experiment_statistics_match_scipy():
    import numpy as np
    from scipy import stats

    from plugins._experiments_stats import mean_ci, percentile, two_proportion_test, wilson

    lo, hi = wilson(7, 50)
    z = stats.norm.ppf(0.975)
    p = 7 / 50
    c = (p + z * z / 100) / (1 + z * z / 50)
    h = z * math.sqrt(p * (1 - p) / 50 + z * z / (4 * 2500)) / (1 + z * z / 50)
    assert (lo, hi) == pytest.approx((c - h, c + h))
    r = two_proportion_test(5, 120, 17, 130)
    chi2, pv, _, _ = stats.chi2_contingency([[5, 115], [17, 113]], correction=False)
    assert r["p_value"] == pytest.approx(pv) and r["z"] ** 2 == pytest.approx(chi2) and r["z"] > 0
    xs = [12.0, 15.5, 9.1, 30.2, 14.4, 11.0, 19.9]
    m, mlo, mhi = mean_ci(xs)
    tlo, thi = stats.t.interval(0.95, len(xs) - 1, loc=np.mean(xs), scale=stats.sem(xs))
    assert (mlo, mhi) == pytest.approx((tlo, thi))
    assert percentile(xs, 95) == pytest.approx(np.percentile(xs, 95))
