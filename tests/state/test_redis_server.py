"""The RedisServer helper: a real server on a free port, stopped and restarted on the same port."""

from __future__ import annotations

import pytest
import redis

from proxy.state.redis_server import RedisServer

pytestmark = pytest.mark.redis


def test_sync_start_stop_restart():
    with RedisServer() as rs:
        port, pid = rs.port, rs.pid
        r = redis.Redis.from_url(rs.url)
        assert r.ping()
        r.set("k", "v")
        rs.stop()
        assert not rs.running
        with pytest.raises(redis.ConnectionError):
            r.ping()
        rs.restart()
        assert rs.port == port and rs.pid != pid
        assert r.get("k") is None  # no persistence
        r.close()
    assert not rs.running


async def test_async_context_manager():
    async with RedisServer() as rs:
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(rs.url)
        assert await client.ping()
        await client.aclose()
