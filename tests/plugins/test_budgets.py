"""Budgets: reserve at admission, reconcile after, 429 insufficient_quota; exact across replicas with Redis."""

from __future__ import annotations

import asyncio
import gc
import weakref

import httpx
import openai
import pytest

from plugins.metering import Metering
from proxy import Attempt, Identity, ProxyError, StateUnavailable, Target, Usage
from proxy.testing import FakeUpstream, RedisServer, SluiceServer, configure_plugin, make_context, make_runtime

KEY_A = "sk-budget-test-key-aaaa"
KEY_B = "sk-budget-test-key-bbbb"
M = 5  # max_tokens of every request: the demo model then writes exactly M tokens
PER_TOKEN = 1.0  # price of an output token; input is free, so a request costs exactly M
LONG = "please repeat all of these words back to me now"


async def hook(fn, ctx) -> None:
    """Call a hook as the chain does: plain, or awaited when it is a coroutine function."""
    r = fn(ctx)
    if asyncio.iscoroutine(r):
        await r


def config(upstream: FakeUpstream, budgets: list, redis_url: str | None = None, **metering) -> dict:
    cfg = {
        "upstreams": {"demo": {"url": upstream.url, "models": ["sluice-demo"]}},
        "prices": {"sluice-demo": {"input": 0.0, "output": PER_TOKEN * 1e6}},
        "routes": [{
            "name": "main", "match": {"path": "/v1/"}, "upstream": "demo",
            "chain": [
                {"auth": {"keys": [{"key": KEY_A, "id": "ka", "team": "red"}, {"key": KEY_B, "id": "kb", "team": "red"}],
                          "virtual_keys": False}},
                {"metering": {"budgets": budgets, **metering}},
            ],
        }],
    }
    if redis_url:
        cfg["state"] = {"redis": {"url": redis_url, "timeout_ms": 2000}}
    return cfg


async def ask(c: openai.AsyncOpenAI, content: str = LONG, max_tokens: int = M):
    return await c.chat.completions.create(
        model="sluice-demo", messages=[{"role": "user", "content": content}], max_tokens=max_tokens)


async def test_key_budget_admits_until_spent_then_429_insufficient_quota(upstream: FakeUpstream, tmp_path):
    budgets = [{"scope": "key", "period": "day", "limit": 3.5 * M}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a, \
                openai.AsyncOpenAI(base_url=s.url, api_key=KEY_B, max_retries=0) as b:
            for _ in range(3):
                r = await ask(a)
                assert r.usage.completion_tokens == M
                await s.wait_idle()
            with pytest.raises(openai.RateLimitError) as exc:
                await ask(a)
            assert exc.value.code == "insufficient_quota"
            assert exc.value.body["type"] == "insufficient_quota"
            assert int(exc.value.response.headers["retry-after"]) > 0
            assert "ka" not in exc.value.message and KEY_A not in exc.value.message
            await ask(b)  # budgets are per key: the other key still has its own
    assert len(upstream.requests) == 4


async def test_a_call_that_bills_no_tokens_reserves_nothing(upstream: FakeUpstream, tmp_path):
    """With a "*" price, GET /v1/models reserved a worst case of 1024 output tokens: a key with a small
    budget got 429 insufficient_quota for the model list."""
    cfg = config(upstream, [{"scope": "key", "period": "day", "limit": 0.05}])
    cfg["prices"] = {"*": {"input": 1000.0, "output": 1000.0}}
    async with SluiceServer(cfg, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            assert [m.id async for m in a.models.list()] == ["sluice-demo"]
            await a.models.retrieve("sluice-demo")


async def test_unused_reservation_is_given_back(upstream: FakeUpstream, tmp_path):
    # each request reserves 50 tokens' worth but writes a few: without reconciliation the second
    # would be refused (100 > 99); with it, four fit (4 * a few + 50 <= 99)
    budgets = [{"scope": "key", "period": "month", "limit": 99.0}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            for _ in range(4):
                r = await ask(a, "hi", max_tokens=50)
                assert r.usage.completion_tokens <= 12
                await s.wait_idle()


async def test_team_budget_is_shared_by_the_team_keys(upstream: FakeUpstream, tmp_path):
    budgets = [{"scope": "team", "period": "day", "limit": 2.5 * M, "ids": ["red"]}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a, \
                openai.AsyncOpenAI(base_url=s.url, api_key=KEY_B, max_retries=0) as b:
            await ask(a)
            await s.wait_idle()
            await ask(b)
            await s.wait_idle()
            with pytest.raises(openai.RateLimitError):
                await ask(a)
            with pytest.raises(openai.RateLimitError):
                await ask(b)


@pytest.mark.redis
async def test_exact_across_two_replicas_under_concurrency(upstream: FakeUpstream, tmp_path, redis_server: RedisServer):
    """Two servers share one Redis; 40 concurrent requests against a budget worth exactly 10."""
    budgets = [{"scope": "key", "period": "day", "limit": 10.5 * M}]
    await asyncio.to_thread(_flush, redis_server.url)
    cfg = config(upstream, budgets, redis_server.url)
    async with SluiceServer(cfg, tmp_path / "a") as s1, SluiceServer(cfg, tmp_path / "b") as s2:
        async with openai.AsyncOpenAI(base_url=s1.url, api_key=KEY_A, max_retries=0) as c1, \
                openai.AsyncOpenAI(base_url=s2.url, api_key=KEY_A, max_retries=0) as c2:
            results = await asyncio.gather(*(ask(c1 if i % 2 else c2) for i in range(40)), return_exceptions=True)
        await s1.wait_idle()
        await s2.wait_idle()
    ok = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, openai.RateLimitError) and r.code == "insufficient_quota"]
    others = [repr(r)[:200] for r in results if isinstance(r, BaseException) and r not in refused]
    assert others == [] and len(ok) == 10 and len(refused) == 30
    assert sum(r.usage.completion_tokens for r in ok) * PER_TOKEN <= 10.5 * M


def _flush(url: str) -> None:
    import redis

    r = redis.Redis.from_url(url)
    try:
        r.flushdb()
    finally:
        r.close()


@pytest.mark.redis
async def test_budget_failure_policy_when_redis_is_down(upstream: FakeUpstream, tmp_path):
    budgets = [{"scope": "key", "period": "day", "limit": 1000.0}]
    async with RedisServer() as rs:
        closed = config(upstream, budgets, rs.url)
        opened = config(upstream, budgets, rs.url, budget_on_error="open")
        async with SluiceServer(closed, tmp_path / "c") as sc, SluiceServer(opened, tmp_path / "o") as so:
            async with openai.AsyncOpenAI(base_url=sc.url, api_key=KEY_A, max_retries=0) as c, \
                    openai.AsyncOpenAI(base_url=so.url, api_key=KEY_A, max_retries=0) as o:
                await ask(c)
                await ask(o)
                await rs.astop()
                with pytest.raises(openai.APIStatusError) as exc:
                    await ask(c)
                assert exc.value.status_code == 503 and exc.value.code == "state_unavailable"
                r = await ask(o)
                assert r.usage.completion_tokens == M


async def test_identity_budgets_and_early_answers(tmp_path):
    rt = await make_runtime(tmp_path)
    try:
        p = await configure_plugin(Metering, {"ledger": False, "prices": {"m": {"input": 0, "output": 1e6}}}, runtime=rt)

        def ctx():
            c = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10}, runtime=rt,
                             identity=Identity(key_id="kx", limits={"budget_per_day": 25.0}))
            return c

        done = []
        for _ in range(2):
            c = ctx()
            await hook(p.on_request, c)
            done.append(c)
        with pytest.raises(ProxyError) as exc:
            await hook(p.on_request, ctx())
        assert exc.value.status == 429 and exc.value.code == "insufficient_quota"
        # the first request was answered by a later plugin (a cache hit): its reservation comes back whole
        done[0].tags["cache"] = "hit"
        done[0].reply(200, {"ok": True})
        await hook(p.on_done, done[0])
        c = ctx()
        await hook(p.on_request, c)
        # the second reached the upstream and used 3 tokens: 7 of its 10 come back
        done[1].attempts.append(Attempt(Target("up"), start=done[1].timings.start, status=200))
        done[1].usage = Usage(1, 3, 4)
        await hook(p.on_done, done[1])
        assert done[1].cost == pytest.approx(3.0)
        key = p.applicable(done[1], __import__("time").time())[0][0]
        assert await p.counters.get_sum(key) == pytest.approx(13.0)
    finally:
        await rt.close_all()


@pytest.mark.redis
async def test_a_reservation_whose_answer_was_lost_is_undone_once_redis_answers(tmp_path):
    """Redis stalled past the timeout, then made the reservation: the client had its 503, and the
    worst case stayed counted for the rest of the day (a key fitting two requests then fitted one)."""
    import os
    import signal

    from proxy.testing import wait_for

    async with RedisServer() as rs:
        rt = await make_runtime(tmp_path, config={"state": {"redis": {"url": rs.url, "timeout_ms": 50}}})
        try:
            p = await configure_plugin(Metering, {"ledger": False, "prices": {"m": {"input": 0, "output": 1e6}}}, runtime=rt)

            def ctx():
                return make_context({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10}, runtime=rt,
                                    identity=Identity(key_id="kx", limits={"budget_per_day": 25.0}))

            warm = ctx()
            await hook(p.on_request, warm)  # reserves 10 (the script loaded, a connection open)
            key = p.applicable(warm, __import__("time").time())[0][0]
            os.kill(rs.pid, signal.SIGSTOP)  # the redis-server this test started: a stall
            try:
                with pytest.raises(ProxyError) as exc:
                    await hook(p.on_request, ctx())
                assert exc.value.status == 503
            finally:
                os.kill(rs.pid, signal.SIGCONT)  # it makes the reservation then

            async def only_the_first() -> bool:
                try:
                    return await p.counters.get_sum(key) == pytest.approx(10.0)
                except StateUnavailable:
                    return False

            await wait_for(only_the_first, 10, "the lost reservation to be undone")
            await hook(p.on_request, ctx())  # 20 of 25: a second request fits again
        finally:
            await rt.close_all()


async def test_counters_down_policy_at_the_hook(tmp_path):
    """A Redis nobody listens on: 'closed' refuses with the plugin's own 503 (not a StateUnavailable
    left to the observer's fail-open), 'open' admits, and neither holds a reservation."""
    import socket

    from plugins.metering import RESERVED

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    rt = await make_runtime(tmp_path, redis_url=f"redis://127.0.0.1:{port}/0")
    try:
        budgets = [{"scope": "key", "period": "day", "limit": 5}]
        closed = await configure_plugin(Metering, {"ledger": False, "budgets": budgets}, runtime=rt)
        opened = await configure_plugin(Metering, {"ledger": False, "budgets": budgets, "budget_on_error": "open"}, runtime=rt)
        c = make_context({"model": "gpt-4o", "messages": []}, runtime=rt, identity=Identity(key_id="k"))
        with pytest.raises(ProxyError) as exc:
            await hook(closed.on_request, c)
        assert exc.value.status == 503 and exc.value.code == "state_unavailable" and type(exc.value) is ProxyError
        assert exc.value.headers["retry-after"] == "1" and c.stash[RESERVED] == []
        o = make_context({"model": "gpt-4o", "messages": []}, runtime=rt, identity=Identity(key_id="k"))
        await hook(opened.on_request, o)
        assert all(amount == 0 for _, amount, _ in o.stash[RESERVED])  # admitted, nothing to give back later
        with pytest.raises(StateUnavailable):
            await opened.counters.get_sum(opened.applicable(o, __import__("time").time())[0][0])
    finally:
        await rt.close_all()


async def test_admin_budgets_shows_spent_and_reserved(upstream: FakeUpstream, tmp_path):
    import aiohttp

    budgets = [{"scope": "key", "period": "day", "limit": 100.0}, {"scope": "team", "period": "month", "limit": 1000.0}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            await ask(a)
        await s.wait_idle()
        async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
            async with http.get(f"{s.admin_url}/admin/budgets", params={"key": "ka", "team": "red"}) as r:
                assert r.status == 200
                body = await r.json()
            async with http.get(f"{s.admin_url}/admin/budgets") as r:
                assert r.status == 400
    by_scope = {b["scope"]: b for b in body["budgets"]}
    assert by_scope["key"]["spent_and_reserved"] == pytest.approx(M * PER_TOKEN)
    assert by_scope["team"]["spent_and_reserved"] == pytest.approx(M * PER_TOKEN)
    assert by_scope["key"]["limit"] == 100.0 and by_scope["team"]["period"] == "month"


async def test_admin_budgets_shows_a_keys_own_budgets_static_and_virtual(upstream: FakeUpstream, tmp_path):
    # the report built an identity with no limits, so a key's budget_per_day never showed
    import aiohttp

    cfg = config(upstream, [])
    cfg["routes"][0]["chain"][0]["auth"] = {"keys": [{"key": KEY_A, "id": "ka", "team": "red", "limits": {"budget_per_day": 50.0}}],
                                            "virtual_keys": True}
    async with SluiceServer(cfg, tmp_path) as s:
        async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
            async with http.post(f"{s.admin_url}/admin/keys", json={"name": "v", "team": "blue", "limits": {"budget_per_month": 70.0}}) as r:
                assert r.status in (200, 201), await r.text()
                virtual = await r.json()
            async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
                await ask(a)
            async with openai.AsyncOpenAI(base_url=s.url, api_key=virtual["key"], max_retries=0) as v:
                await ask(v)
            await s.wait_idle()
            found = {}
            for key in ("ka", virtual["id"], "nobody"):
                async with http.get(f"{s.admin_url}/admin/budgets", params={"key": key}) as r:
                    assert r.status == 200
                    found[key] = (await r.json())["budgets"]
    (a,) = found["ka"]
    assert (a["scope"], a["id"], a["period"], a["limit"]) == ("key", "ka", "day", 50.0)
    assert a["spent_and_reserved"] == pytest.approx(M * PER_TOKEN)
    (v,) = found[virtual["id"]]
    assert (v["scope"], v["period"], v["limit"]) == ("key", "month", 70.0) and v["spent_and_reserved"] == pytest.approx(M * PER_TOKEN)
    assert found["nobody"] == []


async def test_a_reservation_is_given_back_before_the_next_request_however_long_observers_batch(upstream: FakeUpstream, tmp_path):
    """Back to back, with no wait: the reservation (the worst case) is reconciled as soon as the answer is
    sent, not when the observers' on_done batch runs (here it would wait 1 s or 8 requests), so the key's
    next request sees only what the last one cost."""
    budgets = [{"scope": "key", "period": "month", "limit": 99.0}]
    cfg = config(upstream, budgets)
    cfg["server"] = {"done_batch_ms": 1000}
    async with SluiceServer(cfg, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            for _ in range(4):
                r = await ask(a, "hi", max_tokens=50)  # reserves 50, writes a few: two at once would not fit
                assert r.usage.completion_tokens <= 12
            await s.wait_idle()
    assert len(upstream.requests) == 4


async def test_hooks_are_plain_unless_budgets_live_in_redis(tmp_path):
    """In-process counters answer at once: plain hooks, so a route of observers runs on_done inline."""
    from proxy.registry import hook_functions

    rt = await make_runtime(tmp_path)
    try:
        for cfg in ({}, {"identity_budgets": False}, {"budgets": [{"scope": "key", "period": "day", "limit": 1}]},
                    {"budget_backend": "memory"}):
            p = Metering(Metering.Config.model_validate({"ledger": False, **cfg}), rt)
            kinds = {name: is_async for name, (_, is_async) in hook_functions(p).items()}
            # no budget at all: nothing to reserve, no on_request
            want = {"on_done": False} if cfg == {"identity_budgets": False} else {"on_request": False, "on_done": False}
            assert kinds == want, cfg
        # Redis-backed budgets can wait on the network: the hooks stay coroutines
        p = Metering(Metering.Config.model_validate({"ledger": False, "budget_backend": "redis"}), rt)
        assert {name: is_async for name, (_, is_async) in hook_functions(p).items()} == {"on_request": True, "on_done": True}
    finally:
        await rt.close_all()


async def test_embeddings_reserve_no_output(upstream: FakeUpstream, tmp_path):
    """An embedding generates nothing, and has no max_tokens a client could lower: its reservation is
    its prompt alone, as ratelimit's is. Before, it reserved ``reserve_output_tokens`` of output at
    the output price and was refused by a budget it could never have spent."""
    budgets = [{"scope": "key", "period": "day", "limit": 100.0}]  # less than 1024 output tokens at 1.0 each
    cfg = config(upstream, budgets)
    cfg["prices"]["sluice-demo"]["input"] = PER_TOKEN * 1e6
    async with SluiceServer(cfg, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            r = await a.embeddings.create(model="sluice-demo", input="a few words")
            assert r.data and r.usage.prompt_tokens > 0
            # a chat request still reserves its default output, and that is over this budget
            with pytest.raises(openai.RateLimitError) as exc:
                await a.chat.completions.create(model="sluice-demo", messages=[{"role": "user", "content": "x"}])
            assert exc.value.code == "insufficient_quota"


async def test_a_keys_own_budget_from_its_limits_static_or_made_by_the_admin_api(upstream: FakeUpstream, tmp_path):
    """``identity_budgets``: a key's ``budget_per_day`` in its limits is a budget of its own, whether the
    key is in the config or made through the admin API (whose key spec refused the field before)."""
    cfg = config(upstream, [])
    auth = cfg["routes"][0]["chain"][0]["auth"]
    auth["keys"][0]["limits"] = {"budget_per_day": 2.5 * M}
    auth["virtual_keys"] = True
    async with SluiceServer(cfg, tmp_path) as s:
        async with httpx.AsyncClient() as http:
            made = await http.post(f"{s.admin_url}/admin/keys", headers={"authorization": f"Bearer {s.admin_token}"},
                                   json={"name": "svc", "limits": {"budget_per_day": 1.5 * M}})
            assert made.status_code == 201, made.text
            bad = await http.post(f"{s.admin_url}/admin/keys", headers={"authorization": f"Bearer {s.admin_token}"},
                                  json={"name": "svc", "limits": {"budget_per_day": -1}})
            assert bad.status_code == 400
        for key, allowed in ((KEY_A, 2), (made.json()["key"], 1)):
            async with openai.AsyncOpenAI(base_url=s.url, api_key=key, max_retries=0) as c:
                for _ in range(allowed):
                    await ask(c)
                    await s.wait_idle()
                with pytest.raises(openai.RateLimitError) as exc:
                    await ask(c)
                assert exc.value.code == "insufficient_quota"


async def _budgets_of(s: SluiceServer, key: str, team: str | None = None) -> dict[tuple[str, str], float]:
    """(scope, period) -> spent and reserved, from the admin API."""
    import aiohttp

    params = {"key": key, **({"team": team} if team else {})}
    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
        async with http.get(f"{s.admin_url}/admin/budgets", params=params) as r:
            assert r.status == 200, await r.text()
            return {(b["scope"], b["period"]): b["spent_and_reserved"] for b in (await r.json())["budgets"]}


async def _seeded(s: SluiceServer, ledger: str = "ledger") -> None:
    """Wait until the process has read its starting sums from the ledger (a background task)."""
    await asyncio.wait_for(asyncio.shield(s.runtime.shared("metering.seeded_ledgers", dict)[ledger]), 30)


async def test_in_process_budgets_survive_a_restart_from_the_ledger(upstream: FakeUpstream, tmp_path, caplog):
    """Without Redis a restart forgot the period's spend: every key and team had its whole budget again,
    though the ledger held what each had spent. A new process now starts its sums from the ledger."""
    caplog.set_level("INFO", logger="sluice.metering")
    budgets = [{"scope": "key", "period": "day", "limit": 3.5 * M}, {"scope": "team", "period": "month", "limit": 4.5 * M}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            for _ in range(3):
                await ask(a)
                await s.wait_idle()
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        await _seeded(s)
        assert await _budgets_of(s, "ka", "red") == {("key", "day"): pytest.approx(3 * M), ("team", "month"): pytest.approx(3 * M)}
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a, \
                openai.AsyncOpenAI(base_url=s.url, api_key=KEY_B, max_retries=0) as b:
            with pytest.raises(openai.RateLimitError) as exc:
                await ask(a)  # 3 spent + 1 reserved > 3.5
            assert exc.value.code == "insufficient_quota"
            await ask(b)  # its own key has spent nothing; the team 3 + 1 of 4.5
            await s.wait_idle()
            with pytest.raises(openai.RateLimitError):
                await ask(b)  # the team: 4 spent + 1 reserved > 4.5
    assert len(upstream.requests) == 4
    assert "budgets start from ledger ledger: 4 amounts" in caplog.text  # key ka day and month, team red day and month


async def test_a_reload_does_not_count_the_ledger_again(upstream: FakeUpstream, tmp_path):
    """The sums are seeded once per process and ledger: a new generation finds them kept up to date."""
    budgets = [{"scope": "key", "period": "day", "limit": 100.0}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            await _seeded(s)
            await ask(a)
            await s.wait_idle()
            ok, detail = await s.reload(config(upstream, budgets + [{"scope": "team", "period": "day", "limit": 100.0}]))
            assert ok, detail
            await _seeded(s)  # whatever reading of the ledger the reload started has ended
            assert await _budgets_of(s, "ka", "red") == {("key", "day"): pytest.approx(M), ("team", "day"): pytest.approx(0.0)}
            await ask(a)
            await s.wait_idle()
            assert await _budgets_of(s, "ka", "red") == {("key", "day"): pytest.approx(2 * M), ("team", "day"): pytest.approx(M)}


async def test_an_unreadable_ledger_leaves_budgets_at_zero_and_the_proxy_serving(upstream: FakeUpstream, tmp_path, caplog):
    (tmp_path / "ledger.db").write_bytes(b"this is not a SQLite file " * 100)
    budgets = [{"scope": "key", "period": "day", "limit": 3.5 * M}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        await _seeded(s)
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            r = await ask(a)
            assert r.usage.completion_tokens == M
    assert "cannot read this period's spend from ledger ledger (DatabaseError)" in caplog.text
    assert "Traceback" not in caplog.text


async def test_ledger_spend_sums_this_day_and_month_per_key_and_team(tmp_path):
    """What a restart starts from, on a real ledger: the UTC day and month of ``before`` only, rows without a
    key or team, free rows, rows of other periods and rows of requests started since ``before`` left out."""
    import calendar as cal

    from plugins.metering import LEDGER_COLUMNS, LEDGER_TABLE, ledger_spend, ledger_table
    from proxy.state.sqlite import SQLiteRecords

    rec = SQLiteRecords(tmp_path / "ledger.db")
    rec.ensure(ledger_table())
    n = 0

    def row(day: str, key: str | None, team: str | None, cost: float, ts: float = 0.0) -> None:
        nonlocal n
        n += 1
        values = dict.fromkeys(LEDGER_COLUMNS)
        values.update(id=f"req_{n}", day=day, key_id=key, team=team, cost=cost, ts=ts)
        rec.append_values(LEDGER_TABLE, LEDGER_COLUMNS, tuple(values[c] for c in LEDGER_COLUMNS))

    row("2026-03-15", "ka", "red", 1.0)
    row("2026-03-15", "ka", "red", 0.5)
    row("2026-03-15", "kb", None, 4.0)
    row("2026-03-15", None, "blue", 8.0)
    row("2026-03-15", "kc", "red", 0.0)  # free: no sum of its own
    row("2026-03-01", "ka", "red", 2.0)  # earlier this month
    row("2026-02-28", "ka", "red", 16.0)  # last month
    row("2026-03-16", "ka", "red", 32.0)  # after now (another replica's clock): not yet
    before = cal.timegm((2026, 3, 15, 23, 59, 0))
    row("2026-03-15", "ka", "red", 64.0, ts=before)  # started when this process did: its own, counted as it settles
    try:
        spend: dict = {}
        async for day in ledger_spend(rec, before):
            for k, v in day.items():
                spend[k] = spend.get(k, 0.0) + v
    finally:
        await rec.close()
    assert spend == {
        ("key", "ka", "day"): 1.5, ("key", "ka", "month"): 3.5, ("team", "red", "day"): 1.5, ("team", "red", "month"): 3.5,
        ("key", "kb", "day"): 4.0, ("key", "kb", "month"): 4.0, ("team", "blue", "day"): 8.0, ("team", "blue", "month"): 8.0,
    }


async def test_a_keys_own_budget_holds_beside_a_rule_of_the_same_period(upstream: FakeUpstream, tmp_path):
    """A key/day rule for every key (100) and a key's own budget_per_day (2.5 requests' worth): both share one
    sum, and the key's own was dropped for the rule's limit, so the key could spend 40 times its budget."""
    cfg = config(upstream, [{"scope": "key", "period": "day", "limit": 100.0}])
    cfg["routes"][0]["chain"][0]["auth"]["keys"][0]["limits"] = {"budget_per_day": 2.5 * M}
    async with SluiceServer(cfg, tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            for _ in range(2):
                await ask(a)
                await s.wait_idle()
            with pytest.raises(openai.RateLimitError) as exc:
                await ask(a)
            assert exc.value.code == "insufficient_quota"
        assert await _budgets_of(s, "ka") == {("key", "day"): pytest.approx(2 * M)}


@pytest.mark.redis
async def test_open_policy_counts_the_spend_of_a_request_admitted_while_redis_was_away(tmp_path):
    """budget_on_error: open admits without a reservation "and reconciles once it is back": a request
    admitted while Redis was down, and finished after it came back, was never counted, so every request
    of an outage was free for the budget whatever it cost."""
    async with RedisServer() as rs:
        rt = await make_runtime(tmp_path, config={"state": {"redis": {"url": rs.url, "timeout_ms": 500}}})
        try:
            p = await configure_plugin(Metering, {"ledger": False, "budget_on_error": "open",
                                                  "prices": {"m": {"input": 0, "output": 1e6}}}, runtime=rt)

            def ctx():
                return make_context({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 10},
                                    runtime=rt, identity=Identity(key_id="kx", limits={"budget_per_day": 25.0}))

            c = ctx()
            key = p.applicable(c, __import__("time").time())[0][0]
            await rs.astop()
            await hook(p.on_request, c)  # admitted: Redis is away and the policy is open
            await rs.arestart()
            c.attempts.append(Attempt(Target("up"), start=c.timings.start, status=200))
            c.usage = Usage(1, 7, 8)
            await hook(p.on_done, c)
            assert c.cost == pytest.approx(7.0)
            assert await p.counters.get_sum(key) == pytest.approx(7.0)
        finally:
            await rt.close_all()


class _HoldingRedisLink:
    """A TCP link between Sluice and a real redis-server on 127.0.0.1 that, once a command naming ``trigger``
    has gone through, holds Redis's next answers (Redis has done the work; its answer is late) until released."""

    def __init__(self, redis_port: int, trigger: bytes) -> None:
        self.redis_port, self.trigger = redis_port, trigger
        self.armed, self.holding, self.released = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()
        self.writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aenter__(self) -> "_HoldingRedisLink":
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc) -> None:
        self.released.set()
        self.server.close()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()
        await asyncio.gather(*(w.wait_closed() for w in self.writers), return_exceptions=True)
        await self.server.wait_closed()

    async def _link(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.writers.append(cw)
        rr, rw = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self.writers.append(rw)

        async def up() -> None:
            tail = b""
            while data := await cr.read(65536):
                if not self.armed.is_set() and self.trigger in tail + data:
                    self.armed.set()
                tail = data[-len(self.trigger):]
                rw.write(data)
                await rw.drain()
            rw.close()

        async def down() -> None:
            while data := await rr.read(65536):
                if self.armed.is_set() and not self.released.is_set():
                    self.holding.set()
                    await self.released.wait()
                cw.write(data)
                await cw.drain()
            cw.close()

        for coro in (up(), down()):
            t = asyncio.ensure_future(coro)
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)


@pytest.mark.redis
async def test_a_client_gone_while_redis_answers_a_reservation_leaves_nothing_reserved(upstream: FakeUpstream, tmp_path):
    """The client went away while Redis's answer to its reservation was on its way: the reservation was made,
    but it was in no list to give back, so the request's worst case stayed counted until the period's end
    (a key then got 429 insufficient_quota for money it never spent)."""
    import redis.asyncio as aredis

    from proxy.testing import wait_for

    budgets = [{"scope": "key", "period": "day", "limit": 100.0}]
    async with RedisServer() as rs:
        async with _HoldingRedisLink(rs.port, b"sum:budget:key:ka:") as link:
            async with SluiceServer(config(upstream, budgets, link.url), tmp_path) as s:
                async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_B, max_retries=0) as b:
                    await ask(b)  # scripts loaded, connections open
                await s.wait_idle()
                async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
                    req = asyncio.ensure_future(ask(a, max_tokens=50))
                    await asyncio.wait_for(link.holding.wait(), 10)  # Redis has reserved 50; its answer is held
                    req.cancel()  # the client goes away
                    with pytest.raises(asyncio.CancelledError):
                        await req
                await s.wait_idle()
                link.released.set()
                direct = aredis.Redis.from_url(rs.url)
                try:
                    (key,) = await direct.keys("*sum:budget:key:ka:day:*")  # the request's reservation was made
                    seen: list[float] = []

                    async def nothing_held() -> bool:
                        seen.append(float(await direct.hget(key, "t")))
                        return seen[-1] == 0.0

                    try:
                        await wait_for(nothing_held, 10, "the reservation of the request whose client left to be undone")
                    except AssertionError:
                        pytest.fail(f"the reservation of the request whose client left stayed counted: sum {seen[-1]}")
                finally:
                    await direct.aclose()
    assert len(upstream.requests) == 1


async def test_a_priced_call_that_reserves_nothing_still_counts_against_the_budget(tmp_path):
    """An image generation (gpt-image-1 reports token usage) reserves nothing and is never refused, but its
    real cost went to the ledger and not to the budget's sum: the budget ignored it while the process ran,
    and counted it after a restart (the sums start from the ledger), so a restart changed what a key had spent."""
    from aiohttp import web

    from proxy.testing import serve_app

    async def images(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"created": 1, "data": [{"b64_json": "aGk="}],
                                  "usage": {"input_tokens": 10, "output_tokens": 1000, "total_tokens": 1010,
                                            "input_tokens_details": {"text_tokens": 10, "image_tokens": 0}}})

    app = web.Application()
    app.router.add_post("/v1/images/generations", images)
    async with serve_app(app) as origin:
        cfg = {
            "upstreams": {"img": {"url": f"{origin}/v1"}},
            "prices": {"gpt-image-1": {"input": 5.0, "output": 40.0}},
            "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "img", "chain": [
                {"auth": {"keys": [{"key": KEY_A, "id": "ka", "team": "red"}], "virtual_keys": False}},
                {"metering": {"budgets": [{"scope": "key", "period": "day", "limit": 1.0}]}},
            ]}],
        }
        cost = (10 * 5.0 + 1000 * 40.0) / 1e6
        async with SluiceServer(cfg, tmp_path) as s:
            async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
                await a.images.generate(model="gpt-image-1", prompt="a cat")
            await s.wait_idle()
            live = await _budgets_of(s, "ka")
        async with SluiceServer(cfg, tmp_path) as s:
            await _seeded(s)
            restarted = await _budgets_of(s, "ka")
    assert restarted == {("key", "day"): pytest.approx(cost)}
    assert live == restarted


@pytest.mark.redis
async def test_a_settlement_redis_did_not_answer_is_made_once_it_does(tmp_path):
    """A request's settlement (its worst case given back to its real cost) that Redis did not answer was
    dropped: the worst case stayed counted until the period's end, and the key got 429 for money it never
    spent. Settlements now apply once however often they are sent, so they are retried until Redis answers."""
    from proxy.testing import wait_for

    # an append-only file: the reservation outlives the outage, as in a Redis that restarts or fails over
    async with RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always")) as rs:
        rt = await make_runtime(tmp_path, config={"state": {"redis": {"url": rs.url, "timeout_ms": 500}}})
        try:
            p = await configure_plugin(Metering, {"ledger": False, "prices": {"m": {"input": 0, "output": 1e6}}}, runtime=rt)
            c = make_context({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 20},
                             runtime=rt, identity=Identity(key_id="kx", limits={"budget_per_day": 100.0}))
            key = p.applicable(c, __import__("time").time())[0][0]
            await hook(p.on_request, c)
            assert await p.counters.get_sum(key) == pytest.approx(20.0)  # the worst case: 20 output tokens
            await rs.astop()
            c.attempts.append(Attempt(Target("up"), start=c.timings.start, status=200))
            c.usage = Usage(1, 7, 8)
            await hook(p.on_done, c)  # the settlement finds Redis away
            # the repair waiting in the background holds the counters, not the instance: a reload frees it
            counters, repairs, gone = p.counters, p._repairs, weakref.ref(p)
            assert repairs.n == 1
            await p.stop()
            del p, c
            gc.collect()
            assert gone() is None
            await rs.arestart()

            async def settled() -> bool:
                try:
                    return await counters.get_sum(key) == pytest.approx(7.0)
                except StateUnavailable:
                    return False

            await wait_for(settled, 30, "the settlement to reach Redis once it is back")
            await wait_for(lambda: repairs.n == 0, 30, "the settlement's second send (after a lost answer) to end")
            assert await counters.get_sum(key) == pytest.approx(7.0)  # sent twice, applied once
        finally:
            await rt.close_all()


async def test_two_rules_over_one_key_and_period_share_one_sum_counted_once(upstream: FakeUpstream, tmp_path):
    """A key/day rule for every key and a key/day rule for some ids (allowed: not "the same ids") name the same
    sum: the request was reserved on it twice, settled once (the second settlement finds its mark gone), so
    one request of cost M left 2M counted, and the key was refused at half its budget."""
    budgets = [{"scope": "key", "period": "day", "limit": 100.0},
               {"scope": "key", "period": "day", "limit": 2.5 * M, "ids": ["ka"]}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            await ask(a)
            await s.wait_idle()
            assert await _budgets_of(s, "ka") == {("key", "day"): pytest.approx(M)}
            await ask(a)  # 1 spent + 1 reserved <= 2.5: admitted
            await s.wait_idle()
            with pytest.raises(openai.RateLimitError):
                await ask(a)  # 2 spent + 1 reserved > 2.5


async def test_admin_budgets_lists_each_budget_once_while_a_reload_drains(upstream: FakeUpstream, tmp_path):
    """/admin/budgets read every live metering instance: while a reload's retired config still drained (a stream
    in flight), each budget was listed twice."""
    budgets = [{"scope": "key", "period": "day", "limit": 100.0}]
    async with SluiceServer(config(upstream, budgets), tmp_path) as s:
        async with openai.AsyncOpenAI(base_url=s.url, api_key=KEY_A, max_retries=0) as a:
            upstream.token_delay = 0.5
            stream = await a.chat.completions.create(
                model="sluice-demo", stream=True, max_tokens=M, messages=[{"role": "user", "content": LONG}])
            await stream.__anext__()  # the old config is busy until this stream ends
            ok, msg = await s.reload(config(upstream, budgets))
            assert ok, msg
            import aiohttp

            async with aiohttp.ClientSession(headers={"authorization": f"Bearer {s.admin_token}"}) as http:
                async with http.get(f"{s.admin_url}/admin/budgets", params={"key": "ka"}) as r:
                    assert r.status == 200
                    rows = (await r.json())["budgets"]
            assert [(b["scope"], b["period"]) for b in rows] == [("key", "day")]
            await stream.close()
