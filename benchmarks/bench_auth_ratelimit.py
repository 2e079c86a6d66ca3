"""auth + ratelimit against the empty chain: CPU per request, latency, and Redis round trips.

Four Sluice processes in one run, rounds interleaved so machine noise falls on all:

* ``empty``: no plugins;
* ``shape``: two plugins with the hooks and needs of auth and ratelimit (an async-free
  ``on_request`` each, ``on_response``, ``on_done``, ``needs_usage``, the body parsed,
  ``ctx.usage`` read) that do nothing else: what the core spends because the chain is not empty, so that
  ``memory - shape`` is the plugins' own cost;
* ``memory``: ``auth`` (a virtual key, cached) + ``ratelimit`` (rpm, tpm and
  concurrency per key, plus a global rpm) on the memory backend;
* ``redis``: the same with ``state.redis`` (keys and counters in a real
  redis-server on loopback).

The ``shape`` plugins live in this module; the Sluice processes load it through
``$SLUICE_PLUGINS``.

Measured: CPU per request of the Sluice process, in nanoseconds from
``/proc/<pid>/task/*/schedstat`` (every thread, so the SQLite and executor threads
count; the 10 ms ticks of ``/proc/<pid>/stat`` are too coarse for a few hundred
requests), per round, for every configuration in the same round; the figures are the
medians over rounds of each configuration's CPU per request and of its difference to
the empty chain **in the same round** (the order of the configurations rotates from
round to round, so drift of the machine's load falls on all). Also client latency
p50/p99 and their ratios to the empty chain, the time inside each hook
(``ctx.timings.plugins``, median, mean and p90, in one in-process server with the memory
backend, the load generator in the same process), and for Redis the commands and scripts (round trips) per request
(``INFO commandstats``). Limits are set high, so every request is admitted and does
the full work. Traffic is 3 buffered : 1 streamed chat requests at a fixed concurrency.

    .venv/bin/python benchmarks/bench_auth_ratelimit.py            # full run (about two and a half minutes)
    .venv/bin/python benchmarks/bench_auth_ratelimit.py --quick    # smoke run
    .venv/bin/python benchmarks/bench_auth_ratelimit.py --profile /tmp/prof   # where the added CPU goes

``--profile DIR`` serves the four configurations under cProfile (thread CPU time,
switched on only around the measured load, ``benchmarks/noop_plugins.py --profile``)
and prints the functions whose self CPU per request grew most from the empty chain to
the shape (the core's share), from the shape to auth + ratelimit (the plugins'), and to
Redis. cProfile's own cost per call inflates call-heavy code: read the shares, not the
absolute figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_observers import load  # noqa: E402
from bench_traffic import demo_upstream, pct  # noqa: E402

from proxy import Context, Plugin, hookimpl  # noqa: E402
from proxy.testing import RedisServer, SluiceProcess  # noqa: E402

#: the Sluice processes load this module for the SHAPE plugins
PLUGIN_ENV = {"SLUICE_PLUGINS": Path(__file__).stem,
              "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), str(ROOT), os.environ.get("PYTHONPATH", "")])}

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
        cfg["state"] = {"redis": {"url": redis_url, "timeout_ms": 1000}}  # a loaded shared machine: CPU is measured, not timeouts
    return cfg


CHAIN = [{"auth": {"cache_ttl_s": 5}}, {"ratelimit": LIMITS}]
#: two plugins with the hooks of auth and ratelimit that do no work: what the core spends
#: because the chain is not empty (body parse, usage, on_done queue, hook calls)
SHAPE = [{"bench_shape_auth": {}}, {"bench_shape_ratelimit": {}}]


class ShapeAuth(Plugin):
    """auth's hooks, doing nothing."""

    name = "bench_shape_auth"
    kind = "guard"

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return

    @hookimpl
    def on_response(self, ctx: Context) -> None:
        return None


class ShapeRateLimit(Plugin):
    """ratelimit's hooks and needs, doing nothing but read the model (which parses the body, as counting tokens
    does) and the answer's usage (as reconciling does)."""

    name = "bench_shape_ratelimit"
    kind = "guard"
    needs_usage = True

    @hookimpl
    def on_request(self, ctx: Context) -> None:
        if ctx.answered:
            return
        ctx.model  # noqa: B018

    @hookimpl
    def on_done(self, ctx: Context) -> None:
        ctx.usage  # noqa: B018  (reconciling needs the answer's usage, which the core may read lazily)


@hookimpl
def register_plugins(register: Any) -> None:
    """Loaded by the Sluice processes through $SLUICE_PLUGINS (see ``SHAPE``)."""
    register(ShapeAuth)
    register(ShapeRateLimit)


def cpu_ns(pid: int) -> int:
    """CPU time (ns) of every live thread of ``pid``, from ``/proc/<pid>/task/*/schedstat``."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended between the listing and the read
    return total


async def settle(pid: int, window_s: float = 0.1, quiet_ns: int = 1_000_000, limit_s: float = 5.0) -> None:
    """Wait until the process stops burning CPU (its on_done queue and writers caught up):
    less than ``quiet_ns`` of CPU in a ``window_s`` window, or ``limit_s`` at most."""
    deadline = time.monotonic() + limit_s
    last = cpu_ns(pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(window_s)  # sampling another process's CPU counter: nothing to wait on
        now = cpu_ns(pid)
        if now - last <= quiet_ns:
            return
        last = now


class ProfiledSluice(SluiceProcess):
    """``sluice serve`` through ``benchmarks/noop_plugins.py --profile``: cProfile on between SIGUSR1 and SIGUSR2."""

    def __init__(self, config: dict[str, Any], tmp: Path, prof: Path) -> None:
        super().__init__(config, tmp, env=PLUGIN_ENV)
        self.prof = prof

    def command(self, ready: Path) -> list[str]:
        return [sys.executable, str(ROOT / "benchmarks" / "noop_plugins.py"), "-c", str(self.config_path),
                "--ready-file", str(ready), "--profile", str(self.prof)]


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
        wants_plugin_timings = True  # the core times hooks only on routes where a plugin asks

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
    return {k: {"median": round(statistics.median(v) * 1e6, 1), "mean": round(statistics.fmean(v) * 1e6, 1),
                "p90": round(pct([x * 1e6 for x in v], 90), 1)}
            for k, v in sorted(seen.items())}


async def main(quick: bool, rounds: int | None = None, per_round: int | None = None) -> dict[str, Any]:
    rounds = rounds or (3 if quick else 30)
    per_round = per_round or (200 if quick else 400)
    concurrency = 8
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-authrl-"))
    names = ["empty", "shape", "memory", "redis"]
    per: dict[str, list[float]] = {k: [] for k in names}  # CPU us per request, per round
    lat: dict[str, list[float]] = {k: [] for k in names}
    redis_calls: dict[str, int] = {}
    load0 = os.getloadavg()
    async with RedisServer() as rs, demo_upstream(0.0) as up:
        rclient = aioredis.Redis.from_url(rs.url)
        async with SluiceProcess(config(up, []), tmp / "empty", env=PLUGIN_ENV) as empty, \
                SluiceProcess(config(up, SHAPE), tmp / "shape", env=PLUGIN_ENV) as shape, \
                SluiceProcess(config(up, CHAIN), tmp / "memory", env=PLUGIN_ENV) as mem, \
                SluiceProcess(config(up, CHAIN, rs.url), tmp / "redis", env=PLUGIN_ENV) as red:
            procs = {"empty": empty, "shape": shape, "memory": mem, "redis": red}
            async with aiohttp.ClientSession() as http:
                keys = {"memory": await new_key(http, mem), "redis": await new_key(http, red)}
                sessions = {name: aiohttp.ClientSession(headers={"authorization": f"Bearer {keys[name]}"}) if name in keys else http
                            for name in procs}
                try:
                    for name, p in procs.items():
                        await load(sessions[name], p.url, 300, concurrency)  # warm up: imports, pools, key cache
                        await settle(p.pid)
                    for r in range(rounds):
                        for name in names[r % 4:] + names[: r % 4]:  # rotate the order from round to round
                            p = procs[name]
                            before = await commandstats(rclient) if name == "redis" else {}
                            c0 = cpu_ns(p.pid)
                            lat[name] += await load(sessions[name], p.url, per_round, concurrency)
                            await settle(p.pid)
                            per[name].append((cpu_ns(p.pid) - c0) / per_round / 1000)
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
    med = {k: statistics.median(v) for k, v in per.items()}
    others = ("shape", "memory", "redis")
    added = {k: statistics.median([a - b for a, b in zip(per[k], per["empty"])]) for k in others}
    ratio = {k: statistics.median([a / b for a, b in zip(per[k], per["empty"])]) for k in others}
    over_shape = {k: statistics.median([a - b for a, b in zip(per[k], per["shape"])]) for k in ("memory", "redis")}
    request_path = redis_calls.get("evalsha", 0) + redis_calls.get("eval", 0)
    hooks = await hook_timings(400 if quick else 2000, concurrency)
    return {
        "load_average_before_after": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "hook_us_in_process_memory": hooks,
        "rounds": rounds,
        "requests_per_round": per_round,
        "requests_per_config": n,
        "concurrency": concurrency,
        "mix": "3 buffered : 1 streamed chat requests",
        "chain": CHAIN,
        "cpu_us_per_request_median": {k: round(v, 1) for k, v in med.items()},
        "added_cpu_us_per_request_median": {k: round(v, 1) for k, v in added.items()},
        "cpu_ratio_median": {k: round(v, 3) for k, v in ratio.items()},
        "plugins_own_cpu_us_over_shape_median": {k: round(v, 1) for k, v in over_shape.items()},
        "added_cpu_us_per_round": {k: [round(a - b, 1) for a, b in zip(per[k], per["empty"])] for k in others},
        "cpu_us_per_round": {k: [round(x, 1) for x in v] for k, v in per.items()},
        "latency_ms": {k: {"p50": round(pct(v, 50), 3), "p99": round(pct(v, 99), 3), "mean": round(statistics.fmean(v), 3)}
                       for k, v in lat.items()},
        "latency_p50_ratio": {k: round(pct(lat[k], 50) / pct(lat["empty"], 50), 3) for k in others},
        "latency_p99_ratio": {k: round(pct(lat[k], 99) / pct(lat["empty"], 99), 3) for k in others},
        "redis_commands_per_request": {k: round(v / n, 3) for k, v in sorted(redis_calls.items()) if v},
        "redis_scripts_per_request": round(request_path / n, 3),
    }


async def profile(out: Path, n: int, top: int) -> str:
    """Profile empty, memory and Redis under the same load, then diff each against empty."""
    from run_core import profile_diff

    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-authrl-prof-"))
    names = ["empty", "shape", "memory", "redis"]
    concurrency = 8
    async with RedisServer() as rs, demo_upstream(0.0) as up:
        cfgs = {"empty": config(up, []), "shape": config(up, SHAPE), "memory": config(up, CHAIN), "redis": config(up, CHAIN, rs.url)}
        procs = {k: ProfiledSluice(cfgs[k], tmp / k, out / f"{k}.prof") for k in names}
        for p in procs.values():
            await p.start()
        try:
            async with aiohttp.ClientSession() as http:
                keys = {"memory": await new_key(http, procs["memory"]), "redis": await new_key(http, procs["redis"])}
                sessions = {k: aiohttp.ClientSession(headers={"authorization": f"Bearer {keys[k]}"}) if k in keys else http for k in names}
                try:
                    for k in names:
                        await load(sessions[k], procs[k].url, 300, concurrency)
                        await settle(procs[k].pid)
                        procs[k].prof.unlink(missing_ok=True)
                        procs[k].signal(signal.SIGUSR1)
                    for r in range(4):
                        for k in names[r % 4:] + names[: r % 4]:
                            await load(sessions[k], procs[k].url, n // 4, concurrency)
                            await settle(procs[k].pid)
                    for k in names:
                        procs[k].signal(signal.SIGUSR2)
                    async with asyncio.timeout(60):
                        while not all(procs[k].prof.exists() for k in names):
                            await asyncio.sleep(0.05)  # the child writes the stats file at SIGUSR2
                finally:
                    for k in keys:
                        await sessions[k].close()
        finally:
            for p in procs.values():
                await p.stop()
                p._log.close()
    report = []
    for a, b in (("empty", "shape"), ("shape", "memory"), ("empty", "memory"), ("empty", "redis")):
        report.append(f"== {a} -> {b} ({n} requests each, 3 buffered : 1 streamed)")
        report += profile_diff(out / f"{a}.prof", out / f"{b}.prof", top)
        report.append("")
    return "\n".join(report)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 30, quick 3)")
    ap.add_argument("--per-round", type=int, default=None, help="requests per configuration per round (default 400)")
    ap.add_argument("--profile", default=None, metavar="DIR", help="instead of measuring, profile and diff against the empty chain")
    ap.add_argument("--profile-requests", type=int, default=4000)
    ap.add_argument("--profile-top", type=int, default=45)
    args = ap.parse_args()
    if args.profile:
        print(asyncio.run(profile(Path(args.profile), args.profile_requests, args.profile_top)))
    else:
        print(json.dumps(asyncio.run(main(args.quick, args.rounds, args.per_round)), indent=2))
