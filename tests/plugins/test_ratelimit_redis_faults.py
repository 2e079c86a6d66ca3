"""ratelimit on Redis when Redis is away or slow just as a request ends or its client leaves: a concurrency
slot is given back once Redis answers, never left to its lease's TTL (15 minutes by default), during which
a key limited to one request in flight was refused on every replica with nothing in flight.

Redis keeps its data through these faults: a relay in front of it cuts connections or holds its replies.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as aioredis

from plugins.ratelimit import RateLimit
from proxy import Attempt, Identity, ProxyError, StateUnavailable, Target, Usage
from proxy.testing import configure_plugin, make_context, make_runtime, wait_for
from tests.redis_relay import RedisRelay

pytestmark = [pytest.mark.redis]
CHAT = {"model": "sluice-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
KEY = Identity(key_id="k1")


def finished(ctx) -> None:
    ctx.attempts.append(Attempt(Target("up"), start=ctx.timings.start, status=200))
    ctx.status, ctx.outcome = 200, "ok"
    ctx.usage = Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8)


async def runtime(url: str, prefix: str):
    return await make_runtime(config={"state": {"redis": {"url": url, "timeout_ms": 500, "breaker_failures": 1000,
                                                          "key_prefix": prefix}}})


def admits(plugin: RateLimit, rt) -> object:
    """A condition: a new request of the key is admitted (and then ends, so the next check can be admitted too)."""
    async def check() -> bool:
        ctx = make_context(CHAT, identity=KEY, runtime=rt)
        try:
            await plugin.on_request(ctx)
        except (ProxyError, StateUnavailable):
            return False
        return True
    return check


async def test_a_settlement_redis_did_not_take_releases_its_slot_once_redis_answers(redis_server):
    """settle_delay_ms 0: on_done's one settlement met a cut connection and was dropped."""
    async with RedisRelay(redis_server.port) as relay:
        rt = await runtime(relay.url, f"f{time.monotonic_ns()}:")
        try:
            rl = await configure_plugin(RateLimit, {"concurrency": 1, "settle_delay_ms": 0, "backend": "redis"}, runtime=rt)
            first = make_context(CHAT, identity=KEY, runtime=rt)
            await rl.on_request(first)
            relay.cut()  # Redis away just as the request ends
            finished(first)
            with pytest.raises(StateUnavailable):
                await rl.on_done(first)  # the core logs and counts it as the plugin's error
            relay.restore()
            await wait_for(admits(rl, rt), 10, "the ended request's slot to be free again")
        finally:
            await rt.close_all()


async def test_a_batched_settlement_that_failed_is_sent_again_without_new_traffic(redis_server):
    """settle_delay_ms 50 (the default): a failed send waited for this process's next admission to carry it,
    while another process on the same Redis was refused the slot."""
    prefix = f"f{time.monotonic_ns()}:"
    async with RedisRelay(redis_server.port) as relay:
        rt_a, rt_b = await runtime(relay.url, prefix), await runtime(redis_server.url, prefix)
        try:
            a = await configure_plugin(RateLimit, {"concurrency": 1, "backend": "redis"}, runtime=rt_a)
            b = await configure_plugin(RateLimit, {"concurrency": 1, "backend": "redis"}, runtime=rt_b)
            first = make_context(CHAT, identity=KEY, runtime=rt_a)
            await a.on_request(first)
            relay.cut()
            finished(first)
            a.on_done(first)  # queued; the send after settle_delay_ms fails
            await wait_for(lambda: a._flush_task is None and not a._pend_release, 10, "A's send to have failed")
            relay.restore()
            await wait_for(admits(b, rt_b), 10, "B to get the slot of A's ended request")
        finally:
            await rt_a.close_all()
            await rt_b.close_all()


async def test_an_admission_whose_client_left_while_redis_ran_it_releases_its_slot(redis_server):
    """The handler is cancelled when its client leaves; the admission script had reached Redis and taken the
    slot, but only a timeout (not a cancellation) released it in the background."""
    prefix = f"f{time.monotonic_ns()}:"
    lease_key = prefix + "c:lease:rl:ratelimit:k:k1:c"
    direct = aioredis.Redis.from_url(redis_server.url)
    async with RedisRelay(redis_server.port) as relay:
        rt = await make_runtime(config={"state": {"redis": {"url": relay.url, "timeout_ms": 5000, "key_prefix": prefix}}})
        try:
            rl = await configure_plugin(RateLimit, {"concurrency": 1, "backend": "redis"}, runtime=rt)
            await rl.on_request(make_context(CHAT, identity=Identity(key_id="warm"), runtime=rt))  # a connection open
            relay.replies.clear()  # Redis runs the script; its answer is held
            ctx = make_context(CHAT, identity=KEY, runtime=rt)
            admission = asyncio.ensure_future(rl.on_request(ctx))
            await wait_for(lambda: direct.zcard(lease_key), 10, "the admission to have run on Redis")
            admission.cancel()  # the client left: the handler, in this await, is cancelled
            with pytest.raises(asyncio.CancelledError):
                await admission
            relay.replies.set()
            rl.on_done(ctx)  # the handler's finally (settlements batched: a plain function): nothing was stashed
            await wait_for(admits(rl, rt), 10, "the cancelled admission's slot to be free again")
        finally:
            await rt.close_all()
            await direct.aclose()
