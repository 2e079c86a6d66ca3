"""Redis slow or down: every call bounded by the timeout, the breaker opens and closes again."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis.asyncio as aioredis

from proxy.config import RedisConfig, StateConfig
from proxy.errors import StateUnavailable
from proxy.state import StateHub
from proxy.state.base import Limit
from proxy.state.redis import RedisCounters, RedisGuard, close_client, connect
from proxy.state.redis_server import RedisServer
from proxy.testing import wait_for

pytestmark = pytest.mark.redis


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def own_redis():
    async with RedisServer() as rs:
        yield rs


async def test_slow_redis_times_out_within_the_bound(own_redis):
    cfg = RedisConfig(url=own_redis.url, timeout_ms=50, breaker_failures=100)
    client = connect(cfg)
    counters = RedisCounters(RedisGuard(client, cfg), "f:")
    other = aioredis.Redis.from_url(own_redis.url)
    try:
        assert (await counters.acquire([Limit("k", 10, 60)])).allowed
        await other.execute_command("CLIENT", "PAUSE", "1500", "ALL")
        t0 = time.perf_counter()
        with pytest.raises(StateUnavailable) as err:
            await counters.acquire([Limit("k", 10, 60)])
        elapsed = time.perf_counter() - t0
        assert elapsed < 0.5, elapsed
        assert err.value.status == 503 and err.value.code == "state_unavailable"
        assert "127.0.0.1" not in err.value.message  # nothing about the backend reaches a client
    finally:
        await other.execute_command("CLIENT", "UNPAUSE")
        await close_client(other)
        await close_client(client)


async def test_breaker_opens_fails_fast_and_recovers_after_restart(own_redis):
    cfg = RedisConfig(url=own_redis.url, timeout_ms=100, breaker_failures=3, breaker_cooldown_s=5)
    clock = Clock()
    client = connect(cfg)
    guard = RedisGuard(client, cfg, clock=clock)
    counters = RedisCounters(guard, "f:")
    try:
        assert (await counters.acquire([Limit("k", 10, 60)])).allowed
        await own_redis.astop()
        for _ in range(3):
            with pytest.raises(StateUnavailable):
                await counters.acquire([Limit("k", 10, 60)])
        assert guard.state() == "open"
        t0 = time.perf_counter()
        with pytest.raises(StateUnavailable) as err:
            await counters.lease("c", 1, 5)
        assert time.perf_counter() - t0 < 0.01  # no network while open
        assert err.value.reason == "redis_breaker_open"

        await own_redis.arestart()  # empty: the scripts must be loaded again (NOSCRIPT)
        with pytest.raises(StateUnavailable):  # still cooling down
            await counters.acquire([Limit("k", 10, 60)])
        clock.now += 5.1
        assert guard.state() == "half-open"
        assert (await counters.acquire([Limit("k", 10, 60)])).allowed
        assert guard.state() == "closed" and guard.failures == 0
    finally:
        await close_client(client)


async def test_half_open_failure_reopens_at_once(own_redis):
    cfg = RedisConfig(url=own_redis.url, timeout_ms=100, breaker_failures=2, breaker_cooldown_s=5)
    clock = Clock()
    client = connect(cfg)
    guard = RedisGuard(client, cfg, clock=clock)
    counters = RedisCounters(guard, "f:")
    try:
        await own_redis.astop()
        for _ in range(2):
            with pytest.raises(StateUnavailable):
                await counters.get_sum("s")
        clock.now += 6
        with pytest.raises(StateUnavailable) as err:  # the probe fails...
            await counters.get_sum("s")
        assert err.value.reason == "redis_unavailable"
        assert guard.state() == "open"  # ...and one failure is enough to re-open
    finally:
        await close_client(client)


async def test_hub_check_reports_redis_down_then_up(own_redis, tmp_path):
    hub = StateHub(StateConfig(dir=tmp_path, redis=RedisConfig(url=own_redis.url, timeout_ms=100, breaker_failures=50)))
    await hub.start()
    try:
        assert (await hub.check())["redis"] == "ok"
        await own_redis.astop()
        report = await hub.check()
        assert report == {"redis": "down", "sqlite": "ok"}
        await own_redis.arestart()
        assert (await hub.check())["redis"] == "ok"
    finally:
        await hub.close()


async def test_calls_under_load_never_hang_while_redis_flaps(own_redis):
    """Many concurrent acquires while the server stops and restarts: each ends within the bound."""
    cfg = RedisConfig(url=own_redis.url, timeout_ms=50, breaker_failures=5, breaker_cooldown_s=0.2)
    client = connect(cfg)
    counters = RedisCounters(RedisGuard(client, cfg), "f:")
    worst = 0.0
    outcomes = {"ok": 0, "unavailable": 0}
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal worst
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                await counters.acquire([Limit("k", 1e9, 60)])
                outcomes["ok"] += 1
            except StateUnavailable:
                outcomes["unavailable"] += 1
                await asyncio.sleep(0.005)  # pacing of the load generator, not synchronisation
            worst = max(worst, time.perf_counter() - t0)

    tasks = [asyncio.create_task(worker()) for _ in range(20)]
    try:
        async with asyncio.timeout(20):
            while outcomes["ok"] < 200:
                await asyncio.sleep(0.01)
            await own_redis.astop()
            seen = outcomes["unavailable"]
            while outcomes["unavailable"] < seen + 50:
                await asyncio.sleep(0.01)
            await own_redis.arestart()
            ok = outcomes["ok"]
            while outcomes["ok"] < ok + 200:  # it recovers on its own
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await close_client(client)
    # far above the 50 ms timeout for a loaded test machine, far below redis-py's own 5 s default
    assert worst < 1.5, worst


async def test_connections_redis_closed_while_idle_are_not_failures(own_redis):
    """After a restart (or Redis's idle `timeout`), each idle connection of the lane failed one call: under
    light traffic the breaker kept re-opening, and a replica answered 503 for minutes with Redis up."""
    cfg = RedisConfig(url=own_redis.url, timeout_ms=500, breaker_failures=2, breaker_cooldown_s=30)
    client = connect(cfg)
    guard = RedisGuard(client, cfg)
    counters = RedisCounters(guard, "f:")
    other = aioredis.Redis.from_url(own_redis.url)
    lane = guard._lane
    assert lane is not None
    try:
        await asyncio.gather(*(counters.acquire([Limit(f"k{i}", 10, 60)]) for i in range(8)))
        assert len(lane.idle) >= 4
        # every connection of ours closed by the server, as a restart or its idle timeout does
        await other.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        await wait_for(lambda: all(c._reader.at_eof() for c in lane.idle), 10, "the closes to arrive")
        results = await asyncio.gather(*(counters.acquire([Limit(f"k{i}", 10, 60)]) for i in range(8)), return_exceptions=True)
        assert not [r for r in results if isinstance(r, BaseException)] and guard.state() == "closed"
        # a close that had not arrived yet: the call that meets it fails, the other idle ones go with it
        await asyncio.gather(*(counters.acquire([Limit(f"k{i}", 10, 60)]) for i in range(8)))
        await other.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        failed = 0
        for i in range(8):
            try:
                await counters.acquire([Limit(f"k{i}", 10, 60)])
            except StateUnavailable:
                failed += 1
        assert failed <= 1 and guard.state() == "closed"
    finally:
        await close_client(other)
        await close_client(client)


async def test_a_lease_whose_admission_timed_out_is_released_once_redis_answers(own_redis):
    """Redis stalled past the timeout, then ran the script: the request was refused (503) but its
    concurrency slot stayed held for the lease's TTL (15 minutes by default), so a key limited to one
    request in flight was locked out."""
    cfg = RedisConfig(url=own_redis.url, timeout_ms=50, breaker_failures=100)
    client = connect(cfg)
    counters = RedisCounters(RedisGuard(client, cfg), "f:")
    other = aioredis.Redis.from_url(own_redis.url)
    try:
        await counters.lease("warm", 1, 900)  # the script loaded, a lane connection open
        os.kill(own_redis.pid, signal.SIGSTOP)  # the redis-server this test started: a stall, the process kept
        try:
            with pytest.raises(StateUnavailable):
                await counters.lease("c", 1, 900)  # sent, unanswered within the timeout
        finally:
            os.kill(own_redis.pid, signal.SIGCONT)  # it reads the script then, and takes the slot
        # without the release, the slot stays taken for 900 s and no lease is granted here
        await wait_for(lambda: _granted(counters.lease("c", 1, 900)), 10, "the slot to be free again")
        assert await other.zcard("f:c:lease:c") == 1  # the lease just granted, and no other
    finally:
        await close_client(other)
        await counters.close()
        await close_client(client)


async def _granted(lease) -> bool:
    try:
        return await lease is not None
    except StateUnavailable:  # Redis still paused
        return False


async def test_refusals_that_never_reached_redis_leave_nothing_to_release(own_redis):
    """Every failed admission with leases used to start a background release, a refused connection or an
    open breaker as much as a lost answer: with Redis down, one task per request piled up."""
    cfg = RedisConfig(url=own_redis.url, timeout_ms=50, breaker_failures=3)
    client = connect(cfg)
    counters = RedisCounters(RedisGuard(client, cfg), "f:")
    try:
        await counters.lease("warm", 1, 900)
        await own_redis.astop()
        reasons = set()
        for _ in range(30):
            with pytest.raises(StateUnavailable) as err:
                await counters.lease("c", 1, 900)
            reasons.add(err.value.reason)
            assert not err.value.ambiguous
        assert reasons == {"redis_unavailable", "redis_breaker_open"}
        assert len(counters._releasing) == 0
    finally:
        await counters.close()
        await close_client(client)
