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


@pytest.mark.redis
async def test_a_marked_add_is_undone_exactly_once_in_redis_as_in_memory(redis_server, clock, key_prefix):
    """A reservation is recorded under a mark: undone once however often the undo is asked (an add whose
    answer was lost may or may not have been made), and not at all once it was settled."""
    from proxy.state.redis import RedisCounters, RedisGuard, close_client, connect

    cfg = RedisConfig(url=redis_server.url, timeout_ms=2000)
    client = connect(cfg)
    try:
        end = clock.now + 3600
        for counters in (RedisCounters(RedisGuard(client, cfg), key_prefix, clock=clock), MemoryCounters(clock)):
            assert (await counters.add_sum("b", 1.0, 10, end)).allowed  # spent, no mark
            assert (await counters.add_sum("b", 4.0, 10, end, mark="req_a")).allowed
            assert (await counters.add_sum("b", 2.0, 10, end, mark="req_b")).allowed
            await counters.undo_sum("b", "req_a")
            await counters.undo_sum("b", "req_a")  # again: nothing more
            await counters.undo_sum("b", "req_never")  # an add that was never made: nothing
            assert await counters.get_sum("b") == 3.0
            # req_b settles at 0.5 (a refund of 1.5): its mark goes, so a late undo takes nothing back
            await counters.add_sum("b", -1.5, None, end, unmark="req_b")
            await counters.undo_sum("b", "req_b")
            assert await counters.get_sum("b") == 1.5
            # a new period drops the old one's marks
            assert (await counters.add_sum("c", 4.0, 10, end, mark="req_c")).allowed
            clock.advance(3601)
            assert (await counters.add_sum("c", 1.0, 10, clock.now + 3600)).allowed
            await counters.undo_sum("c", "req_c")
            assert await counters.get_sum("c") == 1.0
            clock.now -= 3601
    finally:
        await close_client(client)


@pytest.mark.redis
async def test_a_settlement_applies_once_and_not_after_an_undo_in_redis_as_in_memory(redis_server, clock, key_prefix):
    """A settlement (an add that unmarks a reservation) sent again because its answer was lost applied twice:
    it now applies only while the reservation's record is there, so it can be retried safely."""
    from proxy.state.redis import RedisCounters, RedisGuard, close_client, connect

    cfg = RedisConfig(url=redis_server.url, timeout_ms=2000)
    client = connect(cfg)
    try:
        end = clock.now + 3600
        for counters in (RedisCounters(RedisGuard(client, cfg), key_prefix, clock=clock), MemoryCounters(clock)):
            assert (await counters.add_sum("s", 5.0, 10, end, mark="req_a")).allowed  # reserved 5
            for _ in range(3):  # settled at 2 (-3), sent three times
                assert (await counters.add_sum("s", -3.0, None, end, unmark="req_a")).allowed
            assert await counters.get_sum("s") == 2.0
            assert (await counters.add_sum("s", 4.0, 10, end, mark="req_b")).allowed
            await counters.undo_sum("s", "req_b")  # given back (the request was refused elsewhere)
            await counters.add_sum("s", 1.0, None, end, unmark="req_b")  # a late settlement: nothing to settle
            assert await counters.get_sum("s") == 2.0
            await counters.add_sum("s", 0.5, None, end)  # an add with no mark to settle always applies
            assert await counters.get_sum("s") == 2.5
    finally:
        await close_client(client)
