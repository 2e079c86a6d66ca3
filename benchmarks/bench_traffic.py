"""Traffic plugins, measured in one run as ratios against their baselines.

1. cache: latency of a cache hit against the direct path (client -> upstream), with the
   empty-chain proxy path beside it for scale. Target: a hit is faster than direct.
2. router: CPU per request of ``Router.on_request`` + ``on_done`` with 5 targets, for each
   strategy, net of building the context. Target: under 30 us.
3. shadow: the primary's p99 latency with 100% of requests mirrored to a second upstream,
   against the same chain with no shadow. Target: under 5% change.

Sluice and the upstreams run as separate processes (``sluice serve``, ``sluice demo-upstream``),
so the client, the proxy and the model server do not share an event loop. Rounds of the
compared configurations are interleaved to spread machine noise over both.

    .venv/bin/python benchmarks/bench_traffic.py            # full run (about a minute; no load phase over 10 s)
    .venv/bin/python benchmarks/bench_traffic.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from proxy.testing import SluiceProcess, configure_plugin, make_context, make_runtime  # noqa: E402

BODY = {"model": "sluice-demo", "messages": [{"role": "user", "content": "Summarise the plot of Hamlet in two sentences."}]}
STREAM_BODY = {**BODY, "stream": True}
#: per streamed token: a small model on a fast GPU; the demo answer is about 20 tokens
TOKEN_DELAY_MS = 2.0


REPEATS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.asynccontextmanager
async def demo_upstream(token_delay_ms: float = 0.0) -> AsyncIterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", "demo-upstream", "--port", str(port),
                             "--token-delay-ms", str(token_delay_ms)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(30):
                while True:
                    try:
                        async with http.get(url + "/health") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientConnectionError:
                        if proc.poll() is not None:
                            raise RuntimeError("demo upstream exited")
                        await asyncio.sleep(0.05)  # polling a child process's port: no event to wait on
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


async def run_load(http: aiohttp.ClientSession, url: str, n: int, concurrency: int, body: bytes) -> list[float]:
    """``n`` chat requests over ``concurrency`` workers; latencies in ms."""
    lat: list[float] = []
    todo = iter(range(n))

    async def worker() -> None:
        for _ in todo:
            t0 = time.perf_counter()
            async with http.post(url + "/chat/completions", data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                if r.status != 200:
                    raise RuntimeError(f"status {r.status}")
            lat.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return lat


def summary(lat: list[float]) -> dict[str, float]:
    return {"n": len(lat), "p50_ms": round(pct(lat, 50), 3), "p99_ms": round(pct(lat, 99), 3), "mean_ms": round(statistics.fmean(lat), 3)}


def proxy_config(upstreams: dict[str, str], chain: list[dict]) -> dict[str, Any]:
    return {
        "server": {"access_log": False},
        "logging": {"level": "warning"},
        "upstreams": {name: {"url": url} for name, url in upstreams.items()},
        "routes": [{"match": {"path": "/v1/"}, "upstream": "primary", "chain": chain}],
    }


async def _until_hit(http: aiohttp.ClientSession, url: str, body: bytes) -> None:
    """Send until the answer comes from the cache (stores happen after the answer, in the background)."""
    async with asyncio.timeout(10):
        while True:
            async with http.post(url + "/chat/completions", data=body, headers={"content-type": "application/json"}) as r:
                await r.read()
                if r.headers.get("x-sluice-cache") == "hit":
                    return


async def bench_cache(tmp: Path, rounds: int, per_round: int) -> dict[str, Any]:
    """Two upstreams: the demo answering instantly (buffered: the proxy's own cost shows), and the
    demo streaming at TOKEN_DELAY_MS per token (what a model costs). Hits come from memory and SQLite."""
    out: dict[str, Any] = {}
    for label, delay, body_obj, n in (("buffered_instant_upstream", 0.0, BODY, per_round),
                                      ("streamed_model_like_upstream", TOKEN_DELAY_MS, STREAM_BODY, max(10, per_round // 5))):
        async with demo_upstream(delay) as up:
            ups = {"primary": up}
            sub = tmp / label
            async with SluiceProcess(proxy_config(ups, []), sub / "empty") as empty, \
                    SluiceProcess(proxy_config(ups, [{"cache": {"backend": "memory"}}]), sub / "mem") as mem, \
                    SluiceProcess(proxy_config(ups, [{"cache": {"backend": "sqlite"}}]), sub / "sql") as sql:
                body = orjson.dumps(body_obj)
                res: dict[str, list[float]] = {"direct": [], "proxy_empty_chain": [], "cache_hit_memory": [], "cache_hit_sqlite": []}
                async with aiohttp.ClientSession() as http:
                    for target in (mem.url, sql.url):
                        await _until_hit(http, target, body)
                    await run_load(http, up, 20, 1, body)  # warm connections and code paths
                    await run_load(http, empty.url, 20, 1, body)
                    for _ in range(rounds):
                        res["direct"] += await run_load(http, up, n, 1, body)
                        res["proxy_empty_chain"] += await run_load(http, empty.url, n, 1, body)
                        res["cache_hit_memory"] += await run_load(http, mem.url, n, 1, body)
                        res["cache_hit_sqlite"] += await run_load(http, sql.url, n, 1, body)
        part: dict[str, Any] = {k: summary(v) for k, v in res.items()}
        d = part["direct"]
        for k in ("proxy_empty_chain", "cache_hit_memory", "cache_hit_sqlite"):
            part[k]["p50_vs_direct"] = round(part[k]["p50_ms"] / d["p50_ms"], 3)
            part[k]["p99_vs_direct"] = round(part[k]["p99_ms"] / d["p99_ms"], 3)
        out[label] = part
    return out


async def bench_router(n: int) -> dict[str, Any]:
    from plugins.router import Router

    names = [f"u{i}" for i in range(5)]
    rt = await make_runtime(tempfile.mkdtemp(prefix="bench-router-"), config={
        "upstreams": {n_: {"url": f"http://127.0.0.1:9/{n_}", "context_window": 32768} for n_ in names}})
    out: dict[str, Any] = {}
    raw = orjson.dumps(BODY)
    try:
        from proxy import Attempt

        def contexts() -> list[Any]:
            return [make_context(raw, runtime=rt) for _ in range(n)]

        def baseline() -> float:
            # the same loop with the context built and its model read (the core parses the body anyway)
            ctxs = contexts()
            t0 = time.process_time()
            for ctx in ctxs:
                _ = ctx.model
            return time.process_time() - t0

        bases = []
        for strategy in ("weighted", "round_robin", "least_outstanding", "lowest_latency", "vllm"):
            plugin = await configure_plugin(Router, {
                "aliases": {"sluice-demo": {"strategy": strategy, "targets": [{"upstream": u, "model": f"m-{u}", "weight": i + 1} for i, u in enumerate(names)]}},
                "vllm": {"poll_interval_s": 600},
            }, runtime=rt)
            reqs, dones = [], []
            for _ in range(REPEATS):
                gc.collect()
                gc.disable()  # a collection landing inside one timed loop is noise, not router cost
                try:
                    base = baseline()
                    bases.append(base / n)
                    ctxs = contexts()
                    now = time.perf_counter()
                    t0 = time.process_time()
                    for ctx in ctxs:
                        plugin.on_request(ctx)
                    reqs.append((time.process_time() - t0 - base) / n)
                    for ctx in ctxs:
                        ctx.attempts.append(Attempt(ctx.targets[0], start=now, status=200, first_byte=now + 0.05, end=now + 0.1))
                    t0 = time.process_time()
                    for ctx in ctxs:
                        plugin.on_done(ctx)
                    dones.append((time.process_time() - t0) / n)
                finally:
                    gc.enable()
            await plugin.stop()
            req, done = statistics.median(reqs), statistics.median(dones)
            out[strategy] = {"on_request_us": round(req * 1e6, 2), "on_done_us": round(done * 1e6, 2), "total_us": round((req + done) * 1e6, 2)}
        out["baseline_context_and_model_us"] = round(statistics.median(bases) * 1e6, 2)
        out["repeats"] = REPEATS
    finally:
        await rt.close_all()
    return out


async def bench_shadow(tmp: Path, rounds: int, per_round: int, concurrency: int) -> dict[str, Any]:
    async with demo_upstream(TOKEN_DELAY_MS) as up, demo_upstream(TOKEN_DELAY_MS) as cand:
        ups = {"primary": up, "candidate": cand}
        none_cfg = proxy_config(ups, [{"experiments": {}}])
        shadow_cfg = proxy_config(ups, [{"experiments": {"shadows": [
            {"name": "cand", "target": {"upstream": "candidate"}, "sample": 1.0, "max_concurrency": 64}]}}])
        async with SluiceProcess(none_cfg, tmp / "none") as p_none, SluiceProcess(shadow_cfg, tmp / "shadow") as p_shadow:
            body = orjson.dumps(STREAM_BODY)
            res: dict[str, list[float]] = {"no_shadow": [], "shadow_100pct": []}
            cpu = {"no_shadow": 0.0, "shadow_100pct": 0.0}
            procs = {"no_shadow": p_none, "shadow_100pct": p_shadow}
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency * 2)) as http:
                await run_load(http, p_none.url, 50, concurrency, body)
                await run_load(http, p_shadow.url, 50, concurrency, body)
                for _ in range(rounds):
                    for name, proc in procs.items():
                        c0 = cpu_seconds(proc.pid)
                        res[name] += await run_load(http, proc.url, per_round, concurrency, body)
                        cpu[name] += cpu_seconds(proc.pid) - c0
                async with http.get(p_shadow.admin_url + "/admin/experiments", headers={"authorization": "Bearer admin-token"}) as r:
                    report = await r.json()
    out: dict[str, Any] = {k: summary(v) for k, v in res.items()}
    out["p99_change"] = round(out["shadow_100pct"]["p99_ms"] / out["no_shadow"]["p99_ms"] - 1, 4)
    out["p50_change"] = round(out["shadow_100pct"]["p50_ms"] / out["no_shadow"]["p50_ms"] - 1, 4)
    for name in cpu:
        out[name]["proxy_cpu_ms_per_request"] = round(cpu[name] / len(res[name]) * 1000, 3)
    sh = report["shadows"][0] if report.get("shadows") else {}
    out["shadow_compared"] = sh.get("compared")
    out["concurrency"] = concurrency
    return out


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short smoke run")
    ap.add_argument("--json", action="store_true", help="print only the JSON result")
    args = ap.parse_args()
    rounds, per = (2, 50) if args.quick else (4, 100)
    tmp = Path(tempfile.mkdtemp(prefix="bench-traffic-"))
    t0 = time.perf_counter()
    result = {
        "cache": await bench_cache(tmp, rounds, per),
        "router": await bench_router(2000 if args.quick else 20000),
        "shadow": await bench_shadow(tmp, rounds, per + per // 3, 8),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "seconds": None,
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
