"""KV behaves the same on memory, SQLite and Redis: get/set/delete, TTL; memory and SQLite stay bounded."""

from __future__ import annotations

import asyncio

import pytest

from proxy.config import RedisConfig
from proxy.state.memory import MemoryKV
from proxy.state.sqlite import SQLiteKV

BACKENDS = ["memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis)]


@pytest.fixture(params=BACKENDS)
async def kv(request, tmp_path, clock, key_prefix):
    if request.param == "memory":
        store = MemoryKV(1 << 20, clock=clock)
        yield store
    elif request.param == "sqlite":
        store = SQLiteKV(tmp_path / "kv.db", "cache", clock=clock)
        yield store
        await store.close()
    else:
        from proxy.state.redis import RedisGuard, RedisKV, close_client, connect

        rs = request.getfixturevalue("redis_server")
        cfg = RedisConfig(url=rs.url, timeout_ms=2000)
        client = connect(cfg)
        yield RedisKV(RedisGuard(client, cfg), key_prefix, "cache")
        await close_client(client)


async def test_set_get_delete(kv):
    assert await kv.get("a") is None
    await kv.set("a", b"\x00one")
    await kv.set("b", b"two", ttl_s=60)
    assert await kv.get("a") == b"\x00one"
    assert await kv.get("b") == b"two"
    await kv.set("a", b"uno")
    assert await kv.get("a") == b"uno"
    await kv.delete("a")
    await kv.delete("never-there")
    assert await kv.get("a") is None
    assert await kv.get("b") == b"two"


async def test_ttl_expires(kv, clock):
    if isinstance(kv, (MemoryKV, SQLiteKV)):
        await kv.set("t", b"v", ttl_s=10)
        clock.advance(9.9)
        assert await kv.get("t") == b"v"
        clock.advance(0.2)
        assert await kv.get("t") is None
        return
    # Redis expires on its own clock: wait for the condition, bounded
    await kv.set("t", b"v", ttl_s=0.3)
    assert await kv.guard.client.pttl(kv.prefix + "t") > 0
    async with asyncio.timeout(5):
        while await kv.get("t") is not None:
            await asyncio.sleep(0.05)


async def test_memory_kv_is_an_lru_bounded_by_bytes(clock):
    kv = MemoryKV(max_bytes=100, clock=clock)
    for i in range(5):
        await kv.set(f"k{i}", b"x" * 18)  # 20 bytes each: exactly full
    assert kv.size == 100 and len(kv) == 5
    assert await kv.get("k0") == b"x" * 18  # k0 is now the most recently used
    await kv.set("k5", b"y" * 18)
    assert await kv.get("k1") is None  # the least recently used went
    assert await kv.get("k0") is not None
    assert kv.size <= 100
    await kv.set("huge", b"z" * 200)  # larger than the store: not kept, nothing evicted
    assert await kv.get("huge") is None and len(kv) == 5
    await kv.set("k0", b"")  # replacing shrinks the accounted size
    assert kv.size == 4 * 20 + 2


async def test_sqlite_kv_bound_evicts_oldest_written(tmp_path, clock):
    kv = SQLiteKV(tmp_path / "kv.db", "b", max_bytes=100, clock=clock)
    try:
        for i in range(5):
            clock.advance(1)
            await kv.set(f"k{i}", b"x" * 18)
        clock.advance(1)
        await kv.set("k5", b"x" * 18)
        assert await kv.get("k0") is None
        assert all([await kv.get(f"k{i}") for i in range(1, 6)])
    finally:
        await kv.close()


async def test_sqlite_kv_namespaces_that_differ_in_punctuation_are_apart(tmp_path, clock):
    """team.a, team-a and team_a all mapped to table kv_team_a and read each other's entries (the memory and
    Redis backends keep them apart)."""
    kvs = [SQLiteKV(tmp_path / "kv.db", ns, clock=clock) for ns in ("team.a", "team-a", "team_a")]
    try:
        for i, kv in enumerate(kvs):
            await kv.set("k", f"from {i}".encode())
        assert [await kv.get("k") for kv in kvs] == [b"from 0", b"from 1", b"from 2"]
        from proxy.state.sqlite import kv_table

        assert kvs[2].table == "kv_team_a" and kv_table("cache") == "kv_cache"  # plain names keep their tables
    finally:
        for kv in kvs:
            await kv.close()


async def test_an_entry_bigger_than_the_sqlite_kv_is_not_kept_and_evicts_nothing(tmp_path, clock):
    """It was written, then evicted every other entry and itself: one oversized answer emptied the cache."""
    kv = SQLiteKV(tmp_path / "kv.db", "c", clock=clock, max_bytes=100)
    try:
        await kv.set("a", b"x" * 40)
        await kv.set("b", b"y" * 40)
        await kv.set("a", b"z" * 500)  # too big: not kept, and the old value of its key goes too
        assert await kv.get("a") is None and await kv.get("b") == b"y" * 40
    finally:
        await kv.close()


async def test_sqlite_kv_survives_reopen_and_namespaces_are_apart(tmp_path, clock):
    a = SQLiteKV(tmp_path / "kv.db", "a", clock=clock)
    b = SQLiteKV(tmp_path / "kv.db", "b", clock=clock)
    await a.set("k", b"from a", ttl_s=100)
    await b.set("k", b"from b")
    await a.close()
    a2 = SQLiteKV(tmp_path / "kv.db", "a", clock=clock)
    try:
        assert await a2.get("k") == b"from a"
        assert await b.get("k") == b"from b"
    finally:
        await a2.close()
        await b.close()
