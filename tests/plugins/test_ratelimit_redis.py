"""ratelimit on Redis: exact across two Sluice processes, and bounded when Redis stops and comes back."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest
import redis.asyncio as aioredis

from plugins._tokens import count_prompt_tokens
from proxy.testing import FakeUpstream, RedisServer, SluiceProcess, SluiceServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

BODY = {"model": "sluice-demo", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 100}
RESERVED = count_prompt_tokens(BODY) + 100
RPM, TOKENS_FOR, CONCURRENCY = 20, 10, 3
KEYS = {
    "rpm": ("sk-test-rpm-aaaaaaaaaaaa", {"requests_per_minute": RPM}),
    "tpm": ("sk-test-tpm-bbbbbbbbbbbb", {"tokens_per_minute": TOKENS_FOR * RESERVED}),
    "conc": ("sk-test-conc-cccccccccccc", {"concurrency": CONCURRENCY}),
}


def _config(up: FakeUpstream, redis_url: str) -> dict:
    return {
        "state": {"redis": {"url": redis_url, "timeout_ms": 2000}},
        "upstreams": {"up": {"url": up.url}},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "up", "chain": [
            {"auth": {"keys": [{"key": k, "id": name, "limits": lim} for name, (k, lim) in KEYS.items()]}},
            {"ratelimit": {"backend": "redis"}},
        ]}],
    }


async def _burst(urls: list[str], key: str, n: int) -> tuple[list[bool], float, float]:
    """``n`` requests at once from ``n`` clients spread over ``urls``: (admitted?, elapsed, last refusal)."""
    clients = [openai.AsyncOpenAI(base_url=urls[i % len(urls)], api_key=key, max_retries=0, timeout=30) for i in range(n)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    last_refusal = 0.0

    async def one(c: openai.AsyncOpenAI) -> bool:
        nonlocal last_refusal
        try:
            await c.chat.completions.create(**BODY)
            return True
        except openai.RateLimitError:
            last_refusal = max(last_refusal, loop.time() - t0)
            return False

    try:
        results = await asyncio.gather(*[one(c) for c in clients])
    finally:
        for c in clients:
            await c.close()
    return results, loop.time() - t0, last_refusal


async def test_limits_are_exact_across_two_processes(tmp_path, redis_server):
    async with FakeUpstream() as up:
        # answers take a while: every decision of a burst is made before any reservation is reconciled
        up.first_byte_delay = 3.0
        cfg = _config(up, redis_server.url)
        cfg["state"]["redis"]["key_prefix"] = f"x{time.monotonic_ns()}:"
        async with SluiceProcess(cfg, tmp_path / "a") as a, SluiceProcess(cfg, tmp_path / "b") as b:
            urls = [a.url, b.url]

            ok, elapsed, last_refusal = await _burst(urls, KEYS["rpm"][0], 3 * RPM)
            assert last_refusal < up.first_byte_delay
            refill = int(elapsed * RPM / 60)
            assert RPM <= sum(ok) <= RPM + refill, (sum(ok), elapsed)
            assert len(up.requests) == sum(ok)

            seen = len(up.requests)
            ok, elapsed, last_refusal = await _burst(urls, KEYS["tpm"][0], 3 * TOKENS_FOR)
            assert last_refusal < up.first_byte_delay
            refill = int(elapsed * TOKENS_FOR / 60)  # in requests' worth of tokens
            assert TOKENS_FOR <= sum(ok) <= TOKENS_FOR + refill, (sum(ok), elapsed)
            assert len(up.requests) - seen == sum(ok)

            ok, _, last_refusal = await _burst(urls, KEYS["conc"][0], 4 * CONCURRENCY)
            assert last_refusal < up.first_byte_delay
            assert sum(ok) == CONCURRENCY
            # the slots come back once those answers are done (within settle_delay_ms), on either process
            slots = cfg["state"]["redis"]["key_prefix"] + "c:lease:rl:ratelimit:k:conc:c"
            client = aioredis.Redis.from_url(redis_server.url)
            try:
                async with asyncio.timeout(5):
                    while await client.zcard(slots):
                        await asyncio.sleep(0.02)  # polling Redis, where the other processes release
            finally:
                await client.aclose()
            ok, _, _ = await _burst(urls, KEYS["conc"][0], CONCURRENCY)
            assert sum(ok) == CONCURRENCY


async def test_redis_stopped_and_restarted_under_load(tmp_path):
    """Fail open on /v1/, closed on /v2/: nothing hangs past the timeout, both recover."""
    async with RedisServer() as rs, FakeUpstream() as up:
        rl = {"requests_per_minute": 1_000_000, "backend": "redis"}
        cfg = {
            "state": {"redis": {"url": rs.url, "timeout_ms": 100, "breaker_failures": 3, "breaker_cooldown_s": 0.3}},
            "upstreams": {"up": {"url": up.url}},
            "routes": [
                {"match": {"path": "/v1/"}, "upstream": "up", "chain": [{"ratelimit": {**rl, "on_error": "open"}}]},
                {"match": {"path": "/v2/"}, "upstream": "up", "chain": [{"ratelimit": {**rl, "on_error": "closed"}}]},
            ],
        }
        async with SluiceServer(cfg, tmp_path) as s:
            counts = {("open", 200): 0, ("open", 503): 0, ("closed", 200): 0, ("closed", 503): 0}
            worst = 0.0
            stop = asyncio.Event()
            unexpected: list[str] = []

            async def worker(kind: str, base: str) -> None:
                nonlocal worst
                async with openai.AsyncOpenAI(base_url=base, api_key="x", max_retries=0, timeout=10) as c:
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        try:
                            await c.chat.completions.create(**BODY)
                            counts[(kind, 200)] += 1
                        except openai.APIStatusError as e:
                            if e.status_code != 503 or e.body.get("code") != "state_unavailable":
                                unexpected.append(f"{kind} {e.status_code} {e.body}")
                            counts[(kind, 503)] += 1
                        except openai.APIError as e:
                            unexpected.append(f"{kind} {type(e).__name__}")
                        worst = max(worst, time.perf_counter() - t0)

            async def until(pred) -> None:
                while not pred():
                    await asyncio.sleep(0.02)  # polling shared counters the workers update

            tasks = [asyncio.create_task(worker("open", s.url)) for _ in range(4)]
            tasks += [asyncio.create_task(worker("closed", s.origin + "/v2")) for _ in range(4)]
            try:
                async with asyncio.timeout(60):
                    await until(lambda: counts[("open", 200)] >= 20 and counts[("closed", 200)] >= 20)
                    await rs.astop()
                    base = dict(counts)
                    await until(lambda: counts[("closed", 503)] >= 20 and counts[("open", 200)] >= base[("open", 200)] + 20)
                    await rs.arestart()
                    base = dict(counts)
                    await until(lambda: counts[("closed", 200)] >= base[("closed", 200)] + 20)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
            assert not unexpected, unexpected[:5]
            assert counts[("open", 503)] == 0  # fail open: Redis down never reached a client
            assert worst < 2.0, worst  # a 100 ms Redis timeout, with room for a busy test machine


async def test_settlements_ride_on_the_next_admission(redis_server, tmp_path):
    from plugins.ratelimit import RESERVATION, RateLimit
    from proxy import Attempt, Identity, Target, Usage
    from proxy.testing import configure_plugin, make_context, make_runtime

    rt = await make_runtime(tmp_path, redis_url=redis_server.url)
    client = aioredis.Redis.from_url(redis_server.url)
    who = Identity(key_id=f"carry-{time.monotonic_ns()}")

    async def scripts() -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))

    try:
        rl = await configure_plugin(RateLimit, {"tokens_per_minute": 100_000, "concurrency": 1, "settle_delay_ms": 5000}, runtime=rt)
        before = await scripts()
        first = make_context(BODY, identity=who, runtime=rt)
        await rl.on_request(first)
        reserved = first.stash[RESERVATION].tokens
        first.attempts.append(Attempt(Target("up"), start=0.0, status=200))
        first.status, first.usage = 200, Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
        rl.on_done(first)  # held back: nothing sent yet (a plain function: it only queues)
        assert await scripts() == before + 1
        second = make_context(BODY, identity=who, runtime=rt)
        await rl.on_request(second)  # the slot of the first came back inside this same script
        assert await scripts() == before + 2
        left = int(second.response_headers["x-ratelimit-remaining-tokens"])
        assert 100_000 - 5 - reserved - 2 <= left <= 100_000 - 5 - reserved + 200  # the refund applied (plus refill)
        second.attempts.append(Attempt(Target("up"), start=0.0, status=500))
        second.status = 500
        rl.on_done(second)
        await rl.stop()  # a retired chain sends what it held
        assert await scripts() == before + 3
        third = make_context(BODY, identity=who, runtime=rt)
        await rl.on_request(third)
        assert int(third.response_headers["x-ratelimit-remaining-tokens"]) >= 100_000 - 5 - reserved
    finally:
        await client.aclose()
        await rt.close_all()
