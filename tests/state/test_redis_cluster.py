"""state.redis on a Redis Cluster: three real masters; one acquire spans many keys in one slot."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from proxy.config import RedisConfig, StateConfig
from proxy.state import StateHub
from proxy.state.base import Limit
from proxy.state.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
async def cluster():
    cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    nodes = [RedisServer(extra_args=("--cluster-enabled", "yes", "--cluster-node-timeout", "2000")) for _ in range(3)]
    try:
        for n in nodes:
            await asyncio.to_thread(n.start)
        addrs = [f"127.0.0.1:{n.port}" for n in nodes]
        done = await asyncio.to_thread(
            subprocess.run, [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
            capture_output=True, timeout=60,
        )
        assert done.returncode == 0, done.stdout.decode()[-2000:]
        async with asyncio.timeout(30):
            while True:
                info = await asyncio.to_thread(subprocess.run, [cli, "-p", str(nodes[0].port), "cluster", "info"], capture_output=True)
                if b"cluster_state:ok" in info.stdout:
                    break
                await asyncio.sleep(0.05)  # the cluster converges on its own; polled with a deadline
        yield nodes
    finally:
        for n in nodes:
            await asyncio.to_thread(n.close)


async def test_counters_kv_and_keys_on_a_cluster(cluster, tmp_path):
    from plugins.auth import KeyStore

    cfg = RedisConfig(url=f"redis://127.0.0.1:{cluster[0].port}/0", cluster=True, timeout_ms=2000)
    hub = StateHub(StateConfig(dir=tmp_path, redis=cfg))
    await hub.start()
    try:
        counters = hub.counters()
        limits = [Limit(f"k:{i}", 3, 60) for i in range(8)]  # keys that would hash to different slots untagged
        assert all([(await counters.acquire(limits)).allowed for _ in range(3)])
        d = await counters.acquire(limits)
        assert not d.allowed
        decision, tokens = await counters.admit([Limit("r", 5, 60)], [("c", 1, 30.0)])
        assert decision.allowed and tokens
        await counters.settle([Limit("r", 5, 60, -1)], [("c", tokens[0])])
        assert (await counters.add_sum("b", 5, 10, 4e9)).allowed
        kv = hub.kv("cache")
        for i in range(20):  # spread over the masters
            await kv.set(f"key{i}", b"v%d" % i, ttl_s=60)
        assert [await kv.get(f"key{i}") for i in range(20)] == [b"v%d" % i for i in range(20)]
        store = KeyStore(hub)
        secret, rec = await store.create(name="c")
        from plugins.auth import hash_key

        assert (await store.by_hash(hash_key(secret))).id == rec.id
        assert [r.id for r in await store.list()] == [rec.id]
    finally:
        await hub.close()
