"""Budget sums agree across backends at any amount: Redis keeps full precision, as memory does."""

from __future__ import annotations

import pytest

from proxy.config import RedisConfig
from proxy.state.memory import MemoryCounters


@pytest.mark.redis
async def test_tiny_amounts_accumulate_in_redis_as_in_memory(redis_server, clock, key_prefix):
    from proxy.state.redis import RedisCounters, RedisGuard, close_client, connect

    cfg = RedisConfig(url=redis_server.url, timeout_ms=2000)
    client = connect(cfg)
    try:
        redis = RedisCounters(RedisGuard(client, cfg), key_prefix, clock=clock)
        memory = MemoryCounters(clock)
        end = clock.now + 3600
        # a 20-token text-embedding-3-small request costs 4e-7, then 7e-7 (two rounding cases),
        # then a reconciliation's tiny refund, and limits checked near the total
        steps = [(4e-7, 1.0)] * 300 + [(7e-7, 1.0)] * 300 + [(-1e-7, None)] * 50 + [(3e-9, 1e-3)] * 50
        for amount, limit in steps:
            r = await redis.add_sum("budget", amount, limit, end)
            m = await memory.add_sum("budget", amount, limit, end)
            assert (r.allowed, r.total) == (m.allowed, m.total)
        assert await redis.get_sum("budget") == await memory.get_sum("budget")
        assert await redis.get_sum("budget") == pytest.approx(300 * 4e-7 + 300 * 7e-7 - 50 * 1e-7 + 50 * 3e-9, rel=1e-12)
        # the atomic check is the same comparison on the same doubles: a limit at the exact total admits
        total = await memory.get_sum("budget")
        for counters in (redis, memory):
            assert (await counters.add_sum("budget", 1e-9, total + 1e-9, end)).allowed
            assert not (await counters.add_sum("budget", 1e-9, total + 1e-9, end)).allowed
    finally:
        await close_client(client)
