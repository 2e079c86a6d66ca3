"""auth + ratelimit against the empty chain: CPU per request, latency, and Redis round trips.

Three Sluice processes in one run, rounds interleaved so machine noise falls on all:

* ``empty``: no plugins;
* ``memory``: ``auth`` (a virtual key, cached) + ``ratelimit`` (rpm, tpm and
  concurrency per key, plus a global rpm) on the memory backend;
* ``redis``: the same with ``state.redis`` (keys and counters in a real
  redis-server on loopback).

Measured: CPU per request of the Sluice process (user + system from /proc, so the
SQLite and background threads count), client latency p50/p99 and their ratios to the
empty chain, the time inside each hook (``ctx.timings.plugins``, median and p90, in
one in-process server with the memory backend), and for Redis the commands per request (``INFO commandstats``), split
into the request path (the admission script, and the concurrency lease) and the
background (lease release and the token reconcile in ``on_done``). Limits are set
high, so every request is admitted and does the full work. Traffic is 3 buffered :
1 streamed chat requests at a fixed concurrency.

    .venv/bin/python benchmarks/bench_auth_ratelimit.py            # full run (about a minute)
    .venv/bin/python benchmarks/bench_auth_ratelimit.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_observers import cpu_seconds, load, settle  # noqa: E402
from bench_traffic import demo_upstream, pct  # noqa: E402

from proxy.testing import RedisServer, SluiceProcess  # noqa: E402

LIMITS = {"requests_per_minute": 10_000_000, "tokens_per_minute": 10_000_000_000, "concurrency": 10_000,
          "global": {"requests_per_minute": 10_000_000}}


def config(upstream: str, chain: list[dict[str, Any]], redis_url: str | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "server": {"access_log": False},
        "logging": {"level": "warning"},
        "upstreams": {"primary": {"url": upstream, "models": ["sluice-demo"]}},
        "routes": [{"name": "main", "match": {"path": "/v1/"}, "upstream": "primary", "chain": chain}],
    }
    if redis_url:
        cfg["state"] = {"redis": {"url": redis_url, "timeout_ms": 200}}
    return cfg


CHAIN = [{"auth": {"cache_ttl_s": 5}}, {"ratelimit": LIMITS}]


async def new_key(http: aiohttp.ClientSession, proc: SluiceProcess) -> str:
    async with http.post(proc.admin_url + "/admin/keys", json={"name": "bench"}, headers={"authorization": "Bearer admin-token"}) as r:
        assert r.status == 201, await r.text()
        return (await r.json())["key"]


async def commandstats(client: aioredis.Redis) -> dict[str, int]:
    info = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in info.items()}


async def hook_timings(n: int, concurrency: int) -> dict[str, dict[str, float]]:
    """Wall time inside each hook (``ctx.timings.plugins``), in one in-process server, memory backend.

    Hooks of this chain do not suspend on the memory backend, so this is their CPU time
    plus whatever preemption by other processes adds: medians are the figure to read.
    """
    from proxy import Plugin, hookimpl
    from proxy.testing import FakeUpstream, SluiceServer, register_plugin

    seen: dict[str, list[float]] = {}

    class Probe(Plugin):
        name = "bench_probe"

        @hookimpl
        def on_done(self, ctx: Any) -> None:
            for k, v in ctx.timings.plugins.items():
                if not k.startswith("bench_probe"):
                    seen.setdefault(k, []).append(v)

    with register_plugin(Probe):
        async with FakeUpstream() as up:
            cfg = config(up.url, [*CHAIN, {"bench_probe": {}}])
            async with SluiceServer(cfg, tempfile.mkdtemp(prefix="sluice-bench-hooks-")) as s:
                async with aiohttp.ClientSession() as http:
                    key = await new_key(http, s)  # type: ignore[arg-type]
                    async with aiohttp.ClientSession(headers={"authorization": f"Bearer {key}"}) as client:
                        await load(client, s.url, 200, concurrency)
                        await s.wait_idle()
                        seen.clear()
                        await load(client, s.url, n, concurrency)
                        await s.wait_idle()
    return {k: {"median": round(statistics.median(v) * 1e6, 1), "p90": round(pct([x * 1e6 for x in v], 90), 1)}
            for k, v in sorted(seen.items())}


async def main(quick: bool) -> dict[str, Any]:
    rounds, per_round, concurrency = (2, 200, 8) if quick else (5, 800, 8)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-authrl-"))
    async with RedisServer() as rs, demo_upstream(0.0) as up:
        rclient = aioredis.Redis.from_url(rs.url)
        async with SluiceProcess(config(up, []), tmp / "empty") as empty, \
                SluiceProcess(config(up, CHAIN), tmp / "memory") as mem, \
                SluiceProcess(config(up, CHAIN, rs.url), tmp / "redis") as red:
            procs = {"empty": empty, "memory": mem, "redis": red}
            cpu = {k: 0.0 for k in procs}
            lat: dict[str, list[float]] = {k: [] for k in procs}
            redis_calls: dict[str, int] = {}
            async with aiohttp.ClientSession() as http:
                keys = {"memory": await new_key(http, mem), "redis": await new_key(http, red)}
                sessions = {name: aiohttp.ClientSession(headers={"authorization": f"Bearer {keys[name]}"}) if name in keys else http
                            for name in procs}
                try:
                    for name, p in procs.items():
                        await load(sessions[name], p.url, 200, concurrency)  # warm up: imports, pools, key cache
                        await settle(p.pid)
                    for _ in range(rounds):
                        for name, p in procs.items():
                            before = await commandstats(rclient) if name == "redis" else {}
                            c0 = cpu_seconds(p.pid)
                            lat[name] += await load(sessions[name], p.url, per_round, concurrency)
                            await settle(p.pid)
                            cpu[name] += cpu_seconds(p.pid) - c0
                            if name == "redis":
                                after = await commandstats(rclient)
                                for cmd, n in after.items():
                                    redis_calls[cmd] = redis_calls.get(cmd, 0) + n - before.get(cmd, 0)
                finally:
                    for name in keys:
                        await sessions[name].close()
        await rclient.aclose()
    n = rounds * per_round
    redis_calls.pop("info", None)
    us = {k: cpu[k] / n * 1e6 for k in cpu}
    request_path = redis_calls.get("evalsha", 0) + redis_calls.get("eval", 0)
    hooks = await hook_timings(400 if quick else 2000, concurrency)
    return {
        "hook_us_in_process_memory": hooks,
        "requests_per_config": n,
        "concurrency": concurrency,
        "mix": "3 buffered : 1 streamed chat requests",
        "chain": CHAIN,
        "cpu_us_per_request": {k: round(v, 1) for k, v in us.items()},
        "added_cpu_us_per_request": {k: round(us[k] - us["empty"], 1) for k in ("memory", "redis")},
        "cpu_ratio": {k: round(us[k] / us["empty"], 3) for k in ("memory", "redis")},
        "latency_ms": {k: {"p50": round(pct(v, 50), 3), "p99": round(pct(v, 99), 3), "mean": round(statistics.fmean(v), 3)}
                       for k, v in lat.items()},
        "latency_p50_ratio": {k: round(pct(lat[k], 50) / pct(lat["empty"], 50), 3) for k in ("memory", "redis")},
        "latency_p99_ratio": {k: round(pct(lat[k], 99) / pct(lat["empty"], 99), 3) for k in ("memory", "redis")},
        "redis_commands_per_request": {k: round(v / n, 3) for k, v in sorted(redis_calls.items()) if v},
        "redis_scripts_per_request": round(request_path / n, 3),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main(args.quick)), indent=2))
