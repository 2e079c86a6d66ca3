"""Counters behave the same on every backend: GCRA bursts and refill, all-or-nothing, leases, sums."""

from __future__ import annotations

import random

import pytest

from proxy.config import RedisConfig
from proxy.state.base import Limit
from proxy.state.memory import MemoryCounters

BACKENDS = ["memory", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
async def counters(request, clock, key_prefix):
    if request.param == "memory":
        yield MemoryCounters(clock)
        return
    from proxy.state.redis import RedisCounters, RedisGuard, close_client, connect

    rs = request.getfixturevalue("redis_server")
    cfg = RedisConfig(url=rs.url, timeout_ms=2000)
    client = connect(cfg)
    yield RedisCounters(RedisGuard(client, cfg), key_prefix, clock=clock)
    await close_client(client)


async def test_burst_of_limit_then_refused(counters):
    for i in range(5):
        d = await counters.acquire([Limit("k", 5, 60)])
        assert d.allowed, i
        assert d.statuses[0].remaining == pytest.approx(4 - i, abs=1e-3)
    d = await counters.acquire([Limit("k", 5, 60)])
    assert not d.allowed
    assert d.refused == Limit("k", 5, 60)
    assert d.retry_after_s == pytest.approx(12.0, abs=1e-3)
    assert d.statuses[0].remaining == pytest.approx(0, abs=1e-3)
    assert d.statuses[0].reset_s == pytest.approx(60.0, abs=1e-3)


async def test_peek_says_what_acquire_would_and_takes_nothing(counters, clock):
    lim = Limit("p", 3, 30)
    assert (await counters.peek(lim)).allowed  # an untouched bucket
    for _ in range(2):
        assert (await counters.acquire([lim])).allowed
    for _ in range(5):  # one whole unit left, however often it is looked at
        assert (await counters.peek(lim)).allowed
    assert (await counters.acquire([lim])).allowed
    d = await counters.peek(lim)
    assert not d.allowed and d.refused == lim and d.retry_after_s == pytest.approx(10.0, abs=1e-3)
    assert (await counters.acquire([lim])).retry_after_s == pytest.approx(d.retry_after_s, abs=1e-3)
    clock.advance(9.9)
    assert not (await counters.peek(lim)).allowed  # part of a unit is not one
    clock.advance(0.2)
    assert (await counters.peek(lim)).allowed and (await counters.acquire([lim])).allowed
    assert not (await counters.peek(Limit("p", 3, 30, 2.0))).allowed  # a cost of two does not fit


async def test_refills_steadily(counters, clock):
    for _ in range(5):
        assert (await counters.acquire([Limit("k", 5, 60)])).allowed
    clock.advance(11.9)
    assert not (await counters.acquire([Limit("k", 5, 60)])).allowed
    clock.advance(0.2)
    assert (await counters.acquire([Limit("k", 5, 60)])).allowed
    assert not (await counters.acquire([Limit("k", 5, 60)])).allowed
    clock.advance(60)
    admitted = [(await counters.acquire([Limit("k", 5, 60)])).allowed for _ in range(6)]
    assert admitted == [True] * 5 + [False]


async def test_no_double_admission_at_a_boundary(counters, clock):
    """Whatever the arrivals, any window of d seconds admits at most N + d * N / period."""
    rng = random.Random(7)
    limit, period = 10, 6.0
    admitted: list[float] = []
    start = clock.now
    while clock.now - start < 30:
        clock.advance(rng.expovariate(8.0))
        if (await counters.acquire([Limit("b", limit, period)])).allowed:
            admitted.append(clock.now)
    assert len(admitted) > 40  # the limit was actually exercised, not starved
    for i, t0 in enumerate(admitted):
        for j in range(i, len(admitted)):
            d = admitted[j] - t0
            assert j - i + 1 <= limit + d * limit / period + 1e-6
    # a fixed window admits 2N around its edge: N just before and N just after
    clock.advance(100)
    before = sum([(await counters.acquire([Limit("e", limit, period)])).allowed for _ in range(limit)])
    clock.advance(0.2)
    after = sum([(await counters.acquire([Limit("e", limit, period)])).allowed for _ in range(limit)])
    assert before == limit and after == 0


async def test_weighted_cost_and_oversized_cost(counters):
    d = await counters.acquire([Limit("tpm", 1000, 60, cost=600)])
    assert d.allowed and d.statuses[0].remaining == pytest.approx(400, abs=0.1)
    d = await counters.acquire([Limit("tpm", 1000, 60, cost=500)])
    assert not d.allowed and d.retry_after_s == pytest.approx(6.0, abs=1e-3)
    d = await counters.acquire([Limit("big", 1000, 60, cost=1001)])
    assert not d.allowed and d.retry_after_s == pytest.approx(60.0)


async def test_all_or_nothing(counters):
    wide, narrow = Limit("team", 10, 60), Limit("key", 2, 60)
    assert (await counters.acquire([wide, narrow])).allowed
    assert (await counters.acquire([wide, narrow])).allowed
    d = await counters.acquire([wide, narrow])
    assert not d.allowed and d.refused == narrow
    # the refused request took nothing from the wider limit: 8 remain
    d = await counters.acquire([Limit("team", 10, 60, cost=8)])
    assert d.allowed and d.statuses[0].remaining == pytest.approx(0, abs=1e-3)


async def test_same_key_twice_in_one_acquire_counts_both(counters):
    d = await counters.acquire([Limit("x", 3, 60, cost=2), Limit("x", 3, 60, cost=2)])
    assert not d.allowed
    assert (await counters.acquire([Limit("x", 3, 60, cost=3)])).allowed


async def test_adjust_gives_back_and_overdraws(counters, clock):
    assert (await counters.acquire([Limit("t", 100, 60, cost=100)])).allowed
    await counters.adjust([Limit("t", 100, 60, cost=-30)])
    d = await counters.acquire([Limit("t", 100, 60, cost=30)])
    assert d.allowed and d.statuses[0].remaining == pytest.approx(0, abs=1e-2)
    # reconcile past the limit: the bucket goes into debt and waits longer
    await counters.adjust([Limit("t", 100, 60, cost=50)])
    d = await counters.acquire([Limit("t", 100, 60, cost=1)])
    assert not d.allowed and d.retry_after_s == pytest.approx(30.6, abs=1e-2)
    # giving back more than was taken leaves a full bucket, never more
    clock.advance(1000)
    await counters.adjust([Limit("t", 100, 60, cost=-500)])
    d = await counters.acquire([Limit("t", 100, 60, cost=100)])
    assert d.allowed
    assert not (await counters.acquire([Limit("t", 100, 60, cost=1)])).allowed


async def test_leases(counters, clock):
    a = await counters.lease("c", 2, ttl_s=30)
    b = await counters.lease("c", 2, ttl_s=30)
    assert a and b and a != b
    assert await counters.lease("c", 2, ttl_s=30) is None
    await counters.release("c", a)
    c = await counters.lease("c", 2, ttl_s=30)
    assert c is not None
    assert await counters.lease("c", 2, ttl_s=30) is None
    clock.advance(31)  # a crashed holder's slots come back after the TTL
    assert await counters.lease("c", 2, ttl_s=30) is not None
    assert await counters.lease("c", 2, ttl_s=30) is not None
    assert await counters.lease("c", 2, ttl_s=30) is None


async def test_sums(counters, clock):
    end = clock.now + 100
    s = await counters.add_sum("budget", 6, 10, end)
    assert s.allowed and s.total == pytest.approx(6)
    s = await counters.add_sum("budget", 5, 10, end)
    assert not s.allowed and s.total == pytest.approx(6)
    s = await counters.add_sum("budget", 4, 10, end)
    assert s.allowed and s.total == pytest.approx(10)
    s = await counters.add_sum("budget", -2, 10, end)  # a refund always applies
    assert s.allowed and s.total == pytest.approx(8)
    s = await counters.add_sum("budget", 1000, None, end)
    assert s.allowed and s.total == pytest.approx(1008)
    assert await counters.get_sum("budget") == pytest.approx(1008)
    assert await counters.get_sum("nothing") == 0
    clock.advance(101)  # a new period starts from zero
    assert await counters.get_sum("budget") == 0
    s = await counters.add_sum("budget", 3, 10, clock.now + 100)
    assert s.allowed and s.total == pytest.approx(3)


async def test_a_refused_decision_reports_buckets_as_they_stand(counters):
    wide, narrow = Limit("w", 100, 60, cost=10), Limit("n", 1, 60)
    assert (await counters.acquire([wide, narrow])).allowed
    d = await counters.acquire([wide, narrow])
    assert not d.allowed
    by_key = {s.limit.key: s for s in d.statuses}
    assert by_key["w"].remaining == pytest.approx(90, abs=0.01)  # not 80: the refusal took nothing
    assert by_key["n"].remaining == pytest.approx(0, abs=0.01)


async def test_admit_takes_limits_and_leases_together_or_nothing(counters, clock):
    rpm = Limit("r", 10, 60)
    d, tokens = await counters.admit([rpm], [("c", 1, 30.0)])
    assert d.allowed and len(tokens) == 1
    d, tokens2 = await counters.admit([rpm], [("c", 1, 30.0)])
    assert not d.allowed and tokens2 == [] and d.refused == Limit("c", 1, 30.0, 1.0)
    # the refused admission took nothing from the request bucket: 9 remain
    d = await counters.acquire([Limit("r", 10, 60, cost=9)])
    assert d.allowed
    # a refused limit takes no lease either
    d, tokens3 = await counters.admit([rpm], [("c2", 1, 30.0)])
    assert not d.allowed and d.refused == rpm
    assert await counters.lease("c2", 1, 30.0) is not None
    # settle gives back tokens and the slot in one step
    await counters.settle([Limit("r", 10, 60, cost=-10)], [("c", tokens[0])])
    d, more = await counters.admit([Limit("r", 10, 60, cost=10)], [("c", 1, 30.0)])
    assert d.allowed and len(more) == 1
    clock.advance(31)  # an unreleased slot frees itself after its TTL
    d, _ = await counters.admit([], [("c", 1, 30.0)])
    assert d.allowed


async def test_memory_counters_forget_full_buckets(clock):
    """Buckets of clients that went away are swept, so memory follows the active set."""
    c = MemoryCounters(clock)
    for i in range(10_000):
        await c.acquire([Limit(f"gone:{i}", 10, 60)])
    assert len(c._tat) == 10_000
    clock.advance(61)  # every bucket has refilled: each is now the same as absent
    for i in range(20_000):
        await c.acquire([Limit("active", 1e9, 60)])
    assert len(c._tat) == 1


async def test_an_admission_carries_earlier_settlements(counters):
    d, first = await counters.admit([Limit("t", 100, 60, cost=100)], [("c", 1, 30.0)])
    assert d.allowed
    # refused for its own sake, but the carried settlement (refund 40, free the slot) applies
    d, _ = await counters.admit([Limit("t", 100, 60, cost=50)], [], ([Limit("t", 100, 60, cost=-40)], [("c", first[0])]))
    assert not d.allowed
    assert d.statuses[0].remaining == pytest.approx(40, abs=0.01)
    d, again = await counters.admit([Limit("t", 100, 60, cost=40)], [("c", 1, 30.0)])
    assert d.allowed and again


# -- the memory backend's synchronous fast path (take_now / give_back_now) ------------


def _bucket(lim: Limit, tokens: bool = False) -> tuple[str, float, float, bool]:
    return (lim.key, lim.period_s / lim.limit, lim.period_s, tokens)


async def test_take_now_agrees_with_admit_step_by_step(clock):
    """The fast path and the general step, fed the same random traffic, take and report the same."""
    rng = random.Random(11)
    fast, slow = MemoryCounters(clock), MemoryCounters(clock)
    r, t, g = Limit("r", 20, 60), Limit("t", 5000, 60), Limit("g", 50, 60)
    buckets = [_bucket(r), _bucket(t, tokens=True), _bucket(g)]
    held_fast: list[tuple[str, str]] = []
    held_slow: list[tuple[str, str]] = []
    for step in range(400):
        clock.advance(rng.random() * 0.8)
        cost = rng.randint(1, 600)
        got = fast.take_now(buckets, cost, [("c", 3, 30.0)])
        d, tokens = slow.admit_now([r, Limit("t", 5000, 60, cost), g], [("c", 3, 30.0)])
        assert (got is not None) == d.allowed, step
        if got is not None:
            figures, taken = got
            assert [k for k, _ in taken] == ["c"]
            for i, st in enumerate(d.statuses):
                assert max(0.0, figures[3 * i]) == pytest.approx(st.remaining, abs=1e-6)
                assert figures[3 * i + 1] == pytest.approx(st.reset_s, abs=1e-6)
            held_fast += taken
            held_slow += [("c", tokens[0])]
        if held_fast and rng.random() < 0.6:  # finish one: give back part of its tokens, free its slot
            back = -float(rng.randint(0, 300))
            fast.give_back_now([buckets[1]], back, [held_fast.pop(0)])
            slow.settle_now([Limit("t", 5000, 60, back)], [held_slow.pop(0)])
        assert fast._tat == pytest.approx(slow._tat)
        assert {k: len(v) for k, v in fast._leases.items()} == {k: len(v) for k, v in slow._leases.items()}


async def test_take_now_is_all_or_nothing(clock):
    c = MemoryCounters(clock)
    r, t = Limit("r", 10, 60), Limit("t", 100, 60)
    both = [_bucket(r), _bucket(t, tokens=True)]
    assert c.take_now(both, 90, [("c", 1, 30.0)]) is not None
    before = dict(c._tat)
    # tokens would overflow: nothing is taken, not the request, not a slot of another lease set
    assert c.take_now(both, 20, [("c2", 1, 30.0)]) is None
    assert c._tat == before and "c2" not in c._leases
    # a full lease set refuses before any bucket is touched
    assert c.take_now([_bucket(r)], 0, [("c", 1, 30.0)]) is None
    assert c._tat == before
    # the general step says why
    d, _ = c.admit_now([r, Limit("t", 100, 60, 20)], [])
    assert not d.allowed and d.refused.key == "t"


async def test_give_back_now_frees_slots_and_may_overdraw(clock):
    c = MemoryCounters(clock)
    t = _bucket(Limit("t", 100, 60), tokens=True)
    got = c.take_now([t], 50, [("c", 1, 30.0)])
    assert got is not None
    c.give_back_now([t], 80.0, got[1])  # used 80 more than reserved: in debt
    assert c.take_now([t], 1, [("c", 1, 30.0)]) is None  # 130 of 100 used
    clock.advance(19)  # 30 of debt plus 1 refilled in 18.6 s
    assert c.take_now([t], 1, [("c", 1, 30.0)]) is not None  # and the slot was free


def test_redis_commands_are_packed_as_redis_py_packs_them():
    """The script lane writes RESP itself: byte for byte what redis-py's Connection.pack_command writes."""
    from redis.asyncio.connection import Connection

    from proxy.state.redis import _num, _pack

    c = Connection()
    for args in [("EVALSHA", "0" * 40, 3, "k1", "k:é", "1.0 2.5 -3", "-1"), ("EVAL", "return 1", 0), ("GET", b"raw\x00")]:
        assert _pack(args) == b"".join(c.pack_command(*args))
    assert [_num(x) for x in (1, 1.0, 60, 1e10, 1040.0, -900.0, 1e-06)] == [repr(float(x)) for x in (1, 1.0, 60, 1e10, 1040.0, -900.0, 1e-06)]
