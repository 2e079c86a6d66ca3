"""state.redis through Sentinel: a real redis-server in sentinel mode in front of a real master."""

from __future__ import annotations

import asyncio
import socket
import subprocess

import pytest

from proxy.config import RedisConfig, StateConfig
from proxy.state import StateHub
from proxy.state.base import Limit
from proxy.state.redis_server import RedisServer, _free_port, _ping

pytestmark = pytest.mark.redis


@pytest.fixture
async def sentinel(tmp_path):
    async with RedisServer() as master:
        port = _free_port()
        conf = tmp_path / "sentinel.conf"
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n"
            f"sentinel monitor sluice-main 127.0.0.1 {master.port} 1\n"
        )
        proc = subprocess.Popen([master.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            async with asyncio.timeout(10):
                while not await asyncio.to_thread(_ping, port, 0.2):
                    assert proc.poll() is None, "redis sentinel exited"
                    await asyncio.sleep(0.02)  # polling a child's port: no event to wait on
            yield master, port
        finally:
            proc.terminate()
            proc.wait(10)


async def test_counters_and_kv_through_sentinel(sentinel, tmp_path):
    master, port = sentinel
    cfg = RedisConfig(url="redis://127.0.0.1/0", sentinel=[f"127.0.0.1:{port}"], master_name="sluice-main", timeout_ms=1000)
    hub = StateHub(StateConfig(dir=tmp_path / "var", redis=cfg))
    await hub.start()
    try:
        counters = hub.counters()
        assert [(await counters.acquire([Limit("s", 2, 60)])).allowed for _ in range(3)] == [True, True, False]
        kv = hub.kv("cache")
        await kv.set("k", b"v", ttl_s=30)
        assert await kv.get("k") == b"v"
        assert (await hub.check())["redis"] == "ok"
    finally:
        await hub.close()
    # the writes went to the master the sentinel named
    with socket.create_connection(("127.0.0.1", master.port), timeout=2) as s:
        s.sendall(b"DBSIZE\r\n")
        assert int(s.recv(64).strip()[1:]) >= 2
